"""AdamW and the paper's cosine learning-rate schedule (decay to ``optim.min_lr``, optional warm-up).

The schedule is a callable object (not a closure) so ``LambdaLR.state_dict()``
stores its settings and a resumed run continues on exactly the same curve.
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


class CosineWithWarmup:
    """``LambdaLR`` multiplier: :func:`cosine_lr` divided by the base learning rate."""

    def __init__(self, base_lr: float, min_lr: float, total_steps: int, warmup_steps: int = 0) -> None:
        self.base_lr = float(base_lr)
        self.min_lr = float(min_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        return cosine_lr(step, base_lr=self.base_lr, min_lr=self.min_lr,
                         total_steps=self.total_steps, warmup_steps=self.warmup_steps) / self.base_lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and conv kernels; never biases, norms, embeddings of rank 1 or padding vectors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """A plain ``torch.optim.AdamW`` (DeepSpeed receives the instance; see strategies.py)."""
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                             betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step cosine schedule over the whole run (``max_epochs x steps_per_epoch``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, CosineWithWarmup(cfg.optim.lr, cfg.optim.min_lr, total_steps, cfg.optim.warmup_steps))
