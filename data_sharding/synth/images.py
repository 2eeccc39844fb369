"""Chest-like grayscale films whose pixels render the latent disease severities.

A frontal film is drawn from the patient's :class:`~data_sharding.synth.anatomy.Anatomy`
(jittered per film) and the film's per-locus severities:

* body: soft-tissue ellipse, brighter below the diaphragm; two dark lung fields
  (super-ellipses with sharp costophrenic corners) with rib stripes; a bright
  mediastinal band and heart.
* disease patterns, additive and each scaled by its locus severity (0 = absent):
  lung opacity = uniform haze over the zone; consolidation = a dense blob whose
  radius and density grow; pneumonia = patchy texture whose covered area grows;
  atelectasis = horizontal plate-like bands in the lower zone; pulmonary edema =
  perihilar haze widening from the hilum; pleural effusion = fluid filling the
  base from the costophrenic angle with a lateral meniscus; enlarged cardiac
  silhouette = heart and mediastinal band widen.
* acquisition: exposure gain (+-3 %) / offset (+-3 gray) and Gaussian noise (sd 4) per film.

The patterns of a stay (blob centres, band heights, patch texture) are fixed per
stay, so between two films only the severity (and positioning/noise) changes.
Everything is vectorised numpy on the bounding slice of each structure.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_sharding.constants import REGIONS
from data_sharding.synth.anatomy import LOCI, NUM_LOCI, SIDES, Anatomy

TEXTURE_GRID = 6
BOX_NOISE = 0.004  # annotation noise of region boxes (fraction of the side)


@dataclass(frozen=True)
class StayPatterns:
    """Per-stay shape of every locus' pattern (severity only scales them)."""

    blob: np.ndarray  # float [NUM_LOCI, 2]: blob centre (a, b) relative to the zone box
    lines: np.ndarray  # float [NUM_LOCI, 2]: band heights relative to the zone box
    texture: np.ndarray  # float [NUM_LOCI, G, G]: patch field in [0, 1]

    @staticmethod
    def sample(rng: np.random.Generator) -> "StayPatterns":
        return StayPatterns(
            blob=rng.uniform(0.3, 0.7, size=(NUM_LOCI, 2)),
            lines=np.sort(rng.uniform(0.25, 0.8, size=(NUM_LOCI, 2)), axis=1),
            texture=rng.uniform(0.0, 1.0, size=(NUM_LOCI, TEXTURE_GRID, TEXTURE_GRID)),
        )


