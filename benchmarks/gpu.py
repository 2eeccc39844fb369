"""One-call GPU benchmark (``make bench-gpu``): DiPro's training speed on one GPU, as ratios within one run.

    .venv/bin/python benchmarks/gpu.py [--work DIR] [--sections shards,step,memory,train,loader] [--json FILE]
    .venv/bin/python benchmarks/gpu.py --smoke      # CPU, tiny sizes, < 2 min: checks the script itself

From nothing it writes its own cohort (``dipro synth`` 200 patients at 512 px -> ``dipro prepare``
-> ``dipro shard`` at the paper's 224-px crops) and prints:

1. **step**: forward + ``compute_loss`` + backward at the paper's mortality configuration
   (ResNet-50, d_model 256, 4 layers; batch 8 x 4 CXRs x 10 regions = 320 crops, in memory):
   fp32 / bf16 x eager / channels-last x compiled, each as ms/step, samples/s and the ratio to fp32
   eager; the default configuration is bf16 + channels-last + ``torch.compile`` (its compile time
   is printed); then torchvision's ResNet-50 alone (the same 1-channel stem) on the same 320
   crops, bf16, channels-last, forward + backward: the ceiling; the default step's crops/s over it.
2. **memory**: batch 4 x 14 CXRs (the cohort's cap), bf16 + channels-last, eager, peak GPU
   memory and samples/s with and without ``model.activation_checkpointing`` (and with it plus
   ``model.encoder_chunk``: the backbone recomputed 64 crops at a time).
3. **train**: a real ``dipro train`` (configs/mortality.yaml, random init, 1 GPU, 8 loader
   workers, batch 4 x accumulation 4) with DDP and with DeepSpeed ZeRO-2, 2 short epochs; samples/s
   of the second epoch from the run's own metrics (checkpoint ``meta.json``), against the model
   step rate on the loader's own batches (held on the GPU, same compiled default model, same
   accumulation and optimizer step): the share of the model rate the real run reaches.
4. **loader**: ``build_loader`` samples/s on the mortality train split for 0, 2, 4, 8, ... workers
   (up to the core count), time to the first batch, and the rate over one GPU's consumption.

``--sections shared`` (not in the default run): two DDP ranks on the one GPU
(``trainer.gpus_per_worker=0.5``, gloo) train an epoch, then ``--resume`` trains a second.

Targets (issue 13): default step >= 2.0x fp32 eager; DiPro >= 75 % of the ResNet-50-alone crops/s;
``dipro train`` >= 90 % of the model step rate; loader >= 10x one GPU's consumption, rising with workers.
Without a GPU every section runs on the CPU (``--smoke`` sizes it for that; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from model import CONFIGS, RSSPeak  # noqa: E402  (benchmarks/model.py: one home for model sizes and RSS)

from dipro.config import LossConfig, ModelConfig  # noqa: E402
from dipro.model import DiPro  # noqa: E402
from dipro.model.region_encoder import build_backbone  # noqa: E402
from dipro.model.synthetic import random_batch, uniform_label_stats  # noqa: E402
from dipro.train.compile import compile_in_place  # noqa: E402
from dipro.train.precision import autocast  # noqa: E402
from dipro.train.strategies import ModelWithLoss  # noqa: E402

SECTIONS = ("shards", "step", "memory", "train", "loader")
EXTRA_SECTIONS = ("shared",)  # asked for by name only
SIZES = {
    "full": dict(patients=200, image_size=512, crop=224, model="paper", batch=8, cxrs=4, mem_batch=4, mem_cxrs=14, mem_chunk=64,
                 warmup=3, steps=10, backend="inductor", config="configs/mortality.yaml", train_steps=8,
                 train_batch=4, train_loader_workers=8, loader_steps=60, device_batches=6),
    "smoke": dict(patients=24, image_size=96, crop=32, model="demo", batch=2, cxrs=3, mem_batch=2, mem_cxrs=4, mem_chunk=16,
                  warmup=1, steps=2, backend="eager", config="configs/demo.yaml", train_steps=2,
                  train_batch=2, train_loader_workers=0, loader_steps=4, device_batches=2),
}


def say(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 0. shards

def dipro_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m dipro ARGS`` from the repository root; training starts its own local Ray."""
    cmd = [sys.executable, "-m", "dipro", *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks/gpu.py: `dipro {' '.join(args)}` failed (exit {proc.returncode}):\n"
                         + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:]))
    return proc


