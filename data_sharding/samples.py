"""One shard sample per task row, built from the processed directory.

:class:`ProcessedView` reads the processed layout of docs/ARCHITECTURE.md
section 1 (task tables, ``cxr.parquet``, demographics, the ``ehr/`` parts);
:class:`SampleBuilder` turns task rows into :class:`Sample` objects holding the
members of section 2, which :class:`data_sharding.shard_format.TarStream` serialises
(:mod:`data_sharding.shard_format`: ``.npy`` with ``allow_pickle=False`` and
UTF-8 JSON; no pickle).  EHR rows are read once per shard for the shard's
stays (row-group filtered), never the whole table per sample.
"""
from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data_sharding.constants import (
    BOX_COLUMNS,
    DEMOGRAPHIC_COLUMNS,
    DISEASE_SLUGS,
    EHR_MASK_COLUMNS,
    EHR_VALUE_COLUMNS,
    ICU_WINDOW_HOURS,
    NUM_DISEASES,
    NUM_EHR_VARIABLES,
    NUM_REGIONS,
    SPLITS,
    TASK_TO_SHARD_DIR,
)
from data_sharding.errors import DataError
from data_sharding.shard_format import (
    ARRAYS,
    LABEL_RANGES,
    MAX_REGION_LABEL,
    json_bytes,
    npy_size,
    sample_key,
    tar_member_size,
)

TASK_DIRS = ("disease_progression", "mortality_los")
"""Shard series, one per task table (mortality and length of stay share one)."""

_TASK_COLUMNS = {
    "disease_progression": ("subject_id", "stay_id", "split", "cxr1_dicom_id", "cxr2_dicom_id", "cxr1_hours",
                            "cxr2_hours", *DISEASE_SLUGS, "region_labels"),
    "mortality_los": ("subject_id", "stay_id", "split", "dicom_ids", "cxr_hours", "mortality", "los_days",
                      "los_bin", "region_labels"),
}
_CXR_COLUMNS = ("subject_id", "stay_id", "study_id", "dicom_id", "hours", "image_path", "width", "height",
                *BOX_COLUMNS)
_EHR_COLUMNS = ("stay_id", "hour", *EHR_VALUE_COLUMNS, *EHR_MASK_COLUMNS)


def resolve_task_dirs(task: str) -> tuple[str, ...]:
    """``all`` | a shard series name | a model task name -> shard series names."""
    if task == "all":
        return TASK_DIRS
    if task in TASK_DIRS:
        return (task,)
    if task in TASK_TO_SHARD_DIR:
        return (TASK_TO_SHARD_DIR[task],)
    raise DataError(f"unknown task {task!r}: expected all, {', '.join(TASK_DIRS)} or {', '.join(TASK_TO_SHARD_DIR)}")


# ----------------------------------------------------------------------------- processed inputs

