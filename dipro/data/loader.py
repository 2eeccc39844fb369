"""``build_loader``: the shard loader training and evaluation iterate over.

    loader = build_loader(cfg.data.shards, "mortality", "train", batch_size=4, num_workers=2, seed=cfg.seed)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:                       # exactly len(loader) batches on every rank
            batch = move_to_device(batch, device)
            ...
        log(loader.stats.as_dict())                # samples seen, corrupt skipped, storage retries

Training: every rank yields exactly ``len(loader)`` full batches per epoch
(:func:`dipro.data.plan.train_num_steps`), so DDP never hangs on uneven shards.
Evaluation: every sample exactly once over all ranks, in contiguous blocks
(:func:`dipro.data.plan.eval_index_for_rank`); ranks may yield different
numbers of batches, so the evaluation loop must not run a collective per batch:
it gathers predictions at the end with a padding-aware ``all_gather``.

``shard_dir`` is a local directory or an ``s3://`` / ``gs://`` prefix (:mod:`data_sharding.storage`);
on a bucket each shard is streamed (:mod:`dipro.data.reader`), or copied once per node into
``cache_dir`` when one is given (:mod:`dipro.data.shard_cache`).  The storage layer's retries
and the cache's hits, counted in whichever process read the shard, reach :attr:`ShardLoader.stats`
with the batches (``data/storage_retries`` ... in :meth:`LoaderStats.as_dict`).
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data_sharding.constants import TASK_TO_SHARD_DIR
from dipro.data.collate import to_tensors
from dipro.data.pipeline import LoaderSpec, SamplePipeline
from dipro.data.plan import eval_num_steps, read_manifest, train_num_steps
from dipro.data.transport import CropReceiver, CropSlots
from data_sharding.errors import ConfigError, DataError, UserError, one_line

CORRUPT_CHECK_AFTER = 100  # samples read before the corrupt fraction is checked mid-epoch
PREFETCH_FACTOR = 2  # batches each loader worker prepares ahead


@dataclass
class LoaderStats:
    """Counts of the current epoch and of the loader's lifetime, aggregated over loader workers."""

    epoch: int = 0
    batches: int = 0
    samples: int = 0
    corrupt: int = 0
    total_samples: int = 0
    total_corrupt: int = 0
    last_corrupt: list[str] = field(default_factory=list)
    io: dict[str, int] = field(default_factory=dict)
    """This epoch's storage and cache counts over every loader process (:func:`dipro.data.pipeline.io_snapshot`)."""
    total_io: dict[str, int] = field(default_factory=dict)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.samples, self.corrupt = epoch, 0, 0, 0
        self.io = {}

    def add(self, samples: int, corrupt: int, notes: list[str], io: dict[str, int] | None = None) -> None:
        self.batches += 1
        self.samples += samples
        self.corrupt += corrupt
        self.total_samples += samples
        self.total_corrupt += corrupt
        if notes:
            self.last_corrupt = (self.last_corrupt + list(notes))[-8:]
        for k, v in (io or {}).items():
            self.io[k] = self.io.get(k, 0) + int(v)
            self.total_io[k] = self.total_io.get(k, 0) + int(v)

    @property
    def corrupt_fraction(self) -> float:
        seen = self.samples + self.corrupt
        return self.corrupt / seen if seen else 0.0

    def as_dict(self, prefix: str = "data/") -> dict[str, float]:
        """Metrics for the training logs."""
        return {
            f"{prefix}samples": float(self.samples),
            f"{prefix}corrupt_skipped": float(self.corrupt),
            f"{prefix}corrupt_fraction": self.corrupt_fraction,
            f"{prefix}total_corrupt_skipped": float(self.total_corrupt),
            f"{prefix}storage_retries": float(self.io.get("storage_retries", 0)),
            f"{prefix}storage_requests": float(self.io.get("storage_requests", 0)),
            f"{prefix}storage_mb_read": self.io.get("storage_bytes_read", 0) / 2**20,
            f"{prefix}cache_hits": float(self.io.get("cache_hits", 0)),
            f"{prefix}cache_misses": float(self.io.get("cache_misses", 0)),
            f"{prefix}total_storage_retries": float(self.total_io.get("storage_retries", 0)),
        }


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's per-batch conversion: none (its default would make a tensor, and so a
    shared-memory segment, of every small array; :func:`to_tensors` does it in the main process)."""
    return batch


class ShardLoader:
    """Iterable over the batches of one epoch; ``len()`` = steps of this rank (see module doc)."""

    def __init__(self, dataset: SamplePipeline, *, task: str, split: str, num_workers: int, pin_memory: bool,
                 max_corrupt_fraction: float, corrupt_check_after: int = CORRUPT_CHECK_AFTER, epoch: int = 0):
        self.dataset = dataset
        self.spec = dataset.spec
        self.task, self.split = task, split
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.max_corrupt_fraction = max_corrupt_fraction
        self.corrupt_check_after = corrupt_check_after
        self.stats = LoaderStats()
        self.set_epoch(epoch)

    @property
    def num_steps(self) -> int:
        spec = self.spec
        if spec.train:
            return spec.steps
        return eval_num_steps(spec.shard_set.num_samples, spec.batch_size, spec.rank, spec.world_size, spec.num_workers)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (evaluation: exact when nothing is corrupt)."""
        spec = self.spec
        if spec.train:
            return spec.steps * spec.batch_size
        from dipro.data.plan import eval_index_for_rank

        return len(eval_index_for_rank(spec.shard_set.num_samples, spec.rank, spec.world_size))

    def __len__(self) -> int:
        return self.num_steps

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: shard order, shuffle and augmentation are functions of (seed, epoch)."""
        self.dataset.set_epoch(epoch)

    def _check_corrupt(self, final: bool) -> None:
        st = self.stats
        seen = st.samples + st.corrupt
        if st.corrupt == 0 or (not final and seen < self.corrupt_check_after):
            return
        if st.corrupt_fraction > self.max_corrupt_fraction:
            last = st.last_corrupt[-1] if st.last_corrupt else "?"
            raise DataError(
                f"{st.corrupt} of {seen} samples ({st.corrupt_fraction:.1%}) read from {self.spec.shard_set.shard_dir} "
                f"({self.task}/{self.split}, epoch {st.epoch}, rank {self.spec.rank}) were corrupt, above "
                f"max_corrupt_fraction={self.max_corrupt_fraction}; last: {last}. "
                f"Run `dipro shards verify {self.spec.shard_set.shard_dir}`"
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        self.stats.start_epoch(self.epoch)
        mp_context = multiprocessing.get_context() if self.num_workers > 0 else None
        slots = CropSlots(self.num_workers, PREFETCH_FACTOR + 3, mp_context) if mp_context is not None else None
        self.dataset.crop_slots = slots  # the workers started below inherit it
        receiver = CropReceiver(slots) if slots is not None else None
        # Pinning happens here, not in the DataLoader's pin thread: the crops are copied out of
        # their slot anyway (into pinned memory when pinning) before the slot is freed.
        loader = DataLoader(
            self.dataset, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
            pin_memory=False, persistent_workers=False, multiprocessing_context=mp_context,
            prefetch_factor=PREFETCH_FACTOR if self.num_workers > 0 else None,
        )
        produced = 0
        for batch in _one_line_errors(loader):
            if receiver is not None:
                batch = receiver.unpack(batch, self.pin_memory)
            batch = to_tensors(batch, pin_memory=self.pin_memory)
            notes = batch.pop("corrupt_samples", [])
            self.stats.add(len(batch["sample_key"]), int(batch["num_corrupt"]), notes, batch.pop("io_counts", None))
            self._check_corrupt(final=False)
            produced += 1
            yield batch
        self._check_corrupt(final=True)
        if self.spec.train and produced != self.spec.steps:
            raise RuntimeError(f"training loader yielded {produced} batches, planned {self.spec.steps} "
                               f"(rank {self.spec.rank}); ranks would go out of step")


def _one_line_errors(batches) -> Iterator[dict[str, Any]]:
    """The DataLoader's batches; a user error raised in a loader worker process (torch re-raises it
    as ``Caught X in DataLoader worker process N.`` plus the worker's traceback) is raised again as
    the same type with its own one line (the full text stays in ``__cause__``)."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UserError as exc:
            text = str(exc)
            if not (text.startswith("Caught ") and "Original Traceback" in text):
                raise
            line = one_line(text)
            try:
                clean = type(exc)(line)
            except Exception:
                raise exc from None
            raise clean from exc
        yield batch


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed when initialised; else env RANK/WORLD_SIZE; else 0/1."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            d_rank, d_world = dist.get_rank(), dist.get_world_size()
        else:
            try:
                d_rank, d_world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
            except ValueError:
                raise ConfigError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                                  "are not integers") from None
        rank = d_rank if rank is None else rank
        world_size = d_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def build_loader(
    shard_dir: str | Path, task: str, split: str, batch_size: int, num_workers: int, *,
    seed: int = 0, epoch: int = 0, rank: int | None = None, world_size: int | None = None,
    shuffle: bool | None = None, shuffle_buffer: int = 256, shuffle_buffer_mb: float = 256.0,
    augment: bool | None = None,
    max_corrupt_fraction: float = 0.01, pin_memory: bool | None = None, max_cxrs: int = 14,
    last_cxr_only: bool = False, steps_per_epoch: int | None = None,
    corrupt_check_after: int = CORRUPT_CHECK_AFTER, cache_dir: str | Path | None = None,
    cache_max_gb: float = 0.0,
) -> ShardLoader:
    """Build the loader of ``task``/``split`` from the shards under ``shard_dir`` (see module doc).

    ``shuffle`` and ``augment`` default to on for ``train`` only and are
    refused outside training.  The shuffle buffer holds at most ``shuffle_buffer`` samples and
    ``shuffle_buffer_mb`` MiB of raw samples per rank, split over its loader workers.
    ``pin_memory`` defaults to CUDA availability.
    ``max_cxrs`` keeps the last that many CXRs; ``last_cxr_only`` keeps the last two.
    ``steps_per_epoch`` overrides the training step count (the stream repeats as needed).
    ``cache_dir`` / ``cache_max_gb``: a local copy of bucket shards, at most that many GiB
    (:mod:`dipro.data.shard_cache`); without them bucket shards are streamed every epoch.
    """
    if task not in TASK_TO_SHARD_DIR:
        raise ConfigError(f"unknown task {task!r}: expected one of {', '.join(TASK_TO_SHARD_DIR)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    if not 0.0 <= max_corrupt_fraction <= 1.0:
        raise ConfigError(f"max_corrupt_fraction must be in [0, 1], got {max_corrupt_fraction}")
    if shuffle_buffer < 1 or not shuffle_buffer_mb > 0:
        raise ConfigError(f"shuffle buffer bounds must be positive, got {shuffle_buffer} samples, {shuffle_buffer_mb} MiB")
    if max_cxrs < 2:
        raise ConfigError(f"max_cxrs must be >= 2, got {max_cxrs}")
    if cache_dir and not cache_max_gb > 0:
        raise ConfigError(f"a shard cache ({cache_dir}) needs a positive size bound, got cache_max_gb={cache_max_gb}")
    train = split == "train"
    if augment and not train:
        raise ConfigError(f"augmentation is for training only; got augment=True for split {split!r}")
    if shuffle and not train:
        raise ConfigError(f"evaluation reads samples in manifest order; got shuffle=True for split {split!r}")
    rank, world_size = _resolve_rank(rank, world_size)
    shard_set = read_manifest(shard_dir, task, split)
    streams = max(1, num_workers)
    steps = train_num_steps(shard_set.num_samples, batch_size, world_size, steps_per_epoch) if train else 0
    crop_size = shard_set.settings.get("crop_size")
    if crop_size is not None and not (isinstance(crop_size, int) and crop_size > 0):
        raise DataError(f"{shard_set.shard_dir}/manifest.parquet: settings crop_size = {crop_size!r}, "
                        "expected a positive integer")
    if pin_memory is None:
        import torch

        pin_memory = torch.cuda.is_available()
    spec = LoaderSpec(
        shard_set=shard_set, train=train, batch_size=batch_size, steps=steps, seed=seed, rank=rank,
        world_size=world_size, num_workers=streams, shuffle=train if shuffle is None else bool(shuffle),
        shuffle_buffer=shuffle_buffer, shuffle_bytes=max(1, int(shuffle_buffer_mb * 2**20)),
        augment=train if augment is None else bool(augment),
        max_cxrs=max_cxrs, last_cxr_only=last_cxr_only, crop_size=crop_size,
        cache_dir=str(Path(cache_dir).expanduser().resolve()) if cache_dir else None,
        cache_max_bytes=int(cache_max_gb * 2**30) if cache_dir else 0,
    )
    return ShardLoader(SamplePipeline(spec), task=task, split=split, num_workers=num_workers, pin_memory=pin_memory,
                       max_corrupt_fraction=max_corrupt_fraction, corrupt_check_after=corrupt_check_after, epoch=epoch)
