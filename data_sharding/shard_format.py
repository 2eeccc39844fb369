"""The shard sample format (docs/ARCHITECTURE.md section 2), defined once.

A shard is a ustar archive of samples; each sample is the members of :data:`MEMBERS`
stored consecutively as ``{key}.{member}`` (WebDataset: the first dot ends the key, so a
key holds only ``[A-Za-z0-9_-]``).  Arrays are ``.npy`` (``numpy.save``,
``allow_pickle=False``), ``labels.json`` / ``meta.json`` canonical UTF-8 JSON.  Nothing is
pickled anywhere.

This module owns what every party needs to agree on:

* names and order: :data:`MEMBERS`, :data:`NPY_MEMBERS`, :data:`JSON_MEMBERS`, :func:`sample_key`,
  :data:`KEY_PATTERN`, :func:`split_member_name`;
* dtypes, shapes and value ranges: :data:`ARRAYS` (:class:`ArraySpec`), :data:`MAX_REGION_LABEL`,
  :data:`LABEL_RANGES`;
* encoding: :func:`npy_bytes`, :func:`json_bytes`, :func:`member_bytes`, :func:`encode_members`,
  :func:`tar_info`, :func:`write_tar`, :class:`TarStream` (the shard builder's writer: the same
  bytes as ``tarfile``, streamed, and joinable from parts), and the sizes the shard planner bounds
  (:func:`npy_size`, :func:`tar_member_size`, :func:`tar_size`);
* decoding: :func:`load_npy` (zero-copy for the writer's own headers), :func:`load_json`.

Users: the writer (:mod:`data_sharding.samples`, :mod:`data_sharding.shard_writer`), the
verifier (:mod:`data_sharding.verify`), the loader's decoder (``dipro.data.decode``), the
served model's input (``dipro.tracking.pyfunc``) and the tests' hand-made shards.  numpy only.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable

import numpy as np

from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_DISEASES, NUM_EHR_VARIABLES, NUM_LOS_BINS, NUM_REGIONS

# ----------------------------------------------------------------------------- names

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
"""Characters a sample key may hold (a dot would end the key early)."""

MAX_REGION_LABEL = 3
"""Region / progression labels: worsened 0, improved 1, no change 2, not mentioned 3."""


@dataclass(frozen=True)
class ArraySpec:
    """dtype and shape of one ``.npy`` member.

    ``dims`` holds ints (fixed sizes) and the symbols ``T`` (CXRs), ``T-1`` (consecutive
    pairs), ``L`` (EHR hours, may be 0) and ``C`` (crop size).
    """

    dtype: np.dtype
    dims: tuple[int | str, ...]
    binary: bool = False
    """Values are 0/1 only."""
    finite: bool = False
    """No NaN / inf."""

    @property
    def ndim(self) -> int:
        return len(self.dims)

    def shape(self, t: int, length: int, crop_size: int) -> tuple[int, ...]:
        """The concrete shape for ``t`` CXRs, ``length`` EHR hours and ``crop_size`` px crops."""
        sizes = {"T": t, "T-1": t - 1, "L": length, "C": crop_size}
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims)


ARRAYS: dict[str, ArraySpec] = {
    "crops.npy": ArraySpec(np.dtype(np.uint8), ("T", NUM_REGIONS, "C", "C")),
    "region_present.npy": ArraySpec(np.dtype(np.uint8), ("T", NUM_REGIONS), binary=True),
    "cxr_hours.npy": ArraySpec(np.dtype(np.float32), ("T",), finite=True),
    "ehr_values.npy": ArraySpec(np.dtype(np.float32), ("L", NUM_EHR_VARIABLES), finite=True),
    "ehr_masks.npy": ArraySpec(np.dtype(np.uint8), ("L", NUM_EHR_VARIABLES), binary=True),
    "ehr_hours.npy": ArraySpec(np.dtype(np.float32), ("L",), finite=True),
    "demographics.npy": ArraySpec(np.dtype(np.float32), (NUM_DEMOGRAPHICS,), finite=True),
    "region_labels.npy": ArraySpec(np.dtype(np.int8), ("T-1", NUM_REGIONS, NUM_DISEASES)),
}
"""The ``.npy`` members, in the order they are written."""

NPY_MEMBERS: tuple[str, ...] = tuple(ARRAYS)
JSON_MEMBERS: tuple[str, ...] = ("labels.json", "meta.json")
MEMBERS: tuple[str, ...] = NPY_MEMBERS + JSON_MEMBERS
"""Members of every sample, in the order they are written to the tar."""

INPUT_ARRAYS: tuple[str, ...] = tuple(m[: -len(".npy")] for m in NPY_MEMBERS if m != "region_labels.npy")
"""The model's inputs (every array but the region labels), by name without ``.npy``."""

