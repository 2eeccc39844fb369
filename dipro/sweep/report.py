"""A sweep's results: the paper's mean ± std table, FAILED rows, and the bootstrap statistics.

For every arm (grid combination) over its finished seeds:

* ``mean ± std`` of every test metric over seeds (``dipro.metrics.aggregate_seeds``, the paper's table);
* the 95 % stratified bootstrap interval of each run's test metrics and of the seed-mean
  (pooled: every resample scores every seed on the same test samples);
* against the baseline arm: the paired bootstrap of ``mean(arm) - mean(baseline)`` on the same
  test samples (``dipro.bootstrap``).

The test predictions come from each trial's run directory (``test_predictions.npz``); trials of
one sweep are evaluated on the same test shards, which :func:`dipro.bootstrap.align` checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dipro.sweep import record as rec
from dipro.sweep.grid import Arm, Trial


@dataclass
class ArmResult:
    arm: Arm
    trials: list[rec.TrialRecord]
    summary: dict[str, tuple[float, float]] = field(default_factory=dict)
    """test metric -> (mean, std) over the arm's finished seeds."""
    per_run: dict[str, dict[str, Any]] = field(default_factory=dict)
    """trial key -> {metric: Interval}."""
    pooled: dict[str, Any] = field(default_factory=dict)
    """metric -> Interval of the seed-mean."""
    vs_baseline: dict[str, Any] = field(default_factory=dict)
    """metric -> Interval of mean(arm) - mean(baseline) (empty for the baseline itself)."""

    @property
    def finished(self) -> list[rec.TrialRecord]:
        return [t for t in self.trials if t.status == rec.FINISHED]

    @property
    def failed(self) -> list[rec.TrialRecord]:
        return [t for t in self.trials if t.status == rec.FAILED]


@dataclass
class Report:
    task: str
    arms: list[ArmResult]
    baseline: Arm
    table: str
    """mean ± std per arm, FAILED rows, intervals and paired differences (what the CLI prints)."""

    def as_dict(self) -> dict[str, Any]:
        def ivs(d):
            return {k: iv.as_dict() for k, iv in d.items()}

        return {"task": self.task, "baseline": self.baseline.label, "arms": [
            {"index": a.arm.index, "label": a.arm.label, "overrides": a.arm.overrides,
             "summary": {k: {"mean": m, "std": s} for k, (m, s) in a.summary.items()},
             "pooled": ivs(a.pooled), "vs_baseline": ivs(a.vs_baseline),
             "trials": [{"key": t.key, "seed": t.seed, "status": t.status, "reason": t.reason,
                         "run_name": t.run_name, "mlflow_run_id": t.mlflow_run_id, "attempts": t.attempts,
                         "test": {k[5:]: v for k, v in t.metrics.items() if k.startswith("test/")},
                         "intervals": ivs(a.per_run.get(t.key, {}))} for t in a.trials]}
            for a in self.arms]}


def test_metrics(record: rec.TrialRecord) -> dict[str, float]:
    return {k[len("test/"):]: float(v) for k, v in record.metrics.items() if k.startswith("test/")}


def build(task: str, arms: list[Arm], trials: list[Trial], records: dict[str, rec.TrialRecord],
          baseline: Arm) -> Report:
    """Aggregate the records (and the finished trials' predictions) into the sweep's :class:`Report`."""
    from dipro.bootstrap import align, bootstrap_paired, bootstrap_pooled, bootstrap_run
    from dipro.metrics import aggregate_seeds
    from dipro.train import rundir
    from data_sharding import storage
    from dipro.train.evaluate import load_predictions

    results = [ArmResult(arm, [records[t.key] for t in trials if t.arm.index == arm.index and t.key in records])
               for arm in arms]
    preds: dict[str, Any] = {}
    first = None
    for a in results:
        for t in a.finished:
            p = load_predictions(storage.resolve(t.run_dir) / rundir.TEST_PREDICTIONS)
            if first is None:
                first = (t.key, p)
            align(first[1].sample_keys, p.sample_keys, f"trials {first[0]} and {t.key} on test")
            preds[t.key] = p
    for a in results:
        if not a.finished:
            continue
        a.summary = aggregate_seeds([test_metrics(t) for t in a.finished])
        a.per_run = {t.key: bootstrap_run(task, preds[t.key].y_true, preds[t.key].y_prob) for t in a.finished}
        y = preds[a.finished[0].key].y_true
        a.pooled = bootstrap_pooled(task, y, [preds[t.key].y_prob for t in a.finished])
    base = next(a for a in results if a.arm.index == baseline.index)
    for a in results:
        if a is base or not a.finished or not base.finished:
            continue
        y = preds[a.finished[0].key].y_true
        a.vs_baseline = bootstrap_paired(task, y, [preds[t.key].y_prob for t in a.finished],
                                         [preds[t.key].y_prob for t in base.finished])
    return Report(task, results, baseline, format_report(task, results, baseline))


