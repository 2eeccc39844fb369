"""Multiscale Multimodal Fusion (MMF) as the authors built it.

github.com/Chenliu-svg/DiPro models/Component.py: EHRTransformer_cls, EHRIntervalEncoder,
RegionAwareAttention, EHRCrossAttention, MultisacleMultimodalFusion; models/model.py: DiPro.forward.

* Global EHR encoding: the 38 hourly values -> Linear-LayerNorm-Dropout, plus the sinusoidal
  encoding of the step index (then dropout); a CLS token prepended; one post-norm transformer
  layer (ReLU, 4d feed-forward) with the step padding mask.  E^global = its step outputs
  (the CLS output is not used).
* Local EHR encoding per CXR interval p = [s_p, e_p]: every EHR step l gives a query from
  its time relative to the interval, (t_l - s_p, e_p - t_l, sigmoid((t_l - s_p)(e_p - t_l)))
  through Linear(3, d/2)-GELU-Linear(d/2, d); the L queries attend over E^global with
      AttnMask_j = -|t_j - (s_p + e_p)/2| if t_j in [s_p, e_p], else -inf,
  giving L tokens E^local_p.
* Local CXR-EHR fusion (num_layers // 2 region-aware attention layers): the R dynamic region
  features D_p give queries, keys and values through Linear(d, 3d), the interval's EHR tokens
  keys and values through Linear(d, 2d); multi-head attention over [regions ; EHR tokens];
  D_p <- LayerNorm(D_p + attention).
* Global hierarchical fusion: the EHR steps attend over all P x R fused region tokens:
  H = LayerNorm(E^global + CrossAttn(E^global, D^fuse)).
* Final fusion: [task tokens ; P x R region tokens ; H] through one post-norm transformer
  layer; the task tokens then attend over the group embedding GE([S ; demographics])
  (GE(X) = softmax(X W) G, K groups): out = LayerNorm(q + CrossAttn(q, GE([S ; demo]))).
  The authors run the last attention for every fused token and keep the task tokens;
  attention and LayerNorm act per query, so computing it for the task tokens alone is the same.

Where this differs from the authors' code (docs/FIDELITY.md): padding is masked everywhere --
padded EHR steps (in the interval attention, the region-aware attention and the final
fusion), padded pairs' region tokens (in the global fusion, the final fusion and the static
tokens of the group embedding) -- so a sample's output never depends on what it is padded
with; and an interval with no EHR step inside (an all -inf AttnMask row, NaN in the authors'
code) gives EHR tokens that the region-aware attention ignores.

``region_attention`` [B,R]: the final fusion layer's attention of the task tokens on the
region tokens (averaged over heads and task tokens, summed over the pairs), normalised over
the regions: the share of the task tokens' attention on the CXRs that falls on each region.

Ablations (:class:`dipro.config.ModelConfig`): ``use_ehr=False`` drops every EHR part (the
region-aware attention then attends over the regions only); ``local_fusion=False`` uses D
as D^fuse; ``global_fusion=False`` feeds E^global to the final fusion unchanged.  Modules
that an ablation leaves unused are not built (DDP needs every parameter used).
"""
from __future__ import annotations

import torch
from torch import nn

from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_EHR_VARIABLES
from dipro.config import ModelConfig
from dipro.model.layers import EncoderLayerWithWeights, MultiHeadAttention, index_positional_encoding, make_transformer_encoder


