"""Mixed-precision policy: which precision a run really uses, and the autocast context for it.

* ``fp16`` needs a GPU (loss scaling exists for GPU half precision); on CPU it is refused.
* ``bf16`` is used where the device supports it (every CPU with torch's bf16 kernels,
  Ampere+ GPUs); an older GPU falls back to ``fp32`` and the run says so.
* ``fp32`` is always available.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from dipro.config import Config
from data_sharding.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(cfg: Config, *, cuda_available: bool | None = None,
                      bf16_supported: bool | None = None) -> str:
    """Validate ``trainer.precision`` against the device and return the precision to use.

    Raises :class:`ConfigError` for fp16 without a GPU, or a GPU run on a machine without CUDA.
    ``cuda_available`` / ``bf16_supported`` default to what this process sees.
    """
    requested = cfg.trainer.precision
    if cfg.trainer.use_gpu:
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise ConfigError("trainer.use_gpu=true but CUDA is not available on this machine")
        if requested == "bf16":
            if bf16_supported is None:
                bf16_supported = torch.cuda.is_bf16_supported()
            if not bf16_supported:
                log.warning("trainer.precision=bf16 is not supported by this GPU: training in fp32")
                return "fp32"
        return requested
    if requested == "fp16":
        raise ConfigError(
            "trainer.precision=fp16 needs a GPU (trainer.use_gpu=true); on CPU use trainer.precision=bf16 or fp32")
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16/fp16 on ``device``; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
