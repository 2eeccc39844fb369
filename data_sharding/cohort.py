"""The paper's cohort rules, each applied as one step that records what it kept and dropped.

Order and boundaries follow the authors' code (github.com/Chenliu-svg/DiPro
``mimic_data_extract/mimic3benchmark/scripts/get_cxr.py: align_cxr_with_stay``;
rules 1-4 are mimic3-benchmarks' ``all_stays.csv``, which that function reads).
docs/FIDELITY.md compares every rule with the paper and the authors' code.

ICU stays (MIMIC-IV ``icustays`` joined to ``patients`` and ``admissions``):

1. ``linked_records``   the stay's patient and admission exist and intime/outtime parse.
2. ``adult``            anchor_age >= 18.
3. ``one_icu_stay_per_admission``  admissions with more than one ICU stay are dropped.
4. ``same_careunit``    first_careunit == last_careunit (no transfer).
   (The stays left here are the authors' "all stays": the population of ``--norm-stats all``.)
5. ``stay_longer_than_48h``  LOS * 24 > 48 h.
6. ``los_iqr``          Q1 - 1.5 IQR < LOS < Q3 + 1.5 IQR (strict), quartiles over the stays
   left by rule 5 -- before any CXR rule; the bounds (days) go to the report.

CXRs (MIMIC-CXR-JPG metadata):

7. ``ap_view``                ViewPosition == "AP".
8. ``valid_study_datetime``   StudyDate (YYYYMMDD) and StudyTime (HHMMSS.fff) parse; the
   fraction of a second is dropped, as the authors' ``int(float(StudyTime))`` does.
9. ``last_image_of_study``    one image per study: the latest by StudyDateTime; equal times keep
   the image that comes last in the metadata file (the authors' stable sort + ``nth(-1)``).
10. ``inside_icu_stay``       taken inside [intime, outtime] (inclusive) of a cohort stay of the subject.
11. ``readable_jpeg`` / ``scene_graph`` (applied in :mod:`data_sharding.prepare`, they read files).

Stays and CXRs together, in the authors' order:

12. ``at_least_2_cxrs``       stays with fewer than 2 CXRs left are dropped.
13. ``at_most_14_cxrs``       stays with more than 14 CXRs (counted now, before the gap rules) are dropped.
14. ``min_gap_8h``            gap = hours since the previous CXR of the stay in this (unfiltered)
   sequence, 12 for the first; a CXR with gap < 8 h is dropped (exactly 8 h is kept), even when
   the previous CXR is itself dropped.
15. ``max_gap_96h``           a stay with a gap >= 96 h is dropped.

Nothing re-checks "at least 2 CXRs" after rules 14-15 (the authors do not either): a stay left
with one CXR stays in the cohort -- and so in the subject list the split is drawn from -- but
in no task (both need a pair).  The report counts them.

CXR time = hours since ICU intime.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_sharding.constants import (
    FIRST_CXR_GAP_HOURS,
    IQR_FACTOR,
    MAX_CXR_GAP_HOURS,
    MAX_CXRS,
    MIN_AGE,
    MIN_CXR_GAP_HOURS,
    MIN_CXRS,
    MIN_STAY_HOURS,
)

HOUR = pd.Timedelta(hours=1)


@dataclass
class RuleReport:
    """Kept/dropped counts per rule (with reasons) and skipped records by reason."""

    rules: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def rule(self, name: str, unit: str, kept: int, reasons: dict[str, int] | Counter,
             details: dict | None = None) -> None:
        """Record one rule; ``details`` (JSON-able) carries what else it measured (bounds, side counts)."""
        reasons = {str(k): int(v) for k, v in reasons.items() if int(v) > 0}
        entry = {"rule": name, "unit": unit, "kept": int(kept), "dropped": int(sum(reasons.values())),
                 "reasons": reasons}
        if details:
            entry["details"] = details
        self.rules.append(entry)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] += int(n)

    def to_dict(self) -> dict:
        return {"rules": list(self.rules), "skipped": dict(sorted(self.skipped.items()))}

    def summary(self) -> str:
        """The same counts as report.json, as a printable table."""
        w = max([len(r["rule"]) for r in self.rules] + [20])
        lines = [f"{'rule':<{w}}  {'unit':<6} {'kept':>9} {'dropped':>9}  reasons"]
        for r in self.rules:
            reasons = "; ".join(f"{k}: {v}" for k, v in r["reasons"].items())
            lines.append(f"{r['rule']:<{w}}  {r['unit']:<6} {r['kept']:>9} {r['dropped']:>9}  {reasons}")
            if r.get("details"):
                lines.append(f"{'':<{w}}  " + "; ".join(f"{k}: {_fmt(v)}" for k, v in r["details"].items()))
        if self.skipped:
            lines.append("skipped records:")
            lines += [f"  {k}: {v}" for k, v in sorted(self.skipped.items())]
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def parse_times(s: pd.Series) -> pd.Series:
    """ISO-8601 MIMIC-IV timestamps / dates -> datetime64 (NaT when unparseable)."""
    return pd.to_datetime(s, format="ISO8601", errors="coerce")


def _to_int(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def select_stays(patients: pd.DataFrame, admissions: pd.DataFrame, icustays: pd.DataFrame,
                 report: RuleReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rules 1-6.  Returns ``(all_stays, stays)``: the stays after rules 1-4 (the authors' "all
    stays") and the cohort candidates after rules 5-6, one row per stay with the patient and
    admission fields joined and ``los_days`` = (outtime - intime) in days."""
    st = icustays.copy()
    st["intime"] = parse_times(st["intime"])
    st["outtime"] = parse_times(st["outtime"])
    pat = patients.drop_duplicates("subject_id").set_index("subject_id")
    adm = admissions.drop_duplicates("hadm_id").set_index("hadm_id")
    reasons: Counter = Counter()
    no_pat = ~st["subject_id"].isin(pat.index)
    no_adm = ~no_pat & ~st["hadm_id"].isin(adm.index)
    bad_t = ~no_pat & ~no_adm & (st["intime"].isna() | st["outtime"].isna())
    reasons["subject not in patients"] = int(no_pat.sum())
    reasons["admission not in admissions"] = int(no_adm.sum())
    reasons["unparseable intime/outtime"] = int(bad_t.sum())
    st = st[~(no_pat | no_adm | bad_t)]
    report.rule("linked_records", "stays", len(st), reasons)

    st = st.join(pat[["gender", "anchor_age", "anchor_year", "dod"]], on="subject_id")
    st = st.join(adm[["admittime", "dischtime", "deathtime", "language", "marital_status", "race"]], on="hadm_id")
    age = _to_int(st["anchor_age"])
    adult = age >= MIN_AGE
    report.rule("adult", "stays", int(adult.sum()),
                {f"anchor_age < {MIN_AGE}": int((~adult & age.notna()).sum()),
                 "anchor_age missing/unparseable": int(age.isna().sum())})
    st = st[adult].copy()
    st["anchor_age"] = age[adult].astype(np.int64)
    st["anchor_year"] = _to_int(st["anchor_year"])

    n_per_adm = st.groupby("hadm_id")["stay_id"].transform("size")
    one = n_per_adm == 1
    report.rule("one_icu_stay_per_admission", "stays", int(one.sum()),
                {"admission has several ICU stays": int((~one).sum())})
    st = st[one]

    same = st["first_careunit"].fillna("") == st["last_careunit"].fillna("")
    report.rule("same_careunit", "stays", int(same.sum()), {"first_careunit != last_careunit": int((~same).sum())})
    st = st[same].copy()
    for c in ("admittime", "dischtime", "deathtime", "dod"):
        st[c] = parse_times(st[c])
    st["los_days"] = (st["outtime"] - st["intime"]) / pd.Timedelta(days=1)
    all_stays = st.sort_values("stay_id").reset_index(drop=True)

    long = all_stays["los_days"] * 24 > MIN_STAY_HOURS
    report.rule("stay_longer_than_48h", "stays", int(long.sum()),
                {f"stay <= {MIN_STAY_HOURS:g} h": int((~long).sum())})
    st = all_stays[long]
    st = apply_los_iqr(st, report)
    return all_stays, st.reset_index(drop=True)