def _bilinear(grid: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sample a [G, G] grid at relative coordinates a (columns) and b (rows) in [0, 1]."""
    g = grid.shape[0] - 1
    x = np.clip(a, 0.0, 1.0) * g
    y = np.clip(b, 0.0, 1.0) * g
    x0 = np.minimum(np.floor(x).astype(np.int64), g - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), g - 1)
    fx, fy = x - x0, y - y0
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bot = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """1 inside (d < 0), 0 outside, linear ramp of ``width`` across the border."""
    return np.clip(0.5 - d / width, 0.0, 1.0).astype(np.float32)


class _Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.u = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
        self.v = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
        self.img = np.full((height, width), 12.0, dtype=np.float32)
        self.edge = 1.5 / min(width, height)  # anti-aliasing ramp (normalised units)

    def window(self, u1: float, v1: float, u2: float, v2: float):
        c0 = max(int(np.floor(u1 * self.w)), 0)
        c1 = min(int(np.ceil(u2 * self.w)), self.w)
        r0 = max(int(np.floor(v1 * self.h)), 0)
        r1 = min(int(np.ceil(v2 * self.h)), self.h)
        return (slice(r0, r1), slice(c0, c1)), self.u[:, c0:c1], self.v[r0:r1, :]


def _draw_lung(cv: _Canvas, a: Anatomy, side: str, sev: np.ndarray, pat: StayPatterns) -> None:
    x1, y1, x2, y2 = a.lung_box(side)
    w, h = x2 - x1, y2 - y1
    sl, u, v = cv.window(x1 - 0.02, y1 - 0.02, x2 + 0.02, y2 + 0.03)
    cu, cvv = (x1 + x2) / 2, (y1 + y2) / 2
    x = (u - cu) / a.lung_hw
    y = (v - cvv) / (h / 2)
    p = np.where(y < 0, 2.4, 4.0).astype(np.float32)
    d = (np.abs(x) ** p + np.abs(y) ** p) ** (1.0 / p) - 1.0
    lung = _soft(d * min(a.lung_hw, h / 2), cv.edge)
    medial = (u - cu) * (1 if side == "right" else -1) / a.lung_hw  # +1 at the medial edge
    base = 38.0 + 12.0 * np.clip(medial, 0, 1) + 9.0 * np.cos(2 * np.pi * a.rib_freq * v + a.rib_phase + 2.5 * x * x)

    lz = a.lower_zone_top()
    lower = _soft((lz - v) * np.ones_like(u), cv.edge)  # 1 below the lower-zone line
    upper = 1.0 - lower
    zone_boxes = {"upper": (x1, y1, x2, lz), "lower": (x1, lz, x2, y2)}
    hb = a.hilar_box(side)
    patho = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)
    for locus in LOCI:
        if locus.side != side:
            continue
        s = float(sev[locus.index])
        if s <= 0.0:
            continue
        i = locus.index
        if locus.disease == "lung opacity":
            patho += 42.0 * s * (upper if locus.place == "upper" else lower)
        elif locus.disease == "consolidation":
            zb = zone_boxes[locus.place]
            bu = zb[0] + pat.blob[i, 0] * (zb[2] - zb[0])
            bv = zb[1] + pat.blob[i, 1] * (zb[3] - zb[1])
            rho = (0.18 + 0.22 * s) * w
            dd = np.sqrt(((u - bu) / rho) ** 2 + ((v - bv) * (cv.h / cv.w) / rho) ** 2)
            patho += 90.0 * s * np.clip(1.0 - dd * dd, 0.0, 1.0)
        elif locus.disease == "pneumonia":
            zb = zone_boxes[locus.place]
            field = _bilinear(pat.texture[i], (u - zb[0]) / (zb[2] - zb[0]), (v - zb[1]) / (zb[3] - zb[1]))
            patch = np.clip((field - (1.0 - 0.8 * s)) / 0.15, 0.0, 1.0)
            zmask = upper if locus.place == "upper" else lower
            patho += 70.0 * s * patch * zmask
        elif locus.disease == "atelectasis":
            band = np.zeros_like(patho)
            thick = (0.008 + 0.012 * s) * h
            for rel in pat.lines[i]:
                vl = lz + rel * (y2 - lz)
                band = band + np.exp(-(((v - vl) / thick) ** 2)) * (np.abs(x) < 0.85)
            patho += (65.0 * s * band + 8.0 * s) * lower
        elif locus.disease == "pulmonary edema":
            hu, hv = (hb[0] + hb[2]) / 2, (hb[1] + hb[3]) / 2
            su = 0.5 * (hb[2] - hb[0]) * (0.7 + 0.6 * s)
            sv = 0.6 * (hb[3] - hb[1]) * (0.7 + 0.6 * s)
            patho += 60.0 * s * np.exp(-0.5 * (((u - hu) / su) ** 2 + ((v - hv) / sv) ** 2))
    region = cv.img[sl]
    region[...] = region * (1.0 - lung) + (base + patho) * lung

    # pleural effusion: fluid fills the base, higher laterally (meniscus)
    eff = [l for l in LOCI if l.side == side and l.disease == "pleural effusion"]
    s = float(sev[eff[0].index]) if eff else 0.0
    if s > 0.0:
        lateral = np.clip((u - cu) * (-1 if side == "right" else 1) / a.lung_hw, -1.0, 1.0)  # +1 lateral
        fill = s * 0.32 * h * (0.6 + 0.4 * (lateral + 1.0))
        level = y2 + 0.015 - fill
        inside_x = _soft((np.abs(u - cu) - a.lung_hw * 1.02) * np.ones_like(v), cv.edge)
        fluid = _soft(level - v, cv.edge) * inside_x * _soft(v - (y2 + 0.025), cv.edge)
        region[...] = region + (150.0 - region) * 0.85 * fluid


def render_frontal(
    anatomy: Anatomy,
    severity: np.ndarray,
    patterns: StayPatterns,
    width: int,
    height: int,
    rng: np.random.Generator,
    anatomy_type: tuple[int, int] | None = None,
) -> tuple[np.ndarray, dict[str, tuple[int, int, int, int]]]:
    """Draw one frontal film; return (uint8 [H, W] image, region -> pixel box x1, y1, x2, y2).

    ``anatomy`` should already be jittered for this film; ``severity`` is
    float [NUM_LOCI] in [0, 1]; ``anatomy_type`` = (type, number of types) draws the subject's
    planted type (:mod:`.anatomy_types`) over the body; None (the default) draws nothing.
    """
    a = anatomy
    cv = _Canvas(width, height)
    ecs = float(severity[LOCI[-1].index])

    # soft tissue of the thorax, brighter medially and below the diaphragm
    body_sl, body_u, body_v = sl, u, v = cv.window(a.cx - a.thorax_hw - 0.01, 0.0, a.cx + a.thorax_hw + 0.01, 1.0)
    d = np.sqrt(((u - a.cx) / a.thorax_hw) ** 2 + ((v - 0.56) / 0.56) ** 2) - 1.0
    body = _soft(d * a.thorax_hw, cv.edge)
    tissue = 92.0 + 28.0 * (1.0 - np.abs(u - a.cx) / a.thorax_hw) + 35.0 * _soft((a.lung_bottom - v) * np.ones_like(u), 0.03)
    cv.img[sl] = cv.img[sl] * (1.0 - body) + tissue * body

    for side in SIDES:
        _draw_lung(cv, a, side, severity, patterns)

    # mediastinal band (widens with the cardiac severity)
    mhw = a.med_halfwidth(ecs)
    sl, u, v = cv.window(a.cx - mhw - 0.01, a.lung_top - 0.06, a.cx + mhw + 0.01, a.heart_v + 0.01)
    band = _soft((np.abs(u - a.cx) - mhw) * np.ones_like(v), cv.edge) * _soft((a.lung_top - 0.05 - v) * np.ones_like(u), cv.edge)
    cv.img[sl] = cv.img[sl] * (1.0 - band) + 168.0 * band

    # heart (half width grows with the cardiac severity)
    x1, y1, x2, y2 = a.heart_box(ecs)
    hu, hv, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    sl, u, v = cv.window(x1 - 0.01, y1 - 0.01, x2 + 0.01, y2 + 0.01)
    d = np.sqrt(((u - hu) / hw) ** 2 + ((v - hv) / hh) ** 2) - 1.0
    heart = _soft(d * min(hw, hh), cv.edge)
    cv.img[sl] = cv.img[sl] * (1.0 - heart) + 182.0 * heart

    if anatomy_type is not None:  # over everything the body holds, before the exposure and noise
        from data_sharding.synth.anatomy_types import type_pattern

        grating = type_pattern(body_u, body_v, width / height, a.cx, a.lung_top, a.thorax_hw, *anatomy_type)
        cv.img[body_sl] = cv.img[body_sl] + grating * body  # the body mask of the soft tissue above

    gain = rng.uniform(0.97, 1.03)
    offset = rng.uniform(-3.0, 3.0)
    img = cv.img * gain + offset + 4.0 * rng.standard_normal(size=cv.img.shape, dtype=np.float32)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    boxes: dict[str, tuple[int, int, int, int]] = {}
    for name, (bx1, by1, bx2, by2) in a.region_boxes(ecs).items():
        n = rng.normal(0.0, BOX_NOISE, size=4)
        px1 = int(np.clip(round((bx1 + n[0]) * width), 0, width - 2))
        py1 = int(np.clip(round((by1 + n[1]) * height), 0, height - 2))
        px2 = int(np.clip(round((bx2 + n[2]) * width), px1 + 1, width - 1))
        py2 = int(np.clip(round((by2 + n[3]) * height), py1 + 1, height - 1))
        boxes[name] = (px1, py1, px2, py2)
    assert tuple(boxes) == REGIONS
    return out, boxes


def render_lateral(anatomy: Anatomy, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A lateral film (not used by the cohort): body profile, spine and heart shadow."""
    cv = _Canvas(width, height)
    u, v = cv.u, cv.v
    body = _soft((np.sqrt(((u - 0.5) / 0.36) ** 2 + ((v - 0.55) / 0.55) ** 2) - 1.0) * 0.36, cv.edge)
    lungs = _soft((np.sqrt(((u - 0.5) / 0.26) ** 2 + ((v - 0.45) / 0.3) ** 2) - 1.0) * 0.26, cv.edge)
    spine = _soft((np.abs(u - 0.78) - 0.05) * np.ones_like(v), cv.edge) * body
    heart = _soft((np.sqrt(((u - 0.38) / 0.14) ** 2 + ((v - 0.6) / 0.12) ** 2) - 1.0) * 0.12, cv.edge)
    img = cv.img * (1 - body) + 110.0 * body
    img = img * (1 - lungs) + 55.0 * lungs
    img = img * (1 - spine) + 175.0 * spine
    img = img * (1 - heart) + 150.0 * heart
    img = img + rng.normal(0.0, 4.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
