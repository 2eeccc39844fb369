"""A tiny processed directory, faithful to docs/ARCHITECTURE.md section 1.

``make_processed(root)`` writes what ``dipro prepare --out root`` would: real
grayscale JPEGs (drawn with numpy, saved with PIL), ``cxr.parquet`` with
full-image boxes (some null, one invalid), ``cohort.parquet``, both task
tables, ``ehr/part-*.parquet`` (stays spread over two parts), demographics and
the JSON statistics.  Every column has the contract's Arrow type, so shard
writer and loader tests run against the same layout as real data.  The
content is a pure function of the arguments (same seed -> same bytes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_sharding.constants import (
    BOX_COLUMNS,
    DEMOGRAPHIC_COLUMNS,
    DISEASE_SLUGS,
    EHR_MASK_COLUMNS,
    EHR_VALUE_COLUMNS,
    ICU_WINDOW_HOURS,
    LOS_BIN_EDGES,
    NUM_DISEASES,
    NUM_REGIONS,
    REGION_SLUGS,
)

SPLIT_CYCLE = ("train", "train", "val", "test")


@dataclass
class ProcessedFixture:
    """What :func:`make_processed` wrote (for assertions in tests)."""

    root: Path
    stay_ids: list[int]
    subject_of: dict[int, int]
    split_of: dict[int, str]
    dicoms_of: dict[int, list[str]]
    """stay_id -> its CXR dicom_ids in time order."""
    hours_of: dict[int, list[float]]
    """stay_id -> hours since intime of its CXRs."""
    null_boxes: list[tuple[str, str]] = field(default_factory=list)
    """(dicom_id, region_slug) whose box column is null."""
    invalid_boxes: list[tuple[str, str]] = field(default_factory=list)
    """(dicom_id, region_slug) whose box is present but degenerate (x2 < x1)."""

    @property
    def images(self) -> Path:
        return self.root / "images"


def _los_bin(days: float) -> int:
    for i in range(len(LOS_BIN_EDGES) - 1):
        if LOS_BIN_EDGES[i] <= days < LOS_BIN_EDGES[i + 1]:
            return i
    return 0 if days < LOS_BIN_EDGES[0] else len(LOS_BIN_EDGES) - 2


def _draw_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A gradient with blobs and noise: non-trivial content in every region."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = 40 + 120 * (xx / width) + 60 * (yy / height)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, width / 3)
        img += 50 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _boxes(width: int, height: int) -> list[list[float]]:
    """Ten boxes on a 5 x 2 grid, in full-image pixels (floats, like ImaGenome)."""
    out = []
    for r in range(NUM_REGIONS):
        col, row = r % 5, r // 5
        x1 = col * width / 5 + 0.5
        y1 = row * height / 2 + 1.25
        out.append([x1, y1, x1 + width / 5 - 1.0, y1 + height / 2 - 2.5])
    return out


def make_processed(
    root: str | Path,
    *,
    n_stays: int = 4,
    image_size: tuple[int, int] = (96, 80),
    seed: int = 0,
) -> ProcessedFixture:
    """Write a processed dir with ``n_stays`` ICU stays (one subject each) under ``root``.

    Stay ``i`` has ``2 + i % 3`` CXRs (the first two inside the first 48 h) and
    ``60 + 7 * i`` hourly EHR rows; splits cycle train, train, val, test.  The
    first CXR of the first stay has a null ``mediastinum`` box and an invalid
    ``cardiac_silhouette`` box.  ``image_size`` is (width, height); sizes vary
    by a few pixels per image.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "tasks").mkdir(exist_ok=True)
    (root / "ehr").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    base_time = datetime(2150, 1, 1, 8, 0, 0)

    fx = ProcessedFixture(root=root.resolve(), stay_ids=[], subject_of={}, split_of={}, dicoms_of={}, hours_of={})
    cohort: dict[str, list] = {k: [] for k in ("subject_id", "hadm_id", "stay_id", "intime", "outtime",
                                                "los_days", "mortality", "los_bin", "split")}
    cxr: dict[str, list] = {k: [] for k in ("subject_id", "stay_id", "study_id", "dicom_id", "hours",
                                             "image_path", "width", "height", *BOX_COLUMNS)}
    prog: dict[str, list] = {k: [] for k in ("subject_id", "stay_id", "split", "cxr1_dicom_id", "cxr2_dicom_id",
                                              "cxr1_hours", "cxr2_hours", *DISEASE_SLUGS,
                                              "region_labels", "label_source")}
    mort: dict[str, list] = {k: [] for k in ("subject_id", "stay_id", "split", "dicom_ids", "cxr_hours",
                                              "mortality", "los_days", "los_bin", "region_labels")}
    ehr_tables: list[pa.Table] = []
    demo: dict[str, list] = {k: [] for k in ("subject_id", "stay_id", *DEMOGRAPHIC_COLUMNS)}

    for i in range(n_stays):
        subject_id, stay_id = 10_000_000 + i, 30_000_000 + 17 * i
        split = SPLIT_CYCLE[i % len(SPLIT_CYCLE)]
        n_hours = 60 + 7 * i
        los_days = n_hours / 24.0
        fx.stay_ids.append(stay_id)
        fx.subject_of[stay_id] = subject_id
        fx.split_of[stay_id] = split
        intime = base_time + timedelta(days=3 * i)
        for k, v in (("subject_id", subject_id), ("hadm_id", 20_000_000 + i), ("stay_id", stay_id),
                     ("intime", intime), ("outtime", intime + timedelta(hours=n_hours)), ("los_days", los_days),
                     ("mortality", i % 2), ("los_bin", _los_bin(los_days)), ("split", split)):
            cohort[k].append(v)

        n_cxr = 2 + i % 3
        hours = [round(1.5 + 20.25 * j + 0.5 * i, 3) for j in range(n_cxr)]
        dicoms = [f"d{i:03d}x{j:02d}-{seed:x}" for j in range(n_cxr)]
        fx.dicoms_of[stay_id], fx.hours_of[stay_id] = dicoms, hours
        for j, (dicom, h) in enumerate(zip(dicoms, hours)):
            w, h_px = image_size[0] + 3 * j, image_size[1] + 2 * (i % 2)
            path = fx.images / f"{dicom}.jpg"
            Image.fromarray(_draw_image(rng, w, h_px), mode="L").save(path, format="JPEG", quality=90)
            boxes: list[list[float] | None] = list(_boxes(w, h_px))
            if i == 0 and j == 0:
                boxes[REGION_SLUGS.index("mediastinum")] = None
                fx.null_boxes.append((dicom, "mediastinum"))
                x1, y1, x2, y2 = boxes[REGION_SLUGS.index("cardiac_silhouette")]
                boxes[REGION_SLUGS.index("cardiac_silhouette")] = [x2, y1, x1, y2]
                fx.invalid_boxes.append((dicom, "cardiac_silhouette"))
            for k, v in (("subject_id", subject_id), ("stay_id", stay_id), ("study_id", 50_000_000 + 100 * i + j),
                         ("dicom_id", dicom), ("hours", h), ("image_path", str(path.resolve())),
                         ("width", w), ("height", h_px)):
                cxr[k].append(v)
            for col, box in zip(BOX_COLUMNS, boxes):
                cxr[col].append(box)

        for j in range(n_cxr - 1):
            labels = rng.integers(0, 4, size=NUM_DISEASES)
            for k, v in (("subject_id", subject_id), ("stay_id", stay_id), ("split", split),
                         ("cxr1_dicom_id", dicoms[j]), ("cxr2_dicom_id", dicoms[j + 1]),
                         ("cxr1_hours", hours[j]), ("cxr2_hours", hours[j + 1]),
                         ("region_labels", rng.integers(0, 4, size=(NUM_REGIONS, NUM_DISEASES)).tolist()),
                         ("label_source", "gold" if split == "test" else "silver")):
                prog[k].append(v)
            for slug_, lab in zip(DISEASE_SLUGS, labels):
                prog[slug_].append(int(lab))

        in_window = [j for j, h in enumerate(hours) if h <= ICU_WINDOW_HOURS]
        t = len(in_window)
        for k, v in (("subject_id", subject_id), ("stay_id", stay_id), ("split", split),
                     ("dicom_ids", [dicoms[j] for j in in_window]), ("cxr_hours", [hours[j] for j in in_window]),
                     ("mortality", i % 2), ("los_days", los_days), ("los_bin", _los_bin(los_days)),
                     ("region_labels", rng.integers(0, 4, size=(t - 1, NUM_REGIONS, NUM_DISEASES)).tolist())):
            mort[k].append(v)

        cols: dict[str, pa.Array] = {
            "stay_id": pa.array(np.full(n_hours, stay_id, dtype=np.int64)),
            "hour": pa.array(np.arange(n_hours, dtype=np.int32)),
        }
        values = rng.normal(0, 1, size=(n_hours, len(EHR_VALUE_COLUMNS))).astype(np.float32)
        masks = (rng.random(size=(n_hours, len(EHR_MASK_COLUMNS))) < 0.3).astype(np.uint8)
        for c, col in enumerate(EHR_VALUE_COLUMNS):
            cols[col] = pa.array(values[:, c])
        for c, col in enumerate(EHR_MASK_COLUMNS):
            cols[col] = pa.array(masks[:, c])
        ehr_tables.append(pa.table(cols))

        demo["subject_id"].append(subject_id)
        demo["stay_id"].append(stay_id)
        feats = np.zeros(len(DEMOGRAPHIC_COLUMNS), dtype=np.float32)
        feats[:3] = rng.normal(0, 1, size=3)
        for start, n in ((3, 2), (5, 6), (11, 2), (13, 4)):
            feats[start + int(rng.integers(0, n))] = 1.0
        for col, v in zip(DEMOGRAPHIC_COLUMNS, feats):
            demo[col].append(float(v))

    i64, f64, f32, i8, s = pa.int64(), pa.float64(), pa.float32(), pa.int8(), pa.string()
    ts = pa.timestamp("us")
    _write(root / "cohort.parquet", cohort, {
        "subject_id": i64, "hadm_id": i64, "stay_id": i64, "intime": ts, "outtime": ts, "los_days": f64,
        "mortality": i8, "los_bin": i8, "split": s})
    _write(root / "cxr.parquet", cxr, {
        "subject_id": i64, "stay_id": i64, "study_id": i64, "dicom_id": s, "hours": f64, "image_path": s,
        "width": pa.int32(), "height": pa.int32(), **{c: pa.list_(f64) for c in BOX_COLUMNS}})
    _write(root / "tasks" / "disease_progression.parquet", prog, {
        "subject_id": i64, "stay_id": i64, "split": s, "cxr1_dicom_id": s, "cxr2_dicom_id": s,
        "cxr1_hours": f64, "cxr2_hours": f64, **{c: i8 for c in DISEASE_SLUGS},
        "region_labels": pa.list_(pa.list_(i8)), "label_source": s})
    _write(root / "tasks" / "mortality_los.parquet", mort, {
        "subject_id": i64, "stay_id": i64, "split": s, "dicom_ids": pa.list_(s), "cxr_hours": pa.list_(f64),
        "mortality": i8, "los_days": f64, "los_bin": i8, "region_labels": pa.list_(pa.list_(pa.list_(i8)))})
    _write(root / "demographics.parquet", demo, {
        "subject_id": i64, "stay_id": i64, **{c: f32 for c in DEMOGRAPHIC_COLUMNS}})
    half = (len(ehr_tables) + 1) // 2
    for part, tables in enumerate((ehr_tables[:half], ehr_tables[half:])):
        if tables:
            pq.write_table(pa.concat_tables(tables), root / "ehr" / f"part-{part:05d}.parquet")

    all_ehr = pa.concat_tables(ehr_tables)
    stats = {"mean": {c: 0.0 for c in EHR_VALUE_COLUMNS}, "std": {c: 1.0 for c in EHR_VALUE_COLUMNS},
             "n_stays": sum(1 for sp in fx.split_of.values() if sp == "train"), "split": "train",
             "n_rows": all_ehr.num_rows}
    (root / "ehr_stats.json").write_text(json.dumps(stats, indent=1))
    label_stats = {
        "disease_progression": {"task": [[1, 1, 1, 1]] * NUM_DISEASES, "region": [[1, 1, 1, 1]] * NUM_DISEASES},
        "mortality_los": {"mortality": [1, 1], "los_bin": [1, 1, 1, 1], "region": [[1, 1, 1, 1]] * NUM_DISEASES},
    }
    (root / "label_stats.json").write_text(json.dumps(label_stats, indent=1))
    (root / "report.json").write_text(json.dumps({"rules": [], "skipped": {}}, indent=1))
    return fx


def _write(path: Path, data: dict[str, list], types: dict[str, pa.DataType]) -> None:
    table = pa.table({k: pa.array(data[k], type=types[k]) for k in types})
    pq.write_table(table, path)


def make_training_shards(root: Path, crop_size: int = 32) -> Path:
    """The training tests' cohort under ``root``: 24 stays of 96 x 80 px films, 32-px crops (or
    ``crop_size``), at most 4 samples per shard (uneven shards for the distributed plans); returns the shard dir."""
    from data_sharding.manifest import ShardSettings
    from data_sharding.shard_writer import write_shards

    make_processed(root / "processed", n_stays=24, image_size=(96, 80), seed=5)
    write_shards(root / "processed", root / "shards",
                 settings=ShardSettings(crop_size=crop_size, max_samples_per_shard=4), workers=1, progress=False)
    return root / "shards"
