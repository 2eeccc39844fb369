"""Progression-Aware Enhancement (PAE).

The reversed pair goes through the same f_s / f_d (paper, PAE):
    S~^r_i = f_s([F^r_{t_{i+1}} || F^r_{t_i}]),   D~^r_i = f_d([F^r_{t_{i+1}} || F^r_{t_i}])
    y^^{r,k}_i = f_k(D^r_i),   y~^{r,k}_i = f_k(D~^r_i)
    L_PAE = sum_r sum_k [CE(y^^{r,k}_i, y^{r,k}_i) + CE(y~^{r,k}_i, -y^{r,k}_i)]
            + lambda_static sum_r ||S^r_i - S~^r_i||^2
"-y" is the reversed label: worsened <-> improved, no change and not mentioned kept
(:func:`data_sharding.constants.reverse_progression_label`).  The CE is class-weighted
per disease (region-level training counts) and ignores label 3; it is the mean over
the labelled (pair, region) entries of the original and reversed directions together,
summed over the diseases.  The static-consistency term is a per-sample mean over valid
(i, r) of ||S - S~||^2 / d (see :mod:`dipro.model.std` for the normalisation).
"""
from __future__ import annotations

import torch
from torch import nn

from data_sharding.constants import NOT_MENTIONED, NUM_DISEASES, NUM_PROGRESSION_CLASSES, reverse_progression_label
from dipro.model.losses import masked_class_weighted_ce
from dipro.model.std import per_sample_mean

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
    """||S - S~||^2 averaged over valid (pair, region) terms and feature dims, per sample then over samples."""
    diff = (static.float() - static_rev.float()).pow(2)  # [B,P,R,d]
    mask = valid_pairs[:, :, None, None].expand_as(diff)
    return per_sample_mean(diff, mask)


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
