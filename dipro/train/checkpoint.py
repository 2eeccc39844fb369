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
| ``meta.json`` | rank 0 | epoch, global step, data position, best metric, monitor value, world size |
| ``digests/rank_{r}.json`` | every rank, last | size and sha256 of every file that rank wrote |

The best checkpoint is kept apart in ``{run_dir}/best/`` (model, config, label stats,
meta: what evaluation and the registry need) and is never pruned by ``num_to_keep``.

Every file is written to a temp name and renamed; each rank stages its part in a local
directory that is removed afterwards whatever happens (:func:`staged_checkpoint`), and a
write that fails for lack of space or a size limit is one line (``StorageError``) that says
the previous checkpoints are intact.  The digests let ``--resume`` tell a truncated or
damaged file from a good one (:func:`checkpoint_problem`): it names the file and resumes
from an older checkpoint only when asked to (``--resume RUN@previous`` or
``--resume RUN@checkpoint_...``), never silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from data_sharding import atomic
from data_sharding.errors import UserError
from dipro.config import Config, from_dict, save_config

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
LABEL_STATS_FILE = "label_stats.json"
META_FILE = "meta.json"
RNG_DIR = "rng"
DIGEST_DIR = "digests"
BEST_DIR = "best"
FORMAT_VERSION = 1
PREVIOUS = "previous"
"""``--resume RUN@previous``: the complete checkpoint before RUN's newest one."""


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


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file opened here, so a failed write keeps its OSError (errno) as context."""
    with atomic.open_atomic(path, "wb") as f:
        torch.save(obj, f)


def torch_write_failed(exc: BaseException) -> bool:
    """torch's C++ writer (``torch.save`` to a path, as DeepSpeed does) reports a short write as
    ``RuntimeError: ... unexpected pos`` / ``file write failed`` without an errno."""
    return isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "file write failed" in str(exc))


@contextlib.contextmanager
def staged_checkpoint(rank: int, what: str, unchanged: str) -> Iterator[Path]:
    """A local directory for this rank's part of one checkpoint, removed afterwards whatever happens.

    A write that fails for lack of space or a file-size limit (also inside DeepSpeed or Ray's
    upload) becomes a one-line ``StorageError`` naming ``what`` and saying ``unchanged``.
    """
    local = Path(tempfile.mkdtemp(prefix=f"dipro-ckpt-r{rank}-"))
    try:
        yield local
    except BaseException as exc:
        reason = None
        if isinstance(exc, atomic.StorageError) or atomic.storage_errno(exc) is not None:
            inner = atomic.storage_error(exc, "")
            reason, where = inner.reason or str(inner), inner.path
        elif torch_write_failed(exc):
            reason, where = "a file write stopped part-way (disk full or a file-size limit?)", ""
        if reason is None:
            raise
        try:
            where = Path(where).relative_to(local).as_posix()
        except ValueError:
            pass
        raise atomic.StorageError(f"cannot write {what} (rank {rank}{', ' + where if where else ''}): {reason}; "
                                  f"{unchanged}, no temp file left. Free space or raise the limit and run again",
                                  where, reason) from exc
    finally:
        shutil.rmtree(local, ignore_errors=True)


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
    atomic.write_text(dst / LABEL_STATS_FILE, json.dumps(label_stats, indent=1))
    atomic.write_text(dst / META_FILE, json.dumps({"format": FORMAT_VERSION, **meta}, indent=1, default=float))


def replace_dir_atomically(src: Path, dst: Path) -> None:
    """Copy ``src`` to a sibling temp dir of ``dst``, then swap it into place."""
    atomic.copy_dir(src, dst, unchanged=f"{dst} keeps its previous contents")


def update_best(ckpt_dir: Path, run_dir: Path) -> None:
    """Copy the inference files of ``ckpt_dir`` to ``run_dir/best`` atomically (old best kept on failure)."""
    best = Path(run_dir) / BEST_DIR
    atomic.copy_dir(ckpt_dir, best, (MODEL_FILE, CONFIG_FILE, LABEL_STATS_FILE, META_FILE),
                    unchanged=f"the previous best checkpoint {best} is unchanged")


# ----------------------------------------------------------------------------- digests / verification

def digest_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / DIGEST_DIR / f"rank_{rank}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_digest(local: Path, rank: int) -> None:
    """Record size and sha256 of every file this rank staged in ``local`` (call it last)."""
    local = Path(local)
    files = {}
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.parent.name != DIGEST_DIR:
            files[p.relative_to(local).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    atomic.write_text(digest_file(local, rank), json.dumps({"rank": rank, "files": files}, indent=1))


def checkpoint_problem(ckpt_dir: str | Path, hashes: bool = True) -> str | None:
    """What is wrong with a checkpoint (first problem, naming the file), or None when it is whole.

    Checkpoints with digests: every rank's digest present, every file it lists present with
    the recorded size (and sha256 when ``hashes``).  Older ones without digests: the files
    :func:`is_complete` looks for.
    """
    d = Path(ckpt_dir)
    try:
        meta = read_meta(d)
    except UserError as exc:
        return str(exc)
    world = int(meta.get("world_size", 1))
    if not (d / DIGEST_DIR).is_dir():
        return None if is_complete(d) else f"{d} is incomplete (model, config or a rank's RNG file missing)"
    for r in range(world):
        df = digest_file(d, r)
        try:
            listed = json.loads(df.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{df} is missing or unreadable: rank {r}'s part of the checkpoint was not written completely"
        for rel, rec in sorted(listed.items()):
            f = d / rel
            if not f.is_file():
                return f"{f} is missing (rank {r} wrote it)"
            size = f.stat().st_size
            if size != rec["bytes"]:
                return f"{f} is truncated or damaged: {size} bytes, {rec['bytes']} were written"
            if hashes and _sha256(f) != rec["sha256"]:
                return f"{f} is damaged: its sha256 differs from the one recorded when it was written"
    return None


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
    """meta.json, model.pt, every rank's RNG file (and digest, when the checkpoint has digests) present.

    A half-uploaded checkpoint is not complete; whether its files are whole is
    :func:`checkpoint_problem`'s question.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = read_meta(ckpt_dir)
    except UserError:
        return False
    if not (ckpt_dir / MODEL_FILE).is_file() or not (ckpt_dir / CONFIG_FILE).is_file():
        return False
    ranks = range(int(meta.get("world_size", 1)))
    if (ckpt_dir / DIGEST_DIR).is_dir() and not all(digest_file(ckpt_dir, r).is_file() for r in ranks):
        return False
    return all(rng_file(ckpt_dir, r).is_file() for r in ranks)


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