def iqr_bounds(values: pd.Series) -> dict[str, float]:
    """Q1, Q3 (pandas' linear quantiles, NaN skipped) and Q1 - 1.5 IQR, Q3 + 1.5 IQR."""
    q1, q3 = float(values.quantile(0.25)), float(values.quantile(0.75))
    iqr = q3 - q1
    return {"q1": q1, "q3": q3, "low": q1 - IQR_FACTOR * iqr, "high": q3 + IQR_FACTOR * iqr}


def apply_los_iqr(stays: pd.DataFrame, report: RuleReport) -> pd.DataFrame:
    """Rule 6: keep stays whose LOS (days) lies strictly inside the IQR bounds of these stays."""
    if stays.empty:
        report.rule("los_iqr", "stays", 0, {})
        return stays
    b = iqr_bounds(stays["los_days"])
    los = stays["los_days"]
    low, high = los <= b["low"], los >= b["high"]
    report.rule("los_iqr", "stays", int((~low & ~high).sum()),
                {f"LOS <= Q1 - {IQR_FACTOR:g} IQR": int(low.sum()), f"LOS >= Q3 + {IQR_FACTOR:g} IQR": int(high.sum())},
                details={"bounds_days": {k: round(v, 6) for k, v in b.items()}})
    return stays[~low & ~high]


def study_datetime(study_date: pd.Series, study_time: pd.Series) -> pd.Series:
    """MIMIC-CXR StudyDate (YYYYMMDD) + StudyTime (HHMMSS.fff, leading zeros dropped) -> datetime64 (whole seconds)."""
    d = _to_int(study_date)
    t = np.floor(pd.to_numeric(study_time, errors="coerce"))  # whole seconds, as int(float(StudyTime))
    hh = np.floor(t / 10000)
    mm = np.floor((t % 10000) / 100)
    ss = t % 100
    ok = d.notna() & t.notna() & (t >= 0) & (hh < 24) & (mm < 60) & (ss < 60)
    date = pd.to_datetime(d.where(ok).astype("Int64").astype(str), format="%Y%m%d", errors="coerce")
    offset = pd.to_timedelta(hh * 3600 + mm * 60 + ss, unit="s")
    return (date + offset).where(ok & date.notna())


