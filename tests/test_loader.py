"""dipro.data.build_loader against tiny shards written directly in the contract format.

The helper :func:`write_shards` writes ARCHITECTURE.md section 2 with
``webdataset.TarWriter`` (uneven shard sizes, a varying number of CXRs, EHR
windows of length 0 and more, missing regions) and returns what it wrote, so
every test can compare the loader's batches with the source values.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_DISEASES, NUM_EHR_VARIABLES, NUM_REGIONS
from dipro.data import build_loader, eval_index_for_rank, move_to_device
from dipro.data.augment import AUGMENT_KEYS, AugmentConfig
from data_sharding.errors import ConfigError, DataError

CROP = 8


def _npy_bytes(arr: np.ndarray) -> bytes:
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
    out = {f"{name}.npy": _npy_bytes(s[name]) for name in (
        "crops", "region_present", "cxr_hours", "ehr_values", "ehr_masks", "ehr_hours", "demographics", "region_labels")}
    out["labels.json"] = json.dumps(s["labels"]).encode()
    out["meta.json"] = json.dumps(s["meta"]).encode()
    return out


def write_tar(path: Path, members_by_key: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in members_by_key:
            for name, data in members.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, sizes: dict[tuple[str, str], list[int]], seed: int = 0, crop_size: int = CROP) -> dict[str, dict]:
    """Write ``root/{task_dir}/{split}-NNNNNN.tar`` of the given sizes and the manifest; return key -> sample."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    written: dict[str, dict] = {}
    rows = []
    stay = 100
    for (task_dir, split), shard_sizes in sizes.items():
        (root / task_dir).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(shard_sizes):
            rel = f"{task_dir}/{split}-{i:06d}.tar"
            with wds.TarWriter(str(root / rel), mtime=0) as sink:
                for row in range(n):
                    stay += 1
                    s = make_sample(rng, task_dir, stay, row, split)
                    s["shard"] = rel
                    written[s["key"]] = s
                    sink.write({"__key__": s["key"], **sample_members(s)})
            data = (root / rel).read_bytes()
            rows.append({"task": task_dir, "split": split, "path": rel, "samples": n, "bytes": len(data),
                         "sha256": hashlib.sha256(data).hexdigest(), "fingerprint": "f" * 16,
                         "settings": json.dumps({"crop_size": crop_size})})
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return written


UNEVEN = [7, 1, 12, 3, 5]  # 28 samples, shards of very different sizes


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("shards")
    written = write_shards(root, {
        ("mortality_los", "train"): UNEVEN,
        ("mortality_los", "val"): [4, 6, 1],
        ("disease_progression", "train"): [5, 4],
        ("disease_progression", "test"): [3, 2],
    })
    return root, written


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["sample_key"]]


# ----------------------------------------------------------------------------- round trip

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