# ----------------------------------------------------------------------------- fine-tuning (model.init_from)

INIT_FROM_KEYS = ("backbone", "crop_size", "d_model", "num_layers", "num_heads", "group_k",
                  "use_ehr", "use_pae", "local_fusion", "global_fusion")
"""``model.*`` keys that decide the network's parameters: a ``model.init_from`` checkpoint must agree on them."""


def check_init_from(cfg: Config) -> Path:
    """The directory ``model.init_from`` names, checked against ``cfg`` (task and the sizes of
    :data:`INIT_FROM_KEYS`); a one-line UserError naming the key otherwise. Cheap: no weights are read."""
    from data_sharding.errors import ConfigError

    p = Path(str(cfg.model.init_from))
    if p.is_file() and p.name == MODEL_FILE:
        p = p.parent
    if not (p / MODEL_FILE).is_file():
        raise UserError(f"model.init_from={cfg.model.init_from}: no {MODEL_FILE} there; expected a checkpoint "
                        "directory (a run's best/, a dipro import-authors output)")
    src = load_config_from_checkpoint(p)
    if src.task != cfg.task:
        raise ConfigError(f"model.init_from={p} holds a {src.task} model but this run's task is {cfg.task}")
    for key in INIT_FROM_KEYS:
        theirs, ours = getattr(src.model, key), getattr(cfg.model, key)
        if theirs != ours:
            raise ConfigError(f"model.init_from={p} was built with model.{key}={theirs} but this config has "
                              f"model.{key}={ours}; set model.{key}={theirs}")
    return p


