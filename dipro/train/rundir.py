"""A run's directory on the Ray storage path: claimed once, its claimant recorded, and the run's log.

    run_dir = claim(storage, run_name)      # exclusive: mkdir locally, a conditional create of run.json on a bucket
    log = RunLog(run_dir)                   # {run_dir}/train.log: driver messages, failures with full traces

Ray Train reuses a ``RunConfig(name=...)`` silently (it resumes that run's checkpoint), so a
second run with the same ``trainer.run_name`` must refuse before Ray starts.  The claim is one
atomic step: locally ``mkdir``; on a bucket (``trainer.storage_path=s3://...`` / ``gs://...``), which
has no directories, the create-if-absent of ``run.json`` (S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``).  Of two drivers racing for a name exactly one gets it; the other reads
``run.json`` and names the first (host, pid, command, start time).  A claim that never got to
train (the cluster could not host it, the tracking server was down) is released again.

``train.log`` is appended to line by line, also by the driver's logging handlers and Ray's worker
output.  An object cannot be appended to, so on a bucket the log is written to a local file and
uploaded whole (one atomic PUT) at most every :data:`UPLOAD_EVERY_S` seconds while it changes, at
once after a failure is written, and when the run ends (:meth:`RunLog.close`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from data_sharding import atomic, storage
from data_sharding.errors import ConfigError
from data_sharding.lock import describe_holder, holder_info
from data_sharding.storage import Location

MARKER = "run.json"
LOG = "train.log"
TEST_PREDICTIONS = "test_predictions.npz"
"""The best checkpoint's test predictions (labels, probabilities, sample keys): what a sweep's bootstrap
and paired comparisons read back. Kept on the storage path only, never logged to MLflow (stay ids)."""
UPLOAD_EVERY_S = 10.0
"""On a bucket: the longest a changed ``train.log`` waits before it is uploaded again."""


def claim(storage_path: str | Path | Location, run_name: str, owner: str | None = None) -> Path | Location:
    """Create ``storage/run_name`` (exclusively) with its ``run.json``; ConfigError naming the claimant if taken.

    Returns the run directory: a Path for a local storage path, the bucket :class:`Location` otherwise.
    ``owner`` (a sweep trial: ``sweep:NAME/TRIAL``): a directory whose ``run.json`` names the same owner
    is that trial's own, left by an earlier attempt (a killed sweep driver), and is reclaimed as it is,
    checkpoints included: Ray Train resumes the run of the same name from its last checkpoint.
    """
    root = storage.resolve(storage_path)
    run_dir = root / run_name
    marker = {**holder_info(), "run_name": run_name, **({"owner": owner} if owner else {})}
    if not _create(run_dir, json.dumps(marker) + "\n"):
        info = read_claim(run_dir)
        if owner is not None and info is not None and info.get("owner") == owner:
            reclaimed = {**marker, "reclaimed_from": {k: v for k, v in info.items() if k != "reclaimed_from"}}
            (run_dir / MARKER).write_text(json.dumps(reclaimed) + "\n")
            return run_dir.native
        who = f"started by {describe_holder(info)}" if info else "written by an earlier run"
        raise ConfigError(f"run {run_name!r} already exists under {root} ({who}): Ray would silently resume it. "
                          f"Choose another trainer.run_name, or continue it with --resume {run_name}")
    return run_dir.native


def _create(run_dir: Location, marker: str) -> bool:
    """The one atomic claim step (module docstring); False when someone else has the name."""
    if run_dir.is_remote:
        if run_dir.is_dir():  # objects without a run.json (written by something else): Ray would resume them too
            return False
        try:
            (run_dir / MARKER).put(marker.encode("utf-8"), if_absent=True)
        except storage.PreconditionFailed:
            return False
        return True
    run_dir.parent.makedirs()
    try:
        os.mkdir(run_dir.local)
    except FileExistsError:
        return False
    atomic.write_text(run_dir.local / MARKER, marker)
    return True


def read_claim(run_dir: str | Path | Location) -> dict | None:
    """The claimant recorded in ``run_dir/run.json`` (None when absent or unreadable)."""
    try:
        info = json.loads((storage.resolve(run_dir) / MARKER).read_text() or "null")
    except (OSError, ValueError):  # storage.NotFound is an OSError
        return None
    return info if isinstance(info, dict) else None


def release(run_dir: str | Path | Location) -> None:
    """Remove a claimed run directory that holds nothing but its marker and log (it never trained)."""
    loc = storage.resolve(run_dir)
    if loc.is_remote:
        names = {info.path for info in loc.list()}
    elif loc.local.is_dir():
        names = {p.name for p in loc.local.iterdir()}  # directories count: an empty checkpoint dir means it ran
    else:
        return
    if names <= {MARKER, LOG}:
        loc.remove_tree()


class RunLog:
    """Append-only ``{run_dir}/train.log`` (or ``name``): time-stamped lines, and failures with their full traces.

    :attr:`path` is the local file every writer appends to (the log itself for a local run directory);
    :attr:`location` is where the log lives (what to tell the user).  On a bucket a daemon thread uploads
    :attr:`path` whole while it changes (module docstring); :meth:`close` uploads it a last time.
    """

    def __init__(self, run_dir: str | Path | Location, name: str = LOG, upload_every_s: float = UPLOAD_EVERY_S) -> None:
        self.location = storage.resolve(run_dir) / name
        self._staging: Path | None = None
        self._uploaded: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if not self.location.is_remote:
            self.path = self.location.local
            return
        self._staging = Path(tempfile.mkdtemp(prefix="dipro-run-log-"))
        self.path = self._staging / name
        self.path.touch()
        self._thread = threading.Thread(target=self._upload_loop, args=(upload_every_s,), daemon=True,
                                        name="dipro-run-log-upload")
        self._thread.start()

    def __str__(self) -> str:
        return self.location.uri

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
        self.flush()

    # -- on a bucket
    def flush(self) -> bool:
        """Upload the local log if it changed since the last upload (bucket only); False if that failed."""
        if self._staging is None:
            return True
        with self._lock:
            try:
                st = self.path.stat()
                if (st.st_size, st.st_mtime_ns) == self._uploaded:
                    return True
                self.location.write_bytes(self.path.read_bytes())
                self._uploaded = (st.st_size, st.st_mtime_ns)
                return True
            except Exception:  # noqa: BLE001 -- retried at the next interval; the log must never be why a run fails
                return False

    def _upload_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.flush()

    def close(self) -> None:
        """Stop uploading; upload the log a last time (bucket only).  Idempotent."""
        if self._staging is None or self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.flush():
            shutil.rmtree(self._staging, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                print(f"[dipro train] could not upload {self.location}; the log is kept at {self.path}",
                      file=sys.stderr, flush=True)

    def discard(self) -> None:
        """Stop uploading and drop the local copy (the run directory is being released)."""
        if self._staging is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        shutil.rmtree(self._staging, ignore_errors=True)
