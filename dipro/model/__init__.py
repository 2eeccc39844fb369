"""The DiPro model (STD, PAE, MMF) and its factory.

    from dipro.model import DiPro, build_model
    model = build_model(cfg, label_stats)      # cfg: dipro.config.Config
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dipro.config import Config
from dipro.model.dipro import DiPro

__all__ = ["DiPro", "build_model"]


def build_model(cfg: Config, label_stats: Mapping[str, Any] | None, load_pretrained: bool = True) -> DiPro:
    """DiPro for ``cfg.task`` with ``cfg.model`` / ``cfg.loss``; class weights from ``label_stats``.

    ``load_pretrained=False`` skips ``model.backbone_weights`` and ``model.init_from`` (when a state dict
    follows). With ``model.init_from`` the network starts from that checkpoint's weights (fine-tuning;
    :func:`dipro.train.checkpoint.init_from_checkpoint`) and ``model.backbone_weights`` is not read.
    """
    init_from = cfg.model.init_from if load_pretrained else None
    model = DiPro(cfg.model, cfg.task, label_stats=label_stats, loss_cfg=cfg.loss,
                  load_pretrained=load_pretrained and not init_from)
    if init_from:
        from dipro.train.checkpoint import init_from_checkpoint

        init_from_checkpoint(model, cfg)
    return model
