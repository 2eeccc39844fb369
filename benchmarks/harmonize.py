"""``dipro harmonize`` on the demo cohort with a planted acquisition factor: the full table (README).

    python benchmarks/harmonize.py [--patients 300] [--shift 1.0] [--epochs 4] [--task disease_progression]

``dipro synth --acquisition-shift S`` (the demo's 300 patients, 128-px films), prepare, shard (32-px
crops), then a demo-sized DiPro (configs/demo.yaml) trained in-process as tests/test_learning.py
trains it, then :func:`dipro.harmonize.run.run_harmonize` on the train split (the split with the
most proxy twins) and on val, each printing entangled vs rotated-biological vs ComBat.  Nothing is
asserted: the numbers go to the README.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--task", default="disease_progression")
    ap.add_argument("--k", default="1,3", help="comma-separated k values")
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--splits", default="train,val")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from data_sharding import synth
    from data_sharding.manifest import ShardSettings
    from data_sharding.prepare import PrepareOptions, prepare
    from data_sharding.readers import resolve_roots
    from data_sharding.shard_writer import write_shards
    from dipro.config import load_config
    from dipro.harmonize.run import run_harmonize
    from dipro.model import build_model
    from dipro.train.data import read_label_stats, train_loader
    from dipro.train.optim import build_optimizer, build_scheduler

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        synth.generate(root / "raw", patients=args.patients, seed=args.seed, image_size=args.image_size,
                       progress=False, acquisition_shift=args.shift)
        prepare(resolve_roots(str(root / "raw"), None, None, None), root / "processed", PrepareOptions(progress=False))
        write_shards(root / "processed", root / "shards", settings=ShardSettings(crop_size=32), progress=False)
        t1 = time.perf_counter()
        cfg = load_config(str(REPO / "configs" / "demo.yaml"), [
            f"task={args.task}", f"data.shards={root / 'shards'}", f"trainer.max_epochs={args.epochs}",
            "data.num_loader_workers=0", "data.batch_size=8", "optim.base_lr=2.5e-4", "data.augment=false",
            f"seed={args.seed}"])
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, read_label_stats(root / "shards"))
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
        t2 = time.perf_counter()
        print(f"cohort {args.patients} patients, {args.image_size} px, acquisition shift {args.shift:g}: data "
              f"{t1 - t0:.0f} s; {args.task} model trained {args.epochs} epochs ({steps} steps each) in {t2 - t1:.0f} s")
        for split in args.splits.split(","):
            for k in (int(x) for x in args.k.split(",")):
                t = time.perf_counter()
                res = run_harmonize(model, cfg, root / "shards", root / "processed", split=split, k=k,
                                    clusters=args.clusters, seed=args.seed, out=root / f"h-{split}-{k}",
                                    progress=False, say=lambda line: print(f"  {line}"))
                print(res.table)
                print(f"({time.perf_counter() - t:.1f} s)\n")


if __name__ == "__main__":
    main()
