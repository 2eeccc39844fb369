"""DiPro forward+backward throughput and peak memory, demo vs paper configuration.

For each configuration (``demo``: tiny CNN, 32-px crops, d_model 32, 2 layers;
``paper``: ResNet-50, 224-px crops, d_model 256, 4 layers — the mortality settings)
and batch size (1, 4, 8) it times forward + ``compute_loss`` + backward on an in-memory
mortality batch with ``--cxrs`` CXRs per sample (10 region crops each) and 49 EHR
hours, after warm-up steps.  No optimizer step is timed.  The batch carries the
loader's training augmentation parameters, so the step includes the pixel
augmentation the region encoder applies on the device (``dipro.data.augment``);
the ``augment ms`` column times that transform alone on the step's crops.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (fp32 and bf16 autocast
rows); on CPU the peak resident-set growth over the RSS after the model and batch
are built, sampled every 2 ms from /proc/self/statm during warm-up and timed steps,
each CPU row in a fresh subprocess so memory freed by an earlier row cannot hide it
(fp32 only; CPU bf16 autocast is not how anyone trains).
CPU rows whose memory, extrapolated linearly from batch size 1, would exceed
``--cpu-mem-budget-gb`` are reported as skipped instead of swapping the machine.

    .venv/bin/python benchmarks/model.py [--configs demo,paper] [--batch-sizes 1,4,8] [--cxrs 4]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_sharding.constants import NUM_REGIONS  # noqa: E402
from dipro.config import LossConfig, ModelConfig  # noqa: E402
from dipro.data.augment import AUGMENT_KEYS, apply_augmentation, draw_augmentation  # noqa: E402
from dipro.model import DiPro  # noqa: E402
from dipro.model.synthetic import random_batch, uniform_label_stats  # noqa: E402

CONFIGS = {
    "demo": dict(backbone="tiny", crop_size=32, d_model=32, num_layers=2, num_heads=4, group_k=4),
    "paper": dict(backbone="resnet50", crop_size=224, d_model=256, num_layers=4, num_heads=8, group_k=8),
}
# (warm-up steps, timed steps) per configuration on CPU / GPU
STEPS = {"demo": {"cpu": (2, 10), "cuda": (3, 20)}, "paper": {"cpu": (1, 2), "cuda": (3, 10)}}
PAGE = os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak resident-set size (bytes) of this process while the context is open."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "RSSPeak":
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@dataclass
class Row:
    config: str
    device: str
    dtype: str
    batch: int
    crops: int
    samples_per_s: float | None
    ms_per_step: float | None
    peak_mib: float | None
    augment_ms: float | None = None
    note: str = ""


def _step(model: DiPro, batch: dict, device: torch.device, dtype: str) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(batch)
        loss, _ = model.compute_loss(batch, out)
    loss.backward()
    for p in model.parameters():
        p.grad = None


def measure(name: str, batch_size: int, cxrs: int, device: torch.device, dtype: str) -> Row:
    torch.manual_seed(0)
    cfg = ModelConfig(**CONFIGS[name])
    model = DiPro(cfg, "mortality", uniform_label_stats(), LossConfig()).to(device).train()
    batch = random_batch("mortality", batch_size, cxrs, 49, crop_size=cfg.crop_size, seed=0, missing_region_prob=0.0)
    rng = np.random.default_rng(0)
    params = [draw_augmentation(NUM_REGIONS, cfg.crop_size, rng) for _ in range(batch_size)]
    batch.update({k: torch.from_numpy(np.stack([p[k] for p in params])) for k in AUGMENT_KEYS})
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    warmup, steps = STEPS[name][device.type]
    augment_ms = time_augmentation(batch, device)
    crops = batch_size * cxrs * 10
    if device.type == "cuda":
        for _ in range(warmup):
            _step(model, batch, device, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            _step(model, batch, device, dtype)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        with RSSPeak() as mem:
            for _ in range(warmup):
                _step(model, batch, device, dtype)
            t0 = time.perf_counter()
            for _ in range(steps):
                _step(model, batch, device, dtype)
            elapsed = time.perf_counter() - t0
        peak = (mem.peak - mem.base) / 2**20
    del model, batch
    return Row(name, device.type, dtype, batch_size, crops, batch_size * steps / elapsed, 1000 * elapsed / steps, peak,
               augment_ms)


def time_augmentation(batch: dict, device: torch.device, repeats: int = 5) -> float:
    """ms to augment the batch's real crops as the region encoder does (uint8 -> float, jitter, shift)."""
    present = batch["region_mask"] & batch["cxr_mask"][:, :, None]
    crops = batch["crops"][present]
    params = [p[present] for p in DiPro._augmentation(batch, present.shape[1])]

    def run() -> None:
        apply_augmentation(crops.float().div_(255.0), *params)

    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / repeats


