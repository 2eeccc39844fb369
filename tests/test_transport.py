"""Crops from loader workers through reused shared-memory slots (dipro.data.transport)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from loader_shards import check_batch_against_source
from torch.utils.data import DataLoader

from dipro.data import build_loader
from dipro.data.transport import SHAPE_KEY, SLOT_KEY, STORAGE_KEY, CropReceiver, CropSlots, WorkerCropPool


def _fill(t: torch.Tensor, value: int) -> dict:
    t.numpy()[:] = value
    return {"crops": t}


def test_a_slot_is_reused_only_after_the_main_process_copied_it_out():
    slots = CropSlots(num_workers=2, slots_per_worker=2)
    pool, receiver = WorkerCropPool(slots, worker=1), CropReceiver(slots)

    first = pool.pack(_fill(pool.empty((2, 3)), 7))
    assert first[SLOT_KEY] == 2 and first[SHAPE_KEY] == (2, 3) and STORAGE_KEY in first  # worker 1's first slot
    assert "crops" not in first
    second = pool.pack(_fill(pool.empty((2, 3)), 8))
    assert second[SLOT_KEY] == 3
    third = pool.pack(_fill(pool.empty((2, 3)), 9))  # both slots busy: a fresh segment, sent as a tensor
    assert SLOT_KEY not in third and int(third["crops"][0, 0]) == 9

    got = receiver.unpack(first, pin_memory=False)
    assert torch.equal(got["crops"], torch.full((2, 3), 7, dtype=torch.uint8))
    reused = pool.pack(_fill(pool.empty((1, 4)), 5))  # slot 2 is free again: same storage, not re-sent
    assert reused[SLOT_KEY] == 2 and STORAGE_KEY not in reused
    assert torch.equal(got["crops"], torch.full((2, 3), 7, dtype=torch.uint8))  # the copy did not change
    assert torch.equal(receiver.unpack(reused, pin_memory=False)["crops"], torch.full((1, 4), 5, dtype=torch.uint8))
    assert torch.equal(receiver.unpack(second, pin_memory=False)["crops"], torch.full((2, 3), 8, dtype=torch.uint8))

    grown = pool.pack(_fill(pool.empty((4, 10)), 3))  # larger than the slot's storage: a new one goes along
    assert STORAGE_KEY in grown
    assert torch.equal(receiver.unpack(grown, pin_memory=False)["crops"], torch.full((4, 10), 3, dtype=torch.uint8))


def test_a_tensor_not_from_the_pool_is_sent_as_it_is():
    pool = WorkerCropPool(CropSlots(1, 1), worker=0)
    batch = {"crops": torch.zeros(2, 2, dtype=torch.uint8)}
    assert pool.pack(batch) is batch and "crops" in batch


def _raw_batches(root, num_workers: int, slots: CropSlots | None):
    loader = build_loader(root, "mortality", "train", 2, num_workers, shuffle_buffer=4, seed=1, steps_per_epoch=12)
    loader.dataset.crop_slots = slots
    return loader, DataLoader(loader.dataset, batch_size=None, collate_fn=lambda b: b, num_workers=num_workers,
                              prefetch_factor=2)


def test_workers_send_each_slot_storage_once_and_batches_stay_exact(shards):
    root, written = shards
    slots = CropSlots(2, 5)
    loader, raw = _raw_batches(root, 2, slots)
    receiver = CropReceiver(slots)
    kept, sent_storages = [], 0
    for batch in raw:
        assert SLOT_KEY in batch  # one batch in flight per slot at most: never more than the pool holds
        sent_storages += STORAGE_KEY in batch
        kept.append(receiver.unpack(batch, pin_memory=False))
    assert len(kept) == 12 and sent_storages < len(kept)  # slots were reused
    # every batch kept to the end still equals its source: no slot was overwritten under it
    from dipro.data.collate import to_tensors

    for batch in kept:
        check_batch_against_source(to_tensors(batch), written, "mortality_los")


@pytest.mark.parametrize("num_workers", [1, 2])
def test_loader_with_workers_equals_loader_without(shards, num_workers):
    root, _ = shards
    a = list(build_loader(root, "mortality", "val", 3, 0))
    b = list(build_loader(root, "mortality", "val", 3, num_workers))
    by_key = {k: (i, j) for i, batch in enumerate(a) for j, k in enumerate(batch["sample_key"])}
    assert sorted(by_key) == sorted(k for batch in b for k in batch["sample_key"])
    for batch in b:
        for j, key in enumerate(batch["sample_key"]):
            i, jj = by_key[key]
            t = int(batch["cxr_mask"][j].sum())
            assert np.array_equal(batch["crops"][j, :t].numpy(), a[i]["crops"][jj, :t].numpy())
