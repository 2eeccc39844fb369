"""The authors' state dict -> :class:`dipro.model.DiPro`'s, key by key (the one home of this mapping).

The authors' LightningModule (github.com/Chenliu-svg/DiPro at 34f8fff, ``models/model.py: DiPro``,
``models/Component.py``) and this project's model hold the same parameters under other names.
:data:`RENAMES` moves whole sub-modules; :data:`TRANSFORMS` are the keys whose tensors change
shape; :data:`UNUSED` are the authors' keys this project has no use for, each with the reason.
:func:`to_project_state_dict` applies them and checks that every authors' key was consumed or is
listed as unused, and that the result is exactly the model's state dict (names and shapes), so a
file with a key more, a key less or another shape is refused with one line naming the key.

Transforms (each the same function of the input, up to float rounding):

* ``long_cxr_encoder.resnet.conv1.weight`` [64,3,7,7] -> [64,1,7,7] summed over RGB: the authors feed
  the gray crop in all three channels (``Image.convert('RGB')``), and a convolution of (x, x, x) is
  the convolution of x with the summed kernel (:mod:`dipro.model.region_encoder`).
* ``long_multi_modal_fuison.ehr_local_encoder.attn.in_proj_{weight,bias}`` [3d,d] / [3d] ->
  ``q_proj``, ``k_proj``, ``v_proj`` (``nn.MultiheadAttention`` packs them in that order; this
  project's interval attention is written out because it needs finite rows for empty intervals).
* ``long_multi_modal_fuison.cls_token`` [1,n,d] -> ``mmf.task_tokens`` [n,d];
  ``...ehr_global_encoder.cls_token`` [1,d] -> ``mmf.ehr_encoder.cls_token`` [1,1,d].
* ``loss.pos_weight`` [1] (mortality only: ``Base_Predictor.setup``'s ``BCEWithLogitsLoss(pos_weight=
  n_pos / n)`` is a registered sub-module) -> ``class_weights.mortality_pos_weight``: the weight the
  authors trained with.  The other class weights are not in their files (they live in plain Python
  lists), so they come from the shards' ``label_stats.json``.

What the shapes say (:func:`describe`): the task (task tokens x outputs per token: 7 x 3
progression, 1 x 1 mortality, 1 x 4 length of stay), ``d_model`` (``feature_adapter.0.weight``),
the authors' ``num_transformer_layers // 2`` (region-aware attention layers), the group count K
(``group_embedding.W``), the crop size (``learnable_pad.pad_value`` [10, 3, C, C]: 224 in their
files), the EHR features (38) and demographics (17) read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from data_sharding.constants import NUM_DEMOGRAPHICS, NUM_EHR_VARIABLES, NUM_REGIONS
from data_sharding.errors import ConfigError, DataError

_A_CXR = "long_cxr_encoder."
_A_MMF = "long_multi_modal_fuison."  # sic: the authors' attribute name

RENAMES: tuple[tuple[str, str], ...] = (
    # region encoder and STD/PAE (models/Component.py: LongitudinalCXRModel)
    (_A_CXR + "resnet.", "region_encoder.backbone."),
    (_A_CXR + "feature_adapter.", "region_encoder.proj."),
    (_A_CXR + "static_proj.proj_net.", "std.f_s.net."),
    (_A_CXR + "dynamic_proj.proj_net.", "std.f_d.net."),
    (_A_CXR + "PAE_output_layer.", "region_head.heads."),
    # MMF (models/Component.py: MultisacleMultimodalFusion, EHRTransformer_cls, EHRIntervalEncoder, ...)
    (_A_MMF + "ehr_global_encoder.input_proj.", "mmf.ehr_encoder.input_proj."),
    (_A_MMF + "ehr_global_encoder.transformer.", "mmf.ehr_encoder.encoder."),
    (_A_MMF + "ehr_local_encoder.time_encoder.", "mmf.interval_encoder.time_encoder."),
    (_A_MMF + "ehr_local_encoder.attn.out_proj.", "mmf.interval_encoder.attn.out_proj."),
    (_A_MMF + "region_attn.", "mmf.region_layers."),
    (_A_MMF + "ehr_cross_attn.stage1_attn_CXR_EHR.", "mmf.ehr_cross_attention.attn."),
    (_A_MMF + "ehr_cross_attn.norm1_CXR_EHR.", "mmf.ehr_cross_attention.norm."),
    (_A_MMF + "fusion.layers.0.", "mmf.fusion."),  # configs/DiPro.yaml: num_fusion_layers 1
    # static/demographic fusion and heads (models/model.py: DiPro)
    ("group_embedding.", "mmf.group_embedding."),
    ("demographic_encoder.", "mmf.demographic_encoder."),
    ("Demographic_attn.", "mmf.static_attention.attn."),
    ("Demographic_norm.", "mmf.static_attention.norm."),
    ("output_layer.", "heads.heads."),
)
"""(authors' prefix, this project's prefix): the rest of the key and the tensor are unchanged."""

UNUSED: dict[str, str] = {
    "learnable_pad.pad_value": "the learnable pixels of padded CXRs: this project masks padding instead "
                               "(docs/FIDELITY.md, padded CXRs); its shape gives the crop size",
    _A_CXR + "STD_Constraint.temperature": "a parameter no loss or output of the authors' code reads",
    _A_MMF + "ehr_local_encoder.sigma": "passed to get_time_weights, which ignores it",
    _A_MMF + "ehr_global_encoder.pos_encoder.pe": "the fixed sinusoidal table; this project computes the same "
                                                  "values (dipro/model/layers.py: index_positional_encoding)",
    "loss_batch.pos_weight": "a copy of loss.pos_weight for the per-sample loss the authors never use in training",
}
"""Authors' keys this project does not use, and why (listed by name in every import report)."""


