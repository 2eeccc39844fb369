"""Checkpoints (docs/ARCHITECTURE.md section 6): everything needed to continue exactly.

A checkpoint directory (a Ray ``Checkpoint``; every rank contributes its files and Ray
merges them in storage) holds:

| file | written by | content |
|---|---|---|
| ``model.pt`` | rank 0 | plain float32 state dict, ``torch.load(weights_only=True)``; consolidated under ZeRO-3 |
| ``config.yaml`` | rank 0 | the resolved run config |
| ``label_stats.json`` | rank 0 | train label counts (class weights are rebuilt from them) |
| ``train_state.pt`` | rank 0 (DDP) | optimizer, scheduler, GradScaler |
| ``deepspeed/`` | every rank (DeepSpeed) | DeepSpeed's own format: partitions, optimizer, scheduler |
| ``rng/rank_{r}.pt`` | every rank | python, numpy, torch (and CUDA) RNG states |
| ``meta.json`` | rank 0, last | epoch, global step, data position, best metric, monitor value, world size |

The best checkpoint is kept apart in ``{run_dir}/best/`` (model, config, label stats,
meta: what evaluation and the registry need) and is never pruned by ``num_to_keep``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dipro.config import Config, from_dict, save_config
from data_sharding.errors import UserError

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
LABEL_STATS_FILE = "label_stats.json"
META_FILE = "meta.json"
RNG_DIR = "rng"
BEST_DIR = "best"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where the loop is, and the early-stopping bookkeeping."""

    epoch: int = 0
    """Epoch in progress (or the next one to start)."""
    global_step: int = 0
    """Optimizer steps completed."""
    batches_in_epoch: int = 0
    """Data position: micro batches of ``epoch`` already consumed (0 at an epoch boundary)."""
    best_value: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    """Epochs since the monitor last improved (early stopping at ``trainer.patience``)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-epoch summary (train loss, val metrics, lr)."""


# ----------------------------------------------------------------------------- atomic writes

def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """This process's RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / RNG_DIR / f"rank_{rank}.pt"


# ----------------------------------------------------------------------------- write / read

def write_model_files(dst: Path, model_state: dict[str, torch.Tensor], cfg: Config,
                      label_stats: dict, meta: dict[str, Any]) -> None:
    """The inference part of a checkpoint (what :func:`load_model` reads); meta.json last."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model_state, dst / MODEL_FILE)
    save_config(cfg, dst / CONFIG_FILE)
    atomic_write_text(dst / LABEL_STATS_FILE, json.dumps(label_stats, indent=1))
    atomic_write_text(dst / META_FILE, json.dumps({"format": FORMAT_VERSION, **meta}, indent=1, default=float))


