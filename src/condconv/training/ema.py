"""Exponential moving average (EMA) of a model's weights, as the CondConv/EfficientNet TPU trainer keeps it.

"CondConv: Conditionally Parameterized Convolutions for Efficient Inference" (Yang et al., arXiv 1904.04971) trained
its EfficientNet-CondConv models with the ``tensorflow/tpu`` EfficientNet trainer (``models/official/efficientnet``),
which evaluates an EMA of the weights: ``tf.train.ExponentialMovingAverage(decay=0.9999, num_updates=global_step)``
applied after every optimizer step (``main.py``) to the trainable variables and to the batch-norm moving mean and
variance (``utils.get_ema_vars``). With ``num_updates`` TensorFlow uses the decay
``min(decay, (1 + num_updates) / (10 + num_updates))``, so the average follows the weights closely early on.

What is averaged (the TPU trainer's choice): every floating-point parameter, and the running mean and variance of the
normalisation layers (``running_mean``/``running_var`` of BatchNorm-style modules). Every other buffer (the routers'
``temperature``, ``num_batches_tracked``...) is a setting or a counter, not a weight: it is copied from the model at
each update, so the averaged model always runs with the model's current settings.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEma"]

_AVERAGED_BUFFERS = ("running_mean", "running_var")


def _averaged_buffer_names(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for b in _AVERAGED_BUFFERS:
                if getattr(module, b, None) is not None:
                    names.add(f"{prefix}.{b}" if prefix else b)
    return names


class ModelEma:
    """Shadow copies of a model's weights, averaged after each optimizer step.

    After update ``k`` (``k = 1, 2, ...``) each averaged tensor is ``s = d_k * s + (1 - d_k) * w`` with
    ``d_k = min(decay, (1 + k) / (10 + k))`` when ``warmup`` (TensorFlow's ``num_updates`` rule) or ``d_k = decay``.
    The shadow starts as a copy of the model at construction (TensorFlow initialises it with the variables' values).

    Args:
        model: the model to follow (its parameter and buffer names fix the shadow's).
        decay: the decay, in [0, 1). 0.9999 in the TPU trainer.
        warmup: use the ``(1 + k) / (10 + k)`` cap. Default True.
        device: where the shadow lives (e.g. ``'cpu'`` to spare accelerator memory); None: beside each tensor.

    Example::

        ema = ModelEma(model, decay=0.9999)
        for batch in loader:
            train_step(model, batch)
            ema.update(model)
        with ema.applied(model):
            evaluate(model)  # the averaged weights; the training weights come back afterwards
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = True,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup must be a bool, got {warmup!r}")
        self.decay, self.warmup = float(decay), warmup
        self.device = None if device is None else torch.device(device)
        self.num_updates = 0
        averaged_buffers = _averaged_buffer_names(model)
        self.averaged: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                target = self.averaged if p.is_floating_point() else self.copied
                target[name] = self._clone(p)
            for name, b in model.named_buffers():
                average = name in averaged_buffers and b.is_floating_point()
                (self.averaged if average else self.copied)[name] = self._clone(b)

    def _clone(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device if self.device is not None else t.device, copy=True)

    def decay_at(self, num_updates: int) -> float:
        """The decay of update number ``num_updates`` (1 for the first update)."""
        if self.warmup:
            return min(self.decay, (1.0 + num_updates) / (10.0 + num_updates))
        return self.decay

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        missing = (set(self.averaged) | set(self.copied)) - set(tensors)
        extra = set(tensors) - set(self.averaged) - set(self.copied)
        if missing or extra:
            raise ValueError(f"model does not match the EMA: missing {sorted(missing)[:5]}, unexpected "
                             f"{sorted(extra)[:5]}")
        return tensors

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after each optimizer step)."""
        tensors = self._tensors(model)
        self.num_updates += 1
        weight = 1.0 - self.decay_at(self.num_updates)
        for name, s in self.averaged.items():
            w = tensors[name].detach()
            s.lerp_(w.to(device=s.device, dtype=s.dtype), weight)
        for name, s in self.copied.items():
            s.copy_(tensors[name].detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights (and the copied buffers) into ``model``."""
        tensors = self._tensors(model)
        for name, s in {**self.averaged, **self.copied}.items():
            tensors[name].copy_(s)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` holds the averaged weights; its own come back on exit (even on error)."""
        tensors = self._tensors(model)
        with torch.no_grad():
            backup = {name: t.detach().clone() for name, t in tensors.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in tensors.items():
                    t.copy_(backup[name])

    def to(self, device: torch.device | str) -> ModelEma:
        """Move the shadow to ``device`` (in place); returns ``self``."""
        self.device = torch.device(device)
        for store in (self.averaged, self.copied):
            for name in store:
                store[name] = store[name].to(self.device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Numbers and tensors only (loads with ``torch.load(weights_only=True)``)."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "averaged": dict(self.averaged), "copied": dict(self.copied)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the tensor names and shapes must match this EMA's (``ValueError`` if not)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        for key in ("decay", "warmup", "num_updates", "averaged", "copied"):
            if key not in state:
                raise ValueError(f"state is missing {key!r} (not a ModelEma state_dict?)")
        for key in ("averaged", "copied"):
            mine, theirs = getattr(self, key), state[key]
            if set(mine) != set(theirs):
                raise ValueError(f"state[{key!r}] names do not match: {sorted(set(mine) ^ set(theirs))[:5]}")
            for name, t in theirs.items():
                if tuple(t.shape) != tuple(mine[name].shape):
                    raise ValueError(f"state[{key!r}][{name!r}] has shape {tuple(t.shape)}, "
                                     f"expected {tuple(mine[name].shape)}")
        decay, num_updates = state["decay"], state["num_updates"]
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0 <= decay < 1):
            raise ValueError(f"state['decay'] must be in [0, 1), got {decay!r}")
        if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
            raise ValueError(f"state['num_updates'] must be an int >= 0, got {num_updates!r}")
        self.decay, self.warmup, self.num_updates = float(decay), bool(state["warmup"]), num_updates
        for key in ("averaged", "copied"):
            for name, t in state[key].items():
                getattr(self, key)[name].copy_(t)
