"""Patient-level train/val/test split (~70/10/20), gold subjects forced into test, fixed seed.

Every stay of a subject lands in the subject's split, so no patient is in two
splits and the same split serves all three tasks.  Targets are computed over
all cohort subjects: test gets ``round(0.2 n)`` subjects (or every gold subject
when there are more), val ``round(0.1 n)``, train the rest; the non-gold
subjects are assigned in the order of a seeded permutation of their sorted ids.
"""
from __future__ import annotations

import numpy as np

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
DEFAULT_SPLIT_SEED = 23


def split_subjects(subject_ids, gold_subjects=(), seed: int = DEFAULT_SPLIT_SEED) -> dict[int, str]:
    """subject_id -> "train" | "val" | "test"."""
    subjects = np.unique(np.asarray(list(subject_ids), dtype=np.int64))
    gold = {int(s) for s in gold_subjects}
    n = len(subjects)
    is_gold = np.isin(subjects, list(gold)) if gold else np.zeros(n, dtype=bool)
    rest = subjects[~is_gold]
    rest = rest[np.random.default_rng(seed).permutation(len(rest))]
    n_test = max(0, int(round(SPLIT_FRACTIONS["test"] * n)) - int(is_gold.sum()))
    n_val = int(round(SPLIT_FRACTIONS["val"] * n))
    n_val = min(n_val, len(rest) - n_test) if len(rest) > n_test else 0
    out: dict[int, str] = {int(s): "test" for s in subjects[is_gold]}
    for i, s in enumerate(rest):
        out[int(s)] = "test" if i < n_test else ("val" if i < n_test + n_val else "train")
    return out