def measure_in_subprocess(name: str, batch_size: int, cxrs: int) -> Row:
    """One CPU row in a fresh interpreter (clean allocator state for the RSS peak)."""
    cmd = [sys.executable, __file__, "--one", f"{name},{batch_size},{cxrs}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Row(name, "cpu", "fp32", batch_size, batch_size * cxrs * 10, None, None, None, note=f"failed: {tail}")
    return Row(**json.loads(proc.stdout.strip().splitlines()[-1]))


def format_rows(rows: list[Row], cxrs: int) -> str:
    header = ["config", "device", "dtype", "batch", "crops/step", "samples/s", "ms/step", "augment ms", "peak MiB", "note"]
    body = []
    for r in rows:
        body.append([
            r.config, r.device, r.dtype, str(r.batch), str(r.crops),
            f"{r.samples_per_s:.2f}" if r.samples_per_s is not None else "-",
            f"{r.ms_per_step:.0f}" if r.ms_per_step is not None else "-",
            f"{r.augment_ms:.1f}" if r.augment_ms is not None else "-",
            f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-",
            r.note,
        ])
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = [f"DiPro forward+backward, mortality task, {cxrs} CXRs x 10 regions per sample, 49 EHR hours",
             "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="demo,paper")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--cxrs", type=int, default=4)
    ap.add_argument("--cpu-mem-budget-gb", type=float, default=8.0,
                    help="skip CPU rows whose extrapolated peak memory exceeds this (default 8)")
    ap.add_argument("--no-cpu", action="store_true", help="only CUDA rows")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "config,batch,cxrs" -> one CPU row as JSON
    args = ap.parse_args(argv)
    logging.getLogger("dipro.model.region_encoder").setLevel(logging.ERROR)  # random init is expected here
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.one:
        name, b, cxrs = args.one.split(",")
        print(json.dumps(dataclasses.asdict(measure(name, int(b), int(cxrs), torch.device("cpu"), "fp32"))))
        return 0
    configs = [c for c in args.configs.split(",") if c]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows: list[Row] = []
    targets = [] if args.no_cpu else [(torch.device("cpu"), "fp32")]
    if torch.cuda.is_available():
        targets += [(torch.device("cuda"), "fp32"), (torch.device("cuda"), "bf16")]
    for device, dtype in targets:
        for name in configs:
            per_sample_mib = None
            for b in sizes:
                if device.type == "cpu" and per_sample_mib is not None:
                    estimate = per_sample_mib * b / 1024
                    if estimate > args.cpu_mem_budget_gb:
                        rows.append(Row(name, "cpu", dtype, b, b * args.cxrs * 10, None, None, None,
                                        note=f"skipped: ~{estimate:.0f} GB > --cpu-mem-budget-gb {args.cpu_mem_budget_gb:g}"))
                        continue
                try:
                    if device.type == "cpu":
                        row = measure_in_subprocess(name, b, args.cxrs)
                    else:
                        row = measure(name, b, args.cxrs, device, dtype)
                except torch.OutOfMemoryError:
                    row = Row(name, device.type, dtype, b, b * args.cxrs * 10, None, None, None, note="out of memory")
                    torch.cuda.empty_cache()
                rows.append(row)
                if row.peak_mib is not None and b == min(sizes):
                    per_sample_mib = row.peak_mib / b
                print(f"done: {row}", file=sys.stderr, flush=True)
    print(format_rows(rows, args.cxrs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
