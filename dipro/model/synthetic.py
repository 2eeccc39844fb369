"""In-memory batches in the loader's format (docs/ARCHITECTURE.md §3), for tests and benchmarks.

``random_batch`` pads variable-length samples exactly as the loader does: CXRs first
then padding (``cxr_mask``), EHR steps with ``ehr_mask`` (one all-False step when a
sample has no EHR), region labels 3 on padded pairs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_DISEASES, NUM_EHR_VARIABLES, NUM_LOS_BINS, NUM_REGIONS


def _as_list(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def random_batch(
    task: str,
    batch_size: int = 2,
    num_cxrs: int | Sequence[int] = 2,
    ehr_steps: int | Sequence[int] = 49,
    crop_size: int = 32,
    seed: int = 0,
    missing_region_prob: float = 0.1,
    pad_cxrs_to: int | None = None,
    pad_ehr_to: int | None = None,
) -> dict:
    """A random batch; ``num_cxrs`` / ``ehr_steps`` per sample (int = same for all)."""
    g = torch.Generator().manual_seed(seed)
    ts, ls = _as_list(num_cxrs, batch_size), _as_list(ehr_steps, batch_size)
    t_max = max(max(ts), pad_cxrs_to or 0)
    l_max = max(max(ls), pad_ehr_to or 0, 1)
    r, b = NUM_REGIONS, batch_size
    batch: dict = {
        "crops": torch.zeros(b, t_max, r, crop_size, crop_size, dtype=torch.uint8),
        "region_mask": torch.zeros(b, t_max, r, dtype=torch.bool),
        "cxr_mask": torch.zeros(b, t_max, dtype=torch.bool),
        "cxr_hours": torch.zeros(b, t_max),
        "ehr_values": torch.zeros(b, l_max, NUM_EHR_VARIABLES),
        "ehr_obs_mask": torch.zeros(b, l_max, NUM_EHR_VARIABLES),
        "ehr_hours": torch.zeros(b, l_max),
        "ehr_mask": torch.zeros(b, l_max, dtype=torch.bool),
        "demographics": torch.randn(b, NUM_DEMOGRAPHICS, generator=g),
        "region_labels": torch.full((b, max(t_max - 1, 1), r, NUM_DISEASES), 3, dtype=torch.long),
        "stay_id": torch.arange(b, dtype=torch.long),
        "subject_id": torch.arange(b, dtype=torch.long) + 1000,
        "sample_key": [f"s{i}_0" for i in range(b)],
    }
    for i, (t, steps) in enumerate(zip(ts, ls)):
        batch["crops"][i, :t] = torch.randint(0, 256, (t, r, crop_size, crop_size), generator=g, dtype=torch.uint8)
        present = torch.rand(t, r, generator=g) >= missing_region_prob
        batch["region_mask"][i, :t] = present
        batch["crops"][i, :t][~present] = 0
        batch["cxr_mask"][i, :t] = True
        gaps = 8.0 + 16.0 * torch.rand(t, generator=g)
        hours = torch.cumsum(gaps, 0) - gaps[0] + 2.0 * torch.rand(1, generator=g)
        batch["cxr_hours"][i, :t] = hours
        start = float(torch.floor(hours[0]))
        batch["ehr_values"][i, :steps] = torch.randn(steps, NUM_EHR_VARIABLES, generator=g)
        batch["ehr_obs_mask"][i, :steps] = (torch.rand(steps, NUM_EHR_VARIABLES, generator=g) < 0.3).float()
        batch["ehr_hours"][i, :steps] = start + torch.arange(steps, dtype=torch.float32)
        batch["ehr_mask"][i, :steps] = True
        batch["region_labels"][i, : t - 1] = torch.randint(0, 4, (t - 1, r, NUM_DISEASES), generator=g)
    if task == "disease_progression":
        batch["progression"] = torch.randint(0, 4, (b, NUM_DISEASES), generator=g)
    elif task in ("mortality", "length_of_stay"):
        batch["mortality"] = torch.randint(0, 2, (b,), generator=g).float()
        batch["los_bin"] = torch.randint(0, NUM_LOS_BINS, (b,), generator=g)
        batch["los_days"] = 2.0 + 9.0 * torch.rand(b, generator=g)
    else:
        raise ValueError(f"unknown task {task!r}")
    return batch


def uniform_label_stats() -> dict:
    """A label_stats.json-shaped dict with unequal counts (for tests and benchmarks)."""
    counts = [[30, 10, 50, 200]] * NUM_DISEASES
    return {
        "disease_progression": {"task": counts, "region": counts},
        "mortality_los": {"mortality": [80, 20], "los_bin": [25, 25, 25, 25], "region": counts},
    }


# Padding value per key when samples are stacked along the batch axis (axis 1 = T or L).
_PAD_VALUES = {"region_labels": 3}
_PADDED_AXIS1 = ("crops", "region_mask", "cxr_mask", "cxr_hours", "ehr_values", "ehr_obs_mask", "ehr_hours", "ehr_mask",
                 "region_labels")


def concat_batches(batches: Sequence[dict]) -> dict:
    """Concatenate batches along B, padding T / L (axis 1) as the loader does."""
    out: dict = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if isinstance(values[0], list):
            out[key] = [x for v in values for x in v]
            continue
        if key in _PADDED_AXIS1:
            n = max(v.shape[1] for v in values)
            fill = _PAD_VALUES.get(key, 0)
            values = [
                torch.cat([v, torch.full((v.shape[0], n - v.shape[1], *v.shape[2:]), fill, dtype=v.dtype)], dim=1)
                for v in values
            ]
        out[key] = torch.cat(values, dim=0)
    return out
