"""MIMIC-IV ICU/hosp events carrying the mortality and length-of-stay signals.

Every stay gets the 38 variables (itemids of :data:`data_sharding.constants.EHR_VARIABLES`) over its whole stay:
vitals hourly, temperature / GCS / ventilator settings every 4 h, glucose every
6 h, blood labs every 12 h, liver labs and troponin daily, height once, weight
daily, urine output (outputevents 226559) every 1-2 h.  Each measurement is

    value(t) = base + drift * ramp(t) * DEATH_DRIFT + resp * RESP_COEF + noise,
    ramp(t) = clip(t / 48 h, 0, 1.5)

* ``base``: the stay's own level (normal value + between-stay spread);
* ``drift`` (mortality signal): ~U(0.6, 1.4) for 90 % of stays ending in death
  (the rest die suddenly, ~U(0, 0.3)); ~|N(0, 0.2)| for 90 % of survivors (the
  rest are sick survivors, ~U(0.4, 1.0)).  At full drift heart rate rises 30 bpm,
  MAP falls 18 mmHg, SpO2 falls 6 %, creatinine +1.6, BUN +30, bicarbonate -7,
  pH -0.12, urine -55 ml/h, GCS loses 2-3 points per component, ... over the first 48 h;
* ``resp`` (LOS signal): (LOS bin - 1.5) / 1.5 + N(0, 0.3) -> FiO2, PEEP,
  respiratory rate, PaCO2, WBC, temperature rise and albumin falls with it, and
  stays with high ``resp`` are ventilated (FiO2/PEEP charted, verbal GCS "No Response-ETT").

Realistic dirt: GCS as text only (``valuenum`` empty), temperature in deg F,
prothrombin time as INR (itemid 227467), ~0.2 % out-of-range values (flagged in
``warning``), ~0.3 % missing values, ~0.1 % unparseable text ("ERROR", "___"), some
events charted before ``intime``; no event is charted after ``outtime``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_sharding.constants import EHR_VARIABLES, REQUIRED_COLUMNS
from data_sharding.synth.cohort import HOUR, Cohort, Stay

# cadence: hours between charted values (None = once at admission)
CADENCE = {"vital": 1.0, "temp": 4.0, "gcs": 4.0, "vent": 4.0, "glucose": 6.0, "lab": 12.0, "daily": 24.0, "once": None}


@dataclass(frozen=True)
class VarModel:
    mean: float
    sd_between: float
    sd_within: float
    death: float  # change at full drift
    resp: float  # change per unit of the respiratory latent
    decimals: int
    uom: str
    cadence: str
    floor: float = 0.0
    ceil: float | None = None


# Chart itemid -> value model (INR for 227467, deg F for 223761, percent for FiO2 as MIMIC-IV charts it).
CHART_MODELS: dict[int, VarModel] = {
    220045: VarModel(86, 12, 5, 30, 3, 0, "bpm", "vital"),
    220179: VarModel(118, 14, 7, -25, 0, 0, "mmHg", "vital"),
    220180: VarModel(59, 8, 5, -12, 0, 0, "mmHg", "vital"),
    220181: VarModel(77, 9, 5, -18, 0, 0, "mmHg", "vital"),
    220277: VarModel(97, 1.5, 1.2, -6, -0.8, 0, "%", "vital", 50, 100),
    220210: VarModel(19, 3, 2, 8, 2.5, 0, "insp/min", "vital"),
    223761: VarModel(98.6, 0.8, 0.4, 1.2, 0.6, 1, "°F", "temp", 90, 108),
    223835: VarModel(35, 5, 3, 25, 18, 0, "%", "vent", 21, 100),
    224700: VarModel(6, 1.5, 0.5, 3, 2, 0, "cmH2O", "vent", 0, 24),
    220644: VarModel(34, 15, 5, 60, 0, 0, "IU/L", "daily"),
    227456: VarModel(3.1, 0.4, 0.1, -0.5, -0.25, 1, "g/dL", "daily", 1.0),
    225612: VarModel(106, 30, 8, 30, 0, 0, "IU/L", "daily"),
    227073: VarModel(13, 2.5, 1.5, 7, 0, 0, "mEq/L", "lab"),
    220587: VarModel(40, 18, 6, 90, 0, 0, "IU/L", "daily"),
    227443: VarModel(25, 2.5, 1.2, -7, 0, 0, "mEq/L", "lab", 5),
    225690: VarModel(0.9, 0.4, 0.1, 1.5, 0, 1, "mg/dL", "daily", 0.1),
    225624: VarModel(23, 8, 2, 30, 3, 0, "mg/dL", "lab", 2),
    220602: VarModel(104, 3, 1.5, 0, 0, 0, "mEq/L", "lab"),
    220615: VarModel(1.0, 0.3, 0.08, 1.6, 0.15, 1, "mg/dL", "lab", 0.2),
    225664: VarModel(128, 25, 15, 40, 5, 0, "mg/dL", "glucose", 40),
    220545: VarModel(30.2, 4, 1, -4, 0, 1, "%", "lab", 12),
    220228: VarModel(10.2, 1.4, 0.3, -1.3, 0, 1, "g/dl", "lab", 4),
    220635: VarModel(2.0, 0.2, 0.1, 0, 0, 1, "mg/dL", "lab", 0.8),
    220235: VarModel(40, 6, 3, 8, 2, 0, "mmHg", "lab", 15),
    227466: VarModel(34.4, 6, 2, 10, 0, 1, "sec", "lab", 18),
    227457: VarModel(208, 60, 10, -80, 0, 0, "K/uL", "lab", 5),
    227442: VarModel(4.1, 0.4, 0.2, 0.8, 0, 1, "mEq/L", "lab", 2.5),
    227467: VarModel(1.2, 0.2, 0.05, 0.9, 0, 1, "", "lab", 0.8),
    220645: VarModel(140, 3, 1.5, 0, 0, 0, "mEq/L", "lab", 115),
    227429: VarModel(0.05, 0.05, 0.01, 0.3, 0, 2, "ng/mL", "daily", 0.01),
    220546: VarModel(9.9, 3, 0.7, 8, 2, 1, "K/uL", "lab", 0.5),
    223830: VarModel(7.40, 0.03, 0.02, -0.12, 0, 2, "units", "lab", 6.9, 7.7),
}
URINE = VarModel(80, 25, 25, -55, 0, 0, "ml", "vital", 0)
URINE_ITEMID = 226559
HEIGHT_ITEMID, WEIGHT_ITEMID = 226730, 224639

# GCS: itemid -> (max level, drift points at full drift, texts by level (MIMIC-IV), numbered variants)
GCS: dict[int, tuple[int, float, dict[int, str], dict[int, str]]] = {
    220739: (4, 2.0,
             {4: "Spontaneously", 3: "To Speech", 2: "To Pain", 1: "No Response"},
             {4: "4 Spontaneously", 3: "3 To speech", 2: "2 To pain", 1: "1 No Response"}),
    223901: (6, 3.0,
             {6: "Obeys Commands", 5: "Localizes Pain", 4: "Flex-withdraws", 3: "Abnormal Flexion",
              2: "Abnormal extension", 1: "No response"},
             {6: "6 Obeys Commands", 5: "5 Localizes Pain", 4: "4 Flex-withdraws", 3: "3 Abnorm flexion",
              2: "2 Abnorm extensn", 1: "1 No Response"}),
    223900: (5, 3.0,
             {5: "Oriented", 4: "Confused", 3: "Inappropriate Words", 2: "Incomprehensible sounds", 1: "No Response"},
             {5: "5 Oriented", 4: "4 Confused", 3: "3 Inapprop words", 2: "2 Incomp sounds", 1: "1 No Response"}),
}
VERBAL_ETT = "No Response-ETT"

OUT_OF_RANGE_P, MISSING_P, UNPARSEABLE_P = 0.002, 0.003, 0.001
UNPARSEABLE_TEXT = ("ERROR", "___", "see comment", "Not Done")

# Lab (hosp/labevents) items written sparsely beside the chart copies.
LAB_ITEMS: dict[int, tuple[str, str, str, int, float, float]] = {
    # itemid: (label, fluid, category, chart itemid it mirrors, ref low, ref high)
    50912: ("Creatinine", "Blood", "Chemistry", 220615, 0.5, 1.2),
    50971: ("Potassium", "Blood", "Chemistry", 227442, 3.3, 5.1),
    50983: ("Sodium", "Blood", "Chemistry", 220645, 133, 145),
    51222: ("Hemoglobin", "Blood", "Hematology", 220228, 13.7, 17.5),
    51301: ("White Blood Cells", "Blood", "Hematology", 220546, 4.0, 11.0),
    50813: ("Lactate", "Blood", "Blood Gas", 0, 0.5, 2.0),
}


def _times(rng: np.random.Generator, cadence: str, end_h: float, start_h: float = 0.0) -> np.ndarray:
    step = CADENCE[cadence]
    if step is None:
        return np.array([rng.uniform(0.2, 2.0)])
    grid = np.arange(start_h + rng.uniform(0.0, step), end_h, step)
    jitter = rng.uniform(-0.15, 0.15, size=grid.shape) * step
    t = np.clip(grid + jitter, start_h, end_h - 1.0 / 60)
    keep = rng.random(t.shape) >= (0.08 if cadence == "vital" else 0.25)
    return np.sort(t[keep])


def _ramp(t_h: np.ndarray) -> np.ndarray:
    return np.clip(t_h / 48.0, 0.0, 1.5)


def _series(rng: np.random.Generator, m: VarModel, st: Stay, t_h: np.ndarray) -> np.ndarray:
    base = m.mean + rng.normal(0.0, m.sd_between)
    x = base + st.drift * _ramp(t_h) * m.death + st.resp * m.resp + rng.normal(0.0, m.sd_within, size=t_h.shape)
    x = np.maximum(x, m.floor)
    if m.ceil is not None:
        x = np.minimum(x, m.ceil)
    return np.round(x, m.decimals)


def _fmt(values: np.ndarray, decimals: int) -> list[str]:
    return [f"{v:.{decimals}f}" for v in values]


def _stamp(seconds: np.ndarray) -> np.ndarray:
    """int seconds -> 'YYYY-MM-DD HH:MM:SS' strings."""
    s = np.datetime_as_string(np.asarray(seconds, dtype="int64").astype("datetime64[s]"), unit="s")
    return np.char.replace(s, "T", " ")


class _Columns:
    """Column-wise accumulator (one DataFrame at the end; per-stay frames are slow)."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {k: [] for k in ("subject_id", "hadm_id", "stay_id", "t", "itemid", "value", "valuenum", "valueuom")}

    def add(self, ids: tuple[int, int, int], t: np.ndarray, itemid: int, value: list[str], valuenum: np.ndarray, uom: str) -> None:
        n = len(t)
        if n == 0:
            return
        for k, x in zip(("subject_id", "hadm_id", "stay_id"), ids):
            self.cols[k].append(np.full(n, x, dtype=np.int64))
        self.cols["t"].append(np.asarray(t, dtype=np.int64))
        self.cols["itemid"].append(np.full(n, itemid, dtype=np.int64))
        self.cols["value"].append(np.asarray(value, dtype=object))
        self.cols["valuenum"].append(np.asarray(valuenum, dtype=np.float64))
        self.cols["valueuom"].append(np.full(n, uom, dtype=object))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({k: np.concatenate(v) for k, v in self.cols.items()})


