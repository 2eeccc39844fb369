"""Tiny shards written directly in the contract format, and the checks the loader tests make on them.

Moved here unchanged from tests/test_loader.py so that test_loader and test_transport share them
without importing each other: :func:`write_shards` writes ARCHITECTURE.md section 2 with
:mod:`data_sharding.shard_format` (uneven shard sizes, a varying number of CXRs, EHR windows of length 0
and more, missing regions) and returns what it wrote; :func:`check_batch_against_source` compares a
loader batch with it. The module-scoped ``shards`` fixture (tests/conftest.py) writes one such tree.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_sharding import shard_format
from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_DISEASES, NUM_EHR_VARIABLES, NUM_REGIONS

CROP = 8


def _npy_bytes(arr: np.ndarray) -> bytes:
    """Plain ``np.save`` (keeps Fortran order): the decoder must read what any numpy writes."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def make_sample(rng: np.random.Generator, task_dir: str, stay_id: int, row: int, split: str) -> dict:
    """One sample's arrays/labels as the shard writer stores them."""
    t = 2 if task_dir == "disease_progression" else int(rng.integers(2, 6))
    n_ehr = int(rng.choice([0, 1, 3, 7]))
    present = (rng.random((t, NUM_REGIONS)) > 0.15).astype(np.uint8)
    crops = rng.integers(1, 256, size=(t, NUM_REGIONS, CROP, CROP), dtype=np.uint8) * present[:, :, None, None]
    cxr_hours = np.sort(rng.uniform(0, 48, size=t)).astype(np.float32)
    s = {
        "key": f"s{stay_id}_{row}",
        "crops": crops.astype(np.uint8),
        "region_present": present,
        "cxr_hours": cxr_hours,
        "ehr_values": rng.normal(size=(n_ehr, NUM_EHR_VARIABLES)).astype(np.float32),
        "ehr_masks": (rng.random((n_ehr, NUM_EHR_VARIABLES)) > 0.5).astype(np.uint8),
        "ehr_hours": np.arange(n_ehr, dtype=np.float32),
        "demographics": rng.normal(size=NUM_DEMOGRAPHICS).astype(np.float32),
        "region_labels": rng.integers(0, 4, size=(t - 1, NUM_REGIONS, NUM_DISEASES)).astype(np.int8),
        "meta": {"subject_id": 1000 + stay_id, "stay_id": stay_id, "dicom_ids": [f"d{stay_id}_{i}" for i in range(t)],
                 "split": split, "task_dir": task_dir, "row": row},
    }
    if task_dir == "disease_progression":
        s["labels"] = {"progression": [int(v) for v in rng.integers(0, 4, size=NUM_DISEASES)]}
    else:
        los = float(rng.uniform(2, 12))
        s["labels"] = {"mortality": int(rng.integers(0, 2)), "los_days": los, "los_bin": int(rng.integers(0, 4))}
    return s


def sample_members(s: dict) -> dict[str, bytes]:
    """The sample's members as the shard writer encodes them (data_sharding.shard_format)."""
    return shard_format.member_bytes({m: s[m[: -len(".npy")]] for m in shard_format.NPY_MEMBERS},
                                     s["labels"], s["meta"])


def write_shards(root: Path, sizes: dict[tuple[str, str], list[int]], seed: int = 0, crop_size: int = CROP) -> dict[str, dict]:
    """Write ``root/{task_dir}/{split}-NNNNNN.tar`` of the given sizes and the manifest; return key -> sample."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict] = {}
    rows = []
    stay = 100
    for (task_dir, split), shard_sizes in sizes.items():
        (root / task_dir).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(shard_sizes):
            rel = f"{task_dir}/{split}-{i:06d}.tar"
            members = []
            for row in range(n):
                stay += 1
                s = make_sample(rng, task_dir, stay, row, split)
                s["shard"] = rel
                written[s["key"]] = s
                members.append((s["key"], sample_members(s)))
            shard_format.write_tar(root / rel, members)
            data = (root / rel).read_bytes()
            rows.append({"task": task_dir, "split": split, "path": rel, "samples": n, "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest(), "fingerprint": "f" * 16,
                         "settings": json.dumps({"crop_size": crop_size})})
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return written


UNEVEN = [7, 1, 12, 3, 5]  # 28 samples, shards of very different sizes



def check_batch_against_source(batch: dict, written: dict[str, dict], task_dir: str) -> None:
    """Every row of ``batch`` equals its source sample; padding and masks as ARCHITECTURE.md section 3 says."""
    b, t_max = batch["cxr_mask"].shape
    l_max = batch["ehr_mask"].shape[1]
    assert batch["crops"].shape == (b, t_max, NUM_REGIONS, CROP, CROP) and batch["crops"].dtype == torch.uint8
    assert batch["region_labels"].shape == (b, t_max - 1, NUM_REGIONS, NUM_DISEASES)
    assert batch["region_labels"].dtype == torch.int64
    assert batch["ehr_values"].shape == (b, l_max, NUM_EHR_VARIABLES) and l_max >= 1
    assert batch["ehr_obs_mask"].dtype == torch.float32 and batch["ehr_mask"].dtype == torch.bool
    assert len(batch["sample_key"]) == b
    for i, key in enumerate(batch["sample_key"]):
        s = written[key]
        t, n = s["crops"].shape[0], s["ehr_values"].shape[0]
        assert np.array_equal(batch["crops"][i, :t].numpy(), s["crops"])  # augmentation happens on the device
        assert not batch["crops"][i, t:].any()
        assert batch["cxr_mask"][i].tolist() == [True] * t + [False] * (t_max - t)
        assert np.array_equal(batch["region_mask"][i, :t].numpy(), s["region_present"] == 1)
        assert not batch["region_mask"][i, t:].any()
        assert np.array_equal(batch["cxr_hours"][i, :t].numpy(), s["cxr_hours"])
        assert not batch["cxr_hours"][i, t:].any()
        assert np.array_equal(batch["ehr_values"][i, :n].numpy(), s["ehr_values"])
        assert np.array_equal(batch["ehr_obs_mask"][i, :n].numpy(), s["ehr_masks"].astype(np.float32))
        assert np.array_equal(batch["ehr_hours"][i, :n].numpy(), s["ehr_hours"])
        assert batch["ehr_mask"][i].tolist() == [True] * n + [False] * (l_max - n)
        assert not batch["ehr_values"][i, n:].any() and not batch["ehr_obs_mask"][i, n:].any()
        assert np.array_equal(batch["demographics"][i].numpy(), s["demographics"])
        assert np.array_equal(batch["region_labels"][i, : t - 1].numpy(), s["region_labels"].astype(np.int64))
        assert (batch["region_labels"][i, t - 1:] == 3).all()
        assert batch["stay_id"][i].item() == s["meta"]["stay_id"]
        assert batch["subject_id"][i].item() == s["meta"]["subject_id"]
        if task_dir == "disease_progression":
            assert batch["progression"][i].tolist() == s["labels"]["progression"]
        else:
            assert batch["mortality"][i].item() == float(s["labels"]["mortality"])
            assert batch["los_bin"][i].item() == s["labels"]["los_bin"]
            assert batch["los_days"][i].item() == pytest.approx(s["labels"]["los_days"], rel=1e-6)
