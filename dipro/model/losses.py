"""Task losses, class weights from training label counts, and the paper's weighted total.

Class weights are computed once from ``label_stats.json`` (docs/ARCHITECTURE.md §1)
and kept as buffers of :class:`ClassWeights`, so a state dict alone rebuilds them:

* progression: per disease, w_c = n / (3 n_c) over the three classes 0..2 (n = n_0 + n_1 + n_2;
  label 3 "not mentioned" is never counted) -- the authors' weights; a class never seen in
  training counts as 1.  (The authors' n also counts label 3 when their label map gives it one:
  a factor common to a disease's three weights, which a weighted-mean CE cancels.)
* PAE (``region``): the same weights computed from the study-level progression labels of the
  disease_progression training split, for every task (the authors' setup; not from the
  region-level labels).
* mortality: BCE positive-class weight n_positive / n (the authors' value, which down-weights
  deaths rather than balancing them).
* length of stay: plain 4-class cross-entropy (the authors' setting).

github.com/Chenliu-svg/DiPro models/Base_Predictor.py: setup.

Total (paper): L = lambda_ce L_task + lambda_orth L_orth + lambda_temp L_temp
                + lambda_static ||S - S_rev||^2 + lambda_dynamic L_PAE-CE
with the weights of :class:`dipro.config.LossConfig`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_sharding.constants import NOT_MENTIONED, NUM_DISEASES, NUM_LOS_BINS, NUM_PROGRESSION_CLASSES
from dipro.config import LossConfig
from data_sharding.errors import DataError

TERM_NAMES = ("task_ce", "orth", "temp", "pae_ce", "static", "total")
_STATS_KEY = {"disease_progression": "disease_progression", "mortality": "mortality_los", "length_of_stay": "mortality_los"}


def balanced_class_weights(counts: Any, where: str) -> torch.Tensor:
    """[K][>=3] label counts -> [K,3] weights w_kc = n_k / (3 n_kc) over classes 0..2."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    if c.ndim != 2 or c.shape[1] < NUM_PROGRESSION_CLASSES:
        raise DataError(f"label_stats {where}: expected a [{NUM_DISEASES}][4] list of counts, got shape {tuple(c.shape)}")
    if (c < 0).any():
        raise DataError(f"label_stats {where}: counts must be >= 0")
    c = c[:, :NUM_PROGRESSION_CLASSES]
    total = c.sum(dim=1, keepdim=True)
    return (total.clamp_min(1.0) / (NUM_PROGRESSION_CLASSES * c.clamp_min(1.0))).float()


def _get(stats: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = stats
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise DataError(f"label_stats: missing key {'.'.join(path)!r} (see docs/ARCHITECTURE.md, label_stats.json)")
        node = node[key]
    return node


class ClassWeights(nn.Module):
    """Buffers: ``progression`` [7,3], ``region`` [7,3] (PAE), ``mortality_pos_weight`` [1].

    Sources as described in the module docstring.  With ``label_stats=None`` the weights are uniform placeholders (used when the model
    is rebuilt only to load a state dict, which carries the real values).
    """

    def __init__(self, task: str, label_stats: Mapping[str, Any] | None) -> None:
        super().__init__()
        ones = torch.ones(NUM_DISEASES, NUM_PROGRESSION_CLASSES)
        progression, region, pos_weight = ones.clone(), ones.clone(), torch.ones(1)
        if label_stats is not None:
            key = _STATS_KEY[task]
            where = ("disease_progression", "task")
            region = balanced_class_weights(_get(label_stats, where), ".".join(where))
            if task == "disease_progression":
                progression = balanced_class_weights(_get(label_stats, (key, "task")), f"{key}.task")
            elif task == "mortality":
                counts = _get(label_stats, (key, "mortality"))
                if not (isinstance(counts, (list, tuple)) and len(counts) == 2):
                    raise DataError(f"label_stats {key}.mortality: expected [n_negative, n_positive], got {counts!r}")
                neg, pos = float(counts[0]), float(counts[1])
                pos_weight = torch.tensor([max(pos, 1.0) / max(neg + pos, 1.0)])  # n_pos / n
        self.register_buffer("progression", progression)
        self.register_buffer("region", region)
        self.register_buffer("mortality_pos_weight", pos_weight)


def masked_class_weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over diseases k of the class-weighted mean CE over samples with label != 3.

    logits [N,K,3], labels [N,K] in {0,1,2,3}, weights [K,3].  Per disease this equals
    ``F.cross_entropy(logits[sel, k], labels[sel, k], weight=weights[k])``; a disease
    with no labelled sample contributes 0.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    valid = labels != NOT_MENTIONED
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # [N,K]
    k_index = torch.arange(labels.shape[1], device=labels.device).expand_as(y)
    w = weights[k_index, y] * valid.to(logp.dtype)
    num, den = (w * nll).sum(dim=0), w.sum(dim=0)
    per_disease = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    return per_disease.sum() + 0.0 * logits.sum()


def mortality_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """BCE with logits and positive-class weight, mean over the batch."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=pos_weight)


def los_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain 4-class cross-entropy over the LOS bins."""
    if logits.shape[-1] != NUM_LOS_BINS:
        raise ValueError(f"LOS logits must have {NUM_LOS_BINS} classes, got {logits.shape[-1]}")
    return F.cross_entropy(logits.float(), target.long())


def total_loss(terms: Mapping[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    """The paper's weighted sum of the five terms."""
    return (
        cfg.lambda_ce * terms["task_ce"]
        + cfg.orth * terms["orth"]
        + cfg.consistency * terms["temp"]
        + cfg.static_order * terms["static"]
        + cfg.dynamic_order * terms["pae_ce"]
    )
