"""An optional, size-bounded local copy of shards that live on a bucket (``data.cache_dir``).

Without it (the default) the loader streams every shard from the bucket each epoch
(:mod:`dipro.data.reader`) and nothing is written to local disk.  With it, the first read
of a shard on a node downloads the whole object once into ``cache_dir``; every later read
on that node (the next epoch, the other loader workers and ranks there, evaluation) opens
the local copy and seeks in it.  Local shard directories are never cached.

* **Key**: sha256 of the object's URI and the version token the plan listed (S3 ETag,
  GCS generation), so a shard rewritten under the same name is a different entry and
  the old bytes are never served for it.  A fresh copy is kept only when its size and
  sha256 are the manifest's (the bytes the manifest names); otherwise it is served once
  from the download and dropped.
* **Bound**: ``max_bytes`` over all finished entries; before an entry is added, the
  least recently used entries (by mtime: a hit touches its file) are deleted until it
  fits.  A shard larger than the bound is streamed, never cached.  Downloads in flight
  (at most one per loader worker) are not counted.
* **Several processes at once** (loader workers, ranks on one node): a download goes to a
  temp file (:func:`data_sharding.atomic.open_atomic`: fsync, rename), so no reader sees a
  partial entry; one ``flock`` per entry makes the other processes that want the same
  shard wait for its download instead of fetching it again; one ``flock`` on the
  directory serialises eviction and publishing.  An entry deleted while another process
  reads it stays readable to that process (POSIX unlink).  A disk-full or read-only
  cache does not stop training: the shard is streamed instead and the failure counted.

Counts (``cache_hits``, ``cache_misses``, ``cache_evictions``, ``cache_errors``) are this
process's, like :func:`data_sharding.storage.counters`; the pipeline carries both to the
main process with each batch (:mod:`dipro.data.pipeline`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import IO, Iterator

from data_sharding import atomic, storage

ENTRY_SUFFIX = ".tar"
LOCK_DIR = "locks"
INDEX_LOCK = ".index.lock"
STALE_TEMP_S = 3600.0
"""Temp files older than this (a killed download) are removed at the next eviction."""

_COUNTERS = storage.Counters()
_count = _COUNTERS.add


def counters() -> dict[str, int]:
    """This process's cache counts: ``cache_hits``, ``cache_misses``, ``cache_evictions``, ``cache_errors``."""
    return _COUNTERS.snapshot()


def entry_key(uri: str, token: str) -> str:
    """The cache name of one version of one object."""
    return hashlib.sha256(f"{uri}\0{token}".encode()).hexdigest()[:40]


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class ShardCache:
    """Whole-shard LRU cache under ``root`` holding at most ``max_bytes`` (see module doc)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        self.root = Path(root).expanduser().resolve()
        self.max_bytes = int(max_bytes)

    def entry(self, uri: str, token: str) -> Path:
        return self.root / (entry_key(uri, token) + ENTRY_SUFFIX)

    def cacheable(self, size: int, token: str) -> bool:
        return bool(token) and 0 < size <= self.max_bytes

    def open(self, shard) -> IO[bytes]:
        """A seekable reader of ``shard`` (a :class:`dipro.data.plan.ShardInfo` on a bucket): the local
        copy (filled first when missing), or the bucket stream when the shard cannot be cached."""
        loc = storage.resolve(shard.path)
        if not self.cacheable(shard.bytes, shard.token):
            return loc.open_input()
        path = self.entry(shard.path, shard.token)
        f = self._hit(path, shard.bytes)
        if f is not None:
            return f
        with _flock(self.root / LOCK_DIR / (path.stem + ".lock")):
            f = self._hit(path, shard.bytes)  # another process filled it while this one waited
            if f is not None:
                return f
            _count("cache_misses")
            return self._fill(loc, shard, path)

    def _hit(self, path: Path, size: int) -> IO[bytes] | None:
        try:
            f = open(path, "rb", buffering=1 << 20)
        except FileNotFoundError:
            return None
        if os.fstat(f.fileno()).st_size != size:  # not what the plan listed: refetch
            f.close()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        _count("cache_hits")
        return f

    def _fill(self, loc, shard, path: Path) -> IO[bytes]:
        """Download ``loc`` into a temp file beside ``path``; publish it when it is the manifest's bytes;
        return a reader of the downloaded bytes either way (a failing cache disk: the bucket stream)."""
        tmp = atomic.temp_path(path)
        digest = hashlib.sha256()
        try:
            with atomic.open_atomic(path, "wb", tmp=tmp, replace=False) as out, loc.open_input() as src:
                for block in iter(lambda: src.read(storage.CHUNK_BYTES), b""):
                    digest.update(block)
                    out.write(block)
            size = tmp.stat().st_size
        except (atomic.StorageError, OSError) as exc:
            if isinstance(exc, storage.StorageAccessError):
                raise  # the bucket, not the cache: one line naming the URI
            _count("cache_errors")
            with contextlib.suppress(OSError):
                tmp.unlink()
            return loc.open_input()
        reader = open(tmp, "rb", buffering=1 << 20)  # readable after the temp name is gone
        if size == shard.bytes and (not shard.sha256 or digest.hexdigest() == shard.sha256):
            with _flock(self.root / INDEX_LOCK):
                self._evict(need=size)
                os.replace(tmp, path)
        else:
            _count("cache_errors")  # not the bytes the manifest names: served once, never kept
        with contextlib.suppress(OSError):
            tmp.unlink()
        return reader

    def entries(self) -> list[tuple[Path, int, float]]:
        """(file, bytes, mtime) of every finished entry, least recently used first."""
        out = []
        for p in self.root.glob("*" + ENTRY_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append((p, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e[2])

    def _evict(self, need: int) -> None:
        """Delete least recently used entries until ``need`` more bytes fit (caller holds the index lock)."""
        now = time.time()
        for p in self.root.glob(".*.tmp-*"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > STALE_TEMP_S:
                    p.unlink()
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for p, size, _ in entries:
            if total + need <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                _count("cache_evictions")
            with contextlib.suppress(FileNotFoundError):
                (self.root / LOCK_DIR / (p.stem + ".lock")).unlink()
            total -= size
