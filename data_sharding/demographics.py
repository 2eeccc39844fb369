"""The 17 demographic features of :data:`~data_sharding.constants.DEMOGRAPHIC_FEATURES`.

* age = anchor_age + (year of ICU intime - anchor_year) (MIMIC-IV's shifted-age rule);
* height (cm), weight (kg): first value measured in the stay (cleaned like every
  EHR value), the variable's normal value when never measured;
* age/height/weight z-scored with statistics of the training stays only;
* one-hots: gender (F, M), race group (6), language (?, ENGLISH), marital status (4).
  A value outside the categories gives an all-zero group (e.g. marital status missing).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_sharding.constants import (
    DEMOGRAPHIC_COLUMNS,
    GENDERS,
    LANGUAGES,
    MARITAL_STATUSES,
    RACE_GROUPS,
    slug,
)

CONTINUOUS = ("age", "height", "weight")
_UNKNOWN = "UNKNOWN/UNABLE TO OBTAIN/PATIENT DECLINED TO ANSWER"


def race_group(race: object) -> str:
    """MIMIC-IV ``race`` (2.0; ``ethnicity`` before) -> one of the 6 groups of the paper."""
    r = str(race).strip().upper() if isinstance(race, str) else ""
    if not r or r in ("UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER") or r.startswith("UNKNOWN"):
        return _UNKNOWN
    if r.startswith("WHITE") or r == "PORTUGUESE":
        return "WHITE"
    if r.startswith("BLACK"):
        return "BLACK/AFRICAN AMERICAN"
    if r.startswith("HISPANIC") or r == "SOUTH AMERICAN":
        return "HISPANIC/LATINO"
    if r.startswith("ASIAN"):
        return "ASIAN"
    return "OTHER"


def language_group(language: object) -> str:
    """MIMIC-IV 2.0 records ENGLISH or '?'; anything else counts as '?' (not English / unknown)."""
    return "ENGLISH" if isinstance(language, str) and language.strip().upper() == "ENGLISH" else "?"


def raw_features(stays: pd.DataFrame, height: np.ndarray, weight: np.ndarray) -> pd.DataFrame:
    """Unnormalised features, one row per stay (same order as ``stays``)."""
    out = pd.DataFrame({"subject_id": stays["subject_id"].to_numpy(np.int64),
                        "stay_id": stays["stay_id"].to_numpy(np.int64)})
    year = stays["intime"].dt.year.to_numpy()
    anchor_year = pd.to_numeric(stays["anchor_year"], errors="coerce").to_numpy(np.float64)
    age = stays["anchor_age"].to_numpy(np.float64) + np.where(np.isnan(anchor_year), 0.0, year - anchor_year)
    out["age"] = age
    out["height"] = height
    out["weight"] = weight
    gender = stays["gender"].fillna("").astype(str).str.strip().str.upper()
    for g in GENDERS:
        out[slug(f"gender_{g}")] = (gender == g).to_numpy(np.float64)
    race = stays["race"].map(race_group)
    for r in RACE_GROUPS:
        out[slug(f"race_{r}")] = (race == r).to_numpy(np.float64)
    lang = stays["language"].map(language_group)
    for lg in LANGUAGES:
        out[slug(f"language_{lg}")] = (lang == lg).to_numpy(np.float64)
    marital = stays["marital_status"].fillna("").astype(str).str.strip().str.upper()
    for m in MARITAL_STATUSES:
        out[slug(f"marital_{m}")] = (marital == m).to_numpy(np.float64)
    assert list(out.columns[2:]) == list(DEMOGRAPHIC_COLUMNS), "demographic column order drifted from constants"
    return out


def normalise(features: pd.DataFrame, is_train: np.ndarray) -> tuple[pd.DataFrame, dict]:
    """Z-score age/height/weight with training-stay statistics; columns cast to float32."""
    out = features.copy()
    stats: dict = {"mean": {}, "std": {}}
    train = features[np.asarray(is_train, dtype=bool)]
    for c in CONTINUOUS:
        mean = float(train[c].mean())
        std = float(train[c].std(ddof=0))
        std = std if std > 1e-8 else 1.0
        stats["mean"][c], stats["std"][c] = mean, std
        out[c] = (out[c] - mean) / std
    for c in DEMOGRAPHIC_COLUMNS:
        out[c] = out[c].astype(np.float32)
    return out, stats