def _sum_rgb(t: torch.Tensor) -> torch.Tensor:
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"expected an RGB stem [64,3,7,7], got {list(t.shape)}")
    return t.sum(dim=1, keepdim=True)


def _split_in_proj(name: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def split(t: torch.Tensor) -> dict[str, torch.Tensor]:
        if t.shape[0] % 3:
            raise ValueError(f"expected a packed q/k/v projection [3d, ...], got {list(t.shape)}")
        q, k, v = (part.clone() for part in t.chunk(3, dim=0))  # own storage, not views of the packed tensor
        base = "mmf.interval_encoder.attn."
        return {f"{base}q_proj.{name}": q, f"{base}k_proj.{name}": k, f"{base}v_proj.{name}": v}
    return split


def _reshape(key: str, ndim: int, shape: Callable[[torch.Tensor], tuple[int, ...]]) -> Callable:
    def fn(t: torch.Tensor) -> dict[str, torch.Tensor]:
        if t.ndim != ndim:
            raise ValueError(f"expected {ndim} dimensions, got {list(t.shape)}")
        return {key: t.reshape(shape(t))}
    return fn


TRANSFORMS: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
    _A_CXR + "resnet.conv1.weight": lambda t: {"region_encoder.backbone.conv1.weight": _sum_rgb(t)},
    _A_MMF + "ehr_local_encoder.attn.in_proj_weight": _split_in_proj("weight"),
    _A_MMF + "ehr_local_encoder.attn.in_proj_bias": _split_in_proj("bias"),
    _A_MMF + "cls_token": _reshape("mmf.task_tokens", 3, lambda t: (t.shape[1], t.shape[2])),
    _A_MMF + "ehr_global_encoder.cls_token": _reshape("mmf.ehr_encoder.cls_token", 2, lambda t: (1, 1, t.shape[-1])),
    "loss.pos_weight": lambda t: {"class_weights.mortality_pos_weight": t.reshape(1)},
}
"""Authors' keys whose tensors change shape (module docstring), -> {this project's key: tensor}."""

FROM_LABEL_STATS = ("class_weights.progression", "class_weights.region", "class_weights.mortality_pos_weight")
"""This project's keys the authors' files do not hold (or hold only for mortality): the class
weights, rebuilt from the shards' ``label_stats.json`` as in training."""

_TASK_BY_OUTPUTS = {(7, 3): "disease_progression", (1, 1): "mortality", (1, 4): "length_of_stay"}


