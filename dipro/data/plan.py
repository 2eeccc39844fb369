"""Epoch plan: which samples of which shards each (rank, loader worker) reads, and how many steps.

Everything here is a pure function of the manifest and (seed, epoch, rank,
world_size, worker, num_workers), so every rank computes the same global plan
without talking to the others.

Training (open_clip style, but exact instead of resampled):

1. the split's shards are shuffled with ``Random((seed, epoch))`` -- the same
   permutation on every rank -- *before* any splitting;
2. the shuffled shards are laid end to end as one virtual sequence of
   ``N`` samples (counts from ``manifest.parquet``), and each rank takes a
   contiguous ``1/world_size`` of it, each loader worker a contiguous part of
   its rank's range proportional to the batches it must produce.  Splitting
   samples rather than whole shards keeps every stream busy even with fewer
   shards than ``world_size * num_workers`` and whatever the shard sizes;
3. ``steps = floor(N / (batch_size * world_size))`` (or ``steps_per_epoch``)
   is the same on every rank; each worker yields exactly its share of it and
   repeats its range when it runs short (``with_epoch`` semantics), so DDP
   never waits on a rank that ran dry.

Evaluation: the shards in manifest order form a sequence of global sample
indices; rank ``r`` reads the contiguous block :func:`eval_index_for_rank`
(each sample exactly once over all ranks, nothing padded, counts differ by at
most one), its loader workers split that block on batch boundaries.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data_sharding.constants import SPLITS, TASK_TO_SHARD_DIR
from data_sharding.errors import ConfigError, DataError


@dataclass(frozen=True)
class ShardInfo:
    """One shard of the manifest: ``path`` its location (an absolute path or an ``s3://`` / ``gs://``
    URI), ``rel`` as in the manifest."""

    path: str
    rel: str
    samples: int
    bytes: int = 0
    """Size of the object (on a bucket: from the listing the plan made; locally: the manifest's)."""
    token: str = ""
    """Version of the object the plan saw (ETag / generation; empty locally): the shard cache's key."""
    sha256: str = ""
    """The manifest's digest of the shard (a cache copy is kept only when its bytes match it)."""
    offsets: tuple[int, ...] = ()
    """The manifest's byte offset of each sample and of the samples' end (``samples + 1`` values), or
    empty (a manifest written before they were recorded): where a segment's bytes begin and end."""

    def span(self, start: int, stop: int) -> tuple[int, int] | None:
        """Bytes ``[begin, end)`` of samples ``[start, stop)``, when the manifest recorded offsets."""
        if len(self.offsets) != self.samples + 1 or not 0 <= start <= stop <= self.samples:
            return None
        return self.offsets[start], self.offsets[stop]


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (ordinal positions inside the tar) of one shard."""

    shard: ShardInfo
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardSet:
    """The shards of one (task directory, split), in manifest (path) order."""

    shard_dir: str
    task_dir: str
    split: str
    shards: tuple[ShardInfo, ...]
    settings: dict

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


def read_manifest(shard_dir: str | Path, task: str, split: str) -> ShardSet:
    """The shard list of ``task``/``split`` from ``shard_dir/manifest.parquet`` (a local directory or
    an ``s3://`` / ``gs://`` prefix: :mod:`data_sharding.storage`).

    Reading and validating the manifest is :func:`data_sharding.manifest.read_manifest`'s
    job (DataError naming it when it is missing or malformed); here the rows of one split
    are selected and their shards checked to exist: locally one ``stat`` per file, on a
    bucket one listing of the shards' prefix (:func:`_listed_objects`), never a request per shard.
    """
    from data_sharding import storage
    from data_sharding.manifest import manifest_path
    from data_sharding.manifest import read_manifest as read_shard_manifest

    if task not in TASK_TO_SHARD_DIR:
        raise ConfigError(f"unknown task {task!r}: expected one of {', '.join(TASK_TO_SHARD_DIR)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    root = storage.resolve(shard_dir)
    manifest = manifest_path(root)
    task_dir = TASK_TO_SHARD_DIR[task]
    chosen = sorted((r for r in read_shard_manifest(root).records if r.task in (task_dir, task) and r.split == split),
                    key=lambda r: r.path)
    if not chosen:
        raise DataError(f"shard manifest {manifest} lists no {task_dir!r} shards for split {split!r}")
    listed = _listed_objects(root, [r.path for r in chosen]) if root.is_remote else None
    shards = []
    for r in chosen:
        loc = root / r.path
        samples = int(r.samples)
        if samples < 0:
            raise DataError(f"shard manifest {manifest}: shard {r.path} has a negative sample count {samples}")
        if listed is None:
            if not loc.local.is_file():
                raise DataError(f"shard {loc} is listed in {manifest} but does not exist "
                                f"(run `dipro shards verify {root}`)")
            size, token = int(r.bytes or 0), ""
        else:
            info = listed.get(r.path)
            if info is None:
                raise DataError(f"shard {loc} is listed in {manifest} but no such object exists "
                                f"(run `dipro shards verify {root}`)")
            size, token = info.size, info.token
        offsets = tuple(int(o) for o in (r.offsets or ()))
        if offsets and len(offsets) != samples + 1:
            raise DataError(f"shard manifest {manifest}: shard {r.path} records {len(offsets)} sample offsets for "
                            f"{samples} samples, expected {samples + 1} (cut the shards again with `dipro shard`)")
        if offsets and list(offsets) != sorted(offsets):
            raise DataError(f"shard manifest {manifest}: shard {r.path} records sample offsets out of order "
                            f"(cut the shards again with `dipro shard`)")
        shards.append(ShardInfo(path=loc.uri, rel=str(r.path), samples=samples, bytes=size, token=token,
                                sha256=str(r.sha256 or ""), offsets=offsets))
    settings: dict = {}
    if chosen[0].settings:
        try:
            settings = json.loads(chosen[0].settings)
        except (TypeError, ValueError):
            raise DataError(f"shard manifest {manifest}: settings of {chosen[0].path} is not JSON: {chosen[0].settings!r}") from None
    return ShardSet(root.uri, task_dir, split, tuple(shards), settings if isinstance(settings, dict) else {})


def _listed_objects(root, rels: list[str]) -> dict:
    """manifest path -> :class:`data_sharding.storage.ObjectInfo` of the objects under the folders
    that hold ``rels`` (one paginated listing per folder, normally one: the task's)."""
    found = {}
    for folder in sorted({str(PurePosixPath(rel).parent) for rel in rels}):
        base = root if folder in ("", ".") else root / folder
        for info in base.list():
            found[info.path if base is root else f"{folder}/{info.path}"] = info
    return found


# ----------------------------------------------------------------------------- shared helpers

def stream_seed(seed: int, epoch: int, rank: int, worker: int, purpose: str) -> int:
    """A 63-bit seed for one stream and purpose, stable across Python processes (no ``hash()``)."""
    return random.Random(f"{seed}/{epoch}/{rank}/{worker}/{purpose}").getrandbits(63)


def shuffled_shards(shards: tuple[ShardInfo, ...], seed: int, epoch: int) -> list[ShardInfo]:
    """Shard order of one training epoch: identical on every rank for the same (seed, epoch)."""
    order = list(shards)
    random.Random(f"{seed}/{epoch}/shards").shuffle(order)
    return order


def segments_for_range(shards: list[ShardInfo] | tuple[ShardInfo, ...], start: int, stop: int) -> list[Segment]:
    """Cut the global sample range ``[start, stop)`` of shards laid end to end into per-shard segments."""
    out: list[Segment] = []
    offset = 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.samples)
        if lo < hi:
            out.append(Segment(shard, lo - offset, hi - offset))
        offset += shard.samples
        if offset >= stop:
            break
    return out


def _block(n: int, part: int, parts: int) -> tuple[int, int]:
    """``[start, stop)`` of block ``part`` when ``n`` items are cut into ``parts`` contiguous blocks."""
    return (n * part) // parts, (n * (part + 1)) // parts


# ----------------------------------------------------------------------------- training

def train_num_steps(num_samples: int, batch_size: int, world_size: int, steps_per_epoch: int | None = None) -> int:
    """Steps every rank runs in a training epoch: ``floor(N / (B * W))`` unless given explicitly."""
    if steps_per_epoch is not None:
        if steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        return int(steps_per_epoch)
    steps = num_samples // (batch_size * world_size)
    if steps < 1:
        raise ConfigError(
            f"{num_samples} training samples cannot fill one batch of {batch_size} on each of {world_size} rank(s); "
            "lower data.batch_size or trainer.num_workers"
        )
    return steps


def worker_share(steps: int, worker: int, num_workers: int) -> tuple[int, int]:
    """``(first_step, num_steps)`` of ``worker``: steps dealt out as evenly as possible, lower workers first."""
    base, extra = divmod(steps, num_workers)
    first = worker * base + min(worker, extra)
    return first, base + (1 if worker < extra else 0)


def train_segments(
    shard_set: ShardSet, *, seed: int, epoch: int, rank: int, world_size: int,
    worker: int, num_workers: int, steps: int,
) -> list[Segment]:
    """One pass of the training samples assigned to (rank, worker) in ``epoch``.

    The worker's part of its rank's block is proportional to the steps it must
    produce; the pipeline repeats the pass if corrupt samples or rounding leave
    it short of ``steps_of_worker * batch_size`` samples.
    """
    order = shuffled_shards(shard_set.shards, seed, epoch)
    r_lo, r_hi = _block(shard_set.num_samples, rank, world_size)
    n_rank = r_hi - r_lo
    first, count = worker_share(steps, worker, num_workers)
    if count == 0:
        return []
    lo = r_lo + (n_rank * first) // steps
    hi = r_lo + (n_rank * (first + count)) // steps
    return segments_for_range(order, lo, hi)


# ----------------------------------------------------------------------------- evaluation

def eval_index_for_rank(num_samples: int, rank: int, world_size: int) -> range:
    """Global sample indices (manifest order) that ``rank`` evaluates: a contiguous block.

    Over ranks ``0..world_size-1`` the blocks partition ``range(num_samples)``;
    sizes differ by at most one and nothing is padded.  The training loop
    gathers per-rank predictions with a padding-aware ``all_gather`` (pad to the
    largest rank count, gather, drop the padding using the gathered counts).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    return range(*_block(num_samples, rank, world_size))


def eval_num_steps(num_samples: int, batch_size: int, rank: int, world_size: int, num_workers: int = 1) -> int:
    """Batches ``rank`` yields in evaluation (exact when no sample is corrupt)."""
    return sum(
        math.ceil(len(r) / batch_size) if len(r) else 0
        for r in (_eval_worker_range(num_samples, batch_size, rank, world_size, w, num_workers) for w in range(num_workers))
    )


def _eval_worker_range(num_samples: int, batch_size: int, rank: int, world_size: int, worker: int, num_workers: int) -> range:
    block = eval_index_for_rank(num_samples, rank, world_size)
    n_batches = math.ceil(len(block) / batch_size)
    b_lo, b_hi = _block(n_batches, worker, num_workers)
    lo = block.start + b_lo * batch_size
    hi = min(block.stop, block.start + b_hi * batch_size)
    return range(lo, max(lo, hi))


def eval_segments(shard_set: ShardSet, *, batch_size: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[Segment]:
    """The evaluation samples of (rank, worker): whole batches of the rank's block, in manifest order."""
    r = _eval_worker_range(shard_set.num_samples, batch_size, rank, world_size, worker, num_workers)
    return segments_for_range(shard_set.shards, r.start, r.stop)
