"""The paper's cohort rules, each applied as one step that records what it kept and dropped.

ICU stays (MIMIC-IV ``icustays`` joined to ``patients`` and ``admissions``):

1. ``linked_records``   the stay's patient and admission exist and intime/outtime parse.
2. ``adult``            anchor_age >= 18.
3. ``one_icu_stay_per_admission``  admissions with more than one ICU stay are dropped
   (mimic3-benchmarks' rule; keeping "the first" would bias the stays kept).
4. ``same_careunit``    first_careunit == last_careunit (no transfer).
5. ``stay_longer_than_48h``  outtime - intime > 48 h.

CXRs (MIMIC-CXR-JPG metadata):

6. ``ap_view``                ViewPosition == "AP".
7. ``valid_study_datetime``   StudyDate (YYYYMMDD) and StudyTime (HHMMSS.fff) parse.
8. ``last_image_of_study``    one image per study: the latest by (StudyDate, StudyTime), ties by dicom_id.
9. ``inside_icu_stay``        taken inside [intime, outtime] of a cohort stay of the same subject.
10. ``readable_jpeg`` / ``scene_graph`` (applied in :mod:`data_sharding.prepare`, they read files).
11. ``min_gap_8h``            a CXR < 8 h after the previous *kept* one is dropped (exactly 8 h is kept).

Stays again:

12. ``max_gap_96h``           a stay whose consecutive kept CXRs are >= 96 h apart is dropped.
13. ``cxr_count_2_to_14``     stays keep 2..14 CXRs.

CXR time = hours since ICU intime.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_sharding.constants import MAX_CXR_GAP_HOURS, MAX_CXRS, MIN_AGE, MIN_CXR_GAP_HOURS, MIN_CXRS, MIN_STAY_HOURS

HOUR = pd.Timedelta(hours=1)


@dataclass
class RuleReport:
    """Kept/dropped counts per rule (with reasons) and skipped records by reason."""

    rules: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def rule(self, name: str, unit: str, kept: int, reasons: dict[str, int] | Counter) -> None:
        reasons = {str(k): int(v) for k, v in reasons.items() if int(v) > 0}
        self.rules.append({"rule": name, "unit": unit, "kept": int(kept),
                           "dropped": int(sum(reasons.values())), "reasons": reasons})

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
        if self.skipped:
            lines.append("skipped records:")
            lines += [f"  {k}: {v}" for k, v in sorted(self.skipped.items())]
        return "\n".join(lines)


def parse_times(s: pd.Series) -> pd.Series:
    """ISO-8601 MIMIC-IV timestamps / dates -> datetime64 (NaT when unparseable)."""
    return pd.to_datetime(s, format="ISO8601", errors="coerce")


def _to_int(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def select_stays(patients: pd.DataFrame, admissions: pd.DataFrame, icustays: pd.DataFrame,
                 report: RuleReport) -> pd.DataFrame:
    """Rules 1-5.  Returns one row per kept stay with the patient and admission fields joined."""
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
    st = st[same]

    hours = (st["outtime"] - st["intime"]) / HOUR
    long = hours > MIN_STAY_HOURS
    report.rule("stay_longer_than_48h", "stays", int(long.sum()),
                {f"stay <= {MIN_STAY_HOURS:g} h": int((~long).sum())})
    st = st[long].copy()
    for c in ("admittime", "dischtime", "deathtime", "dod"):
        st[c] = parse_times(st[c])
    return st.sort_values("stay_id").reset_index(drop=True)


def study_datetime(study_date: pd.Series, study_time: pd.Series) -> pd.Series:
    """MIMIC-CXR StudyDate (YYYYMMDD) + StudyTime (HHMMSS.fff, leading zeros dropped) -> datetime64."""
    d = _to_int(study_date)
    t = pd.to_numeric(study_time, errors="coerce")
    hh = np.floor(t / 10000)
    mm = np.floor((t % 10000) / 100)
    ss = t % 100
    ok = d.notna() & t.notna() & (t >= 0) & (hh < 24) & (mm < 60) & (ss < 60)
    date = pd.to_datetime(d.where(ok).astype("Int64").astype(str), format="%Y%m%d", errors="coerce")
    offset = pd.to_timedelta(hh * 3600 + mm * 60 + ss, unit="s")
    return (date + offset).where(ok & date.notna())


def select_images(metadata: pd.DataFrame, report: RuleReport) -> pd.DataFrame:
    """Rules 6-8 on the CXR metadata: AP views, parseable study time, last image of each study."""
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

    md = md.sort_values(["study_id", "study_time", "dicom_id"])
    last = ~md.duplicated("study_id", keep="last")
    report.rule("last_image_of_study", "images", int(last.sum()),
                {"earlier image of the same study": int((~last).sum())})
    return md[last].reset_index(drop=True)


def match_to_stays(images: pd.DataFrame, stays: pd.DataFrame, report: RuleReport) -> pd.DataFrame:
    """Rule 9: attach each image to the cohort stay of its subject whose [intime, outtime] holds it."""
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


def apply_min_gap(cxr: pd.DataFrame, report: RuleReport) -> pd.DataFrame:
    """Rule 11: drop a CXR taken < 8 h after the previous kept CXR of its stay (8 h exactly is kept)."""
    cxr = cxr.sort_values(["stay_id", "hours", "study_id"]).reset_index(drop=True)
    keep = np.zeros(len(cxr), dtype=bool)
    stay = cxr["stay_id"].to_numpy()
    hours = cxr["hours"].to_numpy()
    last_stay, last_t = None, -np.inf
    for i in range(len(cxr)):
        if stay[i] != last_stay:
            last_stay, last_t = stay[i], hours[i]
            keep[i] = True
        elif hours[i] - last_t >= MIN_CXR_GAP_HOURS - 1e-9:
            last_t = hours[i]
            keep[i] = True
    report.rule("min_gap_8h", "images", int(keep.sum()),
                {f"< {MIN_CXR_GAP_HOURS:g} h after the previous kept CXR": int((~keep).sum())})
    return cxr[keep].reset_index(drop=True)


def apply_stay_cxr_rules(stays: pd.DataFrame, cxr: pd.DataFrame, report: RuleReport) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rules 12-13: drop stays with a gap >= 96 h between consecutive CXRs, then keep stays with 2..14 CXRs."""
    gaps = cxr.groupby("stay_id")["hours"].agg(lambda h: float(np.max(np.diff(h.to_numpy()))) if len(h) > 1 else 0.0)
    big = set(gaps[gaps >= MAX_CXR_GAP_HOURS - 1e-9].index)
    in_stays = stays["stay_id"].isin(big)
    report.rule("max_gap_96h", "stays", int((~in_stays).sum()),
                {f"gap >= {MAX_CXR_GAP_HOURS:g} h between consecutive CXRs": int(in_stays.sum())})
    stays = stays[~in_stays]
    cxr = cxr[cxr["stay_id"].isin(stays["stay_id"])]

    n = stays["stay_id"].map(cxr.groupby("stay_id").size()).fillna(0).astype(int)
    few, many = n < MIN_CXRS, n > MAX_CXRS
    report.rule("cxr_count_2_to_14", "stays", int((~few & ~many).sum()),
                {f"fewer than {MIN_CXRS} CXRs": int(few.sum()), f"more than {MAX_CXRS} CXRs": int(many.sum())})
    stays = stays[~few & ~many].reset_index(drop=True)
    cxr = cxr[cxr["stay_id"].isin(stays["stay_id"])].reset_index(drop=True)
    return stays, cxr
