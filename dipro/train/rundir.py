"""A run's directory on the Ray storage path: claimed once, its claimant recorded, and the run's log.

    run_dir = claim(storage, run_name)      # mkdir (atomic: fails if it exists) + run.json
    log = RunLog(run_dir)                   # {run_dir}/train.log: driver messages, failures with full traces

Ray Train reuses a ``RunConfig(name=...)`` silently (it resumes that run's checkpoint), so a
second run with the same ``trainer.run_name`` must refuse before Ray starts.  The claim is one
``mkdir``: of two drivers racing for a name exactly one gets it; the other reads ``run.json``
and names the first (host, pid, command, start time).  A claim that never got to train (the
cluster could not host it, the tracking server was down) is released again.
"""
from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path

from data_sharding import atomic
from data_sharding.errors import ConfigError
from data_sharding.lock import describe_holder, holder_info, read_holder

MARKER = "run.json"
LOG = "train.log"
TEST_PREDICTIONS = "test_predictions.npz"
"""The best checkpoint's test predictions (labels, probabilities, sample keys): what a sweep's bootstrap
and paired comparisons read back. Kept on the storage path only, never logged to MLflow (stay ids)."""


def claim(storage: str | Path, run_name: str, owner: str | None = None) -> Path:
    """Create ``storage/run_name`` (exclusively) with its ``run.json``; ConfigError naming the claimant if taken.

    ``owner`` (a sweep trial: ``sweep:NAME/TRIAL``): a directory whose ``run.json`` names the same owner
    is that trial's own, left by an earlier attempt (a killed sweep driver), and is reclaimed as it is,
    checkpoints included: Ray Train resumes the run of the same name from its last checkpoint.
    """
    storage = Path(storage)
    run_dir = storage / run_name
    storage.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        info = read_holder(run_dir / MARKER)
        if owner is not None and info is not None and info.get("owner") == owner:
            atomic.write_text(run_dir / MARKER, json.dumps({**holder_info(), "run_name": run_name, "owner": owner,
                                                           "reclaimed_from": {k: v for k, v in info.items() if k != "reclaimed_from"}}) + "\n")
            return run_dir
        who = f"started by {describe_holder(info)}" if info else "written by an earlier run"
        raise ConfigError(f"run {run_name!r} already exists under {storage} ({who}): Ray would silently resume it. "
                          f"Choose another trainer.run_name, or continue it with --resume {run_name}") from None
    atomic.write_text(run_dir / MARKER, json.dumps({**holder_info(), "run_name": run_name,
                                                   **({"owner": owner} if owner else {})}) + "\n")
    return run_dir


def release(run_dir: str | Path) -> None:
    """Remove a claimed run directory that holds nothing but its marker and log (it never trained)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {MARKER, LOG}:
        shutil.rmtree(run_dir, ignore_errors=True)


class RunLog:
    """Append-only ``{run_dir}/train.log`` (or ``name``): time-stamped lines, and failures with their full traces."""

    def __init__(self, run_dir: str | Path, name: str = LOG) -> None:
        self.path = Path(run_dir) / name

    def write(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                for line in str(text).rstrip("\n").splitlines() or [""]:
                    f.write(f"{stamp} {line}\n")
        except OSError:
            pass  # the log must never be why a run fails

    def failure(self, summary: str, exc: BaseException | None = None, traces: dict[int, str] | None = None) -> None:
        """The one-line reason, every rank's trace (as the rank formatted it) and the driver's own."""
        parts = [f"FAILED: {summary}"]
        for rank, trace in sorted((traces or {}).items()):
            parts.append(f"--- rank {rank} ---\n{trace.rstrip()}")
        if exc is not None:
            parts.append("--- driver ---\n" + "".join(traceback.format_exception(exc)).rstrip())
        self.write("\n".join(parts))
