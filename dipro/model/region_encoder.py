"""Region encoder: F^r_t = proj(backbone(crop^r_t)), one feature per region crop per CXR.

A torchvision ResNet (ResNet-50 in the paper; 34/18 for smaller runs) or a 4-layer
CNN ("tiny", for tests and CPU demos) with a 1-channel input.  Pretrained weights come
only from a local file (``model.backbone_weights``): a plain state dict (or one under
``"state_dict"``/``"model"``) of the torchvision architecture; a 3-channel ``conv1`` is
summed over RGB, which makes a grayscale image x equivalent to the RGB image (x, x, x).
Without a file the backbone starts random and a WARNING says so.

Only real crops go through the backbone; missing regions and padded CXRs get a
learnable per-region padding embedding instead (never zeros that look like tissue),
so padding changes neither the features of real crops nor BatchNorm statistics.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from dipro.data.augment import apply_augmentation
from data_sharding.errors import DataError

log = logging.getLogger(__name__)

# ImageNet statistics averaged over RGB (the grayscale image is fed as (x, x, x)).
GRAY_MEAN = (0.485 + 0.456 + 0.406) / 3
GRAY_STD = (0.229 + 0.224 + 0.225) / 3

_FEATURE_DIMS = {"resnet50": 2048, "resnet34": 512, "resnet18": 512, "tiny": 64}


class TinyCNN(nn.Module):
    """Four stride-2 conv-BN-ReLU layers and global average pooling (64-d output)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """A random-init backbone with a 1-channel stem and no classifier; returns (module, feature dim)."""
    if name == "tiny":
        return TinyCNN(), _FEATURE_DIMS["tiny"]
    if name not in ("resnet50", "resnet34", "resnet18"):
        raise ValueError(f"unknown backbone {name!r}")
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net, _FEATURE_DIMS[name]


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local torchvision-style state dict into a 1-channel backbone.

    Raises :class:`DataError` naming the file when it cannot be read or its keys or
    shapes do not match the architecture.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"model.backbone_weights: file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/format error is the file's fault
        raise DataError(f"model.backbone_weights: cannot read {p} as a torch state dict ({exc})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"model.backbone_weights: {p} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    for key in ("conv1.weight", "features.0.weight"):
        w = state.get(key)
        if w is not None and w.ndim == 4 and w.shape[1] == 3:
            state[key] = w.sum(dim=1, keepdim=True)  # RGB stem -> grayscale stem
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if bad_shape:
            parts.append(
                "shape mismatch " + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad_shape[:3])
            )
        raise DataError(f"model.backbone_weights: {p} does not match the backbone ({'; '.join(parts)})")
    backbone.load_state_dict(state, strict=True)
    log.info("loaded backbone weights from %s", p)


class RegionEncoder(nn.Module):
    """uint8 crops [B,T,R,C,C] + region mask [B,T,R] -> region features F [B,T,R,d_model]."""

    def __init__(
        self,
        backbone: str,
        d_model: int,
        num_regions: int,
        dropout: float,
        weights_path: str | None = None,
        channels_last: bool = False,
        load_pretrained: bool = True,
    ) -> None:
        super().__init__()
        self.backbone, feat_dim = build_backbone(backbone)
        if weights_path and load_pretrained:
            load_backbone_weights(self.backbone, weights_path)
        elif load_pretrained:
            log.warning("model.backbone_weights is not set: the %s backbone starts from random initialisation", backbone)
        self.channels_last = channels_last
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.proj = nn.Sequential(nn.Linear(feat_dim, d_model), nn.LayerNorm(d_model), nn.GELU(), nn.Dropout(dropout))
        # Learnable padding for missing regions / padded CXRs (one vector per region).
        self.pad_embedding = nn.Parameter(torch.randn(num_regions, d_model) * 0.02)

    def normalise(self, crops: torch.Tensor, augment: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """uint8 [N,C,C] -> float [N,1,C,C], scaled to [0,1], augmented when ``augment`` gives the
        per-crop (contrast [N], brightness [N], shift [N,2]) of :mod:`dipro.data.augment`, and
        standardised with the gray ImageNet stats."""
        x = crops.float().div_(255.0)
        if augment is not None:
            x = apply_augmentation(x, *augment)
        x = (x.unsqueeze(1) - GRAY_MEAN) / GRAY_STD
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, crops: torch.Tensor, present: torch.Tensor,
                augment: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``augment``: per-crop transform parameters shaped [B,T,R] / [B,T,R,2] (training only)."""
        b, t, r = present.shape
        pad = self.pad_embedding.expand(b, t, r, -1)
        if not bool(present.any()):
            return pad.clone()
        params = None if augment is None else tuple(p[present] for p in augment)
        feats = self.proj(self.backbone(self.normalise(crops[present], params)))  # real crops only: [N,d]
        pad = pad.to(feats.dtype)
        out = pad.clone()
        out[present] = feats
        # torch.where keeps pad_embedding in the graph even when no region is missing
        # (DDP without find_unused_parameters needs every parameter used every step).
        return torch.where(present.unsqueeze(-1), out, pad)
