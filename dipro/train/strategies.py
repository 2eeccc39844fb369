"""Distribution strategies behind one small interface: DDP or DeepSpeed ZeRO.

The loop only talks to :class:`Strategy`:

    out, loss, terms = strategy.forward(batch)     # autocast inside
    strategy.backward(loss, boundary)              # boundary = last micro batch of an accumulation window
    grad_norm = strategy.step()                    # at boundaries only; a tensor or float (read it when logging)
    strategy.consolidated_state_dict()             # plain float32 state dict (collective under ZeRO)
    strategy.save_state(dir) / load_state(dir)     # everything needed to continue exactly

* Both: ``model.compile`` compiles forward + loss in place before the wrapper is built
  (:mod:`dipro.train.compile`); channels-last convolutions per ``model.channels_last``.
* DDP: NCCL on GPU, gloo on CPU or on shared GPUs (the process group is Ray's); ``torch.autocast`` for
  bf16/fp16, a ``GradScaler`` for fp16 only; gradients synchronised on the last micro
  batch of each accumulation window (``no_sync`` before it); clipping by global norm.
* DeepSpeed: the engine config is generated from the run config by
  :func:`deepspeed_config` (never a second hand-written file); a ``torch.optim.AdamW``
  instance with ``zero_allow_untested_optimizer`` (no fused-op compilation); DeepSpeed's
  own checkpoint format under ``deepspeed/`` for resume.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dipro.config import Config
from data_sharding.errors import ConfigError
from dipro.train import optim as optim_mod
from dipro.train.compile import compile_enabled, compile_in_place
from dipro.train.precision import autocast

TRAIN_STATE_FILE = "train_state.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


class ModelWithLoss(nn.Module):
    """Forward and loss in one module call, so DDP hooks and ZeRO-3 parameter gathering
    cover every parameter the loss touches. ``.model`` is the plain DiPro network."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], with_loss: bool = True):
        out = self.model(batch)
        if not with_loss:
            return out, None, {}
        loss, terms = self.model.compute_loss(batch, out)
        return out, loss, terms


def deepspeed_config(cfg: Config, precision: str) -> dict[str, Any]:
    """The DeepSpeed engine config, derived from the run config alone.

    train_batch_size = micro batch x workers x accumulation (DeepSpeed checks the identity).
    """
    t = cfg.trainer
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("trainer.offload_optimizer=true needs trainer.zero_stage >= 1 (ZeRO partitions what it offloads)")
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 2:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(t.use_gpu)}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.effective_batch_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        # bf16: torch.autocast inside the engine over float32 master weights (DeepSpeed's
        # torch_autocast; Linear/Conv gradients are reduced in bf16). fp16 (GPU only):
        # DeepSpeed's fp16 mode with dynamic loss scaling.
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # A torch.optim.AdamW instance is passed in: no DeepSpeed fused-op compilation.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer:
        # Keep the torch AdamW on the offloaded partitions instead of DeepSpeedCPUAdam (a compiled op).
        config["zero_force_ds_cpu_optimizer"] = False
    return config