def select_images(metadata: pd.DataFrame, report: RuleReport) -> pd.DataFrame:
    """Rules 7-9 on the CXR metadata: AP views, parseable study time, last image of each study."""
    md = metadata
    ap = md["ViewPosition"].fillna("").str.strip().str.upper() == "AP"
    views = md.loc[~ap, "ViewPosition"].fillna("missing").astype(str).value_counts()
    report.rule("ap_view", "images", int(ap.sum()), {f"view {k}": int(v) for k, v in views.items()})
    md = md[ap].copy()

    md["study_time"] = study_datetime(md["StudyDate"], md["StudyTime"])
    bad = md["study_time"].isna()
    report.rule("valid_study_datetime", "images", int((~bad).sum()),
                {"unparseable StudyDate/StudyTime": int(bad.sum())})
    report.skip("CXR with unparseable StudyDate/StudyTime", int(bad.sum()))
    md = md[~bad]

    md = md.assign(_row=np.arange(len(md))).sort_values(["study_id", "study_time", "_row"]).drop(columns="_row")
    last = ~md.duplicated("study_id", keep="last")
    report.rule("last_image_of_study", "images", int(last.sum()),
                {"earlier image of the same study": int((~last).sum())})
    return md[last].reset_index(drop=True)


def match_to_stays(images: pd.DataFrame, stays: pd.DataFrame, report: RuleReport) -> pd.DataFrame:
    """Rule 10: attach each image to the cohort stay of its subject whose [intime, outtime] holds it."""
    cand = images.merge(stays[["subject_id", "stay_id", "intime", "outtime"]], on="subject_id", how="inner")
    no_subject = int((~images["subject_id"].isin(stays["subject_id"])).sum())
    inside = (cand["study_time"] >= cand["intime"]) & (cand["study_time"] <= cand["outtime"])
    kept = cand[inside].copy()
    # An image can lie in at most one stay of its subject (stays of one subject do not overlap).
    kept = kept.drop_duplicates("dicom_id", keep="first")
    outside = len(images) - no_subject - len(kept)
    report.rule("inside_icu_stay", "images", len(kept),
                {"subject has no cohort stay": no_subject, "outside [intime, outtime]": outside})
    kept["hours"] = (kept["study_time"] - kept["intime"]) / HOUR
    return kept.sort_values(["stay_id", "hours", "study_id"]).reset_index(drop=True)


def apply_cxr_rules(stays: pd.DataFrame, cxr: pd.DataFrame, report: RuleReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rules 12-15 in the authors' order; returns the cohort stays and their CXRs sorted by (stay, time)."""
    cxr = cxr.sort_values(["stay_id", "hours", "study_id"]).reset_index(drop=True)
    n = stays["stay_id"].map(cxr.groupby("stay_id").size()).fillna(0).astype(int)
    none, one = n == 0, n == 1
    report.rule("at_least_2_cxrs", "stays", int((n >= MIN_CXRS).sum()),
                {"no CXR": int(none.sum()), "1 CXR": int(one.sum())})
    many = n > MAX_CXRS
    report.rule("at_most_14_cxrs", "stays", int(((n >= MIN_CXRS) & ~many).sum()),
                {f"more than {MAX_CXRS} CXRs": int(many.sum())})
    stays = stays[(n >= MIN_CXRS) & ~many]
    cxr = cxr[cxr["stay_id"].isin(stays["stay_id"])].reset_index(drop=True)

    gap = cxr.groupby("stay_id")["hours"].diff().fillna(FIRST_CXR_GAP_HOURS).to_numpy()
    keep = gap >= MIN_CXR_GAP_HOURS - 1e-9  # exactly 8 h is kept (1e-9 h absorbs float noise)
    report.rule("min_gap_8h", "images", int(keep.sum()),
                {f"< {MIN_CXR_GAP_HOURS:g} h after the previous CXR": int((~keep).sum())})
    cxr = cxr.assign(gap_hours=gap)[keep]

    big = set(cxr.loc[cxr["gap_hours"] >= MAX_CXR_GAP_HOURS - 1e-9, "stay_id"])
    drop = stays["stay_id"].isin(big)
    stays = stays[~drop].reset_index(drop=True)
    cxr = cxr[cxr["stay_id"].isin(stays["stay_id"])].drop(columns="gap_hours").reset_index(drop=True)
    left = stays["stay_id"].map(cxr.groupby("stay_id").size()).fillna(0).astype(int)
    report.rule("max_gap_96h", "stays", len(stays),
                {f"gap >= {MAX_CXR_GAP_HOURS:g} h between CXRs": int(drop.sum())},
                details={"stays left with 1 CXR (kept, in no task)": int((left < MIN_CXRS).sum())})
    return stays, cxr
