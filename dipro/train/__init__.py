"""Distributed training of DiPro on Ray Train (DDP or DeepSpeed), with resumable checkpoints.

    from dipro.train import run_training
    result = run_training(load_config("configs/demo.yaml", ["trainer.num_workers=2"]))
    result.best_checkpoint        # run_dir/best: model.pt (float32), config.yaml, label_stats.json

Modules: ``launcher`` (driver), ``loop`` (per-worker loop), ``strategies`` (DDP / DeepSpeed),
``checkpoint`` (format, ``load_model``), ``evaluate`` (``EvalResult``), ``experiment`` (seeds: a one-arm
``dipro.sweep``), ``optim`` (AdamW + cosine schedule), ``precision``, ``data`` (loader calls), ``faults``
(test hooks), ``rundir`` (a run's directory: claim, reclaim, log).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """What a finished run produced: Paths for a local storage path, ``data_sharding.storage.Location``
    objects (``s3://`` / ``gs://``) for a bucket."""

    run_name: str
    run_dir: Path | Any
    best_checkpoint: Path | Any
    last_checkpoint: Path | Any | None
    metrics: dict[str, float]
    """``val/*`` of the best epoch and ``test/*`` of the best checkpoint."""
    mlflow_run_id: str | None = None
    epochs_completed: int | None = None
    global_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    test: Any = None
    """The test split's ``EvalResult``."""


def run_training(cfg, resume: str | None = None, tracker: Any = None) -> TrainResult:
    """Train per ``cfg``; ``resume`` = a run name (under ``trainer.storage_path``) or run directory to
    continue from its last checkpoint, under a new run name. ``tracker``: an MLflow
    ``Tracker`` made by the caller (experiments); otherwise one is created when tracking is enabled."""
    from dipro.train.launcher import launch

    return launch(cfg, resume=resume, tracker=tracker)


__all__ = ["TrainResult", "run_training"]