def make_shards(work: Path, size: dict) -> Path:
    shards = work / "shards"
    if (shards / "manifest.parquet").is_file():
        say(f"shards: reusing {shards}")
        return shards
    t0 = time.perf_counter()
    dipro_cli("synth", "--out", str(work / "raw"), "--patients", str(size["patients"]),
              "--image-size", str(size["image_size"]), "--quiet", "--overwrite")
    t1 = time.perf_counter()
    dipro_cli("prepare", "--raw", str(work / "raw"), "--out", str(work / "processed"), "--no-progress", "--overwrite")
    t2 = time.perf_counter()
    dipro_cli("shard", "--processed", str(work / "processed"), "--out", str(shards), "--crop-size", str(size["crop"]))
    say(f"shards: synth {size['patients']} patients at {size['image_size']} px {t1 - t0:.0f} s, prepare {t2 - t1:.0f} s, "
        f"shard at {size['crop']} px {time.perf_counter() - t2:.0f} s -> {shards}")
    return shards


# ----------------------------------------------------------------------------- 1. model step

def model_cfg(size: dict, **kw) -> ModelConfig:
    base = dict(CONFIGS[size["model"]], dropout=0.1, compile=False)
    base.update(kw)
    return ModelConfig(**base)


def build(size: dict, device: torch.device, *, channels_last: bool, compiled: bool, backend: str,
          checkpointing: bool = False, encoder_chunk: int = 0) -> ModelWithLoss:
    """The training module as ``dipro train`` builds it (ModelWithLoss, channels-last, compiled in place)."""
    torch.manual_seed(0)
    cfg = model_cfg(size, channels_last=channels_last, activation_checkpointing=checkpointing,
                    encoder_chunk=encoder_chunk)
    wrapped = ModelWithLoss(DiPro(cfg, "mortality", uniform_label_stats(), LossConfig()))
    if channels_last:
        wrapped.to(memory_format=torch.channels_last)
    wrapped.to(device).train()
    if compiled:
        compile_in_place(wrapped, backend)
    return wrapped


def synthetic_batch(size: dict, batch: int, cxrs: int, device: torch.device) -> dict:
    b = random_batch("mortality", batch, cxrs, 49, crop_size=size["crop"], seed=0, missing_region_prob=0.0)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


