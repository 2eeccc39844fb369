"""The run config -> ``dipro.data.build_loader`` calls the loop and evaluation make."""
from __future__ import annotations

from pathlib import Path

from dipro.config import Config

# Which batch key holds each task's labels (docs/ARCHITECTURE.md section 3).
TASK_LABEL_KEY = {"disease_progression": "progression", "mortality": "mortality", "length_of_stay": "los_bin"}


def train_loader(cfg: Config, *, rank: int, world_size: int, epoch: int = 0):
    """The training loader: shuffled by (seed, epoch), augmented per config, equal steps on every rank.

    ``trainer.max_steps_per_epoch`` caps optimizer steps, i.e. ``x optim.grad_accum`` micro batches.
    """
    from dipro.data import build_loader

    micro = None
    if cfg.trainer.max_steps_per_epoch is not None:
        from dipro.data.plan import read_manifest, train_num_steps

        full = train_num_steps(read_manifest(cfg.data.shards, cfg.task, "train").num_samples,
                               cfg.data.batch_size, world_size)
        micro = min(full, cfg.trainer.max_steps_per_epoch * cfg.optim.grad_accum)
    return build_loader(
        cfg.data.shards, cfg.task, "train", cfg.data.batch_size, cfg.data.num_loader_workers,
        seed=cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
        shuffle=cfg.data.shuffle_buffer > 0, shuffle_buffer=max(cfg.data.shuffle_buffer, 1),
        shuffle_buffer_mb=cfg.data.shuffle_buffer_mb,
        augment=cfg.data.augment, max_corrupt_fraction=cfg.data.max_corrupt_fraction,
        max_cxrs=cfg.data.max_cxrs, last_cxr_only=cfg.model.last_cxr_only, steps_per_epoch=micro,
        pin_memory=cfg.trainer.use_gpu,  # page-locked batches, copied to the GPU with non_blocking=True
        cache_dir=cfg.data.cache_dir, cache_max_gb=cfg.data.cache_max_gb,
    )


def eval_loader(cfg: Config, split: str, *, rank: int, world_size: int, shard_dir: str | Path | None = None,
                batch_size: int | None = None, num_workers: int | None = None):
    """An evaluation loader: manifest order, no augmentation, this rank's block of samples."""
    from dipro.data import build_loader

    return build_loader(
        shard_dir or cfg.data.shards, cfg.task, split, batch_size or cfg.data.batch_size,
        cfg.data.num_loader_workers if num_workers is None else num_workers,
        seed=cfg.seed, rank=rank, world_size=world_size, shuffle=False, augment=False,
        max_corrupt_fraction=cfg.data.max_corrupt_fraction, max_cxrs=cfg.data.max_cxrs,
        last_cxr_only=cfg.model.last_cxr_only, pin_memory=cfg.trainer.use_gpu and torch_cuda(),
        cache_dir=cfg.data.cache_dir, cache_max_gb=cfg.data.cache_max_gb,
    )


def torch_cuda() -> bool:
    """Whether this process sees CUDA (an evaluation loader may run on a CPU driver of a GPU run)."""
    import torch

    return torch.cuda.is_available()


def read_label_stats(shard_dir: str | Path) -> dict:
    """The shards' ``label_stats.json`` (train-split counts -> class weights): the file in a local
    shard directory, the manifest's copy on a bucket (:func:`data_sharding.manifest.read_stats`)."""
    from data_sharding.manifest import read_stats

    return read_stats(shard_dir, "label_stats.json")