LABEL_RANGES: dict[str, dict[str, tuple[int, int]]] = {
    "disease_progression": {"progression": (0, MAX_REGION_LABEL)},
    "mortality_los": {"mortality": (0, 1), "los_bin": (0, NUM_LOS_BINS - 1)},
}
"""``labels.json`` integer labels per shard series: name -> inclusive range.  Progression is a
list of :data:`NUM_DISEASES` such ints; mortality_los also has ``los_days`` (a number >= 0)."""

META_FIELDS = ("subject_id", "stay_id", "dicom_ids", "split", "task_dir", "row")
"""Fields of ``meta.json`` (``label_source`` is added for progression rows that have one)."""


def sample_key(stay_id: int, row: int) -> str:
    """WebDataset key of a task row: ``s{stay_id}_{row}`` (no dots: the first dot ends a key)."""
    return f"s{int(stay_id)}_{int(row)}"


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/s12_3.crops.npy"`` -> ``("s12_3", "crops.npy")`` (the first dot of the file name ends the key)."""
    key, _, member = os.path.basename(name).partition(".")
    return key, member


# ----------------------------------------------------------------------------- encoding

def json_bytes(obj: Any) -> bytes:
    """Canonical UTF-8 JSON (sorted keys, no spaces, NaN refused) -> deterministic bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def npy_bytes(arr: np.ndarray) -> bytes:
    """``numpy.save`` of a C-contiguous copy, without pickle."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_size(shape: tuple[int, ...], dtype: Any) -> int:
    """Exact size of ``np.save`` output for an array of this shape and dtype."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return len(buf.getvalue()) + math.prod(shape) * np.dtype(dtype).itemsize


def tar_member_size(payload: int) -> int:
    """Bytes a member takes in a ustar archive: header block + data padded to 512."""
    return 512 + -(-payload // 512) * 512


def tar_size(member_bytes: int) -> int:
    """Archive size from the sum of member sizes: end-of-archive blocks, padded to 10240."""
    return -(-(member_bytes + 1024) // 10240) * 10240


def member_bytes(arrays: dict[str, np.ndarray], labels: Any, meta: Any) -> dict[str, bytes]:
    """One sample's members ``{member: bytes}`` in :data:`MEMBERS` order.

    ``arrays`` maps each ``.npy`` member name to its array, written as given (the builder
    makes them with the dtypes of :data:`ARRAYS`; the verifier and decoder check them).
    """
    out = {m: npy_bytes(arrays[m]) for m in NPY_MEMBERS}
    out["labels.json"] = json_bytes(labels)
    out["meta.json"] = json_bytes(meta)
    return out


def tar_members(key: str, members: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """``{member: bytes}`` -> tar entries ``(f"{key}.{member}", bytes)``, in the dict's order."""
    return [(f"{key}.{m}", data) for m, data in members.items()]


def encode_members(key: str, arrays: dict[str, np.ndarray], labels: Any, meta: Any) -> list[tuple[str, bytes]]:
    """Tar entries ``(f"{key}.{member}", bytes)`` of one sample in :data:`MEMBERS` order; the key is checked."""
    if not KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} has characters outside [A-Za-z0-9_-]")
    return tar_members(key, member_bytes(arrays, labels, meta))


SHARD_MTIME = 0
"""mtime stamped on every tar member (a wall-clock stamp would break byte identity)."""


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A member header with fixed mtime, mode, owner: the same members give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = SHARD_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def add_members(tar: tarfile.TarFile, members: Iterable[tuple[str, bytes]]) -> None:
    """Append ``(name, bytes)`` members to an open archive."""
    for name, payload in members:
        tar.addfile(tar_info(name, len(payload)), io.BytesIO(payload))


