"""``S/manifest.parquet``: one row per shard, and the input fingerprint that decides rebuilds.

Columns (docs/ARCHITECTURE.md section 2): task, split, path (relative to S),
samples, bytes, sha256, fingerprint, settings (JSON string); plus ``counts``
(JSON: regions missing, invalid boxes, unreadable images ... in that shard) and
``etag`` (on a bucket: the object's ETag / generation when it was written, so that
regeneration checks an object by its metadata without reading it; empty locally).

``S`` is a local directory or an ``s3://`` / ``gs://`` prefix (:mod:`data_sharding.storage`).
On a bucket the manifest is the shard set's only commit point: its rows name the exact
shard objects (``{task}/{split}-{NNNNNN}-{generation}.tar``), it carries the train label and
EHR statistics in its schema metadata (``dipro.stats``: no separate objects that could
disagree with it), and it is replaced by one conditional write (:func:`commit_manifest`).

The fingerprint of a shard is a sha256 over the format version, the settings,
and for each of its samples the task row, the CXR rows (without the absolute
``image_path``, so moving the processed dir rebuilds nothing) with the sha256 of
each image file's bytes, the stay's demographics row, and every EHR row of its
stays.  Two builds with equal fingerprints produce byte-identical shards.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable, Iterable

from data_sharding import defaults
from data_sharding.errors import DataError

FORMAT_VERSION = 1
"""Bump when the shard layout or encoding changes: every shard's fingerprint changes with it."""
MANIFEST_NAME = "manifest.parquet"
MANIFEST_COLUMNS = ("task", "split", "path", "samples", "bytes", "sha256", "fingerprint", "settings", "counts",
                    "etag", "offsets")
OPTIONAL_COLUMNS = ("counts", "etag", "offsets")
STATS_KEY = b"dipro.stats"
COMMIT_KEY = b"dipro.commit"
STATS_FILES = ("label_stats.json", "ehr_stats.json")


