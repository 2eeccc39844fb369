"""data_sharding.shard_format: the format module agrees with its documentation and round-trips."""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_sharding import shard_format as sf

ROOT = Path(__file__).resolve().parents[1]


def _documented_members() -> dict[str, str]:
    """member -> its 'content' cell in the table of docs/ARCHITECTURE.md section 2."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text[text.index("## 2. Shards"):text.index("## 3. Batches")]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+\.(?:npy|json))` \| (.*) \|$", section, re.M)}


def test_members_dtypes_and_shapes_are_the_documented_ones():
    doc = _documented_members()
    assert tuple(doc) == sf.MEMBERS  # same members, same order
    names = {"T": "T", "T-1": "T-1", "L": "L", "C": "C"}
    for member, spec in sf.ARRAYS.items():
        dims = ", ".join(names[d] if isinstance(d, str) else str(d) for d in spec.dims)
        assert doc[member].startswith(f"{spec.dtype} [{dims}]"), (member, doc[member])


def test_concrete_shapes():
    # 3 CXRs, 5 EHR hours, 16 px crops, by hand from the table
    assert sf.ARRAYS["crops.npy"].shape(3, 5, 16) == (3, 10, 16, 16)
    assert sf.ARRAYS["region_labels.npy"].shape(3, 5, 16) == (2, 10, 7)
    assert sf.ARRAYS["ehr_masks.npy"].shape(3, 5, 16) == (5, 38)
    assert sf.ARRAYS["demographics.npy"].shape(3, 5, 16) == (17,)
    assert sf.INPUT_ARRAYS == ("crops", "region_present", "cxr_hours", "ehr_values", "ehr_masks", "ehr_hours",
                               "demographics")


def _arrays(t: int = 2, length: int = 3, crop: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {m: rng.integers(0, 2, spec.shape(t, length, crop)).astype(spec.dtype) for m, spec in sf.ARRAYS.items()}


def test_written_tar_reads_back_with_plain_tarfile_and_numpy():
    arrays = _arrays()
    labels, meta = {"mortality": 1, "los_days": 2.5, "los_bin": 0}, {"stay_id": 7, "row": 3}
    buf = io.BytesIO()
    sf.write_tar(buf, [("s7_3", sf.member_bytes(arrays, labels, meta))])
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == [f"s7_3.{m}" for m in sf.MEMBERS]
        assert {(i.mtime, i.uid, i.gid, i.mode) for i in infos} == {(0, 0, 0, 0o444)}
        got = {i.name.split(".", 1)[1]: tar.extractfile(i).read() for i in infos}
    for m, arr in arrays.items():
        back = np.load(io.BytesIO(got[m]), allow_pickle=False)
        assert back.dtype == arr.dtype and np.array_equal(back, arr)
        assert np.array_equal(sf.load_npy(got[m]), arr)
    assert got["labels.json"] == b'{"los_bin":0,"los_days":2.5,"mortality":1}'  # canonical: sorted, no spaces
    assert json.loads(got["meta.json"]) == meta


def test_same_sample_same_bytes():
    one, two = io.BytesIO(), io.BytesIO()
    for buf in (one, two):
        sf.write_tar(buf, [("s1_0", sf.member_bytes(_arrays(), {"progression": [0] * 7}, {"row": 0}))])
    assert one.getvalue() == two.getvalue()


def test_keys_and_member_names():
    assert sf.sample_key(123, 4) == "s123_4"
    assert sf.split_member_name("mortality_los/s12_3.crops.npy") == ("s12_3", "crops.npy")
    with pytest.raises(ValueError, match="outside"):
        sf.encode_members("s1.0", _arrays(), {}, {})


def test_npy_size_matches_numpy():
    for shape, dtype in (((2, 10, 32, 32), np.uint8), ((0, 38), np.float32), ((17,), np.float32)):
        assert sf.npy_size(shape, dtype) == len(sf.npy_bytes(np.zeros(shape, dtype)))


def test_load_npy_refuses_pickled_objects_and_short_payloads():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        sf.load_npy(buf.getvalue())
    data = sf.npy_bytes(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="needs 24"):
        sf.load_npy(data[:-1])


# ----------------------------------------------------------------------------- TarReader

def _members_by_tarfile(data: bytes, start: int = 0) -> list[tuple]:
    f = io.BytesIO(data)
    f.seek(start)
    out = []
    with tarfile.open(fileobj=f, mode="r:") as tar:
        while (m := tar.next()) is not None:
            payload = tar.extractfile(m).read() if m.isfile() else None
            out.append((m.name, m.offset, m.offset_data, m.size, m.isfile(), payload))
    return out


def _members_by_reader(data: bytes, start: int = 0) -> list[tuple]:
    f = io.BytesIO(data)
    f.seek(start)
    tar = sf.TarReader(f)
    out = []
    while (m := tar.next()) is not None:
        out.append((m.name, m.offset, m.offset_data, m.size, m.isfile, tar.read(m) if m.isfile else None))
    return out


def _tar(fmt: int, entries: list[tuple[str, bytes | None]], pax_global: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_global or {}) as tar:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


ENTRIES = [("s1_0.crops.npy", b"x" * 1000), ("d", None), ("s1_0.meta.json", b"{}"), ("s1_0.empty", b""),
           ("p/" * 60 + "s2_0.labels.json", b"[1]"), ("s2_0.big", bytes(range(256)) * 9)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_reads_what_tarfile_reads(fmt):
    """Names (a 180-character one: ustar prefix, GNU long name, pax path), offsets, sizes and payloads
    are tarfile's, for regular members, a directory and an empty member, from the start and mid-archive."""
    data = _tar(fmt, ENTRIES)
    expected = _members_by_tarfile(data)
    assert [e[0] for e in expected] == [n for n, _ in ENTRIES] and _members_by_reader(data) == expected
    mid = expected[2][1]  # a header mid-archive: readers start there (segments begin mid-shard)
    assert _members_by_reader(data, mid) == _members_by_tarfile(data, mid) == expected[2:]


