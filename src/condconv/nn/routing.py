"""Routing functions: how a dynamic convolution weighs its experts for each example.

- :class:`SigmoidRouter` — CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971): ``sigmoid(GAP(x) @ R + b)``,
  independent, unnormalised weights per expert (the paper's best routing in its ablations).
- :class:`SoftmaxRouter` — DynamicConv (Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
  CVPR 2020, arXiv:1912.03458): ``softmax(MLP(GAP(x)) / T)``.
- :class:`OmniRouter` — ODConv (Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022,
  arXiv:2209.07947): one trunk, four attentions (expert, spatial, input channel, output channel).

Temperatures are buffers (saved in ``state_dict``, changed in place so compiled graphs are not re-traced);
:func:`set_temperature` sets them all and :class:`TemperatureSchedule` gives the papers' 30 -> 1 annealing.

Every router takes ``init='default'`` (PyTorch's ``nn.Linear`` initialisation) or ``init='official'`` (what the
papers' code does; see each class): the official initialisers were read in tensorflow/tpu
``models/official/efficientnet/efficientnet_model.py`` (CondConv) and OSVAI/ODConv ``modules/odconv.py`` (ODConv).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condconv.utils.checks import positive_int as _positive_int
from condconv.utils.checks import positive_number, probability

__all__ = [
    "SigmoidRouter",
    "SoftmaxRouter",
    "OmniRouter",
    "Attentions",
    "set_temperature",
    "TemperatureSchedule",
    "ROUTERS",
]


def _check_temperature(value: object) -> float:
    return positive_number(value, "temperature")


def _check_dropout(value: object) -> float:
    return probability(value, "dropout")


INITS = ("default", "official")


def _check_init(value: object) -> str:
    if value not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {value!r}")
    return value


def _he_fan_out(layers) -> None:
    """ODConv's attention initialisation: He normal with fan-out (``std = sqrt(2 / out_features)``), zero biases."""
    for layer in layers:
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def _in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _pooled(x: Tensor) -> Tensor:
    """Global average pooling over every spatial axis of ``(B, C, *spatial)`` (1, 2 or 3 axes) -> ``(B, C)``."""
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"router input must be 3-D, 4-D or 5-D (batch, channels, *spatial), got shape "
                         f"{tuple(x.shape)}")
    return x.mean(tuple(range(2, x.dim())))