class Strategy:
    """Common state: the wrapped model, device, precision, rank and world size."""

    name = "base"

    def __init__(self, cfg: Config, model: nn.Module, *, precision: str, device: torch.device,
                 rank: int, world_size: int, total_steps: int) -> None:
        self.cfg = cfg
        self.precision = precision
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.total_steps = total_steps
        self.wrapped = ModelWithLoss(model)
        self.compiled = compile_enabled(cfg, device)

    # --- the model without any wrapper
    @property
    def model(self) -> nn.Module:
        return self.wrapped.model

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def forward(self, batch: dict[str, Any], with_loss: bool = True):
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        raise NotImplementedError

    def step(self) -> torch.Tensor | float | None:
        """The optimizer step at an accumulation boundary; returns the global gradient norm (or None)."""
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def train(self) -> None:
        self.wrapped.train()

    def eval(self) -> None:
        self.wrapped.eval()

    def sync_buffers(self) -> None:
        """Every rank takes rank 0's buffers (BatchNorm running statistics; collective).

        Each rank updates its BatchNorm running statistics from its own micro batches. DDP
        copies rank 0's buffers to the others at each training forward (``broadcast_buffers``,
        as in the authors' Lightning DDP); a DeepSpeed engine never does. Called before
        validation, so every rank evaluates with the statistics that rank 0's checkpoint saves
        and a distributed validation equals a single-process evaluation of that checkpoint.
        """
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            for buf in self.model.buffers():
                dist.broadcast(buf.data, src=0)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save_state(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def load_state(self, ckpt_dir: Path) -> None:
        raise NotImplementedError


def _has_ablation(cfg: Config) -> bool:
    """Ablation switches can leave parts of the network without gradient: DDP must then look for them."""
    m = cfg.model
    return (not m.use_ehr or m.last_cxr_only or not m.use_pae or not m.use_std_losses or not m.local_fusion
            or not m.global_fusion)


def _float32_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_floating_point():
        t = t.float()
    return t.cpu().clone()


class DDPStrategy(Strategy):
    """torch DistributedDataParallel (a plain module when the world has one process)."""

    name = "ddp"

    def __init__(self, cfg: Config, model: nn.Module, **kw) -> None:
        super().__init__(cfg, model, **kw)
        if self.model.region_encoder.channels_last:
            self.wrapped.to(memory_format=torch.channels_last)
        self.wrapped.to(self.device)
        if self.compiled:  # before DDP wraps it (dipro.train.compile)
            compile_in_place(self.wrapped, cfg.model.compile_backend)
        self.optimizer = optim_mod.build_optimizer(self.model, cfg)
        self.scheduler = optim_mod.build_scheduler(self.optimizer, cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.engine: nn.Module = nn.parallel.DistributedDataParallel(
                self.wrapped, device_ids=ids, find_unused_parameters=_has_ablation(cfg))
        else:
            self.engine = self.wrapped

    def forward(self, batch, with_loss: bool = True):
        if self.wrapped.training and with_loss:
            with self.autocast():
                return self.engine(batch, with_loss)
        with self.autocast():  # evaluation: eager (no second compilation for eval mode)
            return self.wrapped.forward(batch, with_loss)

    def _no_sync(self, boundary: bool):
        if boundary or not isinstance(self.engine, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.engine.no_sync()

    def backward(self, loss, boundary):
        # Mean over the accumulation window: each micro batch contributes loss / accum.
        with self._no_sync(boundary):
            self.scaler.scale(loss / self.cfg.optim.grad_accum).backward()

    def step(self):
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm.detach()  # a device tensor: reading it is a host sync, done only when logging

    def lr(self):
        return float(self.optimizer.param_groups[0]["lr"])

    def consolidated_state_dict(self):
        return {k: _float32_cpu(v) for k, v in self.model.state_dict().items()}

    def save_state(self, ckpt_dir):
        if self.rank == 0:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict()}
            from dipro.train.checkpoint import atomic_torch_save

            atomic_torch_save(state, Path(ckpt_dir) / TRAIN_STATE_FILE)

    def load_state(self, ckpt_dir):
        """Model from ``model.pt`` (float32), optimizer/scheduler/scaler from ``train_state.pt``."""
        from dipro.train.checkpoint import MODEL_FILE

        ckpt_dir = Path(ckpt_dir)
        weights = torch.load(ckpt_dir / MODEL_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(weights, strict=True)
        state = torch.load(ckpt_dir / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine (ZeRO 0-3, optional optimizer offload) over the same model."""

    name = "deepspeed"

    def __init__(self, cfg: Config, model: nn.Module, **kw) -> None:
        super().__init__(cfg, model, **kw)
        import deepspeed

        if self.model.region_encoder.channels_last:
            self.wrapped.to(memory_format=torch.channels_last)
        self.wrapped.to(self.device)
        if self.compiled:  # before the engine wraps it (dipro.train.compile)
            compile_in_place(self.wrapped, cfg.model.compile_backend)
        optimizer = optim_mod.build_optimizer(self.model, cfg)
        scheduler = optim_mod.build_scheduler(optimizer, cfg, self.total_steps)
        self.ds_config = deepspeed_config(cfg, self.precision)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.wrapped, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)

    def forward(self, batch, with_loss: bool = True):
        if self.compiled and not self.wrapped.training:
            # evaluation eager, as under DDP (no second compilation for eval mode); compiled runs are
            # ZeRO 0-2, where every rank holds the whole module
            with self.autocast():
                return self.wrapped.forward(batch, with_loss)
        if self.precision == "bf16":  # the engine enters torch.autocast itself (torch_autocast config)
            return self.engine(batch, with_loss)
        # fp16: DeepSpeed holds the module in half precision; autocast reconciles float32 inputs with it.
        with self.autocast():
            return self.engine(batch, with_loss)

    def backward(self, loss, boundary):
        if self.engine.is_gradient_accumulation_boundary() != boundary:
            raise RuntimeError("DeepSpeed's accumulation window and the loop's disagree "
                               f"(engine boundary={self.engine.is_gradient_accumulation_boundary()}, loop={boundary})")
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not boundary:
            self.engine.step()  # bookkeeping only between boundaries

    def step(self):
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self):
        return float(self.engine.get_lr()[0])

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    def consolidated_state_dict(self):
        """Float32 master weights assembled from ZeRO partitions; every rank must call this."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.model
        params = dict(module.named_parameters(remove_duplicate=False))
        keys = list(module.state_dict().keys())
        out: dict[str, torch.Tensor] = {}
        buffers = dict(module.named_buffers())
        for key in keys:
            if key in params:
                p = params[key]
                full = safe_get_full_fp32_param(p)  # collective for ZeRO 1-3 partitions
                if full is None:
                    full = p
                out[key] = _float32_cpu(full)
            else:
                out[key] = _float32_cpu(buffers[key])
        return out

    def save_state(self, ckpt_dir):
        """DeepSpeed's own format (collective): model/optimizer partitions of this rank + scheduler."""
        path = Path(ckpt_dir) / DEEPSPEED_DIR
        path.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG, save_latest=False)

    def load_state(self, ckpt_dir):
        path = Path(ckpt_dir) / DEEPSPEED_DIR
        load_path, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {path} (tag {DEEPSPEED_TAG!r})")


def build_strategy(cfg: Config, model: nn.Module, **kw) -> Strategy:
    """``trainer.strategy`` -> a ready strategy (model on device, optimizer, scheduler)."""
    cls = {"ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}[cfg.trainer.strategy]
    return cls(cfg, model, **kw)
