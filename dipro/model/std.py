"""Spatiotemporal Disentanglement (STD).

For every adjacent CXR pair i and region r (paper, STD):
    S^r_i = f_s([F^r_{t_i} || F^r_{t_{i+1}}])          static (anatomy)
    D^r_i = f_d([F^r_{t_i} || F^r_{t_{i+1}}])          dynamic (pathological change)
    L_orth = 1/((T-1)R) sum_i sum_r sim(S^r_i, D^r_i)^2
    L_temp = 1/N sum_r sum_{i=1}^{T-2} ||S^r_i - S^r_{i+1}||_2^2

As the authors compute it (github.com/Chenliu-svg/DiPro models/Component.py:
OrderAwareProjection, STD_Constraint): f_s and f_d are Linear(2d, 4d)-GELU-Linear(4d, d)-
BatchNorm1d(d)-Dropout, each applied to the forward and to the reversed pairs; L_orth is the mean of cos^2 over the
(pair, region) terms; L_temp = mse(S_{1..P-1}, S_{2..P}), the mean over terms and feature
dimensions (N = terms x d), and only with P > 1.

A pair is valid only when both of its CXRs are real (``cxr_mask``).  The authors
average over padded pairs too; here padding never counts: only valid pairs go through
the BatchNorm projections (so padding changes no statistic), and the losses are means
over the batch's valid terms.  Without padding both are the authors'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PairProjection(nn.Module):
    """f_s or f_d: [N, 2d] -> [N, d] (Linear-GELU-Linear-BatchNorm1d-Dropout)."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.BatchNorm1d(d_model),
            nn.Dropout(dropout),
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(pairs)


def adjacent_pairs(features: torch.Tensor, reverse: bool = False, interleave: bool = False) -> torch.Tensor:
    """[B,T,R,d] -> [B,T-1,R,2d]: [F_{t_i} || F_{t_{i+1}}], or [F_{t_{i+1}} || F_{t_i}] when reversed.

    ``interleave`` (reversed only): the authors' reversed input, whose two halves are stacked
    feature by feature: (F_{t_{i+1},1}, F_{t_i,1}, F_{t_{i+1},2}, F_{t_i,2}, ...)
    (github.com/Chenliu-svg/DiPro models/Component.py: OrderAwareProjection.forward).
    """
    first, second = features[:, :-1], features[:, 1:]
    if not reverse:
        return torch.cat([first, second], dim=-1)
    if interleave:
        return torch.stack([second, first], dim=-1).flatten(-2)
    return torch.cat([second, first], dim=-1)


def pair_validity(cxr_mask: torch.Tensor) -> torch.Tensor:
    """[B,T] bool -> [B,T-1] bool: pair i is valid iff CXRs i and i+1 are both real."""
    return cxr_mask[:, :-1] & cxr_mask[:, 1:]


class SpatiotemporalDisentanglement(nn.Module):
    """Holds f_s and f_d; ``forward(F, valid, reverse)`` -> (S, D) [B,P,R,d] for the forward or reversed pairs.

    Only the valid pairs ([B,P] bool) are projected (zeros elsewhere), so the BatchNorm
    statistics are those of real pairs.
    """

    def __init__(self, d_model: int, dropout: float, pair_reversal: str = "swap") -> None:
        super().__init__()
        if pair_reversal not in ("swap", "interleave"):
            raise ValueError(f"unknown pair reversal {pair_reversal!r}")
        self.interleave = pair_reversal == "interleave"
        self.f_s = PairProjection(d_model, dropout)
        self.f_d = PairProjection(d_model, dropout)

    def forward(self, features: torch.Tensor, valid: torch.Tensor,
                reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = adjacent_pairs(features, reverse=reverse, interleave=self.interleave)  # [B,P,R,2d]
        b, p, r, _ = pairs.shape
        flat = pairs[valid].reshape(-1, pairs.shape[-1])  # [N*R, 2d], real pairs only
        # every sample has >= 1 real pair (>= 2 CXRs, checked by the loader), so >= R rows: tells
        # torch.compile the data-dependent row count is a BatchNorm-sized batch (no graph break)
        torch._check(flat.shape[0] >= r)
        outs = []
        for f in (self.f_s, self.f_d):
            y = f(flat)
            full = y.new_zeros(b, p, r, y.shape[-1])
            full[valid] = y.view(-1, r, y.shape[-1])
            outs.append(full)
        return outs[0], outs[1]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over all masked entries of the batch (0 when there is none).

    No host synchronisation (the count is clamped on the device instead of being tested), so
    the training step compiles into one graph; with no entry the masked sum is 0 and so is the mean."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def orthogonality_loss(static: torch.Tensor, dynamic: torch.Tensor, valid_pairs: torch.Tensor) -> torch.Tensor:
    """L_orth = mean over valid (i, r) of cos(S^r_i, D^r_i)^2 (github.com/Chenliu-svg/DiPro
    models/Component.py: STD_Constraint.orthogonal_projection_loss)."""
    cos = F.cosine_similarity(static.float(), dynamic.float(), dim=-1, eps=1e-8)  # [B,P,R]
    mask = valid_pairs.unsqueeze(-1).expand_as(cos)
    return masked_mean(cos.pow(2), mask)


def temporal_consistency_loss(static: torch.Tensor, valid_pairs: torch.Tensor) -> torch.Tensor:
    """L_temp = 1/N sum_{i,r} ||S^r_i - S^r_{i+1}||^2 over consecutive valid pairs (N = terms x d): the authors'
    ``mse_loss(S[:, :-1], S[:, 1:])``, zero with fewer than two pairs (STD_Constraint.longitudinal_consistency_loss)."""
    if static.shape[1] < 2:
        return static.sum() * 0.0
    diff = (static[:, 1:].float() - static[:, :-1].float()).pow(2)  # [B,P-1,R,d]
    both = valid_pairs[:, 1:] & valid_pairs[:, :-1]
    mask = both[:, :, None, None].expand_as(diff)
    return masked_mean(diff, mask)
