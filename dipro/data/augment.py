"""Training-only augmentation of region crops: drawn in the loader, applied on the device.

For each sample and each of the 10 regions one random transform is drawn --
an intensity/contrast jitter ``y = (x - 127.5) * a + 127.5 + b`` (grey levels,
clipped to [0, 255]) and a small translation ``(dy, dx)`` with edge
replication -- and the *same* transform is applied to that region's crop in
every CXR of the sample.  Progression is the difference between a region's
crops over time, so jitter that differed between the CXRs would look like
disease change.  Missing regions are never encoded, so they stay missing.

Why split it: a mortality sample carries up to 14 CXRs x 10 regions of
224 x 224 pixels (7 M pixels).  Touching every pixel on the loader's CPU costs
about as much as reading and decoding the sample itself (see
``benchmarks/loader.py``), whereas on the accelerator it is two gathers and a
fused multiply-add over a tensor the region encoder builds anyway.  So the
loader only draws the parameters (:func:`draw_augmentation`, seeded per
stream, so an epoch is reproducible) and ships them in the batch
(``aug_contrast``, ``aug_brightness``, ``aug_shift``); the region encoder
applies them (:func:`apply_augmentation`) to the real crops while converting
them to float, in training mode only.  Evaluation never augments:
``build_loader`` refuses ``augment`` outside ``train`` and the model ignores
the parameters in eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

AUGMENT_KEYS = ("aug_contrast", "aug_brightness", "aug_shift")
"""Per-sample batch keys: float32 [R], float32 [R], int64 [R, 2] (batched: [B, R], [B, R], [B, R, 2])."""


@dataclass(frozen=True)
class AugmentConfig:
    contrast: float = 0.1
    """Contrast factor ``a`` drawn from ``[1 - contrast, 1 + contrast]``."""
    brightness: float = 10.0
    """Intensity shift ``b`` drawn from ``[-brightness, brightness]`` grey levels."""
    max_shift: float = 0.04
    """Largest translation as a fraction of the crop side."""


def draw_augmentation(num_regions: int, crop_size: int, rng: np.random.Generator,
                      cfg: AugmentConfig = AugmentConfig()) -> dict[str, np.ndarray]:
    """One sample's transform parameters, one per region (shared by all of the sample's CXRs)."""
    max_px = int(round(cfg.max_shift * crop_size))
    return {
        "aug_contrast": rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast, size=num_regions).astype(np.float32),
        "aug_brightness": rng.uniform(-cfg.brightness, cfg.brightness, size=num_regions).astype(np.float32),
        "aug_shift": rng.integers(-max_px, max_px + 1, size=(num_regions, 2)).astype(np.int64),
    }


def apply_augmentation(x: torch.Tensor, contrast: torch.Tensor, brightness: torch.Tensor,
                       shift: torch.Tensor) -> torch.Tensor:
    """Jitter and translate crops ``x`` float [N, C, C] scaled to [0, 1]; parameters [N], [N], [N, 2] (dy, dx).

    Intensity: ``y = clip((255 x - 127.5) a + 127.5 + b, 0, 255) / 255``.  Translation: the content
    moves by ``(dy, dx)`` pixels; the uncovered border repeats the edge row/column.
    """
    n, h, w = x.shape
    a = contrast.to(x.dtype).view(n, 1, 1)
    b = brightness.to(x.dtype).view(n, 1, 1) / 255.0
    y = ((x - 0.5) * a + 0.5 + b).clamp_(0.0, 1.0)
    shift = shift.to(device=x.device, dtype=torch.long)  # no early exit on all-zero shifts: that would sync the GPU
    rows = (torch.arange(h, device=x.device)[None, :] - shift[:, :1]).clamp_(0, h - 1)  # [N, C]: source row of each output row
    cols = (torch.arange(w, device=x.device)[None, :] - shift[:, 1:]).clamp_(0, w - 1)
    y = y.gather(1, rows[:, :, None].expand(n, h, w))
    return y.gather(2, cols[:, None, :].expand(n, h, w))
