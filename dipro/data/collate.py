"""Decoded samples -> one padded batch of tensors (ARCHITECTURE.md section 3).

T = most CXRs in the batch, L = most EHR steps in the batch (at least 1: a
sample without EHR gets one all-False step).  Padding is zero except for
``region_labels``, padded with 3 ("not mentioned", masked out of every loss).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from data_sharding.constants import NOT_MENTIONED, NUM_DEMOGRAPHICS, NUM_DISEASES, NUM_EHR_VARIABLES, NUM_REGIONS


def collate(samples: list[dict[str, Any]], task_dir: str, num_corrupt: int = 0) -> dict[str, Any]:
    """Pad and stack ``samples`` (outputs of :func:`dipro.data.decode.decode_sample`).

    ``num_corrupt`` (samples skipped since the previous batch of this stream)
    travels with the batch so the main process can count corrupt samples
    across loader workers.
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

    crops = np.zeros((bsz, t_max, NUM_REGIONS, crop, crop), dtype=np.uint8)
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
        "crops": torch.from_numpy(crops),
        "region_mask": torch.from_numpy(region_mask),
        "cxr_mask": torch.from_numpy(cxr_mask),
        "cxr_hours": torch.from_numpy(cxr_hours),
        "ehr_values": torch.from_numpy(ehr_values),
        "ehr_obs_mask": torch.from_numpy(ehr_obs),
        "ehr_hours": torch.from_numpy(ehr_hours),
        "ehr_mask": torch.from_numpy(ehr_mask),
        "demographics": torch.from_numpy(demographics),
        "region_labels": torch.from_numpy(region_labels),
    }
    if task_dir == "disease_progression":
        batch["progression"] = torch.from_numpy(np.stack([s["progression"] for s in samples]).astype(np.int64))
    else:
        batch["mortality"] = torch.tensor([s["mortality"] for s in samples], dtype=torch.float32)
        batch["los_bin"] = torch.tensor([s["los_bin"] for s in samples], dtype=torch.int64)
        batch["los_days"] = torch.tensor([s["los_days"] for s in samples], dtype=torch.float32)
    batch["stay_id"] = torch.tensor([s["stay_id"] for s in samples], dtype=torch.int64)
    batch["subject_id"] = torch.tensor([s["subject_id"] for s in samples], dtype=torch.int64)
    batch["sample_key"] = [s["sample_key"] for s in samples]
    batch["num_corrupt"] = int(num_corrupt)
    return batch


def move_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of ``batch`` to ``device`` (non-blocking: the loader pins memory on GPU)."""
    device = torch.device(device)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