@pytest.mark.parametrize("task,split,task_dir", [
    ("mortality", "val", "mortality_los"),
    ("length_of_stay", "val", "mortality_los"),
    ("disease_progression", "test", "disease_progression"),
])
def test_round_trip_values_padding_and_masks(shards, task, split, task_dir):
    root, written = shards
    loader = build_loader(root, task, split, batch_size=3, num_workers=0)
    expected = sorted(k for k, s in written.items() if s["shard"].startswith(f"{task_dir}/{split}-"))
    seen = []
    for batch in loader:
        check_batch_against_source(batch, written, task_dir)
        assert batch["num_corrupt"] == 0
        assert ("progression" in batch) == (task_dir == "disease_progression")
        assert ("mortality" in batch) == (task_dir == "mortality_los")
        seen += batch["sample_key"]
    assert sorted(seen) == expected  # every sample once, in manifest order
    assert len(loader) == -(-len(expected) // 3)
    assert loader.stats.samples == len(expected) and loader.stats.corrupt == 0


def test_ehr_free_sample_gets_one_all_false_step(tmp_path):
    written = write_shards(tmp_path, {("mortality_los", "test"): [6]}, seed=3)
    empty = [k for k, s in written.items() if s["ehr_values"].shape[0] == 0]
    assert empty and len(empty) < len(written), "fixture should hold samples with and without EHR"
    checked = []
    for batch in build_loader(tmp_path, "mortality", "test", batch_size=1, num_workers=0):
        key = batch["sample_key"][0]
        n = written[key]["ehr_values"].shape[0]
        if key in empty:
            assert batch["ehr_mask"].shape == (1, 1) and not batch["ehr_mask"].any()
            assert not batch["ehr_values"].any() and not batch["ehr_obs_mask"].any()
            checked.append(key)
        else:
            assert batch["ehr_mask"].shape == (1, n) and batch["ehr_mask"].all()
    assert sorted(checked) == sorted(empty)  # every EHR-free sample was read and checked


def test_last_cxr_only_and_max_cxrs(shards):
    root, written = shards
    for batch in build_loader(root, "mortality", "val", batch_size=4, num_workers=0, last_cxr_only=True):
        assert batch["crops"].shape[1] == 2 and batch["region_labels"].shape[1] == 1
        for i, key in enumerate(batch["sample_key"]):
            s = written[key]
            assert np.array_equal(batch["crops"][i].numpy(), s["crops"][-2:])
            assert np.array_equal(batch["cxr_hours"][i].numpy(), s["cxr_hours"][-2:])
            assert np.array_equal(batch["region_labels"][i, 0].numpy(), s["region_labels"][-1])
    for batch in build_loader(root, "mortality", "val", batch_size=4, num_workers=0, max_cxrs=3):
        assert batch["crops"].shape[1] <= 3
        for i, key in enumerate(batch["sample_key"]):
            t = min(3, written[key]["crops"].shape[0])
            assert np.array_equal(batch["crops"][i, :t].numpy(), written[key]["crops"][-t:])


# ----------------------------------------------------------------------------- distributed plans

@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_equal_steps_over_uneven_shards(shards, world_size, num_workers):
    root, written = shards
    batch_size = 2
    steps = sum(UNEVEN) // (batch_size * world_size)
    for rank in range(world_size):
        loader = build_loader(root, "mortality", "train", batch_size, num_workers, rank=rank, world_size=world_size,
                              shuffle_buffer=4, seed=5)
        assert len(loader) == steps
        batches = list(loader)
        assert len(batches) == steps
        assert all(len(b["sample_key"]) == batch_size for b in batches)
        assert loader.stats.samples == steps * batch_size and loader.stats.batches == steps
        for b in batches:
            check_batch_against_source(b, written, "mortality_los")


def test_train_first_pass_ranks_read_disjoint_samples(shards):
    root, _ = shards
    per_rank = [set(_keys(build_loader(root, "mortality", "train", 2, 0, rank=r, world_size=2, augment=False)))
                for r in range(2)]
    assert not per_rank[0] & per_rank[1]


def test_steps_per_epoch_repeats_the_stream(shards):
    root, _ = shards
    for rank in range(3):
        loader = build_loader(root, "disease_progression", "train", 2, 2, rank=rank, world_size=3, steps_per_epoch=7)
        assert len(list(loader)) == 7 == len(loader)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_covers_every_sample_exactly_once(shards, world_size, num_workers):
    root, written = shards
    expected = sorted(k for k, s in written.items() if s["shard"].startswith("mortality_los/val-"))
    seen: list[str] = []
    for rank in range(world_size):
        loader = build_loader(root, "mortality", "val", 2, num_workers, rank=rank, world_size=world_size)
        keys = _keys(loader)
        assert len(keys) == len(eval_index_for_rank(len(expected), rank, world_size)) == loader.num_samples
        assert loader.stats.batches == len(loader)
        seen += keys
    assert sorted(seen) == expected and len(seen) == len(set(seen))


def test_eval_index_for_rank_partitions():
    for n in (0, 1, 10, 11):
        for w in (1, 2, 3, 4):
            blocks = [eval_index_for_rank(n, r, w) for r in range(w)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_rank_from_environment(shards, monkeypatch):
    root, _ = shards
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = build_loader(root, "mortality", "train", 2, 0)
    assert (loader.spec.rank, loader.spec.world_size) == (1, 2) and len(loader) == sum(UNEVEN) // 4


# ----------------------------------------------------------------------------- determinism

def test_order_deterministic_per_seed_and_epoch(shards):
    root, _ = shards

    def order(epoch: int, seed: int = 1, workers: int = 0) -> list[str]:
        loader = build_loader(root, "mortality", "train", 2, workers, seed=seed, rank=0, world_size=1, shuffle_buffer=8)
        loader.set_epoch(epoch)
        return _keys(loader)

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != order(0, seed=2)
    assert order(3, workers=2) == order(3, workers=2)


# ----------------------------------------------------------------------------- corrupt samples

def _corrupt_copy(tmp_path: Path, break_key_of: str = "npy") -> tuple[Path, str]:
    """A val split of 12 samples in which one sample's crops.npy is garbage; returns (root, bad key)."""
    written = write_shards(tmp_path, {("mortality_los", "val"): [5, 7]}, seed=7)
    bad = sorted(k for k, s in written.items() if s["shard"].endswith("val-000001.tar"))[2]
    members = []
    with tarfile.open(tmp_path / "mortality_los/val-000001.tar") as tar:
        for m in tar.getmembers():
            key, _, name = m.name.partition(".")
            data = tar.extractfile(m).read()
            if key == bad and name == "crops.npy":
                data = data[:20] + b"\x00garbage"
            if not members or members[-1][0] != key:
                members.append((key, {}))
            members[-1][1][name] = data
    write_tar(tmp_path / "mortality_los/val-000001.tar", members)
    return tmp_path, bad


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_sample_skipped_and_counted(tmp_path, num_workers):
    root, bad = _corrupt_copy(tmp_path)
    loader = build_loader(root, "mortality", "val", 2, num_workers, max_corrupt_fraction=0.5)
    keys = _keys(loader)
    assert bad not in keys and len(keys) == 11
    assert loader.stats.corrupt == 1 and loader.stats.samples == 11
    assert bad in loader.stats.last_corrupt[-1] and "crops.npy" in loader.stats.last_corrupt[-1]
    assert loader.stats.as_dict()["data/corrupt_skipped"] == 1.0


def test_corrupt_fraction_above_threshold_stops_with_shard_and_key(tmp_path):
    root, bad = _corrupt_copy(tmp_path)
    loader = build_loader(root, "mortality", "val", 2, 0, max_corrupt_fraction=0.05)
    with pytest.raises(DataError, match=rf"max_corrupt_fraction.*mortality_los/val-000001.tar key {bad}"):
        list(loader)


def test_corrupt_threshold_checked_mid_epoch_in_training(tmp_path):
    root, bad = _corrupt_copy(tmp_path)
    (root / "mortality_los/val-000000.tar").rename(root / "mortality_los/train-000000.tar")
    (root / "mortality_los/val-000001.tar").rename(root / "mortality_los/train-000001.tar")
    table = pq.read_table(root / "manifest.parquet").to_pylist()
    for row in table:
        row["split"], row["path"] = "train", row["path"].replace("val-", "train-")
    pq.write_table(pa.Table.from_pylist(table), root / "manifest.parquet")
    loader = build_loader(root, "mortality", "train", 2, 0, max_corrupt_fraction=0.01, corrupt_check_after=1,
                          steps_per_epoch=50, shuffle=False)
    with pytest.raises(DataError, match=bad):
        list(loader)


def test_truncated_shard_counts_lost_samples(tmp_path):
    write_shards(tmp_path, {("mortality_los", "val"): [4, 6]}, seed=9)
    path = tmp_path / "mortality_los/val-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    loader = build_loader(tmp_path, "mortality", "val", 3, 0, max_corrupt_fraction=1.0)
    keys = _keys(loader)
    assert 4 <= len(keys) < 10
    assert loader.stats.corrupt == 10 - len(keys)
    assert "val-000001.tar" in loader.stats.last_corrupt[-1]


# ----------------------------------------------------------------------------- augmentation

def test_augmentation_off_for_evaluation(shards):
    root, written = shards
    loader = build_loader(root, "mortality", "val", 4, 0)
    assert not loader.spec.augment and "augment" not in [n for n, _ in loader.dataset.stages]
    for batch in loader:
        check_batch_against_source(batch, written, "mortality_los")
    with pytest.raises(ConfigError, match="training only"):
        build_loader(root, "mortality", "val", 4, 0, augment=True)


def test_augmentation_on_for_training_draws_parameters_per_sample_and_region(shards):
    root, written = shards
    names = [n for n, _ in build_loader(root, "mortality", "train", 2, 0).dataset.stages]
    assert names == ["plan", "read", "shuffle", "decode", "select_cxrs", "augment", "batch", "with_epoch"]
    cfg = AugmentConfig()
    batches = list(build_loader(root, "mortality", "train", 2, 0, seed=3))
    for batch in batches:
        check_batch_against_source(batch, written, "mortality_los")  # pixels travel unchanged
        contrast, brightness, shift = (batch[k] for k in AUGMENT_KEYS)
        assert contrast.shape == brightness.shape == (2, NUM_REGIONS) and shift.shape == (2, NUM_REGIONS, 2)
        assert contrast.dtype == brightness.dtype == torch.float32 and shift.dtype == torch.int64
        assert ((contrast - 1).abs() <= cfg.contrast).all() and (brightness.abs() <= cfg.brightness).all()
        assert (shift.abs() <= round(cfg.max_shift * CROP)).all()
    every = torch.cat([b["aug_contrast"] for b in batches])
    assert len(set(every.flatten().tolist())) == every.numel()  # a fresh draw for every sample and region
    again = list(build_loader(root, "mortality", "train", 2, 0, seed=3))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in AUGMENT_KEYS)  # seeded
    loader = build_loader(root, "mortality", "train", 2, 0, seed=3)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))["aug_contrast"], batches[0]["aug_contrast"])  # a new epoch, new draws
    no_aug = next(iter(build_loader(root, "mortality", "train", 2, 0, augment=False)))
    assert not any(k in no_aug for k in AUGMENT_KEYS)


