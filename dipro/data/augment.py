"""Training-only augmentation of region crops.

For each sample and each of the 10 regions one random transform is drawn --
an intensity/contrast jitter ``y = (x - 127.5) * a + 127.5 + b`` and a small
translation ``(dy, dx)`` with edge padding -- and the *same* transform is
applied to that region's crop in every CXR of the sample.  Progression is the
difference between a region's crops over time, so jitter that differed between
the CXRs would look like disease change.  Missing regions stay all-zero.
Evaluation never augments (``build_loader`` turns it off outside ``train``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    contrast: float = 0.1
    """Contrast factor ``a`` drawn from ``[1 - contrast, 1 + contrast]``."""
    brightness: float = 10.0
    """Intensity shift ``b`` drawn from ``[-brightness, brightness]`` grey levels."""
    max_shift: float = 0.04
    """Largest translation as a fraction of the crop side."""


def _lut(a: float, b: float) -> np.ndarray:
    x = np.arange(256, dtype=np.float32)
    return np.clip(np.rint((x - 127.5) * a + 127.5 + b), 0, 255).astype(np.uint8)


def _shift(block: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate ``block`` [T, C, C] by (dy, dx) pixels, filling with the edge values."""
    if dy == 0 and dx == 0:
        return block
    c_h, c_w = block.shape[1:]
    py, px = abs(dy), abs(dx)
    padded = np.pad(block, ((0, 0), (py, py), (px, px)), mode="edge")
    y0, x0 = py - dy, px - dx
    return padded[:, y0:y0 + c_h, x0:x0 + c_w]


def augment_sample(sample: dict[str, Any], rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> dict[str, Any]:
    """Return a copy of ``sample`` whose crops are jittered region by region (same transform across CXRs)."""
    crops = sample["crops"]  # uint8 [T, R, C, C]
    present = sample["region_present"]  # uint8 [T, R]
    t, n_regions, c, _ = crops.shape
    max_px = int(round(cfg.max_shift * c))
    a = rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast, size=n_regions)
    b = rng.uniform(-cfg.brightness, cfg.brightness, size=n_regions)
    shifts = rng.integers(-max_px, max_px + 1, size=(n_regions, 2))
    out = np.empty_like(crops)
    for r in range(n_regions):
        block = np.take(_lut(float(a[r]), float(b[r])), crops[:, r])  # LUT: one pass over uint8 pixels
        out[:, r] = _shift(block, int(shifts[r, 0]), int(shifts[r, 1]))
    out[present == 0] = 0  # a missing region stays missing, not a jittered grey patch
    result = dict(sample)
    result["crops"] = out
    return result
