"""Tar members of one shard sample -> validated numpy arrays (ARCHITECTURE.md section 2).

The format (member names, dtypes, shapes, ranges, the .npy reader) is
:mod:`data_sharding.shard_format`; this module applies it to the loader's samples.

:func:`decode_sample` never trusts a shard: every member must be present,
load without pickle, and have the contract's dtype, shape and value range.
Anything else raises :class:`CorruptSample` naming the shard, the key and what
was expected; the pipeline catches it, skips the sample and counts it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_DISEASES, NUM_EHR_VARIABLES, NUM_REGIONS
from data_sharding.errors import DataError
from data_sharding.shard_format import ARRAYS, LABEL_RANGES, MAX_REGION_LABEL, load_json, load_npy


class CorruptSample(DataError):
    """A shard sample that cannot be used; carries the shard and key for the report."""

    def __init__(self, shard: str, key: str, reason: str):
        super().__init__(f"corrupt sample {key!r} in shard {shard}: {reason}")
        self.shard, self.key, self.reason = shard, key, reason


def _npy(raw: dict[str, Any], name: str, dtype: np.dtype, ndim: int, shard: str, key: str) -> np.ndarray:
    """Member ``name`` as an array of ``dtype`` with ``ndim`` dimensions, else :class:`CorruptSample`."""
    data = raw.get(name)
    if data is None:
        raise CorruptSample(shard, key, f"member {name} is missing")
    try:
        arr = load_npy(data)
    except Exception as exc:  # numpy raises ValueError/EOFError/UnpicklingError on damaged bytes
        raise CorruptSample(shard, key, f"member {name} is not a readable .npy ({type(exc).__name__}: {exc})") from None
    if arr.dtype != dtype:
        raise CorruptSample(shard, key, f"member {name} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if arr.ndim != ndim:
        raise CorruptSample(shard, key, f"member {name} has shape {arr.shape}, expected {ndim} dimensions")
    return arr


def _spec_npy(raw: dict[str, Any], name: str, shard: str, key: str) -> np.ndarray:
    """Member ``name`` with the dtype and number of dimensions :data:`ARRAYS` gives it."""
    spec = ARRAYS[name]
    return _npy(raw, name, spec.dtype, spec.ndim, shard, key)


def _json(raw: dict[str, Any], name: str, shard: str, key: str) -> dict:
    data = raw.get(name)
    if data is None:
        raise CorruptSample(shard, key, f"member {name} is missing")
    try:
        obj = load_json(data)
    except Exception as exc:
        raise CorruptSample(shard, key, f"member {name} is not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CorruptSample(shard, key, f"member {name} is not a JSON object")
    return obj


def _expect(cond: bool, shard: str, key: str, reason: str) -> None:
    if not cond:
        raise CorruptSample(shard, key, reason)


def _int_label(obj: dict, name: str, lo: int, hi: int, shard: str, key: str) -> int:
    value = obj.get(name)
    _expect(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
            shard, key, f"labels.json {name!r} = {value!r}, expected an integer in [{lo}, {hi}]")
    return int(value)


def decode_sample(raw: dict[str, Any], task_dir: str, crop_size: int | None = None) -> dict[str, Any]:
    """Decode and validate one sample's members (``raw`` maps member name -> bytes).

    ``raw`` also carries ``__key__`` and ``__shard__``.  ``task_dir`` is
    ``disease_progression`` or ``mortality_los`` (which labels to expect);
    ``crop_size`` (when known from the manifest) is checked against the crops.
    Returns a dict of numpy arrays (read-only views of ``raw``'s bytes), labels and ids
    (see :mod:`dipro.data.collate`).
    """
    key, shard = raw.get("__key__", "?"), raw.get("__shard__", "?")
    crops = _spec_npy(raw, "crops.npy", shard, key)
    t, r, c1, c2 = crops.shape
    _expect(t >= 2 and r == NUM_REGIONS and c1 == c2 and c1 > 0, shard, key,
            f"crops.npy has shape {crops.shape}, expected [T>=2, {NUM_REGIONS}, C, C]")
    if crop_size is not None:
        _expect(c1 == crop_size, shard, key, f"crops.npy has crop size {c1}, the manifest says {crop_size}")
    present = _spec_npy(raw, "region_present.npy", shard, key)
    _expect(present.shape == (t, NUM_REGIONS) and present.max(initial=0) <= 1, shard, key,
            f"region_present.npy has shape {present.shape} (expected {(t, NUM_REGIONS)}) or values outside 0/1")
    cxr_hours = _spec_npy(raw, "cxr_hours.npy", shard, key)
    _expect(cxr_hours.shape == (t,) and bool(np.isfinite(cxr_hours).all()), shard, key,
            f"cxr_hours.npy has shape {cxr_hours.shape} (expected {(t,)}) or non-finite values")
    values = _spec_npy(raw, "ehr_values.npy", shard, key)
    n_steps = values.shape[0]
    _expect(values.shape[1] == NUM_EHR_VARIABLES and bool(np.isfinite(values).all()), shard, key,
            f"ehr_values.npy has shape {values.shape} (expected [L, {NUM_EHR_VARIABLES}]) or non-finite values")
    masks = _spec_npy(raw, "ehr_masks.npy", shard, key)
    _expect(masks.shape == values.shape and masks.max(initial=0) <= 1, shard, key,
            f"ehr_masks.npy has shape {masks.shape} (expected {values.shape}) or values outside 0/1")
    ehr_hours = _spec_npy(raw, "ehr_hours.npy", shard, key)
    _expect(ehr_hours.shape == (n_steps,) and bool(np.isfinite(ehr_hours).all()), shard, key,
            f"ehr_hours.npy has shape {ehr_hours.shape} (expected {(n_steps,)}) or non-finite values")
    demo = _spec_npy(raw, "demographics.npy", shard, key)
    _expect(demo.shape == (NUM_DEMOGRAPHICS,) and bool(np.isfinite(demo).all()), shard, key,
            f"demographics.npy has shape {demo.shape} (expected {(NUM_DEMOGRAPHICS,)}) or non-finite values")
    region_labels = _spec_npy(raw, "region_labels.npy", shard, key)
    _expect(region_labels.shape == (t - 1, NUM_REGIONS, NUM_DISEASES), shard, key,
            f"region_labels.npy has shape {region_labels.shape}, expected {(t - 1, NUM_REGIONS, NUM_DISEASES)}")
    _expect(region_labels.size == 0 or (region_labels.min() >= 0 and region_labels.max() <= MAX_REGION_LABEL),
            shard, key, f"region_labels.npy has values outside [0, {MAX_REGION_LABEL}]")

    labels = _json(raw, "labels.json", shard, key)
    meta = _json(raw, "meta.json", shard, key)
    out: dict[str, Any] = {
        "crops": crops, "region_present": present, "cxr_hours": cxr_hours,
        "ehr_values": values, "ehr_masks": masks, "ehr_hours": ehr_hours,
        "demographics": demo, "region_labels": region_labels,
        "sample_key": key, "shard": shard,
    }
    if task_dir == "disease_progression":
        prog = labels.get("progression")
        _expect(isinstance(prog, list) and len(prog) == NUM_DISEASES
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_REGION_LABEL for v in prog),
                shard, key, f"labels.json 'progression' = {prog!r}, expected {NUM_DISEASES} integers in [0, {MAX_REGION_LABEL}]")
        out["progression"] = np.asarray(prog, dtype=np.int64)
    else:
        ranges = LABEL_RANGES["mortality_los"]
        out["mortality"] = _int_label(labels, "mortality", *ranges["mortality"], shard, key)
        out["los_bin"] = _int_label(labels, "los_bin", *ranges["los_bin"], shard, key)
        los_days = labels.get("los_days")
        _expect(isinstance(los_days, (int, float)) and not isinstance(los_days, bool) and np.isfinite(los_days)
                and los_days >= 0, shard, key, f"labels.json 'los_days' = {los_days!r}, expected a number >= 0")
        out["los_days"] = float(los_days)
    for name in ("stay_id", "subject_id"):
        value = meta.get(name)
        _expect(isinstance(value, int) and not isinstance(value, bool), shard, key,
                f"meta.json {name!r} = {value!r}, expected an integer")
        out[name] = int(value)
    return out


def select_cxrs(sample: dict[str, Any], max_cxrs: int, last_cxr_only: bool) -> dict[str, Any]:
    """Keep the last ``max_cxrs`` CXRs (the last 2 with ``last_cxr_only``) and their pairs' region labels.

    The most recent images are kept: they are closest to the prediction time.
    """
    keep = 2 if last_cxr_only else max_cxrs
    t = sample["crops"].shape[0]
    if t <= keep:
        return sample
    out = dict(sample)
    for name in ("crops", "region_present", "cxr_hours"):
        out[name] = sample[name][t - keep:]
    out["region_labels"] = sample["region_labels"][t - keep:]  # [T-1] pairs -> the last keep-1
    return out
