"""Contrasts that isolate the acquisition: proxy twins on real data.

The paper's twins are the same scan in two reconstructions; a chest film is taken once.  The
closest thing on MIMIC: two films of the same stay taken in different settings, consecutive in
time and at most ``max_hours`` apart, compared region by region.  Anatomy cancels exactly; the
pathology cancels up to what changed in those hours (noise for the classifier, not a bias, unless
the setting changes with the disease course, which the short gap limits).

* :func:`setting_pairs`: those film pairs, oriented so the first film has the later setting in
  class order (its contrast ``z_a - z_b`` is labelled ``"A>B"``), one row pair per region present on
  both films.  Used for the fit and for the cluster-consistency metrics.
* :func:`stay_centred_contrasts`: the fallback when too few such pairs exist: every row of a stay
  whose films hold >= 2 settings minus the mean of that stay's rows of the same region, labelled by
  its setting (within-stay contrasts: still no between-patient biology).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SettingPairs:
    film_pairs: list[tuple[str, str]]  # (dicom a, dicom b)
    rows: np.ndarray  # int [M, 2]: (row of a, row of b), same region
    labels: np.ndarray  # str [M]: "A>B"


def setting_pairs(dicom: np.ndarray, stay: np.ndarray, hours: np.ndarray, region: np.ndarray,
                  setting: np.ndarray, classes: list[str], max_hours: float) -> SettingPairs:
    """Consecutive films of one stay in two settings, <= ``max_hours`` apart (rows with a setting in ``classes``)."""
    known = np.isin(setting, classes)
    rank = {c: i for i, c in enumerate(classes)}
    films: dict[str, tuple[int, float, str]] = {}
    for i in np.flatnonzero(known):
        films.setdefault(str(dicom[i]), (int(stay[i]), float(hours[i]), str(setting[i])))
    by_stay: dict[int, list[tuple[float, str, str]]] = {}
    for d, (st, h, s) in films.items():
        by_stay.setdefault(st, []).append((h, d, s))
    film_pairs: list[tuple[str, str]] = []
    for st in sorted(by_stay):
        seq = sorted(by_stay[st])
        for (h1, d1, s1), (h2, d2, s2) in zip(seq[:-1], seq[1:]):
            if s1 != s2 and h2 - h1 <= max_hours:
                film_pairs.append((d1, d2) if rank[s1] > rank[s2] else (d2, d1))
    row_of = {(str(dicom[i]), int(region[i])): i for i in np.flatnonzero(known)}
    rows, labels = [], []
    for a, b in film_pairs:
        for r in range(int(region.max()) + 1 if len(region) else 0):
            if (a, r) in row_of and (b, r) in row_of:
                rows.append((row_of[(a, r)], row_of[(b, r)]))
                labels.append(f"{films[a][2]}>{films[b][2]}")
    return SettingPairs(film_pairs, np.asarray(rows, dtype=np.int64).reshape(-1, 2), np.asarray(labels, dtype=object))


def stay_centred_contrasts(f: np.ndarray, stay: np.ndarray, region: np.ndarray, setting: np.ndarray,
                           classes: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(contrasts [M, d], their settings [M], stays used): rows of stays with >= 2 settings, minus the
    mean of their stay's rows of the same region."""
    known = np.isin(setting, classes)
    out, labels, stays = [], [], 0
    for st in np.unique(stay[known]):
        mine = known & (stay == st)
        if len(np.unique(setting[mine])) < 2:
            continue
        stays += 1
        for r in np.unique(region[mine]):
            rows = np.flatnonzero(mine & (region == r))
            if len(rows) < 2:
                continue
            out.append(f[rows] - f[rows].mean(axis=0))
            labels.extend(setting[rows])
    if not out:
        return np.zeros((0, f.shape[1])), np.zeros(0, dtype=object), 0
    return np.concatenate(out), np.asarray(labels, dtype=object), stays
