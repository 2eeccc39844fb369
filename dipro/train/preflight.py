"""What the driver checks before any Ray worker starts, so a mismatch is one line, not a failed worker group.

:func:`check_shards` (no Ray needed):

* ``label_stats.json`` is in the shard directory (on a bucket: in its manifest) and holds the counts this task's
  class weights are built from (the same :class:`dipro.model.losses.ClassWeights` the
  workers build);
* the manifest lists train and val shards of the task, written in this code's shard
  format, with crops of ``model.crop_size`` pixels (shards cut at 32 px cannot feed a
  model configured for 64 px);
* ``ehr_stats.json`` names the EHR features the model reads, in its order;
* the training split fills at least one optimizer step on every rank:
  ``data.batch_size x optim.grad_accum x trainer.num_workers`` samples.

GPU presence is a cluster resource: :func:`dipro.train.launcher.check_resources`
compares ``ray.cluster_resources()`` with the worker group after ``ray.init``.
Whatever slips through (a damaged sample, a shard whose bytes disagree with its
manifest) is found on a rank and reported the same way (``dipro.train.failures``).
"""
from __future__ import annotations

from data_sharding.constants import EHR_VALUE_COLUMNS
from data_sharding.errors import ConfigError, DataError
from dipro.config import Config


def _where(shard_dir: str, name: str) -> str:
    """Where a statistics file of the shards is read from (a bucket's is in its manifest)."""
    from data_sharding import storage

    root = storage.resolve(shard_dir)
    return f"{root / 'manifest.parquet'} ({name})" if root.is_remote else str(root / name)


def check_label_stats(cfg: Config) -> dict:
    """``{shards}/label_stats.json`` present and holding this task's counts; returns it."""
    from dipro.model.losses import ClassWeights
    from dipro.train.data import read_label_stats

    stats = read_label_stats(cfg.data.shards)
    try:
        ClassWeights(cfg.task, stats)
    except DataError as exc:
        raise DataError(f"{_where(cfg.data.shards, 'label_stats.json')}: {exc} (task {cfg.task})") from None
    return stats


def check_manifest_settings(cfg: Config, shard_set) -> None:
    """The crops and format of one (task, split)'s shards fit ``cfg.model``."""
    from data_sharding.manifest import FORMAT_VERSION

    manifest = f"{shard_set.shard_dir}/manifest.parquet"
    settings = shard_set.settings
    version = settings.get("format_version")
    if version is not None and version != FORMAT_VERSION:
        raise DataError(f"{manifest}: {shard_set.task_dir}/{shard_set.split} shards have format version {version}, "
                        f"this code reads version {FORMAT_VERSION}; rebuild them with `dipro shards regenerate`")
    crop = settings.get("crop_size")
    if crop is not None and crop != cfg.model.crop_size:
        raise ConfigError(
            f"{manifest}: {shard_set.task_dir}/{shard_set.split} shards hold {crop}-px crops but model.crop_size="
            f"{cfg.model.crop_size}; set model.crop_size={crop}, or cut the shards again with `dipro shard "
            f"--crop-size {cfg.model.crop_size}`")


def check_ehr_features(cfg: Config) -> None:
    """The shards' EHR features (``ehr_stats.json``) are the ones, in the order, the model reads."""
    from data_sharding.manifest import read_stats

    path = _where(cfg.data.shards, "ehr_stats.json")
    try:
        names = list(read_stats(cfg.data.shards, "ehr_stats.json")["mean"])
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: expected {{\"mean\": {{feature: value}}, ...}} ({exc})") from None
    if names != list(EHR_VALUE_COLUMNS):
        missing = [c for c in EHR_VALUE_COLUMNS if c not in names]
        extra = [c for c in names if c not in EHR_VALUE_COLUMNS]
        detail = (f"missing {', '.join(missing[:5])}" if missing else "") + \
            (f"{'; ' if missing else ''}unknown {', '.join(extra[:5])}" if extra else "") or "in another order"
        raise DataError(f"{path}: the shards carry {len(names)} EHR features, the model reads "
                        f"{len(EHR_VALUE_COLUMNS)} ({detail}); prepare and shard the data with this code version")


def check_shards(cfg: Config) -> int:
    """Every check of the module docstring; returns micro batches per rank per epoch."""
    from dipro.data.plan import read_manifest, train_num_steps

    check_label_stats(cfg)
    train = read_manifest(cfg.data.shards, cfg.task, "train")
    val = read_manifest(cfg.data.shards, cfg.task, "val")
    for shard_set in (train, val):
        check_manifest_settings(cfg, shard_set)
    check_ehr_features(cfg)
    # an elastic group (trainer.num_workers=MIN-MAX) is checked at its largest size: the most ranks
    # split the epoch into the fewest micro batches per rank
    batch, accum, workers = cfg.data.batch_size, cfg.optim.grad_accum, cfg.trainer.max_workers
    need = batch * accum * workers
    if train.num_samples < need:
        raise ConfigError(
            f"{train.num_samples} training samples cannot fill one optimizer step on each of {workers} worker(s): "
            f"that takes data.batch_size {batch} x optim.grad_accum {accum} x trainer.num_workers {workers} = "
            f"{need}; lower one of them")
    micro = train_num_steps(train.num_samples, batch, workers)
    if cfg.trainer.max_steps_per_epoch is not None:
        micro = min(micro, cfg.trainer.max_steps_per_epoch * accum)
    return micro