@dataclass(frozen=True)
class ShardSettings:
    """Everything besides the inputs that changes shard bytes."""

    crop_size: int = defaults.CROP_SIZE
    """Side of the square region crops (the paper's 224)."""
    max_samples_per_shard: int = defaults.MAX_SAMPLES_PER_SHARD
    max_shard_bytes: int = defaults.MAX_SHARD_BYTES
    format_version: int = FORMAT_VERSION
    resample: str = defaults.RESAMPLE_MODES[0]
    """Crop resampling (:data:`data_sharding.crops.RESAMPLE_MODES`): ``bilinear`` or the authors' ``nearest``."""

    def __post_init__(self) -> None:
        from data_sharding.crops import RESAMPLE_MODES

        if self.crop_size < 8:
            raise DataError(f"crop size must be >= 8 pixels, got {self.crop_size}")
        if self.resample not in RESAMPLE_MODES:
            raise DataError(f"crop resampling must be one of {', '.join(RESAMPLE_MODES)}, got {self.resample!r}")
        if self.max_samples_per_shard < 1:
            raise DataError(f"max samples per shard must be >= 1, got {self.max_samples_per_shard}")
        if self.max_shard_bytes < 20480:
            raise DataError(f"max shard bytes must be >= 20480, got {self.max_shard_bytes}")

    def to_json(self) -> str:
        data = asdict(self)
        if data["resample"] == "bilinear":
            del data["resample"]  # the default is implied: shards built before the option keep their fingerprint
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ShardSettings":
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            return cls(**{k: (str(v) if k == "resample" else int(v)) for k, v in data.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise DataError(f"manifest settings {text!r} are not valid shard settings: {exc}") from None


def logical_path(path: str) -> str:
    """A manifest path without a bucket object's generation: ``t/train-000003-20261202T140501-9f3a1c.tar``
    -> ``t/train-000003.tar`` (a local path is returned as it is)."""
    return re.sub(r"-\d{8}T\d{6}-[0-9a-f]{6}(\.tar)$", r"\1", path)


@dataclass
class ShardRecord:
    """One manifest row."""

    task: str
    split: str
    path: str
    samples: int
    bytes: int
    sha256: str
    fingerprint: str
    settings: str
    counts: str = "{}"
    etag: str = ""
    offsets: tuple[int, ...] = ()
    """Byte offset of each sample's first tar header, then the end of the last sample (``samples + 1``
    values; empty in manifests written before they were recorded): samples ``[i, j)`` are the bytes
    ``[offsets[i], offsets[j])``, so a reader starting mid-shard fetches from there and no further."""

    @property
    def logical(self) -> str:
        """The planned name ``{task}/{split}-{NNNNNN}.tar``, without a bucket generation."""
        return logical_path(self.path)


@dataclass
class Manifest:
    """All shards of a shard directory, sorted by (task, split, path).

    ``token`` is the version of the manifest object these rows were read from (None: there was
    none); a commit on a bucket succeeds only while it is still the current one.  ``stats``: the
    statistics files a bucket manifest carries (name -> parsed JSON).
    """

    records: list[ShardRecord] = field(default_factory=list)
    token: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.records = sorted(self.records, key=lambda r: (r.task, r.split, r.path))

    def by_path(self) -> dict[str, ShardRecord]:
        return {r.path: r for r in self.records}

    def by_logical(self) -> dict[str, ShardRecord]:
        return {r.logical: r for r in self.records}

    def totals(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        """(task, split) -> (shards, samples, bytes)."""
        out: dict[tuple[str, str], tuple[int, int, int]] = {}
        for r in self.records:
            n, s, b = out.get((r.task, r.split), (0, 0, 0))
            out[(r.task, r.split)] = (n + 1, s + r.samples, b + r.bytes)
        return out

    def summary_table(self) -> str:
        lines = [f"{'task':<20} {'split':<6} {'shards':>6} {'samples':>8} {'MiB':>9}"]
        for (task, split), (n, s, b) in sorted(self.totals().items()):
            lines.append(f"{task:<20} {split:<6} {n:>6} {s:>8} {b / 2**20:>9.2f}")
        return "\n".join(lines)


def manifest_path(shard_dir) -> "storage.Location":
    """``S/manifest.parquet`` as a :class:`data_sharding.storage.Location` (a path-like locally)."""
    from data_sharding import storage

    return storage.resolve(shard_dir) / MANIFEST_NAME


def read_manifest(shard_dir) -> Manifest:
    """Load ``S/manifest.parquet`` (local or bucket); DataError naming it when absent or malformed.

    The returned manifest remembers the version it was read from (:attr:`Manifest.token`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_sharding import storage

    path = manifest_path(shard_dir)
    try:
        data, token = path.read_versioned()
    except storage.NotFound:
        raise DataError(f"no shard manifest at {path} (run `dipro shard` first)") from None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names and c not in OPTIONAL_COLUMNS]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    defaults = {"counts": "{}", "etag": "", "offsets": ()}
    records = []
    for row in table.to_pylist():
        values = {f.name: row.get(f.name) if row.get(f.name) is not None else defaults.get(f.name)
                  for f in fields(ShardRecord)}
        values["offsets"] = tuple(values["offsets"])
        records.append(ShardRecord(**values))
    stats: dict[str, Any] = {}
    meta = table.schema.metadata or {}
    if STATS_KEY in meta:
        try:
            stats = json.loads(meta[STATS_KEY])
        except ValueError:
            raise DataError(f"{path}: its {STATS_KEY.decode()} metadata is not JSON") from None
    return Manifest(records, token=token, stats=stats)


def read_stats(shard_dir, name: str, manifest: Manifest | None = None) -> dict:
    """A statistics file of a shard set (``label_stats.json`` / ``ehr_stats.json``), parsed.

    On a bucket it comes from the manifest (the one commit point); locally from the file
    (:func:`read_manifest` is not needed).  DataError naming the location when absent or not JSON.
    """
    from data_sharding import storage

    root = storage.resolve(shard_dir)
    if root.is_remote:
        manifest = manifest or read_manifest(root)
        if name not in manifest.stats:
            raise DataError(f"{manifest_path(root)} carries no {name} (cut the shards again with `dipro shard`)")
        return manifest.stats[name]
    loc = root / name
    try:
        return json.loads(loc.read_text())
    except storage.NotFound:
        raise DataError(f"{loc} not found (run `dipro shard` / copy it from the processed dir)") from None
    except ValueError as exc:
        raise DataError(f"{loc}: not valid JSON ({exc})") from None


def _manifest_table(manifest: Manifest, stats: dict[str, Any] | None = None, commit: str | None = None):
    import pyarrow as pa

    schema = pa.schema([("task", pa.string()), ("split", pa.string()), ("path", pa.string()),
                        ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
                        ("fingerprint", pa.string()), ("settings", pa.string()), ("counts", pa.string()),
                        ("etag", pa.string()), ("offsets", pa.list_(pa.int64()))])
    meta = {}
    if stats:
        meta[STATS_KEY] = json.dumps(stats, separators=(",", ":"))  # key order kept: ehr_stats orders the features
    if commit:
        meta[COMMIT_KEY] = commit
    if meta:
        schema = schema.with_metadata(meta)
    rows = [dict(asdict(r), offsets=list(r.offsets)) for r in manifest.records]
    return pa.Table.from_pylist(rows, schema=schema)


def manifest_bytes(manifest: Manifest, stats: dict[str, Any] | None = None, commit: str | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(_manifest_table(manifest, stats, commit), sink)
    return sink.getvalue().to_pybytes()


def stage_manifest(shard_dir, manifest: Manifest, unchanged: str = "") -> Path:
    """Write the manifest to a fsynced temp file beside it and return that file (not yet in place).

    Local directories only.  The caller renames it onto ``manifest.parquet`` as the last step of a
    commit; a write that fails leaves nothing behind (StorageError when the disk is full).
    """
    from data_sharding import atomic

    path = manifest_path(shard_dir).local
    tmp = atomic.temp_path(path)
    with atomic.open_atomic(path, "wb", tmp=tmp, replace=False, unchanged=unchanged) as f:
        f.write(manifest_bytes(manifest))
    return tmp


def write_manifest(shard_dir, manifest: Manifest) -> Path:
    """Replace the manifest of a local shard directory atomically (temp file, fsync, rename)."""
    from data_sharding import atomic

    path = manifest_path(shard_dir).local
    atomic.write_bytes(path, manifest_bytes(manifest))
    return path


class ConcurrentCommit(DataError):
    """Another writer committed the shard set's manifest after this one read it."""


def commit_manifest(shard_dir, manifest: Manifest, previous_token: str | None, stats: dict[str, Any]) -> str:
    """Publish ``manifest`` on a bucket by one conditional write; returns the new version token.

    ``previous_token`` is the version the writer planned from (None: there was no manifest), so of
    two writers exactly one commits; the other gets :class:`ConcurrentCommit` and its objects stay
    unreferenced (``dipro shards gc`` removes them).
    """
    from data_sharding import storage

    path = manifest_path(shard_dir)
    # A commit id in the bytes: two commits never have the same content, hence never the same ETag
    # (S3's ETag is the MD5 of the content, so an identical re-commit would not change the version).
    data = manifest_bytes(manifest, stats, commit=storage.new_generation())
    try:
        if previous_token is None:
            return path.put(data, if_absent=True)
        return path.put(data, if_match=previous_token)
    except storage.PreconditionFailed:
        raise ConcurrentCommit(
            f"{path} was committed by another writer after this one read it; nothing of this build is "
            "referenced (the shard set is the other writer's). Run again to build on top of it") from None


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """sha256 of a shard's bytes (:func:`data_sharding.storage.sha256_file`)."""
    from data_sharding import storage

    return storage.sha256_file(path, chunk)


def _canon(value: Any) -> Any:
    """JSON-ready canonical form of a Parquet value (floats by repr, NaN/inf as strings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars / arrays
        return _canon(value.tolist())
    return str(value)


def shard_fingerprint(
    view: Any,
    task_dir: str,
    rows: Iterable[int],
    settings: ShardSettings,
    image_digest: Callable[[str], str],
    ehr: dict[int, Any] | None = None,
) -> str:
    """sha256 over everything that determines one shard's bytes (see module docstring).

    ``view`` is a :class:`data_sharding.samples.ProcessedView`; ``image_digest``
    maps an image path to the sha256 of its bytes (the writer passes the
    digests of the bytes it decoded, regeneration hashes the files); ``ehr``
    (stay_id -> StayEHR) reuses rows the caller already read.
    """
    from data_sharding.samples import row_cxrs

    h = hashlib.sha256()

    def add(tag: str, obj: Any) -> None:
        h.update(tag.encode() + b"\0" + json.dumps(_canon(obj), sort_keys=True, separators=(",", ":")).encode()
                 + b"\n")

    add("settings", settings.to_json())
    table = view.task_rows(task_dir)
    stays: set[int] = set()
    for index in rows:
        row = table[index]
        add("task_row", {"index": index, "task_dir": task_dir, "row": row})
        stay_id = int(row["stay_id"])
        where = f"{view.task_path(task_dir)} row {index}"
        for dicom in row_cxrs(task_dir, row)[0]:
            cxr = view.cxr_row(stay_id, dicom, where)
            add("cxr_row", {k: v for k, v in cxr.items() if k != "image_path"})
            add("image", image_digest(str(cxr["image_path"])))
        stays.add(stay_id)
    for stay_id in sorted(stays):
        add("demographics", view.demographics(stay_id, f"stay {stay_id}"))
    if ehr is None or not stays <= set(ehr):
        ehr = view.read_ehr(sorted(stays))
    for stay_id in sorted(stays):
        add("ehr", {"stay_id": stay_id, "sha256": ehr[stay_id].digest()})
    return h.hexdigest()
