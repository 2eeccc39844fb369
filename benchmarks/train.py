"""Training throughput on Ray Train: samples/s and step time for 1 and 2 workers (scaling
efficiency), DDP vs DeepSpeed, bf16 vs fp32; GPU rows (bf16/fp32, channels-last, loader vs
training samples/s) when torch sees a GPU.

    .venv/bin/python benchmarks/train.py [--shards DIR] [--steps N] [--quick]

Numbers come from the loop's own ``train/samples_per_s`` / ``train/step_time_s`` logs over
the last epoch (warm), so Ray/worker start-up is excluded.  Without ``--shards`` a tiny
synthetic cohort is sharded into a temp dir (the demo config: tiny backbone, 32-px crops).
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


def make_shards(tmp: Path, n_stays: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import processed_fixture
    from data_sharding import shard_writer
    from data_sharding.manifest import ShardSettings

    processed_fixture.make_processed(tmp / "processed", n_stays=n_stays, image_size=(96, 80), seed=1)
    shard_writer.write_shards(tmp / "processed", tmp / "shards", settings=ShardSettings(crop_size=32,
                              max_samples_per_shard=8), workers=1, progress=False)
    return tmp / "shards"


def run(shards: Path, storage: Path, steps: int, overrides: list[str]) -> dict:
    """One run of 2 epochs; throughput of the second (warm) epoch from the saved history/metrics."""
    import json

    from dipro.config import load_config
    from dipro.train import run_training

    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.shards={shards}", f"trainer.storage_path={storage}", "tracking.enabled=false", "task=length_of_stay",
        "trainer.max_epochs=2", f"trainer.max_steps_per_epoch={steps}", "trainer.log_every_n_steps=1000000",
        "data.num_loader_workers=0", *overrides])
    t0 = time.perf_counter()
    res = run_training(cfg)
    wall = time.perf_counter() - t0
    meta = json.loads((res.last_checkpoint / "meta.json").read_text())
    return {"samples_per_s": meta["metrics"].get("train/samples_per_s_epoch"),
            "step_s": meta["metrics"].get("train/step_time_s_epoch"), "wall_s": wall,
            "eff_batch": cfg.effective_batch_size}


def loader_rate(shards: Path, batch: int, n: int = 20) -> float:
    from dipro.data import build_loader

    loader = build_loader(shards, "length_of_stay", "train", batch, 2, steps_per_epoch=n)
    t0 = time.perf_counter()
    count = sum(len(b["sample_key"]) for b in loader)
    return count / (time.perf_counter() - t0)


def main() -> int:
    import ray
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per epoch")
    ap.add_argument("--quick", action="store_true", help="only the 1 vs 2 worker DDP rows")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dipro-bench-train-"))
    shards = args.shards or make_shards(tmp, n_stays=40)
    gpu = torch.cuda.is_available()
    from data_sharding.ray_init import init_ray

    os.environ.pop("RAY_ADDRESS", None)  # a benchmark of this machine: always a local Ray (on 127.0.0.1)
    init_ray(num_cpus=max(2, (torch.get_num_threads() if not gpu else 8)), num_gpus=torch.cuda.device_count(),
             log_to_driver=False)
    rows = []
    cpu_cases = [
        ("DDP", "fp32", 1, ["trainer.num_workers=1", "data.batch_size=4", "trainer.precision=fp32"]),
        ("DDP", "fp32", 2, ["trainer.num_workers=2", "data.batch_size=4", "trainer.precision=fp32"]),
    ]
    if not args.quick:
        cpu_cases += [
            ("DDP", "bf16", 2, ["trainer.num_workers=2", "data.batch_size=4", "trainer.precision=bf16"]),
            ("DeepSpeed ZeRO-2", "fp32", 2, ["trainer.num_workers=2", "data.batch_size=4", "trainer.precision=fp32",
                                             "trainer.strategy=deepspeed", "trainer.zero_stage=2"]),
            ("DeepSpeed ZeRO-2", "bf16", 2, ["trainer.num_workers=2", "data.batch_size=4", "trainer.precision=bf16",
                                             "trainer.strategy=deepspeed", "trainer.zero_stage=2"]),
        ]
    for name, prec, w, ov in cpu_cases:
        r = run(shards, tmp / "runs", args.steps, ov)
        rows.append(("cpu", name, prec, w, r))
    if gpu:
        for name, prec, ov in [("DDP", "fp32", ["trainer.precision=fp32"]), ("DDP", "bf16", ["trainer.precision=bf16"]),
                               ("DDP channels-last", "bf16", ["trainer.precision=bf16", "model.channels_last=true"])]:
            r = run(shards, tmp / "runs", args.steps, ["trainer.use_gpu=true", "trainer.num_workers=1",
                                                         "data.batch_size=8", *ov])
            rows.append(("gpu", name, prec, 1, r))
    ray.shutdown()
    base = {(d, n, p): r["samples_per_s"] for d, n, p, w, r in rows if w == 1}
    print(f"\nTraining throughput (demo config, length_of_stay, {args.steps} steps/epoch, warm epoch)")
    print(f"{'device':6} {'strategy':18} {'prec':5} {'workers':7} {'eff.batch':9} {'samples/s':>10} {'step s':>8} "
          f"{'scaling eff.':>12}")
    for d, n, p, w, r in rows:
        b = base.get((d, "DDP", "fp32"))
        eff = (r["samples_per_s"] / (w * b)) if (b and r["samples_per_s"] and w > 1) else None
        print(f"{d:6} {n:18} {p:5} {w:7d} {r['eff_batch']:9d} {r['samples_per_s'] or float('nan'):10.1f} "
              f"{r['step_s'] or float('nan'):8.3f} {'' if eff is None else f'{eff:.0%}':>12}")
    print(f"\nloader alone (2 loader workers, batch 4): {loader_rate(shards, 4):.1f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
