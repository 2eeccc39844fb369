"""The 38-variable hourly EHR: parse, clean, resample, mask, impute, z-score (train statistics only).

Per event (chartevents / outputevents rows of the 38 itemids of
:data:`~data_sharding.constants.EHR_VARIABLES`, cohort stays only):

* GCS arrives as text ("4 Spontaneously", "No Response-ETT") and maps to its
  ordinal with :data:`~data_sharding.constants.GCS_TEXT_TO_VALUE` (valuenum is the fallback).
* Units: temperature in deg F -> deg C (unless ``valueuom`` says C); height in
  inches -> cm; weight in lb -> kg.
* Values are clamped to [low, high] of the variable (DATA_FORMATS.md).
* A NaN / unparseable value or charttime, or an event outside [intime, outtime],
  is skipped and counted by reason.

Per stay: hourly grid, hour ``h`` = [intime + h, intime + h + 1), hours
``0 .. floor(LOS hours)``; the last value in each hour is kept and its mask set
to 1; then forward fill, then the variable's normal value where nothing was
measured yet; then z-score ``(x - mean_train) / std_train`` with mean/std over
every hourly row of the *training* stays (the authors used all stays: a leak).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_sharding.constants import (
    EHR_MASK_COLUMNS,
    EHR_VALUE_COLUMNS,
    EHR_VARIABLES,
    GCS_TEXT_TO_VALUE,
    ITEMID_TO_VARIABLE,
    NUM_EHR_VARIABLES,
)

HOUR_NS = 3_600_000_000_000
LOW = np.array([v.low for v in EHR_VARIABLES], dtype=np.float64)
HIGH = np.array([v.high for v in EHR_VARIABLES], dtype=np.float64)
NORMAL = np.array([v.normal for v in EHR_VARIABLES], dtype=np.float64)
CHART_ITEMIDS = tuple(v.itemid for v in EHR_VARIABLES if v.source == "chartevents")
OUTPUT_ITEMIDS = tuple(v.itemid for v in EHR_VARIABLES if v.source == "outputevents")

_F_UNITS = {"°f", "f", "deg. f", "deg f", "degf", "fahrenheit", "?f"}
_C_UNITS = {"°c", "c", "deg. c", "deg c", "degc", "celsius", "?c"}
_INCH_UNITS = {"in", "inch", "inches", '"'}
_LB_UNITS = {"lb", "lbs", "pound", "pounds"}


def stay_hours(intime: pd.Series, outtime: pd.Series) -> np.ndarray:
    """Number of hourly rows of each stay: hours 0 .. floor((outtime - intime) / 1 h)."""
    return (np.floor((outtime - intime) / pd.Timedelta(hours=1)).astype(np.int64) + 1).to_numpy()


def parse_values(df: pd.DataFrame, source: str, counts: Counter) -> tuple[np.ndarray, np.ndarray]:
    """``(variable index, value)`` arrays for a block of events; value NaN = unparseable.

    ``df`` has itemid, value, valueuom (+ valuenum for chartevents).
    """
    var = df["itemid"].map(ITEMID_TO_VARIABLE).to_numpy(dtype=np.int64)
    text = df["value"].astype("string").str.strip()
    if source == "chartevents":
        value = pd.to_numeric(df["valuenum"], errors="coerce").to_numpy(dtype=np.float64)
        fallback = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        value = np.where(np.isnan(value), fallback, value)
    else:
        value = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    value[~np.isfinite(value)] = np.nan
    uom = df["valueuom"].astype("string").str.strip().str.lower().fillna("").to_numpy(dtype=object)
    itemid = df["itemid"].to_numpy()
    for i, v in enumerate(EHR_VARIABLES):
        sel = itemid == v.itemid
        if not sel.any():
            continue
        if v.kind == "gcs_text":
            mapping = GCS_TEXT_TO_VALUE[v.itemid]
            mapped = text[sel].map(mapping).astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
            value[sel] = np.where(np.isnan(mapped), value[sel], mapped)
        elif v.kind == "fahrenheit":
            is_c = np.isin(uom[sel], list(_C_UNITS))
            value[sel] = np.where(is_c, value[sel], (value[sel] - 32.0) * 5.0 / 9.0)
            counts["temperature converted F->C"] += int((~is_c & ~np.isnan(value[sel])).sum())
        elif v.name == "Fraction inspired oxygen":
            # MIMIC-IV charts FiO2 (223835) in percent (21..100); the paper's range is a
            # fraction (mimic3-benchmarks rule: a value above 1 is a percentage).
            pct = value[sel] > 1.0
            value[sel] = np.where(pct, value[sel] / 100.0, value[sel])
            counts["FiO2 converted %->fraction"] += int(pct.sum())
        elif v.name == "Height":
            inch = np.isin(uom[sel], list(_INCH_UNITS))
            value[sel] = np.where(inch, value[sel] * 2.54, value[sel])
            counts["height converted in->cm"] += int(inch.sum())
        elif v.name == "Weight":
            lb = np.isin(uom[sel], list(_LB_UNITS))
            value[sel] = np.where(lb, value[sel] * 0.45359237, value[sel])
            counts["weight converted lb->kg"] += int(lb.sum())
    return var, value


class HourlyAccumulator:
    """Keeps, per (stay, variable, hour), the last value seen -- block by block, bounded by stay-hours."""

    def __init__(self, stay_ids: np.ndarray, intime: pd.Series, outtime: pd.Series):
        self.stay_ids = np.asarray(stay_ids, dtype=np.int64)
        self.pos = pd.Series(np.arange(len(self.stay_ids)), index=self.stay_ids)
        self.intime_ns = intime.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        self.outtime_ns = outtime.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        self.n_hours = stay_hours(intime, outtime)
        self._parts: list[pd.DataFrame] = []
        self._rows = 0
        self.counts: Counter = Counter()   # skipped events by reason
        self.info: Counter = Counter()     # cleaning actions (conversions, clamps)
        self.n_events = 0

    def add(self, df: pd.DataFrame, source: str) -> None:
        """Parse, clean and reduce one block of events (columns stay_id, itemid, charttime, value, ...)."""
        if df.empty:
            return
        var, value = parse_values(df, source, self.info)
        t = pd.to_datetime(df["charttime"], format="ISO8601", errors="coerce")
        bad_t = t.isna().to_numpy()
        bad_v = np.isnan(value) & ~bad_t
        self.counts["event with unparseable charttime"] += int(bad_t.sum())
        self.counts["event with NaN/unparseable value"] += int(bad_v.sum())
        pos = self.pos.reindex(df["stay_id"].to_numpy()).to_numpy()
        ok = ~bad_t & ~bad_v
        t_ns = np.where(ok, t.to_numpy(dtype="datetime64[ns]").astype(np.int64), 0)
        p = np.where(ok, pos, 0).astype(np.int64)
        inside = ok & (t_ns >= self.intime_ns[p]) & (t_ns <= self.outtime_ns[p])
        self.counts["event outside the ICU stay"] += int((ok & ~inside).sum())
        clamped = np.clip(value, LOW[var], HIGH[var])
        self.info["value clamped to physiological range"] += int((inside & (clamped != value)).sum())
        hour = (t_ns - self.intime_ns[p]) // HOUR_NS
        sel = inside
        self.n_events += int(sel.sum())
        part = pd.DataFrame({"pos": p[sel], "var": var[sel], "hour": hour[sel].astype(np.int64),
                             "t": t_ns[sel], "value": clamped[sel]})
        self._parts.append(self._reduce(part))
        self._rows += len(self._parts[-1])
        if len(self._parts) > 64:
            self._parts = [self._reduce(pd.concat(self._parts, ignore_index=True))]

    @staticmethod
    def _reduce(part: pd.DataFrame) -> pd.DataFrame:
        """Last value (by charttime, then file order) of each (stay, variable, hour)."""
        part = part.sort_values(["pos", "var", "hour", "t"], kind="stable")
        return part.drop_duplicates(["pos", "var", "hour"], keep="last")

    def grids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values [rows, 38] float64 with NaN where unobserved, masks uint8, row offsets [n_stays + 1])``."""
        offsets = np.concatenate([[0], np.cumsum(self.n_hours)]).astype(np.int64)
        values = np.full((int(offsets[-1]), NUM_EHR_VARIABLES), np.nan, dtype=np.float64)
        masks = np.zeros(values.shape, dtype=np.uint8)
        if self._parts:
            ev = self._reduce(pd.concat(self._parts, ignore_index=True))
            rows = offsets[ev["pos"].to_numpy()] + ev["hour"].to_numpy()
            cols = ev["var"].to_numpy()
            values[rows, cols] = ev["value"].to_numpy()
            masks[rows, cols] = 1
        self._parts = []
        return values, masks, offsets


