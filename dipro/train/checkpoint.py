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

Run directories live on ``trainer.storage_path``: a local (or NFS) directory, or an ``s3://`` /
``gs://`` prefix (:mod:`data_sharding.storage`; Ray Train uploads each rank's staged files there).
Everything here that reads a checkpoint takes a path or a URI and reads through the storage layer:
the digests are checked against the objects' sizes (one listing) and bytes, exactly as against
files, with the same one-line messages.  ``best/`` is replaced atomically either way: locally by a
directory swap; on a bucket, which has no rename, the files go under a new generation
``best/{generation}/`` and the small pointer ``best/current.json`` naming it is written last (one
PUT), so a reader (:func:`checkpoint_location`) sees the old best or the new one, never a mixture.

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
import io
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np
import torch

from data_sharding import atomic, storage
from data_sharding.errors import UserError
from data_sharding.storage import Location
from dipro.config import Config, from_dict, save_config

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
LABEL_STATS_FILE = "label_stats.json"
META_FILE = "meta.json"
RNG_DIR = "rng"
DIGEST_DIR = "digests"
BEST_DIR = "best"
BEST_POINTER = "current.json"
"""On a bucket: ``best/current.json`` names the generation directory under ``best/`` that is the best checkpoint."""
BEST_FILES = ("model.pt", "config.yaml", "label_stats.json", "meta.json")
"""What ``best/`` holds: the inference part of a checkpoint (meta.json last)."""
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


def update_best(ckpt_dir: str | Path | Location, run_dir: str | Path | Location) -> None:
    """Copy the inference files of ``ckpt_dir`` to ``run_dir/best`` atomically (old best kept on failure).

    Locally a directory swap; on a bucket a new generation under ``best/`` and then the pointer
    ``best/current.json`` (module docstring).  ``ckpt_dir`` may itself be local or on a bucket (a resumed
    run copies its predecessor's best).
    """
    best = storage.resolve(run_dir) / BEST_DIR
    src = checkpoint_location(ckpt_dir)
    unchanged = f"the previous best checkpoint {best} is unchanged"
    if not best.is_remote:
        with local_checkpoint(src) as local_src:
            atomic.copy_dir(local_src, best.local, BEST_FILES, unchanged=unchanged)
        return
    generation = storage.new_generation()
    try:
        for name in BEST_FILES:
            copy_object(src / name, best / generation / name)
        previous = _best_generation(best)
        (best / BEST_POINTER).write_text(json.dumps({"generation": generation, "files": list(BEST_FILES)}) + "\n")
    except storage.StorageAccessError as exc:
        raise storage.StorageAccessError(f"{exc}; {unchanged}") from None
    # Generations before the previous one: no reader plans from them any more (one that read the
    # previous pointer a moment ago may still be reading the previous generation: it stays).
    keep = {generation, previous, BEST_POINTER}
    for top in sorted({info.path.split("/", 1)[0] for info in best.list()} - keep):
        (best / top).remove_tree()


def copy_object(src: Location, dst: Location) -> None:
    """Stream one file/object to another place (either may be local or on a bucket)."""
    with src.open_input() as fin, dst.open_output() as fout:
        for block in iter(lambda: fin.read(storage.CHUNK_BYTES), b""):
            fout.write(block)


def _best_generation(best: Location) -> str | None:
    """The generation ``best/current.json`` names, or None (no pointer: a plain directory, or none yet)."""
    try:
        return str(json.loads((best / BEST_POINTER).read_text())["generation"])
    except (storage.NotFound, NotADirectoryError):
        return None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{best / BEST_POINTER} is not a best-checkpoint pointer "
                        "({\"generation\": ...} expected)") from None


def checkpoint_location(path: str | Path | Location) -> Location:
    """Where a checkpoint's files are: ``path`` itself (a ``checkpoint_*`` dir, a local ``best/``, or the
    directory of a given ``model.pt``), or on a bucket the generation its ``best/current.json`` names."""
    loc = storage.resolve(path)
    if loc.name == MODEL_FILE:
        loc = loc.parent
    generation = _best_generation(loc)
    return loc / generation if generation else loc


@contextlib.contextmanager
def local_checkpoint(path: str | Path | Location, names: tuple[str, ...] | None = None) -> Iterator[Path]:
    """The checkpoint as a local directory: itself when local, else a download removed afterwards.

    ``names``: download only these files (those present), e.g. the inference files of a ``checkpoint_*``
    directory that also holds optimizer and DeepSpeed state.
    """
    loc = checkpoint_location(path)
    if not loc.is_remote:
        yield loc.local
        return
    tmp = Path(tempfile.mkdtemp(prefix="dipro-ckpt-download-"))
    try:
        if names is None:
            loc.download_dir(tmp)
        else:
            for name in names:
                with contextlib.suppress(storage.NotFound):
                    copy_object(loc / name, storage.resolve(tmp / name))
        if not any(tmp.iterdir()):
            raise UserError(f"not a dipro checkpoint (nothing under {loc})")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- digests / verification

