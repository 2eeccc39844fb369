"""Latent disease severity along a stay's CXR timeline, and the comparison labels it implies.

For each stay, each disease is *active* with a disease-specific probability; an
active disease has some of its loci (:data:`anatomy.LOCI`) active.  Inactive loci
keep severity 0 on every film.  Between two consecutive films the generator draws
one progression state per active disease (worsened / improved / no change; dying
patients worsen more often) and moves each active locus of that disease by
0.18-0.35 severity units in that direction (or leaves it, 15 %).  Severities live
in [0, 1]; a move that would leave that range is not made, and a disease none of
whose loci moved is "no change".

Region labels (the ImaGenome relationships): for region r and disease d,
* no active locus of d in r -> not mentioned (3);
* state "no change" -> no change (2);
* worsened/improved and some locus of d in r moved -> that state (0/1);
* worsened/improved but no locus of d in r moved -> not mentioned (3);
* then 10 % of the remaining labels are dropped to "not mentioned" (reports are incomplete).
So every mentioned region label of one disease in one pair is either the disease's
state or "no change" only when the state is "no change": the study-level label is
unambiguous (the one state its mentioned regions agree on).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_sharding.constants import DISEASES, IMPROVED, NO_CHANGE, NOT_MENTIONED, NUM_DISEASES, NUM_REGIONS, WORSENED
from data_sharding.synth.anatomy import DISEASE_LOCI, NUM_LOCI, REGION_LOCI

# Probability that a disease is present at all during a stay.
DISEASE_ACTIVE_P: dict[str, float] = {
    "atelectasis": 0.55,
    "enlarged cardiac silhouette": 0.45,
    "consolidation": 0.35,
    "pulmonary edema": 0.45,
    "lung opacity": 0.65,
    "pleural effusion": 0.5,
    "pneumonia": 0.35,
}
LOCUS_ACTIVE_P = 0.75
MOVE_P = 0.85
DELTA_RANGE = (0.18, 0.35)
MENTION_DROPOUT_P = 0.10
# (worsened, improved, no change) probabilities of a pair's state.
STATE_P_SURVIVOR = (0.35, 0.30, 0.35)
STATE_P_DYING = (0.50, 0.15, 0.35)


@dataclass
class StayProgression:
    """Ground truth for one stay's timeline of T kept AP films."""

    severity: np.ndarray  # float32 [T, NUM_LOCI] in [0, 1]
    moved: np.ndarray  # bool [T-1, NUM_LOCI]
    disease_state: np.ndarray  # int8 [T-1, 7]: 0/1/2, 3 = disease inactive
    region_labels: np.ndarray  # int8 [T-1, 10, 7]: 0..3 as in the paper


def simulate_stay(rng: np.random.Generator, n_films: int, dying: bool, resp: float) -> StayProgression:
    """Draw severities and labels for ``n_films`` consecutive films of one stay.

    ``resp`` is the stay's respiratory latent (the LOS signal): it raises the
    initial lung-opacity severity a little, tying images to the LOS outcome.
    """
    active = np.zeros(NUM_LOCI, dtype=bool)
    for d in DISEASES:
        if rng.random() < DISEASE_ACTIVE_P[d]:
            loci = np.array(DISEASE_LOCI[d])
            on = rng.random(len(loci)) < LOCUS_ACTIVE_P
            if not on.any():
                on[rng.integers(len(loci))] = True
            active[loci[on]] = True

    sev = np.zeros((n_films, NUM_LOCI), dtype=np.float64)
    init = rng.uniform(0.15, 0.85, size=NUM_LOCI)
    for i in DISEASE_LOCI["lung opacity"]:
        init[i] = np.clip(init[i] + 0.1 * resp, 0.1, 0.9)
    sev[0] = np.where(active, init, 0.0)

    n_pairs = max(n_films - 1, 0)
    moved = np.zeros((n_pairs, NUM_LOCI), dtype=bool)
    state = np.full((n_pairs, NUM_DISEASES), NOT_MENTIONED, dtype=np.int8)
    labels = np.full((n_pairs, NUM_REGIONS, NUM_DISEASES), NOT_MENTIONED, dtype=np.int8)
    probs = STATE_P_DYING if dying else STATE_P_SURVIVOR
    for t in range(n_pairs):
        sev[t + 1] = sev[t]
        for di, d in enumerate(DISEASES):
            loci = [i for i in DISEASE_LOCI[d] if active[i]]
            if not loci:
                continue
            g = int(rng.choice(3, p=probs))  # 0 worsened, 1 improved, 2 no change
            if g != NO_CHANGE:
                sign = 1.0 if g == WORSENED else -1.0
                for i in loci:
                    delta = rng.uniform(*DELTA_RANGE)
                    new = sev[t, i] + sign * delta
                    if rng.random() < MOVE_P and 0.0 <= new <= 1.0:
                        sev[t + 1, i] = new
                        moved[t, i] = True
                if not moved[t, loci].any():
                    g = NO_CHANGE
            state[t, di] = g
            for r in range(NUM_REGIONS):
                in_r = [i for i in REGION_LOCI[r][di] if active[i]]
                if not in_r:
                    continue
                if g == NO_CHANGE:
                    labels[t, r, di] = NO_CHANGE
                elif moved[t, in_r].any():
                    labels[t, r, di] = g
        drop = (labels[t] != NOT_MENTIONED) & (rng.random((NUM_REGIONS, NUM_DISEASES)) < MENTION_DROPOUT_P)
        labels[t][drop] = NOT_MENTIONED
    return StayProgression(sev.astype(np.float32), moved, state, labels)


def flip_label(label: int) -> int:
    """The label a wrong (silver) annotation would carry instead of ``label``."""
    return {WORSENED: IMPROVED, IMPROVED: WORSENED, NO_CHANGE: WORSENED}[int(label)]
