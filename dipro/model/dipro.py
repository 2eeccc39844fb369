"""DiPro: region encoder -> STD (+ PAE) -> MMF -> task head, with the paper's losses.

It computes what the authors' code computes, point by point (github.com/Chenliu-svg/DiPro
models/Component.py, models/model.py, models/Base_Predictor.py), except that padding never
reaches an output or a loss; docs/FIDELITY.md lists every item.

``out = model(batch)`` takes a batch as docs/ARCHITECTURE.md §3 defines it and returns

* ``logits``: progression [B,7,3] | mortality [B] | LOS [B,4]
* ``region_attention`` [B,R] (sums to 1 per sample): the final fusion layer's attention of
  the task tokens on the region tokens, averaged over heads and task tokens, summed over the
  CXR pairs and normalised over the regions
* ``S``, ``D`` [B,P,R,d] (STD), ``S_rev``, ``D_rev``, ``region_logits``,
  ``region_logits_rev`` [B,P,R,7,3] (PAE, when enabled),
  ``pair_valid`` [B,P] and ``pair_index`` [B,P] (which of the batch's pairs, i.e. which
  ``region_labels`` row, each pair is; it differs from 0..P-1 only with ``last_cxr_only``).

``loss, terms = model.compute_loss(batch, out)``; ``model.predict_proba(out)``.

Feature-extraction hook: ``model.region_features(batch)`` runs the region encoder and STD only
(the first half of ``forward``, the same code) and returns ``F`` [B,T,R,d] (the region encoder's
output per CXR and region) with ``S``, ``D``, the masks and ``pair_index``.  ``model.feature_edit``
(default None; a plain callable, not a submodule, so it is never in the state dict) maps ``F`` to
an edited ``F`` before STD in both: ``dipro harmonize`` sets it to project acquisition coordinates
out (:class:`dipro.harmonize.rotation.AcquisitionRemoval`), with no retraining.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from data_sharding.constants import NOT_MENTIONED, NUM_LOS_BINS, NUM_REGIONS
from dipro.config import LossConfig, ModelConfig, resolve_auto
from dipro.data.augment import AUGMENT_KEYS
from data_sharding.errors import DataError
from dipro.model import losses as L
from dipro.model.heads import TASK_OUTPUTS, TaskHeads
from dipro.model.mmf import MultiscaleMultimodalFusion
from dipro.model.pae import RegionProgressionHead, pae_progression_loss, static_consistency_loss
from dipro.model.region_encoder import RegionEncoder
from dipro.model.std import SpatiotemporalDisentanglement, orthogonality_loss, pair_validity, temporal_consistency_loss

_CXR_KEYS = ("crops", "region_mask", "cxr_mask", "cxr_hours", "demographics")
_EHR_KEYS = ("ehr_values", "ehr_obs_mask", "ehr_hours", "ehr_mask")


def _sample_names(batch: Mapping[str, Any], rows: torch.Tensor) -> str:
    keys = batch.get("sample_key")
    idx = [int(i) for i in rows.nonzero().flatten()[:5]]
    names = [str(keys[i]) for i in idx] if keys is not None else [f"row {i}" for i in idx]
    return ", ".join(names)


class DiPro(nn.Module):
    """The DiPro network for one task (disease_progression | mortality | length_of_stay).

    ``label_stats`` (processed/label_stats.json) gives the class weights; None gives
    uniform placeholders to be overwritten by ``load_state_dict``.  ``load_pretrained``
    False skips reading ``model.backbone_weights`` (rebuilding from a checkpoint).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        task: str,
        label_stats: Mapping[str, Any] | None = None,
        loss_cfg: LossConfig | None = None,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        if task not in TASK_OUTPUTS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_OUTPUTS)}")
        self.cfg, self.task = model_cfg, task
        self.loss_cfg = loss_cfg or LossConfig()
        d = model_cfg.d_model
        self.region_encoder = RegionEncoder(
            model_cfg.backbone,
            d,
            model_cfg.dropout,
            weights_path=model_cfg.backbone_weights,
            channels_last=resolve_auto(model_cfg.channels_last, "cuda" if torch.cuda.is_available() else "cpu"),
            load_pretrained=load_pretrained,
            input_scaling=model_cfg.input_scaling,
            activation_checkpointing=model_cfg.activation_checkpointing,
            encoder_chunk=model_cfg.encoder_chunk,
        )
        self.std = SpatiotemporalDisentanglement(d, model_cfg.dropout, pair_reversal=model_cfg.pair_reversal)
        self.region_head = RegionProgressionHead(d) if model_cfg.use_pae else None
        num_tokens = TASK_OUTPUTS[task][0]
        self.mmf = MultiscaleMultimodalFusion(model_cfg, num_tokens)
        self.heads = TaskHeads(task, d, model_cfg.dropout)
        self.class_weights = L.ClassWeights(task, label_stats)
        self.feature_edit = None
        """Optional ``f(F [B,T,R,d], region_mask [B,T,R]) -> F`` applied to the region features before STD."""

    # ------------------------------------------------------------------ inputs
    def _check_batch(self, batch: Mapping[str, Any]) -> None:
        needed = _CXR_KEYS + (_EHR_KEYS if self.cfg.use_ehr else ())
        missing = [k for k in needed if k not in batch]
        if missing:
            raise DataError(f"batch is missing {', '.join(missing)} (docs/ARCHITECTURE.md §3)")
        crops = batch["crops"]
        if crops.ndim != 5 or crops.shape[2] != NUM_REGIONS or crops.dtype != torch.uint8:
            raise DataError(f"batch crops: expected uint8 [B,T,{NUM_REGIONS},C,C], got {crops.dtype} {tuple(crops.shape)}")
        if crops.shape[-1] != self.cfg.crop_size or crops.shape[-2] != self.cfg.crop_size:
            raise DataError(
                f"batch crops are {crops.shape[-2]}x{crops.shape[-1]} but model.crop_size is {self.cfg.crop_size} "
                "(shard with the same --crop-size or set model.crop_size)"
            )
        if not _check_values(crops):
            return
        cxr_mask = batch["cxr_mask"].bool()
        n = cxr_mask.sum(dim=1)
        prefix = torch.arange(cxr_mask.shape[1], device=cxr_mask.device)[None, :] < n[:, None]
        bad = (n < 2) | (prefix != cxr_mask).any(dim=1)
        if bool(bad.any()):
            raise DataError(
                "every sample needs >= 2 real CXRs first, then padding (cxr_mask); offending samples: "
                + _sample_names(batch, bad)
            )

    def _select_cxrs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        """(crops, region_mask, cxr_mask, cxr_hours, pair_index); ``last_cxr_only`` keeps the last two real CXRs."""
        crops, cxr_mask = batch["crops"], batch["cxr_mask"].bool()
        region_mask, hours = batch["region_mask"].bool(), batch["cxr_hours"].float()
        b, t = cxr_mask.shape
        if self.cfg.last_cxr_only and t > 2:
            n = cxr_mask.sum(dim=1)
            idx = torch.stack([n - 2, n - 1], dim=1)  # [B,2]
            rows = torch.arange(b, device=idx.device)[:, None]
            crops, region_mask, hours = crops[rows, idx], region_mask[rows, idx], hours[rows, idx]
            cxr_mask = torch.ones(b, 2, dtype=torch.bool, device=cxr_mask.device)
            return crops, region_mask, cxr_mask, hours, (n - 2)[:, None]
        pair_index = torch.arange(t - 1, device=cxr_mask.device).expand(b, -1)
        return crops, region_mask, cxr_mask, hours, pair_index

    @staticmethod
    def _augmentation(batch: Mapping[str, Any], t: int) -> tuple[torch.Tensor, ...] | None:
        """The loader's per-(sample, region) augmentation parameters broadcast over the T CXRs
        (the same transform for a region in every CXR: dipro.data.augment), or None."""
        if AUGMENT_KEYS[0] not in batch:
            return None
        missing = [k for k in AUGMENT_KEYS if k not in batch]
        if missing:
            raise DataError(f"batch has {AUGMENT_KEYS[0]} but not {', '.join(missing)} (docs/ARCHITECTURE.md §3)")
        contrast, brightness, shift = (batch[k] for k in AUGMENT_KEYS)
        b = batch["crops"].shape[0]
        if contrast.shape != (b, NUM_REGIONS) or brightness.shape != (b, NUM_REGIONS) or shift.shape != (b, NUM_REGIONS, 2):
            raise DataError(f"batch augmentation parameters: expected [B,{NUM_REGIONS}], [B,{NUM_REGIONS}], "
                            f"[B,{NUM_REGIONS},2] with B={b}, got {tuple(contrast.shape)}, {tuple(brightness.shape)}, "
                            f"{tuple(shift.shape)}")
        return (contrast[:, None].expand(b, t, NUM_REGIONS), brightness[:, None].expand(b, t, NUM_REGIONS),
                shift[:, None].expand(b, t, NUM_REGIONS, 2))

    # ----------------------------------------------------------------- forward
    def region_features(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Region encoder + STD: ``F`` [B,T,R,d] (after ``feature_edit``), ``S``, ``D`` [B,P,R,d],
        ``cxr_mask``, ``region_mask``, ``cxr_hours`` (of the CXRs used), ``pair_valid``, ``pair_index``."""
        self._check_batch(batch)
        crops, region_mask, cxr_mask, hours, pair_index = self._select_cxrs(batch)
        augment = self._augmentation(batch, crops.shape[1]) if self.training else None
        features = self.region_encoder(crops, region_mask, cxr_mask, augment)  # F [B,T,R,d]
        if self.feature_edit is not None:
            features = self.feature_edit(features, region_mask & cxr_mask[..., None])
        valid = pair_validity(cxr_mask)
        static, dynamic = self.std(features, valid)  # S, D (STD)
        return {"F": features, "S": static, "D": dynamic, "cxr_mask": cxr_mask, "region_mask": region_mask,
                "cxr_hours": hours, "pair_valid": valid, "pair_index": pair_index}

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        feats = self.region_features(batch)
        features, static, dynamic, valid = feats["F"], feats["S"], feats["D"], feats["pair_valid"]
        hours = feats["cxr_hours"]
        out: dict[str, torch.Tensor] = {"S": static, "D": dynamic, "pair_valid": valid, "pair_index": feats["pair_index"]}
        if self.region_head is not None:
            static_rev, dynamic_rev = self.std(features, valid, reverse=True)  # S~, D~ (PAE)
            out.update(
                S_rev=static_rev,
                D_rev=dynamic_rev,
                region_logits=self.region_head(dynamic),
                region_logits_rev=self.region_head(dynamic_rev),
            )
        tokens, region_attention = self.mmf(static, dynamic, valid, hours, batch)
        out["logits"] = self.heads(tokens)
        out["region_attention"] = region_attention
        return out

    # ------------------------------------------------------------------ losses
    def _task_loss(self, batch: Mapping[str, Any], logits: torch.Tensor) -> torch.Tensor:
        cw = self.class_weights
        if self.task == "disease_progression":
            y = batch["progression"].long()
            _check_labels(y, 0, NOT_MENTIONED, "progression", batch)
            return L.masked_class_weighted_ce(logits, y, cw.progression)
        if self.task == "mortality":
            y = batch["mortality"]
            _check_labels(y, 0, 1, "mortality", batch)
            return L.mortality_bce(logits, y, cw.mortality_pos_weight)
        y = batch["los_bin"].long()
        _check_labels(y, 0, NUM_LOS_BINS - 1, "los_bin", batch)
        return L.los_ce(logits, y)

    def compute_loss(self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its terms {task_ce, orth, temp, pae_ce, static, total} (all tensors)."""
        logits = out["logits"]
        zero = logits.new_zeros((), dtype=torch.float32)
        terms = {name: zero for name in L.TERM_NAMES}
        terms["task_ce"] = self._task_loss(batch, logits)
        valid = out["pair_valid"]
        if self.cfg.use_std_losses:
            terms["orth"] = orthogonality_loss(out["S"], out["D"], valid)
            terms["temp"] = temporal_consistency_loss(out["S"], valid)
        if self.region_head is not None:
            labels = batch["region_labels"].long()
            _check_labels(labels, 0, NOT_MENTIONED, "region_labels", batch)
            rows = torch.arange(labels.shape[0], device=labels.device)[:, None]
            labels = labels[rows, out["pair_index"]]  # [B,P,R,7] for the pairs the model used
            terms["pae_ce"] = pae_progression_loss(
                out["region_logits"], out["region_logits_rev"], labels, valid, self.class_weights.region
            )
            terms["static"] = static_consistency_loss(out["S"], out["S_rev"], valid)
        terms["total"] = L.total_loss(terms, self.loss_cfg)
        return terms["total"], terms

    def predict_proba(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """progression [B,7,3] softmax | mortality [B] sigmoid | LOS [B,4] softmax (float32)."""
        logits = out["logits"].float()
        if self.task == "mortality":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)


def _check_values(t: torch.Tensor) -> bool:
    """Whether to check batch values (CXR mask order, label ranges) here: only for host tensors in eager mode.

    Reading a value test back is a host synchronisation, and under ``torch.compile`` a graph break;
    on an accelerator the step must have neither.  Batches from ``dipro.data.build_loader`` were
    checked on the CPU already, sample by sample (``dipro.data.decode.decode_sample``: T >= 2 CXRs,
    labels in range; ``collate`` writes ``cxr_mask`` as a prefix), so nothing goes unchecked there;
    shapes and keys are still checked here on every device (they cost no synchronisation)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_labels(y: torch.Tensor, low: int, high: int, name: str, batch: Mapping[str, Any]) -> None:
    if not _check_values(y):
        return
    flat = y.reshape(y.shape[0], -1)
    bad = ((flat < low) | (flat > high)).any(dim=1)
    if bool(bad.any()):
        raise DataError(f"batch {name}: values must be in [{low}, {high}]; offending samples: {_sample_names(batch, bad)}")
