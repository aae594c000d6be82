"""The execution engine: convolution with a per-example mixture of expert kernels.

Implements ``y_b = conv(x_b, sum_e r[b, e] * W_e [* s_b]) + sum_e r[b, e] * bias_e`` for every example ``b`` of a
batch, the operation behind CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for
Efficient Inference", NeurIPS 2019, arXiv:1904.04971), DynamicConv (Chen et al., CVPR 2020, arXiv:1912.03458) and
ODConv (Li et al., ICLR 2022, arXiv:2209.07947; ``s`` is its spatial attention).

Several mathematically identical strategies compute it; which one is fastest depends on the shape:

``grouped``
    Mix one kernel per example, fold the batch into the channel axis and run one grouped convolution
    (``groups = B * groups``). The method of the paper. Good for depthwise layers, poor for dense ones on CPU.
``experts``
    One dense convolution with every expert stacked on the output axis, then a routing-weighted sum. Costs
    ``E`` times the static convolution but has no per-example kernel, so it exports with a dynamic batch.
``bmm``
    Mix one kernel per example and apply it with a batched matrix multiply: directly for 1x1 kernels, after
    ``unfold`` (im2col) for larger ones.
``single``
    Batch size 1: a plain convolution with the one mixed kernel.
``scan``
    Mix one kernel per example and run one plain convolution per example. Under ``torch.export`` (and the
    dynamo-based ONNX exporter) the loop is a ``scan`` that keeps the batch symbolic (ONNX ``Scan`` around one
    ``Conv``): an exported graph that takes any batch size and costs, at batch 1, one convolution with the mixed
    kernel. Eager, it is a loop over the examples (``auto`` picks it for CPU inference of large dense kxk layers).
``triton``
    Fused Triton kernels (:mod:`condconv.nn.ops.triton_conv`, CUDA; on CPU tensors only under Triton's interpreter):
    the experts are mixed tile by tile inside an implicit GEMM, forward and backward, ODConv's channel attentions
    and the mixed bias included, so no per-example kernel is ever stored. ``auto`` does not pick it yet (no GPU
    measurement was available to say where it wins); force it per layer or with :func:`use_strategy`.
``auto``
    Picks one of the above per call from the shapes (see :func:`select_strategy`).

The choice can be forced per call (``strategy=``), per layer (the layers' ``strategy`` attribute) or globally
(:func:`use_strategy`, :func:`set_default_strategy`).

Every strategy but ``triton`` is rank-generic: one code path serves 1-D, 2-D and 3-D convolutions (the rank is read
from the expert bank, ``weight.dim() - 3``). :func:`dynamic_conv` is the rank-generic entry point;
:func:`dynamic_conv1d`, :func:`dynamic_conv2d` and :func:`dynamic_conv3d` are it with the rank checked. ``triton``
is 2-D only and raises ``ValueError`` for other ranks.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from condconv.nn.ops import cpu_tiled, decomposed
from condconv.nn.ops.context import autocast_dtype, autocast_on, is_exporting, is_tracing, needs_grad, tracing_kind
from condconv.nn.ops.cpu_tiled import clear_workspace
from condconv.nn.ops.decomposed import CONV_FUNCTIONS, mix_kernels
from condconv.nn.ops.shapes import output_size
from condconv.utils.checks import is_integer, positive_int

__all__ = [
    "STRATEGIES",
    "PADDING_MODES",
    "dynamic_conv",
    "dynamic_conv1d",
    "dynamic_conv2d",
    "dynamic_conv3d",
    "conv_with_kernels",
    "mix_kernels",
    "select_strategy",
    "use_strategy",
    "set_default_strategy",
    "get_default_strategy",
    "conv_output_size",
    "resolve_padding",
    "clear_workspace",
]

STRATEGIES = ("auto", "grouped", "experts", "bmm", "single", "scan", "triton")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# The CPU ``bmm`` path runs through a custom autograd function with reused buffers (condconv.nn.ops.cpu_tiled); False
# falls back to plain autograd over mix_kernels + matmul (both are tested against the reference).
FUSED_CPU = True

_state = threading.local()
_global_default = ["auto"]


def _check_strategy(name: object, argname: str = "strategy") -> str:
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"{argname} must be one of {STRATEGIES}, got {name!r}")
    return name


def set_default_strategy(name: str) -> None:
    """Set the process-wide default strategy used when a call or layer asks for none (initially ``'auto'``)."""
    _global_default[0] = _check_strategy(name)


def get_default_strategy() -> str:
    """The strategy in force: the innermost :func:`use_strategy`, else the process-wide default."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _global_default[0]


