"""Spatiotemporal Disentanglement (STD).

For every adjacent CXR pair i and region r (paper, STD):
    S^r_i = f_s([F^r_{t_i} || F^r_{t_{i+1}}])          static (anatomy)
    D^r_i = f_d([F^r_{t_i} || F^r_{t_{i+1}}])          dynamic (pathological change)
    L_orth = 1/((T-1)R) sum_i sum_r sim(S^r_i, D^r_i)^2
    L_temp = 1/N sum_r sum_{i=1}^{T-2} ||S^r_i - S^r_{i+1}||_2^2

A pair is valid only when both of its CXRs are real (``cxr_mask``).  Both losses are
computed per sample over its valid terms and then averaged over the samples that
have at least one term.  N in L_temp is the number of (i, r) terms times the
feature size, i.e. a mean squared error: the paper leaves N open and the authors'
settings table (``configs/*.yaml``) was tuned with this normalisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PairProjection(nn.Module):
    """f_s or f_d: [.., 2d] -> [.., d] (Linear-GELU-Linear-LayerNorm-Dropout)."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.LayerNorm(d_model),
            nn.Dropout(dropout),
        )

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.net(pairs)


def adjacent_pairs(features: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """[B,T,R,d] -> [B,T-1,R,2d]: [F_{t_i} || F_{t_{i+1}}], or [F_{t_{i+1}} || F_{t_i}] when reversed."""
    first, second = features[:, :-1], features[:, 1:]
    return torch.cat([second, first] if reverse else [first, second], dim=-1)


def pair_validity(cxr_mask: torch.Tensor) -> torch.Tensor:
    """[B,T] bool -> [B,T-1] bool: pair i is valid iff CXRs i and i+1 are both real."""
    return cxr_mask[:, :-1] & cxr_mask[:, 1:]


class SpatiotemporalDisentanglement(nn.Module):
    """Holds f_s and f_d; ``forward(F, reverse)`` -> (S, D) for the forward or reversed pairs."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.f_s = PairProjection(d_model, dropout)
        self.f_d = PairProjection(d_model, dropout)

    def forward(self, features: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = adjacent_pairs(features, reverse=reverse)
        return self.f_s(pairs), self.f_d(pairs)


def per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's masked entries, then over samples with >= 1 entry.

    ``values`` and ``mask`` share shape [B, ...].  With no entry at all the result is
    ``0 * values.sum()`` (zero, but still connected to the graph).
    """
    mask = mask.to(values.dtype)
    dims = tuple(range(1, values.ndim))
    totals = (values * mask).sum(dim=dims)
    counts = mask.sum(dim=dims)
    has = counts > 0
    if not bool(has.any()):
        return values.sum() * 0.0
    return (totals[has] / counts[has]).mean()


def orthogonality_loss(static: torch.Tensor, dynamic: torch.Tensor, valid_pairs: torch.Tensor) -> torch.Tensor:
    """L_orth = mean over valid (i, r) of cos(S^r_i, D^r_i)^2 (per sample, then over samples)."""
    cos = F.cosine_similarity(static.float(), dynamic.float(), dim=-1, eps=1e-8)  # [B,P,R]
    mask = valid_pairs.unsqueeze(-1).expand_as(cos)
    return per_sample_mean(cos.pow(2), mask)


def temporal_consistency_loss(static: torch.Tensor, valid_pairs: torch.Tensor) -> torch.Tensor:
    """L_temp = 1/N sum_{i,r} ||S^r_i - S^r_{i+1}||^2 over consecutive valid pairs (N = terms x d)."""
    if static.shape[1] < 2:
        return static.sum() * 0.0
    diff = (static[:, 1:].float() - static[:, :-1].float()).pow(2)  # [B,P-1,R,d]
    both = valid_pairs[:, 1:] & valid_pairs[:, :-1]
    mask = both[:, :, None, None].expand_as(diff)
    return per_sample_mean(diff, mask)
