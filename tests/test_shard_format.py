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
