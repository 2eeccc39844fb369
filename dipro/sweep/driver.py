"""The sweep driver: grid x seeds as concurrent Ray Train runs on Ray Tune, resumable, tracked, with statistics.

    result = run_sweep(cfg, grid={"model.use_ehr": ["true", "false"]}, seeds=[23, 29, 66])
    result = run_sweep(None, resume="mortality-sweep-...", storage="runs")     # after a killed driver
    print(result.report.table)

Steps (:func:`run_sweep`): resolve the base config's paths (trials run in Ray's session
directory) -> expand the trials and build each one's config (a value that makes no valid config
is a FAILED row at once) -> write ``sweep.json`` -> join / start Ray -> size the concurrency ->
find or create the MLflow parent and children -> run the unfinished trials on a ``ray.tune.Tuner``
(one function-trainable trial per training run, :mod:`dipro.sweep.trial`) -> read every trial's
record -> tables and bootstrap statistics (:mod:`dipro.sweep.report`) -> ``results.json|txt``, the
parent run's table, metrics and comparison figure.

Concurrency: ``--max-concurrent`` or what the cluster can place at once: its CPUs (GPUs with
``trainer.use_gpu``) divided by the largest trial's worker group (``workers x resources per
worker``, an elastic group at its MIN) plus the trial actor's 0.01 CPU.  The trials beyond it wait
in Tune's queue, not in Ray Train's scheduler, so none of them spends ``trainer.schedule_timeout_s``
waiting for CPUs that the other trials hold.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_sharding import ray_init
from data_sharding.storage import Location
from data_sharding.errors import ConfigError
from dipro.config import Config, from_dict, replace, to_dict
from dipro.sweep import record as rec
from dipro.sweep.grid import Arm, Trial, baseline_arm, expand, make_trials

TRIAL_CPU = 0.01
"""The trial actor's own CPU share (0 is refused by Tune): the worker group's CPUs are Ray Train's."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class SweepResult:
    name: str
    root: Location
    report: Any
    """:class:`dipro.sweep.report.Report`."""
    records: dict[str, rec.TrialRecord]
    trials: list[Trial]
    parent_run_id: str | None = None
    concurrency: int = 0


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[dipro sweep] {msg}", file=sys.stdout)


def new_name(cfg: Config) -> str:
    return f"{cfg.task}-sweep-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _abs(path: str) -> str:
    """An absolute local path, or a bucket URI as it is."""
    from data_sharding import storage

    return storage.resolve(path).uri


def resolve_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose storage path, shards, local backbone weights and tracking URI are absolute
    (a trial runs in Ray's session directory, where relative paths mean something else)."""
    trainer = dataclasses.replace(cfg.trainer, storage_path=_abs(cfg.trainer.storage_path))
    data = dataclasses.replace(cfg.data, shards=_abs(cfg.data.shards))
    weights = cfg.model.backbone_weights
    model = dataclasses.replace(cfg.model, backbone_weights=weights if weights in (None, "imagenet") else _abs(weights))
    tracking = cfg.tracking
    if tracking.enabled:
        from dipro.tracking.uri import resolve_tracking_uri

        tracking = dataclasses.replace(tracking, uri=resolve_tracking_uri(cfg))  # credentials go to the env
    return dataclasses.replace(cfg, trainer=trainer, data=data, model=model, tracking=tracking)


def trial_configs(base: Config, name: str, root: Location, trials: list[Trial]) -> tuple[dict[str, Config], dict[str, str]]:
    """Each trial's config (its overrides, deterministic run name, the sweep's directory as storage path);
    ``{key: one-line reason}`` for values that make no valid config."""
    cfgs, invalid = {}, {}
    for t in trials:
        try:
            c = replace(base, t.overrides)
        except ConfigError as exc:
            invalid[t.key] = str(exc)
            continue
        cfgs[t.key] = dataclasses.replace(c, trainer=dataclasses.replace(
            c.trainer, run_name=t.run_name(name), storage_path=str(root)))
    return cfgs, invalid


def placeable(cfgs: list[Config]) -> tuple[int, str]:
    """How many of these trials the connected cluster can run at once, and how that was worked out."""
    import ray

    res = ray.cluster_resources()
    cpu = max(c.trainer.min_workers * c.trainer.cpus_per_worker for c in cfgs) + TRIAL_CPU
    n = math.floor(res.get("CPU", 0) / cpu + 1e-9)
    why = f"{res.get('CPU', 0):g} CPUs / {cpu:g} per trial"
    if any(c.trainer.use_gpu for c in cfgs):
        gpu = max(c.trainer.min_workers * c.trainer.gpus_per_worker for c in cfgs if c.trainer.use_gpu)
        n = min(n, math.floor(res.get("GPU", 0) / gpu + 1e-9))
        why += f", {res.get('GPU', 0):g} GPUs / {gpu:g} per trial"
    return max(1, n), why


def _definition(cfg: Config | None, grid: dict[str, list[str]], seeds: list[int], name: str | None,
                resume: str | None, storage: str | None, baseline: str | None,
                tracking_uri: str | None) -> tuple[rec.SweepDefinition, Config, Location, bool]:
    """(definition, resolved base config, sweep directory, is new)."""
    from dipro.tracking.uri import MASK, redact_config

    if resume:
        from dipro import defaults

        root = rec.sweep_dir(_abs(storage or defaults.STORAGE_PATH), resume)
        definition = rec.read_definition(root)
        base = from_dict(definition.config)
        if tracking_uri:
            base = dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, uri=tracking_uri))
        elif base.tracking.enabled and MASK in (base.tracking.uri or ""):
            raise ConfigError(f"{root / rec.DEFINITION} holds the tracking URI without its password "
                              f"({base.tracking.uri}); give it again with --tracking-uri")
        return definition, resolve_paths(base), root, False
    if cfg is None:
        raise ConfigError("dipro sweep needs --config FILE (or --resume NAME)")
    if tracking_uri:
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=tracking_uri))
    base = resolve_paths(cfg)
    name = name or new_name(base)
    if not NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '.', '-' (up to 100, not starting with . - _)")
    root = rec.sweep_dir(base.trainer.storage_path, name)
    if (root / rec.DEFINITION).exists():
        raise ConfigError(f"sweep {name!r} already exists under {base.trainer.storage_path}; continue it with "
                          f"dipro sweep --resume {name}, or choose another --name")
    return rec.SweepDefinition(name, redact_config(to_dict(base)), grid, list(seeds), baseline), base, root, True