class SigmoidRouter(nn.Module):
    """CondConv routing ``sigmoid(Linear(dropout(GAP(x))))`` -> ``(B, num_experts)``.

    Args:
        in_channels: channels of the input it routes on.
        num_experts: number of experts.
        dropout: dropout on the pooled routing input, an option of this library (the official EfficientNet-CondConv
            code routes on the pooled input directly, without dropout). Default 0.
        init: ``'default'`` (``nn.Linear``'s) or ``'official'``: Glorot-uniform weights and zero bias, the defaults
            of the ``tf.layers.Dense(num_experts, activation=sigmoid)`` routing layer of the official code
            (tensorflow/tpu ``models/official/efficientnet/efficientnet_model.py``, ``MBConvBlock._build``).
    """

    def __init__(self, in_channels: int, num_experts: int, dropout: float = 0.0, *, init: str = "default",
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.num_experts = _positive_int(num_experts, "num_experts")
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.fc = nn.Linear(in_channels, num_experts, device=device, dtype=dtype)
        if _check_init(init) == "official":
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, H, W)`` (or ``(B, C, L)``, ``(B, C, D, H, W)``) -> routing ``(B, num_experts)`` in (0, 1)."""
        h = _pooled(x)
        if self.training and self.dropout.p > 0:
            h = self.dropout(h)
        return torch.sigmoid(self.fc(h))

    def zero_(self) -> SigmoidRouter:
        """Constant routing 0.5 for every expert and input (used for function-preserving conversion)."""
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        return self

    def constant_sum(self) -> float:
        """Sum of the routing weights when zeroed (``num_experts / 2``)."""
        return self.num_experts / 2


class SoftmaxRouter(nn.Module):
    """Softmax routing with a temperature: ``softmax(MLP(GAP(x)) / T)`` -> ``(B, num_experts)``.

    Args:
        in_channels: channels of the input it routes on.
        num_experts: number of experts.
        reduction: hidden layer of ``max(in_channels // reduction, 4)`` units with ReLU (DynamicConv uses 4);
            ``None`` for a single linear layer.
        temperature: softmax temperature (a buffer). Default 1.
        dropout: dropout on the pooled routing input. Default 0.
        init: ``'default'`` (``nn.Linear``'s) or ``'official'``: He normal with fan-out and zero biases. DynamicConv
            has no official code; this is the attention initialisation of its successor's official code (OSVAI/ODConv
            ``modules/odconv.py``, ``Attention._initialize_weights``), which the DynamicConv re-implementation that
            code credits (kaijieshi7/Dynamic-convolution-Pytorch) also uses for its attention.
    """

    def __init__(self, in_channels: int, num_experts: int, *, reduction: int | None = None, temperature: float = 1.0,
                 dropout: float = 0.0, init: str = "default", device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.num_experts = _positive_int(num_experts, "num_experts")
        self.dropout = nn.Dropout(_check_dropout(dropout))
        factory = {"device": device, "dtype": dtype}
        if reduction is None:
            self.hidden = None
            self.fc = nn.Linear(in_channels, num_experts, **factory)
        else:
            _positive_int(reduction, "reduction")
            width = max(in_channels // reduction, 4)
            self.hidden = nn.Sequential(nn.Linear(in_channels, width, **factory), nn.ReLU(inplace=True))
            self.fc = nn.Linear(width, num_experts, **factory)
        self.register_buffer("temperature", torch.tensor(_check_temperature(temperature), device=device, dtype=dtype))
        if _check_init(init) == "official":
            _he_fan_out([m for m in self.modules() if isinstance(m, nn.Linear)])

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C, *spatial)`` (1 to 3 spatial axes) -> routing ``(B, num_experts)``, rows summing to 1."""
        h = _pooled(x)
        if self.training and self.dropout.p > 0:
            h = self.dropout(h)
        if self.hidden is not None:
            h = self.hidden(h)
        logits = self.fc(h)
        return torch.softmax(logits / _in_dtype(self.temperature, logits.dtype), dim=1)

    def zero_(self) -> SoftmaxRouter:
        """Uniform routing ``1 / num_experts`` for every input (function-preserving conversion)."""
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        return self

    def constant_sum(self) -> float:
        return 1.0


class Attentions(NamedTuple):
    """ODConv's four attentions for a batch; a head that is skipped for the layer's shape is ``None``.

    Attributes:
        expert: ``(B, E)`` softmax over experts (None when E == 1).
        spatial: ``(B, kh, kw)`` (``(B, *kernel_size)`` in any rank) sigmoid over kernel positions (None for 1x1
            kernels).
        in_channel: ``(B, C_in)`` sigmoid, applied to the input.
        out_channel: ``(B, C_out)`` sigmoid, applied to the output (None for depthwise layers).
    """

    expert: Tensor | None
    spatial: Tensor | None
    in_channel: Tensor | None
    out_channel: Tensor | None


_NORMS = ("layer", "batch", "none")


class OmniRouter(nn.Module):
    """ODConv attention: ``GAP -> Linear(C_in, hidden) -> norm -> ReLU`` feeding four heads.

    ``hidden = max(int(in_channels * reduction), min_channels)``. Every head's logits are divided by the
    temperature; spatial, input-channel and output-channel heads use a sigmoid, the expert head a softmax.

    Args:
        in_channels, out_channels, kernel_size, groups: the convolution's (``kernel_size``: one entry per spatial
            axis, 1 to 3; the spatial head has ``prod(kernel_size)`` outputs).
        num_experts: number of experts (the expert head exists only when > 1).
        reduction: trunk width relative to ``in_channels``. Default 1/16.
        min_channels: smallest trunk width. Default 16.
        temperature: a buffer. Default 1.
        norm: ``'layer'`` (default; works for any batch size, batch 1 in training included), ``'batch'``
            (the reference code's BatchNorm, which fails in training at batch size 1) or ``'none'``.
        init: ``'default'`` (``nn.Linear``'s) or ``'official'``: trunk and heads He normal with fan-out, zero
            biases, norm to identity, as ``Attention._initialize_weights`` in OSVAI/ODConv ``modules/odconv.py``
            (its 1x1 convolutions on the pooled input are these linear layers; fan-out = output features).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], groups: int = 1,
                 num_experts: int = 4, *, reduction: float = 1 / 16, min_channels: int = 16,
                 temperature: float = 1.0, norm: str = "layer", init: str = "default", device=None,
                 dtype=None) -> None:
        super().__init__()
        _positive_int(in_channels, "in_channels")
        _positive_int(out_channels, "out_channels")
        _positive_int(num_experts, "num_experts")
        _positive_int(min_channels, "min_channels")
        positive_number(reduction, "reduction")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        factory = {"device": device, "dtype": dtype}
        self.kernel_size = tuple(kernel_size)
        self.num_experts = num_experts
        hidden = max(int(in_channels * reduction), min_channels)
        self.fc = nn.Linear(in_channels, hidden, bias=False, **factory)
        if norm == "layer":
            self.norm = nn.LayerNorm(hidden, **factory)
        elif norm == "batch":
            self.norm = nn.BatchNorm1d(hidden, **factory)
        else:
            self.norm = nn.Identity()
        positions = math.prod(self.kernel_size)
        depthwise = groups == in_channels and out_channels == in_channels
        self.spatial = nn.Linear(hidden, positions, **factory) if positions > 1 else None
        self.in_channel = nn.Linear(hidden, in_channels, **factory)
        self.out_channel = None if depthwise else nn.Linear(hidden, out_channels, **factory)
        self.expert = nn.Linear(hidden, num_experts, **factory) if num_experts > 1 else None
        self.register_buffer("temperature", torch.tensor(_check_temperature(temperature), device=device, dtype=dtype))
        if _check_init(init) == "official":
            _he_fan_out([self.fc, *self._heads()])  # the norm layers start as the identity already

    def _heads(self) -> list[nn.Linear]:
        return [h for h in (self.spatial, self.in_channel, self.out_channel, self.expert) if h is not None]

    def forward(self, x: Tensor) -> Attentions:
        """``x``: ``(B, C_in, H, W)`` (any rank: ``(B, C_in, *spatial)``) -> :class:`Attentions`."""
        if isinstance(self.norm, nn.BatchNorm1d) and self.norm.training and x.shape[0] == 1:
            raise ValueError("OmniRouter with norm='batch' cannot train on a batch of 1 (BatchNorm needs more than "
                             "one value per channel): use norm='layer' (the default) or norm='none', or keep the "
                             "BatchNorm layers in eval mode (norm_eval=True)")
        h = F.relu(self.norm(self.fc(_pooled(x))))
        t = _in_dtype(self.temperature, h.dtype)
        spatial = None
        if self.spatial is not None:
            spatial = torch.sigmoid(self.spatial(h) / t).reshape(-1, *self.kernel_size)
        in_channel = torch.sigmoid(self.in_channel(h) / t)
        out_channel = None if self.out_channel is None else torch.sigmoid(self.out_channel(h) / t)
        expert = None if self.expert is None else torch.softmax(self.expert(h) / t, dim=1)
        return Attentions(expert, spatial, in_channel, out_channel)

    def zero_(self) -> OmniRouter:
        """Constant attentions (0.5 for sigmoid heads, ``1/E`` for experts) for function-preserving conversion."""
        for head in self._heads():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return self

    def constant_gain(self) -> float:
        """Output scale of the zeroed router relative to one expert kernel: ``0.5`` per sigmoid head."""
        sigmoid_heads = sum(h is not None for h in (self.spatial, self.in_channel, self.out_channel))
        return 0.5**sigmoid_heads


#: Every router class of the package (the MAC counter, the model initialiser and the routing analysis use it).
ROUTERS = (SigmoidRouter, SoftmaxRouter, OmniRouter)


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the ``temperature`` buffer of every router in ``model`` (in place). Returns how many were set.

    Softmax routers (DynamicConv, ODConv) take a positive temperature; a module with a ``temperature_bounds``
    attribute ``(low, high)`` takes a value in that closed range instead (KernelWarehouse's attention: [0, 1], its
    one-hot blend weight, annealed 1 -> 0). A value a module cannot take raises ``ValueError`` before any is set.
    """
    targets = [m for m in model.modules()
               if isinstance(getattr(m, "temperature", None), Tensor) and "temperature" in m._buffers]
    if not targets or any(getattr(m, "temperature_bounds", None) is None for m in targets):
        _check_temperature(temperature)
    for module in targets:
        bounds = getattr(module, "temperature_bounds", None)
        if bounds is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                   or not bounds[0] <= temperature <= bounds[1]):
            raise ValueError(f"temperature must be a number in [{bounds[0]}, {bounds[1]}] for "
                             f"{type(module).__name__}, got {temperature!r}")
    for module in targets:
        module.temperature.fill_(float(temperature))
    return len(targets)


