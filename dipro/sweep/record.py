"""What a sweep keeps on the storage path, and the only thing ``--resume`` trusts.

    {storage}/{sweep}/sweep.json            the definition: base config, grid, seeds, baseline (written once)
    {storage}/{sweep}/trials/{key}.json     one record per trial: RUNNING -> FINISHED | FAILED, times, run ids
    {storage}/{sweep}/{sweep}-{key}/        the trial's run directory (checkpoints, best/, train.log, summary.json)
    {storage}/{sweep}/tune-{n}/             Ray Tune's experiment directory of the n-th driver (start, resumes)
    {storage}/{sweep}/results.json|.txt     the tables (mean ± std, bootstrap intervals, paired differences)
    {storage}/{sweep}/sweep.log             everything the trials' processes printed (Ray forwards it here)

A trial's record is written by the trial itself (atomically) when it starts and when it ends, so
after a SIGKILL of the driver the records say exactly which trials finished (not rerun), which
failed (not rerun unless asked) and which were interrupted (rerun: they continue from their last
checkpoint in their own run directory).  Tune's own experiment snapshot is written every few
seconds and can miss the last trial to finish; the records cannot.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from data_sharding import storage
from data_sharding.errors import ConfigError, DataError

DEFINITION = "sweep.json"
TRIALS_DIR = "trials"
LOG = "sweep.log"
RESULTS = "results"

RUNNING, FINISHED, FAILED = "RUNNING", "FINISHED", "FAILED"


@dataclass
class SweepDefinition:
    name: str
    config: dict[str, Any]
    """The resolved base config (``dipro.config.to_dict``; tracking.uri without credentials; paths absolute)."""
    grid: dict[str, list[str]]
    seeds: list[int]
    baseline: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))


@dataclass
class TrialRecord:
    key: str
    arm: int
    seed: int
    run_name: str
    status: str = RUNNING
    reason: str | None = None
    """A FAILED trial's one-line reason."""
    attempts: int = 0
    """How many times the trial started (a resumed sweep restarts interrupted trials)."""
    started: float | None = None
    """Wall-clock time (time.time()) the current attempt started."""
    first_started: float | None = None
    ended: float | None = None
    mlflow_run_id: str | None = None
    run_dir: str | None = None
    best_checkpoint: str | None = None
    epochs_completed: int | None = None
    global_step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """``val/*`` of the best epoch and ``test/*`` of the best checkpoint (as ``TrainResult.metrics``)."""
    history: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) wall-clock times of every finished attempt (the sweep's timeline)."""

    @property
    def done(self) -> bool:
        return self.status in (FINISHED, FAILED)


def sweep_dir(storage_path, name: str) -> storage.Location:
    """``{storage_path}/{name}``: a local directory or a bucket prefix (:mod:`data_sharding.storage`)."""
    return storage.resolve(storage_path) / name


def write_definition(root: storage.Location, definition: SweepDefinition) -> None:
    (root / DEFINITION).write_text(json.dumps(asdict(definition), indent=1) + "\n")


def read_definition(root: storage.Location) -> SweepDefinition:
    path = root / DEFINITION
    try:
        text = path.read_text()
    except storage.NotFound:
        raise ConfigError(f"no sweep at {root} ({DEFINITION} missing): start it with dipro sweep --config FILE "
                          f"--name {root.name}, or give the storage path it was started with "
                          "(trainer.storage_path=...)") from None
    try:
        return SweepDefinition(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a sweep definition ({exc})") from None


def record_path(root: storage.Location, key: str) -> storage.Location:
    return root / TRIALS_DIR / f"{key}.json"


def read_record(root: storage.Location, key: str) -> TrialRecord | None:
    path = record_path(root, key)
    try:
        text = path.read_text()
    except storage.NotFound:
        return None
    try:
        data = json.loads(text)
        data["history"] = [tuple(x) for x in data.get("history", [])]
        return TrialRecord(**data)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a trial record ({exc}); delete it to run that trial again") from None


def write_record(root: storage.Location, record: TrialRecord) -> None:
    """Written atomically (temp + rename locally, one PUT on a bucket)."""
    record_path(root, record.key).write_text(json.dumps(asdict(record), indent=1, default=float) + "\n")
