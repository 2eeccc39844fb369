"""The 17 demographic features of :data:`~data_sharding.constants.DEMOGRAPHIC_FEATURES`.

As the authors build them (github.com/Chenliu-svg/DiPro ``mimic_data_extract/mimic3benchmark/
scripts/ehr_preprocess.py: get_demographic_ehr, process_demographic``):

* age = anchor_age + (year of ICU intime - anchor_year) (MIMIC-IV's shifted-age rule);
* height (cm), weight (kg): the first value measured in the stay (converted, not clamped;
  missing when never measured);
* age / height / weight: Q1, Q3 of the statistics population; values outside
  [Q1 - 1.5 IQR, Q3 + 1.5 IQR] (inclusive) are left out of the mean and the standard
  deviation (pandas ``std``, ddof 1) -- and only out of them: an outlier is *kept* and
  normalised with those statistics like every other value; a missing value becomes the mean;
  then ``(x - mean) / std``;
* categorical: gender (F, M), race group (6, the authors' table
  :data:`~data_sharding.constants.RACE_TO_GROUP`), language (?, ENGLISH), marital status (4),
  one-hot; a missing value -- and a race the table does not list -- becomes the most
  frequent category of the population (ties: the first in sort order, as ``Series.mode()[0]``).
  A non-missing value outside the categories gives an all-zero group (language: any value
  other than ENGLISH counts as "?").

The statistics population is the cohort's training stays (``--norm-stats train``, default)
or the authors' "all stays" (``--norm-stats all``: every stay that passes the stay rules 1-4,
test stays included -- their leak).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_sharding.constants import (
    DEMOGRAPHIC_COLUMNS,
    GENDERS,
    IQR_FACTOR,
    LANGUAGES,
    MARITAL_STATUSES,
    RACE_GROUPS,
    RACE_TO_GROUP,
    slug,
)

CONTINUOUS = ("age", "height", "weight")
CATEGORICAL = {"gender": GENDERS, "race": RACE_GROUPS, "language": LANGUAGES, "marital": MARITAL_STATUSES}
#: A present value that belongs to no category: one-hot all zero, never imputed.
OUTSIDE = "<outside the categories>"


def race_group(race: object) -> str | None:
    """MIMIC-IV ``race`` -> one of the 6 groups with the authors' table; None when missing or not in it."""
    if not isinstance(race, str) or not race.strip():
        return None
    return RACE_TO_GROUP.get(race.strip().upper())


def language_group(language: object) -> str | None:
    """MIMIC-IV 2.0 records ENGLISH or '?'; None when missing; any other language counts as '?'."""
    if not isinstance(language, str) or not language.strip():
        return None
    return "ENGLISH" if language.strip().upper() == "ENGLISH" else "?"


def _category(value: object, categories: tuple[str, ...]) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip().upper()
    return v if v in categories else OUTSIDE


def raw_features(stays: pd.DataFrame, height: np.ndarray, weight: np.ndarray) -> pd.DataFrame:
    """Unnormalised features, one row per stay (same order as ``stays``): continuous values (NaN =
    missing) and one category name per categorical variable (None = missing)."""
    out = pd.DataFrame({"subject_id": stays["subject_id"].to_numpy(np.int64),
                        "stay_id": stays["stay_id"].to_numpy(np.int64)})
    year = stays["intime"].dt.year.to_numpy()
    anchor_year = pd.to_numeric(stays["anchor_year"], errors="coerce").to_numpy(np.float64)
    age = stays["anchor_age"].to_numpy(np.float64) + np.where(np.isnan(anchor_year), 0.0, year - anchor_year)
    out["age"] = age
    out["height"] = np.asarray(height, dtype=np.float64)
    out["weight"] = np.asarray(weight, dtype=np.float64)
    out["gender"] = [_category(g, GENDERS) for g in stays["gender"]]
    out["race"] = [race_group(r) for r in stays["race"]]
    out["language"] = [language_group(x) for x in stays["language"]]
    out["marital"] = [_category(m, MARITAL_STATUSES) for m in stays["marital_status"]]
    return out


def _mode(values: pd.Series, fallback: str) -> str:
    counts = values[values.notna() & (values != OUTSIDE)].value_counts()
    if counts.empty:
        return fallback
    top = counts[counts == counts.max()].index
    return str(sorted(top)[0])


def fit(population: pd.DataFrame, defaults: dict[str, float]) -> dict:
    """Statistics of the population's raw features (see the module docstring).

    ``defaults`` gives a mean for a continuous variable the population never has (std 1 then).
    """
    stats: dict = {"mean": {}, "std": {}, "q1": {}, "q3": {}, "outliers_excluded": {}, "mode": {},
                   "n_stays": len(population)}
    for c in CONTINUOUS:
        x = population[c]
        q1, q3 = float(x.quantile(0.25)), float(x.quantile(0.75))
        lo, hi = q1 - IQR_FACTOR * (q3 - q1), q3 + IQR_FACTOR * (q3 - q1)
        clear = x[(x >= lo) & (x <= hi)]
        mean, std = float(clear.mean()), float(clear.std())
        if not np.isfinite(mean):
            mean = float(defaults[c])
        if not (np.isfinite(std) and std > 1e-8):
            std = 1.0
        stats["mean"][c], stats["std"][c], stats["q1"][c], stats["q3"][c] = mean, std, q1, q3
        stats["outliers_excluded"][c] = int((x.notna() & ~((x >= lo) & (x <= hi))).sum())
    for c, cats in CATEGORICAL.items():
        stats["mode"][c] = _mode(population[c], cats[0])
    return stats


def apply(features: pd.DataFrame, stats: dict) -> tuple[pd.DataFrame, dict]:
    """Impute, normalise and one-hot encode; returns the 17 float32 columns and what was imputed."""
    out = features[["subject_id", "stay_id"]].copy()
    imputed: dict = {}
    for c in CONTINUOUS:
        x = features[c].to_numpy(np.float64)
        imputed[c] = int(np.isnan(x).sum())
        x = np.where(np.isnan(x), stats["mean"][c], x)
        out[c] = (x - stats["mean"][c]) / stats["std"][c]
    for c, cats in CATEGORICAL.items():
        v = features[c].where(features[c].notna(), stats["mode"][c])
        imputed[c] = int(features[c].isna().sum())
        for cat in cats:
            out[slug(f"{c}_{cat}")] = (v == cat).to_numpy(np.float64)
    out = out[["subject_id", "stay_id", *DEMOGRAPHIC_COLUMNS]]
    for c in DEMOGRAPHIC_COLUMNS:
        out[c] = out[c].astype(np.float32)
    return out, imputed