def first_observed(values: np.ndarray, masks: np.ndarray, offsets: np.ndarray, var: int) -> np.ndarray:
    """Per stay, the first measured value of variable ``var`` (NaN when never measured)."""
    out = np.full(len(offsets) - 1, np.nan)
    rows = np.flatnonzero(masks[:, var])
    if len(rows):
        stay = np.searchsorted(offsets, rows, side="right") - 1
        first = np.unique(stay, return_index=True)
        out[first[0]] = values[rows[first[1]], var]
    return out


def impute(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Forward fill inside each stay, then the variable's normal value (in place; returns values)."""
    n_stays = len(offsets) - 1
    stay = np.repeat(np.arange(n_stays), np.diff(offsets))
    df = pd.DataFrame(values)
    values[:] = df.groupby(stay, sort=False).ffill().to_numpy()
    nan = np.isnan(values)
    values[nan] = np.broadcast_to(NORMAL, values.shape)[nan]
    return values


def train_stats(values: np.ndarray, offsets: np.ndarray, is_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std per variable over every hourly row of the training stays (std 0 -> 1)."""
    rows = np.repeat(np.asarray(is_train, dtype=bool), np.diff(offsets))
    if not rows.any():
        raise ValueError("no training stay: cannot compute normalisation statistics")
    x = values[rows]
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[~(std > 1e-8)] = 1.0
    return mean, std


def write_parts(out_dir: Path, stay_ids: np.ndarray, values: np.ndarray, masks: np.ndarray, offsets: np.ndarray,
                rows_per_part: int = 250_000) -> list[Path]:
    """``ehr/part-NNNNN.parquet``: stay_id, hour, 38 float32 values, 38 uint8 masks; sorted; whole stays per part."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort(stay_ids, kind="stable")
    fields = [pa.field("stay_id", pa.int64()), pa.field("hour", pa.int32())]
    fields += [pa.field(c, pa.float32()) for c in EHR_VALUE_COLUMNS]
    fields += [pa.field(c, pa.uint8()) for c in EHR_MASK_COLUMNS]
    schema = pa.schema(fields)
    paths: list[Path] = []
    batch: list[int] = []
    n_rows = 0

    def flush() -> None:
        nonlocal batch, n_rows
        if not batch and paths:
            return
        idx = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in batch]) if batch else np.zeros(0, np.int64)
        sid = np.concatenate([np.full(offsets[s + 1] - offsets[s], stay_ids[s]) for s in batch]) if batch else idx
        hour = np.concatenate([np.arange(offsets[s + 1] - offsets[s]) for s in batch]) if batch else idx
        cols = [pa.array(sid, pa.int64()), pa.array(hour, pa.int32())]
        cols += [pa.array(values[idx, j].astype(np.float32)) for j in range(NUM_EHR_VARIABLES)]
        cols += [pa.array(masks[idx, j].astype(np.uint8)) for j in range(NUM_EHR_VARIABLES)]
        p = out_dir / f"part-{len(paths):05d}.parquet"
        pq.write_table(pa.Table.from_arrays(cols, schema=schema), p)
        paths.append(p)
        batch, n_rows = [], 0

    for s in order:
        batch.append(int(s))
        n_rows += int(offsets[s + 1] - offsets[s])
        if n_rows >= rows_per_part:
            flush()
    if batch or not paths:
        flush()
    return paths