def replace_dir_atomically(src: Path, dst: Path) -> None:
    """Copy ``src`` to a sibling temp dir of ``dst``, then swap it into place."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    p = Path(ckpt_dir) / META_FILE
    if not p.is_file():
        raise UserError(f"not a dipro checkpoint (no {META_FILE}): {ckpt_dir}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint metadata {p} is not valid JSON: {exc}") from None


def state_from_meta(meta: dict[str, Any]) -> TrainState:
    keys = TrainState.__dataclass_fields__.keys()
    return TrainState(**{k: meta[k] for k in keys if k in meta})


def rescale_data_position(batches_in_epoch: int, saved_world: int, world: int, accum: int, used_micro: int) -> int:
    """Micro batches per rank already consumed, for a group of ``world`` ranks resuming a checkpoint
    written by ``saved_world`` ranks (an elastic group that shrank or grew).

    Every rank reads ``1/world`` of the epoch, so ``batches_in_epoch * saved_world`` micro batches
    (of one rank's size) were consumed over all ranks; the new group skips that many divided by
    ``world``, rounded down to a whole optimizer step (``accum`` micro batches) and capped at
    ``used_micro`` (the micro batches a rank uses per epoch).  What is kept is how much of the
    epoch is left (rounding down redoes less than one step rather than dropping any); which
    samples are left is not, because the epoch's blocks are cut anew for the new world size
    (dipro/data/plan.py).
    """
    consumed = batches_in_epoch * saved_world // world
    return min((consumed // accum) * accum, used_micro)


def meta_from_state(state: TrainState, **extra: Any) -> dict[str, Any]:
    return {**asdict(state), **extra}


def is_complete(ckpt_dir: Path) -> bool:
    """meta.json, model.pt and every rank's RNG file present (a half-uploaded one is not)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = read_meta(ckpt_dir)
    except UserError:
        return False
    if not (ckpt_dir / MODEL_FILE).is_file() or not (ckpt_dir / CONFIG_FILE).is_file():
        return False
    return all(rng_file(ckpt_dir, r).is_file() for r in range(int(meta.get("world_size", 1))))


def read_label_stats(ckpt_dir: Path) -> dict:
    p = Path(ckpt_dir) / LABEL_STATS_FILE
    if not p.is_file():
        raise UserError(f"checkpoint {ckpt_dir} has no {LABEL_STATS_FILE}")
    return json.loads(p.read_text())


def load_config_from_checkpoint(ckpt_dir: str | Path) -> Config:
    import yaml

    p = Path(ckpt_dir) / CONFIG_FILE
    if not p.is_file():
        raise UserError(f"checkpoint {ckpt_dir} has no {CONFIG_FILE}")
    return from_dict(yaml.safe_load(p.read_text()) or {})


def load_model(path: str | Path, device: str | torch.device = "cpu",
               build_model: Callable[[Config, dict], torch.nn.Module] | None = None
               ) -> tuple[torch.nn.Module, Config]:
    """Rebuild the network from a checkpoint's config and load its float32 weights.

    ``path`` is a checkpoint directory (a run's ``best/``, a ``checkpoint_*`` dir) or its
    ``model.pt``. The state dict is read with ``weights_only=True`` (no pickled code).
    """
    p = Path(path)
    if p.is_file() and p.name == MODEL_FILE:
        p = p.parent
    if not (p / MODEL_FILE).is_file():
        raise UserError(f"no {MODEL_FILE} in checkpoint directory {p}")
    cfg = load_config_from_checkpoint(p)
    label_stats = read_label_stats(p)
    if build_model is None:
        from dipro.model import build_model as _build

        model = _build(cfg, label_stats, load_pretrained=False)  # weights come from model.pt
    else:
        model = build_model(cfg, label_stats)
    state = torch.load(p / MODEL_FILE, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{p / MODEL_FILE} does not match the model its config.yaml describes: {exc}") from None
    model.to(device)
    model.eval()
    return model, cfg


# ----------------------------------------------------------------------------- finding runs

def resolve_run_dir(storage_path: str | Path, run: str) -> Path:
    """``run`` is a run name under ``storage_path`` or a path to a run directory."""
    candidates = [Path(run), Path(storage_path) / run]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise UserError(f"run {run!r} not found (looked for {candidates[1]} and ./{run})")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete ``checkpoint_*`` directories, oldest first (by global step, epoch end last)."""
    found = []
    for d in Path(run_dir).glob("checkpoint_*"):
        if d.is_dir() and is_complete(d):
            meta = read_meta(d)
            found.append(((int(meta.get("global_step", 0)), meta.get("kind") == "epoch",
                           int(meta.get("epoch", 0))), d))
    return [d for _, d in sorted(found)]


def find_last_checkpoint(storage_path: str | Path, run: str) -> Path:
    """The newest complete checkpoint of ``run``: Ray's own record first, then a scan."""
    run_dir = resolve_run_dir(storage_path, run)
    try:
        from ray.train import Result

        ckpt = Result.from_path(str(run_dir)).checkpoint
        if ckpt is not None and is_complete(Path(ckpt.path)):
            return Path(ckpt.path)
    except Exception:  # no or unreadable snapshot (driver killed early): fall back to a scan
        pass
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise UserError(f"run {run!r} ({run_dir}) has no complete checkpoint to resume from")
    return ckpts[-1]
