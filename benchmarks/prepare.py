"""Benchmark `dipro prepare`: wall time and peak memory for two synthetic cohort sizes.

    .venv/bin/python benchmarks/prepare.py [--sizes 200 2000] [--image-size 64] [--workdir DIR]

For each size a synthetic raw tree is generated once (``data_sharding.synth.generate``,
not timed), then ``prepare`` runs in a fresh subprocess that reports its own wall
time and peak RSS (``data_sharding.procstat``: VmHWM), so the sizes do not share a heap.
"Peak RSS" is the whole process; "RSS over base" subtracts the RSS after imports.
The last line gives the large/small ratios of work, time and memory: linear growth
means time ratio ~ cohort ratio (per-stay cost flat), and memory growing no faster.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_sharding.procstat import peak_rss_mb  # noqa: E402


def measure(raw: Path, out: Path, block_mb: int) -> dict:
    """Runs inside the child process: one prepare, its time and peak memory."""
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots

    base = peak_rss_mb()  # after the imports: the interpreter + pandas/pyarrow baseline
    t0 = time.perf_counter()
    res = prepare(resolve_roots(raw), out, PrepareOptions(progress=False, overwrite=True, block_size=block_mb << 20))
    seconds = time.perf_counter() - t0
    chart = next((raw / "mimiciv/2.0/icu").glob("chartevents.csv*"))
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base,
            "stays": res.counts["stays"], "cxrs": res.counts["cxrs"], "ehr_rows": res.counts["ehr_rows"],
            "events": res.counts["ehr_events_used"], "chartevents_mb": chart.stat().st_size / 2**20}


def generate(raw: Path, patients: int, seed: int, image_size: int) -> float:
    from data_sharding.synth import generate as synth_generate

    t0 = time.perf_counter()
    synth_generate(raw, patients=patients, seed=seed, image_size=image_size)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[200, 2000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-mb", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None, help="keep raw/processed trees here (default: a temp dir)")
    ap.add_argument("--_measure", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(args._measure[0], args._measure[1], args.block_mb)))
        return 0

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-prepare-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        raw = work / f"raw-{n}"
        if not (raw / "mimiciv").is_dir():
            gen_s = generate(raw, n, args.seed, args.image_size)
            print(f"generated {n} patients in {gen_s:.1f} s", file=sys.stderr)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, __file__, "--block-mb", str(args.block_mb),
                               "--_measure", str(raw), str(work / f"processed-{n}")],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["patients"] = n
        rows.append(r)

    head = (f"{'patients':>8} {'stays':>6} {'CXRs':>6} {'events':>9} {'chart MB':>8} {'EHR rows':>9} "
            f"{'time s':>7} {'ms/stay':>8} {'peak RSS MB':>11} {'RSS over base MB':>16}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['patients']:>8} {r['stays']:>6} {r['cxrs']:>6} {r['events']:>9} {r['chartevents_mb']:>8.1f} "
              f"{r['ehr_rows']:>9} {r['seconds']:>7.2f} {1000 * r['seconds'] / max(1, r['stays']):>8.1f} "
              f"{r['peak_rss_mb']:>11.0f} {r['peak_rss_mb'] - r['base_rss_mb']:>16.0f}")
    a, b = rows
    over = lambda r: max(1.0, r["peak_rss_mb"] - r["base_rss_mb"])  # noqa: E731
    print(f"ratio large/small: patients {b['patients'] / a['patients']:.1f}x, stays {b['stays'] / max(1, a['stays']):.1f}x, "
          f"events {b['events'] / max(1, a['events']):.1f}x, time {b['seconds'] / a['seconds']:.1f}x, "
          f"RSS over base {over(b) / over(a):.1f}x")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
