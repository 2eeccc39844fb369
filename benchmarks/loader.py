"""Samples/s of ``dipro.data.build_loader`` vs the authors' per-sample loading, per task and worker.

The baseline does per sample what the authors' dataset class does at every
epoch: open each full-size JPEG of the sample, crop the 10 region boxes,
resize each to the crop size, read the stay's EHR CSV and slice the task's
window; the result is collated into the same batch format.  Both run on the
same cohort: a processed dir with MIMIC-sized JPEGs (``--image-size``, default
2560 px wide) written by ``tests/processed_fixture.py``, per-stay EHR CSVs
written from its ``ehr/`` Parquet (the authors' layout), and shards written by
``data_sharding.shard_writer`` from it.  Cohort building is not timed; each
rate is steady state (timed after the first batch; build_loader's rates are the
median of ``--repeats`` runs); the freshly written files are in the page cache for both loaders.

    .venv/bin/python benchmarks/loader.py [--stays 24] [--workers 0,1,2] [--batches 100]

Prints one table: samples/s of each loader, per loader worker, and the ratio (target >= 50x).
``ours+aug`` includes training augmentation as the loader does it: it draws each
sample's transform parameters; the pixels are transformed on the device by the
model (``dipro.data.augment``; its cost is the ``augment ms`` column of
``benchmarks/model.py``).  With worker processes, every batch also crosses to
the main process (``dipro.data.transport``); with 2 workers on a 2-core machine
the two workers and the main process share the cores.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from data_sharding.constants import (BOX_COLUMNS, DEMOGRAPHIC_COLUMNS, DISEASE_SLUGS, EHR_MASK_COLUMNS,  # noqa: E402
                                     EHR_VALUE_COLUMNS, ICU_WINDOW_STEPS)
from dipro.data import build_loader, collate  # noqa: E402

TASKS = {"disease_progression": "disease_progression", "mortality": "mortality_los"}


# ----------------------------------------------------------------------------- cohort

def build_cohort(work: Path, stays: int, width: int, crop_size: int) -> Path:
    """processed/ (JPEGs of ``width`` px), ehr_csv/{stay}.csv and shards/ under ``work``."""
    from data_sharding.manifest import ShardSettings
    from data_sharding.shard_writer import write_shards
    from processed_fixture import make_processed

    height = int(width * 1.19)  # MIMIC-CXR frontal images are ~2500 x 3000
    t0 = time.perf_counter()
    make_processed(work / "processed", n_stays=stays, image_size=(width, height), seed=0)
    ehr = pd.concat([pd.read_parquet(f) for f in sorted((work / "processed/ehr").glob("part-*.parquet"))])
    (work / "ehr_csv").mkdir()
    for stay, rows in ehr.groupby("stay_id"):
        rows.to_csv(work / "ehr_csv" / f"{stay}.csv", index=False)
    t1 = time.perf_counter()
    write_shards(work / "processed", work / "shards", settings=ShardSettings(crop_size=crop_size), progress=False)
    print(f"cohort: {stays} stays, {width}x{height} JPEGs in {t1 - t0:.0f} s; shards in {time.perf_counter() - t1:.0f} s",
          file=sys.stderr)
    return work


# ----------------------------------------------------------------------------- the authors' way

class PerSampleDataset(Dataset):
    """Every sample re-decodes its full JPEGs and re-reads its stay's EHR CSV."""

    def __init__(self, work: Path, task_dir: str, split: str, crop_size: int):
        p = work / "processed"
        self.work, self.task_dir, self.crop = work, task_dir, crop_size
        tasks = pd.read_parquet(p / f"tasks/{task_dir}.parquet")
        self.rows = tasks[tasks.split == split].reset_index(drop=True)
        self.cxr = pd.read_parquet(p / "cxr.parquet").set_index("dicom_id")
        self.demo = pd.read_parquet(p / "demographics.parquet").set_index("stay_id")

    def __len__(self) -> int:
        return len(self.rows)

    def _crops(self, dicom: str) -> tuple[np.ndarray, np.ndarray]:
        row = self.cxr.loc[dicom]
        crops = np.zeros((len(BOX_COLUMNS), self.crop, self.crop), dtype=np.uint8)
        present = np.zeros(len(BOX_COLUMNS), dtype=np.uint8)
        with Image.open(row["image_path"]) as img:
            img = img.convert("L")  # full-resolution decode, every time
            for r, col in enumerate(BOX_COLUMNS):
                box = row[col]
                if box is None or box[2] <= box[0] or box[3] <= box[1]:
                    continue
                crops[r] = np.asarray(img.crop(tuple(box)).resize((self.crop, self.crop), Image.BILINEAR))
                present[r] = 1
        return crops, present

    def __getitem__(self, i: int) -> dict:
        row = self.rows.iloc[i]
        stay = int(row.stay_id)
        if self.task_dir == "disease_progression":
            dicoms, hours = [row.cxr1_dicom_id, row.cxr2_dicom_id], [row.cxr1_hours, row.cxr2_hours]
            lo, hi = math.floor(row.cxr1_hours), math.ceil(row.cxr2_hours)
        else:
            dicoms, hours = list(row.dicom_ids), list(row.cxr_hours)
            lo, hi = 0, ICU_WINDOW_STEPS - 1
        crops, present = zip(*(self._crops(d) for d in dicoms))
        ehr = pd.read_csv(self.work / "ehr_csv" / f"{stay}.csv")
        window = ehr[(ehr.hour >= lo) & (ehr.hour <= hi)]
        region_labels = np.array([np.array(list(p), dtype=np.int8) for p in
                                  ([row.region_labels] if self.task_dir == "disease_progression" else row.region_labels)])
        sample = {
            "crops": np.stack(crops), "region_present": np.stack(present),
            "cxr_hours": np.asarray(hours, dtype=np.float32),
            "ehr_values": window[list(EHR_VALUE_COLUMNS)].to_numpy(np.float32),
            "ehr_masks": window[list(EHR_MASK_COLUMNS)].to_numpy(np.uint8),
            "ehr_hours": window["hour"].to_numpy(np.float32),
            "demographics": self.demo.loc[stay, list(DEMOGRAPHIC_COLUMNS)].to_numpy(np.float32),
            "region_labels": region_labels, "sample_key": f"s{stay}_{i}", "shard": "-",
            "stay_id": stay, "subject_id": int(row.subject_id),
        }
        if self.task_dir == "disease_progression":
            sample["progression"] = np.array([row[d] for d in DISEASE_SLUGS], dtype=np.int64)
        else:
            sample.update(mortality=int(row.mortality), los_bin=int(row.los_bin), los_days=float(row.los_days))
        return sample


