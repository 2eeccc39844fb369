"""One sweep trial: a Ray Tune function trainable that runs one full ``dipro train`` (its own TorchTrainer).

Tune runs :func:`run_trial` in a trial actor that holds a token 0.01 CPU (the worker group's CPUs
and GPUs are reserved by Ray Train V2's own placement group, not twice by Tune); the actor is reused
for the next queued trial (``reuse_actors``), so a freed slot is busy again without a new process
and its imports.  The trial

1. returns at once if its record says FINISHED (a trial whose end Tune did not record before its
   driver died is not trained again);
2. records itself RUNNING (attempt n) and marks its MLflow child run RUNNING again;
3. calls :func:`dipro.train.launcher.launch` with its deterministic run name and ``owner``: an
   interrupted earlier attempt's run directory is reclaimed and Ray Train continues from its last
   checkpoint, logging into the same MLflow run;
4. records FINISHED (metrics, paths) or FAILED with the one-line reason (a bad value, a rank
   error: the other trials go on) and reports the outcome to Tune.

Relative paths were resolved by the sweep driver: the trial's working directory is in Ray's
session directory.
"""
from __future__ import annotations

import os
import time
from typing import Any

from dipro.sweep import record as rec

STATUS_CODES = {rec.FINISHED: 1.0, rec.FAILED: 0.0}


def run_trial(config: dict[str, Any], specs: dict[str, dict[str, Any]]) -> None:
    """Ray Tune entry point: ``config["trial"]`` is the trial key; ``specs`` come from the driver."""
    t0 = time.time()  # the slot is this trial's from here (the imports below are part of its work)
    from ray import tune

    outcome = execute(specs[config["trial"]], started=t0)
    tune.report({"finished": STATUS_CODES[outcome.status],
                 **{k: float(v) for k, v in outcome.metrics.items() if k.startswith("test/")}})


def one_line(exc: BaseException) -> str:
    from data_sharding.errors import UserError
    from dipro.train.failures import first_line

    text = first_line(str(exc))
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text[:300]}"


def execute(spec: dict[str, Any], started: float | None = None) -> rec.TrialRecord:
    """Run (or skip, when already finished) the trial ``spec`` describes; returns its final record."""
    now = started or time.time()
    from dipro.config import from_dict
    from dipro.train import faults
    from dipro.train.launcher import launch

    from data_sharding import storage

    root = storage.resolve(spec["sweep_dir"])
    record = rec.read_record(root, spec["key"]) or rec.TrialRecord(
        key=spec["key"], arm=spec["arm"], seed=spec["seed"], run_name=spec["run_name"])
    if record.status == rec.FINISHED:
        return record
    record.status, record.reason, record.ended = rec.RUNNING, None, None
    record.attempts += 1
    record.started = now
    record.first_started = record.first_started or now
    tracker = spec.get("tracker")
    record.mlflow_run_id = tracker.run_id if tracker is not None else None
    rec.write_record(root, record)
    if spec.get("faults"):
        os.environ[faults.ENV] = spec["faults"]
    if tracker is not None:
        tracker.mark_running()
    try:
        result = launch(from_dict(spec["cfg"]), tracker=tracker, owner=spec["owner"])
    except Exception as exc:  # every failure is this trial's FAILED row; the sweep goes on
        from dipro.train.failures import failure_tags

        record.status, record.reason = rec.FAILED, one_line(exc)
        if tracker is not None:  # launch marks fit failures itself; a preflight refusal it does not
            tracker.set_tags({**failure_tags(record.reason, None), "dipro.sweep.status": rec.FAILED})
            tracker.finish("FAILED")
    else:
        record.status = rec.FINISHED
        record.run_dir, record.best_checkpoint = str(result.run_dir), str(result.best_checkpoint)
        record.epochs_completed, record.global_step = result.epochs_completed, result.global_step
        record.metrics = {k: float(v) for k, v in result.metrics.items()}
    record.ended = time.time()
    record.history.append((record.started, record.ended))
    rec.write_record(root, record)
    return record
