"""Optimisers and learning-rate schedules of ``condconv train``, built from a ``TrainConfig``.

The three papers' recipes need:

- SGD with plain momentum (the ODConv code, ``torch.optim.SGD(..., momentum=0.9)``) or Nesterov momentum (this
  library's default), and AdamW;
- :class:`RMSpropTF`, RMSProp as TensorFlow 1 computes it (the CondConv/EfficientNet TPU trainer,
  ``tf.train.RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon=1e-3)`` in ``tensorflow/tpu``
  ``models/official/efficientnet/utils.py``), for "CondConv: Conditionally Parameterized Convolutions for Efficient
  Inference" (Yang et al., arXiv 1904.04971);
- weight decay on every parameter (ODConv's code), on all but normalisation parameters (the TPU trainer's L2 loss
  skips ``batch_normalization`` variables only) or on all but normalisation parameters and biases (the default here);
- per-step learning-rate schedules with a linear warm-up: cosine, step (``x gamma`` at given epochs: ResNet's /10 at
  30/60/90 in "Omni-Dimensional Dynamic Convolution", Li et al., arXiv 2209.07947, and "Dynamic Convolution:
  Attention over Convolution Kernels", Chen et al., arXiv 1912.03458) and exponential (``x 0.97`` every 2.4 epochs,
  staircase, the TPU trainer's).

Learning rate and batch size: the TPU trainer's ``--base_learning_rate`` is per 256 images (0.016 for RMSProp, scaled
linearly: ``lr = 0.016 * batch / 256``, 0.128 at its default batch of 2048); the SGD recipes of the official ODConv
code use 0.1 (ResNets) and 0.05 (MobileNetV2) at a global batch of 256, the ResNet convention of 0.1 per 256 images.
:func:`scaled_lr` applies the linear rule; the configuration's ``lr_reference_batch`` (None: no scaling) says which
global batch ``lr`` was tuned for.

The schedule is a function of the optimizer step (not the epoch), so a run resumed mid-epoch continues exactly.
Every option is read from the configuration with ``getattr`` and a default that keeps the behaviour of a
configuration without it (SGD Nesterov, cosine, no decay on norms and biases).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from condconv.training.config import TrainConfig
from condconv.training.recipes import OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_EXCLUDE
from condconv.utils.checks import positive_int

__all__ = [
    "OPTIMIZERS", "SCHEDULES", "WEIGHT_DECAY_EXCLUDE", "RMSpropTF", "WarmupConstant", "WarmupCosine",
    "WarmupExponential", "WarmupStep", "build_optimizer", "build_scheduler", "make_schedule", "param_groups",
    "peak_lr", "scaled_lr",
]  # fmt: skip


_NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t
)


def _number(value: object, name: str, *, low: float = 0.0, strict: bool = False, high: float | None = None) -> float:
    """``value`` as a float if it is a finite real number in range; ``ValueError`` naming ``name`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value < high)
    if not ok:
        rng = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{name} must be a number {rng}{'' if high is None else f' and < {high}'}, got {value!r}")
    return float(value)


# ---- parameter groups -----------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float, exclude: str = "norm_and_bias") -> list[dict[str, Any]]:
    """Parameter groups with and without weight decay.

    Args:
        model: the model.
        weight_decay: decay of the decayed group.
        exclude: which parameters are not decayed: ``'norm_and_bias'`` (default: every 1-D parameter and every
            ``.bias``, i.e. normalisation weights and biases), ``'norm'`` (only the parameters of normalisation
            layers, BatchNorm/GroupNorm/LayerNorm: the TPU trainer's rule, which decays biases) or ``'none'``
            (every parameter decayed: ``torch.optim.SGD(model.parameters(), weight_decay=...)`` as ODConv's code).

    Returns:
        ``[{'params': decayed, 'weight_decay': weight_decay}, {'params': others, 'weight_decay': 0.0}]`` (two groups
        whatever ``exclude``; the second may be empty, so optimizer state dicts keep one shape).

    Raises:
        ValueError: unknown ``exclude`` or a negative ``weight_decay``.
    """
    if exclude not in WEIGHT_DECAY_EXCLUDE:
        raise ValueError(f"exclude must be one of {', '.join(WEIGHT_DECAY_EXCLUDE)}, got {exclude!r}")
    weight_decay = _number(weight_decay, "weight_decay")
    norm_params = set()
    if exclude == "norm":
        norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if exclude == "norm_and_bias":
            skip = p.dim() <= 1 or name.endswith(".bias")
        else:
            skip = id(p) in norm_params
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- RMSProp, TensorFlow semantics ----------------------------------------------------------------------------------
class RMSpropTF(torch.optim.Optimizer):
    """RMSProp with TensorFlow 1's semantics (``tf.train.RMSPropOptimizer``, ``ApplyRMSProp``).

    Per parameter, with gradient ``g`` (plus ``weight_decay * p``: an L2 term of the loss, as the TPU trainer adds
    ``weight_decay * sum(l2_loss(v))``)::

        ms  = rho * ms + (1 - rho) * g**2          # ms starts at ONES (torch.optim.RMSprop: zeros)
        mom = momentum * mom + lr * g / sqrt(ms + eps)   # eps inside the root; lr inside the buffer
        p   = p - mom

    Because the learning rate is folded into the momentum buffer, a change of ``lr`` acts gradually (TensorFlow's
    behaviour), unlike ``torch.optim.RMSprop``, which scales the buffer by the current ``lr``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        rho: decay of the mean square (TensorFlow's ``decay``). Default 0.9.
        momentum: momentum. Default 0.9.
        eps: added to the mean square inside the square root. Default 1e-3 (TensorFlow's default 1e-10; 1e-3 is the
            TPU trainer's value).
        weight_decay: L2 coefficient added to the gradient. Default 0.

    The state holds tensors and numbers only (``square_avg``, ``momentum_buffer``), so checkpoints load with
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, params: Iterable, lr: float, rho: float = 0.9, momentum: float = 0.9, eps: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        defaults = {"lr": _number(lr, "lr"), "rho": _number(rho, "rho", high=1.0),
                    "momentum": _number(momentum, "momentum", high=1.0), "eps": _number(eps, "eps", strict=True),
                    "weight_decay": _number(weight_decay, "weight_decay")}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter with a gradient; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, rho, momentum, eps, wd = (group[k] for k in ("lr", "rho", "momentum", "eps", "weight_decay"))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ms, buf = state["square_avg"], state["momentum_buffer"]
                ms.mul_(rho).addcmul_(g, g, value=1.0 - rho)
                update = g / ms.add(eps).sqrt_()
                if momentum > 0:
                    buf.mul_(momentum).add_(update, alpha=lr)
                    p.sub_(buf)
                else:
                    p.sub_(update, alpha=lr)
        return loss


# ---- learning rate --------------------------------------------------------------------------------------------------
def scaled_lr(lr: float, batch_size: int, reference_batch: int | None) -> float:
    """The linear scaling rule: ``lr * batch_size / reference_batch`` (``lr`` unchanged when ``reference_batch`` is
    None). E.g. the TPU trainer's RMSProp ``0.016`` per 256 images is ``0.128`` at a batch of 2048.

    Args:
        lr: learning rate tuned for ``reference_batch`` images per step.
        batch_size: images per optimizer step, over all processes.
        reference_batch: the batch size ``lr`` is for, or None.
    """
    lr = _number(lr, "lr", strict=True)
    positive_int(batch_size, "batch_size")
    if reference_batch is None:
        return lr
    return lr * batch_size / positive_int(reference_batch, "reference_batch")


def peak_lr(config: TrainConfig, world_size: int = 1) -> float:
    """The learning rate the optimizer starts from: ``config.lr`` scaled to the global batch
    (``config.global_batch_size``, else ``config.batch_size * world_size``) when ``config.lr_reference_batch`` is
    set."""
    batch = getattr(config, "global_batch_size", None) or config.batch_size * world_size
    return scaled_lr(config.lr, batch, getattr(config, "lr_reference_batch", None))


def build_optimizer(model: nn.Module, config: TrainConfig, *, world_size: int = 1) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over :func:`param_groups`.

    Reads ``optimizer`` ('sgd', 'adamw' or 'rmsprop_tf'), ``lr`` (and ``lr_reference_batch``: see :func:`peak_lr`),
    ``momentum``, ``weight_decay``, ``weight_decay_exclude`` (default 'norm_and_bias'), ``nesterov`` (SGD; default
    True: Nesterov momentum when ``momentum > 0``), ``rmsprop_decay`` (default 0.9) and ``rmsprop_eps`` (1e-3).
    """
    groups = param_groups(model, config.weight_decay, getattr(config, "weight_decay_exclude", "norm_and_bias"))
    lr = peak_lr(config, world_size)
    if config.optimizer == "sgd":
        nesterov = bool(getattr(config, "nesterov", True)) and config.momentum > 0
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=nesterov)
    if config.optimizer == "rmsprop_tf":
        return RMSpropTF(groups, lr=lr, rho=getattr(config, "rmsprop_decay", 0.9), momentum=config.momentum,
                         eps=getattr(config, "rmsprop_eps", 1e-3))
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")


class _Warmup:
    """Linear warm-up over ``warmup`` steps (factor ``(step + 1) / warmup``), then :meth:`after`, never below
    ``floor / peak``."""

    def __init__(self, warmup: int, peak: float, floor: float) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        self.warmup, self.peak, self.floor = warmup, _number(peak, "peak", strict=True), _number(floor, "floor")

    def after(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        return max(self.after(step), self.floor / self.peak)


class WarmupCosine(_Warmup):
    """Learning-rate factor per step: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor / peak``.

    Example:
        >>> f = WarmupCosine(warmup=10, total=110, peak=0.1, floor=0.0)
        >>> f(0), f(9), round(f(60), 3), f(110)
        (0.1, 1.0, 0.5, 0.0)
    """

    def __init__(self, warmup: int, total: int, peak: float, floor: float) -> None:
        super().__init__(warmup, peak, floor)
        self.total = total

    def after(self, step: int) -> float:
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        progress = min(max(progress, 0.0), 1.0)
        min_ratio = self.floor / self.peak
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupStep(_Warmup):
    """Linear warm-up, then ``gamma ** (number of milestones <= step)``: the ResNet schedule (``gamma=0.1`` at
    epochs 30, 60, 90 of ODConv's ``--lr-decay schedule``). Milestones count from step 0, warm-up included.

    Example:
        >>> f = WarmupStep(warmup=0, milestones=[30, 60], gamma=0.1, peak=0.1, floor=0.0)
        >>> f(29), f(30), round(f(60), 6)
        (1.0, 0.1, 0.01)
    """

    def __init__(self, warmup: int, milestones: Sequence[int], gamma: float, peak: float, floor: float) -> None:
        super().__init__(warmup, peak, floor)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = _number(gamma, "gamma", strict=True)

    def after(self, step: int) -> float:
        return self.gamma ** sum(1 for m in self.milestones if m <= step)


class WarmupExponential(_Warmup):
    """Linear warm-up, then ``rate ** floor(step / decay_steps)`` (``staircase``, TensorFlow's
    ``exponential_decay(..., staircase=True)`` as the TPU trainer uses it) or ``rate ** (step / decay_steps)``.

    As in the TPU trainer, the decay counts from step 0 (warm-up included) and the warm-up replaces it until
    ``warmup`` steps: at the end of 5 warm-up epochs with ``decay_steps`` of 2.4 epochs the factor is ``0.97**2``.

    Example:
        >>> f = WarmupExponential(warmup=0, decay_steps=2.5, rate=0.5, peak=0.1, floor=0.0)
        >>> f(2), f(3), f(5)
        (1.0, 0.5, 0.25)
    """

    def __init__(self, warmup: int, decay_steps: float, rate: float, peak: float, floor: float,
                 staircase: bool = True) -> None:
        super().__init__(warmup, peak, floor)
        self.decay_steps = _number(decay_steps, "decay_steps", strict=True)
        self.rate = _number(rate, "rate", strict=True)
        self.staircase = bool(staircase)

    def after(self, step: int) -> float:
        exponent = step / self.decay_steps
        return self.rate ** (math.floor(exponent) if self.staircase else exponent)


class WarmupConstant(_Warmup):
    """Linear warm-up, then 1."""

    def after(self, step: int) -> float:
        return 1.0


def make_schedule(schedule: str = "cosine", *, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
                  peak: float = 1.0, floor: float = 0.0, milestones: Sequence[float] = (30, 60, 90),
                  gamma: float | None = None, decay_epochs: float = 2.4, staircase: bool = True) -> _Warmup:
    """A learning-rate factor per optimizer step from plain options (epochs are converted to steps here).

    Args:
        schedule: 'cosine' (to ``floor`` at the last step), 'step' (``x gamma`` at each of ``milestones``),
            'exponential' (``x gamma`` every ``decay_epochs``) or 'constant'.
        steps_per_epoch: optimizer steps per epoch.
        epochs: training epochs.
        warmup_epochs: linear warm-up (may be fractional; rounded to whole steps).
        peak: the peak learning rate (only ``floor / peak`` matters).
        floor: the lowest learning rate (cosine ends there; the others never go below it).
        milestones: epochs of the 'step' decays (may be fractional).
        gamma: factor of each decay; None: 0.1 for 'step', 0.97 for 'exponential'.
        decay_epochs: interval of the 'exponential' decays, in epochs (may be fractional: 2.4).
        staircase: 'exponential' decays at whole intervals (True, TensorFlow's ``staircase``) or continuously.

    Returns:
        A callable ``factor(step) -> float`` whose state is plain numbers.

    Raises:
        ValueError: an unknown schedule or an out-of-range option (named).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
        positive_int(value, name)
    warmup = int(round(_number(warmup_epochs, "warmup_epochs") * steps_per_epoch))
    if schedule == "cosine":
        return WarmupCosine(warmup, steps_per_epoch * epochs, peak, floor)
    if schedule == "constant":
        return WarmupConstant(warmup, peak, floor)
    if schedule == "step":
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
            raise ValueError(f"milestones must be a list of epochs, got {milestones!r}")
        steps = [int(round(_number(m, "milestones") * steps_per_epoch)) for m in milestones]
        return WarmupStep(warmup, steps, 0.1 if gamma is None else gamma, peak, floor)
    decay_steps = _number(decay_epochs, "decay_epochs", strict=True) * steps_per_epoch
    return WarmupExponential(warmup, decay_steps, 0.97 if gamma is None else gamma, peak, floor, staircase)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int, *,
                    world_size: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of ``config``: :func:`make_schedule` with ``lr_schedule`` (default 'cosine'),
    ``warmup_epochs``, ``min_lr``, ``lr_milestones``, ``lr_gamma``, ``lr_decay_epochs``, ``lr_staircase``; the peak is
    :func:`peak_lr`."""
    factor = make_schedule(
        getattr(config, "lr_schedule", "cosine"), steps_per_epoch=steps_per_epoch, epochs=config.epochs,
        warmup_epochs=config.warmup_epochs, peak=peak_lr(config, world_size), floor=config.min_lr,
        milestones=getattr(config, "lr_milestones", (30, 60, 90)), gamma=getattr(config, "lr_gamma", None),
        decay_epochs=getattr(config, "lr_decay_epochs", 2.4), staircase=getattr(config, "lr_staircase", True))
    # a lambda, not the object: LambdaLR keeps lambdas out of its state_dict (only tensors and numbers are saved)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step))
