"""The sample pipeline of one (rank, loader worker) stream, as named stages.

Modelled on open_clip's ``src/open_clip_train/data.py``::

    plan -> read -> shuffle -> decode -> select_cxrs -> augment -> batch -> with_epoch
    (train only: shuffle, augment, with_epoch)

* ``plan``: the epoch's segments for this stream (:mod:`dipro.data.plan`):
  shards shuffled with (seed, epoch) identically on every rank, then split by
  rank ("node") and by loader worker -- the split is explicit, so nothing
  depends on WebDataset's default node splitter.  Training repeats the pass
  (``with_epoch`` semantics); evaluation reads it once.
* ``read``: tar members grouped into samples (:mod:`dipro.data.reader`), each shard opened
  through the storage layer (a local file, a bucket stream, or the node's shard cache).
* ``shuffle``: a sample shuffle buffer bounded in samples and bytes, each loader worker
  holding its share of the rank's budget, seeded per (seed, epoch, rank, worker)
  (:mod:`dipro.data.shuffle`).
* ``decode``: members -> validated arrays; a corrupt sample becomes a
  :class:`~dipro.data.reader.Skipped` record that flows on to ``batch``.
* ``augment``: per-sample transform parameters (applied to the crops on the device).
* ``batch``: padding and masks (:func:`dipro.data.collate.collate_arrays`); in a
  worker the crops are written into a reused shared-memory slot and travel as
  its number (:mod:`dipro.data.transport`), the rest as small numpy arrays
  that the main process turns into tensors; each batch carries
  ``num_corrupt``, the samples skipped since the previous batch of the stream,
  and ``io_counts``, this process's storage and cache counters since then
  (:func:`io_snapshot`: retries, requests, bytes, cache hits ...), so the main
  process can count both across worker processes.
* ``with_epoch``: exactly this worker's share of the rank's steps.

The epoch lives on the dataset object (``set_epoch`` before each ``iter``);
the loader does not use persistent workers, so every epoch's workers receive it.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from dipro.data.augment import AugmentConfig, draw_augmentation
from dipro.data.collate import collate_arrays
from dipro.data.decode import CorruptSample, decode_sample, select_cxrs
from dipro.data.plan import ShardSet, eval_segments, stream_seed, train_segments, worker_share
from dipro.data.reader import Skipped, open_segment, read_segment
from dipro.data.shuffle import bounded_shuffle, worker_budget
from dipro.data.transport import CropSlots, WorkerCropPool, new_shared_uint8
from data_sharding.errors import DataError

MAX_NOTES_PER_BATCH = 8  # corrupt-sample descriptions carried per batch (the count is always exact)


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader worker needs to build its stream (picklable)."""

    shard_set: ShardSet
    train: bool
    batch_size: int
    steps: int
    """Training: steps of every rank per epoch.  Evaluation: unused (0)."""
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    """Streams per rank (DataLoader workers, or 1 for in-process loading)."""
    shuffle: bool = True
    shuffle_buffer: int = 256
    """Shuffle buffer bound of the rank in samples (split over its loader workers)."""
    shuffle_bytes: int = 256 * 2**20
    """Shuffle buffer bound of the rank in bytes of raw samples (split over its loader workers)."""
    augment: bool = False
    augment_cfg: AugmentConfig = field(default_factory=AugmentConfig)
    max_cxrs: int = 14
    last_cxr_only: bool = False
    crop_size: int | None = None
    cache_dir: str | None = None
    """Local shard cache of bucket shards (:mod:`dipro.data.shard_cache`); None = stream only."""
    cache_max_bytes: int = 0


@dataclass(frozen=True)
class StreamContext:
    """Identity of one stream: the spec plus epoch and loader worker."""

    spec: LoaderSpec
    epoch: int
    worker: int
    in_worker: bool = False
    """Running in a DataLoader worker process (batches cross to the main process)."""
    crop_pool: WorkerCropPool | None = None

    def seed(self, purpose: str) -> int:
        return stream_seed(self.spec.seed, self.epoch, self.spec.rank, self.worker, purpose)

    @property
    def worker_steps(self) -> int:
        return worker_share(self.spec.steps, self.worker, self.spec.num_workers)[1]


Stage = Callable[[Iterator[Any] | None, StreamContext], Iterator[Any]]


