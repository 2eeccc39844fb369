"""``dipro experiment``: one training + test evaluation per seed, reported as mean ± std (the paper's format).

With tracking enabled, an MLflow parent run holds the summary (``{metric}_mean``,
``{metric}_std``) and each seed's run is its child (``mlflow.parentRunId``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dipro.config import Config, replace
from data_sharding.errors import ConfigError
from dipro.train import TrainResult, run_training


@dataclass
class ExperimentResult:
    runs: dict[int, TrainResult]
    summary: dict[str, tuple[float, float]]
    """test metric -> (mean, std) over seeds."""
    table: str
    parent_run_id: str | None = None


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


def run_experiment(cfg: Config, seeds: list[int], out_dir: str | Path | None = None) -> ExperimentResult:
    """Train and test ``cfg`` once per seed; returns per-seed results and the mean ± std table.

    ``out_dir`` (a directory or an s3:// / gs:// prefix) gets experiment.json and experiment.txt."""
    from dipro.metrics import aggregate_seeds, format_table

    base_name = cfg.trainer.run_name
    parent = None
    if cfg.tracking.enabled:
        from dipro.tracking.tracker import Tracker

        name = f"{base_name or cfg.task}-seeds-{'-'.join(map(str, seeds))}"
        parent = Tracker.create_in_driver(cfg, name, extra_tags={"dipro.experiment.seeds": ",".join(map(str, seeds))})
    runs: dict[int, TrainResult] = {}
    try:
        for seed in seeds:
            overrides = [f"seed={seed}"]
            if base_name:
                overrides.append(f"trainer.run_name={base_name}-seed{seed}")
            seed_cfg = replace(cfg, overrides)
            child = None
            if parent is not None:
                from dipro.tracking.tracker import Tracker
                from dipro.train.launcher import make_run_name

                seed_cfg.trainer.run_name = seed_cfg.trainer.run_name or f"{make_run_name(seed_cfg)}-seed{seed}"
                child = Tracker.create_in_driver(seed_cfg, seed_cfg.trainer.run_name, parent_run_id=parent.run_id)
            runs[seed] = run_training(seed_cfg, tracker=child)
    except BaseException:
        if parent is not None:
            parent.finish("FAILED")
        raise
    per_seed = [{k[len("test/"):]: v for k, v in r.metrics.items() if k.startswith("test/")} for r in runs.values()]
    summary = aggregate_seeds(per_seed)
    rows = {f"seed {s}": m for s, m in zip(runs, per_seed)}
    rows[f"mean ± std ({len(seeds)} seeds)"] = summary
    table = format_table(rows, cfg.task)
    if parent is not None:
        parent.log_summary(summary)
        parent.log_text(table + "\n", "experiment_table.txt")
        parent.finish("FINISHED")
    if out_dir is not None:  # a directory or an s3:// / gs:// prefix; each file written atomically
        from data_sharding import storage

        out = storage.resolve(out_dir)
        (out / "experiment.json").write_text(json.dumps(
            {"seeds": seeds, "runs": {str(s): {"run_name": r.run_name, "best_checkpoint": str(r.best_checkpoint),
                                               "test": m} for (s, r), m in zip(runs.items(), per_seed)},
             "summary": {k: {"mean": v[0], "std": v[1]} for k, v in summary.items()}}, indent=1, default=float))
        (out / "experiment.txt").write_text(table + "\n")
    return ExperimentResult(runs=runs, summary=summary, table=table,
                            parent_run_id=parent.run_id if parent is not None else None)
