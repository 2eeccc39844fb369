"""``dipro experiment``: one training + test evaluation per seed, the paper's mean ± std, with bootstrap intervals.

The one-arm case of ``dipro sweep`` (:func:`dipro.sweep.driver.run_sweep` with no grid): the seeds
run concurrently on Ray Tune as far as the cluster places them, the sweep directory
``{storage}/{name}/`` holds every seed's run, and ``dipro sweep --resume NAME`` continues an
interrupted experiment.  With tracking, an MLflow parent run holds the summary and each seed's
run is its child (``mlflow.parentRunId``).
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from dipro.config import Config
from data_sharding.errors import ConfigError, UserError
from dipro.train import TrainResult


@dataclass
class ExperimentResult:
    runs: dict[int, TrainResult]
    """The finished seeds' runs (``test``: the best checkpoint's test predictions)."""
    summary: dict[str, tuple[float, float]]
    """test metric -> (mean, std) over seeds."""
    table: str
    """The mean ± std table, FAILED rows, and the bootstrap intervals per seed and pooled over seeds."""
    parent_run_id: str | None = None
    name: str = ""
    """The sweep's name (``dipro sweep --resume NAME`` continues it)."""
    report: object = None
    """:class:`dipro.sweep.report.Report`."""


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


def experiment_name(cfg: Config, seeds: list[int]) -> str:
    """``{trainer.run_name or task}-seeds-23-29-66-{time}-{hex}``: a new sweep name every time."""
    return (f"{cfg.trainer.run_name or cfg.task}-seeds-{'-'.join(map(str, seeds))}-"
            f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")


def run_experiment(cfg: Config, seeds: list[int], out_dir: str | Path | None = None, *,
                   max_concurrent: int | None = None, name: str | None = None) -> ExperimentResult:
    """Train and test ``cfg`` once per seed (a one-arm sweep); per-seed results, mean ± std and intervals.

    Raises :class:`UserError` with the reasons when no seed finished."""
    from data_sharding import storage
    from dipro.sweep.driver import run_sweep
    from dipro.train.evaluate import load_predictions
    from dipro.train import rundir

    result = run_sweep(cfg, grid={}, seeds=seeds, name=name or experiment_name(cfg, seeds),
                       max_concurrent=max_concurrent)
    arm = result.report.arms[0]
    if not arm.finished:
        reasons = "; ".join(f"seed {t.seed}: {t.reason}" for t in arm.failed)
        raise UserError(f"no seed of experiment {result.name} finished ({reasons})")
    runs = {}
    for t in arm.finished:
        run_dir = storage.resolve(t.run_dir).native  # a Path locally, the Location on a bucket
        runs[t.seed] = TrainResult(
            run_name=t.run_name, run_dir=run_dir, best_checkpoint=storage.resolve(t.best_checkpoint).native,
            last_checkpoint=None,
            metrics=dict(t.metrics), mlflow_run_id=t.mlflow_run_id, epochs_completed=t.epochs_completed,
            global_step=t.global_step, test=load_predictions(run_dir / rundir.TEST_PREDICTIONS))
    out = ExperimentResult(runs=runs, summary=arm.summary, table=result.report.table,
                           parent_run_id=result.parent_run_id, name=result.name, report=result.report)
    if out_dir is not None:  # a directory or an s3:// / gs:// prefix; each file written atomically
        from data_sharding import storage

        per_seed = {t.seed: {k[5:]: v for k, v in t.metrics.items() if k.startswith("test/")} for t in arm.finished}
        d = storage.resolve(out_dir)
        (d / "experiment.json").write_text(json.dumps(
            {"name": result.name, "seeds": seeds,
             "runs": {str(s): {"run_name": r.run_name, "best_checkpoint": str(r.best_checkpoint), "test": per_seed[s],
                               "intervals": {k: iv.as_dict() for k, iv in arm.per_run[f"s{s}"].items()}}
                      for s, r in runs.items()},
             "failed": {str(t.seed): t.reason for t in arm.failed},
             "summary": {k: {"mean": v[0], "std": v[1]} for k, v in arm.summary.items()},
             "pooled": {k: iv.as_dict() for k, iv in arm.pooled.items()}}, indent=1, default=float))
        (d / "experiment.txt").write_text(out.table + "\n")
    return out
