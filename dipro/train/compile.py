"""``torch.compile`` of the training step (``model.compile``) and what it needs.

The compiled region is :class:`dipro.train.strategies.ModelWithLoss`: forward and loss in one
graph.  The step has no graph break and no host synchronisation:

* the region encoder and STD select the real CXRs / pairs by boolean masks, whose row
  counts depend on the data: traced as unbacked sizes
  (``capture_dynamic_output_shape_ops``), with ``torch._check`` hints that they are
  BatchNorm-sized (every sample has >= 2 CXRs, checked by the loader);
* value checks of the batch (CXR mask order, label ranges) run on the CPU in the loader
  (``dipro.data.decode``), not in the compiled step (``dipro.model.dipro._check_values``);
* masked means clamp their count on the device instead of testing it (``dipro.model.std.masked_mean``).

The module is compiled in place (``nn.Module.compile``: parameter names and state dicts do
not change) before DDP or DeepSpeed wrap it, so the same compiled module runs under both
(DDP then reduces gradients after the compiled backward; DeepSpeed ZeRO-1/2 hook the
gradients as they accumulate).  Compilation happens at the first call; the loop times the
first optimizer step and prints and logs it (``compile_time_s``).
"""
from __future__ import annotations

import torch
from torch import nn

from dipro.config import Config, resolve_auto


def compile_enabled(cfg: Config, device: torch.device) -> bool:
    """``model.compile`` for this device: auto = on for CUDA, off on CPU, and off under DeepSpeed ZeRO-3
    (whose parameter gathering in module hooks is not traced; ``true`` with ZeRO-3 is a config error)."""
    if cfg.model.compile == "auto" and cfg.zero3:
        return False
    return resolve_auto(cfg.model.compile, device.type)


def configure_dynamo() -> None:
    """Trace data-dependent row counts (boolean-mask selection) instead of breaking the graph, and keep the
    convolutions in the memory format the model chose (``model.channels_last``): inductor's own layout
    optimisation mispredicts a convolution's output strides when its batch size is data-dependent
    (torch 2.14: a stride assertion at run time), and channels-last is already set explicitly."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True
    torch._inductor.config.layout_optimization = False


def compile_in_place(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile ``module``'s calls in place (its forward, hooks included) with ``backend``."""
    configure_dynamo()
    module.compile(backend=backend)
    return module
