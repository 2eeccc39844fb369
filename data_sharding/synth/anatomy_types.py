"""Planted discrete anatomy types (``dipro synth --anatomy-types N``): biology that clusters.

The continuous anatomy of :class:`~data_sharding.synth.anatomy.Anatomy` (sizes, positions) is
normalised away by the region crops, and the pathology is a continuum of severities, so a
default cohort's region features have no cluster structure to speak of: k-means cuts a
continuum, and whether two films of one stay land in one cluster is close to chance.  That is
what ``dipro harmonize``'s cluster consistency (Pan et al.: do clusters of biology hold across
acquisition settings?) needs to exist before it can be measured.

With ``N > 0`` every subject is given one of ``N`` types, drawn uniformly
(:func:`draw_types`), and every frontal film of the subject shows it
(:func:`type_pattern`): a fine grating over the body whose *orientation* is the type's,
``pi t / N`` (0 = vertical stripes), ``TYPE_CYCLES`` periods per thorax half width, amplitude
``TYPE_AMPLITUDE`` gray, drawn in the subject's body coordinates (it moves with the per-film
positioning jitter) before the acquisition's gamma and noise.  Orientation, not brightness, so the
acquisition setting's gamma changes its contrast and not the type; every region box holds at
least one period at 64-px films.  It stands for a discrete anatomical variant (a parenchymal
pattern) and carries no label: the disease progression, outcome and EHR draws are the cohort's
without it.

The types come from their own seeded stream (``SeedSequence([seed, 9])``); ``N = 0`` draws nothing
and writes what the generator always wrote (byte-identical files).  Each subject's type is
recorded in ``SYNTH.json`` (``anatomy_type_of_subject``), not in any file of the real datasets.
"""
from __future__ import annotations

import numpy as np

MAX_TYPES = 12
TYPE_CYCLES = 3.0
"""Grating periods per thorax half width (~7 px a period on a 64-px film)."""
TYPE_AMPLITUDE = 55.0
"""Grating amplitude in gray levels (the ribs': 9; a disease at severity 1: 42-90).  Chosen on the
setting of ``tests/test_harmonize_e2e.py`` (2026-12-03, seeds 0-2): at 10-20 gray a trained demo
model's region features hardly carry the type (a linear probe of it 0.3-0.5 accurate against 0.25 by
chance); at 40-55 the type is what the rotated features' clusters follow; at 70 the entangled ones
follow it too."""


def draw_types(cohort, n_types: int, seed: int) -> dict[int, int]:
    """Subject index -> anatomy type in ``range(n_types)`` for every subject of ``cohort``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 9]))
    return {i: int(t) for i, t in enumerate(rng.integers(0, n_types, size=len(cohort.subjects)))}


def type_angle(anatomy_type: int, n_types: int) -> float:
    """The grating's orientation (radians) of ``anatomy_type``: 0 = vertical stripes."""
    return float(np.pi * anatomy_type / n_types)


def type_pattern(u: np.ndarray, v: np.ndarray, aspect: float, cx: float, lung_top: float, thorax_hw: float,
                 anatomy_type: int, n_types: int) -> np.ndarray:
    """The type's grating at normalised coordinates ``u`` [1, W'] / ``v`` [H', 1] (gray levels, mean 0).

    ``aspect`` = width / height of the film, so that the orientation is the same in pixels;
    ``cx``, ``lung_top``, ``thorax_hw`` are the (jittered) anatomy's body coordinates."""
    theta = type_angle(anatomy_type, n_types)
    x = (u - cx) * aspect  # in units of the film's height
    y = v - lung_top
    period = thorax_hw * aspect / TYPE_CYCLES
    phase = 2.0 * np.pi * (x * np.cos(theta) + y * np.sin(theta)) / period
    return (TYPE_AMPLITUDE * np.cos(phase)).astype(np.float32)
