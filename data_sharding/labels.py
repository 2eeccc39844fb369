"""Labels of the three tasks.

* **disease_progression** -- one row per pair of consecutive CXRs of a cohort stay that
  :class:`~data_sharding.dp_labels.ProgressionLabeler` keeps (authors' rule: at least one
  of the 7 diseases labelled; severity rule: every pair), with study labels ``[7]`` and
  region labels ``[10][7]`` (worsened 0, improved 1, no change 2, not mentioned 3 --
  masked out of losses and metrics).
* **mortality** -- in-hospital death: ``deathtime`` within [admittime, dischtime],
  or ``dod`` (a date) within [date(admittime), date(dischtime)].
* **length_of_stay** -- ICU LOS in days (outtime - intime) binned with edges
  [2, 3, 4, 6, 11), right-open: [2,3) -> 0, [3,4) -> 1, [4,6) -> 2, [6,11) -> 3.
  Below 2 days cannot occur after the > 48 h rule (clamped to 0 for robustness); 11 days
  and more join the last bin (the authors' ``pd.cut`` would give no class; the LOS IQR rule
  removes most such stays, the report counts the rest).
* mortality and LOS share inputs: the CXRs taken before 48 h (strictly, ``CXRRelTime < 48``
  in the authors' ``split_train_and_test.py: split_dataset_for_each_task``; at least 2 of
  them, else the stay is not in that task) and EHR hours 0..48; region labels of each
  consecutive pair of those CXRs, labelled or not.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_sharding.constants import (
    DISEASE_SLUGS,
    ICU_WINDOW_HOURS,
    LOS_BIN_EDGES,
    MIN_CXRS,
    NUM_DISEASES,
    NUM_LOS_BINS,
)
from data_sharding.dp_labels import ProgressionLabeler


def los_bin(los_days) -> np.ndarray:
    """LOS days -> class 0..3 with edges [2, 3, 4, 6, 11), right-open; < 2 -> 0, >= 11 -> 3."""
    inner = np.asarray(LOS_BIN_EDGES[1:-1], dtype=np.float64)  # 3, 4, 6
    b = np.searchsorted(inner, np.asarray(los_days, dtype=np.float64), side="right")
    return np.clip(b, 0, NUM_LOS_BINS - 1).astype(np.int8)


def in_hospital_mortality(stays: pd.DataFrame) -> np.ndarray:
    """1 when deathtime (or dod, a date) lies within the admission [admittime, dischtime]."""
    adm, dis = stays["admittime"], stays["dischtime"]
    by_time = stays["deathtime"].notna() & (stays["deathtime"] >= adm) & (stays["deathtime"] <= dis)
    dod = stays["dod"].dt.normalize()
    by_date = dod.notna() & (dod >= adm.dt.normalize()) & (dod <= dis.dt.normalize())
    return (by_time | by_date).to_numpy().astype(np.int8)


def progression_table(cohort: pd.DataFrame, cxr: pd.DataFrame, labeler: ProgressionLabeler) -> tuple[pd.DataFrame, int]:
    """tasks/disease_progression rows and the number of consecutive pairs looked at."""
    split = cohort.set_index("stay_id")["split"]
    rows: list[dict] = []
    n_pairs = 0
    for stay_id, g in cxr.groupby("stay_id", sort=True):
        d, h = g["dicom_id"].tolist(), g["hours"].tolist()
        subject = int(g["subject_id"].iloc[0])
        for i in range(len(d) - 1):
            n_pairs += 1
            lab = labeler.pair(d[i], d[i + 1])
            if not lab.keep:
                continue
            row = {"subject_id": subject, "stay_id": int(stay_id), "split": split[stay_id],
                   "cxr1_dicom_id": d[i], "cxr2_dicom_id": d[i + 1],
                   "cxr1_hours": float(h[i]), "cxr2_hours": float(h[i + 1])}
            row.update(dict(zip(DISEASE_SLUGS, lab.study.tolist())))
            row["region_labels"] = lab.region
            row["label_source"] = lab.source
            rows.append(row)
    return pd.DataFrame(rows), n_pairs


def mortality_los_table(cohort: pd.DataFrame, cxr: pd.DataFrame, labeler: ProgressionLabeler) -> tuple[pd.DataFrame, int]:
    """tasks/mortality_los rows (CXRs before 48 h, >= 2) and the number of stays with fewer."""
    c = cohort.set_index("stay_id")
    rows: list[dict] = []
    too_few = 0
    for stay_id, g in cxr.groupby("stay_id", sort=True):
        early = g["hours"].to_numpy() < ICU_WINDOW_HOURS
        n = int(early.sum())  # CXRs are time-sorted, so the early ones are a prefix
        if n < MIN_CXRS:
            too_few += 1
            continue
        s = c.loc[stay_id]
        d = g["dicom_id"].tolist()[:n]
        rows.append({
            "subject_id": int(s["subject_id"]), "stay_id": int(stay_id), "split": s["split"],
            "dicom_ids": d, "cxr_hours": [float(x) for x in g["hours"].tolist()[:n]],
            "mortality": int(s["mortality"]), "los_days": float(s["los_days"]), "los_bin": int(s["los_bin"]),
            "region_labels": np.stack([labeler.region(d[i], d[i + 1]) for i in range(n - 1)]),
        })
    return pd.DataFrame(rows), too_few


def _class_counts(values: np.ndarray, n_classes: int) -> list[int]:
    return np.bincount(np.asarray(values, dtype=np.int64).ravel(), minlength=n_classes)[:n_classes].tolist()


def label_stats(progression: pd.DataFrame, mortality_los: pd.DataFrame) -> dict:
    """Train-split label counts (class weights of the losses): layout of ARCHITECTURE.md section 1."""
    p = progression[progression["split"] == "train"] if len(progression) else progression
    m = mortality_los[mortality_los["split"] == "train"] if len(mortality_los) else mortality_los

    def region_counts(arrs) -> list[list[int]]:
        if len(arrs) == 0:
            return [[0] * 4 for _ in range(NUM_DISEASES)]
        r = np.concatenate([np.asarray(a).reshape(-1, NUM_DISEASES) for a in arrs], axis=0)
        return [_class_counts(r[:, j], 4) for j in range(NUM_DISEASES)]

    task = [_class_counts(p[c].to_numpy() if len(p) else [], 4) for c in DISEASE_SLUGS]
    return {
        "disease_progression": {"task": task, "region": region_counts(list(p["region_labels"]) if len(p) else [])},
        "mortality_los": {
            "mortality": _class_counts(m["mortality"].to_numpy() if len(m) else [], 2),
            "los_bin": _class_counts(m["los_bin"].to_numpy() if len(m) else [], NUM_LOS_BINS),
            "region": region_counts(list(m["region_labels"]) if len(m) else []),
        },
    }