def io_snapshot() -> dict[str, int]:
    """This process's storage-layer counters (``storage_retries``, ``storage_requests``,
    ``storage_bytes_read``) and shard-cache counters (``cache_hits`` ...): batches carry their
    deltas, since a loader worker's counters live in its own process (a forked worker starts
    with a copy of its parent's)."""
    from data_sharding import storage
    from dipro.data import shard_cache

    out = {f"storage_{k}": v for k, v in storage.counters().items()}
    out.update(shard_cache.counters())
    return out


# ----------------------------------------------------------------------------- stages

def plan_stage(_: None, ctx: StreamContext) -> Iterator[Any]:
    """Segments of this stream; training cycles through them until ``with_epoch`` has enough batches."""
    spec = ctx.spec
    if spec.train:
        segments = train_segments(spec.shard_set, seed=spec.seed, epoch=ctx.epoch, rank=spec.rank,
                                  world_size=spec.world_size, worker=ctx.worker, num_workers=spec.num_workers,
                                  steps=spec.steps)
        if segments:
            yield from itertools.cycle(segments)
    else:
        yield from eval_segments(spec.shard_set, batch_size=spec.batch_size, rank=spec.rank,
                                 world_size=spec.world_size, worker=ctx.worker, num_workers=spec.num_workers)


def read_stage(segments: Iterator[Any], ctx: StreamContext) -> Iterator[Any]:
    """Samples of each segment in turn; the next segment's shard is opened, walked to its first
    sample and its first range fetched in a background thread while this one is read, so the
    stream does not stop at shard boundaries to wait on storage."""
    from concurrent.futures import ThreadPoolExecutor

    spec = ctx.spec
    cache = None
    if spec.cache_dir:
        from dipro.data.shard_cache import ShardCache

        cache = ShardCache(spec.cache_dir, spec.cache_max_bytes)
    it = iter(segments)
    pool = ThreadPoolExecutor(1, thread_name_prefix="dipro-shard-open")
    nxt = next(it, None)
    pending = pool.submit(open_segment, nxt, cache) if nxt is not None else None
    try:
        while pending is not None:
            segment, opened = nxt, pending.result()
            nxt = next(it, None)
            pending = pool.submit(open_segment, nxt, cache) if nxt is not None else None
            yield from read_segment(segment, cache, opened)
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                pending.result().close()
        pool.shutdown(wait=False)


def shuffle_stage(samples: Iterator[Any], ctx: StreamContext) -> Iterator[Any]:
    """This worker's share of the rank's shuffle budget, seeded by (seed, epoch, rank, worker)."""
    spec = ctx.spec
    max_samples, max_bytes = worker_budget(spec.shuffle_buffer, spec.shuffle_bytes, spec.num_workers)
    return bounded_shuffle(samples, max_samples=max_samples, max_bytes=max_bytes,
                           rng=np.random.default_rng(ctx.seed("shuffle")))


def decode_stage(samples: Iterator[Any], ctx: StreamContext) -> Iterator[Any]:
    """Decode and validate; corrupt samples become :class:`Skipped`.

    A training stream cycles through its range, so a range in which every
    sample is corrupt would never end: after a whole pass without one good
    sample the stream stops with a :class:`DataError`.
    """
    spec = ctx.spec
    since_good = 0
    pass_len = None
    if spec.train:
        pass_len = sum(len(s) for s in train_segments(
            spec.shard_set, seed=spec.seed, epoch=ctx.epoch, rank=spec.rank, world_size=spec.world_size,
            worker=ctx.worker, num_workers=spec.num_workers, steps=spec.steps))
    for raw in samples:
        if isinstance(raw, Skipped):
            item: Any = raw
        elif "__error__" in raw:
            item = Skipped(raw["__shard__"], raw["__key__"], raw["__error__"])
        else:
            try:
                item = decode_sample(raw, spec.shard_set.task_dir, spec.crop_size)
            except CorruptSample as exc:
                item = Skipped(exc.shard, exc.key, exc.reason)
        if isinstance(item, Skipped):
            since_good += item.count
            if pass_len is not None and since_good >= max(pass_len, 1):
                raise DataError(f"training stream (rank {spec.rank}, loader worker {ctx.worker}) read a whole pass of "
                                f"{pass_len} samples without one valid sample; last: {item.describe()}")
        else:
            since_good = 0
        yield item


def select_stage(samples: Iterator[Any], ctx: StreamContext) -> Iterator[Any]:
    for s in samples:
        yield s if isinstance(s, Skipped) else select_cxrs(s, ctx.spec.max_cxrs, ctx.spec.last_cxr_only)


