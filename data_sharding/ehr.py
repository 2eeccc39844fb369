"""The 38-variable hourly EHR: parse, clean, resample, mask, impute, z-score.

Per event (chartevents / outputevents rows of the 38 itemids of
:data:`~data_sharding.constants.EHR_VARIABLES`):

* GCS arrives as text ("4 Spontaneously", "No Response-ETT") and maps to its
  ordinal with :data:`~data_sharding.constants.GCS_TEXT_TO_VALUE` (valuenum is the fallback).
* Units: temperature in deg F -> deg C (unless ``valueuom`` says C); height in
  inches -> cm; weight in lb -> kg.
* Values are clamped to [low, high] of the variable (:data:`~data_sharding.constants.EHR_VARIABLES`).
* A NaN / unparseable value or charttime, or an event outside [intime, outtime],
  is skipped and counted by reason.

Per cohort stay (:class:`HourlyAccumulator`): hourly grid, hour ``h`` = [intime + h,
intime + h + 1), hours ``0 .. floor(LOS hours)``; the last value in each hour is kept and
its mask set to 1; then forward fill, then the variable's normal value where nothing was
measured yet; then z-score ``(x - mean) / std``.

Normalisation statistics, ``--norm-stats``:

* ``train`` (default, this project): mean / std per variable over every hourly row of
  the *training* stays' imputed grid (:func:`grid_stats`) -- the statistics of exactly
  what the model is fed, so every input column is centred and scaled, with no test data
  in them;
* ``all`` (the authors, github.com/Chenliu-svg/DiPro ``ehr_preprocess.py: get_mean_std``):
  mean and population std of every clamped *measurement* (:class:`EventStats`) of every
  stay of the authors' "all stays", test stays included.  Measurement statistics leave
  the imputed hours far from 0 where the normal value is far from the measured ones
  (e.g. prothrombin time, whose itemid charts INR ~1.2 while the normal value is 14.5 s).

:class:`EventStats` also records each stay's first height and weight (converted, not
clamped) for the demographics, as mimic3-benchmarks' episode files do.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
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


@dataclass
class Events:
    """One block of events, parsed: stay id, variable index, charttime (ns), value (converted, unclamped)."""

    stay_id: np.ndarray
    var: np.ndarray
    t_ns: np.ndarray
    """int64 nanoseconds; 0 where ``bad_t``."""
    value: np.ndarray
    """float64, NaN = unparseable."""
    bad_t: np.ndarray


def parse_block(df: pd.DataFrame, source: str, info: Counter) -> Events:
    """Parse one block of events (columns stay_id, itemid, charttime, value, ...); conversions counted in ``info``."""
    if df.empty:
        z = np.zeros(0, dtype=np.int64)
        return Events(z, z, z, np.zeros(0), np.zeros(0, dtype=bool))
    var, value = parse_values(df, source, info)
    t = pd.to_datetime(df["charttime"], format="ISO8601", errors="coerce")
    bad_t = t.isna().to_numpy()
    t_ns = np.where(bad_t, 0, t.to_numpy(dtype="datetime64[ns]").astype(np.int64))
    return Events(df["stay_id"].to_numpy(dtype=np.int64), var, t_ns, value, bad_t)


def merge_in_order(a: Events, a_rows: np.ndarray, b: Events, b_rows: np.ndarray) -> Events:
    """Events ``a`` and ``b`` (from the block rows ``a_rows`` / ``b_rows``) as one, in block row order."""
    order = np.argsort(np.concatenate([a_rows, b_rows]), kind="stable")
    return Events(*(np.concatenate([getattr(a, f), getattr(b, f)])[order]
                    for f in ("stay_id", "var", "t_ns", "value", "bad_t")))


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
        self.add_events(parse_block(df, source, self.info))

    def add_events(self, ev: Events) -> None:
        """Reduce parsed events; rows of stays this accumulator does not hold are ignored."""
        pos = self.pos.reindex(ev.stay_id).to_numpy()
        mine = ~np.isnan(pos)
        if not mine.any():
            return
        pos = pos[mine].astype(np.int64)
        var, value, t_ns, bad_t = ev.var[mine], ev.value[mine], ev.t_ns[mine], ev.bad_t[mine]
        bad_v = np.isnan(value) & ~bad_t
        self.counts["event with unparseable charttime"] += int(bad_t.sum())
        self.counts["event with NaN/unparseable value"] += int(bad_v.sum())
        ok = ~bad_t & ~bad_v
        inside = ok & (t_ns >= self.intime_ns[pos]) & (t_ns <= self.outtime_ns[pos])
        self.counts["event outside the ICU stay"] += int((ok & ~inside).sum())
        clamped = np.clip(value, LOW[var], HIGH[var])
        self.info["value clamped to physiological range"] += int((inside & (clamped != value)).sum())
        hour = (t_ns - self.intime_ns[pos]) // HOUR_NS
        sel = inside
        self.n_events += int(sel.sum())
        part = pd.DataFrame({"pos": pos[sel], "var": var[sel], "hour": hour[sel].astype(np.int64),
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


class EventStats:
    """Normalisation statistics over the events of a population of stays, and first height/weight per stay.

    ``stay_ids`` are every stay of interest (cohort and population); ``in_population`` marks
    those whose events enter the statistics.  Events must arrive in file order.  Per variable
    the clamped values of in-stay events are folded in chunks of :data:`CHUNK` values, in
    arrival order (count, mean, sum of squared deviations, merged with Chan et al.'s pairwise
    update): the same numbers as the authors' running sums, with less rounding, and -- the
    chunks being cut by count, not by read block -- bit-identical for any ``--block-mb``.
    """

    CHUNK = 1 << 16

    def __init__(self, stay_ids: np.ndarray, intime: pd.Series, outtime: pd.Series, in_population: np.ndarray,
                 first_vars: tuple[int, ...] = ()):
        self.stay_ids = np.asarray(stay_ids, dtype=np.int64)
        self.pos = pd.Series(np.arange(len(self.stay_ids)), index=self.stay_ids)
        self.intime_ns = intime.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        self.outtime_ns = outtime.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        self.in_population = np.asarray(in_population, dtype=bool)
        self.n = np.zeros(NUM_EHR_VARIABLES)
        self.mean = np.zeros(NUM_EHR_VARIABLES)
        self.m2 = np.zeros(NUM_EHR_VARIABLES)
        self._pending: list[list[np.ndarray]] = [[] for _ in range(NUM_EHR_VARIABLES)]
        self._pending_n = np.zeros(NUM_EHR_VARIABLES, dtype=np.int64)
        self.first_vars = tuple(first_vars)
        self._first_t = np.full((len(self.stay_ids), len(self.first_vars)), np.iinfo(np.int64).max, dtype=np.int64)
        self._first_v = np.full((len(self.stay_ids), len(self.first_vars)), np.nan)

    def add(self, ev: Events) -> None:
        pos = self.pos.reindex(ev.stay_id).to_numpy()
        ok = ~np.isnan(pos) & ~ev.bad_t & ~np.isnan(ev.value)
        if not ok.any():
            return
        p = pos[ok].astype(np.int64)
        var, value, t = ev.var[ok], ev.value[ok], ev.t_ns[ok]
        inside = (t >= self.intime_ns[p]) & (t <= self.outtime_ns[p])
        p, var, value, t = p[inside], var[inside], value[inside], t[inside]
        pop = self.in_population[p]
        self._queue(var[pop], np.clip(value[pop], LOW[var[pop]], HIGH[var[pop]]))
        for k, v in enumerate(self.first_vars):
            sel = var == v
            if sel.any():
                self._first(k, p[sel], t[sel], value[sel])

    def _queue(self, var: np.ndarray, x: np.ndarray) -> None:
        order = np.argsort(var, kind="stable")  # per variable, arrival order is kept
        var, x = var[order], x[order]
        bounds = np.searchsorted(var, np.arange(NUM_EHR_VARIABLES + 1))
        for v in np.unique(var):
            self._pending[v].append(x[bounds[v]:bounds[v + 1]])
            self._pending_n[v] += bounds[v + 1] - bounds[v]
            if self._pending_n[v] >= self.CHUNK:
                buf = np.concatenate(self._pending[v])
                cut = len(buf) - len(buf) % self.CHUNK
                for a in range(0, cut, self.CHUNK):
                    self._fold(int(v), buf[a:a + self.CHUNK])
                self._pending[v] = [buf[cut:]] if cut < len(buf) else []
                self._pending_n[v] = len(buf) - cut

    def _fold(self, v: int, x: np.ndarray, state: tuple | None = None) -> tuple:
        n_a, mean_a, m2_a = state if state is not None else (self.n[v], self.mean[v], self.m2[v])
        n_b, mean_b = float(len(x)), float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = n_a + n_b
        delta = mean_b - mean_a
        out = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n)
        if state is None:
            self.n[v], self.mean[v], self.m2[v] = out
        return out

    def _first(self, k: int, p: np.ndarray, t: np.ndarray, value: np.ndarray) -> None:
        df = pd.DataFrame({"p": p, "t": t, "v": value, "row": np.arange(len(p))})
        df = df[df["t"] == df.groupby("p")["t"].transform("min")]
        df = df.sort_values(["p", "row"]).drop_duplicates("p", keep="last")  # same time: the later row
        pp, tt = df["p"].to_numpy(), df["t"].to_numpy()
        better = tt <= self._first_t[pp, k]  # a later block is later in the file: it wins ties
        self._first_t[pp[better], k] = tt[better]
        self._first_v[pp[better], k] = df["v"].to_numpy()[better]

    def counts(self) -> np.ndarray:
        """Events per variable that entered the statistics."""
        return self.n + self._pending_n

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-variable mean and population std; a variable never measured gets its normal value and std 1."""
        n, mean, m2 = self.n.copy(), self.mean.copy(), self.m2.copy()
        for v in range(NUM_EHR_VARIABLES):
            if self._pending_n[v]:
                n[v], mean[v], m2[v] = self._fold(v, np.concatenate(self._pending[v]), (n[v], mean[v], m2[v]))
        std = np.sqrt(np.where(n > 0, m2 / np.maximum(n, 1), 1.0))
        mean = np.where(n > 0, mean, NORMAL)
        std[~(std > 1e-8)] = 1.0
        return mean, std

    def first_values(self, var: int) -> np.ndarray:
        """Per stay (order of ``stay_ids``), the first measured value of ``var`` (NaN when never)."""
        return self._first_v[:, self.first_vars.index(var)].copy()


def impute(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Forward fill inside each stay, then the variable's normal value (in place; returns values)."""
    n_stays = len(offsets) - 1
    stay = np.repeat(np.arange(n_stays), np.diff(offsets))
    df = pd.DataFrame(values)
    values[:] = df.groupby(stay, sort=False).ffill().to_numpy()
    nan = np.isnan(values)
    values[nan] = np.broadcast_to(NORMAL, values.shape)[nan]
    return values


def grid_stats(values: np.ndarray, offsets: np.ndarray, is_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std per variable over every hourly row (imputed grid) of the training stays (std 0 -> 1)."""
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
