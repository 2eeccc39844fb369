"""One writer per output directory: an exclusive lock file that names its holder.

    with output_lock(shard_dir, "dipro shard", wait_s=0):
        ... write shards, commit the manifest ...

The lock is ``fcntl.flock`` on ``{dir}/.dipro.lock``: the kernel releases it when the
holding process exits, however it exits (SIGKILL included), so a crashed job never
leaves a stale lock.  The holder writes who it is into the file (host, pid, command,
start time); a second writer that finds the lock taken refuses at once, naming the
holder, or with ``wait_s > 0`` polls until the lock is free or the time is up.

Shared storage: on NFSv4 Linux maps ``flock`` to an NFS byte-range lock, which other
clients see; on NFSv3 without lockd, and on object-store mounts (s3fs, gcsfuse), a
lock may only be visible on the machine that took it.  There, run one writer per
directory (e.g. one regeneration job at a time); the holder information in the lock
file still says who wrote last.

Buckets (``s3://`` / ``gs://``, :mod:`data_sharding.storage`): the lock is the object
``{prefix}/.dipro.lock``, created by a conditional write (``If-None-Match: *`` / GCS
``ifGenerationMatch=0``: of two writers exactly one creates it) holding the holder
information and an expiry.  The holder renews it every ``ttl/3`` seconds with a write
conditional on its own version; a holder that dies stops renewing, and once the expiry
has passed the next writer takes the lock over (again by a conditional write, so of two
takers one wins).  Releasing deletes it (conditional on the holder's version).  A holder
that failed to renew in time (it stalled past the expiry and someone took over) is told
by :meth:`ObjectLock.check` before it commits.  The TTL is ``DIPRO_LOCK_TTL_S`` (default
120 s).  The manifest's own conditional commit is a second guard: even two writers that
both believed they held the lock cannot both commit.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from data_sharding.errors import UserError

LOCK_NAME = ".dipro.lock"
POLL_S = 0.5


class LockedError(UserError):
    """Another process holds the output directory's lock."""


def redact_command(command: str) -> str:
    """A command line without credentials: URL ``user:password@`` and secret-looking query values masked."""
    from data_sharding.storage import redact

    return redact(command)


def holder_info(command: str | None = None) -> dict[str, object]:
    """Who this process is: host, pid, command line (credentials masked), start time (ISO 8601, local time)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "command": redact_command(command or " ".join(shlex.quote(a) for a in sys.argv)),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe_holder(info: dict | None) -> str:
    if not info:
        return "another process (no holder information recorded)"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, running `{info.get('command', '?')}` "
            f"since {info.get('started', '?')}")


def read_holder(lock_file: Path) -> dict | None:
    try:
        info = json.loads(Path(lock_file).read_text() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextlib.contextmanager
def output_lock(directory, what: str, wait_s: float = 0.0, command: str | None = None) -> Iterator[Any]:
    """Hold ``{directory}/.dipro.lock`` exclusively for the block (see module docstring).

    ``what`` names the output in the error (e.g. "shard directory").  Raises
    :class:`LockedError` naming the holder when the lock is taken and stays taken
    for ``wait_s`` seconds (0 = do not wait).  Yields the lock file's path (local) or the
    :class:`ObjectLock` (bucket).
    """
    from data_sharding import storage

    if storage.is_remote(directory):
        lock = ObjectLock(storage.resolve(directory), what, command)
        lock.acquire(wait_s)
        try:
            yield lock
        finally:
            lock.release()
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
                raise LockedError(
                    f"{what} {directory} is being written by {describe_holder(read_holder(path))}{waited}; "
                    f"wait for it to finish, or pass --lock-timeout SECONDS to wait (lock file {path})")
            time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info(command)) + "\n").encode(), 0)
        os.fsync(fd)
        yield path
    finally:
        os.close(fd)  # releases the flock


def lock_ttl_s() -> float:
    return float(os.environ.get("DIPRO_LOCK_TTL_S", "120"))


class ObjectLock:
    """The lock object of a bucket prefix (see the module docstring)."""

    def __init__(self, directory, what: str, command: str | None = None, ttl_s: float | None = None) -> None:
        self.directory, self.what = directory, what
        self.loc = directory / LOCK_NAME
        self.ttl_s = float(ttl_s if ttl_s is not None else lock_ttl_s())
        self.info = holder_info(command)
        self.token: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        return (json.dumps({**self.info, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s}) + "\n").encode()

    def acquire(self, wait_s: float = 0.0) -> None:
        from data_sharding import storage

        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                self.token = self.loc.put(self._body(), if_absent=True)
                break
            except storage.PreconditionFailed:
                pass
            try:
                data, token = self.loc.read_versioned()
                held = json.loads(data or b"null")
            except storage.NotFound:
                continue  # released in between: try to create it again at once
            except ValueError:
                held, token = None, self.loc.stat().token
            expires = held.get("expires") if isinstance(held, dict) else None
            if not isinstance(expires, (int, float)) or expires < time.time():
                try:  # expired (its holder died) or unreadable: take it over, conditionally
                    self.token = self.loc.put(self._body(), if_match=token)
                    break
                except (storage.PreconditionFailed, storage.NotFound):
                    continue
            if time.monotonic() >= deadline:
                waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
                left = max(0.0, expires - time.time())
                raise LockedError(
                    f"{self.what} {self.directory} is being written by {describe_holder(held)}{waited}; wait for it "
                    f"to finish, or pass --lock-timeout SECONDS to wait (lock object {self.loc}; a holder that died "
                    f"frees it when it expires, in {left:.0f} s)")
            time.sleep(POLL_S)
        self._renewed = time.time()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="dipro-lock-renew")
        self._thread.start()

    def _renew(self) -> None:
        from data_sharding import storage

        while not self._stop.wait(self.ttl_s / 3):
            with self._mutex:
                if self._stop.is_set():
                    return
                try:
                    self.token = self.loc.put(self._body(), if_match=self.token)
                    self._renewed = time.time()
                except (storage.PreconditionFailed, storage.NotFound):
                    self.lost = "another writer took the lock over (this one did not renew it before it expired)"
                    return
                except Exception as exc:  # an outage longer than the layer's retries: try again next period
                    if time.time() - self._renewed > self.ttl_s:
                        self.lost = f"could not renew it for {self.ttl_s:g} s ({storage.redact(exc)})"
                        return

    def check(self) -> None:
        """LockedError when this holder no longer holds the lock (call before committing)."""
        if self.lost:
            raise LockedError(f"lost the lock of {self.what} {self.directory}: {self.lost}; nothing was committed")

    def release(self) -> None:
        from data_sharding import storage

        self._stop.set()
        with self._mutex:
            if self._thread is not None:
                self._thread.join(timeout=1)
            if self.token is not None and not self.lost:
                with contextlib.suppress(storage.PreconditionFailed, storage.StorageAccessError):
                    self.loc.delete(if_match=self.token)
            self.token = None
