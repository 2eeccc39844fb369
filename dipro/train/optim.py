"""AdamW and the cosine learning-rate schedule, as the authors trained DiPro.

The authors (github.com/Chenliu-svg/DiPro models/Base_Predictor.py: configure_optimizers; main.py)
build ``AdamW(model.parameters(), lr)`` with torch's default weight decay 0.01 on every parameter and
``CosineAnnealingLR(T_max=max_epochs, eta_min=1e-7)``, which Lightning steps once per epoch; ``lr``
is ``base_lr`` scaled by accumulation x GPUs x batch size (``--scale_lr``, on by default).  Here:

* the peak rate is :attr:`dipro.config.Config.effective_lr` (``optim.base_lr``, ``optim.scale_lr``);
* ``optim.schedule_interval=epoch`` holds the rate for a whole epoch at
  ``min_lr + (lr - min_lr)(1 + cos(pi e / max_epochs)) / 2`` (epoch e, 0-based), the closed form of
  CosineAnnealingLR; ``step`` decays it per optimizer step over the run (with optional warm-up);
* ``optim.decay_all_params`` false exempts rank-1 parameters (biases, norms) from weight decay.

The schedule is a callable object (not a closure) so ``LambdaLR.state_dict()``
stores its settings and a resumed run continues on exactly the same curve.  It is
stepped once per optimizer step by both strategies; the per-epoch curve is a function
of the step count (``step // steps_per_epoch``), so DeepSpeed's engine, which steps the
scheduler itself, follows it too.
"""
from __future__ import annotations

import math

import torch

from dipro.config import Config


def cosine_lr(step: int, *, base_lr: float, min_lr: float, total_steps: int, warmup_steps: int = 0) -> float:
    """Learning rate after ``step`` optimizer steps.

    Warm-up: linear from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps``.
    Then cosine annealing (SGDR, Loshchilov & Hutter 2017, eq. 5):
    ``lr_t = min_lr + 0.5 (base_lr - min_lr) (1 + cos(pi * t / T))`` with t, T counted after warm-up;
    ``lr = min_lr`` from ``total_steps`` on.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(max(step - warmup_steps, 0), decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / decay_steps))


def epoch_cosine_lr(step: int, *, base_lr: float, min_lr: float, steps_per_epoch: int, max_epochs: int) -> float:
    """The rate during the epoch that optimizer step ``step`` belongs to: CosineAnnealingLR(T_max=max_epochs)
    stepped once per epoch, i.e. :func:`cosine_lr` of the epoch index over ``max_epochs``."""
    epoch = step // max(1, steps_per_epoch)
    return cosine_lr(epoch, base_lr=base_lr, min_lr=min_lr, total_steps=max_epochs)


class CosineWithWarmup:
    """``LambdaLR`` multiplier: the cosine rate divided by the peak rate.

    ``steps_per_epoch`` None: per optimizer step (:func:`cosine_lr`); otherwise per epoch
    (:func:`epoch_cosine_lr` over ``total_steps // steps_per_epoch`` epochs).
    """

    def __init__(self, base_lr: float, min_lr: float, total_steps: int, warmup_steps: int = 0,
                 steps_per_epoch: int | None = None) -> None:
        self.base_lr = float(base_lr)
        self.min_lr = float(min_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.steps_per_epoch = None if steps_per_epoch is None else max(1, int(steps_per_epoch))

    def __call__(self, step: int) -> float:
        if self.steps_per_epoch is not None:
            lr = epoch_cosine_lr(step, base_lr=self.base_lr, min_lr=self.min_lr, steps_per_epoch=self.steps_per_epoch,
                                 max_epochs=max(1, self.total_steps // self.steps_per_epoch))
        else:
            lr = cosine_lr(step, base_lr=self.base_lr, min_lr=self.min_lr,
                           total_steps=self.total_steps, warmup_steps=self.warmup_steps)
        return lr / self.base_lr


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = True) -> list[dict]:
    """Every trainable parameter decayed (``decay_all``, the authors' AdamW), or matrices and conv
    kernels only (never biases, norms, embeddings of rank 1 or padding vectors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decay_all or p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw_implementation(params: list[torch.Tensor], offload: bool = False) -> dict[str, bool]:
    """``fused=True`` (one kernel for every parameter) when all parameters are on CUDA and the optimizer
    is not offloaded to the CPU; ``foreach=True`` (a few batched ops) otherwise. Same update either way."""
    if params and not offload and all(p.device.type == "cuda" for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """A ``torch.optim.AdamW`` at :attr:`Config.effective_lr` (DeepSpeed receives the instance; see strategies.py),
    fused on CUDA (:func:`adamw_implementation`); build it after the model is on its device."""
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_all_params)
    params = [p for g in groups for p in g["params"]]
    impl = adamw_implementation(params, offload=cfg.trainer.strategy == "deepspeed" and cfg.trainer.offload_optimizer)
    return torch.optim.AdamW(groups, lr=cfg.effective_lr, betas=(0.9, 0.999), eps=1e-8, **impl)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The cosine schedule over ``total_steps = steps per epoch x trainer.max_epochs`` optimizer steps,
    per epoch or per step (``optim.schedule_interval``)."""
    steps_per_epoch = None
    if cfg.optim.schedule_interval == "epoch":
        steps_per_epoch = max(1, total_steps // cfg.trainer.max_epochs)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, CosineWithWarmup(cfg.effective_lr, cfg.optim.min_lr, total_steps, cfg.optim.warmup_steps,
                                    steps_per_epoch))
