"""Moving a batch's crops from a loader worker to the main process through reused shared memory.

A DataLoader worker hands a tensor to the main process by putting its storage
in a fresh shared-memory segment and passing the file descriptor over a
socket.  For the crops (megabytes per batch) the fresh segment's pages are the
cost: the kernel must allocate and zero every 4 KiB page, then the main
process maps and faults them in again.  On the 2-core VM this project is
developed on that is about 1 ms per MB, more than decoding the batch
(``benchmarks/loader.py`` prints both).  So each worker keeps a few crop
*slots* -- shared storages it reuses -- and a batch travels as a slot number
and a shape; the storage itself crosses the process boundary once, when the
slot is created or grown.

The main process copies the crops out of the slot (into pinned memory when the
loader pins) and only then marks the slot free; a worker reuses a slot only
when it is marked free and otherwise allocates a fresh segment for that batch,
so it never waits and never overwrites crops the main process has not copied.
The free/busy flags live in one shared array behind a lock (whose acquire and
release order the copy before the flag, on any CPU).
"""
from __future__ import annotations

import math
import multiprocessing
from typing import Any

import torch

SLOT_KEY = "crops_slot"
SHAPE_KEY = "crops_shape"
STORAGE_KEY = "crops_storage"

FREE, BUSY = 0, 1


def new_shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor allocated straight in shared memory (as torch's ``default_collate`` does in a worker)."""
    storage = torch.UntypedStorage._new_shared(max(1, math.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def _view(storage: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage.untyped_storage(), 0, shape)


class CropSlots:
    """The free/busy flags of every worker's slots, created by the main process for one epoch's workers."""

    def __init__(self, num_workers: int, slots_per_worker: int, context: Any = None):
        """``context``: the multiprocessing context the workers are started with (default: the default one)."""
        self.slots_per_worker = slots_per_worker
        ctx = context or multiprocessing.get_context()
        self.flags = ctx.Array("b", num_workers * slots_per_worker, lock=True)

    def try_acquire(self, worker: int) -> int | None:
        """A free slot of ``worker``, now marked busy, or None when all of them are in use."""
        base = worker * self.slots_per_worker
        with self.flags.get_lock():
            raw = self.flags.get_obj()
            for idx in range(base, base + self.slots_per_worker):
                if raw[idx] == FREE:
                    raw[idx] = BUSY
                    return idx
        return None

    def release(self, idx: int) -> None:
        with self.flags.get_lock():
            self.flags.get_obj()[idx] = FREE


class WorkerCropPool:
    """One worker's side: crops buffers for :func:`dipro.data.collate.collate_arrays` and the wire format."""

    def __init__(self, slots: CropSlots, worker: int):
        self.slots, self.worker = slots, worker
        self.storages: dict[int, torch.Tensor] = {}
        self._pending: tuple[int, bool, torch.Tensor] | None = None  # the last slot view handed out, not yet packed

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A uint8 buffer of ``shape``: a view of a free slot, or a fresh shared segment when none is free."""
        idx = self.slots.try_acquire(self.worker)
        if idx is None:
            return new_shared_uint8(shape)
        nbytes = math.prod(shape)
        storage = self.storages.get(idx)
        is_new = storage is None or storage.numel() < nbytes
        if is_new:
            storage = new_shared_uint8((max(nbytes, 1),))
            self.storages[idx] = storage
        out = _view(storage, shape)
        self._pending = (idx, is_new, out)
        return out

    def pack(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Replace ``batch["crops"]`` by its slot reference when it lives in a slot (the storage goes along once)."""
        if self._pending is None or self._pending[2] is not batch["crops"]:
            return batch
        idx, is_new, _ = self._pending
        self._pending = None
        crops = batch.pop("crops")
        batch[SLOT_KEY] = idx
        batch[SHAPE_KEY] = tuple(crops.shape)
        if is_new:
            batch[STORAGE_KEY] = self.storages[idx]
        return batch


class CropReceiver:
    """The main process's side: turns slot references back into crops it owns, then frees the slot."""

    def __init__(self, slots: CropSlots):
        self.slots = slots
        self.storages: dict[int, torch.Tensor] = {}

    def unpack(self, batch: dict[str, Any], pin_memory: bool) -> dict[str, Any]:
        if SLOT_KEY not in batch:
            return batch
        idx, shape = int(batch.pop(SLOT_KEY)), tuple(batch.pop(SHAPE_KEY))
        if STORAGE_KEY in batch:
            self.storages[idx] = batch.pop(STORAGE_KEY)
        view = _view(self.storages[idx], shape)
        batch["crops"] = view.pin_memory() if pin_memory else view.clone()
        self.slots.release(idx)
        return batch
