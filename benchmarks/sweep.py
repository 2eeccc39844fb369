"""The timeline of a ``dipro sweep`` on a local Ray: when each trial ran, and how busy its slots were.

    .venv/bin/python benchmarks/sweep.py [--cpus 4] [--grid model.dropout=0.0,0.1,0.2] [--seeds 23,29] [--epochs 1]

A tiny cohort (the tests' processed fixture, 32-px crops, length of stay) is sharded into a temp dir;
the sweep runs through :func:`dipro.sweep.driver.run_sweep` on a local Ray with ``--cpus`` logical
CPUs (1 worker per trial, so ``--cpus`` / 1.01 trials at once) and tracking off.  Printed from the
trials' records (``trials/KEY.json``: wall-clock start and end of every attempt):

* one row per trial: its slot, start, end and duration (seconds from the first start) and a bar;
* slot occupancy while trials remain queued (from the first start to the last trial's start): busy
  slot-seconds / (slots x that span); target >= 90 %;
* the longest a slot stood idle between one trial's end and the next trial's start while trials were
  queued; target <= 10 s.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OCCUPANCY_TARGET = 0.90
IDLE_TARGET_S = 10.0


def make_shards(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import processed_fixture

    return processed_fixture.make_training_shards(tmp)


def slots(intervals: list[tuple[str, float, float]], n: int) -> dict[str, int]:
    """Each trial's slot: the lowest-numbered slot free at its start (greedy, by start time)."""
    free_at = [float("-inf")] * n
    out = {}
    for key, start, end in sorted(intervals, key=lambda x: x[1]):
        free = [s for s in range(n) if free_at[s] <= start]
        slot = free[0] if free else min(range(n), key=lambda s: free_at[s])
        out[key] = slot
        free_at[slot] = end
    return out


def occupancy(intervals: list[tuple[str, float, float]], n: int) -> tuple[float, float, float]:
    """(occupancy while trials remain, longest idle gap of a slot while trials remain, that window's length)."""
    starts = sorted(s for _, s, _ in intervals)
    t0, t_last = starts[0], starts[-1]
    span = t_last - t0
    if span <= 0:
        return 1.0, 0.0, 0.0
    busy = sum(max(0.0, min(e, t_last) - max(s, t0)) for _, s, e in intervals)
    # idle gap: a trial that ended before the last start until the next start after its end
    gaps = [min(x for x in starts if x >= e) - e for _, _, e in intervals if e < t_last]
    return busy / (n * span), max(gaps, default=0.0), span


def timeline(intervals: list[tuple[str, float, float]], n: int, width: int = 60) -> str:
    t0 = min(s for _, s, _ in intervals)
    t1 = max(e for _, _, e in intervals)
    scale = width / max(t1 - t0, 1e-9)
    slot_of = slots(intervals, n)
    lines = [f"{'trial':<10} {'slot':>4} {'start s':>8} {'end s':>8} {'dur s':>7}  timeline (0 .. {t1 - t0:.0f} s)"]
    for key, s, e in sorted(intervals, key=lambda x: x[1]):
        a, b = int((s - t0) * scale), max(int((e - t0) * scale), int((s - t0) * scale) + 1)
        bar = " " * a + "#" * (b - a)
        lines.append(f"{key:<10} {slot_of[key]:>4} {s - t0:>8.1f} {e - t0:>8.1f} {e - s:>7.1f}  |{bar:<{width}}|")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (default 4)")
    ap.add_argument("--grid", action="append", default=None, help="as dipro sweep --grid (default model.dropout=0.0,0.1,0.2)")
    ap.add_argument("--seeds", default="23,29")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--shards", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dipro-bench-sweep-"))
    shards = args.shards or make_shards(tmp)

    from data_sharding.ray_init import init_ray
    from dipro.config import load_config
    from dipro.sweep.driver import run_sweep
    from dipro.sweep.grid import parse_grid
    from dipro.train.experiment import parse_seeds

    os.environ.pop("RAY_ADDRESS", None)  # a benchmark of this machine: a local Ray on 127.0.0.1
    init_ray(num_cpus=args.cpus, log_to_driver=True)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        "task=length_of_stay", f"data.shards={shards}", f"trainer.storage_path={tmp / 'runs'}",
        "tracking.enabled=false", "data.num_loader_workers=0", "data.augment=false",
        f"trainer.max_epochs={args.epochs}", "trainer.num_workers=1"])
    t0 = time.perf_counter()
    result = run_sweep(cfg, grid=parse_grid(args.grid or ["model.dropout=0.0,0.1,0.2"]),
                       seeds=parse_seeds(args.seeds), name="bench")
    wall = time.perf_counter() - t0
    intervals = [(k, s, e) for k, r in result.records.items() for s, e in r.history[-1:]]
    n = result.concurrency
    occ, idle, span = occupancy(intervals, n)
    print(f"\nsweep of {len(intervals)} trials on a local Ray with {args.cpus} logical CPUs, {n} at a time "
          f"(1 worker + 0.01 CPU each); driver wall time {wall:.0f} s\n")
    print(timeline(intervals, n))
    print()
    print("| trials | slots | wall s | window with trials queued s | slot occupancy | longest idle slot s |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(intervals)} | {n} | {wall:.0f} | {span:.0f} | {occ:.1%} | {idle:.1f} |")
    ok = occ >= OCCUPANCY_TARGET and idle <= IDLE_TARGET_S
    print(f"\ntargets: occupancy >= {OCCUPANCY_TARGET:.0%} and idle <= {IDLE_TARGET_S:.0f} s while trials remain: "
          + ("met" if ok else "NOT met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