def write_tar(target: str | os.PathLike | IO[bytes], samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """A ustar archive of ``(key, {member: bytes})`` samples at a path or into a binary file object."""
    if isinstance(target, (str, os.PathLike)):
        with open(Path(target), "wb") as f:
            write_tar(f, samples)
        return
    with tarfile.open(fileobj=target, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            add_members(tar, tar_members(key, members))


class TarStream:
    """Writes ustar members straight to a binary file, byte for byte what ``tarfile`` writes for
    :func:`add_members` followed by ``close()``, hashing and counting as it goes.

    Members are whole 512-byte blocks, so the members of one archive may be written in several
    parts (files) by several processes and joined in order; :meth:`finish` then appends the
    end-of-archive blocks (two zero blocks, then zeros up to ``tarfile.RECORDSIZE``), given
    the size of everything before.  ``.npy`` payloads go from the array's buffer to the file
    without an intermediate ``bytes`` copy.
    """

    def __init__(self, f: IO[bytes]) -> None:
        import hashlib

        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.offsets: list[int] = []
        """Where each sample's first header starts, relative to this stream's first byte."""
        self.samples_end: int | None = None
        """Where the samples end (set by :meth:`finish`: the manifest's last offset)."""

    def write(self, data: bytes | memoryview) -> None:
        self.sha.update(data)
        self._f.write(data)
        self.size += len(data)

    def written(self, data: bytes | memoryview) -> None:
        """Hash and count ``data`` that is already in the file at this point (not written again)."""
        self.sha.update(data)
        self.size += len(data)

    def _member(self, name: str, size: int, chunks: Iterable[bytes | memoryview]) -> None:
        self.write(tar_info(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))
        for chunk in chunks:
            self.write(chunk)
        if size % tarfile.BLOCKSIZE:
            self.write(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def add_sample(self, key: str, arrays: dict[str, np.ndarray], labels: Any, meta: Any) -> None:
        """One sample's members in :data:`MEMBERS` order (the bytes of :func:`encode_members`)."""
        if not KEY_PATTERN.match(key):
            raise ValueError(f"sample key {key!r} has characters outside [A-Za-z0-9_-]")
        self.offsets.append(self.size)
        for m in NPY_MEMBERS:
            arr = np.ascontiguousarray(arrays[m])
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
            header = head.getvalue()
            self._member(f"{key}.{m}", len(header) + arr.nbytes, (header, memoryview(arr.reshape(-1).view(np.uint8))))
        for m, obj in zip(JSON_MEMBERS, (labels, meta)):
            data = json_bytes(obj)
            self._member(f"{key}.{m}", len(data), (data,))

    def finish(self, offset: int | None = None) -> None:
        """End the archive; ``offset`` = bytes of the whole archive so far (default: what this stream wrote)."""
        offset = self.size if offset is None else offset
        self.samples_end = offset
        end = 2 * tarfile.BLOCKSIZE
        self.write(tarfile.NUL * (end + -(offset + end) % tarfile.RECORDSIZE))


# ----------------------------------------------------------------------------- decoding

# The header numpy's format 1.0 writes for a C-ordered array of a plain dtype, e.g.
# {'descr': '|u1', 'fortran_order': False, 'shape': (2, 10, 224, 224), }
_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][a-z][0-9]{1,2})', 'fortran_order': False, 'shape': \(((?:[0-9]+, ?)*[0-9]*)\), \} *\n")


def _frombuffer_npy(data: bytes) -> np.ndarray | None:
    """A zero-copy, read-only view of an .npy whose header has the shard writer's form, else None.

    ``np.load`` copies the payload and parses the header with ``ast.literal_eval``;
    together that was the largest per-sample cost of decoding.  Any other header
    (other versions, Fortran order, structured dtypes) returns None and goes
    through ``np.load``.  The payload length must match the header exactly.
    """
    if len(data) < 10 or data[:8] != _NPY_MAGIC:
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    m = _NPY_HEADER.fullmatch(data, 10, end)
    if m is None:
        return None
    dtype = np.dtype(m.group(1).decode("ascii"))
    shape = tuple(int(v) for v in m.group(2).split(b",") if v.strip())
    expected = end + dtype.itemsize * math.prod(shape)
    if len(data) != expected:
        raise ValueError(f"payload of {len(data) - end} bytes, the header {shape} {dtype} needs {expected - end}")
    return np.frombuffer(data, dtype=dtype, offset=end).reshape(shape)


def load_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` member's array, never unpickling (read-only view for the writer's headers).

    Raises ValueError / EOFError / OSError (numpy's) on damaged bytes.
    """
    arr = _frombuffer_npy(data)
    if arr is None:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    return arr


def load_json(data: bytes) -> Any:
    """A ``.json`` member's value (UTF-8); raises ValueError / UnicodeDecodeError on damage."""
    return json.loads(data.decode("utf-8"))


# ----------------------------------------------------------------------------- reading the tar

@dataclass(frozen=True)
class TarMember:
    """One archive member as :class:`TarReader` found it: ``offset`` of its header, ``offset_data``
    of its payload (``size`` bytes)."""

    name: str
    offset: int
    offset_data: int
    size: int
    isfile: bool


_USTAR_MAGIC = b"ustar\x0000"
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


class TarReader:
    """Members of a tar read in order from a binary file positioned at a header: what
    ``tarfile.TarFile.next`` does, at a fraction of its cost for the headers this project writes.

    ``tarfile`` spends ~70 us per header in Python (every numeric field, the name and the checksum
    decoded through generic paths); a sample has 10 members, so at the loader's rates that was the
    largest per-sample cost of reading a shard.  The POSIX ustar header of a regular file (all this
    project's shards hold) is parsed here directly: checksum verified, name joined with its
    ``prefix``, octal size.  Any other header (pax or GNU extended headers, directories and links,
    GNU or v7 archives, base-256 sizes, a bad checksum, a short block) is handed to ``tarfile`` at
    that offset, so what it accepts, what it ends on and what it raises are ``tarfile``'s own
    (:class:`tarfile.ReadError` for damage; a damaged header after the first ends the archive, as
    ``tarfile.next`` does).  After a pax *global* header every later member goes through
    ``tarfile`` too (its fields apply to them).

    :meth:`next` returns the next :class:`TarMember` or None at the end; :meth:`read` returns the
    payload of the member :meth:`next` just returned (else the payload is skipped by a seek).
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._pos = f.tell()  # where the next header starts
        self._current: TarMember | None = None
        self._tar: tarfile.TarFile | None = None  # set after a pax global header

    def _seek_header(self, pos: int) -> None:
        """Seek to ``pos``; a header past the end of the file is damage (tarfile's own check)."""
        f = self._f
        if f.tell() == pos:
            return
        if pos == 0:
            f.seek(0)
            return
        f.seek(pos - 1)
        if not f.read(1):
            raise tarfile.ReadError("unexpected end of data")

    def next(self) -> TarMember | None:
        if self._tar is not None:
            return self._member(self._tar, self._tar.next())
        self._seek_header(self._pos)
        offset = self._pos
        buf = self._f.read(tarfile.BLOCKSIZE)
        if buf == _ZERO_BLOCK:
            self._current = None
            return None
        size = _regular_ustar_size(buf)
        if size is None:
            return self._by_tarfile(offset)
        name = buf[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
        prefix = buf[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode(tarfile.ENCODING, "surrogateescape") + "/" + name
        if name.endswith("/"):  # tarfile reads a "\0"-typed member named like a directory as one
            return self._by_tarfile(offset)
        data = offset + tarfile.BLOCKSIZE
        self._pos = data + size + -size % tarfile.BLOCKSIZE
        self._current = TarMember(name, offset, data, size, True)
        return self._current

    def _by_tarfile(self, offset: int) -> TarMember | None:
        self._f.seek(offset)
        tar = tarfile.open(fileobj=self._f, mode="r:")  # reads (and may raise on) the header at offset
        if tar.pax_headers:
            self._tar = tar
        return self._member(tar, tar.next())  # the member at offset (read when the archive opened)

    def _member(self, tar: tarfile.TarFile, info: tarfile.TarInfo | None) -> TarMember | None:
        """What ``tar`` read, as a :class:`TarMember`; the next header is where ``tar`` stopped."""
        if info is None:
            self._current = None
            return None
        self._pos = tar.offset
        self._current = TarMember(info.name, info.offset, info.offset_data, info.size, info.isfile())
        return self._current

    def read(self, member: TarMember) -> bytes:
        """``member``'s payload (``member`` is what :meth:`next` returned last)."""
        if member is not self._current:
            raise ValueError(f"TarReader.read({member.name!r}): not the member just read")
        if self._f.tell() != member.offset_data:
            self._f.seek(member.offset_data)
        data = self._f.read(member.size)
        if len(data) != member.size:
            raise tarfile.ReadError("unexpected end of data")
        return data


def _regular_ustar_size(buf: bytes) -> int | None:
    """The payload size of a whole POSIX ustar block of a regular file with a valid checksum and an
    octal size field, else None (the header is not one :class:`TarReader` parses itself)."""
    if (len(buf) != tarfile.BLOCKSIZE or buf[257:265] != _USTAR_MAGIC or buf[156:157] not in (b"0", b"\0")
            or buf[124] & 0x80):
        return None
    try:
        stored = int(buf[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(buf[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if stored != 256 + sum(buf[:148]) + sum(buf[156:]):
        return None  # tarfile decides (it also accepts the signed sum; it rejects a bad one)
    return size