def time_steps(fn, device: torch.device, warmup: int, steps: int) -> tuple[float, float, float]:
    """(seconds of the first warm-up call, seconds per timed step, peak bytes) of ``fn()``."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    peak = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device)
    else:
        with RSSPeak() as mem:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            elapsed = time.perf_counter() - t0
        peak = mem.peak - mem.base
    return first, elapsed / steps, peak


def dipro_step(module: ModelWithLoss, batch: dict, device: torch.device, precision: str):
    def fn() -> None:
        with autocast(device, precision):
            _, loss, _ = module(batch)
        loss.backward()
        for p in module.parameters():
            p.grad = None
    return fn


def step_section(size: dict, device: torch.device, backend: str, results: dict) -> None:
    batch_n, cxrs = size["batch"], size["cxrs"]
    batch = synthetic_batch(size, batch_n, cxrs, device)
    crops = batch_n * cxrs * 10
    variants = [("fp32 eager", "fp32", False, False), ("bf16 eager", "bf16", False, False),
                ("fp32 channels-last", "fp32", True, False), ("bf16 channels-last", "bf16", True, False),
                ("bf16 channels-last compiled (default)", "bf16", True, True)]
    rows, base = [], None
    fallback = ("bf16 compiled, contiguous (fallback)", "bf16", False, True)
    for name, precision, cl, compiled in variants:
        try:
            module = build(size, device, channels_last=cl, compiled=compiled, backend=backend)
            first, per_step, peak = time_steps(dipro_step(module, batch, device, precision), device,
                                               size["warmup"], size["steps"])
        except Exception as exc:  # noqa: BLE001 - one failing setting must not hide the others' figures
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            results.setdefault("step", {})[name] = {"error": reason}
            rows.append([name, f"failed: {type(exc).__name__}", "", "", "", ""])
            say(f"[step] {name} failed: {reason}")
            if compiled and name != fallback[0]:
                variants.append(fallback)
            continue
        finally:
            module = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = base or per_step
        results.setdefault("step", {})[name] = {"ms": 1000 * per_step, "samples_per_s": batch_n / per_step,
                                                "crops_per_s": crops / per_step, "speedup": base / per_step,
                                                "peak_gib": peak / 2**30, "first_call_s": first}
        rows.append([name, f"{1000 * per_step:.1f}", f"{batch_n / per_step:.1f}", f"{base / per_step:.2f}x",
                     f"{peak / 2**30:.2f}", f"{first:.1f}" + (" (compile)" if compiled else "")])
    # the ceiling: the backbone alone on the same crops, bf16, channels-last, eager
    torch.manual_seed(0)
    net, _ = build_backbone(CONFIGS[size["model"]]["backbone"])
    net = net.to(device, memory_format=torch.channels_last).train()
    x = torch.rand(crops, 1, size["crop"], size["crop"], device=device).contiguous(memory_format=torch.channels_last)

    def backbone_step() -> None:
        with autocast(device, "bf16"):
            y = net(x)
        y.float().sum().backward()
        for p in net.parameters():
            p.grad = None

    _, per_step, peak = time_steps(backbone_step, device, size["warmup"], size["steps"])
    results["step"]["backbone alone"] = {"ms": 1000 * per_step, "crops_per_s": crops / per_step}
    rows.append([f"{CONFIGS[size['model']]['backbone']} alone, bf16 channels-last eager", f"{1000 * per_step:.1f}",
                 f"({crops / per_step:.0f} crops/s)", "", f"{peak / 2**30:.2f}", ""])
    default = next((results["step"][n] for n in ("bf16 channels-last compiled (default)", fallback[0])
                    if "ms" in results["step"].get(n, {})), results["step"]["bf16 channels-last"])
    results["ratios"]["default_step_vs_fp32_eager"] = default["speedup"]
    results["ratios"]["dipro_vs_backbone_alone"] = default["crops_per_s"] / (crops / per_step)
    say(table(f"\n[step] forward + loss + backward, {size['model']} configuration, batch {batch_n} x {cxrs} CXRs x 10 "
              f"regions = {crops} crops, on {device}", ["setting", "ms/step", "samples/s", "vs fp32 eager",
                                                        "peak GiB", "first call s"], rows))
    say(f"default step / fp32 eager = {default['speedup']:.2f}x (target >= 2.0x); DiPro crops/s / backbone alone = "
        f"{100 * results['ratios']['dipro_vs_backbone_alone']:.0f} % (target >= 75 %); "
        f"first call (compile) {default['first_call_s']:.0f} s")


# ----------------------------------------------------------------------------- 2. memory

def memory_section(size: dict, device: torch.device, results: dict) -> None:
    b, cxrs = size["mem_batch"], size["mem_cxrs"]
    batch = synthetic_batch(size, b, cxrs, device)
    rows = []
    chunk = size["mem_chunk"]
    for ckpt, enc_chunk in ((False, 0), (True, 0), (True, chunk)):
        name = f"checkpointing={ckpt}" + (f",encoder_chunk={enc_chunk}" if enc_chunk else "")
        label = ("on" if ckpt else "off") + (f", encoder_chunk={enc_chunk}" if enc_chunk else "")
        module = build(size, device, channels_last=device.type == "cuda", compiled=False, backend="",
                       checkpointing=ckpt, encoder_chunk=enc_chunk)
        try:
            _, per_step, peak = time_steps(dipro_step(module, batch, device, "bf16"), device, 2, max(2, size["steps"] // 2))
            results.setdefault("memory", {})[name] = {"peak_gib": peak / 2**30, "samples_per_s": b / per_step}
            rows.append([label, f"{peak / 2**30:.2f}", f"{b / per_step:.1f}"])
        except torch.OutOfMemoryError:
            rows.append([label, "out of memory", "-"])
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    say(table(f"\n[memory] batch {b} x {cxrs} CXRs x 10 regions, bf16, eager, on {device} "
              "(CPU: resident-set growth)", ["activation checkpointing", "peak GiB", "samples/s"], rows))


# ----------------------------------------------------------------------------- 3. dipro train

def train_run(size: dict, shards: Path, work: Path, strategy: str, gpu: bool) -> dict:
    name = f"bench-{strategy}-{int(time.time())}"
    overrides = [f"data.shards={shards}", "model.backbone_weights=null", f"trainer.use_gpu={str(gpu).lower()}",
                 f"trainer.storage_path={work / 'runs'}", f"trainer.run_name={name}", "tracking.enabled=false",
                 "trainer.max_epochs=2", f"trainer.max_steps_per_epoch={size['train_steps']}",
                 f"data.batch_size={size['train_batch']}", "optim.grad_accum=4",
                 f"data.num_loader_workers={size['train_loader_workers']}", f"trainer.strategy={strategy}",
                 "trainer.log_every_n_steps=1000000", "trainer.precision=bf16"]
    if strategy == "deepspeed":
        overrides.append("trainer.zero_stage=2")
    if not gpu:  # the smoke run: the compiled path traced without generating kernels
        overrides += ["model.compile=true", f"model.compile_backend={size['backend']}"]
    t0 = time.perf_counter()
    proc = dipro_cli("train", "--config", size["config"], *overrides)
    wall = time.perf_counter() - t0
    metas = sorted((work / "runs" / name).glob("checkpoint_*_epoch0001/meta.json"))
    if not metas:
        raise SystemExit(f"benchmarks/gpu.py: dipro train ({strategy}) wrote no second-epoch checkpoint under "
                         f"{work / 'runs' / name}")
    metrics = json.loads(metas[-1].read_text())["metrics"]
    out = proc.stdout + proc.stderr
    compile_s = re.search(r"compile \+ first optimizer step ([0-9.]+) s", out)
    return {"samples_per_s": metrics.get("train/samples_per_s_epoch"), "step_s": metrics.get("train/step_time_s_epoch"),
            "wall_s": wall, "compile_s": float(compile_s.group(1)) if compile_s else None}


def model_rate_on_loader_batches(size: dict, shards: Path, device: torch.device, backend: str) -> float:
    """samples/s of the default compiled model (with AdamW) on the training loader's own batches held on the
    device, accumulating 4 micro batches per optimizer step as ``dipro train`` does."""
    from dipro.data import build_loader, move_to_device
    from dipro.train.optim import adamw_implementation

    loader = build_loader(shards, "mortality", "train", size["train_batch"], 0, shuffle=True, augment=False,
                          steps_per_epoch=size["device_batches"] * 4)
    batches = [move_to_device({k: v for k, v in b.items() if k != "num_corrupt"}, device) for b in loader]
    module = build(size, device, channels_last=device.type == "cuda", compiled=True, backend=backend)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, **adamw_implementation(params))

    def one_pass() -> None:
        for i, b in enumerate(batches):
            with autocast(device, "bf16"):
                _, loss, _ = module(b)
            (loss / 4).backward()
            if (i + 1) % 4 == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)

    one_pass()  # compiles for every batch shape there is
    sync(device)
    t0 = time.perf_counter()
    one_pass()
    sync(device)
    return sum(len(b["sample_key"]) for b in batches) / (time.perf_counter() - t0)


def train_section(size: dict, shards: Path, work: Path, device: torch.device, backend: str, results: dict) -> None:
    gpu = device.type == "cuda"
    try:
        model_rate = model_rate_on_loader_batches(size, shards, device, backend)
    except Exception as exc:  # noqa: BLE001 - still run dipro train
        say(f"[train] model step on loader batches failed: {' '.join(str(exc).split())[:300]}")
        model_rate = float("nan")
    rows = [["model step on loader batches (no Ray, no loader)", f"{model_rate:.1f}", "100 %", "", ""]]
    results["train"] = {"model_rate": model_rate}
    for strategy in ("ddp", "deepspeed"):
        try:
            r = train_run(size, shards, work, strategy, gpu)
        except SystemExit as exc:  # dipro train failed: its last lines, then the other strategy
            say(f"[train] {strategy}: {exc}")
            results["train"][strategy] = {"error": str(exc)[-2000:]}
            rows.append([f"dipro train {strategy}", "failed", "", "", ""])
            continue
        results["train"][strategy] = r
        share = r["samples_per_s"] / model_rate if r["samples_per_s"] else float("nan")
        results["ratios"][f"train_{strategy}_vs_model"] = share
        rows.append([f"dipro train {strategy}" + (" ZeRO-2" if strategy == "deepspeed" else "") + ", epoch 2",
                     f"{r['samples_per_s']:.1f}", f"{100 * share:.0f} %",
                     f"{r['compile_s']:.0f}" if r["compile_s"] is not None else "-", f"{r['wall_s']:.0f}"])
    say(table(f"\n[train] {size['config']}, batch {size['train_batch']} x accumulation 4, bf16, 1 "
              f"{'GPU' if gpu else 'CPU worker'}, {size['train_loader_workers']} loader workers (target >= 90 %)",
              ["run", "samples/s", "of model rate", "compile s", "wall s"], rows))


def shared_gpu_section(size: dict, shards: Path, work: Path, device: torch.device) -> None:
    """Two DDP ranks on one GPU (``trainer.gpus_per_worker=0.5``, gloo): one epoch, then ``--resume``
    for a second; prints both runs' epoch-end lines. Not in the default sections (not a speed figure)."""
    gpu = device.type == "cuda"
    name = f"bench-shared-{int(time.time())}"
    common = [f"data.shards={shards}", "model.backbone_weights=null", f"trainer.use_gpu={str(gpu).lower()}",
              f"trainer.storage_path={work / 'runs'}", "tracking.enabled=false", "trainer.num_workers=2",
              f"trainer.max_steps_per_epoch={size['train_steps']}", f"data.batch_size={size['train_batch']}",
              "optim.grad_accum=2", "data.num_loader_workers=2"]
    if gpu:
        common.append("trainer.gpus_per_worker=0.5")
    else:
        common.append("model.compile=false")
    first = dipro_cli("train", "--config", size["config"], *common, f"trainer.run_name={name}", "trainer.max_epochs=1")
    second = dipro_cli("train", "--config", size["config"], *common, "trainer.max_epochs=2", "--resume", name)
    lines = [ln for ln in (first.stdout + second.stdout).splitlines()
             if re.search(r"world rank|epoch \d+ done|resumed|gloo|nccl", ln)]
    say(f"\n[shared] 2 DDP ranks on one {'GPU (gpus_per_worker=0.5, gloo)' if gpu else 'CPU'}: "
        "1 epoch, then --resume for a second\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- 4. loader

def loader_section(size: dict, shards: Path, results: dict, smoke: bool) -> None:
    from dipro.data import build_loader

    cores = os.cpu_count() or 1
    counts = [0, 2] if smoke else sorted({0, 2, 4, 8, *[w for w in (12, 16, 24, 32) if w <= cores]})
    consumption = results.get("train", {}).get("ddp", {}).get("samples_per_s") or results.get("train", {}).get(
        "model_rate")
    rows = []
    for w in counts:
        loader = build_loader(shards, "mortality", "train", size["train_batch"], w, shuffle=True, augment=False,
                              steps_per_epoch=size["loader_steps"], pin_memory=torch.cuda.is_available())
        t0 = time.perf_counter()
        it = iter(loader)
        first = next(it)
        t_first = time.perf_counter() - t0
        n, t1 = 0, time.perf_counter()
        for b in it:
            n += len(b["sample_key"])
        rate = n / max(time.perf_counter() - t1, 1e-9)
        del first, it, loader
        results.setdefault("loader", {})[w] = {"samples_per_s": rate, "first_batch_s": t_first}
        rows.append([str(w), f"{rate:.0f}", f"{t_first:.2f}", f"{rate / consumption:.1f}x" if consumption else "-"])
    say(table(f"\n[loader] build_loader, mortality train split, batch {size['train_batch']}, {size['loader_steps']} "
              f"batches, {cores} cores", ["workers", "samples/s", "first batch s", "vs one GPU's use"], rows))


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script; < 2 min)")
    ap.add_argument("--work", help="working directory (default: a temp dir); its shards are reused")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"subset of {','.join(SECTIONS)} (default: all), or {','.join(EXTRA_SECTIONS)}: two DDP ranks "
                         "sharing the GPU, trained and resumed")
    ap.add_argument("--json", help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS) - set(EXTRA_SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    size = SIZES["smoke" if args.smoke else "full"]
    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    backend = size["backend"] if device.type == "cpu" else "inductor"
    logging.getLogger("dipro.model.region_encoder").setLevel(logging.ERROR)  # random init is intended here
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    say(f"benchmarks/gpu.py on {name}, torch {torch.__version__}, {'smoke' if args.smoke else 'full'} sizes, "
        f"compile backend {backend}")
    t_start = time.perf_counter()
    results: dict = {"device": name, "torch": torch.__version__, "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="dipro-bench-gpu-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = make_shards(work, size) if {"shards", "train", "loader", "shared"} & set(sections) else None
        if "step" in sections:
            step_section(size, device, backend, results)
        if "memory" in sections:
            memory_section(size, device, results)
        if "train" in sections:
            train_section(size, shards, work, device, backend, results)
        if "loader" in sections:
            loader_section(size, shards, results, args.smoke)
        if "shared" in sections:
            shared_gpu_section(size, shards, work, device)
    results["wall_s"] = time.perf_counter() - t_start
    say("\nratios: " + ", ".join(f"{k}={v:.2f}" for k, v in results["ratios"].items())
        + f"; total {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
