"""Region encoder: F^r_t = adapter(backbone(crop^r_t)), one feature per region crop per CXR.

A torchvision ResNet (ResNet-50 in the paper; 34/18 for smaller runs) or a 4-layer
CNN ("tiny", for tests and CPU demos) with a 1-channel input.  Pretrained weights
(``model.backbone_weights``): ``imagenet`` = torchvision's IMAGENET1K_V1 file of the
backbone, read from the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``) and
downloaded there once when missing, as torchvision does; or a local file: a plain state
dict (or one under ``"state_dict"``/``"model"``) of the torchvision architecture.  A
3-channel ``conv1`` is summed over RGB, which makes a grayscale image x through the
1-channel stem exactly the RGB image (x, x, x) through the original stem -- what the
authors feed (``Image.convert('RGB')``).  Without weights the backbone starts random
and a WARNING says so.

Input scaling (``model.input_scaling``): ``unit`` = pixel / 255 (the authors' ``ToTensor``
with no mean/std, github.com/Chenliu-svg/DiPro dataset_module/dipro_dataset.py) or
``imagenet`` = standardised with the ImageNet statistics averaged over RGB.

As the authors (github.com/Chenliu-svg/DiPro models/Component.py: LongitudinalCXRModel): the
adapter is Linear(feat, d)-BatchNorm1d-ReLU-Dropout, and every crop of a real CXR goes through
the backbone, a missing region being an all-black crop as in the authors' loader.  Padded CXRs
are not encoded: their features are zeros that no real output ever reads (every pair they
belong to is masked downstream), which is why the authors' learnable pixel padding has no
counterpart here (docs/FIDELITY.md); so padding changes neither the features of real crops
nor BatchNorm statistics.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from dipro.data.augment import apply_augmentation
from data_sharding.errors import ConfigError, DataError, UserError

log = logging.getLogger(__name__)

# ImageNet statistics averaged over RGB (the grayscale image is fed as (x, x, x)).
GRAY_MEAN = (0.485 + 0.456 + 0.406) / 3
GRAY_STD = (0.229 + 0.224 + 0.225) / 3

_FEATURE_DIMS = {"resnet50": 2048, "resnet34": 512, "resnet18": 512, "tiny": 64}
# torchvision weight enums for ``model.backbone_weights=imagenet`` (IMAGENET1K_V1: what resnet50(pretrained=True) loads).
_IMAGENET_WEIGHTS = {"resnet50": "ResNet50_Weights", "resnet34": "ResNet34_Weights", "resnet18": "ResNet18_Weights"}
IMAGENET = "imagenet"


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


def imagenet_weights_file(backbone: str) -> tuple[str, Path]:
    """(url, cache path) of torchvision's IMAGENET1K_V1 weights of ``backbone``: the file torchvision's
    weights API reads from (and downloads into) ``<torch.hub.get_dir()>/checkpoints``."""
    if backbone not in _IMAGENET_WEIGHTS:
        raise ConfigError(f"model.backbone_weights=imagenet: there are no ImageNet weights for backbone {backbone!r}")
    import torchvision

    url = getattr(torchvision.models, _IMAGENET_WEIGHTS[backbone]).IMAGENET1K_V1.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def resolve_backbone_weights(backbone: str, spec: str | None) -> Path | None:
    """The local file ``model.backbone_weights`` stands for (None = random init).

    ``imagenet``: the torch hub cache file, downloaded once (checked against the hash in its
    name, as torchvision does) when it is missing; without network a :class:`UserError`
    says where to put the file.  Anything else is a local path (checked when loaded).
    """
    if not spec:
        return None
    if spec != IMAGENET:
        return Path(spec)
    url, path = imagenet_weights_file(backbone)
    if path.is_file():
        return path
    log.warning("downloading the ImageNet weights of %s from %s to %s", backbone, url, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(path.name)
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=False)
    except Exception as exc:  # noqa: BLE001 - no network, proxy, disk: all say the same thing to the user
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(
            f"model.backbone_weights=imagenet: {path} is missing and downloading {url} failed ({reason}); "
            f"copy {path.name} into {path.parent} (the torch hub cache, $TORCH_HOME/hub/checkpoints) "
            f"or set model.backbone_weights=/path/to/{path.name}") from None
    return path


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


def backbone_stages(backbone: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(stages, head) of a backbone for activation checkpointing: the ResNet stem and its four
    stages (layer1-4) then average pooling; the tiny CNN's four conv-BN-ReLU blocks then pooling.
    Built on the fly (no module is registered twice)."""
    if isinstance(backbone, TinyCNN):
        layers = list(backbone.features)
        return [nn.Sequential(*layers[i:i + 3]) for i in range(0, len(layers), 3)], nn.Sequential(
            backbone.pool, nn.Flatten(1))
    stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
    return [stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4], nn.Sequential(
        backbone.avgpool, nn.Flatten(1))


class _FrozenBatchNormStats:
    """During a checkpointed segment's recomputation (eager backward), its BatchNorm layers normalise
    with the batch statistics as in the forward pass but do not update their running statistics a
    second time: momentum 0 keeps running mean/var as they are (x (1 - 0) + batch x 0), and the
    batch counter is put back.  The same operations run, so the same tensors are saved."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and m.track_running_stats and m.momentum is not None]

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, (momentum, count) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` as one non-reentrant ``torch.utils.checkpoint`` segment: only ``x`` is kept for the
    backward pass, which recomputes the segment.  Eagerly, the recomputation leaves BatchNorm running
    statistics alone (:class:`_FrozenBatchNormStats`); a compiled graph recomputes values only anyway."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    if torch.compiler.is_compiling():
        return checkpoint(module, x, use_reentrant=False)
    return checkpoint(module, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _FrozenBatchNormStats(module)))


def run_checkpointed(stages: list[nn.Module], head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(stages[-1](...stages[0](x)))`` keeping only each stage's input for the backward pass
    (one :func:`checkpointed` segment per stage); the loss, the gradients and the BatchNorm running
    statistics are those of the plain forward."""
    for stage in stages:
        x = checkpointed(stage, x)
    return head(x)