class TemperatureSchedule:
    """Linear temperature annealing from ``start`` to ``end`` over ``iterations`` steps, then flat.

    DynamicConv and ODConv anneal 30 -> 1 over the first 10 epochs' iterations; KernelWarehouse 1 -> 0 over its first
    ``temp_epoch`` (20 by default, 15 for MobileNetV2) epochs.

    Example:
        >>> sched = TemperatureSchedule(30.0, 1.0, iterations=100)
        >>> sched.value(0), sched.value(50), sched.value(1000)
        (30.0, 15.5, 1.0)
    """

    def __init__(self, start: float = 30.0, end: float = 1.0, iterations: int = 1000) -> None:
        self.start = _check_temperature(start)
        # end 0 is KernelWarehouse's (its one-hot blend weight); softmax routers refuse it when it is set
        self.end = 0.0 if end == 0 and not isinstance(end, bool) else _check_temperature(end)
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
        self.iterations = iterations

    def value(self, step: int) -> float:
        """Temperature at ``step`` (0-based)."""
        if self.iterations == 0 or step >= self.iterations:
            return self.end
        frac = max(step, 0) / self.iterations
        return self.start + (self.end - self.start) * frac

    def step(self, model: nn.Module, step: int) -> float:
        """Set the temperature of every router in ``model`` for ``step``; returns the value."""
        value = self.value(step)
        set_temperature(model, value)
        return value

    def __repr__(self) -> str:
        return f"TemperatureSchedule(start={self.start}, end={self.end}, iterations={self.iterations})"
