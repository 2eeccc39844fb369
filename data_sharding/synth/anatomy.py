"""Synthetic chest anatomy: where the organs, the ImaGenome regions and the disease loci are.

Coordinates here are *normalised*: ``u`` runs left to right across the image width
and ``v`` top to bottom down the image height, both in [0, 1].  Radiological
convention: the patient's right lung is on the image's left.

A *locus* is one place where one disease draws its pattern (e.g. "consolidation in
the left lower zone").  Every locus has a latent severity per image
(:mod:`data_sharding.synth.progression`); an ImaGenome region *contains* a locus when
the locus' pixels lie inside the region's box, and a region's comparison label for a
disease is derived from the loci it contains (see :data:`REGION_LOCI`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_sharding.constants import DISEASES, REGIONS

SIDES = ("right", "left")  # image left, image right

# (disease, place) pairs drawn on each lung; place is upper | lower | hilar | base.
_LUNG_LOCI: tuple[tuple[str, str], ...] = (
    ("atelectasis", "lower"),
    ("consolidation", "upper"),
    ("consolidation", "lower"),
    ("pulmonary edema", "hilar"),
    ("lung opacity", "upper"),
    ("lung opacity", "lower"),
    ("pleural effusion", "base"),
    ("pneumonia", "upper"),
    ("pneumonia", "lower"),
)


@dataclass(frozen=True)
class Locus:
    """One place where one disease draws its pattern."""

    index: int
    disease: str
    side: str  # "right" | "left" | "center"
    place: str  # upper | lower | hilar | base | heart


def _build_loci() -> tuple[Locus, ...]:
    out: list[Locus] = []
    for side in SIDES:
        for disease, place in _LUNG_LOCI:
            out.append(Locus(len(out), disease, side, place))
    out.append(Locus(len(out), "enlarged cardiac silhouette", "center", "heart"))
    return tuple(out)


LOCI: tuple[Locus, ...] = _build_loci()
NUM_LOCI = len(LOCI)
DISEASE_LOCI: dict[str, tuple[int, ...]] = {
    d: tuple(l.index for l in LOCI if l.disease == d) for d in DISEASES
}

# Which loci places each region's box contains (per side; "heart" is central).
_REGION_PLACES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "left lung": ("left", ("upper", "lower", "hilar", "base")),
    "right lung": ("right", ("upper", "lower", "hilar", "base")),
    "left lower lung zone": ("left", ("lower", "base")),
    "right lower lung zone": ("right", ("lower", "base")),
    "left hilar structures": ("left", ("hilar",)),
    "right hilar structures": ("right", ("hilar",)),
    "left costophrenic angle": ("left", ("base",)),
    "right costophrenic angle": ("right", ("base",)),
    "cardiac silhouette": ("center", ("heart",)),
    "mediastinum": ("center", ("heart",)),
}

# REGION_LOCI[r][d] = loci of disease d whose pixels lie in region r's box.
REGION_LOCI: tuple[tuple[tuple[int, ...], ...], ...] = tuple(
    tuple(
        tuple(
            l.index
            for l in LOCI
            if l.disease == d and l.side == _REGION_PLACES[r][0] and l.place in _REGION_PLACES[r][1]
        )
        for d in DISEASES
    )
    for r in REGIONS
)


@dataclass(frozen=True)
class Anatomy:
    """A patient's chest in normalised coordinates (stable across their images)."""

    cx: float  # body midline
    thorax_hw: float  # thorax half width
    lung_top: float
    lung_bottom: float
    lung_dx: float  # lung centre distance from the midline
    lung_hw: float  # lung half width
    heart_du: float  # heart centre offset towards the patient's left (image right)
    heart_v: float
    heart_hw: float  # heart half width at severity 0
    heart_hh: float
    med_hw: float  # mediastinal band half width at severity 0
    rib_freq: float
    rib_phase: float

    @staticmethod
    def sample(rng: np.random.Generator, child: bool = False) -> "Anatomy":
        scale = 0.9 if child else 1.0
        return Anatomy(
            cx=0.5 + rng.normal(0.0, 0.015),
            thorax_hw=rng.uniform(0.38, 0.44) * scale,
            lung_top=rng.uniform(0.12, 0.18),
            lung_bottom=rng.uniform(0.70, 0.77),
            lung_dx=rng.uniform(0.19, 0.22) * scale,
            lung_hw=rng.uniform(0.14, 0.17) * scale,
            heart_du=rng.uniform(0.03, 0.05),
            heart_v=rng.uniform(0.62, 0.66),
            heart_hw=rng.uniform(0.12, 0.14) * scale,
            heart_hh=rng.uniform(0.10, 0.12),
            med_hw=rng.uniform(0.040, 0.050),
            rib_freq=rng.uniform(9.0, 12.0),
            rib_phase=rng.uniform(0.0, 2 * np.pi),
        )

    def jittered(self, rng: np.random.Generator) -> "Anatomy":
        """The same chest on another film: shifted and scaled a little (positioning)."""
        du, dv = rng.normal(0.0, 0.012, size=2)
        s = 1.0 + rng.normal(0.0, 0.02)

        def sv(v: float) -> float:  # scale about the image centre, then shift
            return 0.5 + (v - 0.5) * s + dv

        return Anatomy(
            cx=0.5 + (self.cx - 0.5) * s + du,
            thorax_hw=self.thorax_hw * s,
            lung_top=sv(self.lung_top),
            lung_bottom=sv(self.lung_bottom),
            lung_dx=self.lung_dx * s,
            lung_hw=self.lung_hw * s,
            heart_du=self.heart_du * s,
            heart_v=sv(self.heart_v),
            heart_hw=self.heart_hw * s,
            heart_hh=self.heart_hh * s,
            med_hw=self.med_hw * s,
            rib_freq=self.rib_freq / s,
            rib_phase=self.rib_phase,
        )

    # --- derived geometry -------------------------------------------------
    def lung_center_u(self, side: str) -> float:
        return self.cx - self.lung_dx if side == "right" else self.cx + self.lung_dx

    def lung_box(self, side: str) -> tuple[float, float, float, float]:
        c = self.lung_center_u(side)
        return (c - self.lung_hw, self.lung_top, c + self.lung_hw, self.lung_bottom)

    def lower_zone_top(self) -> float:
        return self.lung_top + 0.62 * (self.lung_bottom - self.lung_top)

    def hilar_box(self, side: str) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.lung_box(side)
        w, h = x2 - x1, y2 - y1
        ya, yb = y1 + 0.33 * h, y1 + 0.58 * h
        if side == "right":  # medial edge is x2
            return (x2 - 0.48 * w, ya, x2 - 0.06 * w, yb)
        return (x1 + 0.06 * w, ya, x1 + 0.48 * w, yb)

    def cp_box(self, side: str) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.lung_box(side)
        w, h = x2 - x1, y2 - y1
        ya, yb = y2 - 0.20 * h, y2 + 0.02 * h
        if side == "right":  # lateral edge is x1
            return (x1 - 0.02 * w, ya, x1 + 0.40 * w, yb)
        return (x2 - 0.40 * w, ya, x2 + 0.02 * w, yb)

    def heart_halfwidth(self, ecs_severity: float) -> float:
        return self.heart_hw * (1.0 + 0.45 * ecs_severity)

    def med_halfwidth(self, ecs_severity: float) -> float:
        return self.med_hw * (1.0 + 0.5 * ecs_severity)

    def heart_box(self, ecs_severity: float) -> tuple[float, float, float, float]:
        hw = self.heart_halfwidth(ecs_severity)
        hu = self.cx + self.heart_du
        return (hu - hw, self.heart_v - self.heart_hh, hu + hw, self.heart_v + self.heart_hh)

    def mediastinum_box(self) -> tuple[float, float, float, float]:
        # fixed by anatomy (2x the resting band): a widening band changes its pixels
        hw = 2.0 * self.med_hw
        return (self.cx - hw, self.lung_top - 0.04, self.cx + hw, self.heart_v)

    def region_boxes(self, ecs_severity: float) -> dict[str, tuple[float, float, float, float]]:
        """Normalised (u1, v1, u2, v2) box of each ImaGenome region."""
        lz = self.lower_zone_top()
        boxes: dict[str, tuple[float, float, float, float]] = {}
        for side in ("left", "right"):
            x1, y1, x2, y2 = self.lung_box(side)
            boxes[f"{side} lung"] = (x1, y1, x2, y2)
            boxes[f"{side} lower lung zone"] = (x1, lz, x2, y2)
            boxes[f"{side} hilar structures"] = self.hilar_box(side)
            boxes[f"{side} costophrenic angle"] = self.cp_box(side)
        boxes["cardiac silhouette"] = self.heart_box(ecs_severity)
        boxes["mediastinum"] = self.mediastinum_box()
        return {r: boxes[r] for r in REGIONS}