@dataclass
class StayEHR:
    """One stay's hourly rows: ``hours`` int32 [N], ``values`` float32 [N,38], ``masks`` uint8 [N,38]."""

    hours: np.ndarray
    values: np.ndarray
    masks: np.ndarray

    def window(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows with lo <= hour <= hi: (values, masks, hours as float32)."""
        a, b = np.searchsorted(self.hours, lo, "left"), np.searchsorted(self.hours, hi, "right")
        return self.values[a:b], self.masks[a:b], self.hours[a:b].astype(np.float32)

    def digest(self) -> str:
        h = hashlib.sha256()
        for arr in (self.hours, self.values, self.masks):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


EMPTY_EHR = StayEHR(np.zeros(0, np.int32), np.zeros((0, NUM_EHR_VARIABLES), np.float32),
                    np.zeros((0, NUM_EHR_VARIABLES), np.uint8))


def _require(path):
    if not path.exists():
        raise DataError(f"processed input missing: {path} (run `dipro prepare` first)")
    return path


def _read_table(path, **kw):
    """A Parquet table of the processed dir (local or bucket: pyarrow reads through the storage layer's filesystem)."""
    import pyarrow.parquet as pq

    from data_sharding import storage

    with storage.errors_named(path.uri):
        return pq.read_table(path.fs_path, filesystem=path.fs, **kw)


def _check_columns(path, names: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (see docs/ARCHITECTURE.md section 1)")


class ProcessedView:
    """Read access to a processed directory; tables load lazily and are cached per instance."""

    def __init__(self, root) -> None:
        from data_sharding import publish, storage

        self.root = publish.published_root(storage.resolve(root))
        if not self.root.is_dir():
            raise DataError(f"processed directory not found: {self.root}")
        _require(self.root / "cxr.parquet")
        _require(self.root / "demographics.parquet")
        ehr = self.root / "ehr"
        self.ehr_parts = [ehr / o.path for o in ehr.list()
                          if "/" not in o.path and o.path.startswith("part-") and o.path.endswith(".parquet")]
        if not self.ehr_parts:
            raise DataError(f"{self.root / 'ehr'}: no part-*.parquet files")
        self._tasks: dict[str, list[dict[str, Any]]] = {}

    def task_path(self, task_dir: str):
        return self.root / "tasks" / f"{task_dir}.parquet"

    def has_task(self, task_dir: str) -> bool:
        return self.task_path(task_dir).exists()

    def task_rows(self, task_dir: str) -> list[dict[str, Any]]:
        """Rows of ``tasks/{task_dir}.parquet`` as dicts, in file order (index = row number)."""
        if task_dir not in self._tasks:
            path = _require(self.task_path(task_dir))
            table = _read_table(path)
            _check_columns(path, table.column_names, _TASK_COLUMNS[task_dir])
            rows = table.to_pylist()
            for i, row in enumerate(rows):
                if row["split"] not in SPLITS:
                    raise DataError(f"{path} row {i}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
                numbers = list(row_cxrs(task_dir, row)[1]) + ([row["los_days"]] if task_dir == "mortality_los" else [])
                if not all(v is not None and math.isfinite(v) for v in numbers):
                    raise DataError(f"{path} row {i}: CXR hours / los_days must be finite numbers, got {numbers}")
            self._tasks[task_dir] = rows
        return self._tasks[task_dir]

    @functools.cached_property
    def cxr_rows(self) -> dict[tuple[int, str], dict[str, Any]]:
        """(stay_id, dicom_id) -> row of ``cxr.parquet``."""
        path = self.root / "cxr.parquet"
        table = _read_table(path)
        _check_columns(path, table.column_names, _CXR_COLUMNS)
        return {(int(r["stay_id"]), str(r["dicom_id"])): r for r in table.to_pylist()}

    @functools.cached_property
    def demographic_rows(self) -> dict[int, dict[str, Any]]:
        """stay_id -> row of ``demographics.parquet``."""
        path = self.root / "demographics.parquet"
        table = _read_table(path)
        _check_columns(path, table.column_names, ("subject_id", "stay_id", *DEMOGRAPHIC_COLUMNS))
        return {int(r["stay_id"]): r for r in table.to_pylist()}

    @functools.cached_property
    def ehr_index(self) -> dict[int, list]:
        """stay_id -> the ``ehr/`` parts holding its rows (reads only the stay_id column)."""
        import pyarrow.parquet as pq

        index: dict[int, list] = {}
        for part in self.ehr_parts:
            names = pq.read_schema(part.fs_path, filesystem=part.fs).names
            _check_columns(part, names, _EHR_COLUMNS)
            stays = np.unique(_read_table(part, columns=["stay_id"]).column(0).to_numpy())
            for s in stays.tolist():
                index.setdefault(int(s), []).append(part)
        return index

    def cxr_row(self, stay_id: int, dicom_id: str, where: str) -> dict[str, Any]:
        row = self.cxr_rows.get((int(stay_id), str(dicom_id)))
        if row is None:
            raise DataError(f"{where}: CXR {dicom_id} of stay {stay_id} is not in {self.root / 'cxr.parquet'}")
        return row

    def demographics(self, stay_id: int, where: str) -> dict[str, Any]:
        row = self.demographic_rows.get(int(stay_id))
        if row is None:
            raise DataError(f"{where}: stay {stay_id} has no row in {self.root / 'demographics.parquet'}")
        return row

    def read_ehr(self, stay_ids: list[int]) -> dict[int, StayEHR]:
        """EHR rows of these stays, one filtered read per part; stays without rows get ``EMPTY_EHR``."""
        import pyarrow as pa

        wanted = sorted({int(s) for s in stay_ids})
        by_part: dict[Any, list[int]] = {}
        for s in wanted:
            for part in self.ehr_index.get(s, []):
                by_part.setdefault(part, []).append(s)
        pieces: dict[int, list[pa.Table]] = {}
        for part, stays in sorted(by_part.items(), key=lambda item: item[0].uri):
            table = _read_table(part, columns=list(_EHR_COLUMNS), filters=[("stay_id", "in", stays)])
            table = table.sort_by([("stay_id", "ascending"), ("hour", "ascending")])
            ids = table.column("stay_id").to_numpy()
            for s in stays:
                a, b = np.searchsorted(ids, s, "left"), np.searchsorted(ids, s, "right")
                pieces.setdefault(s, []).append(table.slice(a, b - a))
        out: dict[int, StayEHR] = {}
        for s in wanted:
            if s not in pieces:
                out[s] = EMPTY_EHR
                continue
            t = pa.concat_tables(pieces[s])
            hours = t.column("hour").to_numpy().astype(np.int32)
            if hours.size > 1 and not np.all(np.diff(hours) > 0):
                raise DataError(f"{self.root / 'ehr'}: stay {s} has repeated or unsorted hours "
                                "(expected one row per hour, sorted)")
            values = np.stack([t.column(c).to_numpy().astype(np.float32) for c in EHR_VALUE_COLUMNS], axis=1)
            masks = np.stack([t.column(c).to_numpy().astype(np.uint8) for c in EHR_MASK_COLUMNS], axis=1)
            out[s] = StayEHR(hours, values, masks)
        return out


def open_processed(root) -> ProcessedView:
    """A view of ``root``, reused within a process while the processed files are unchanged."""
    from data_sharding import publish, storage

    root = publish.published_root(storage.resolve(root))
    return _cached_view(root, _stamp(root))


def _stamp(root) -> tuple:
    if root.is_remote:  # a published generation is never rewritten: its name is its version
        return ()
    root = root.local
    files = [root / "cxr.parquet", root / "demographics.parquet",
             *sorted((root / "tasks").glob("*.parquet")), *sorted((root / "ehr").glob("*.parquet"))]
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())


@functools.lru_cache(maxsize=4)
def _cached_view(root, stamp: tuple) -> ProcessedView:
    return ProcessedView(root)


# ----------------------------------------------------------------------------- rows -> members

def row_cxrs(task_dir: str, row: dict[str, Any]) -> tuple[list[str], list[float]]:
    """(dicom_ids, cxr_hours) of a task row, in time order."""
    if task_dir == "disease_progression":
        return [row["cxr1_dicom_id"], row["cxr2_dicom_id"]], [row["cxr1_hours"], row["cxr2_hours"]]
    return list(row["dicom_ids"]), list(row["cxr_hours"])


def ehr_window(task_dir: str, row: dict[str, Any]) -> tuple[int, int]:
    """Inclusive hour range of the sample's EHR window (docs/ARCHITECTURE.md section 1).

    Progression: the hours h with h - 1 <= t2 and h + 1 >= t1, i.e. [t1 - 1, t2 + 1] as the
    authors select rows (github.com/Chenliu-svg/DiPro ``dataset_module/dipro_dataset.py:
    DiproDataset.__getitem__``); mortality / LOS: hours 0..48.
    """
    if task_dir == "disease_progression":
        return math.ceil(row["cxr1_hours"] - 1), math.floor(row["cxr2_hours"] + 1)
    return 0, ICU_WINDOW_HOURS


def row_labels(task_dir: str, row: dict[str, Any]) -> dict[str, Any]:
    if task_dir == "disease_progression":
        return {"progression": [int(row[d]) for d in DISEASE_SLUGS]}
    return {"mortality": int(row["mortality"]), "los_days": float(row["los_days"]), "los_bin": int(row["los_bin"])}


def row_meta(task_dir: str, row: dict[str, Any], index: int) -> dict[str, Any]:
    dicom_ids, _ = row_cxrs(task_dir, row)
    meta = {"subject_id": int(row["subject_id"]), "stay_id": int(row["stay_id"]),
            "dicom_ids": [str(d) for d in dicom_ids], "split": str(row["split"]), "task_dir": task_dir,
            "row": int(index)}
    if task_dir == "disease_progression" and row.get("label_source") is not None:
        meta["label_source"] = str(row["label_source"])
    return meta


def estimate_sample_bytes(task_dir: str, row: dict[str, Any], index: int, crop_size: int) -> int:
    """Upper bound of the sample's bytes in a tar (exact except the EHR length, bounded by its window)."""
    t = len(row_cxrs(task_dir, row)[0])
    lo, hi = ehr_window(task_dir, row)
    length = max(0, hi - max(lo, 0) + 1)
    payloads = [npy_size(tuple(max(d, 0) for d in spec.shape(t, length, crop_size)), spec.dtype)
                for spec in ARRAYS.values()]
    payloads += [len(json_bytes(row_labels(task_dir, row))), len(json_bytes(row_meta(task_dir, row, index)))]
    # npy headers may grow by one 64-byte step when L has more digits than the bound; allow for it.
    return sum(tar_member_size(p + 64) for p in payloads)


@dataclass
class Sample:
    """One sample: ``arrays`` keyed by member name (``crops.npy`` ...) plus labels and meta."""

    key: str
    arrays: dict[str, np.ndarray]
    labels: dict[str, Any]
    meta: dict[str, Any]


@dataclass
class SampleBuilder:
    """Assembles the samples of one shard (or one part of a shard) from crops made elsewhere.

    ``crops(stay_id, dicom_id, where)`` returns the film's :class:`data_sharding.crops.CropResult`
    (the shard builder decodes each film once per build and hands the same crops to every sample
    and series that uses it: :mod:`data_sharding.build_units`).  ``counts`` holds this builder's
    samples' anomalies, *per sample*: a film's missing box is counted once for every sample that
    uses the film (the builder counts each film once as well, separately), plus
    ``samples_without_ehr``.  ``ehr`` (stay_id -> StayEHR) is read by :meth:`prefetch`, so the
    EHR parts are read once per shard.
    """

    view: ProcessedView
    task_dir: str
    crop_size: int
    crops: Callable[[int, str, str], Any]
    counts: Counter = field(default_factory=Counter)
    ehr: dict[int, StayEHR] = field(default_factory=dict)

    def prefetch(self, rows: list[int]) -> None:
        """Read the EHR of every stay these rows need in one pass over the parts."""
        table = self.view.task_rows(self.task_dir)
        self.ehr = self.view.read_ehr([table[i]["stay_id"] for i in rows])

    def build(self, index: int) -> Sample:
        row = self.view.task_rows(self.task_dir)[index]
        where = f"{self.view.task_path(self.task_dir)} row {index}"
        stay_id = int(row["stay_id"])
        dicom_ids, cxr_hours = row_cxrs(self.task_dir, row)
        t = len(dicom_ids)
        if t < 2 or len(cxr_hours) != t:
            raise DataError(f"{where}: expected >= 2 CXRs with one hour each, got {t} ids and {len(cxr_hours)} hours")
        crops = np.zeros((t, NUM_REGIONS, self.crop_size, self.crop_size), dtype=np.uint8)
        present = np.zeros((t, NUM_REGIONS), dtype=np.uint8)
        for j, dicom in enumerate(dicom_ids):
            result = self.crops(stay_id, str(dicom), where)
            crops[j], present[j] = result.crops, result.present
            self.counts.update(result.counts)

        try:
            region_labels = np.asarray(row["region_labels"], dtype=np.int64)
        except (TypeError, ValueError):
            raise DataError(f"{where}: region_labels is not a regular nested list of ints") from None
        if self.task_dir == "disease_progression":
            region_labels = region_labels[None]
        if region_labels.shape != (t - 1, NUM_REGIONS, NUM_DISEASES):
            raise DataError(f"{where}: region_labels has shape {region_labels.shape}, "
                            f"expected {(t - 1, NUM_REGIONS, NUM_DISEASES)}")
        labels = row_labels(self.task_dir, row)
        _check_range(where, "region_labels", region_labels, 0, MAX_REGION_LABEL)
        for name, (lo, hi) in LABEL_RANGES[self.task_dir].items():
            _check_range(where, name, np.asarray(labels[name]), lo, hi)

        if stay_id not in self.ehr:
            self.ehr.update(self.view.read_ehr([stay_id]))
        ehr = self.ehr[stay_id]
        if ehr is EMPTY_EHR:
            self.counts["samples_without_ehr"] += 1
        values, masks, hours = ehr.window(*ehr_window(self.task_dir, row))

        demo_row = self.view.demographics(stay_id, where)
        demographics = np.array([demo_row[c] for c in DEMOGRAPHIC_COLUMNS], dtype=np.float32)
        arrays = {
            "crops.npy": crops,
            "region_present.npy": present,
            "cxr_hours.npy": np.asarray(cxr_hours, dtype=np.float32),
            "ehr_values.npy": values,
            "ehr_masks.npy": masks,
            "ehr_hours.npy": hours,
            "demographics.npy": demographics,
            "region_labels.npy": region_labels,
        }
        arrays = {m: np.asarray(a, dtype=ARRAYS[m].dtype) for m, a in arrays.items()}  # the format's dtypes
        return Sample(sample_key(stay_id, index), arrays, labels, row_meta(self.task_dir, row, index))


def _check_range(where: str, name: str, values: np.ndarray, lo: int, hi: int) -> None:
    if values.size and (values.min() < lo or values.max() > hi):
        raise DataError(f"{where}: {name} has values outside {lo}..{hi}")
