"""Outputs that are never half-written: one helper for files and one for directories.

* :func:`open_atomic` / :func:`save_atomic` / :func:`write_bytes` / :func:`write_text`:
  the data goes to a sibling temp file (``.{name}.tmp-{pid}-{hex}``), is fsynced and
  renamed onto the target only when it was written completely.  On any failure the
  temp file is removed and the target keeps its previous contents.
* :func:`atomic_dir`: a sibling temp directory, renamed onto the target when the block
  succeeds (an existing target is moved aside first and deleted after); removed on failure.
  :func:`copy_dir` copies a directory that way.
* A write that fails because the disk is full, a quota or file-size limit was hit or
  the file system is read-only becomes a :class:`StorageError`: one line naming the
  file, the reason and that the previous output is unchanged (the CLI prints it, exit 2).
  Other failures keep their type (a bug keeps its traceback).

* A directory that may live in a bucket: :mod:`data_sharding.publish` (built on :func:`atomic_dir`).

Temp names start with ``.`` and hold ``.tmp-``, so no reader mistakes one for an output.
A rename is atomic on one POSIX file system (local disks, NFS); object-store mounts
(s3fs, gcsfuse) copy instead, and a crash there can leave the temp name behind, never
a half-written target.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Callable, Iterator

from data_sharding.errors import UserError

#: errno values that mean "this storage cannot take the write", not "the program is wrong".
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file too large for the file-size limit",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


class StorageError(UserError):
    """A write failed for lack of space, quota or file-size limit, or on a read-only file system.

    ``path`` is the file that could not be written, ``reason`` why (e.g. "no space left on the device").
    """

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = str(path), reason

    def __reduce__(self):
        return (type(self), (str(self), self.path, self.reason))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_errno(exc: BaseException) -> int | None:
    """The storage errno behind ``exc`` (itself or an exception it was raised from), else None.

    Libraries wrap the OSError: pyarrow raises ``OSError(27, 'Error writing bytes ...')``,
    ``torch.save`` into a Python file a ``RuntimeError`` whose context is the OSError.
    """
    for e in _chain(exc):
        if isinstance(e, StorageError):
            return None
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
    return None


def storage_error(exc: BaseException, path: str | os.PathLike, unchanged: str = "") -> StorageError | None:
    """A :class:`StorageError` naming ``path`` when ``exc`` is a storage failure, else None.

    ``unchanged`` says what the user still has (default: ``path``'s previous contents).
    """
    if isinstance(exc, StorageError):
        return exc
    code = storage_errno(exc)
    if code is None:
        return None
    keep = unchanged or f"{path} keeps its previous contents"
    reason = f"{STORAGE_ERRNOS[code]} (errno {errno.errorcode[code]})"
    return StorageError(f"cannot write {path}: {reason}; {keep}, no temp file left. "
                        "Free space or raise the limit and run again", path, reason)


def temp_path(path: str | os.PathLike) -> Path:
    """A unique sibling temp name for ``path``: ``.{name}.tmp-{pid}-{hex}``."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")


def _unlink(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "wb", *, tmp: str | os.PathLike | None = None,
                replace: bool = True, unchanged: str = "", fsync: bool = True, **open_kw) -> Iterator[IO]:
    """Write ``path`` through a temp file (see module docstring).

    ``replace=False`` leaves the finished temp file in place for a caller that renames a
    whole set of files together (shards); ``tmp`` names it.  ``fsync=False``: a scratch file
    that is never committed itself (a shard's part, which the join copies into a file that is).
    """
    path = Path(path)
    tmp_p = Path(tmp) if tmp is not None else temp_path(path)
    with _temp_removed_on_failure(tmp_p, path, unchanged):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_p, mode, **open_kw) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp_p, path)


def save_atomic(path: str | os.PathLike, write: Callable[[Path], object], *, unchanged: str = "") -> None:
    """``write(tmp)`` (a library that writes to a path: ``pq.write_table``, ``torch.save``), then rename."""
    path = Path(path)
    tmp = temp_path(path)
    with _temp_removed_on_failure(tmp, path, unchanged):
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)


@contextlib.contextmanager
def _temp_removed_on_failure(tmp: Path, path: Path, unchanged: str) -> Iterator[None]:
    """On any failure inside: remove ``tmp``, and re-raise a storage failure as the one-line
    :class:`StorageError` naming ``path`` (other exceptions pass through unchanged)."""
    try:
        yield
    except BaseException as exc:
        _unlink(tmp)
        err = storage_error(exc, path, unchanged)
        if err is not None and err is not exc:
            raise err from exc
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, unchanged: str = "") -> None:
    with open_atomic(path, "wb", unchanged=unchanged) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, *, unchanged: str = "") -> None:
    write_bytes(path, text.encode("utf-8"), unchanged=unchanged)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished directory ``tmp`` onto ``out`` (an existing ``out`` is moved aside, then deleted)."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, unchanged: str = "") -> Iterator[Path]:
    """Yield a temp directory beside ``out``; it replaces ``out`` when the block succeeds, else is removed."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = storage_error(exc, out, unchanged)
        if err is not None and err is not exc:
            raise err from exc
        raise


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike, names: tuple[str, ...] | None = None, *,
             unchanged: str = "") -> None:
    """Copy ``src`` (only ``names`` when given) to ``dst`` atomically (see :func:`atomic_dir`)."""
    src = Path(src)
    with atomic_dir(dst, unchanged=unchanged) as tmp:
        if names is None:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            for name in names:
                shutil.copy2(src / name, tmp / name)