@torch.compiler.disable
def run_in_chunks(backbone: nn.Module, x: torch.Tensor, chunk: int, checkpointing: bool) -> torch.Tensor:
    """``backbone(x)`` over ``chunk`` crops at a time (``model.encoder_chunk``), concatenated.

    With ``checkpointing`` each chunk is one checkpointed segment through the whole backbone: the
    backward pass keeps only the chunk's input and pooled output and recomputes one chunk at a time,
    so the backbone's activation memory is one chunk's instead of every crop's.  Without gradients
    (evaluation) the result is exactly ``backbone(x)``.  In training the backbone's BatchNorm layers
    normalise each chunk with its own statistics and update their running statistics once per chunk,
    as more, smaller batches would (the documented price of ``model.encoder_chunk``).

    Run eagerly under ``torch.compile`` (the number of chunks depends on the data): the compiled
    step has one graph break here when the switch is on, none when it is off.
    """
    n = x.shape[0]
    sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    if len(sizes) > 1 and sizes[-1] == 1:  # a one-crop chunk would leave BatchNorm a batch of 1
        sizes[-2:] = [sizes[-2] + 1]
    run = (lambda part: checkpointed(backbone, part)) if checkpointing else backbone
    return torch.cat([run(part) for part in x.split(sizes)])


class RegionEncoder(nn.Module):
    """uint8 crops [B,T,R,C,C] -> region features F [B,T,R,d_model] (zeros for padded CXRs).

    ``forward(crops, region_mask, cxr_mask, augment)``: ``region_mask`` [B,T,R] (True = the
    region was cropped), ``cxr_mask`` [B,T] (True = real CXR).  ``input_scaling`` as in
    :class:`dipro.config.ModelConfig`; ``activation_checkpointing`` recomputes the backbone's
    stages in the backward pass (:func:`run_checkpointed`); ``encoder_chunk`` > 0 runs the backbone
    over that many crops at a time (:func:`run_in_chunks`).
    """

    def __init__(
        self,
        backbone: str,
        d_model: int,
        dropout: float,
        weights_path: str | None = None,
        channels_last: bool = False,
        load_pretrained: bool = True,
        input_scaling: str = "unit",
        activation_checkpointing: bool = False,
        encoder_chunk: int = 0,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.encoder_chunk = encoder_chunk
        if input_scaling not in ("unit", "imagenet"):
            raise ValueError(f"unknown input scaling {input_scaling!r}")
        self.input_scaling = input_scaling
        self.backbone, feat_dim = build_backbone(backbone)
        path = resolve_backbone_weights(backbone, weights_path) if load_pretrained else None
        if path is not None:
            load_backbone_weights(self.backbone, path)
        elif load_pretrained:
            log.warning("model.backbone_weights is not set: the %s backbone starts from random initialisation", backbone)
        self.channels_last = channels_last
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        # github.com/Chenliu-svg/DiPro models/Component.py: LongitudinalCXRModel.feature_adapter
        self.proj = nn.Sequential(nn.Linear(feat_dim, d_model), nn.BatchNorm1d(d_model), nn.ReLU(), nn.Dropout(dropout))

    def normalise(self, crops: torch.Tensor, augment: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """uint8 [N,C,C] -> float [N,1,C,C], scaled to [0,1], augmented when ``augment`` gives the
        per-crop (contrast [N], brightness [N], shift [N,2]) of :mod:`dipro.data.augment`, and
        standardised with the gray ImageNet stats when ``input_scaling`` is ``imagenet``."""
        x = crops.float().div_(255.0)
        if augment is not None:
            x = apply_augmentation(x, *augment)
        x = x.unsqueeze(1)
        if self.input_scaling == "imagenet":
            x = (x - GRAY_MEAN) / GRAY_STD
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, crops: torch.Tensor, region_mask: torch.Tensor, cxr_mask: torch.Tensor,
                augment: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Every crop of a real CXR through backbone and adapter (a missing region is a black crop,
        kept black after augmentation); zeros for padded CXRs.  ``augment``: per-crop transform
        parameters shaped [B,T,R] / [B,T,R,2] (training only)."""
        b, t, r = region_mask.shape
        real_cxr = cxr_mask.bool()[:, :, None].expand(b, t, r)
        present = region_mask.bool() & real_cxr
        params = None if augment is None else tuple(p[real_cxr] for p in augment)
        x = self.normalise(crops[real_cxr], params)  # [N,1,C,C]
        # >= 2 real CXRs per sample (checked by the loader): N >= 2R, for torch.compile's data-dependent shape
        torch._check(x.shape[0] >= 2 * r)
        if params is not None:  # the jitter would lift a missing region's black crop: keep it black
            black = 0.0 if self.input_scaling == "unit" else -GRAY_MEAN / GRAY_STD  # a normalised black pixel
            x = torch.where(present[real_cxr].view(-1, 1, 1, 1), x, torch.full_like(x, black))
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        if self.encoder_chunk:
            pooled = run_in_chunks(self.backbone, x, self.encoder_chunk, checkpointing)
        elif checkpointing:
            pooled = run_checkpointed(*backbone_stages(self.backbone), x)
        else:
            pooled = self.backbone(x)
        feats = self.proj(pooled)  # [N,d]
        out = feats.new_zeros(*real_cxr.shape, feats.shape[-1])
        out[real_cxr] = feats
        return out