def digest_file(ckpt_dir: Path, rank: int) -> Path:
    return Path(ckpt_dir) / DIGEST_DIR / f"rank_{rank}.json"


def _sha256(path: Path | Location) -> str:
    h = hashlib.sha256()
    with storage.resolve(path).open_input() as f:
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


def checkpoint_problem(ckpt_dir: str | Path | Location, hashes: bool = True) -> str | None:
    """What is wrong with a checkpoint (first problem, naming the file), or None when it is whole.

    Checkpoints with digests: every rank's digest present, every file it lists present with
    the recorded size (and sha256 when ``hashes``).  Older ones without digests: the files
    :func:`is_complete` looks for.  On a bucket the sizes come from one listing and the hashes
    from reading the objects: the same checks, the same messages.
    """
    d = storage.resolve(ckpt_dir)
    try:
        meta = read_meta(d)
    except UserError as exc:
        return str(exc)
    world = int(meta.get("world_size", 1))
    files = {info.path: info for info in d.list()}
    if not any(rel.startswith(DIGEST_DIR + "/") for rel in files):
        return None if _complete(files, meta) else f"{d} is incomplete (model, config or a rank's RNG file missing)"
    for r in range(world):
        df = d / _digest_rel(r)
        try:
            listed = json.loads(df.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):  # storage.NotFound is an OSError too
            return f"{df} is missing or unreadable: rank {r}'s part of the checkpoint was not written completely"
        for rel, rec in sorted(listed.items()):
            f = d / rel
            if rel not in files:
                return f"{f} is missing (rank {r} wrote it)"
            size = files[rel].size
            if size != rec["bytes"]:
                return f"{f} is truncated or damaged: {size} bytes, {rec['bytes']} were written"
            if hashes and _sha256(f) != rec["sha256"]:
                return f"{f} is damaged: its sha256 differs from the one recorded when it was written"
    return None


def _digest_rel(rank: int) -> str:
    return f"{DIGEST_DIR}/rank_{rank}.json"


def _complete(files, meta: dict[str, Any]) -> bool:
    """model, config, every rank's RNG file (and digest, when the checkpoint has digests) among ``files``
    (relative posix paths)."""
    if MODEL_FILE not in files or CONFIG_FILE not in files:
        return False
    ranks = range(int(meta.get("world_size", 1)))
    if any(rel.startswith(DIGEST_DIR + "/") for rel in files) and not all(_digest_rel(r) in files for r in ranks):
        return False
    return all(f"{RNG_DIR}/rank_{r}.pt" in files for r in ranks)


def read_meta(ckpt_dir: str | Path | Location) -> dict[str, Any]:
    p = storage.resolve(ckpt_dir) / META_FILE
    try:
        text = p.read_text()
    except (storage.NotFound, NotADirectoryError):
        raise UserError(f"not a dipro checkpoint (no {META_FILE}): {ckpt_dir}") from None
    except IsADirectoryError:
        raise UserError(f"not a dipro checkpoint ({META_FILE} is a directory): {ckpt_dir}") from None
    try:
        return json.loads(text)
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


def is_complete(ckpt_dir: str | Path | Location) -> bool:
    """meta.json, model.pt, every rank's RNG file (and digest, when the checkpoint has digests) present.

    A half-uploaded checkpoint is not complete; whether its files are whole is
    :func:`checkpoint_problem`'s question.
    """
    d = storage.resolve(ckpt_dir)
    try:
        meta = read_meta(d)
    except UserError:
        return False
    return _complete({info.path for info in d.list()}, meta)


def _read_checkpoint_text(ckpt_dir: Location, name: str) -> str:
    try:
        return (ckpt_dir / name).read_text()
    except storage.NotFound:
        raise UserError(f"checkpoint {ckpt_dir} has no {name}") from None


def read_label_stats(ckpt_dir: str | Path | Location) -> dict:
    return json.loads(_read_checkpoint_text(checkpoint_location(ckpt_dir), LABEL_STATS_FILE))


def load_config_from_checkpoint(ckpt_dir: str | Path | Location) -> Config:
    import yaml

    return from_dict(yaml.safe_load(_read_checkpoint_text(checkpoint_location(ckpt_dir), CONFIG_FILE)) or {})