def init_from_checkpoint(model: torch.nn.Module, cfg: Config) -> Path:
    """Load ``model.init_from``'s weights into ``model`` (every parameter and BatchNorm statistic) except its
    class weights, which stay those of this run's ``label_stats.json``; returns the directory."""
    p = check_init_from(cfg)
    try:
        state = torch.load(p / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file: the file's fault
        raise UserError(f"model.init_from: cannot read {p / MODEL_FILE} ({' '.join(str(exc).split())[:160]})") from None
    own = model.state_dict()
    weights = {k: v for k, v in state.items() if not k.startswith("class_weights.")}
    missing = sorted(k for k in own if k not in weights and not k.startswith("class_weights."))
    unexpected = sorted(k for k in weights if k not in own)
    shape = sorted(k for k in weights if k in own and tuple(own[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or shape:
        what = (f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model does not"
                if unexpected else f"{shape[0]} has shape {list(weights[shape[0]].shape)}, this model "
                f"{list(own[shape[0]].shape)}")
        raise UserError(f"model.init_from: {p / MODEL_FILE} does not fit the model this config builds: {what}")
    model.load_state_dict(weights, strict=False)
    return p


# ----------------------------------------------------------------------------- finding runs

def split_resume(run: str) -> tuple[str, str | None]:
    """``RUN`` -> (RUN, None); ``RUN@previous`` / ``RUN@checkpoint_...`` -> (RUN, selector)."""
    run = str(run)
    if "@" in run and not Path(run).exists():
        name, _, which = run.rpartition("@")
        if name and which:
            return name, which
    return run, None


def resolve_run_dir(storage_path: str | Path, run: str) -> Path:
    """``run`` is a run name under ``storage_path`` or a path to a run directory (``@...`` ignored)."""
    run, _ = split_resume(run)
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


_VERIFIED: set[tuple] = set()


def find_resume_checkpoint(storage_path: str | Path, resume: str) -> Path:
    """The checkpoint ``--resume`` continues from, verified file by file.

    ``RUN``: its newest complete checkpoint; ``RUN@previous``: the complete one before that;
    ``RUN@checkpoint_...``: that one.  A checkpoint whose files are truncated or damaged is
    a UserError naming the file and the older checkpoint to ask for -- never a silent fallback.
    """
    run, which = split_resume(resume)
    run_dir = resolve_run_dir(storage_path, run)
    last = find_last_checkpoint(storage_path, run)
    if which is None:
        chosen = last
    elif which == PREVIOUS:
        older = [c for c in list_checkpoints(run_dir) if c.resolve() != last.resolve()
                 and _order(c) < _order(last)]
        if not older:
            raise UserError(f"--resume {resume}: run {run!r} has no complete checkpoint before {last.name}")
        chosen = older[-1]
    else:
        chosen = run_dir / which
        if not chosen.is_dir():
            names = ", ".join(c.name for c in list_checkpoints(run_dir)) or "none"
            raise UserError(f"--resume {resume}: no checkpoint {which!r} in {run_dir} (complete ones: {names})")
    # (the CLI and the launcher both ask: hash once per process while no file changed)
    key = (str(chosen.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                                        for f in sorted(chosen.rglob("*")) if f.is_file()))
    if key not in _VERIFIED:
        problem = checkpoint_problem(chosen)
        if problem is not None:
            older = [c.name for c in list_checkpoints(run_dir) if _order(c) < _order(chosen)]
            hint = (f"resume from the one before with --resume {run}@{PREVIOUS}" if which is None and older else
                    f"pick another with --resume {run}@CHECKPOINT ({', '.join(older)})" if older else
                    "no older checkpoint of this run is complete")
            raise UserError(f"cannot resume from {chosen}: {problem}; {hint}")
        _VERIFIED.add(key)
    return chosen


def _order(ckpt_dir: Path) -> tuple[int, bool, int]:
    meta = read_meta(ckpt_dir)
    return int(meta.get("global_step", 0)), meta.get("kind") == "epoch", int(meta.get("epoch", 0))