def format_report(task: str, results: list[ArmResult], baseline: Arm) -> str:
    from dipro.bootstrap import format_intervals
    from dipro.metrics import format_table

    n_trials = sum(len(a.trials) for a in results)
    rows = {f"{a.arm.label} ({len(a.finished)}/{len(a.trials)} seeds)": a.summary for a in results if a.finished}
    parts = [f"test metrics, mean ± std over seeds ({n_trials} trials)", format_table(rows, task) if rows else
             "no trial finished"]
    failed = [(a, t) for a in results for t in a.failed]
    if failed:
        parts.append("\n".join(f"FAILED {t.key} ({a.arm.label}, seed {t.seed}): {t.reason}" for a, t in failed))
    unfinished = [(a, t) for a in results for t in a.trials if not t.done]
    if unfinished:
        parts.append("\n".join(f"NOT FINISHED {t.key} ({a.arm.label}, seed {t.seed}): its process ended without "
                               "an outcome; --resume runs it again" for a, t in unfinished))
    ci_rows: dict[str, dict[str, Any]] = {}
    for a in results:
        for t in a.finished:
            ci_rows[f"{t.key} ({a.arm.label}, seed {t.seed})"] = a.per_run[t.key]
        if len(a.finished) > 1:
            ci_rows[f"{a.arm.label}: mean of {len(a.finished)} seeds"] = a.pooled
    if ci_rows:
        parts.append(format_intervals(ci_rows, task, title="test, 95 % bootstrap CI"))
    diff_rows = {f"{a.arm.label} - {baseline.label}": a.vs_baseline for a in results if a.vs_baseline}
    if diff_rows:
        parts.append(format_intervals(diff_rows, task, title="paired difference vs baseline"))
    return "\n\n".join(parts)


def summary_metrics(report: Report) -> dict[str, float]:
    """Flat metrics for the parent MLflow run: ``arm{i}/{metric}_{mean|std|low|high}`` and ``..._delta*``."""
    out: dict[str, float] = {}
    for a in report.arms:
        p = f"arm{a.arm.index:02d}/"
        for k, (mean, std) in a.summary.items():
            if "/" in k:
                continue
            out[f"{p}{k}_mean"], out[f"{p}{k}_std"] = mean, std
        for k, iv in a.pooled.items():
            if "/" not in k:
                out[f"{p}{k}_low"], out[f"{p}{k}_high"] = iv.low, iv.high
        for k, iv in a.vs_baseline.items():
            if "/" not in k:
                out[f"{p}{k}_delta"], out[f"{p}{k}_delta_low"], out[f"{p}{k}_delta_high"] = iv.value, iv.low, iv.high
        out[f"{p}finished"] = float(len(a.finished))
        out[f"{p}failed"] = float(len(a.failed))
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def figure(report: Report):
    """The comparison figure (``dipro.tracking.figures.comparison_figure``) of the arms that finished."""
    from dipro.metrics import METRIC_TITLES, TASK_METRICS
    from dipro.tracking.figures import comparison_figure

    arms = [(a.arm.label, a.pooled, {k: [test_metrics(t).get(k, math.nan) for t in a.finished]
                                     for k in TASK_METRICS[report.task]}) for a in report.arms if a.finished]
    if not arms:
        return None
    return comparison_figure(arms, list(TASK_METRICS[report.task]), METRIC_TITLES)