def _stay_chart_rows(rng: np.random.Generator, cohort: Cohort, st: Stay, out: _Columns) -> None:
    subj = cohort.subjects[st.subject_index]
    ids = (subj.subject_id, cohort.admissions[st.admission_index].hadm_id, st.stay_id)
    end_h = (st.outtime - st.intime) / HOUR
    start_h = -1.0 if rng.random() < 0.1 else 0.0  # some charting starts before intime

    def emit(itemid: int, t_h: np.ndarray, value: list[str], valuenum: np.ndarray, uom: str) -> None:
        out.add(ids, st.intime + np.round(t_h * HOUR).astype(np.int64), itemid, value, valuenum, uom)

    for itemid, m in CHART_MODELS.items():
        if m.cadence == "vent" and not st.ventilated:
            continue
        if itemid == 227429 and rng.random() < 0.4:  # troponin not ordered for everyone
            continue
        t_h = _times(rng, m.cadence, end_h, start_h if m.cadence == "vital" else 0.0)
        x = _series(rng, m, st, t_h)
        emit(itemid, t_h, _fmt(x, m.decimals), x.astype(np.float64), m.uom)

    for itemid, (top, drop, plain, numbered) in GCS.items():
        t_h = _times(rng, "gcs", end_h)
        sedation = rng.uniform(0.0, 1.5) if st.ventilated else rng.uniform(0.0, 0.5)
        lvl = top - sedation - st.drift * _ramp(t_h) * drop + rng.normal(0.0, 0.5, size=t_h.shape)
        lvl = np.clip(np.rint(lvl), 1, top).astype(int)
        numbered_style = rng.random() < 0.15
        texts = [(numbered if numbered_style else plain)[int(k)] for k in lvl]
        if itemid == 223900 and st.ventilated:
            texts = [VERBAL_ETT if rng.random() < 0.7 else s for s in texts]
        emit(itemid, t_h, texts, np.full(len(t_h), np.nan), "")

    t_h = _times(rng, "once", end_h)
    if rng.random() < 0.8:
        emit(HEIGHT_ITEMID, t_h, [f"{subj.height_cm:.0f}"], np.array([round(subj.height_cm)], dtype=float), "cm")
    t_h = _times(rng, "daily", end_h)
    w = np.round(subj.weight_kg + np.cumsum(rng.normal(0.0, 0.4, size=t_h.shape)), 1)
    emit(WEIGHT_ITEMID, t_h, _fmt(w, 1), w, "kg")