def augment_stage(samples: Iterator[Any], ctx: StreamContext) -> Iterator[Any]:
    """Draw each sample's augmentation parameters; the model applies them on the device (:mod:`dipro.data.augment`)."""
    rng = np.random.default_rng(ctx.seed("augment"))
    for s in samples:
        if isinstance(s, Skipped):
            yield s
            continue
        _, n_regions, crop, _ = s["crops"].shape
        yield {**s, **draw_augmentation(n_regions, crop, rng, ctx.spec.augment_cfg)}


def batch_stage(samples: Iterator[Any], ctx: StreamContext) -> Iterator[dict[str, Any]]:
    """Collate full batches (evaluation also yields the last partial one).

    Skipped samples are attached to the next batch yielded (``num_corrupt`` and
    ``corrupt_samples``).  Evaluation holds each batch until the next one is
    complete, so skips after the last full batch still reach the last batch.
    """
    spec = ctx.spec
    task_dir = spec.shard_set.task_dir
    pool = ctx.crop_pool

    def collate(samples: list[dict[str, Any]], task_dir: str) -> dict[str, Any]:
        if pool is not None:
            return pool.pack(collate_arrays(samples, task_dir, alloc=pool.empty))
        return collate_arrays(samples, task_dir, alloc=new_shared_uint8 if ctx.in_worker else None)

    buf: list[dict[str, Any]] = []
    pending, notes = 0, []
    held: dict[str, Any] | None = None
    produced = 0
    last_skip: Skipped | None = None

    io_base = io_snapshot()

    def attach(batch: dict[str, Any]) -> dict[str, Any]:
        nonlocal pending, notes, io_base
        batch["num_corrupt"] = pending
        batch["corrupt_samples"] = notes[:MAX_NOTES_PER_BATCH]
        now = io_snapshot()
        batch["io_counts"] = {k: v - io_base.get(k, 0) for k, v in now.items() if v != io_base.get(k, 0)}
        pending, notes, io_base = 0, [], now
        return batch

    for item in samples:
        if isinstance(item, Skipped):
            pending += item.count
            notes.append(item.describe())
            last_skip = item
            continue
        buf.append(item)
        if len(buf) < spec.batch_size:
            continue
        batch = collate(buf, task_dir)
        buf = []
        if spec.train:
            produced += 1
            yield attach(batch)
            continue
        if held is not None:
            produced += 1
            yield attach(held)
        held = batch
    if buf:  # evaluation only: a training stream is infinite
        if held is not None:
            produced += 1
            yield attach(held)
        held = collate(buf, task_dir)
    if held is not None:
        produced += 1
        yield attach(held)
    elif produced == 0 and pending:
        raise DataError(f"loader stream (rank {spec.rank}, worker {ctx.worker}) has no valid sample: "
                        f"{pending} corrupt, last: {last_skip.describe() if last_skip else '?'}")


def with_epoch_stage(batches: Iterator[dict[str, Any]], ctx: StreamContext) -> Iterator[dict[str, Any]]:
    """Exactly this worker's share of the rank's training steps."""
    return itertools.islice(batches, ctx.worker_steps)


# ----------------------------------------------------------------------------- the dataset

class SamplePipeline(IterableDataset):
    """An ``IterableDataset`` running the named stages for the calling loader worker."""

    def __init__(self, spec: LoaderSpec):
        super().__init__()
        self.spec = spec
        self.epoch = 0
        self.crop_slots: CropSlots | None = None
        """Set by the main process before its workers start (:mod:`dipro.data.transport`)."""

    @property
    def stages(self) -> list[tuple[str, Stage]]:
        spec = self.spec
        stages: list[tuple[str, Stage]] = [("plan", plan_stage), ("read", read_stage)]
        if spec.train and spec.shuffle and spec.shuffle_buffer > 1:
            stages.append(("shuffle", shuffle_stage))
        stages += [("decode", decode_stage), ("select_cxrs", select_stage)]
        if spec.augment:
            stages.append(("augment", augment_stage))
        stages.append(("batch", batch_stage))
        if spec.train:
            stages.append(("with_epoch", with_epoch_stage))
        return stages

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.spec.num_workers:
            raise RuntimeError(f"pipeline planned for {self.spec.num_workers} loader workers, running in {info.num_workers}")
        pool = None if info is None or self.crop_slots is None else WorkerCropPool(self.crop_slots, worker)
        ctx = StreamContext(self.spec, self.epoch, worker, in_worker=info is not None, crop_pool=pool)
        stream: Iterator[Any] | None = None
        for _name, stage in self.stages:
            stream = stage(stream, ctx)
        assert stream is not None
        return stream
