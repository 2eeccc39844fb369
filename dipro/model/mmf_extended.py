"""The ``extended`` variant of Multiscale Multimodal Fusion (``model.variant=extended``).

This project's first reading of the paper's MMF, with additions the authors' code does not
have (docs/FIDELITY.md; the ``paper`` variant is :mod:`dipro.model.mmf`): the EHR encoder
sees values and observation masks plus an embedding of each step's hour and has
``num_layers`` layers; one query per interval (an embedding of its end times) instead of
one per EHR step; region and interval-time embeddings on the CXR tokens and a
region-pooling attention of the task tokens before the static fusion.

Paper, MMF, as read here:
* Global EHR encoding: a transformer with a class token over the hourly steps; each
  step's input is [values || observation masks] projected to d plus an embedding of
  its hour stamp; padded steps are never attended.  Output E^global (CLS + steps).
* Local EHR encoding, one query per CXR interval [t_i, t_{i+1}] (an embedding of its
  two end times) attending over the EHR steps:
      E^local_i = softmax(Q K^T / sqrt(d) + AttnMask) V,
      AttnMask_ij = -|t_j - (t_i + t_{i+1})/2| if t_j in [t_i, t_{i+1}], else -inf.
  An interval with no EHR step inside (or a sample with no EHR at all) has an all -inf
  row; its attention weights are defined as 0 and its E^local_i is a learnable
  "no EHR" token, so the output is always finite.
* Local CXR-EHR fusion per interval:  D^fuse_i = LayerNorm(CrossAttn(D_i, [E^local_i || D_i]))
  (post-norm residual form; queries are the R dynamic region features of the pair).
* Global hierarchical fusion:  H^global = LayerNorm(CrossAttn(E^global, D^global)),
  D^global = all D^fuse tokens of the valid pairs.
* Final fusion: task tokens, CXR tokens (D^fuse + region + interval-time embeddings)
  and H^global go through a transformer layer; the task tokens then pool the CXR
  tokens (region pooling attention -> the per-region attention of the paper's figure),
  and finally attend over the static features fused with demographics by the group
  embedding GE(X) = softmax(X W) G (K groups):  out = LayerNorm(q + CrossAttn(q, GE([S || demo]))).

Ablations (:class:`dipro.config.ModelConfig`): ``use_ehr=False`` drops every EHR part
(local fusion then attends over D only; no global fusion); ``local_fusion=False`` uses
D as D^fuse; ``global_fusion=False`` feeds E^global to the final fusion unchanged.
Modules that an ablation leaves unused are not built (DDP needs every parameter used).
"""
from __future__ import annotations

import torch
from torch import nn

from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_EHR_VARIABLES, NUM_REGIONS
from dipro.config import ModelConfig
from dipro.model.layers import CrossAttentionBlock, MultiHeadAttention, TimeEmbedding, make_transformer_encoder
from dipro.model.mmf import GroupEmbedding, interval_attention_bias


class GlobalEHREncoder(nn.Module):
    """EHR [B,L,38] values + [B,L,38] observation masks + hours [B,L] -> E^global [B,1+L,d] (CLS first)."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(2 * NUM_EHR_VARIABLES, d_model), nn.LayerNorm(d_model), nn.Dropout(dropout))
        self.hour_embedding = TimeEmbedding(d_model)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.encoder = make_transformer_encoder(d_model, num_heads, num_layers, dropout)

    def forward(
        self, values: torch.Tensor, obs_mask: torch.Tensor, hours: torch.Tensor, step_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = values.shape[0]
        x = self.input_proj(torch.cat([values, obs_mask.to(values.dtype)], dim=-1)) + self.hour_embedding(hours)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=step_mask.device), step_mask], dim=1)
        return self.encoder(x, src_key_padding_mask=~valid), valid


class LocalIntervalEncoder(nn.Module):
    """Interval time embeddings (queries) attend over E^global steps with AttnMask -> E^local [B,P,d]."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.start_embedding = TimeEmbedding(d_model)
        self.end_embedding = TimeEmbedding(d_model)
        self.attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.no_ehr_token = nn.Parameter(torch.randn(d_model) * 0.02)

    def forward(
        self, ehr_steps: torch.Tensor, ehr_hours: torch.Tensor, ehr_mask: torch.Tensor, start: torch.Tensor, end: torch.Tensor
    ) -> torch.Tensor:
        query = self.start_embedding(start) + self.end_embedding(end)  # [B,P,d]
        bias = interval_attention_bias(ehr_hours, ehr_mask, start, end)
        out, _ = self.attn(query, ehr_steps, key_valid=ehr_mask, bias=bias)
        has_ehr = torch.isfinite(bias).any(dim=-1, keepdim=True)  # [B,P,1]
        return torch.where(has_ehr, out, self.no_ehr_token.to(out.dtype))


