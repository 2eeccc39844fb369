"""``dipro harmonize`` on the demo cohort with a planted acquisition factor: the full table (README).

    python benchmarks/harmonize.py [--patients 300] [--shift 1.0] [--epochs 3] [--k 4,8] [--anatomy-types 4] [--work DIR]

``dipro synth --acquisition-shift S`` (the demo's 300 patients, 128-px films), prepare, shard (32-px
crops), then a demo-sized DiPro (configs/demo.yaml) trained in-process as tests/test_learning.py
trains it, then :func:`dipro.harmonize.run.run_harmonize` on the train split (the split with the
most proxy twins) and on val, each printing entangled vs rotated-biological vs ComBat.  Nothing is
asserted: the numbers go to the README.

What keeps it short on two cores: per split the region features and the model's own evaluation are
computed once and shared by every ``--k`` (only the fit, the table and the evaluation with the
technical coordinates projected out depend on k); ``--work DIR`` keeps the cohort, shards and the
trained model there and reuses them on the next run with the same settings (a table for other k or
K without training again).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _train(cfg, root: Path):
    import torch

    from dipro.model import build_model
    from dipro.train.data import read_label_stats, train_loader
    from dipro.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(cfg.seed)
    stats = read_label_stats(root / "shards")
    model = build_model(cfg, stats)
    steps = len(train_loader(cfg, rank=0, world_size=1, epoch=0))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps * cfg.trainer.max_epochs)
    for epoch in range(cfg.trainer.max_epochs):
        model.train()
        for batch in train_loader(cfg, rank=0, world_size=1, epoch=epoch):
            loss, _ = model.compute_loss(batch, model(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model, stats, steps


def run(args, root: Path) -> None:
    from data_sharding import synth
    from data_sharding.manifest import ShardSettings
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots
    from data_sharding.shard_writer import write_shards
    from dipro.config import load_config
    from dipro.harmonize.features import collect_features
    from dipro.harmonize.run import run_harmonize
    from dipro.train.checkpoint import load_model, write_model_files
    from dipro.train.evaluate import evaluate_model

    key = {"patients": args.patients, "image_size": args.image_size, "shift": args.shift, "seed": args.seed,
           "epochs": args.epochs, "task": args.task, "anatomy_types": args.anatomy_types,
           "threads": args.threads}
    stamp = root / "benchmark.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != key:
        raise SystemExit(f"--work {root} holds a run with other settings ({stamp.read_text().strip()}): use another DIR")
    t0 = time.perf_counter()
    if not (root / "shards" / "manifest.parquet").is_file():
        synth.generate(root / "raw", patients=args.patients, seed=args.seed, image_size=args.image_size,
                       progress=False, acquisition_shift=args.shift, anatomy_types=args.anatomy_types,
                       overwrite=True)
        prepare(resolve_roots(str(root / "raw"), None, None, None), root / "processed", PrepareOptions(progress=False))
        write_shards(root / "processed", root / "shards", settings=ShardSettings(crop_size=32), progress=False)
    t1 = time.perf_counter()
    best = root / "model"
    if (best / "meta.json").is_file():
        model, cfg = load_model(best)
        trained = "reused from --work"
    else:
        cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
            f"task={args.task}", f"data.shards={root / 'shards'}", f"trainer.max_epochs={args.epochs}",
            "data.num_loader_workers=0", "data.batch_size=8", "optim.base_lr=2.5e-4", "data.augment=false",
            f"seed={args.seed}"])
        model, stats, steps = _train(cfg, root)
        write_model_files(best, model.state_dict(), cfg, stats, {"best_value": 0.0, "best_epoch": args.epochs})
        trained = f"trained {args.epochs} epochs ({steps} steps each)"
    stamp.write_text(json.dumps(key) + "\n")
    t2 = time.perf_counter()
    print(f"cohort {args.patients} patients, {args.image_size} px, acquisition shift {args.shift:g}: data "
          f"{t1 - t0:.0f} s; {args.task} model {trained} in {t2 - t1:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for split in args.splits.split(","):
        t = time.perf_counter()
        feats = collect_features(model, cfg, root / "shards", split, batch_size=16)
        own = evaluate_model(model, cfg, split, shard_dir=root / "shards", batch_size=16)
        print(f"{split}: features and the model's own evaluation in {time.perf_counter() - t:.0f} s")
        for k in (int(x) for x in args.k.split(",")):
            t = time.perf_counter()
            res = run_harmonize(model, cfg, root / "shards", root / "processed", split=split, k=k,
                                clusters=args.clusters, seed=args.seed, out=root / f"h-{split}-{k}", batch_size=16,
                                progress=False, say=lambda line: print(f"  {line}"), features=feats, own=own)
            print(res.table)
            print(f"({time.perf_counter() - t:.0f} s)\n", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--anatomy-types", type=int, default=4, help="planted anatomy types (dipro synth --anatomy-types)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--task", default="disease_progression")
    ap.add_argument("--k", default="4,8", help="comma-separated k values")
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--splits", default="train,val")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1, as the tests run: tests/conftest.py sets OMP_NUM_THREADS=1, and "
                         "other thread counts sum in another order and train other weights)")
    ap.add_argument("--work", default=None, metavar="DIR",
                    help="keep the cohort, shards and trained model in DIR and reuse them (default: a temp dir)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        run(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(args, Path(tmp))


if __name__ == "__main__":
    main()