def _forced_strategy() -> str | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def use_strategy(name: str) -> Iterator[None]:
    """Force one strategy for every dynamic convolution run inside the block (overrides per-layer settings).

    Example:
        >>> with condconv.use_strategy("grouped"):
        ...     y = layer(x)
    """
    _check_strategy(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


#: Names of the spatial axes of a convolution of each rank (for messages).
SPATIAL_AXES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}
_TUPLE_NAMES = {1: "a 1-tuple", 2: "a pair", 3: "a triple"}


def _ntuple(value: int | Sequence[int], rank: int, name: str) -> tuple[int, ...]:
    """``value`` as ``rank`` ints: an int is repeated, a sequence must have ``rank`` ints (``TypeError`` otherwise)."""
    if is_integer(value):  # numpy ints and anything with __index__, as nn.Conv2d takes them
        return (operator.index(value),) * rank
    if isinstance(value, Sequence) and len(value) == rank and all(is_integer(v) for v in value):
        return tuple(operator.index(v) for v in value)
    raise TypeError(f"{name} must be an int or {_TUPLE_NAMES[rank]} of ints, got {value!r}")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    return _ntuple(value, 2, name)  # type: ignore[return-value]


def resolve_padding(
    padding: int | Sequence[int] | str,
    kernel_size: Sequence[int],
    stride: Sequence[int] | None = None,
    dilation: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Padding in the order :func:`torch.nn.functional.pad` takes: last axis first, ``(before, after)`` per axis;
    in 2-D ``(left, right, top, bottom)``.

    Accepts what :class:`torch.nn.Conv1d` / ``Conv2d`` / ``Conv3d`` accept (the rank is ``len(kernel_size)``): an
    int, one int per spatial axis, ``'valid'`` or ``'same'`` (stride 1 only; asymmetric for even effective kernels,
    the extra element going after). ``stride`` and ``dilation`` default to 1 on every axis.
    """
    rank = len(kernel_size)
    stride = (1,) * rank if stride is None else tuple(stride)
    dilation = (1,) * rank if dilation is None else tuple(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * (2 * rank)
        if padding == "same":
            if stride != (1,) * rank:
                raise ValueError(f"padding='same' requires stride 1, got stride={stride}")
            pads = []
            for k, d in zip(reversed(kernel_size), reversed(dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        raise ValueError(f"padding must be an int, {_TUPLE_NAMES[rank]} of ints, 'same' or 'valid', got {padding!r}")
    per_axis = _ntuple(padding, rank, "padding")
    if min(per_axis) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return tuple(p for p in reversed(per_axis) for _ in range(2))


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad_before: int, pad_after: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def select_strategy(
    batch: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    groups: int,
    num_experts: int,
    out_hw: Sequence[int],
    *,
    spatial: bool = False,
    device: torch.device | str = "cpu",
    tracing: bool | str | None = False,
    training: bool = False,
) -> str:
    """The strategy ``'auto'`` resolves to for one call.

    Rules, from the layer and model benchmarks (``condconv bench layers|models``; figures in the README):

    - exported with a dynamic batch by ``torch.export`` or the dynamo-based ONNX exporter (``tracing='export'``):
      ``'bmm'`` for dense 1x1 layers (one batched matmul), ``'scan'`` otherwise (one convolution per example in a
      ``scan`` loop: at batch 1 the cost of the static convolution with the mixed kernel);
    - traced by ``torch.jit`` (``'jit'``, also the TorchScript-based ONNX exporter) or compiled (``'compile'``;
      ``True`` means the same): ``'bmm'`` for dense 1x1 layers, ``'experts'`` otherwise — neither has a
      batch-dependent ``groups``, so the graph takes any batch — except that compiled kxk layers with a spatial
      attention (ODConv) take ``'bmm'`` rather than the ``kh * kw`` convolutions ``'experts'`` needs for them;
    - a static-batch export (``'static'``) and eager calls: the eager rules below;
    - batch 1: ``'single'`` (a plain convolution with the one mixed kernel);
    - dense 1x1 layers: ``'bmm'`` (a batched matmul; on the CPU tiled with reused buffers);
    - dense kxk layers on CUDA: ``'bmm'``; on the CPU ``'grouped'`` (oneDNN's grouped convolution), except for large
      kernels (``C_out * C_in`` of 32768 or more) in inference, which take ``'scan'`` (one oneDNN convolution per
      example, right after its kernel is mixed: 1.6-1.7x the static convolution for 3x3 256->256 at 14x14, batch 32,
      where the grouped convolution took 1.8-2.3x); in training (``training``: autograd records the call) the
      per-example backward is slower than the grouped one;
    - depthwise and other grouped layers: ``'grouped'``.

    ``num_experts`` and ``out_hw`` are accepted so that measured tables can refine the rule without an API change.
    """
    pointwise = all(k == 1 for k in kernel_size)  # any rank: the rules do not depend on it
    kind = "compile" if tracing is True else (tracing or None)
    if kind == "export":
        return "bmm" if (pointwise and groups == 1) or not decomposed.SCAN_TRACEABLE else "scan"
    if kind in ("jit", "compile"):
        dense_pointwise = pointwise and groups == 1
        return "bmm" if dense_pointwise or (kind == "compile" and spatial and not pointwise) else "experts"
    if batch <= 1:
        return "single"
    if groups > 1:
        return "grouped"
    if pointwise:
        return "bmm"
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device_type == "cuda":
        return "bmm"
    return "scan" if out_channels * in_channels >= 32768 and not training else "grouped"


class _Call(NamedTuple):
    """A validated call: shapes and the convolution geometry, one entry per spatial axis (``pads`` in
    :func:`torch.nn.functional.pad`'s order, e.g. ``(left, right, top, bottom)``; ``out_hw`` the output's spatial
    size, ``(H_out, W_out)`` in 2-D)."""

    batch: int
    in_channels: int
    out_channels: int
    num_experts: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    out_hw: tuple[int, ...]

    @property
    def rank(self) -> int:
        """Spatial dimensions of the convolution (1, 2 or 3)."""
        return len(self.kernel_size)


_KERNEL_AXES = {1: "k", 2: "kh, kw", 3: "kd, kh, kw"}


def _weight_layout(rank: int) -> str:
    return f"{rank + 3}-D (num_experts, out_channels, in_channels // groups, {_KERNEL_AXES[rank]})"


def _check_tensors(x, weight, routing, bias, spatial, rank: int | None = None) -> None:
    for name, value in (("x", x), ("weight", weight), ("routing", routing), ("bias", bias), ("spatial", spatial)):
        if not isinstance(value, Tensor) and (value is not None or name in ("x", "weight", "routing")):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if rank is not None and weight.dim() != rank + 3:
        raise ValueError(f"weight must be {_weight_layout(rank)}, got shape {tuple(weight.shape)}")
    if weight.dim() not in (4, 5, 6):
        raise ValueError(f"weight must be 4-D, 5-D or 6-D (num_experts, out_channels, in_channels // groups, "
                         f"*kernel_size) for a 1-D, 2-D or 3-D convolution, got shape {tuple(weight.shape)}")
    rank = weight.dim() - 3
    if x.dim() != rank + 2:
        raise ValueError(f"input must be {rank + 2}-D (batch, channels, {', '.join(SPATIAL_AXES[rank])}) for a "
                         f"{weight.dim()}-D weight, got shape {tuple(x.shape)}")


def _check_scales(in_scale: Tensor | None, out_scale: Tensor | None, batch: int, in_channels: int,
                  out_channels: int) -> None:
    for name, value, channels in (("in_scale", in_scale, in_channels), ("out_scale", out_scale, out_channels)):
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        if tuple(value.shape) != (batch, channels):
            raise ValueError(f"{name} must have shape (batch, channels) = ({batch}, {channels}), "
                             f"got {tuple(value.shape)}")


def _check_wrap_padding(padding_mode: str, pads: tuple[int, ...], size: Sequence[int]) -> None:
    """``'reflect'`` padding must be smaller than the input, ``'circular'`` at most its size (PyTorch's rule);
    ``pads`` in :func:`torch.nn.functional.pad`'s order (last axis first), ``size`` the input's spatial size."""
    if padding_mode not in ("reflect", "circular"):
        return
    rank = len(size)
    for i, extent in enumerate(size):
        pad = max(pads[2 * (rank - 1 - i)], pads[2 * (rank - 1 - i) + 1])
        if (pad >= extent) if padding_mode == "reflect" else (pad > extent):
            bound = "smaller than" if padding_mode == "reflect" else "at most"
            axis = SPATIAL_AXES[rank][i]
            shape = "x".join(str(s) for s in size)
            raise ValueError(f"padding_mode={padding_mode!r} needs padding {bound} the input: padding {pad} along "
                             f"the {axis} of a {shape} input (use a larger input, less padding or "
                             "padding_mode='zeros'/'replicate')")


def _validate(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, stride, padding, dilation,
              groups: int, padding_mode: str, spatial: Tensor | None, rank: int | None = None) -> _Call:
    """Check a call's arguments (``ValueError``/``TypeError`` naming the argument) and work out its geometry.

    ``rank``: the spatial rank the caller requires (``None``: the expert bank's, ``weight.dim() - 3``)."""
    _check_tensors(x, weight, routing, bias, spatial, rank)
    experts, out_channels, in_per_group, *kernel = weight.shape
    kernel = tuple(kernel)
    rank = len(kernel)
    positive_int(groups, "groups")
    if out_channels % groups:
        raise ValueError(f"weight's out_channels ({out_channels}) must be divisible by groups ({groups})")
    batch, in_channels, *size = x.shape
    if in_channels != in_per_group * groups:
        raise ValueError(f"input has {in_channels} channels, expected {in_per_group * groups} "
                         f"(weight's in_channels // groups = {in_per_group}, groups = {groups})")
    if routing.dim() != 2 or routing.shape[0] != batch or routing.shape[1] != experts:
        raise ValueError(f"routing must have shape (batch, num_experts) = ({batch}, {experts}), "
                         f"got {tuple(routing.shape)}")
    if bias is not None and tuple(bias.shape) != (experts, out_channels):
        raise ValueError(f"bias must have shape (num_experts, out_channels) = ({experts}, {out_channels}), "
                         f"got {tuple(bias.shape)}")
    if spatial is not None and tuple(spatial.shape) != (batch, *kernel):
        raise ValueError(f"spatial must have shape (batch, {_KERNEL_AXES[rank]}) = {(batch, *kernel)}, "
                         f"got {tuple(spatial.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    stride_ = _ntuple(stride, rank, "stride")
    dilation_ = _ntuple(dilation, rank, "dilation")
    if min(stride_) < 1 or min(dilation_) < 1:
        raise ValueError(f"stride and dilation must be positive, got stride={stride!r}, dilation={dilation!r}")
    pads = resolve_padding(padding, kernel, stride_, dilation_)
    _check_wrap_padding(padding_mode, pads, size)
    out = output_size(size, kernel, stride_, pads, dilation_)
    if min(out) < 1:
        def shape(values) -> str:
            return "x".join(str(v) for v in values)

        raise ValueError(f"input of size {shape(size)} is too small for a {shape(kernel)} kernel "
                         f"(dilation {dilation_}, padding {pads}): output would be {shape(out)}")
    return _Call(batch, in_channels, out_channels, experts, kernel, stride_, dilation_, pads, out)


def dynamic_conv2d(
    x: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    *,
    spatial: Tensor | None = None,
    in_scale: Tensor | None = None,
    out_scale: Tensor | None = None,
    strategy: str = "auto",
) -> Tensor:
    """Convolution of each example with its own mixture of expert kernels.

    Computes, for every example ``b``: ``out_scale[b] * conv(in_scale[b] * x[b], sum_e routing[b, e] * weight[e] *
    spatial[b]) + sum_e routing[b, e] * bias[e]``, with the semantics of :func:`torch.nn.functional.conv2d` (and of
    :class:`torch.nn.Conv2d` for ``padding_mode``); the channel scales broadcast over the spatial axes.

    Args:
        x: input ``(B, C_in, H, W)``; any memory format.
        weight: expert kernels ``(E, C_out, C_in // groups, kh, kw)``.
        routing: mixing weights ``(B, E)``.
        bias: optional per-expert bias ``(E, C_out)``, mixed like the kernels.
        stride, padding, dilation, groups, padding_mode: as in :class:`torch.nn.Conv2d`.
        spatial: optional ``(B, kh, kw)`` per-example multiplier of kernel positions (ODConv's spatial attention).
        in_scale: optional ``(B, C_in)`` per-example scale of the input channels (ODConv's input-channel attention).
        out_scale: optional ``(B, C_out)`` per-example scale of the output channels, applied before the bias
            (ODConv's output-channel attention).
        strategy: one of :data:`STRATEGIES`. ``'auto'`` defers to :func:`use_strategy` if active, else picks from
            the shapes. An explicit strategy is honoured, except that :func:`use_strategy` overrides everything.

    Returns:
        ``(B, C_out, H_out, W_out)``.

    :func:`dynamic_conv` is the same for any rank; :func:`dynamic_conv1d` and :func:`dynamic_conv3d` take 1-D and
    3-D convolutions.
    """
    return _checked_call(2, x, weight, routing, bias, stride, padding, dilation, groups, padding_mode, spatial,
                         in_scale, out_scale, strategy)


def dynamic_conv(
    x: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    *,
    spatial: Tensor | None = None,
    in_scale: Tensor | None = None,
    out_scale: Tensor | None = None,
    strategy: str = "auto",
) -> Tensor:
    """:func:`dynamic_conv2d` for a convolution of any rank, read from the expert bank: 1-D, 2-D or 3-D.

    Args:
        x: input ``(B, C_in, *spatial_size)`` with 1, 2 or 3 spatial axes.
        weight: expert kernels ``(E, C_out, C_in // groups, *kernel_size)``, one kernel axis per spatial axis.
        routing: mixing weights ``(B, E)``.
        bias: optional per-expert bias ``(E, C_out)``.
        stride, padding, dilation, groups, padding_mode: as in :class:`torch.nn.Conv1d` / ``Conv2d`` / ``Conv3d``
            (an int, or one int per spatial axis).
        spatial: optional ``(B, *kernel_size)`` per-example multiplier of the kernel positions.
        in_scale, out_scale: optional ``(B, C_in)`` / ``(B, C_out)`` per-example channel scales.
        strategy: one of :data:`STRATEGIES`; ``'triton'`` is 2-D only (``ValueError`` for other ranks).

    Returns:
        ``(B, C_out, *out_size)``.
    """
    return _checked_call(None, x, weight, routing, bias, stride, padding, dilation, groups, padding_mode, spatial,
                         in_scale, out_scale, strategy)


def _checked_call(rank: int | None, x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, stride, padding,
                  dilation, groups: int, padding_mode: str, spatial: Tensor | None, in_scale: Tensor | None,
                  out_scale: Tensor | None, strategy: str) -> Tensor:
    """Validate (requiring spatial rank ``rank`` unless None) and run one dynamic convolution."""
    _check_strategy(strategy)
    call = _validate(x, weight, routing, bias, stride, padding, dilation, groups, padding_mode, spatial, rank)
    _check_scales(in_scale, out_scale, call.batch, call.in_channels, call.out_channels)
    return _run_validated(x, weight, routing, bias, groups, padding_mode, spatial, strategy, call, in_scale, out_scale)


def dynamic_conv1d(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None = None,
                   stride: int | Sequence[int] = 1, padding: int | Sequence[int] | str = 0,
                   dilation: int | Sequence[int] = 1, groups: int = 1, padding_mode: str = "zeros", *,
                   spatial: Tensor | None = None, in_scale: Tensor | None = None, out_scale: Tensor | None = None,
                   strategy: str = "auto") -> Tensor:
    """:func:`dynamic_conv2d` in 1-D: ``x (B, C_in, L)``, ``weight (E, C_out, C_in // groups, k)``, ``spatial
    (B, k)``, the semantics of :func:`torch.nn.functional.conv1d` -> ``(B, C_out, L_out)``."""
    return _checked_call(1, x, weight, routing, bias, stride, padding, dilation, groups, padding_mode, spatial,
                         in_scale, out_scale, strategy)


def dynamic_conv3d(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None = None,
                   stride: int | Sequence[int] = 1, padding: int | Sequence[int] | str = 0,
                   dilation: int | Sequence[int] = 1, groups: int = 1, padding_mode: str = "zeros", *,
                   spatial: Tensor | None = None, in_scale: Tensor | None = None, out_scale: Tensor | None = None,
                   strategy: str = "auto") -> Tensor:
    """:func:`dynamic_conv2d` in 3-D: ``x (B, C_in, D, H, W)``, ``weight (E, C_out, C_in // groups, kd, kh, kw)``,
    ``spatial (B, kd, kh, kw)``, the semantics of :func:`torch.nn.functional.conv3d` -> ``(B, C_out, D_out, H_out,
    W_out)``."""
    return _checked_call(3, x, weight, routing, bias, stride, padding, dilation, groups, padding_mode, spatial,
                         in_scale, out_scale, strategy)


def _per_channel(scale: Tensor, rank: int) -> Tensor:
    """``(B, C)`` -> ``(B, C, 1, ...)``, broadcasting over ``rank`` spatial axes."""
    return scale.reshape(*scale.shape, *(1,) * rank)


def _run_validated(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, groups: int, padding_mode: str,
                   spatial: Tensor | None, strategy: str, call: _Call, in_scale: Tensor | None = None,
                   out_scale: Tensor | None = None) -> Tensor:
    """:func:`dynamic_conv` after :func:`_validate` (the layers call it with a validation cached per input shape)."""
    kind = tracing_kind()
    autocast = autocast_on(x.device.type)
    if routing.dtype != weight.dtype and not autocast:  # the kernels are mixed in the experts' dtype
        routing = routing.to(weight.dtype)
    if spatial is not None and spatial.dtype != weight.dtype and not autocast:
        spatial = spatial.to(weight.dtype)
    if call.batch == 0:
        dtype = torch.promote_types(x.dtype, weight.dtype)
        out = x.new_zeros((0, call.out_channels, *call.out_hw), dtype=dtype)
        # keep the graph connected so backward works for an empty batch
        return out + 0 * (weight.sum() + routing.sum() + (bias.sum() if bias is not None else 0))
    chosen = _forced_strategy() or strategy
    if chosen not in STRATEGIES:  # e.g. a layer attribute set around its check: never fall through to a path
        _check_strategy(chosen)
    if chosen == "auto":
        chosen = select_strategy(call.batch, call.in_channels, call.out_channels, call.kernel_size, groups,
                                 call.num_experts, call.out_hw, spatial=spatial is not None, device=x.device,
                                 tracing=kind, training=needs_grad(x, weight, routing, bias, spatial))
    if chosen == "triton" and is_exporting():  # a file format cannot hold the custom operator
        chosen = select_strategy(call.batch, call.in_channels, call.out_channels, call.kernel_size, groups,
                                 call.num_experts, call.out_hw, spatial=spatial is not None, device=x.device,
                                 tracing=kind or "jit")
    if chosen == "single" and call.batch != 1:
        raise ValueError(f"strategy='single' needs batch size 1, got {call.batch}")
    if chosen == "scan" and kind == "jit":
        raise ValueError("strategy='scan' cannot be traced by torch.jit (the loop would fix the batch size): use "
                         "torch.export or the dynamo-based ONNX exporter, or another strategy")
    if chosen == "triton":
        if call.rank != 2:
            raise ValueError(f"strategy='triton' supports 2-D convolutions only, got a {call.rank}-D one: use another "
                             "strategy")
        return _triton(x, weight, routing, bias, spatial, in_scale, out_scale, groups, padding_mode, call)
    if in_scale is not None:
        x = x * _per_channel(in_scale.to(x.dtype), call.rank)
    mixed_bias = None if bias is None else torch.matmul(routing, bias)
    if mixed_bias is not None and out_scale is None and mixed_bias.dtype == x.dtype and not autocast:
        return _execute(chosen, x, weight, routing, spatial, groups, padding_mode, call, mixed_bias)  # bias inside
    out = _execute(chosen, x, weight, routing, spatial, groups, padding_mode, call)
    if out_scale is not None:
        out = out * _per_channel(out_scale.to(out.dtype), call.rank)
    if mixed_bias is not None:
        if mixed_bias.dtype != out.dtype:
            mixed_bias = mixed_bias.to(out.dtype)
        out = out + _per_channel(mixed_bias, call.rank)
    return out


def _triton(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None,
            in_scale: Tensor | None, out_scale: Tensor | None, groups: int, padding_mode: str, call: _Call) -> Tensor:
    """The ``triton`` strategy: one fused call, channel scales and bias included."""
    from condconv.nn.ops import triton_conv

    ok, reason = triton_conv.triton_status(x.device)
    if not ok:
        raise RuntimeError(f"strategy='triton' cannot run here: {reason}")
    pads = call.pads
    if padding_mode != "zeros" and any(pads):
        x, pads = F.pad(x, pads, mode=padding_mode), (0, 0, 0, 0)
    if autocast_on(x.device.type):  # a custom operator is not autocast: compute in the autocast dtype
        x = x.to(autocast_dtype(x.device.type))
    return triton_conv.triton_dynamic_conv2d(x, weight, routing, bias, call.stride, pads, call.dilation, groups,
                                             spatial=spatial, in_scale=in_scale, out_scale=out_scale)


def _padded(x: Tensor, call: _Call, groups: int, padding_mode: str, explicit: bool) -> tuple[Tensor, tuple]:
    """``x`` padded explicitly (``explicit``, a padding mode other than zeros, or asymmetric padding) or left for the
    convolution, and the geometry ``(stride, conv_pad, dilation, groups)`` the strategies take."""
    pads, rank = call.pads, call.rank
    symmetric = all(pads[i] == pads[i + 1] for i in range(0, len(pads), 2))
    if padding_mode != "zeros" or not symmetric or explicit:
        if any(pads):
            x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
        conv_pad = (0,) * rank
    else:
        conv_pad = tuple(pads[2 * (rank - 1 - i)] for i in range(rank))  # (before) per axis, first axis first
    return x, (call.stride, conv_pad, call.dilation, groups)


def _execute(chosen: str, x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None, groups: int,
             padding_mode: str, call: _Call, bias: Tensor | None = None) -> Tensor:
    """Run strategy ``chosen`` (not ``'auto'``); ``bias``: the mixed bias ``(B, C_out)``, added the cheapest way."""
    rank = call.rank
    pointwise = all(k == 1 for k in call.kernel_size)
    x, geometry = _padded(x, call, groups, padding_mode,
                          explicit=(chosen == "bmm" and pointwise) or (chosen == "experts" and spatial is not None))
    conv_pad = geometry[1]
    if chosen == "experts":
        out = decomposed.experts(x, weight, routing, spatial, geometry, call.out_hw)
        return out if bias is None else out + _per_channel(bias, rank)
    if chosen == "bmm":
        if _use_fused(x, weight, routing, spatial):
            return cpu_tiled.fused_bmm(x, weight, routing, spatial, geometry, call.out_hw, bias)
        return cpu_tiled.per_example(decomposed.bmm, x, weight, routing, spatial, geometry, call.out_hw, bias=bias)
    if chosen == "grouped":
        return cpu_tiled.per_example(decomposed.grouped, x, weight, routing, spatial, geometry, call.out_hw,
                                     cpu_tiled.GROUPED_CHUNK_BYTES, bias=bias)
    if chosen == "scan":
        if is_tracing():
            return decomposed.scan(x, mix_kernels(routing, weight, spatial), geometry, call.out_hw, bias)
        return cpu_tiled.per_example(decomposed.scan, x, weight, routing, spatial, geometry, call.out_hw,
                                     cpu_tiled.SCAN_CHUNK_BYTES, bias=bias)
    if chosen != "single" or call.batch != 1:  # the one kernel of example 0 is right for a batch of one only
        raise ValueError(f"strategy {chosen!r} cannot run a batch of {call.batch} (strategy 'single' needs batch "
                         f"size 1; strategies: {STRATEGIES})")
    if _use_fused(x, weight, routing, spatial) and not needs_grad(x, weight, routing, spatial):
        kernel = cpu_tiled.mix_into_workspace(routing, weight, spatial)[0]  # no fresh pages for a big kernel
    else:
        kernel = mix_kernels(routing, weight, spatial)[0]  # single
    return CONV_FUNCTIONS[rank](x, kernel, None if bias is None else bias[0], call.stride, conv_pad, call.dilation,
                                groups)


def _use_fused(x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None) -> bool:
    """Whether the ``bmm`` strategy runs through the chunked, workspace-reusing CPU path."""
    if not FUSED_CPU or x.device.type != "cpu" or is_tracing() or autocast_on("cpu"):
        return False
    return x.dtype == weight.dtype == routing.dtype and (spatial is None or spatial.dtype == x.dtype)


def conv_with_kernels(x: Tensor, kernels: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                      groups: int = 1, padding_mode: str = "zeros", strategy: str = "auto") -> Tensor:
    """Convolve every example with its own, already assembled kernel (KernelWarehouse's per-example kernels).

    The convolution half of :func:`dynamic_conv`, in any rank: the same strategies run it, given the kernels instead
    of experts and routing. ``'experts'`` and ``'triton'`` need an expert bank, which assembled kernels do not have:
    they run as ``'bmm'`` (which, like ``'experts'``, keeps a traced batch symbolic).

    Args:
        x: input ``(B, C_in, *spatial)``, 1, 2 or 3 spatial axes.
        kernels: ``(B, C_out, C_in // groups, *kernel_size)``.
        bias: optional ``(C_out,)`` or per-example ``(B, C_out)``.
        stride, padding, dilation, groups, padding_mode: as in :class:`torch.nn.Conv2d` (``Conv1d``/``Conv3d``).
        strategy: one of :data:`STRATEGIES` (default ``'auto'``; :func:`use_strategy` overrides it).

    Returns:
        ``(B, C_out, *spatial_out)``.
    """
    _check_strategy(strategy)
    for name, value in (("x", x), ("kernels", kernels)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() not in (3, 4, 5) or kernels.dim() != x.dim() + 1 or kernels.shape[0] != x.shape[0]:
        raise ValueError(f"x (B, C_in, *spatial) with 1-3 spatial axes and kernels (B, C_out, C_in // groups, "
                         f"*kernel_size) must match, got shapes {tuple(x.shape)} and {tuple(kernels.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape[-1] != kernels.shape[1] or bias.dim() > 2):
        raise ValueError(f"bias must be a tensor (C_out,) or (B, C_out) with C_out = {kernels.shape[1]}")
    shape_only = {"dtype": kernels.dtype, "device": "meta"}  # _validate reads shapes: one "expert", unit routing
    call = _validate(x, torch.empty((1, *kernels.shape[1:]), **shape_only), torch.empty((x.shape[0], 1), **shape_only),
                     None, stride, padding, dilation, groups, padding_mode, None)
    if call.batch == 0:
        out = x.new_zeros((0, call.out_channels, *call.out_hw), dtype=torch.promote_types(x.dtype, kernels.dtype))
        return out + 0 * kernels.sum()
    chosen = _forced_strategy() or strategy
    if chosen == "auto":
        chosen = select_strategy(call.batch, call.in_channels, call.out_channels, call.kernel_size, groups, 1,
                                 call.out_hw, tracing=tracing_kind(), device=x.device,
                                 training=needs_grad(x, kernels))
    chosen = "bmm" if chosen in ("experts", "triton") else chosen
    if chosen == "single" and call.batch != 1:
        raise ValueError(f"strategy='single' needs batch size 1, got {call.batch}")
    pointwise = all(k == 1 for k in call.kernel_size)
    x, geometry = _padded(x, call, groups, padding_mode, explicit=chosen == "bmm" and pointwise)
    per_example = None if bias is None else bias.expand(call.batch, call.out_channels)
    if kernels.dtype != x.dtype and not autocast_on(x.device.type):
        kernels = kernels.to(x.dtype)
    if per_example is not None and per_example.dtype != x.dtype and not autocast_on(x.device.type):
        per_example = per_example.to(x.dtype)
    if chosen in ("grouped", "bmm", "scan"):
        return getattr(decomposed, chosen)(x, kernels, geometry, call.out_hw, per_example)
    return CONV_FUNCTIONS[call.rank](x, kernels[0], None if per_example is None else per_example[0], call.stride,
                                    geometry[1], call.dilation, groups)
