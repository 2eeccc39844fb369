"""dipro.data.build_loader against tiny shards written directly in the contract format.

The helper :func:`write_shards` (tests/loader_shards.py, fixture ``shards`` in tests/conftest.py) writes ARCHITECTURE.md section 2 with
:mod:`data_sharding.shard_format` (uneven shard sizes, a varying number of CXRs, EHR
windows of length 0 and more, missing regions) and returns what it wrote, so
every test can compare the loader's batches with the source values.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from loader_shards import CROP, UNEVEN, _npy_bytes, check_batch_against_source, write_shards

from data_sharding import shard_format
from data_sharding.constants import NUM_REGIONS
from dipro.data import build_loader, eval_index_for_rank, move_to_device
from dipro.data.augment import AUGMENT_KEYS, AugmentConfig
from data_sharding.errors import ConfigError, DataError


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["sample_key"]]


# ----------------------------------------------------------------------------- round trip

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
    shard_format.write_tar(tmp_path / "mortality_los/val-000001.tar", members)
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
