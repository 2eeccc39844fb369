"""Film fingerprints: the sha256 of each film's bytes, and the cache that spares re-reading them.

A shard's input fingerprint (:func:`data_sharding.manifest.shard_fingerprint`) holds the sha256
of every film its samples use.  Hashing a film means reading it (~1.3 MB for a MIMIC film), so
``S/film_fingerprints.parquet``, beside the manifest, remembers for each film path the key it had
when it was hashed and the digest: a film whose key is unchanged is not opened again; a changed
key re-hashes that film only.

* The key (:class:`FilmKey`) of a local file is (size, ``st_mtime_ns``), of a bucket object
  (size, ETag / generation) (:mod:`data_sharding.storage`).  :func:`stat_film` / :func:`stat_films`
  are the functions that know how a film is stat'ed; on a bucket :func:`stat_films` takes one
  listing for all films (no request per film).
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
    """The key of the film at ``path`` now (local: ``os.stat`` size + ``st_mtime_ns``; a bucket object: size
    + ETag / generation); None when absent."""
    from data_sharding import storage

    if not storage.is_remote(path):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return FilmKey(int(st.st_size), str(st.st_mtime_ns))
    try:
        info = storage.resolve(path).stat()
    except storage.NotFound:
        return None
    return FilmKey(info.size, info.token)


def stat_films(paths: list[str]) -> dict[str, FilmKey | None]:
    """The keys of many films: ``os.stat`` each locally; on a bucket one listing of the films' common
    prefix (a paginated LIST returns sizes and ETags: no request per film)."""
    from data_sharding import storage

    out: dict[str, FilmKey | None] = {}
    remote: dict[tuple[str, str], list] = {}
    for path in paths:
        if storage.is_remote(path):
            loc = storage.resolve(path)
            remote.setdefault((loc.scheme, loc.bucket), []).append(loc)
        else:
            out[path] = stat_film(path)
    for locs in remote.values():
        prefix = os.path.commonpath([loc.key for loc in locs]) if len(locs) > 1 else str(Path(locs[0].key).parent)
        root = storage.Location(locs[0].scheme, locs[0].bucket, prefix if prefix != "." else "")
        listed = {info.path: info for info in root.list()}
        for loc in locs:
            info = listed.get(loc.relative_to(root))
            out[loc.uri] = FilmKey(info.size, info.token) if info is not None else None
    return out


def read_film(path: str) -> tuple[bytes | None, FilmKey | None]:
    """A film's bytes (None when it cannot be read) and its key (taken before the read locally; on a
    bucket the version the one GET returned)."""
    from data_sharding import storage

    if storage.is_remote(path):
        try:
            data, token = storage.resolve(path).read_versioned()
        except storage.NotFound:
            return None, None
        return data, FilmKey(len(data), token)
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


def cache_path(shard_dir):
    """``S/film_fingerprints.parquet`` (a Path locally, a :class:`data_sharding.storage.Location` on a bucket)."""
    from data_sharding import storage

    loc = storage.resolve(shard_dir) / CACHE_NAME
    return loc if loc.is_remote else loc.local


def load_cache(shard_dir, rehash: bool = False) -> FilmCache:
    """The cache beside the manifest, or an empty one saying why it is not used."""
    from data_sharding import storage

    if rehash:
        return FilmCache(status="ignored (--rehash): rebuilt")
    try:
        data = storage.resolve(cache_path(shard_dir)).read_bytes()
    except storage.NotFound:
        return FilmCache(status="missing: rebuilt")
    try:
        return FilmCache(_read(data), "loaded")
    except Exception as exc:  # pyarrow raises several types for a damaged file; any of them: not trusted
        reason = " ".join(str(exc).split())[:160]
        return FilmCache(status=f"corrupt ({reason}): rebuilt")


def _read(data: bytes) -> dict[str, tuple[FilmKey, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
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


def save_cache(shard_dir, entries: dict[str, tuple[FilmKey, str]]):
    """Write the cache atomically (sorted by path, page checksums on; one PUT on a bucket); returns its path."""
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
    unchanged = "the shards and manifest are committed; the next regeneration re-hashes the films"
    if isinstance(path, Path):
        atomic.save_atomic(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True), unchanged=unchanged)
        return path
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)
    path.write_bytes(sink.getvalue().to_pybytes(), unchanged=unchanged)
    return path