def _dirty(rng: np.random.Generator, df: pd.DataFrame, numeric: np.ndarray) -> pd.DataFrame:
    """Inject out-of-range, missing and unparseable values into numeric rows (at least one each)."""
    idx = np.flatnonzero(numeric)
    n = len(idx)
    if n < 3:
        return df
    counts = [max(1, int(round(p * n))) for p in (OUT_OF_RANGE_P, MISSING_P, UNPARSEABLE_P)]
    chosen = rng.choice(idx, size=min(sum(counts), n), replace=False)
    oor, miss, bad = np.split(chosen, [counts[0], counts[0] + counts[1]])
    value = df["value"].to_numpy(dtype=object).copy()
    valuenum = df["valuenum"].to_numpy(dtype=np.float64).copy()
    warning = np.zeros(len(df), dtype=np.int64)
    highs = {v.itemid: v.high for v in EHR_VARIABLES}
    items = df["itemid"].to_numpy()
    for j, i in enumerate(oor):
        hi = highs.get(int(items[i]), 1000.0)
        x = round(hi * 1.5 + 10, 1) if j % 3 else -round(abs(valuenum[i]) + 1.0, 1)
        value[i], valuenum[i], warning[i] = f"{x}", x, 1
    value[miss], valuenum[miss] = "", np.nan
    for j, i in enumerate(bad):
        value[i], valuenum[i] = UNPARSEABLE_TEXT[j % len(UNPARSEABLE_TEXT)], np.nan
    df["value"], df["valuenum"], df["warning"] = value, valuenum, warning
    return df


