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
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from data_sharding.errors import UserError

LOCK_NAME = ".dipro.lock"
POLL_S = 0.5


class LockedError(UserError):
    """Another process holds the output directory's lock."""


_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(r"([?&][^=&\s]*(?:pass|secret|token|key|sig|auth|cred)[^=&\s]*=)[^&\s'\"]*", re.IGNORECASE)


def redact_command(command: str) -> str:
    """A command line without credentials: URL ``user:password@`` and secret-looking query values masked."""
    return _SECRET_QUERY.sub(r"\1***", _URL_USERINFO.sub(r"\1***@", command))


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
def output_lock(directory: str | os.PathLike, what: str, wait_s: float = 0.0,
                command: str | None = None) -> Iterator[Path]:
    """Hold ``{directory}/.dipro.lock`` exclusively for the block (see module docstring).

    ``what`` names the output in the error (e.g. "shard directory").  Raises
    :class:`LockedError` naming the holder when the lock is taken and stays taken
    for ``wait_s`` seconds (0 = do not wait).
    """
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
