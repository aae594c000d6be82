"""Optimisers and learning-rate schedules of ``condconv train``, built from a :class:`~condconv.config.TrainConfig`.

The schedule is a function of the optimizer step (not the epoch), so a run resumed mid-epoch continues exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from condconv.config import TrainConfig

__all__ = ["WarmupCosine", "build_optimizer", "build_scheduler", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights with ``weight_decay``, and biases and normalisation parameters (1-D) without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum when ``momentum > 0``) or AdamW over :func:`param_groups`."""
    groups = param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


class WarmupCosine:
    """Learning-rate factor per step: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor / peak``.

    Example:
        >>> f = WarmupCosine(warmup=10, total=110, peak=0.1, floor=0.0)
        >>> f(0), f(9), round(f(60), 3), f(110)
        (0.1, 1.0, 0.5, 0.0)
    """

    def __init__(self, warmup: int, total: int, peak: float, floor: float) -> None:
        self.warmup, self.total, self.peak, self.floor = warmup, total, peak, floor

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        progress = min(max(progress, 0.0), 1.0)
        min_ratio = self.floor / self.peak
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of ``config`` (warm-up ``warmup_epochs``, then cosine to ``min_lr`` at the end)."""
    factor = WarmupCosine(int(round(config.warmup_epochs * steps_per_epoch)), steps_per_epoch * config.epochs,
                          config.lr, config.min_lr)
    # a lambda, not the object: LambdaLR keeps lambdas out of its state_dict (only tensors and numbers are saved)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