def test_tar_reader_after_a_pax_global_header_and_on_the_writers_own_shards():
    data = _tar(tarfile.PAX_FORMAT, ENTRIES[:3], pax_global={"comment": "global"})
    assert _members_by_reader(data) == _members_by_tarfile(data)
    buf = io.BytesIO()
    stream = sf.TarStream(buf)
    for i in range(3):
        stream.add_sample(f"s7_{i}", _arrays(), {"mortality": 1}, {"stay_id": 7, "row": i})
    stream.finish()
    own = buf.getvalue()
    assert _members_by_reader(own) == _members_by_tarfile(own) and len(_members_by_tarfile(own)) == 3 * len(sf.MEMBERS)


class _ForwardOnly:
    """A stream with nothing but read(), answering at most 700 bytes a call (a bucket body can answer short)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(700 if n < 0 else min(n, 700))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_over_a_forward_only_stream_hashes_every_byte_once(fmt):
    """`dipro shards verify` reads a shard once, forward (a bucket object's body): TarReader over
    verify.HashingStream finds what tarfile finds (GNU and pax headers go back to their first byte
    for tarfile), and the stream's sha256 and size are the whole archive's, payloads skipped or read."""
    import hashlib

    from data_sharding.verify import HashingStream

    data = _tar(fmt, ENTRIES) + b"trailing bytes after the end of the archive"
    stream = HashingStream(_ForwardOnly(data))
    tar, got = sf.TarReader(stream), []
    while (m := tar.next()) is not None:
        read = m.isfile and m.size % 2 == 0  # some payloads read, the others skipped by a seek
        got.append((m.name, m.offset, m.offset_data, m.size, m.isfile, tar.read(m) if read else None))
    want = [(n, o, od, sz, isf, p if isf and sz % 2 == 0 else None) for n, o, od, sz, isf, p in _members_by_tarfile(data)]
    assert got == want
    stream.drain()
    assert stream.sha.hexdigest() == hashlib.sha256(data).hexdigest() and stream.size == len(data)
    with pytest.raises(OSError, match="forward-only stream"):
        stream.seek(0)


def test_tar_reader_on_damage_behaves_as_tarfile():
    data = _tar(tarfile.USTAR_FORMAT, [("a.x", b"1" * 700), ("a.y", b"2" * 10), ("b.x", b"3" * 5)])
    second = _members_by_tarfile(data)[1][1]
    bad_sum = bytearray(data)
    bad_sum[second + 20] ^= 0xFF  # the second header's checksum no longer matches: tarfile ends there
    assert _members_by_reader(bytes(bad_sum)) == _members_by_tarfile(bytes(bad_sum)) == _members_by_tarfile(data)[:1]
    bad_first = bytearray(data)
    bad_first[20] ^= 0xFF  # ... and on the very first header it raises
    for read in (_members_by_reader, _members_by_tarfile):
        with pytest.raises(tarfile.ReadError):
            read(bytes(bad_first))
    for cut in (second - 100, second + 300, len(data) - 2000):  # truncated in a payload or in a header
        got, want = [], []
        for read, out in ((_members_by_reader, got), (_members_by_tarfile, want)):
            try:
                out.extend(read(data[:cut]))
            except tarfile.ReadError as exc:
                out.append(("ReadError", str(exc)))
        assert got == want, cut
    tar = sf.TarReader(io.BytesIO(data))
    first = tar.next()
    tar.next()
    with pytest.raises(ValueError, match="not the member just read"):
        tar.read(first)
