"""Region crops: one JPEG decode per CXR, ten boxes cut and resized to the crop size.

The one home of the crop code: the shard builder (:mod:`data_sharding.build_units`) calls
:func:`crop_regions` once per film and build.

The authors decode the full ~2,500 x 3,000 JPEG for every region of every
sample at every epoch, cut each box with ``PIL.Image.crop`` (integer pixels) and
resize it to 224 x 224 with NEAREST (github.com/Chenliu-svg/DiPro
``dataset_module/dipro_dataset.py: DiproDataset.get_cxr_regions``).  Here each image is
decoded once per shard build and, by default (``resample="bilinear"``), each box is
resampled with PIL's bilinear filter (antialiased when shrinking); when every present
box is at least ``2**k`` times the crop size the JPEG is decoded at ``1 / 2**k`` scale
(libjpeg DCT scaling via ``Image.draft``), which loses nothing the final crop could show.
``resample="nearest"`` (``dipro shard --crop-resample nearest``) reproduces the authors'
crops: full decode, box rounded to whole pixels, NEAREST.  ``resample="bilinear-fast"``
(``--crop-resample bilinear-fast``) is an approximation of the default, never the default:
the same decode, then PIL's ``reducing_gap`` (:data:`data_sharding.defaults.FAST_REDUCING_GAP`)
shrinks a large box by whole-pixel averaging before the bilinear filter (its error against
``bilinear`` is measured by ``benchmarks/shard.py`` and recorded in the README).
A grayscale JPEG decodes to mode ``L`` already and is used as decoded (no copy); other
modes are converted to ``L`` once.  Boxes are in full-image pixels
(``cxr.parquet``, clipped to the image by ``dipro prepare``); a null or invalid box yields
a zero crop with ``region_present = 0`` -- a missing region is marked, never faked.
"""
from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

from data_sharding.constants import NUM_REGIONS
from data_sharding.defaults import FAST_REDUCING_GAP
from data_sharding.defaults import RESAMPLE_MODES  # crop resampling modes (re-exported): ours, the authors', the fast one

# Largest JPEG DCT down-scaling libjpeg offers.
_DRAFT_REDUCTIONS = (8, 4, 2, 1)
# Smallest box side (pixels of the full image) that counts as a region.
MIN_BOX_SIDE = 1.0


@dataclass
class CropResult:
    """Crops of one CXR: ``crops`` uint8 [10, C, C], ``present`` uint8 [10]."""

    crops: np.ndarray
    present: np.ndarray
    counts: Counter = field(default_factory=Counter)
    """Reported anomalies: boxes_missing, boxes_invalid, images_unreadable, image_size_mismatch."""


def parse_box(value: object, width: int, height: int) -> tuple[float, float, float, float] | None:
    """[x1, y1, x2, y2] clipped to the image, or None when it is not a usable box.

    ``value`` None is a missing box; anything that is not four finite numbers
    with x2 > x1 and y2 > y1 (at least ``MIN_BOX_SIDE`` after clipping) is invalid.
    """
    if value is None:
        return None
    try:
        coords = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(coords) != 4 or not all(math.isfinite(c) for c in coords):
        return None
    x1, y1, x2, y2 = coords
    x1, x2 = max(0.0, x1), min(float(width), x2)
    y1, y2 = max(0.0, y1), min(float(height), y2)
    if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
        return None
    return (x1, y1, x2, y2)


def draft_reduction(boxes: Sequence[tuple[float, float, float, float] | None], crop_size: int) -> int:
    """Largest JPEG reduction (1, 2, 4, 8) keeping every present box >= crop_size pixels per side."""
    sides = [min(b[2] - b[0], b[3] - b[1]) for b in boxes if b is not None]
    if not sides:
        return 1
    smallest = min(sides)
    for r in _DRAFT_REDUCTIONS:
        if smallest / r >= crop_size:
            return r
    return 1


def empty_crops(crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero crops and an all-missing presence vector for one CXR."""
    return (np.zeros((NUM_REGIONS, crop_size, crop_size), dtype=np.uint8),
            np.zeros(NUM_REGIONS, dtype=np.uint8))


def crop_regions(
    data: bytes | None,
    boxes: Sequence[object],
    crop_size: int,
    *,
    recorded_size: tuple[int, int] | None = None,
    resample: str = "bilinear",
) -> CropResult:
    """Decode one image (its file bytes; None = file missing) and crop its 10 region boxes.

    ``boxes`` are the 10 ``box_<region>`` values of the CXR's row in region
    order; ``resample`` is one of :data:`RESAMPLE_MODES` (module docstring).  ``recorded_size`` is (width, height) from ``cxr.parquet``; a
    different actual size is counted (boxes are used in the actual image's
    pixels, clipped to it).  Undecodable images give all regions missing and
    are counted, so one bad file out of thousands does not stop a build.
    """
    if len(boxes) != NUM_REGIONS:
        raise ValueError(f"expected {NUM_REGIONS} boxes, got {len(boxes)}")
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample {resample!r}: expected one of {', '.join(RESAMPLE_MODES)}")
    crops, present = empty_crops(crop_size)
    counts: Counter = Counter()
    if data is None:
        counts["images_unreadable"] += 1
        return CropResult(crops, present, counts)
    try:
        img = Image.open(io.BytesIO(data))
        full_w, full_h = img.size
        if recorded_size is not None and tuple(recorded_size) != (full_w, full_h):
            counts["image_size_mismatch"] += 1
        parsed = []
        for value in boxes:
            box = parse_box(value, full_w, full_h)
            if box is None:
                counts["boxes_missing" if value is None else "boxes_invalid"] += 1
            parsed.append(box)
        if all(b is None for b in parsed):
            return CropResult(crops, present, counts)
        if img.format == "JPEG" and resample != "nearest":
            r = draft_reduction(parsed, crop_size)
            img.draft("L", (math.ceil(full_w / r), math.ceil(full_h / r)))
        if img.mode != "L":
            img = img.convert("L")
        else:
            img.load()  # decode now: a damaged file is counted here, not half-way through the boxes
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        counts["images_unreadable"] += 1
        return CropResult(crops, present, counts)
    sx, sy = img.width / full_w, img.height / full_h
    for i, box in enumerate(parsed):
        if box is None:
            continue
        x1, y1, x2, y2 = box
        if resample == "nearest":  # the authors' crop(box) then Resize(NEAREST), in full-image pixels
            region = img.crop(tuple(int(round(v)) for v in box)).resize((crop_size, crop_size),
                                                                         Image.Resampling.NEAREST)
        else:
            region = img.resize((crop_size, crop_size), Image.Resampling.BILINEAR,
                                box=(x1 * sx, y1 * sy, x2 * sx, y2 * sy),
                                reducing_gap=FAST_REDUCING_GAP if resample == "bilinear-fast" else None)
        crops[i] = np.asarray(region, dtype=np.uint8)
        present[i] = 1
    return CropResult(crops, present, counts)