def chartevents(cohort: Cohort) -> pd.DataFrame:
    """icu/chartevents rows (REQUIRED_COLUMNS order), sorted by subject, stay, time, itemid."""
    rng = np.random.default_rng(np.random.SeedSequence([cohort.seed, 2]))
    cols = _Columns()
    for st in cohort.stays:
        _stay_chart_rows(rng, cohort, st, cols)
    df = cols.frame()
    df = df.sort_values(["subject_id", "stay_id", "t", "itemid"], kind="stable").reset_index(drop=True)
    df["warning"] = 0
    gcs = df["itemid"].isin(list(GCS)).to_numpy()
    df = _dirty(rng, df, ~gcs)
    t = df["t"].to_numpy()
    store = t + rng.integers(60, 3600, size=len(t))
    df["charttime"] = _stamp(t)
    df["storetime"] = _stamp(store)
    return df[list(REQUIRED_COLUMNS["chartevents"])]


def outputevents(cohort: Cohort) -> pd.DataFrame:
    """icu/outputevents: Foley urine output (226559), ml charted every 1-2 h."""
    rng = np.random.default_rng(np.random.SeedSequence([cohort.seed, 3]))
    parts: list[pd.DataFrame] = []
    for st in cohort.stays:
        end_h = (st.outtime - st.intime) / HOUR
        t_h = np.cumsum(rng.uniform(1.0, 2.0, size=int(end_h) + 2))
        t_h = t_h[t_h < end_h]
        rate = _series(rng, URINE, st, t_h)  # ml/h
        interval = np.diff(np.concatenate([[0.0], t_h]))
        amount = np.round(rate * interval, 0)
        parts.append(pd.DataFrame({
            "subject_id": cohort.subjects[st.subject_index].subject_id,
            "hadm_id": cohort.admissions[st.admission_index].hadm_id,
            "stay_id": st.stay_id,
            "t": st.intime + np.round(t_h * HOUR).astype(np.int64),
            "itemid": URINE_ITEMID,
            "value": amount,
            "valueuom": URINE.uom,
        }))
    df = pd.concat(parts, ignore_index=True)
    t = df["t"].to_numpy()
    df["charttime"] = _stamp(t)
    df["storetime"] = _stamp(t + rng.integers(60, 1800, size=len(t)))
    return df[list(REQUIRED_COLUMNS["outputevents"])]