def interval_attention_bias(
    ehr_hours: torch.Tensor, ehr_mask: torch.Tensor, start: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """AttnMask [B,P,L]: -|t_j - (t_i + t_{i+1})/2| for real steps with t_j in [t_i, t_{i+1}], else -inf."""
    t = ehr_hours.float()[:, None, :]  # [B,1,L]
    s, e = start.float()[:, :, None], end.float()[:, :, None]  # [B,P,1]
    inside = (t >= s) & (t <= e) & ehr_mask[:, None, :]
    bias = -(t - (s + e) / 2).abs()
    return torch.where(inside, bias, torch.full_like(bias, float("-inf")))


class GroupEmbedding(nn.Module):
    """GE(X) = softmax(X W) G with W [d,K], G [K,d]: each token becomes a mix of K group prototypes."""

    def __init__(self, d_model: int, k: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(d_model, k))
        self.G = nn.Parameter(torch.empty(k, d_model))
        nn.init.xavier_uniform_(self.W)
        nn.init.xavier_uniform_(self.G)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.softmax(x @ self.W.to(x.dtype), dim=-1)
        return alpha @ self.G.to(alpha.dtype)


class GlobalEHREncoder(nn.Module):
    """EHR values [B,L,38] + step mask [B,L] -> E^global [B,L,d] (EHRTransformer_cls)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(NUM_EHR_VARIABLES, d_model), nn.LayerNorm(d_model), nn.Dropout(dropout))
        self.position_dropout = nn.Dropout(dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model))
        self.encoder = make_transformer_encoder(d_model, num_heads, 1, dropout, activation="relu")

    def forward(self, values: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = values.shape
        x = self.input_proj(values)
        x = self.position_dropout(x + index_positional_encoding(length, x.shape[-1], x.device).to(x.dtype))
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=step_mask.device), step_mask.bool()], dim=1)
        return self.encoder(x, src_key_padding_mask=~valid)[:, 1:]


class IntervalEHREncoder(nn.Module):
    """E^global [B,L,d] + hours -> E^local [B,P,L,d] and its validity [B,P,L] (EHRIntervalEncoder).

    A token is valid when its step is real and its interval holds at least one real step
    (otherwise its attention row is empty: zero weights here, NaN in the authors' code).
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.time_encoder = nn.Sequential(nn.Linear(3, d_model // 2), nn.GELU(), nn.Linear(d_model // 2, d_model))
        self.attn = MultiHeadAttention(d_model, num_heads, dropout=0.0)

    def forward(self, ehr_steps: torch.Tensor, ehr_hours: torch.Tensor, ehr_mask: torch.Tensor,
                start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, length, d = ehr_steps.shape
        p = start.shape[1]
        t = ehr_hours.float()[:, None, :]  # [B,1,L]
        s, e = start.float()[:, :, None], end.float()[:, :, None]  # [B,P,1]
        since, until = (t - s).expand(b, p, length), (e - t).expand(b, p, length)
        time_features = torch.stack([since, until, torch.sigmoid(since * until)], dim=-1)  # [B,P,L,3]
        query = self.time_encoder(time_features.to(self.time_encoder[0].weight.dtype)).reshape(b * p, length, d)
        keys = ehr_steps.unsqueeze(1).expand(b, p, length, d).reshape(b * p, length, d)
        bias = interval_attention_bias(ehr_hours, ehr_mask.bool(), start, end)  # [B,P,L]
        out, _ = self.attn(query, keys.to(query.dtype), bias=bias.reshape(b * p, 1, length).expand(b * p, length, length))
        has_ehr = torch.isfinite(bias).any(dim=-1)  # [B,P]
        valid = has_ehr[:, :, None] & ehr_mask.bool()[:, None, :]
        return out.reshape(b, p, length, d), valid


class RegionAwareAttention(nn.Module):
    """D_p [N,R,d] (+ the interval's EHR tokens [N,L,d] and their validity) -> LayerNorm(D_p + Attn)."""

    def __init__(self, d_model: int, num_heads: int, use_ehr: bool = True) -> None:
        super().__init__()
        self.region_proj = nn.Linear(d_model, 3 * d_model)
        self.ehr_proj = nn.Linear(d_model, 2 * d_model) if use_ehr else None
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, regions: torch.Tensor, ehr: torch.Tensor | None = None,
                ehr_valid: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.region_proj(regions).chunk(3, dim=-1)
        ignore = None
        if self.ehr_proj is not None and ehr is not None:
            ek, ev = self.ehr_proj(ehr.to(regions.dtype)).chunk(2, dim=-1)
            k, v = torch.cat([k, ek.to(k.dtype)], dim=1), torch.cat([v, ev.to(v.dtype)], dim=1)
            ignore = torch.cat([torch.zeros(regions.shape[:2], dtype=torch.bool, device=regions.device), ~ehr_valid], dim=1)
        out, _ = self.attn(q, k, v, key_padding_mask=ignore, need_weights=False)
        return self.norm(out.to(regions.dtype) + regions)


class ResidualCrossAttention(nn.Module):
    """``LayerNorm(q + MultiheadAttention(q, kv, kv))`` with a key padding mask (EHRCrossAttention, and the
    demographic/static attention of models/model.py: DiPro.forward); no dropout, as the authors'."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        kv = key_value.to(query.dtype)
        out, _ = self.attn(query, kv, kv, key_padding_mask=~key_valid, need_weights=False)
        return self.norm(query + out.to(query.dtype))


class MultiscaleMultimodalFusion(nn.Module):
    """S, D [B,P,R,d] + EHR + demographics -> task token features [B,n_tokens,d] and region attention [B,R]."""

    def __init__(self, cfg: ModelConfig, num_task_tokens: int) -> None:
        super().__init__()
        d, h, drop = cfg.d_model, cfg.num_heads, cfg.dropout
        self.use_ehr, self.local_fusion, self.global_fusion = cfg.use_ehr, cfg.local_fusion, cfg.global_fusion
        self.task_tokens = nn.Parameter(torch.randn(num_task_tokens, d))
        if cfg.use_ehr:
            self.ehr_encoder = GlobalEHREncoder(d, h, drop)
            if cfg.local_fusion:
                self.interval_encoder = IntervalEHREncoder(d, h)
            if cfg.global_fusion:
                self.ehr_cross_attention = ResidualCrossAttention(d, h)
        if cfg.local_fusion:
            # num_layers // 2 (ModelConfig requires num_layers >= 2 with EHR; CXR only keeps one layer)
            self.region_layers = nn.ModuleList(RegionAwareAttention(d, h, cfg.use_ehr)
                                               for _ in range(max(1, cfg.num_layers // 2)))
        self.fusion = EncoderLayerWithWeights(d, h, drop)
        self.demographic_encoder = nn.Sequential(nn.Linear(NUM_DEMOGRAPHICS, d), nn.ReLU(), nn.Dropout(drop))
        self.group_embedding = GroupEmbedding(d, cfg.group_k)
        self.static_attention = ResidualCrossAttention(d, h)

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
        region_valid = valid_pairs.repeat_interleave(r, dim=1)  # [B,P*R], pair-major like the reshapes
        ehr_steps = ehr_mask = None
        if self.use_ehr:
            ehr_mask = batch["ehr_mask"].bool()
            ehr_steps = self.ehr_encoder(batch["ehr_values"], ehr_mask)
        regions = dynamic
        if self.local_fusion:
            x = dynamic.reshape(b * p, r, d)
            ehr_local = ehr_local_valid = None
            if self.use_ehr:
                ehr_local, ehr_local_valid = self.interval_encoder(ehr_steps, batch["ehr_hours"], ehr_mask, start, end)
                length = ehr_local.shape[2]
                ehr_local, ehr_local_valid = ehr_local.reshape(b * p, length, d), ehr_local_valid.reshape(b * p, length)
            for layer in self.region_layers:
                x = layer(x, ehr_local, ehr_local_valid)
            regions = x.reshape(b, p, r, d)
        region_tokens = regions.reshape(b, p * r, d)

        task = self.task_tokens.unsqueeze(0).expand(b, -1, -1).to(region_tokens.dtype)
        n_task = task.shape[1]
        parts = [task, region_tokens]
        valid = [torch.ones(b, n_task, dtype=torch.bool, device=task.device), region_valid]
        if self.use_ehr:
            ehr_tokens = ehr_steps
            if self.global_fusion:
                ehr_tokens = self.ehr_cross_attention(ehr_steps.to(region_tokens.dtype), region_tokens, region_valid)
            parts.append(ehr_tokens.to(region_tokens.dtype))
            valid.append(ehr_mask)
        tokens, weights = self.fusion(torch.cat(parts, dim=1), padding_mask=~torch.cat(valid, dim=1))
        task = tokens[:, :n_task]

        on_regions = weights[:, :n_task, n_task : n_task + p * r].float().mean(dim=1).reshape(b, p, r).sum(dim=1)
        region_attention = on_regions / on_regions.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

        demo = self.demographic_encoder(batch["demographics"]).unsqueeze(1)
        static_tokens = self.group_embedding(torch.cat([static.reshape(b, p * r, d), demo.to(static.dtype)], dim=1))
        static_valid = torch.cat([region_valid, torch.ones(b, 1, dtype=torch.bool, device=region_valid.device)], dim=1)
        task = self.static_attention(task, static_tokens, static_valid)
        return task, region_attention
