"""Building blocks of MMF: masked multi-head attention, positional encoding, transformer layers.

:class:`MultiHeadAttention` is written out (rather than ``nn.MultiheadAttention``) because the
paper's local interval encoding needs a per-query additive mask with ``-inf`` entries
(MMF, AttnMask_ij) and an interval may hold no EHR step at all: a query row whose keys are
all masked gets all-zero weights (and so a zero attention output) instead of the NaN a plain
softmax would produce (the authors' code); the caller decides what such a row means (see
:mod:`dipro.model.mmf`).  :class:`EncoderLayerWithWeights` is torch's post-norm encoder layer
returning its attention weights, which the region-attention figure reads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis where ``valid`` is False / scores are -inf contribute 0.

    A row with no valid (finite) entry returns all zeros, never NaN.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    exp = torch.exp(scores - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    return exp / denom.clamp_min(torch.finfo(exp.dtype).tiny)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product multi-head attention with key masks and an additive bias.

    ``forward(query [B,Q,d], key_value [B,K,d], key_valid [B,K] bool | None,
    bias [B,Q,K] float | None) -> (out [B,Q,d], weights [B,Q,K] averaged over heads)``.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,N,hd]

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, nq, d = query.shape
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(key_value))
        v = self._split(self.v_proj(key_value))
        # Scores and softmax in float32 (the hour-scale bias needs the precision under bf16).
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)  # [B,H,Q,K]
        if bias is not None:
            scores = scores + bias.unsqueeze(1).float()
        valid = None
        if key_valid is not None:
            valid = key_valid[:, None, None, :]
        weights = masked_softmax(scores, valid)
        out = self.attn_drop(weights).to(v.dtype) @ v  # [B,H,Q,hd]
        out = out.transpose(1, 2).reshape(b, nq, d)
        return self.out_proj(out), weights.mean(dim=1)


def make_transformer_encoder(d_model: int, num_heads: int, num_layers: int, dropout: float,
                             activation: str = "relu") -> nn.TransformerEncoder:
    """Post-norm transformer encoder (batch first, 4x feed-forward, ReLU: torch's defaults, which the
    authors' layers use)."""
    layer = nn.TransformerEncoderLayer(
        d_model=d_model,
        nhead=num_heads,
        dim_feedforward=4 * d_model,
        dropout=dropout,
        activation=activation,
        batch_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)


def index_positional_encoding(length: int, d_model: int, device: torch.device | None = None) -> torch.Tensor:
    """The sinusoidal encoding of positions 0..length-1 (Vaswani et al. 2017) as the authors lay it out
    (github.com/Chenliu-svg/DiPro models/Component.py: PositionalEncoding): [length, d_model] with
    PE[pos, 2i] = sin(pos w_i), PE[pos, 2i+1] = cos(pos w_i), w_i = 10000^(-2i/d_model)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    w = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model, device=device)
    pe[:, 0::2] = torch.sin(pos * w)
    pe[:, 1::2] = torch.cos(pos * w)[:, : d_model // 2]
    return pe


class EncoderLayerWithWeights(nn.Module):
    """``nn.TransformerEncoderLayer`` (post-norm, ReLU, 4x feed-forward, batch first) written out so
    that it also returns its self-attention weights, averaged over heads:
    ``x = LN1(x + Drop(SA(x)))``, ``x = LN2(x + Drop(W2 Drop(ReLU(W1 x))))``.
    ``forward(x [B,N,d], padding_mask [B,N] bool, True = ignore) -> (x, weights [B,N,N])``.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, 4 * d_model)
        self.linear2 = nn.Linear(4 * d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attn, weights = self.self_attn(x, x, x, key_padding_mask=padding_mask, need_weights=True,
                                       average_attn_weights=True)
        x = self.norm1(x + self.dropout1(attn))
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return x, weights