def labevents(cohort: Cohort, chart: pd.DataFrame) -> pd.DataFrame:
    """hosp/labevents: one daily panel per admission (sparse; the 38 variables come from chartevents)."""
    rng = np.random.default_rng(np.random.SeedSequence([cohort.seed, 4]))
    rows: list[dict] = []
    for st in cohort.stays:
        subj = cohort.subjects[st.subject_index]
        hadm = cohort.admissions[st.admission_index].hadm_id
        end_h = (st.outtime - st.intime) / HOUR
        for day_h in np.arange(rng.uniform(1.0, 6.0), end_h, 24.0):
            t = st.intime + int(day_h * HOUR)
            specimen = int(rng.integers(1_000_000, 99_999_999))
            for itemid, (label, _fluid, _cat, _chart, lo, hi) in LAB_ITEMS.items():
                if itemid == 50813:
                    x = round(max(0.3, 1.2 + st.drift * min(day_h / 48.0, 1.5) * 2.5 + rng.normal(0, 0.3)), 1)
                else:
                    m = CHART_MODELS[_chart]
                    x = round(max(m.floor, m.mean + st.drift * min(day_h / 48.0, 1.5) * m.death + rng.normal(0, m.sd_between)), m.decimals)
                rows.append({
                    "subject_id": subj.subject_id,
                    "hadm_id": hadm if rng.random() > 0.05 else None,
                    "specimen_id": specimen,
                    "itemid": itemid,
                    "t": t,
                    "value": f"{x}",
                    "valuenum": float(x),
                    "valueuom": "mg/dL" if itemid in (50912,) else ("mmol/L" if itemid == 50813 else ("g/dL" if itemid == 51222 else ("K/uL" if itemid == 51301 else "mEq/L"))),
                    "ref_range_lower": lo,
                    "ref_range_upper": hi,
                    "flag": "abnormal" if not lo <= x <= hi else "",
                    "priority": "STAT" if rng.random() < 0.3 else "ROUTINE",
                    "comments": "",
                })
    df = pd.DataFrame(rows)
    df = df.sort_values(["subject_id", "t", "itemid"], kind="stable").reset_index(drop=True)
    df.insert(0, "labevent_id", np.arange(1, len(df) + 1, dtype=np.int64))
    df["hadm_id"] = df["hadm_id"].astype("Int64")
    t = df["t"].to_numpy()
    df["charttime"] = _stamp(t)
    df["storetime"] = _stamp(t + rng.integers(1800, 4 * 3600, size=len(t)))
    return df[list(REQUIRED_COLUMNS["labevents"])]


def d_items() -> pd.DataFrame:
    """icu/d_items rows for every itemid written (REQUIRED_COLUMNS order)."""
    rows = []
    for v in EHR_VARIABLES:
        m = CHART_MODELS.get(v.itemid)
        if v.itemid in GCS:
            uom, ptype, cat = "", "Text", "Neurological"
        elif v.itemid == URINE_ITEMID:
            uom, ptype, cat = "ml", "Numeric", "Output"
        elif v.itemid in (HEIGHT_ITEMID, WEIGHT_ITEMID):
            uom, ptype, cat = ("cm" if v.itemid == HEIGHT_ITEMID else "kg"), "Numeric", "General"
        else:
            uom, ptype, cat = (m.uom if m else ""), "Numeric", "Routine Vital Signs" if m and m.cadence == "vital" else "Labs"
        label = "Prothrombin time (INR)" if v.itemid == 227467 else ("Temperature Fahrenheit" if v.itemid == 223761 else v.name)
        rows.append({
            "itemid": v.itemid,
            "label": label,
            "abbreviation": label[:20],
            "linksto": v.source,
            "category": cat,
            "unitname": uom,
            "param_type": ptype,
            "lownormalvalue": np.nan,
            "highnormalvalue": np.nan,
        })
    df = pd.DataFrame(rows).sort_values("itemid", kind="stable").reset_index(drop=True)
    return df[list(REQUIRED_COLUMNS["d_items"])]


def d_labitems() -> pd.DataFrame:
    rows = [{"itemid": k, "label": v[0], "fluid": v[1], "category": v[2]} for k, v in sorted(LAB_ITEMS.items())]
    return pd.DataFrame(rows)[list(REQUIRED_COLUMNS["d_labitems"])]
