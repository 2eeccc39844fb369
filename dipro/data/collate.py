"""Decoded samples -> one padded batch of tensors (ARCHITECTURE.md section 3).

T = most CXRs in the batch, L = most EHR steps in the batch (at least 1: a
sample without EHR gets one all-False step).  Padding is zero except for
``region_labels``, padded with 3 ("not mentioned", masked out of every loss).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from data_sharding.constants import NOT_MENTIONED, NUM_DEMOGRAPHICS, NUM_DISEASES, NUM_EHR_VARIABLES, NUM_REGIONS
from dipro.data.augment import AUGMENT_KEYS


def collate_arrays(samples: list[dict[str, Any]], task_dir: str, num_corrupt: int = 0,
                   alloc: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> dict[str, Any]:
    """The batch as it leaves a loader worker: ``crops`` a uint8 tensor from ``alloc(shape)``
    (in a worker: shared memory, see :mod:`dipro.data.transport`), every other array numpy.

    Every tensor a worker sends costs a shared-memory segment and a file descriptor,
    about half a millisecond each on a VM, so the small arrays travel pickled
    inline and :func:`to_tensors` turns them into tensors in the main process
    without copying.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    bsz = len(samples)
    t_max = max(s["crops"].shape[0] for s in samples)
    l_max = max(1, max(s["ehr_values"].shape[0] for s in samples))
    crop = samples[0]["crops"].shape[-1]
    for s in samples:
        if s["crops"].shape[-1] != crop:
            raise ValueError(f"sample {s['sample_key']} (shard {s['shard']}) has {s['crops'].shape[-1]} px crops, "
                             f"the batch has {crop} px")

    shape = (bsz, t_max, NUM_REGIONS, crop, crop)
    crops_t = alloc(shape) if alloc is not None else torch.empty(shape, dtype=torch.uint8)
    crops = crops_t.numpy()
    region_mask = np.zeros((bsz, t_max, NUM_REGIONS), dtype=bool)
    cxr_mask = np.zeros((bsz, t_max), dtype=bool)
    cxr_hours = np.zeros((bsz, t_max), dtype=np.float32)
    ehr_values = np.zeros((bsz, l_max, NUM_EHR_VARIABLES), dtype=np.float32)
    ehr_obs = np.zeros((bsz, l_max, NUM_EHR_VARIABLES), dtype=np.float32)
    ehr_hours = np.zeros((bsz, l_max), dtype=np.float32)
    ehr_mask = np.zeros((bsz, l_max), dtype=bool)
    demographics = np.zeros((bsz, NUM_DEMOGRAPHICS), dtype=np.float32)
    region_labels = np.full((bsz, max(t_max - 1, 0), NUM_REGIONS, NUM_DISEASES), NOT_MENTIONED, dtype=np.int64)

    for i, s in enumerate(samples):
        t = s["crops"].shape[0]
        n = s["ehr_values"].shape[0]
        crops[i, :t] = s["crops"]
        crops[i, t:] = 0  # the buffer is not zeroed: padding written explicitly
        region_mask[i, :t] = s["region_present"] != 0
        cxr_mask[i, :t] = True
        cxr_hours[i, :t] = s["cxr_hours"]
        ehr_values[i, :n] = s["ehr_values"]
        ehr_obs[i, :n] = s["ehr_masks"]
        ehr_hours[i, :n] = s["ehr_hours"]
        ehr_mask[i, :n] = True
        demographics[i] = s["demographics"]
        region_labels[i, : t - 1] = s["region_labels"]

    batch: dict[str, Any] = {
        "crops": crops_t, "region_mask": region_mask, "cxr_mask": cxr_mask, "cxr_hours": cxr_hours,
        "ehr_values": ehr_values, "ehr_obs_mask": ehr_obs, "ehr_hours": ehr_hours, "ehr_mask": ehr_mask,
        "demographics": demographics, "region_labels": region_labels,
    }
    if task_dir == "disease_progression":
        batch["progression"] = np.stack([s["progression"] for s in samples]).astype(np.int64)
    else:
        batch["mortality"] = np.array([s["mortality"] for s in samples], dtype=np.float32)
        batch["los_bin"] = np.array([s["los_bin"] for s in samples], dtype=np.int64)
        batch["los_days"] = np.array([s["los_days"] for s in samples], dtype=np.float32)
    aug = [AUGMENT_KEYS[0] in s for s in samples]
    if any(aug):
        if not all(aug):
            raise ValueError("collate: some samples carry augmentation parameters and some do not")
        for name in AUGMENT_KEYS:
            batch[name] = np.stack([s[name] for s in samples])
    batch["stay_id"] = np.array([s["stay_id"] for s in samples], dtype=np.int64)
    batch["subject_id"] = np.array([s["subject_id"] for s in samples], dtype=np.int64)
    batch["sample_key"] = [s["sample_key"] for s in samples]
    batch["num_corrupt"] = int(num_corrupt)
    return batch


def to_tensors(batch: dict[str, Any], pin_memory: bool = False) -> dict[str, Any]:
    """numpy arrays of a :func:`collate_arrays` batch -> tensors sharing their memory (all pinned if asked)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if pin_memory and isinstance(v, torch.Tensor) and not v.is_pinned():
            v = v.pin_memory()
        out[k] = v
    return out


def collate(samples: list[dict[str, Any]], task_dir: str, num_corrupt: int = 0) -> dict[str, Any]:
    """Pad and stack ``samples`` (outputs of :func:`dipro.data.decode.decode_sample`) into a batch of tensors.

    ``num_corrupt`` (samples skipped since the previous batch of this stream)
    travels with the batch so the main process can count corrupt samples
    across loader workers.
    """
    return to_tensors(collate_arrays(samples, task_dir, num_corrupt))


def move_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of ``batch`` to ``device`` (non-blocking: the loader pins memory on GPU)."""
    device = torch.device(device)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