def load_model(path: str | Path | Location, device: str | torch.device = "cpu",
               build_model: Callable[[Config, dict], torch.nn.Module] | None = None
               ) -> tuple[torch.nn.Module, Config]:
    """Rebuild the network from a checkpoint's config and load its float32 weights.

    ``path`` is a checkpoint directory (a run's ``best/``, a ``checkpoint_*`` dir) or its
    ``model.pt``, local or on a bucket. The state dict is read with ``weights_only=True`` (no pickled code).
    """
    p = checkpoint_location(path)
    weights = p / MODEL_FILE
    if not weights.exists():
        raise UserError(f"no {MODEL_FILE} in checkpoint directory {p}")
    cfg = load_config_from_checkpoint(p)
    label_stats = read_label_stats(p)
    if build_model is None:
        from dipro.model import build_model as _build

        model = _build(cfg, label_stats, load_pretrained=False)  # weights come from model.pt
    else:
        model = build_model(cfg, label_stats)
    source = io.BytesIO(weights.read_bytes()) if weights.is_remote else weights.local
    state = torch.load(source, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{weights} does not match the model its config.yaml describes: {exc}") from None
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
    if "@" in run and not (not storage.is_remote(run) and Path(run).exists()):
        name, _, which = run.rpartition("@")
        if name and which:
            return name, which
    return run, None


def resolve_run_dir(storage_path: str | Path | Location, run: str) -> Location:
    """``run`` is a run name under ``storage_path``, a path to a run directory or a run's URI (``@...`` ignored)."""
    run, _ = split_resume(run)
    root = storage.resolve(storage_path)
    candidates = [storage.resolve(run)]
    if not storage.is_remote(run):
        with contextlib.suppress(ValueError):  # an absolute path or one with '..' is not a name under the root
            candidates.append(root / run)
    for c in candidates:
        if c.is_dir():
            return c
    raise UserError(f"run {run!r} not found (looked for {candidates[-1]}"
                    + (f" and ./{run})" if len(candidates) > 1 else ")"))


def list_checkpoints(run_dir: str | Path | Location) -> list[Location]:
    """Complete ``checkpoint_*`` directories, oldest first (by global step, epoch end last).

    One listing of the run directory (on a bucket: one paginated request), then each candidate's meta.json.
    """
    root = storage.resolve(run_dir)
    contents: dict[str, set[str]] = {}
    for info in root.list():
        top, sep, rest = info.path.partition("/")
        if sep and top.startswith("checkpoint_"):
            contents.setdefault(top, set()).add(rest)
    found = []
    for name, files in contents.items():
        d = root / name
        try:
            meta = read_meta(d)
        except UserError:
            continue
        if _complete(files, meta):
            found.append(((int(meta.get("global_step", 0)), meta.get("kind") == "epoch",
                           int(meta.get("epoch", 0))), d))
    return [d for _, d in sorted(found, key=lambda item: item[0])]


def find_last_checkpoint(storage_path: str | Path | Location, run: str) -> Location:
    """The newest complete checkpoint of ``run``: Ray's own record first, then a scan."""
    run_dir = resolve_run_dir(storage_path, run)
    try:
        from ray.train import Result

        ckpt = Result.from_path(run_dir.fs_path, storage_filesystem=run_dir.fs).checkpoint
        if ckpt is not None:
            last = run_dir / PurePosixPath(ckpt.path).name
            if is_complete(last):
                return last
    except Exception:  # no or unreadable snapshot (driver killed early): fall back to a scan
        pass
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise UserError(f"run {run!r} ({run_dir}) has no complete checkpoint to resume from")
    return ckpts[-1]


_VERIFIED: set[tuple] = set()


def find_resume_checkpoint(storage_path: str | Path | Location, resume: str) -> Location:
    """The checkpoint ``--resume`` continues from, verified file by file (object by object on a bucket).

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
        older = [c for c in list_checkpoints(run_dir) if c != last and _order(c) < _order(last)]
        if not older:
            raise UserError(f"--resume {resume}: run {run!r} has no complete checkpoint before {last.name}")
        chosen = older[-1]
    else:
        chosen = run_dir / which
        if not chosen.is_dir():
            names = ", ".join(c.name for c in list_checkpoints(run_dir)) or "none"
            raise UserError(f"--resume {resume}: no checkpoint {which!r} in {run_dir} (complete ones: {names})")
    # (the CLI and the launcher both ask: hash once per process while no file changed)
    key = (chosen.uri, tuple((info.path, info.size, info.token) for info in chosen.list()))
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


def _order(ckpt_dir: Location) -> tuple[int, bool, int]:
    meta = read_meta(ckpt_dir)
    return int(meta.get("global_step", 0)), meta.get("kind") == "epoch", int(meta.get("epoch", 0))