def run_sweep(cfg: Config | None, *, grid: dict[str, list[str]] | None = None, seeds: list[int] | None = None,
              name: str | None = None, resume: str | None = None, storage: str | None = None,
              max_concurrent: int | None = None, baseline: str | None = None, tracking_uri: str | None = None,
              retry_failed: bool = False, out_dir: str | Path | None = None) -> SweepResult:
    """Run (or ``resume``) a sweep; see the module docstring."""
    from dipro.defaults import PAPER_SEEDS
    from dipro.train import rundir

    definition, base, root, is_new = _definition(cfg, grid or {}, list(seeds or PAPER_SEEDS), name, resume, storage,
                                                 baseline, tracking_uri)
    name = definition.name
    arms = expand(definition.grid)
    trials = make_trials(arms, definition.seeds)
    base_arm = baseline_arm(arms, definition.baseline)
    cfgs, invalid = trial_configs(base, name, root, trials)
    if is_new:
        rec.write_definition(root, definition)
    log = rundir.RunLog(root, rec.LOG)
    _say(f"sweep {name}: {len(arms)} arm(s) x {len(definition.seeds)} seed(s) = {len(trials)} trials of {base.task}; "
         f"directory {root}; Ray, Tune and the trials' messages go to {log.path}")
    records = {t.key: r for t in trials if (r := rec.read_record(root, t.key)) is not None}
    for key, reason in invalid.items():  # no config, no run: a FAILED row now (and on every resume)
        t = next(t for t in trials if t.key == key)
        records[key] = rec.TrialRecord(key, t.arm.index, t.seed, t.run_name(name), status=rec.FAILED, reason=reason)
    todo = [t for t in trials if t.key in cfgs and not (
        t.key in records and (records[t.key].status == rec.FINISHED or (records[t.key].status == rec.FAILED
                                                                          and not retry_failed)))]
    skipped = len(trials) - len(todo) - len(invalid)
    if skipped:
        _say(f"{skipped} trial(s) already finished or failed: not run again"
             + ("" if retry_failed else " (--retry-failed runs failed ones again)"))
    parent = None
    concurrency = 0
    if base.tracking.enabled:
        import mlflow  # noqa: F401 (mlflow configures its loggers on import: take them over after that)

        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" line per trial
    with ray_init.loggers_to_file(log.path, _library_loggers()):
        parent, trackers = _track(base, name, definition, trials, cfgs, invalid, records, root)
        for key, reason in invalid.items():
            rec.write_record(root, records[key])
            _say(f"trial {key} FAILED before it started: {reason}")
        try:
            if todo:
                concurrency = _run_tune(name, root, todo, cfgs, trackers, max_concurrent, log)
        except BaseException:
            if parent is not None:
                parent.finish("KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
            raise
    for t in trials:
        r = rec.read_record(root, t.key)
        if r is not None:
            records[t.key] = r
    from dipro.sweep import report as rep

    report = rep.build(base.task, arms, [t for t in trials if t.key in records], records, base_arm)
    _write_results(root, out_dir, definition, report)
    if parent is not None:
        _finish_parent(parent, report)
    return SweepResult(name, root, report, records, trials, parent.run_id if parent is not None else None,
                       concurrency)


def _library_loggers() -> tuple[str, ...]:
    from dipro.train.launcher import LIBRARY_LOGGERS

    return (*LIBRARY_LOGGERS, "ray.tune", "ray.train")


def _track(base: Config, name: str, definition: rec.SweepDefinition, trials: list[Trial], cfgs: dict[str, Config],
           invalid: dict[str, str], records: dict[str, rec.TrialRecord], root: Location):
    """The parent and one child per trial (found by tags on resume); (None, {}) without tracking."""
    import json

    if not base.tracking.enabled:
        return None, {}
    from dipro.sweep import runs
    from dipro.train.failures import failure_tags

    found = runs.find_runs(base, name)
    parent = runs.parent_tracker(base, name, found, {
        "sweep.name": name, "sweep.grid": json.dumps(definition.grid), "sweep.seeds": ",".join(map(str, definition.seeds)),
        "sweep.baseline": definition.baseline or "first grid values", "sweep.trials": len(trials),
        "sweep.directory": str(root)})
    trackers = {}
    for t in trials:
        tracker = runs.trial_tracker(cfgs.get(t.key, base), t.run_name(name), name, t.key, parent.run_id, found,
                                     t.overrides)
        if t.key in invalid:
            records[t.key].mlflow_run_id = tracker.run_id
            tracker.set_tags({**failure_tags(invalid[t.key], None), "dipro.sweep.status": rec.FAILED})
            tracker.finish("FAILED")
        else:
            trackers[t.key] = tracker
    return parent, trackers


def _run_tune(name: str, root: Location, todo: list[Trial], cfgs: dict[str, Config], trackers: dict[str, Any],
              max_concurrent: int | None, log) -> int:
    """Start / join Ray and run ``todo`` as Tune trials; returns the concurrency used."""
    import ray
    from ray import tune

    from dipro.sweep.progress import SweepProgress
    from dipro.sweep.trial import run_trial
    from dipro.train import faults
    from dipro.train.launcher import ray_storage

    started = ray_init.init_ray(log_to_driver=True) and not os.environ.get("RAY_ADDRESS")
    try:
        with ray_init.worker_lines_to(log.write):
            fits, why = placeable([cfgs[t.key] for t in todo])
            concurrency = min(max_concurrent or fits, len(todo))
            if max_concurrent and max_concurrent > fits:
                _say(f"warning: --max-concurrent {max_concurrent} but the cluster places {fits} trial(s) at once "
                     f"({why}); the others wait for workers, up to trainer.schedule_timeout_s each")
            _say(f"running {len(todo)} trial(s), {concurrency} at a time ({why}"
                 + (f", --max-concurrent {max_concurrent})" if max_concurrent else ")"))
            specs = {t.key: {"key": t.key, "arm": t.arm.index, "seed": t.seed, "run_name": t.run_name(name),
                             "owner": t.owner(name), "sweep_dir": str(root), "cfg": to_dict(cfgs[t.key]),
                             "tracker": trackers.get(t.key), "faults": os.environ.get(faults.ENV)} for t in todo}
            attempt = 1 + len({o.path.split("/", 1)[0] for o in root.list() if o.path.startswith("tune-")})
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new console output ignores verbose=0
            trainable = tune.with_resources(tune.with_parameters(run_trial, specs=specs), {"cpu": TRIAL_CPU})
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([t.key for t in todo])},
                # reuse_actors: a finished trial's actor takes the next queued trial (no new process, no imports)
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
                run_config=tune.RunConfig(name=f"tune-{attempt}", **ray_storage(root), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          callbacks=[SweepProgress(root, {t.key: t for t in todo}, _say)]))
            tuner.fit()
        return concurrency
    finally:
        if started:
            ray.shutdown()


def _write_results(root: Location, out_dir: str | Path | None, definition: rec.SweepDefinition, report) -> None:
    import json

    payload = json.dumps({"name": definition.name, "grid": definition.grid, "seeds": definition.seeds,
                          **report.as_dict()}, indent=1, default=_json_float)
    from data_sharding import storage

    for where in [root] + ([storage.resolve(out_dir)] if out_dir is not None else []):
        (where / f"{rec.RESULTS}.json").write_text(payload + "\n")
        (where / f"{rec.RESULTS}.txt").write_text(report.table + "\n")


def _json_float(o: Any) -> Any:
    return float(o)


def _finish_parent(parent, report) -> None:
    from dipro.sweep import report as rep

    parent.log_metrics(rep.summary_metrics(report), step=0)
    parent.log_text(report.table + "\n", "sweep_table.txt")
    parent.log_dict(report.as_dict(), "sweep_results.json")
    fig = rep.figure(report)
    if fig is not None:
        parent.log_figure(fig, "comparison.png")
    failed = sum(len(a.failed) for a in report.arms)
    parent.set_tags({"sweep.failed_trials": str(failed),
                     "sweep.finished_trials": str(sum(len(a.finished) for a in report.arms))})
    parent.finish("FINISHED")
