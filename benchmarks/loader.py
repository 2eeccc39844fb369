"""Samples/s of ``dipro.data.build_loader`` vs the authors' per-sample loading, per task and worker.

The baseline does per sample what the authors' dataset class does at every
epoch: open each full-size JPEG of the sample, crop the 10 region boxes,
resize each to the crop size, read the stay's EHR CSV and slice the task's
window; the result is collated into the same batch format.  Both run on the
same cohort: a processed dir with MIMIC-sized JPEGs (``--image-size``, default
2560 px wide) written by ``tests/processed_fixture.py``, per-stay EHR CSVs
written from its ``ehr/`` Parquet (the authors' layout), and shards written by
``data_sharding.shard_writer`` from it.  Cohort building is not timed; each
rate is steady state: the baseline's timed after its first batch, build_loader's after ``--warmup``
batches, once its shuffle buffer is full (while it fills, the loader reads two samples per sample it
yields; from then on one, as over a whole epoch), the median of ``--repeats`` runs; the freshly
written files are in the page cache for both loaders.

    .venv/bin/python benchmarks/loader.py [--stays 24] [--workers 0,1,2] [--batches 100] [--warmup 64] [--no-s3]

Prints one table: samples/s of each loader, per loader worker, and the ratio (target >= 50x).

Then the same shards from object storage: the benchmark starts a moto S3 server on 127.0.0.1
(``tests/object_store.py``; stopped in ``finally``), publishes the shards there as ``dipro shard --out
s3://...`` lays them out, and at each worker count measures build_loader from ``s3://`` against
(a) its local-disk rate above and (b) what the server itself delivers for the same objects: a plain
buffered read (pyarrow, 8 MiB buffer) of every shard of the split by as many threads as loader
streams, bytes/s converted to samples/s with the split's bytes per sample.  Target: S3 >= 80 % of the
lower of (a) and (b).  These loader rates, local and S3 alike, are timed after ``--warmup`` batches
too.  ``s3+cache`` is build_loader from ``s3://`` with ``cache_dir`` (after its first
pass, which fills the cache and is not timed, it reads the local copy).
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
import os
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
from dipro.data.plan import read_manifest  # noqa: E402

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

def samples_per_second(make_iter, max_batches: int, warmup: int = 0) -> tuple[float, float]:
    """(steady-state samples/s, seconds to the first batch).  The rate's clock starts after the
    first batch (worker start-up and the shuffle buffer's warm-up excluded: that is the second
    number), or ``warmup`` batches later, and runs for up to ``max_batches`` further batches."""
    t_start = time.perf_counter()
    it = make_iter()
    next(it)
    first = time.perf_counter() - t_start
    for _ in range(warmup):
        next(it)
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
    ap.add_argument("--no-s3", action="store_true", help="skip the rows read from a local moto S3 server")
    ap.add_argument("--warmup", type=int, default=64,
                    help="batches before build_loader's clock starts (the shuffle buffer is full by then)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    s3_rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="dipro-bench-loader-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if not (work / "shards/manifest.parquet").is_file():
            work.mkdir(parents=True, exist_ok=True)
            build_cohort(work, args.stays, args.image_size, args.crop_size)
        rows = []
        s3 = None if args.no_s3 else LocalS3(Path(tmp), work / "shards")
        try:
            for task, task_dir in TASKS.items():
                for workers in (int(w) for w in args.workers.split(",")):
                    procs = max(1, workers)

                    def shard_iter(task=task, workers=workers, augment=True):
                        return iter(build_loader(work / "shards", task, "train", args.batch_size, workers,
                                                 steps_per_epoch=args.warmup + args.batches + 1, seed=0,
                                                 augment=augment))

                    def base_iter(task_dir=task_dir, workers=workers):
                        return iter(baseline_loader(work, task_dir, args.batch_size, workers, args.crop_size))

                    # build_loader runs are short (~0.1-1 s): the median of --repeats runs damps scheduler noise
                    timed = [samples_per_second(shard_iter, args.batches, args.warmup) for _ in range(args.repeats)]
                    ours = statistics.median(rate for rate, _ in timed)
                    first = statistics.median(f for _, f in timed)
                    plain = statistics.median(samples_per_second(lambda: shard_iter(augment=False), args.batches,
                                                                 args.warmup)[0] for _ in range(args.repeats))
                    base = samples_per_second(base_iter, args.baseline_batches)[0]
                    rows.append((task, workers, base / procs, ours / procs, ours / base, plain / procs, plain / base, first))
                    print(f"  {task} workers={workers}: baseline {base:.2f}/s, build_loader {ours:.1f}/s "
                          f"({plain:.1f}/s without augmentation)", file=sys.stderr)
                    if s3 is not None:
                        s3_rows.append(measure_s3(s3, work / "shards", Path(tmp), task, workers, args))
        finally:
            if s3 is not None:
                s3.close()

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
          f"the device); ours: augmentation off; both timed over {args.batches} batches after {args.warmup} (the "
          "shuffle buffer full); first batch s: build_loader's time from iter() to its first batch (worker "
          "start-up and shuffle-buffer warm-up).\n"
          "target: ratio >= 50x per worker; length_of_stay reads the mortality shards (same numbers as mortality).")
    if s3_rows:
        print_s3_table(s3_rows, args)
    return 0


# ----------------------------------------------------------------------------- object storage

class LocalS3:
    """A moto S3 server on 127.0.0.1 holding a copy of ``shards`` (this process's env pointed at it,
    so loader worker processes inherit it); :meth:`close` stops the server and restores the env."""

    def __init__(self, work: Path, shards: Path):
        from object_store import S3Server, s3_env, upload_shard_set

        self.server = S3Server(work / "moto.log").start()
        self.saved = {k: os.environ.get(k) for k in s3_env(self.server.endpoint)}
        os.environ.update(s3_env(self.server.endpoint))
        self.uri = upload_shard_set(shards, self.server.create_bucket("bench-loader") + "/shards")

    def close(self) -> None:
        try:
            self.server.stop()
        finally:
            for k, v in self.saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def server_samples_per_second(uri: str, task: str, streams: int, repeats: int) -> tuple[float, float]:
    """(samples/s, MB/s) the server delivers for ``task``'s train shards: a plain buffered read of
    every object (pyarrow ``open_input_stream``, 8 MiB buffer) by ``streams`` threads; median of ``repeats``."""
    from concurrent.futures import ThreadPoolExecutor

    from data_sharding import storage

    shard_set = read_manifest(uri, task, "train")
    locs = [storage.resolve(s.path) for s in shard_set.shards]
    total = sum(s.bytes for s in shard_set.shards)

    def read_all(part: list) -> int:
        n = 0
        for loc in part:
            with loc.fs.open_input_stream(loc.fs_path, buffer_size=8 << 20) as f:
                while block := f.read(8 << 20):
                    n += len(block)
        return n

    rates = []
    for _ in range(repeats):
        parts = [locs[i::streams] for i in range(streams)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            got = sum(pool.map(read_all, parts))
        assert got == total, (got, total)
        rates.append(total / (time.perf_counter() - t0))
    bps = statistics.median(rates)
    return bps * shard_set.num_samples / total, bps / 1e6


def measure_s3(s3: LocalS3, shards: Path, scratch: Path, task: str, workers: int, args) -> tuple:
    """One row of the S3 table.  Every loader rate here is timed in steady state, after
    ``--warmup`` batches, as in the first table."""
    def make(shards, cache_dir=None):
        return lambda: iter(build_loader(shards, task, "train", args.batch_size, workers, seed=0, augment=True,
                                         steps_per_epoch=args.warmup + args.batches + 1, cache_dir=cache_dir,
                                         cache_max_gb=100.0))

    def rate(make_iter) -> float:
        return statistics.median(samples_per_second(make_iter, args.batches, args.warmup)[0]
                                 for _ in range(args.repeats))

    local = rate(make(shards))
    remote = rate(make(s3.uri))
    server, mbps = server_samples_per_second(s3.uri, task, max(1, workers), args.repeats)
    cache_dir = scratch / f"cache-{task}-{workers}"
    samples_per_second(make(s3.uri, cache_dir), 1)  # fills the cache
    cached = rate(make(s3.uri, cache_dir))
    print(f"  {task} workers={workers}: local {local:.1f}/s, s3 {remote:.1f}/s, server {server:.1f}/s "
          f"({mbps:.0f} MB/s), s3+cache {cached:.1f}/s", file=sys.stderr)
    return task, workers, local, server, mbps, remote, remote / min(local, server), cached


def print_s3_table(rows: list[tuple], args) -> None:
    print(f"\nthe same shards from a local moto S3 server (127.0.0.1), batch {args.batch_size}, train split, "
          "samples/s of the whole loader (all its workers)")
    head = (f"{'task':<20} {'workers':>7} {'(a) local':>9} {'(b) server':>10} {'server MB/s':>11} {'s3':>8} "
            f"{'s3 / min(a,b)':>13} {'s3+cache':>9}")
    print(head)
    print("-" * len(head))
    for task, w, local, server, mbps, remote, ratio, cached in rows:
        print(f"{task:<20} {w:>7} {local:>9.1f} {server:>10.1f} {mbps:>11.0f} {remote:>8.1f} {ratio:>12.0%} "
              f"{cached:>9.1f}")
    print(f"(a) build_loader (shuffle + augmentation) on local disk (page cache); s3: the same from s3:// (ranged "
          f"8 MiB reads, two ahead); both timed over {args.batches} batches after {args.warmup} (the shuffle "
          "buffer full); (b) a plain buffered read of every shard object by as many threads as loader streams, "
          "converted to samples/s; target s3 >= 80 % of min(a, b).")


if __name__ == "__main__":
    sys.exit(main())