# ----------------------------------------------------------------------------- errors and helpers

def test_missing_manifest_and_split_are_clear_errors(tmp_path, shards):
    with pytest.raises(DataError, match="manifest.parquet"):
        build_loader(tmp_path, "mortality", "train", 2, 0)
    root, _ = shards
    with pytest.raises(DataError, match="no 'disease_progression' shards for split 'val'"):
        build_loader(root, "disease_progression", "val", 2, 0)
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        build_loader(root, "disease_progression", "train", 8, 0, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="unknown task"):
        build_loader(root, "survival", "train", 2, 0)


def test_move_to_device_keeps_non_tensors(shards):
    root, _ = shards
    batch = next(iter(build_loader(root, "disease_progression", "test", 2, 0)))
    moved = move_to_device(batch, "cpu")
    assert moved["sample_key"] == batch["sample_key"] and moved["num_corrupt"] == 0
    assert torch.equal(moved["crops"], batch["crops"])


# ----------------------------------------------------------------------------- .npy members

@pytest.mark.parametrize("arr", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.zeros((0, 38), np.float32),
                                 np.ones(17, np.float32), np.asfortranarray(np.arange(6, dtype=np.int8).reshape(2, 3)),
                                 np.zeros((), np.float32)])
def test_npy_members_decode_as_np_load_does(arr):
    from dipro.data.decode import _npy

    got = _npy({"x.npy": _npy_bytes(arr)}, "x.npy", arr.dtype, arr.ndim, "shard.tar", "k")
    assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)


def test_npy_member_with_a_short_or_long_payload_is_corrupt():
    from dipro.data.decode import CorruptSample, _npy

    data = _npy_bytes(np.zeros((2, 3), np.float32))
    for bad in (data[:-1], data + b"\0"):
        with pytest.raises(CorruptSample, match=r"x.npy is not a readable .npy.*needs 24"):
            _npy({"x.npy": bad}, "x.npy", np.float32, 2, "shard.tar", "k")