def baseline_loader(work: Path, task_dir: str, batch_size: int, workers: int, crop: int) -> DataLoader:
    ds = PerSampleDataset(work, task_dir, "train", crop)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                      collate_fn=lambda s: collate(s, task_dir), drop_last=True,
                      persistent_workers=False, prefetch_factor=2 if workers else None)


# ----------------------------------------------------------------------------- timing

def samples_per_second(make_iter, max_batches: int) -> tuple[float, float]:
    """(steady-state samples/s, seconds to the first batch).  The rate's clock starts after the
    first batch (worker start-up and the shuffle buffer's warm-up excluded: that is the second
    number) and runs for up to ``max_batches`` further batches."""
    t_start = time.perf_counter()
    it = make_iter()
    next(it)
    first = time.perf_counter() - t_start
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(it):
        n += len(batch["sample_key"])
        if i + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t0), first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stays", type=int, default=24)
    ap.add_argument("--image-size", type=int, default=2560, help="JPEG width in pixels (height = 1.19 x width)")
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    ap.add_argument("--batches", type=int, default=100, help="batches timed for build_loader")
    ap.add_argument("--baseline-batches", type=int, default=4, help="batches timed for the baseline")
    ap.add_argument("--repeats", type=int, default=3, help="build_loader timings per cell (the median is shown)")
    ap.add_argument("--work", default=None, help="keep the cohort here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="dipro-bench-loader-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if not (work / "shards/manifest.parquet").is_file():
            work.mkdir(parents=True, exist_ok=True)
            build_cohort(work, args.stays, args.image_size, args.crop_size)
        rows = []
        for task, task_dir in TASKS.items():
            for workers in (int(w) for w in args.workers.split(",")):
                procs = max(1, workers)

                def shard_iter(task=task, workers=workers, augment=True):
                    return iter(build_loader(work / "shards", task, "train", args.batch_size, workers,
                                             steps_per_epoch=args.batches + 1, seed=0, augment=augment))

                def base_iter(task_dir=task_dir, workers=workers):
                    return iter(baseline_loader(work, task_dir, args.batch_size, workers, args.crop_size))

                # build_loader runs are short (~0.1-1 s): the median of --repeats runs damps scheduler noise
                timed = [samples_per_second(shard_iter, args.batches) for _ in range(args.repeats)]
                ours = statistics.median(rate for rate, _ in timed)
                first = statistics.median(f for _, f in timed)
                plain = statistics.median(samples_per_second(lambda: shard_iter(augment=False), args.batches)[0]
                                          for _ in range(args.repeats))
                base = samples_per_second(base_iter, args.baseline_batches)[0]
                rows.append((task, workers, base / procs, ours / procs, ours / base, plain / procs, plain / base, first))
                print(f"  {task} workers={workers}: baseline {base:.2f}/s, build_loader {ours:.1f}/s "
                      f"({plain:.1f}/s without augmentation)", file=sys.stderr)

    print(f"\nbatch {args.batch_size}, {args.crop_size} px crops from {args.image_size} px JPEGs, train split; "
          "samples/s per loader worker (workers 0 = the main process)")
    head = (f"{'task':<20} {'workers':>7} {'baseline':>9} {'ours+aug':>9} {'ratio':>7} {'ours':>9} {'ratio':>7} "
            f"{'first batch s':>13}")
    print(head)
    print("-" * len(head))
    for task, w, base_w, ours_w, ratio, plain_w, plain_ratio, first in rows:
        print(f"{task:<20} {w:>7} {base_w:>9.2f} {ours_w:>9.1f} {ratio:>6.0f}x {plain_w:>9.1f} {plain_ratio:>6.0f}x "
              f"{first:>13.2f}")
    print("ours+aug: build_loader with shuffle + training augmentation (parameters drawn here, pixels transformed on "
          "the device); ours: augmentation off; first batch s: build_loader's time from iter() to its first "
          "batch (worker start-up and shuffle-buffer warm-up).\n"
          "target: ratio >= 50x per worker; length_of_stay reads the mortality shards (same numbers as mortality).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