@dataclass
class AuthorsShape:
    """What an authors' state dict says about the model that wrote it."""

    task: str
    d_model: int
    region_layers: int
    """``num_transformer_layers // 2`` (RegionAwareAttention layers)."""
    group_k: int
    crop_size: int
    ehr_features: int
    demographics: int
    fusion_layers: int
    pos_weight: float | None = None
    """The mortality BCE pos_weight the authors trained with (mortality files only)."""


def _get(sd: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise DataError(f"{where}: key {key!r} is missing: not a checkpoint of the authors' DiPro "
                        "(models/model.py), or a damaged one")
    return sd[key]


def describe(sd: Mapping[str, torch.Tensor], where: str) -> AuthorsShape:
    """Task, widths and counts from the tensor shapes (a one-line DataError naming the key when odd)."""
    tokens = _get(sd, _A_MMF + "cls_token", where)
    head = _get(sd, "output_layer.0.3.weight", where)
    if tokens.ndim != 3:
        raise DataError(f"{where}: {_A_MMF}cls_token has shape {list(tokens.shape)}, expected [1, tokens, d_model]")
    task = _TASK_BY_OUTPUTS.get((int(tokens.shape[1]), int(head.shape[0])))
    if task is None:
        raise DataError(f"{where}: {tokens.shape[1]} task tokens with {head.shape[0]} outputs each "
                        f"({_A_MMF}cls_token, output_layer.0.3.weight) is none of the authors' tasks "
                        "(7 x 3 progression, 1 x 1 mortality, 1 x 4 length of stay)")
    pad = _get(sd, "learnable_pad.pad_value", where)
    if pad.ndim != 4 or pad.shape[0] != NUM_REGIONS or pad.shape[1] != 3 or pad.shape[2] != pad.shape[3]:
        raise DataError(f"learnable_pad.pad_value has shape {list(pad.shape)} in {where}, expected "
                        f"[{NUM_REGIONS}, 3, C, C] (C = crop size)")
    region_layers = {int(m.group(1)) for k in sd if (m := re.match(re.escape(_A_MMF) + r"region_attn\.(\d+)\.", k))}
    fusion_layers = {int(m.group(1)) for k in sd if (m := re.match(re.escape(_A_MMF) + r"fusion\.layers\.(\d+)\.", k))}
    pos_weight = sd.get("loss.pos_weight")
    return AuthorsShape(
        task=task,
        d_model=int(_get(sd, _A_CXR + "feature_adapter.0.weight", where).shape[0]),
        region_layers=len(region_layers),
        group_k=int(_get(sd, "group_embedding.W", where).shape[1]),
        crop_size=int(pad.shape[-1]),
        ehr_features=int(_get(sd, _A_MMF + "ehr_global_encoder.input_proj.0.weight", where).shape[1]),
        demographics=int(_get(sd, "demographic_encoder.0.weight", where).shape[1]),
        fusion_layers=len(fusion_layers),
        pos_weight=float(pos_weight.reshape(-1)[0]) if pos_weight is not None and pos_weight.numel() == 1 else None,
    )


def check_against_config(shape: AuthorsShape, model_cfg, where: str) -> None:
    """The shapes agree with ``model_cfg`` (a :class:`dipro.config.ModelConfig`); else one line naming the key."""
    if model_cfg.backbone != "resnet50":
        raise ConfigError(f"the authors' region encoder is a ResNet-50 (models/Component.py: LongitudinalCXRModel); "
                          f"the config says model.backbone={model_cfg.backbone}: set model.backbone=resnet50")
    if model_cfg.d_model != shape.d_model:
        raise ConfigError(f"{where}: feature_adapter.0.weight says d_model {shape.d_model} but the config says "
                          f"model.d_model={model_cfg.d_model}; set model.d_model={shape.d_model}")
    if model_cfg.group_k != shape.group_k:
        raise ConfigError(f"{where}: group_embedding.W says {shape.group_k} groups but the config says "
                          f"model.group_k={model_cfg.group_k}; set model.group_k={shape.group_k}")
    if model_cfg.num_layers // 2 != shape.region_layers:
        raise ConfigError(f"{where}: {_A_MMF}region_attn.* has {shape.region_layers} layer(s) (the authors' "
                          f"num_transformer_layers {2 * shape.region_layers}) but model.num_layers="
                          f"{model_cfg.num_layers} builds {model_cfg.num_layers // 2}; set "
                          f"model.num_layers={2 * shape.region_layers}")
    if model_cfg.num_heads != 8:
        raise ConfigError(f"the authors' attention layers have 8 heads (hard-coded in models/Component.py); "
                          f"the config says model.num_heads={model_cfg.num_heads}: set model.num_heads=8")
    if shape.fusion_layers != 1:
        raise DataError(f"{where} has {shape.fusion_layers} final fusion layers ({_A_MMF}fusion.layers.*); this "
                        "project builds one, as the authors' configs/DiPro.yaml (num_fusion_layers: 1)")
    if shape.ehr_features != NUM_EHR_VARIABLES or shape.demographics != NUM_DEMOGRAPHICS:
        raise DataError(f"{where} reads {shape.ehr_features} EHR features and {shape.demographics} demographics "
                        f"(ehr_global_encoder.input_proj.0.weight, demographic_encoder.0.weight); this project "
                        f"has {NUM_EHR_VARIABLES} and {NUM_DEMOGRAPHICS}")
    if not (model_cfg.use_ehr and model_cfg.use_pae and model_cfg.local_fusion and model_cfg.global_fusion):
        raise ConfigError("the authors' model has every module: model.use_ehr, model.use_pae, model.local_fusion "
                          "and model.global_fusion must be true to import it")


@dataclass
class MappingReport:
    """How every authors' key was used."""

    renamed: int = 0
    transformed: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    """Authors' key -> why it is not used (the keys of :data:`UNUSED` the file holds)."""
    from_label_stats: list[str] = field(default_factory=list)


def _rename(key: str) -> str | None:
    for theirs, ours in RENAMES:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return None


def to_project_state_dict(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                          where: str) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """Map the authors' ``sd`` onto ``target`` (the state dict of the DiPro it is to load into).

    Every key of ``sd`` is renamed, transformed or in :data:`UNUSED`; the result has every key of
    ``target`` (class weights the file lacks taken from ``target``, i.e. from ``label_stats.json``)
    with ``target``'s shape and dtype (``target`` may be on the meta device: only its names, shapes and
dtypes are read, except the class weights it supplies).  Anything else is a one-line DataError naming the key.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    report = MappingReport()
    for key, tensor in sd.items():
        if key in UNUSED:
            report.unused[key] = UNUSED[key]
            continue
        if key in TRANSFORMS:
            try:
                mapped = TRANSFORMS[key](tensor)
            except ValueError as exc:
                raise DataError(f"{where}: {key}: {exc}") from None
            report.transformed.append(key)
        else:
            ours = _rename(key)
            if ours is None:
                raise DataError(f"{where}: key {key!r} is not one the authors' DiPro holds (models/model.py) and "
                                "this project cannot place it: refusing to drop weights silently")
            mapped = {ours: tensor}
            report.renamed += 1
        for ours, value in mapped.items():
            if ours in out:
                raise DataError(f"{where}: {key} and {origin[ours]} both map to {ours}")
            out[ours], origin[ours] = value, key
    for ours, value in out.items():
        if ours not in target:
            raise DataError(f"{where}: key {origin[ours]!r} (-> {ours}) has no place in this project's model for "
                            "the config's task and sizes: refusing to drop weights silently")
        want = target[ours]
        if tuple(value.shape) != tuple(want.shape):
            raise DataError(f"{where}: {origin[ours]} has shape {list(value.shape)} but this project's {ours} has "
                            f"{list(want.shape)}")
        out[ours] = value.to(want.dtype)
    for ours in target:
        if ours in out:
            continue
        if ours in FROM_LABEL_STATS:
            out[ours] = target[ours].clone()
            report.from_label_stats.append(ours)
            continue
        raise DataError(f"{where}: this project's {ours} has no counterpart in the file (an authors' key is missing)")
    return out, report
