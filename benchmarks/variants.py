"""Side-by-side comparison of model/config variants on the synthetic cohort, over seeds.

The setting of ``tests/test_learning.py``: a ``dipro synth`` cohort of 300 patients (seed 3,
128-px films) through ``dipro prepare`` and ``dipro shard`` (32-px crops), the demo-sized model
(``configs/demo.yaml``: tiny CNN, d_model 32), batch 8, learning rate 2e-3 (base_lr 2.5e-4 x 8),
no augmentation, 15 epochs.  Each (task, arm) is trained and tested once per seed through
``dipro experiment``'s code path (:func:`dipro.train.experiment.run_experiment`: Ray Train, the
best validation checkpoint evaluated on the test split), 3 seeds by default.  An arm is a name
and ``key=value`` overrides on top of that setting; the arms share everything else.

    .venv/bin/python benchmarks/variants.py --work DIR [--tasks mortality,...] [--seeds 23,29,66] \\
        [--arm authors=] [--arm imagenet-scaling=model.input_scaling=imagenet] ...
    .venv/bin/python benchmarks/variants.py --work DIR --table      # print the table of what is there

Default arms: ``authors`` (the model as configured) and ``interleave``
(``model.pair_reversal=interleave``, the authors' code's reversed-pair layout).  The README's
"paper vs extended" table came from this script with ``--arm paper= --arm
extended=model.variant=extended,model.input_scaling=imagenet`` before the extended variant
was removed.

Results go to ``DIR/results/{task}-{arm}.json`` (one file per finished cell, so tasks can be
run one at a time under the Ray lock); every run prints the markdown table of all finished
cells (test metrics, mean ± std over seeds; mortality also the Brier score, the score
tests/test_learning.py uses).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_sharding import atomic  # noqa: E402  (after the path insert)

TASKS = ("mortality", "length_of_stay", "disease_progression")
DEFAULT_ARMS = {"authors": [], "interleave": ["model.pair_reversal=interleave"]}
COLUMNS = {
    "mortality": ("auprc", "auroc", "brier"),
    "length_of_stay": ("kappa", "accuracy", "f1_macro", "auroc"),
    "disease_progression": ("f1_macro", "auprc_macro", "auroc"),
}
LOWER = {"brier"}  # lower is better


def parse_arm(text: str) -> tuple[str, list[str]]:
    """``name=key=value,key=value`` (or ``name=``) -> (name, overrides)."""
    name, _, rest = text.partition("=")
    if not name or any(c in name for c in "/ "):
        raise SystemExit(f"--arm {text!r}: expected NAME=key=value,... (NAME without '/' or spaces)")
    return name, [o for o in rest.split(",") if o]


def make_shards(work: Path) -> Path:
    """The cohort of tests/test_learning.py, built once under ``work``."""
    shards = work / "shards"
    if (shards / "manifest.parquet").is_file():
        return shards
    from data_sharding import synth
    from data_sharding.manifest import ShardSettings
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots
    from data_sharding.shard_writer import write_shards

    synth.generate(work / "raw", patients=300, seed=3, image_size=128, progress=False)
    prepare(resolve_roots(str(work / "raw"), None, None, None), work / "processed", PrepareOptions(progress=False))
    write_shards(work / "processed", work / "shards", settings=ShardSettings(crop_size=32), progress=False)
    return shards


def run_cell(task: str, arm: str, overrides: list[str], shards: Path, work: Path, seeds: list[int],
             epochs: int) -> dict:
    import numpy as np

    from dipro.config import load_config
    from dipro.train.experiment import run_experiment

    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"task={task}", f"data.shards={shards}", f"trainer.storage_path={work / 'runs'}", "tracking.enabled=false",
        f"trainer.max_epochs={epochs}", f"trainer.patience={epochs}", "trainer.num_workers=1",
        "data.num_loader_workers=0", "data.batch_size=8", "optim.base_lr=2.5e-4", "data.augment=false",
        f"trainer.run_name=variants-{task}-{arm}-{time.strftime('%Y%m%d-%H%M%S')}", *overrides])
    t0 = time.perf_counter()
    result = run_experiment(cfg, seeds)
    per_seed = {}
    for seed, run in result.runs.items():
        metrics = {k[len("test/"):]: float(v) for k, v in run.metrics.items() if k.startswith("test/") and "/" not in k[5:]}
        if task == "mortality":
            y_true, y_prob = np.asarray(run.test.y_true, dtype=np.float64), np.asarray(run.test.y_prob, dtype=np.float64)
            metrics["brier"] = float(np.mean((y_prob - y_true) ** 2))
        per_seed[str(seed)] = metrics
    return {"task": task, "arm": arm, "overrides": overrides, "seeds": seeds, "epochs": epochs,
            "per_seed": per_seed, "wall_s": time.perf_counter() - t0, "effective_lr": cfg.effective_lr}


def table(results_dir: Path) -> str:
    """Markdown: one row per (task, metric), one column per arm (test split, mean ± std over seeds)."""
    from dipro.metrics import aggregate_seeds

    found = [json.loads(f.read_text()) for f in sorted(results_dir.glob("*.json"))]
    arms: list[str] = []
    for r in found:
        name = r.get("arm", r.get("variant"))
        if name not in arms:
            arms.append(name)
    lines = ["| task | metric (test) | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for task in TASKS:
        summary = {r.get("arm", r.get("variant")): aggregate_seeds(list(r["per_seed"].values()))
                   for r in found if r["task"] == task}
        if not summary:
            continue
        for m in COLUMNS[task]:
            cells = []
            for a in arms:
                mean, std = summary.get(a, {}).get(m, (math.nan, math.nan))
                cells.append("" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}")
            lines.append(f"| {task} | {m} ({'lower' if m in LOWER else 'higher'} is better) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path, help="folder for the cohort, runs and results")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--arm", action="append", default=None, metavar="NAME=OVERRIDES",
                    help="an arm: NAME=key=value,key=value (repeat; default: " + ", ".join(DEFAULT_ARMS) + ")")
    ap.add_argument("--seeds", default="23,29,66")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--table", action="store_true", help="only print the table of finished cells")
    args = ap.parse_args()
    results = args.work / "results"
    if not args.table:
        arms = dict(parse_arm(a) for a in args.arm) if args.arm else DEFAULT_ARMS
        args.work.mkdir(parents=True, exist_ok=True)
        shards = make_shards(args.work)
        seeds = [int(s) for s in args.seeds.split(",")]
        for task in args.tasks.split(","):
            for arm, overrides in arms.items():
                res = run_cell(task, arm, overrides, shards, args.work, seeds, args.epochs)
                results.mkdir(parents=True, exist_ok=True)
                atomic.write_text(results / f"{task}-{arm}.json", json.dumps(res, indent=1))
                print(f"{task} {arm}: {res['wall_s']:.0f} s", flush=True)
    if results.is_dir():
        print(table(results))


if __name__ == "__main__":
    main()
