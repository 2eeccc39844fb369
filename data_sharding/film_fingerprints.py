"""Film fingerprints: the sha256 of each film's bytes, and the cache that spares re-reading them.

A shard's input fingerprint (:func:`data_sharding.manifest.shard_fingerprint`) holds the sha256
of every film its samples use.  Hashing a film means reading it (~1.3 MB for a MIMIC film), so
``S/film_fingerprints.parquet``, beside the manifest, remembers for each film path the key it had
when it was hashed and the digest: a film whose key is unchanged is not opened again; a changed
key re-hashes that film only.

* The key (:class:`FilmKey`) of a local file is (size, ``st_mtime_ns``).  :func:`stat_film` is
  the one function that knows how a film is stat'ed: for films in a bucket (size + ETag) it is
  the one place to change.
* The cache is a Parquet file written atomically (:func:`data_sharding.atomic.save_atomic`) with
  page checksums; one that is missing, unreadable, fails its checksums or holds malformed rows
  is not trusted: every film is re-hashed and the cache rebuilt, and the report says why
  (:attr:`FilmCache.status`).  ``dipro shards regenerate --rehash`` ignores it on purpose.
* The key is the trust boundary (as for ``make`` or ``rsync``): a film rewritten with a
  different content but the same size and mtime is not noticed; ``--rehash`` finds it.
* The key is taken *before* the bytes are read, so a film changed while it is read is stored
  under its older key and re-hashed the next time.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

CACHE_NAME = "film_fingerprints.parquet"
CACHE_FORMAT = "1"
MISSING = "missing"
"""Digest of a film that could not be read (its shards record that; never cached)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FilmKey:
    """What identifies one version of a film without reading it."""

    size: int
    version: str
    """Local file: ``st_mtime_ns`` in decimal (a bucket object: its ETag)."""


def stat_film(path: str) -> FilmKey | None:
    """The key of the film at ``path`` now (local: ``os.stat`` size + ``st_mtime_ns``); None when absent.

    The only function that knows how a film is stat'ed: films in a bucket (size + ETag through the
    storage layer) change here and nowhere else.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FilmKey(int(st.st_size), str(st.st_mtime_ns))


def read_film(path: str) -> tuple[bytes | None, FilmKey | None]:
    """A film's bytes (None when it cannot be read) and its key, taken before the read."""
    key = stat_film(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None, None
    return data, key


def film_digest(data: bytes | None) -> str:
    """sha256 of a film's bytes; :data:`MISSING` when it could not be read."""
    return MISSING if data is None else hashlib.sha256(data).hexdigest()


def hash_films(paths: list[str]) -> list[tuple[str, FilmKey | None, str]]:
    """(path, key, digest) of each film, reading every one (the re-hash job of a regeneration)."""
    out = []
    for path in paths:
        data, key = read_film(path)
        out.append((path, key, film_digest(data)))
    return out


@dataclass
class FilmCache:
    """The films' (key, digest) as last hashed; ``status`` says where the entries came from."""

    entries: dict[str, tuple[FilmKey, str]] = field(default_factory=dict)
    status: str = "missing: rebuilt"
    """``loaded`` | ``missing: rebuilt`` | ``corrupt (...): rebuilt`` | ``ignored (--rehash): rebuilt``."""

    def digest(self, path: str, key: FilmKey | None) -> str | None:
        """The cached digest of ``path`` when its key is still ``key``, else None (hash it)."""
        entry = self.entries.get(path)
        return entry[1] if entry is not None and key is not None and entry[0] == key else None


def cache_path(shard_dir: str | Path) -> Path:
    return Path(shard_dir) / CACHE_NAME


def load_cache(shard_dir: str | Path, rehash: bool = False) -> FilmCache:
    """The cache beside the manifest, or an empty one saying why it is not used."""
    path = cache_path(shard_dir)
    if rehash:
        return FilmCache(status="ignored (--rehash): rebuilt")
    if not path.exists():
        return FilmCache(status="missing: rebuilt")
    try:
        return FilmCache(_read(path), "loaded")
    except Exception as exc:  # pyarrow raises several types for a damaged file; any of them: not trusted
        reason = " ".join(str(exc).split())[:160]
        return FilmCache(status=f"corrupt ({reason}): rebuilt")


def _read(path: Path) -> dict[str, tuple[FilmKey, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, page_checksum_verification=True)
    meta = table.schema.metadata or {}
    if meta.get(b"dipro_film_fingerprints") != CACHE_FORMAT.encode():
        raise ValueError("not a film fingerprint cache of this format")
    if table.column_names != ["path", "size", "version", "sha256"]:
        raise ValueError(f"columns {table.column_names}")
    entries: dict[str, tuple[FilmKey, str]] = {}
    cols = [table.column(c).to_pylist() for c in table.column_names]
    for p, size, version, digest in zip(*cols):
        if (not isinstance(p, str) or not isinstance(size, int) or size < 0 or not isinstance(version, str)
                or not isinstance(digest, str) or not _SHA256.match(digest) or p in entries):
            raise ValueError(f"malformed row for {p!r}")
        entries[p] = (FilmKey(size, version), digest)
    return entries


def save_cache(shard_dir: str | Path, entries: dict[str, tuple[FilmKey, str]]) -> Path:
    """Write the cache atomically (sorted by path, page checksums on); returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_sharding import atomic

    path = cache_path(shard_dir)
    rows = sorted((p, k, d) for p, (k, d) in entries.items() if _SHA256.match(d))
    schema = pa.schema([("path", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                        ("sha256", pa.string())], metadata={"dipro_film_fingerprints": CACHE_FORMAT})
    table = pa.table([pa.array([r[0] for r in rows], pa.string()), pa.array([r[1].size for r in rows], pa.int64()),
                      pa.array([r[1].version for r in rows], pa.string()), pa.array([r[2] for r in rows], pa.string())],
                     schema=schema)
    atomic.save_atomic(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True),
                       unchanged="the shards and manifest are committed; the next regeneration re-hashes the films")
    return path
