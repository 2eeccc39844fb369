"""Disease-progression labels of a CXR pair (prior -> current): the authors' rule and the severity rule.

Two label sets per pair: the study-level label of each of the 7 diseases (the task's
target) and region labels ``[10 regions][7 diseases]`` (PAE's supervision), both in the
paper's encoding (worsened 0, improved 1, no change 2, not mentioned 3).

``authors`` (default; github.com/Chenliu-svg/DiPro ``mimic_data_extract/mimic3benchmark/scripts/``):

* The scene graph of the *current* image labels the pair (its first relationship's
  prior, current) only (``process_ImaGenome.py: get_disease_progression_labels``); a
  consecutive pair of the stay whose current graph compares with another image gets
  no label (``pair_progression_statistic`` keeps only consecutive pairs).
* Study level (``get_disease_and_progression``): relationships of every bbox with exactly
  one ``comparison|yes|...`` name; each names the findings of its ``anatomicalfinding|...``
  and ``disease|...`` attributes, yes or no alike.  A disease gets a label only when every
  relationship naming it agrees; any disagreement drops that disease for the pair.  The 7
  diseases are matched by ImaGenome's names (edema is "pulmonary edema/hazy opacity").
* A pair is a sample only when at least one of the 7 diseases is labelled (the
  per-disease tables of ``pair_progression_statistic`` merged in ``split_train_and_test.py:
  merge_progression_task``); the others are counted as dropped for having no label.
* Gold (``correct_using_golden_labels``): for a pair the gold file covers, each silver
  disease label is replaced.  ``--gold-labels per-disease`` (default) takes the gold rows
  *of that disease* (they must agree, else the disease is dropped; none: silver stays);
  ``--gold-labels first-row`` reproduces the authors' ``_get_golden_labels``, which returns
  the comparison of the pair's *first* gold row whatever its disease -- a bug, kept one
  option away so their test labels can be rebuilt.
* Region level (``split_train_and_test.py: get_organ_progression_labels_dp``): the current
  graph's relationships (same pair rule) of the 10 regions with exactly one comparison set
  ``[region][disease]`` for each finding, later relationships overwriting earlier ones;
  then the pair's gold rows overwrite per (bbox, label name).  The authors match region
  findings to the paper's names literally, so "pulmonary edema/hazy opacity" never matches and
  their region-level edema labels are always 3; ``--region-names mapped`` (default) maps it,
  ``--region-names authors`` reproduces them.

``severity`` (this project's earlier rule): every relationship of the 10 regions with the
given prior, "yes" findings only, conflicting comparisons resolved by severity (worsened >
improved > no change) per region; study label = the most severe region label; a gold pair
is labelled by its gold rows alone; every consecutive pair is a sample, labelled or not.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from data_sharding.constants import (
    AUTHORS_REGION_FINDING_TO_DISEASE,
    FINDING_CATEGORIES,
    IMAGENOME_FINDING_TO_DISEASE,
    IMPROVED,
    NO_CHANGE,
    NOT_MENTIONED,
    NUM_DISEASES,
    PAIR_LEVEL_FINDING_TO_DISEASE,
    WORSENED,
)
from data_sharding.defaults import DP_LABEL_MODES, GOLD_MODES, REGION_NAME_MODES  # re-exported: one source
from data_sharding.imagenome import DISEASE_INDEX, REGION_INDEX, GoldLabels, GoldRow, SceneGraph, empty_region_labels

#: Severity order of the severity rule (lower wins).
SEVERITY = {WORSENED: 0, IMPROVED: 1, NO_CHANGE: 2, NOT_MENTIONED: 3}


def merge_label(current: int, new: int) -> int:
    """The more severe of two comparison labels (worsened > improved > no change > not mentioned)."""
    return new if SEVERITY[new] < SEVERITY[current] else current


def study_labels(region_labels: np.ndarray) -> np.ndarray:
    """``[..., 10, 7]`` region labels -> ``[..., 7]``: the most severe label of each disease over regions."""
    r = np.asarray(region_labels)
    out = np.full(r.shape[:-2] + (r.shape[-1],), NOT_MENTIONED, dtype=np.int8)
    for label in (NO_CHANGE, IMPROVED, WORSENED):  # later assignments win
        out[(r == label).any(axis=-2)] = label
    return out


@dataclass
class PairLabels:
    """Labels of one (prior, current) pair."""

    study: np.ndarray
    """int8 [7]."""
    region: np.ndarray
    """int8 [10][7]."""
    source: str
    """"gold" when the gold file covers the pair, else "silver"."""
    keep: bool
    """Whether the pair is a disease-progression sample (authors: at least one study label)."""


def _region_map(mode: str) -> dict[str, str]:
    return IMAGENOME_FINDING_TO_DISEASE if mode == "mapped" else AUTHORS_REGION_FINDING_TO_DISEASE


class ProgressionLabeler:
    """Labels pairs with one rule set; counts what each rule dropped in :attr:`counts`."""

    def __init__(self, graphs: dict[str, SceneGraph], gold: GoldLabels, mode: str = "authors",
                 gold_mode: str = "per-disease", region_names: str = "mapped"):
        if mode not in DP_LABEL_MODES:
            raise ValueError(f"dp label mode {mode!r}: expected one of {', '.join(DP_LABEL_MODES)}")
        if gold_mode not in GOLD_MODES:
            raise ValueError(f"gold mode {gold_mode!r}: expected one of {', '.join(GOLD_MODES)}")
        if region_names not in REGION_NAME_MODES:
            raise ValueError(f"region names {region_names!r}: expected one of {', '.join(REGION_NAME_MODES)}")
        self.graphs, self.gold = graphs, gold
        self.mode, self.gold_mode = mode, gold_mode
        self.region_map = _region_map(region_names)
        self.counts: Counter = Counter()

    # ------------------------------------------------------------------ public
    def pair(self, prior: str, current: str) -> PairLabels:
        """Study and region labels of a disease-progression pair (counted in :attr:`counts`)."""
        if self.mode == "severity":
            region, source = self._severity_region(prior, current)
            return PairLabels(study_labels(region), region, source, True)
        study, source = self._authors_study(prior, current)
        region = self.region(prior, current)
        keep = bool((study != NOT_MENTIONED).any())
        if not keep:
            cur = self.graphs.get(current)
            if cur is None or cur.first_prior is None:
                why = "current scene graph has no comparison"
            elif cur.first_prior != prior:
                why = "current scene graph compares with another image"
            else:
                why = "no agreed label among the 7 diseases"
            self.counts[f"pairs dropped: {why}"] += 1
        return PairLabels(study, region, source, keep)

    def region(self, prior: str, current: str) -> np.ndarray:
        """Region labels [10][7] of a pair (also the mortality/LOS pairs)."""
        if self.mode == "severity":
            return self._severity_region(prior, current)[0]
        out = empty_region_labels()
        sg = self._graph_for(prior, current)
        if sg is not None:
            for rel in sg.relations:
                r = REGION_INDEX.get(rel.bbox)
                if r is None or len(rel.comparisons) != 1:
                    continue
                for category, _, name in rel.findings:
                    d = self.region_map.get(name) if category in FINDING_CATEGORIES else None
                    if d is not None:
                        out[r, DISEASE_INDEX[d]] = rel.comparisons[0]  # later relationships overwrite
        for row in self.gold.rows.get((current, prior), ()):
            r, d = REGION_INDEX.get(row.bbox), self.region_map.get(row.label_name)
            if r is not None and d is not None and row.comparison is not None:
                out[r, DISEASE_INDEX[d]] = row.comparison  # gold overwrites per (bbox, label name)
        return out

    # ------------------------------------------------------------------ authors
    def _graph_for(self, prior: str, current: str) -> SceneGraph | None:
        """The current image's graph when the authors would pair it with ``prior``."""
        sg = self.graphs.get(current)
        if sg is None or sg.first_prior != prior:
            return None
        return sg

    def _authors_study(self, prior: str, current: str) -> tuple[np.ndarray, str]:
        study = np.full(NUM_DISEASES, NOT_MENTIONED, dtype=np.int8)
        sg = self._graph_for(prior, current)
        if sg is not None:
            votes: dict[str, set[int]] = {}
            for rel in sg.relations:
                if len(rel.comparisons) != 1:
                    self.counts["relationships with several comparisons (dropped)"] += 1
                    continue
                for category, _, name in rel.findings:
                    if category in FINDING_CATEGORIES:
                        votes.setdefault(name, set()).add(rel.comparisons[0])
            for name, labels in votes.items():
                d = PAIR_LEVEL_FINDING_TO_DISEASE.get(name)
                if d is None:
                    continue
                if len(labels) == 1:
                    study[DISEASE_INDEX[d]] = next(iter(labels))
                else:
                    self.counts["disease labels dropped: regions disagree"] += 1
        rows = self.gold.rows.get((current, prior))
        if rows is None:
            return study, "silver"
        self.counts["gold pairs"] += 1
        for j in np.flatnonzero(study != NOT_MENTIONED):
            new = self._gold_label(rows, int(j), int(study[j]))
            if new != study[j]:
                self.counts["silver labels changed by gold"] += 1
            study[j] = new
        return study, "gold"

    def _gold_label(self, rows: list[GoldRow], disease: int, silver: int) -> int:
        """The gold label replacing ``silver`` for ``disease`` of a gold pair."""
        if self.gold_mode == "first-row":
            c = rows[0].comparison
            return NOT_MENTIONED if c is None else c
        labels = {r.comparison for r in rows if r.comparison is not None
                  and DISEASE_INDEX.get(IMAGENOME_FINDING_TO_DISEASE.get(r.label_name, "")) == disease}
        if not labels:
            self.counts["silver labels kept: no gold row for that disease"] += 1
            return silver
        if len(labels) > 1:
            self.counts["disease labels dropped: gold rows disagree"] += 1
            return NOT_MENTIONED
        return next(iter(labels))

    # ------------------------------------------------------------------ severity
    def _severity_region(self, prior: str, current: str) -> tuple[np.ndarray, str]:
        rows = self.gold.rows.get((current, prior))
        out = empty_region_labels()
        if rows is not None:
            for row in rows:
                r, d = REGION_INDEX.get(row.bbox), self.region_map.get(row.label_name)
                if r is not None and d is not None and row.comparison is not None:
                    j = DISEASE_INDEX[d]
                    out[r, j] = merge_label(int(out[r, j]), row.comparison)
            return out, "gold"
        sg = self.graphs.get(current)
        for rel in (sg.relations if sg is not None else ()):
            r = REGION_INDEX.get(rel.bbox)
            if rel.prior != prior or r is None:
                continue
            distinct = set(rel.comparisons)
            if len(distinct) > 1:
                self.counts["relationships with conflicting comparisons (most severe kept)"] += 1
            label = min(distinct, key=SEVERITY.__getitem__)
            for _, polarity, name in rel.findings:
                d = self.region_map.get(name) if polarity == "yes" else None
                if d is None:
                    continue
                j = DISEASE_INDEX[d]
                old = int(out[r, j])
                if old != NOT_MENTIONED and old != label:
                    self.counts["conflicting region labels (most severe kept)"] += 1
                out[r, j] = merge_label(old, label)
        return out, "silver"
