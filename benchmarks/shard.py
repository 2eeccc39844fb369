"""Benchmark `dipro shard` and `dipro shards regenerate` on MIMIC-sized synthetic films.

    .venv/bin/python benchmarks/shard.py [--sizes 16 48] [--image-size 2560] [--workers N] [--repeats 3] [--workdir DIR]

Two cohorts are generated once (``dipro synth --image-size 2560``, then ``dipro prepare``; not
timed, kept under ``--workdir``).  On each cohort, every measurement runs in a fresh subprocess
(its own heap and peak RSS):

* ``decode only``: read and decode (PIL) every film the task tables reference, once: the work
  no shard writer can avoid;
* ``dipro shard`` with 1 and N workers (crop 224, default bilinear), and at 1 worker with
  ``--crop-resample nearest`` (the authors' crops) and ``bilinear-fast`` (the approximation);
* regeneration as Ray tasks on a local Ray started first with its N worker processes (timed
  apart: on a cluster they are already running), on shards of at most ``--regen-shard-samples`` samples so
  that one film is in few of many shards as in the full release: a full ``dipro shard
  --workers N`` of them (the reference), a no-op regeneration, then one film rewritten.

Rates are *marginal*: films/s = (films of the large cohort - films of the small) / (time of the
large - time of the small), so start-up (imports, spawning workers, reading the processed tables)
cancels; the time of each run on the large cohort is printed too.  Every build and decode
measurement runs ``--repeats`` times, round-robin over the rows (so a slow minute of a shared
machine hits every row alike), and each time is the median of its repeats (peak RSS: the largest);
the ``--workers N`` / ``--workers 1`` ratio of every repeat is printed too, so its spread is
visible.  ``films/CPU-s`` is the same ratio over CPU time (the decode loop's, the build units'
summed over workers): on a machine shared with other jobs it stays meaningful when wall-clock
rates do not.  ``peak RSS/worker`` is the largest peak RSS of a process that built units (the main
process at 1 worker).  The error of ``bilinear-fast`` is the mean (and max) absolute difference of
its crops from the default's, in grey levels, over every region crop of the large cohort.
``dipro shards verify`` of the large cohort's shards (one process, ``--repeats`` runs, median) is
set against reading and hashing the same files alone, the limit of any check of their sha256.  Speed
targets are read from this table, never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_sharding.procstat import peak_rss_mb  # noqa: E402


def referenced_films(processed: Path) -> list[str]:
    from data_sharding.build_plan import plan_films
    from data_sharding.manifest import ShardSettings
    from data_sharding.samples import TASK_DIRS, open_processed
    from data_sharding.shard_writer import plan_shards

    view = open_processed(processed)
    task_dirs = [t for t in TASK_DIRS if view.has_task(t)]
    plans = plan_shards(view, task_dirs, {t: ShardSettings() for t in task_dirs})
    return list(dict.fromkeys(f for p in plans for f in plan_films(view, p)))


# ----------------------------------------------------------------------------- measurements (child processes)

def measure_decode(processed: Path) -> dict:
    from PIL import Image

    films = referenced_films(processed)
    t0, c0 = time.perf_counter(), time.process_time()
    for path in films:
        with Image.open(path) as img:
            img.load()
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "films": len(films),
            "peak_rss_mb": peak_rss_mb()}


def measure_shard(processed: Path, out: Path, workers: int, resample: str) -> dict:
    from data_sharding.manifest import ShardSettings
    from data_sharding.shard_writer import build_shards

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = build_shards(processed, out, settings=ShardSettings(resample=resample), workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu_seconds": sum(w.cpu_seconds for w in report.workers),
            "films": report.films_read, "shards": len(report.records), "joined": report.joined,
            "peak_rss_mb": max(w.peak_rss_mb for w in report.workers),
            "worker_seconds": [round(w.seconds, 2) for w in report.workers],
            "worker_cpu": [round(w.cpu_seconds, 2) for w in report.workers],
            "bytes": sum(r.bytes for r in report.records)}


def measure_regenerate(processed: Path, out: Path, workers: int, max_samples: int) -> dict:
    """A full build of ``out``, Ray start, a no-op regeneration, then one film rewritten."""
    import ray
    from PIL import Image

    from data_sharding.manifest import ShardSettings
    from data_sharding.ray_init import init_ray
    from data_sharding.regenerate import regenerate
    from data_sharding.shard_writer import build_shards

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    build_shards(processed, out, settings=ShardSettings(max_samples_per_shard=max_samples), workers=workers,
                 progress=False)
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    init_ray(num_cpus=workers, logging_level="warning")
    # Ray starts its worker processes lazily: start them (and their imports) here, as a cluster has them
    ray.get([ray.remote(num_cpus=1)(_warm).remote() for _ in range(workers)])
    ray_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        noop = regenerate(processed, out, progress=False)
        noop_s = time.perf_counter() - t0
        film = Path(referenced_films(processed)[len(referenced_films(processed)) // 2])
        backup = film.read_bytes()
        try:
            Image.open(film).save(film, format="JPEG", quality=80)
            t0 = time.perf_counter()
            one = regenerate(processed, out, progress=False)
            one_s = time.perf_counter() - t0
        finally:
            film.write_bytes(backup)
    finally:
        ray.shutdown()
    return {"ray_start_s": ray_s, "full_s": full_s,
            "noop": {"seconds": noop_s, "hashed": noop.films_hashed, "read": noop.films_read,
                     "rebuilt": len(noop.rebuilt), "films": noop.films},
            "one": {"seconds": one_s, "hashed": one.films_hashed, "read": one.films_read,
                    "rebuilt": len(one.rebuilt), "shards": len(one.manifest.records),
                    "peak_rss_mb": max((w.peak_rss_mb for w in one.build.workers), default=0.0)}}


def measure_verify(shards: Path) -> dict:
    """Reading + sha256 of every shard file (the limit of any check that hashes the bytes), then
    ``verify_shards`` (one process: hash, parse, decode and check every sample)."""
    import hashlib

    from data_sharding.manifest import read_manifest
    from data_sharding.verify import verify_shards

    read_manifest(shards)  # its imports (pyarrow.dataset, pandas: ~0.5 s) once, outside the timing
    files = sorted(shards.glob("*/*.tar"))
    t0 = time.perf_counter()
    for path in files:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
    hash_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    problems = verify_shards(shards)
    verify_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    if problems:
        raise SystemExit(f"{shards}: verify found {len(problems)} problem(s): {problems[0]}")
    return {"bytes": sum(p.stat().st_size for p in files), "shards": len(files), "hash_s": hash_s,
            "seconds": verify_s, "cpu_seconds": cpu_s, "peak_rss_mb": peak_rss_mb()}


def _warm() -> int:
    import data_sharding.build_units  # noqa: F401
    import data_sharding.regenerate  # noqa: F401

    return os.getpid()


def crop_error(a: Path, b: Path) -> dict:
    """Mean / max |a - b| of the region crops of two shard directories built from the same plan."""
    import tarfile

    import numpy as np

    from data_sharding.manifest import read_manifest
    from data_sharding.shard_format import load_npy

    total = count = 0
    worst = 0
    for r in read_manifest(a).records:
        with tarfile.open(a / r.path) as ta, tarfile.open(b / r.path) as tb:
            for ia, ib in zip(ta, tb):
                if ia.name.endswith(".crops.npy"):
                    x = load_npy(ta.extractfile(ia).read()).astype(np.int16)
                    y = load_npy(tb.extractfile(ib).read()).astype(np.int16)
                    d = np.abs(x - y)
                    total += int(d.sum())
                    count += d.size
                    worst = max(worst, int(d.max()))
    return {"mean": total / max(1, count), "max": worst}


# ----------------------------------------------------------------------------- driver

def median_run(runs: list[dict]) -> dict:
    """The run whose wall time is the median (its other figures with it); CPU seconds: their median;
    peak RSS: the largest of the runs."""
    import statistics

    ordered = sorted(runs, key=lambda r: r["seconds"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mid["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in runs)
    mid["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return mid


def child(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, __file__, "--_measure", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"measurement {args} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cohort(work: Path, patients: int, image_size: int, seed: int) -> Path:
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots
    from data_sharding.synth import generate

    raw, processed = work / f"raw-{patients}", work / f"processed-{patients}"
    if not (processed / "cxr.parquet").is_file():
        t0 = time.perf_counter()
        generate(raw, patients=patients, seed=seed, image_size=image_size, progress=False)
        prepare(resolve_roots(raw), processed, PrepareOptions(progress=False, overwrite=True))
        print(f"cohort of {patients} patients at {image_size} px in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return processed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[16, 48], metavar=("SMALL", "LARGE"))
    ap.add_argument("--image-size", type=int, default=2560)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="N of the N-worker rows (default: cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="runs of every build/decode row (medians shown)")
    ap.add_argument("--regen-shard-samples", type=int, default=16, metavar="N",
                    help="max samples per shard of the regeneration rows (default 16)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep cohorts and shards here (default: a temp dir)")
    ap.add_argument("--_measure", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        kind, *rest = args._measure
        if kind == "decode":
            r = measure_decode(Path(rest[0]))
        elif kind == "shard":
            r = measure_shard(Path(rest[0]), Path(rest[1]), int(rest[2]), rest[3])
        elif kind == "verify":
            r = measure_verify(Path(rest[0]))
        elif kind == "regenerate":
            r = measure_regenerate(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
        else:
            r = crop_error(Path(rest[0]), Path(rest[1]))
        print(json.dumps(r))
        return 0

    tmp = tempfile.TemporaryDirectory(prefix="bench-shard-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    n = args.workers
    configs = [("decode only (read + PIL decode, once per film)", "decode", None, None),
               ("dipro shard --workers 1", "shard", 1, "bilinear"),
               (f"dipro shard --workers {n}", "shard", n, "bilinear"),
               ("dipro shard --workers 1 --crop-resample nearest", "shard", 1, "nearest"),
               ("dipro shard --workers 1 --crop-resample bilinear-fast", "shard", 1, "bilinear-fast")]
    res: dict[tuple[str, int], dict] = {}
    runs: dict[tuple[str, int], list[dict]] = {}
    regen: dict[int, dict] = {}
    for size in args.sizes:
        processed = cohort(work, size, args.image_size, args.seed)
        for rep in range(args.repeats):
            for label, kind, w, mode in configs:
                if kind == "decode":
                    r = child(["decode", str(processed)])
                else:
                    out = work / f"shards-{size}-{mode}-w{w}"
                    r = child(["shard", str(processed), str(out), str(w), mode])
                runs.setdefault((label, size), []).append(r)
                print(f"  {size:>3} patients  run {rep + 1}  {label}: {r['seconds']:.2f} s", file=sys.stderr)
        for label, *_ in configs:
            res[(label, size)] = median_run(runs[(label, size)])
        regen[size] = child(["regenerate", str(processed), str(work / f"shards-{size}-regen"), str(n),
                             str(args.regen_shard_samples)])
    small, large = args.sizes
    err = child(["error", str(work / f"shards-{large}-bilinear-w1"), str(work / f"shards-{large}-bilinear-fast-w1")])
    ver = median_run([child(["verify", str(work / f"shards-{large}-bilinear-w1")]) for _ in range(args.repeats)])

    def rate(label: str, key: str = "seconds") -> float:
        a, b = res[(label, small)], res[(label, large)]
        return (b["films"] - a["films"]) / max(1e-9, b[key] - a[key])

    decode, decode_cpu = rate(configs[0][0]), rate(configs[0][0], "cpu_seconds")
    one = rate(configs[1][0])
    print(f"films referenced: {res[(configs[0][0], small)]['films']} and {res[(configs[0][0], large)]['films']} "
          f"({small} and {large} patients, {args.image_size}-px films, crop 224, {os.cpu_count()} cores)")
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f} on {os.cpu_count()} cores")
    head = (f"{'':<56} {'films/s':>8} {'vs decode':>9} {'vs w1':>6} {'films/CPU-s':>11} {'vs decode':>9} "
            f"{'large s':>8} {'peak RSS/worker MiB':>20}")
    print(head)
    print("-" * len(head))
    for label, kind, w, mode in configs:
        r = rate(label)
        big = res[(label, large)]
        vs_w1 = f"{r / one:.2f}x" if kind == "shard" and mode == "bilinear" and w != 1 else ""
        rc = rate(label, "cpu_seconds")
        print(f"{label:<56} {r:>8.1f} {100 * r / decode:>8.0f}% {vs_w1:>6} {rc:>11.1f} {100 * rc / decode_cpu:>8.0f}% "
              f"{big['seconds']:>8.2f} {big['peak_rss_mb']:>20.0f}")
    full = res[(configs[2][0], large)]
    g = regen[large]
    print(f"{f'dipro shard --workers {n}, shards of <= {args.regen_shard_samples} samples':<56} {'':>8} {'':>9} "
          f"{'':>6} {'':>11} {'':>9} {g['full_s']:>8.2f} {'':>20}  ({g['one']['shards']} shards)")
    print(f"{'regenerate, no-op (Ray up)':<56} {'':>8} {'':>9} {'':>6} {'':>11} {'':>9} {g['noop']['seconds']:>8.2f} "
          f"{'':>20}  films hashed {g['noop']['hashed']}, read {g['noop']['read']}, "
          f"rebuilt {g['noop']['rebuilt']} of {g['one']['shards']}")
    print(f"{'regenerate, one film rewritten (Ray up)':<56} {'':>8} {'':>9} {'':>6} {'':>11} {'':>9} {g['one']['seconds']:>8.2f} "
          f"{g['one']['peak_rss_mb']:>20.0f}  films hashed {g['one']['hashed']}, read {g['one']['read']}, "
          f"rebuilt {g['one']['rebuilt']} of {g['one']['shards']}")
    print(f"local Ray start with {n} worker processes (apart from the rows above): {g['ray_start_s']:.2f} s; no-op / full build of the same "
          f"shards: {g['noop']['seconds'] / g['full_s']:.2f}x ({(g['noop']['seconds'] + g['ray_start_s']) / g['full_s']:.2f}x "
          f"with the Ray start); one film / full: {g['one']['seconds'] / g['full_s']:.2f}x")
    print(f"--workers {n}: per-worker seconds {full['worker_seconds']} (CPU {full['worker_cpu']}), "
          f"{full['joined']} of {full['shards']} shards joined from parts")
    w1, wn = configs[1][0], configs[2][0]
    per_run = [(runs[(w1, large)][i]["seconds"] - runs[(w1, small)][i]["seconds"])
               / max(1e-9, runs[(wn, large)][i]["seconds"] - runs[(wn, small)][i]["seconds"])
               for i in range(args.repeats)]
    print(f"--workers {n} / --workers 1 per repeat: " + ", ".join(f"{r:.2f}x" for r in per_run))
    mb = ver["bytes"] / 2**20
    print(f"dipro shards verify (1 process) of the {large}-patient shards ({ver['shards']} shards, {mb:.0f} MiB): "
          f"{mb / ver['seconds']:.0f} MiB/s, {100 * ver['hash_s'] / ver['seconds']:.0f} % of reading + sha256 alone "
          f"({mb / ver['hash_s']:.0f} MiB/s)")
    print(f"bilinear-fast vs bilinear crops: mean |diff| {err['mean']:.3f} grey levels, max {err['max']}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
