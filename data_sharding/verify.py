"""``dipro shards verify``: every shard against the manifest, every sample decoded and checked.

Per shard, one streaming pass: the bytes are hashed while
:class:`~data_sharding.shard_format.TarReader` (the loader's header parser, ``tarfile``'s
behaviour for anything but plain ustar headers) parses them, so presence, size, sha256,
truncation and member-level damage are found together.  Every sample must have exactly the members of
:data:`data_sharding.shard_format.MEMBERS`, decode without pickle, and have the
shapes, dtypes and label ranges :mod:`data_sharding.shard_format` defines
(docs/ARCHITECTURE.md section 2).
"""
from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_sharding.constants import NUM_DISEASES
from data_sharding.manifest import MANIFEST_NAME, ShardRecord, ShardSettings, read_manifest
from data_sharding.samples import TASK_DIRS
from data_sharding.shard_format import (
    ARRAYS,
    JSON_MEMBERS,
    KEY_PATTERN,
    LABEL_RANGES,
    MAX_REGION_LABEL,
    MEMBERS,
    META_FIELDS,
    NPY_MEMBERS,
    TarReader,
    load_json,
    load_npy,
    split_member_name,
)
from data_sharding.shard_writer import SHARD_NAME


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a shard directory."""

    shard: str
    """Shard path relative to the shard root (or the manifest's name)."""
    kind: str
    """missing | size | sha256 | unreadable | sample | count | offsets | duplicate_key | unlisted | manifest."""
    detail: str
    sample: str = ""


class HashingStream:
    """A forward-only binary stream (a file, a bucket object's body) as the seekable file
    :class:`~data_sharding.shard_format.TarReader` reads: every byte is hashed once, in order, and
    counted.

    Seeking forward reads (and hashes) through the skipped bytes; seeking back is possible only into
    the last :attr:`LOOKBACK` bytes read, which is as far as a reader steps back (``TarReader``
    hands a header it does not parse itself to ``tarfile`` from that header's first byte).
    """

    LOOKBACK = 8 * tarfile.BLOCKSIZE
    CHUNK = 1 << 20

    def __init__(self, f) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0  # bytes read from f (all hashed)
        self._pos = 0  # the reader's position, >= self.size - len(self._tail)
        self._tail = b""  # the last bytes read from f, ending at self.size

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence == 2:
            self.drain()
            pos += self.size
        if pos < self.size - len(self._tail) or pos < 0:
            raise OSError(f"seek to byte {pos} of a forward-only stream already read to byte {self.size}")
        self._pos = pos
        return pos

    def _pull(self, n: int) -> bytes:
        """Up to ``n`` more bytes of ``f`` (fewer only at its end), hashed and kept in the tail."""
        data = self._f.read(n)
        if 0 < len(data) < n:  # a stream may answer short before its end: gather the rest without re-copying
            parts, got = [data], len(data)
            while got < n and (more := self._f.read(n - got)):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.sha.update(data)
        self.size += len(data)
        self._tail = data[-self.LOOKBACK:] if len(data) >= self.LOOKBACK else (self._tail + data)[-self.LOOKBACK:]
        return data

    def read(self, n: int = -1) -> bytes:
        while self._pos > self.size:  # a seek past what was read: read through
            if not self._pull(min(self._pos - self.size, self.CHUNK)):
                return b""
        parts = []
        if self._pos < self.size:  # inside the tail
            start = len(self._tail) - (self.size - self._pos)
            part = self._tail[start:] if n < 0 else self._tail[start:start + n]
            parts.append(part)
            self._pos += len(part)
            n = n if n < 0 else n - len(part)
        if n < 0:
            while data := self._pull(self.CHUNK):
                parts.append(data)
                self._pos += len(data)
        elif n > 0:
            data = self._pull(n)
            parts.append(data)
            self._pos += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def drain(self) -> None:
        """Hash the rest of the stream."""
        while self._pull(self.CHUNK):
            pass
        self._pos = max(self._pos, self.size)


def check_sample(key: str, members: dict[str, bytes], record: ShardRecord, crop_size: int) -> list[str]:
    """Problems with one decoded sample (empty list = fine)."""
    errors: list[str] = []
    if not KEY_PATTERN.match(key):
        errors.append("key has characters outside [A-Za-z0-9_-]")
    missing = [m for m in MEMBERS if m not in members]
    extra = sorted(set(members) - set(MEMBERS))
    if missing:
        errors.append(f"missing member(s) {', '.join(missing)}")
    if extra:
        errors.append(f"unexpected member(s) {', '.join(extra)}")
    if missing:
        return errors
    try:
        arrays = {m: load_npy(members[m]) for m in NPY_MEMBERS}
        labels, meta = (load_json(members[m]) for m in JSON_MEMBERS)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        return errors + [f"does not decode: {exc}"]

    crops = arrays["crops.npy"]
    t = crops.shape[0] if crops.ndim == 4 else -1
    length = arrays["ehr_values.npy"].shape[0] if arrays["ehr_values.npy"].ndim == 2 else -1
    expected = {m: (spec.dtype, spec.shape(t, length, crop_size)) for m, spec in ARRAYS.items()}
    for name, (dtype, shape) in expected.items():
        arr = arrays[name]
        if arr.dtype != dtype or arr.shape != shape or min(shape) < 0:
            errors.append(f"{name}: {arr.dtype}{list(arr.shape)}, expected {np.dtype(dtype)}{list(shape)}")
    if errors:
        return errors
    if t < 2 or (record.task == "disease_progression" and t != 2):
        errors.append(f"{t} CXRs, expected {'2' if record.task == 'disease_progression' else '>= 2'}")
    for name in (m for m, spec in ARRAYS.items() if spec.binary):
        if not np.isin(arrays[name], (0, 1)).all():
            errors.append(f"{name}: values other than 0/1")
        elif name == "region_present.npy" and crops[arrays[name] == 0].any():
            errors.append("crops.npy: non-zero crop where region_present is 0")
    for name in (m for m, spec in ARRAYS.items() if spec.finite):
        if not np.isfinite(arrays[name]).all():
            errors.append(f"{name}: non-finite values")
    rl = arrays["region_labels.npy"]
    if rl.size and (rl.min() < 0 or rl.max() > MAX_REGION_LABEL):
        errors.append(f"region_labels.npy: values outside 0..{MAX_REGION_LABEL}")
    errors += _check_labels(record.task, labels)
    errors += _check_meta(key, record, meta, t)
    return errors


def _in_range(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_labels(task: str, labels: Any) -> list[str]:
    if not isinstance(labels, dict):
        return ["labels.json: not an object"]
    ranges = LABEL_RANGES[task]
    if task == "disease_progression":
        prog, (lo, hi) = labels.get("progression"), ranges["progression"]
        if not (isinstance(prog, list) and len(prog) == NUM_DISEASES and all(_in_range(v, lo, hi) for v in prog)):
            return [f"labels.json: progression {prog!r}, expected {NUM_DISEASES} ints in {lo}..{hi}"]
        return []
    errors = []
    if not _in_range(labels.get("mortality"), *ranges["mortality"]):
        errors.append(f"labels.json: mortality {labels.get('mortality')!r}, expected 0 or 1")
    if not _in_range(labels.get("los_bin"), *ranges["los_bin"]):
        errors.append(f"labels.json: los_bin {labels.get('los_bin')!r}, expected {'..'.join(map(str, ranges['los_bin']))}")
    los = labels.get("los_days")
    if not (isinstance(los, (int, float)) and not isinstance(los, bool) and np.isfinite(los) and los >= 0):
        errors.append(f"labels.json: los_days {los!r}, expected a finite number >= 0")
    return errors


def _check_meta(key: str, record: ShardRecord, meta: Any, t: int) -> list[str]:
    if not isinstance(meta, dict):
        return ["meta.json: not an object"]
    errors = []
    for field_ in META_FIELDS:
        if field_ not in meta:
            errors.append(f"meta.json: no {field_!r}")
    if errors:
        return errors
    if meta["task_dir"] != record.task or meta["split"] != record.split:
        errors.append(f"meta.json: task_dir/split {meta['task_dir']}/{meta['split']} in a "
                      f"{record.task}/{record.split} shard")
    if not isinstance(meta["dicom_ids"], list) or len(meta["dicom_ids"]) != t:
        errors.append(f"meta.json: dicom_ids does not list the {t} CXRs")
    if key != f"s{meta['stay_id']}_{meta['row']}":
        errors.append("meta.json: stay_id/row do not match the key")
    return errors


def verify_shard(root: str | Path, record: ShardRecord) -> tuple[list[Problem], list[str]]:
    """Problems of one shard (a file or a bucket object: read whole), and the sample keys found in it."""
    from data_sharding import storage

    path = storage.resolve(root) / record.path
    try:
        size = path.stat().size
    except storage.NotFound:
        return [Problem(record.path, "missing", "file not found")], []
    problems: list[Problem] = []
    try:
        settings = ShardSettings.from_json(record.settings)
    except Exception as exc:  # a damaged manifest row
        return [Problem(record.path, "manifest", f"settings {record.settings!r}: {exc}")], []
    if size != record.bytes:
        problems.append(Problem(record.path, "size", f"{size} bytes, manifest says {record.bytes}"))
    keys: list[str] = []
    offsets: list[int] = []  # where each sample's first header is, then where the samples end
    end = 0
    current_key, members = None, {}

    def finish() -> None:
        if current_key is None:
            return
        keys.append(current_key)
        for err in check_sample(current_key, members, record, settings.crop_size):
            problems.append(Problem(record.path, "sample", err, current_key))

    with path.open_input() as f:
        reader = HashingStream(f)
        try:
            tar = TarReader(reader)
            while (info := tar.next()) is not None:
                if not info.isfile:
                    problems.append(Problem(record.path, "unreadable", f"non-file member {info.name!r}"))
                    continue
                key, member = split_member_name(info.name)
                if key != current_key:
                    finish()
                    if key in keys:
                        problems.append(Problem(record.path, "duplicate_key", "key appears twice", key))
                    current_key, members = key, {}
                    offsets.append(info.offset)
                members[member] = tar.read(info)  # tarfile.ReadError when the payload is cut short
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            finish()
            if record.offsets and tuple(offsets) + (end,) != tuple(record.offsets):
                bad = next((i for i, (a, b) in enumerate(zip(offsets + [end], record.offsets)) if a != b),
                           min(len(offsets) + 1, len(record.offsets)))
                problems.append(Problem(record.path, "offsets",
                                        f"sample offsets differ from the manifest's from sample {bad} on "
                                        f"({len(record.offsets)} recorded, {len(offsets) + 1} found)"))
        except (tarfile.TarError, EOFError, OSError) as exc:
            problems.append(Problem(record.path, "unreadable", f"tar stream broken after {len(keys)} samples: {exc}",
                                    current_key or ""))
        reader.drain()
    if reader.sha.hexdigest() != record.sha256:
        problems.append(Problem(record.path, "sha256", f"{reader.sha.hexdigest()[:16]}..., manifest says "
                                                       f"{record.sha256[:16]}..."))
    if len(keys) != record.samples:
        problems.append(Problem(record.path, "count", f"{len(keys)} samples read, manifest says {record.samples}"))
    return problems, keys


def _verify_job(job: tuple[str, ShardRecord]) -> tuple[list[Problem], list[str]]:
    return verify_shard(*job)


def verify_shards(shard_dir: str | Path, workers: int = 1, progress: bool = False) -> list[Problem]:
    """All problems of a shard directory (empty list = valid).

    Raises :class:`data_sharding.errors.DataError` when there is no readable manifest.
    ``workers`` > 1 checks shards in that many processes.
    """
    from tqdm import tqdm

    from data_sharding import storage

    root = storage.resolve(shard_dir)
    manifest = read_manifest(root)
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    jobs = [(str(root), r) for r in manifest.records]
    bar = tqdm(total=len(jobs), unit="shard", desc="verify", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            results = list(_progress(pool.map(_verify_job, jobs), bar))
    else:
        results = list(_progress(map(_verify_job, jobs), bar))
    bar.close()
    for record, (shard_problems, keys) in zip(manifest.records, results):
        problems += shard_problems
        for key in keys:
            where = f"{record.task}/{key}"
            if where in seen and seen[where] != record.path:
                problems.append(Problem(record.path, "duplicate_key", f"also in {seen[where]}", key))
            seen.setdefault(where, record.path)
    if root.is_remote:  # superseded generations stay until `dipro shards gc`: not a problem of the set
        return problems
    listed = set(manifest.by_path())
    for task in TASK_DIRS:
        for p in sorted((root.local / task).glob("*.tar")):
            rel = f"{task}/{p.name}"
            if SHARD_NAME.match(p.name) and rel not in listed:
                problems.append(Problem(rel, "unlisted", f"shard file not in {MANIFEST_NAME}"))
    return problems


def _progress(results, bar):
    for item in results:
        bar.update(1)
        yield item


def format_problems(problems: list[Problem]) -> str:
    """A fixed-width table: shard | problem | sample | detail."""
    rows = [("shard", "problem", "sample", "detail")] + [(p.shard, p.kind, p.sample, p.detail) for p in problems]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
    lines.insert(1, "-" * min(120, sum(widths) + 6 + max(len(r[3]) for r in rows)))
    return "\n".join(lines)