class LocalFusion(nn.Module):
    """D^fuse_i = LayerNorm(D_i + CrossAttn(D_i, [E^local_i || D_i])), stacked ``num_layers`` times."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionBlock(d_model, num_heads, dropout) for _ in range(num_layers))

    def forward(self, dynamic: torch.Tensor, ehr_local: torch.Tensor | None) -> torch.Tensor:
        b, p, r, d = dynamic.shape
        x = dynamic.reshape(b * p, r, d)
        e = ehr_local.reshape(b * p, 1, d) if ehr_local is not None else None
        for layer in self.layers:
            kv = torch.cat([e.to(x.dtype), x], dim=1) if e is not None else x
            x, _ = layer(x, kv)
        return x.reshape(b, p, r, d)


class ExtendedFusion(nn.Module):
    """S, D [B,P,R,d] + EHR + demographics -> task token features [B,n_tokens,d] and region attention [B,R]."""

    def __init__(self, cfg: ModelConfig, num_task_tokens: int) -> None:
        super().__init__()
        d, h, drop = cfg.d_model, cfg.num_heads, cfg.dropout
        self.use_ehr, self.local_fusion, self.global_fusion = cfg.use_ehr, cfg.local_fusion, cfg.global_fusion
        if cfg.use_ehr:
            self.ehr_encoder = GlobalEHREncoder(d, h, cfg.num_layers, drop)
            if cfg.local_fusion:
                self.interval_encoder = LocalIntervalEncoder(d, h, drop)
            if cfg.global_fusion:
                self.global_fusion_block = CrossAttentionBlock(d, h, drop)
        if cfg.local_fusion:
            self.local_fusion_block = LocalFusion(d, h, max(1, cfg.num_layers // 2), drop)
        self.region_embedding = nn.Parameter(torch.randn(NUM_REGIONS, d) * 0.02)
        self.interval_time = TimeEmbedding(d)
        self.task_tokens = nn.Parameter(torch.randn(num_task_tokens, d) * 0.02)
        self.fusion = make_transformer_encoder(d, h, 1, drop)
        self.region_pool = CrossAttentionBlock(d, h, drop)
        self.demographic_encoder = nn.Sequential(nn.Linear(NUM_DEMOGRAPHICS, d), nn.ReLU(), nn.Dropout(drop))
        self.group_embedding = GroupEmbedding(d, cfg.group_k)
        self.static_fusion = CrossAttentionBlock(d, h, drop)

    def forward(
        self,
        static: torch.Tensor,
        dynamic: torch.Tensor,
        valid_pairs: torch.Tensor,
        cxr_hours: torch.Tensor,
        batch: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, p, r, d = dynamic.shape
        start, end = cxr_hours[:, :-1], cxr_hours[:, 1:]
        ehr_tokens = ehr_valid = ehr_local = None
        if self.use_ehr:
            ehr_tokens, ehr_valid = self.ehr_encoder(
                batch["ehr_values"], batch["ehr_obs_mask"], batch["ehr_hours"], batch["ehr_mask"]
            )
            if self.local_fusion:
                ehr_local = self.interval_encoder(ehr_tokens[:, 1:], batch["ehr_hours"], batch["ehr_mask"], start, end)
        fused = self.local_fusion_block(dynamic, ehr_local) if self.local_fusion else dynamic

        cxr_tokens = fused + self.region_embedding.to(fused.dtype) + self.interval_time((start + end) / 2).unsqueeze(2)
        cxr_tokens = cxr_tokens.reshape(b, p * r, d)
        cxr_valid = valid_pairs.repeat_interleave(r, dim=1)  # [B,P*R], pair-major like the reshape
        if self.use_ehr and self.global_fusion:
            ehr_tokens, _ = self.global_fusion_block(ehr_tokens, cxr_tokens, key_valid=cxr_valid)

        task = self.task_tokens.unsqueeze(0).expand(b, -1, -1).to(cxr_tokens.dtype)
        parts, valid = [task, cxr_tokens], [torch.ones(task.shape[:2], dtype=torch.bool, device=task.device), cxr_valid]
        if ehr_tokens is not None:
            parts.append(ehr_tokens.to(cxr_tokens.dtype))
            valid.append(ehr_valid)
        tokens = self.fusion(torch.cat(parts, dim=1), src_key_padding_mask=~torch.cat(valid, dim=1))
        n_task = task.shape[1]
        task, cxr_tokens = tokens[:, :n_task], tokens[:, n_task : n_task + p * r]

        task, pool_weights = self.region_pool(task, cxr_tokens, key_valid=cxr_valid)  # [B,n_task,P*R]
        region_attention = pool_weights.mean(dim=1).reshape(b, p, r).sum(dim=1)  # [B,R], sums to 1

        demo = self.demographic_encoder(batch["demographics"]).unsqueeze(1)
        static_tokens = self.group_embedding(torch.cat([static.reshape(b, p * r, d), demo.to(static.dtype)], dim=1))
        static_valid = torch.cat([cxr_valid, torch.ones(b, 1, dtype=torch.bool, device=cxr_valid.device)], dim=1)
        task, _ = self.static_fusion(task, static_tokens, key_valid=static_valid)
        return task, region_attention
