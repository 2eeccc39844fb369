"""Progression-Aware Enhancement (PAE).

The reversed pair goes through the same f_s / f_d (paper, PAE):
    S~^r_i = f_s([F^r_{t_{i+1}} || F^r_{t_i}]),   D~^r_i = f_d([F^r_{t_{i+1}} || F^r_{t_i}])
    y^^{r,k}_i = f_k(D^r_i),   y~^{r,k}_i = f_k(D~^r_i)
    L_PAE = sum_r sum_k [CE(y^^{r,k}_i, y^{r,k}_i) + CE(y~^{r,k}_i, -y^{r,k}_i)]
            + lambda_static sum_r ||S^r_i - S~^r_i||^2
"-y" is the reversed label: worsened <-> improved, no change and not mentioned kept
(:func:`data_sharding.constants.reverse_progression_label`).  The CE is class-weighted
per disease and ignores label 3; it is the mean over the labelled (pair, region) entries
of the original and reversed directions together, summed over the diseases.  The class
weights are those of the study-level progression labels, for every task, as the authors set
them up (github.com/Chenliu-svg/DiPro models/Base_Predictor.py: setup;
:class:`dipro.model.losses.ClassWeights`).

The static-consistency term is the mean over valid (i, r) and feature dimensions of
(S - S~)^2, with the gradient stopped at S~ as the authors compute it
(``mse_loss(static, static_rev.detach())``, models/Component.py: LongitudinalCXRModel.forward):
S~ is a target, only S is pulled towards it.
"""
from __future__ import annotations

import torch
from torch import nn

from data_sharding.constants import NOT_MENTIONED, NUM_DISEASES, NUM_PROGRESSION_CLASSES, reverse_progression_label
from dipro.model.losses import masked_class_weighted_ce
from dipro.model.std import masked_mean

# Lookup table label -> reversed label over {0, 1, 2, 3}.
REVERSED_LABEL = torch.tensor([reverse_progression_label(lbl) for lbl in range(NOT_MENTIONED + 1)], dtype=torch.long)


def reverse_labels(labels: torch.Tensor) -> torch.Tensor:
    """Map progression labels to the reversed direction (0 <-> 1; 2 and 3 kept)."""
    return REVERSED_LABEL.to(labels.device)[labels.long()]


class RegionProgressionHead(nn.Module):
    """f_k for the K diseases: D [..., d] -> region-level logits [..., K, 3]."""

    def __init__(self, d_model: int, num_diseases: int = NUM_DISEASES) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, NUM_PROGRESSION_CLASSES))
            for _ in range(num_diseases)
        )

    def forward(self, dynamic: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(dynamic) for head in self.heads], dim=-2)


def static_consistency_loss(static: torch.Tensor, static_rev: torch.Tensor, valid_pairs: torch.Tensor) -> torch.Tensor:
    """(S - S~.detach())^2 averaged over the batch's valid (pair, region) terms and feature dims:
    the authors' ``mse_loss(static, static_rev.detach())`` without the padded pairs."""
    diff = (static.float() - static_rev.detach().float()).pow(2)  # [B,P,R,d]
    mask = valid_pairs[:, :, None, None].expand_as(diff)
    return masked_mean(diff, mask)


def pae_progression_loss(
    logits: torch.Tensor,
    logits_rev: torch.Tensor,
    region_labels: torch.Tensor,
    valid_pairs: torch.Tensor,
    class_weights: torch.Tensor,
) -> torch.Tensor:
    """Region-level CE on D (original labels) and on D~ (reversed labels).

    logits, logits_rev [B,P,R,K,3]; region_labels [B,P,R,K]; valid_pairs [B,P]; class_weights [K,3].
    """
    labels = torch.where(valid_pairs[:, :, None, None], region_labels.long(), torch.full_like(region_labels.long(), NOT_MENTIONED))
    k = labels.shape[-1]
    all_logits = torch.cat([logits.reshape(-1, k, NUM_PROGRESSION_CLASSES), logits_rev.reshape(-1, k, NUM_PROGRESSION_CLASSES)])
    all_labels = torch.cat([labels.reshape(-1, k), reverse_labels(labels).reshape(-1, k)])
    return masked_class_weighted_ce(all_logits, all_labels, class_weights)
