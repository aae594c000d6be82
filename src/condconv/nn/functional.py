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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from condconv.nn.ops import cpu_tiled, decomposed
from condconv.nn.ops.context import autocast_dtype, autocast_on, is_exporting, is_tracing, needs_grad, tracing_kind
from condconv.nn.ops.cpu_tiled import clear_workspace
from condconv.nn.ops.decomposed import mix_kernels
from condconv.utils.checks import positive_int

__all__ = [
    "STRATEGIES",
    "PADDING_MODES",
    "dynamic_conv2d",
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


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in value):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def resolve_padding(
    padding: int | Sequence[int] | str,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (1, 1),
    dilation: Sequence[int] = (1, 1),
) -> tuple[int, int, int, int]:
    """Padding as ``(left, right, top, bottom)``, the order :func:`torch.nn.functional.pad` takes.

    Accepts what :class:`torch.nn.Conv2d` accepts: an int, a pair ``(h, w)``, ``'valid'`` or ``'same'``
    (stride 1 only; asymmetric for even effective kernels, the extra row/column going right/bottom).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if tuple(stride) != (1, 1):
                raise ValueError(f"padding='same' requires stride 1, got stride={tuple(stride)}")
            pads = []
            for k, d in zip(reversed(kernel_size), reversed(dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)  # type: ignore[return-value]
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (pw, pw, ph, ph)


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
    kh, kw = kernel_size
    pointwise = kh == 1 and kw == 1
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
    """A validated call: shapes and the convolution geometry (padding as ``(left, right, top, bottom)``)."""

    batch: int
    in_channels: int
    out_channels: int
    num_experts: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    out_hw: tuple[int, int]


def _check_tensors(x, weight, routing, bias, spatial) -> None:
    for name, value in (("x", x), ("weight", weight), ("routing", routing), ("bias", bias), ("spatial", spatial)):
        if not isinstance(value, Tensor) and (value is not None or name in ("x", "weight", "routing")):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be 5-D (num_experts, out_channels, in_channels // groups, kh, kw), "
                         f"got shape {tuple(weight.shape)}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (batch, channels, height, width), got shape {tuple(x.shape)}")


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


def _validate(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, stride, padding, dilation,
              groups: int, padding_mode: str, spatial: Tensor | None) -> _Call:
    """Check a call's arguments (``ValueError``/``TypeError`` naming the argument) and work out its geometry."""
    _check_tensors(x, weight, routing, bias, spatial)
    experts, out_channels, in_per_group, kh, kw = weight.shape
    positive_int(groups, "groups")
    if out_channels % groups:
        raise ValueError(f"weight's out_channels ({out_channels}) must be divisible by groups ({groups})")
    batch, in_channels, height, width = x.shape
    if in_channels != in_per_group * groups:
        raise ValueError(f"input has {in_channels} channels, expected {in_per_group * groups} "
                         f"(weight's in_channels // groups = {in_per_group}, groups = {groups})")
    if routing.dim() != 2 or routing.shape[0] != batch or routing.shape[1] != experts:
        raise ValueError(f"routing must have shape (batch, num_experts) = ({batch}, {experts}), "
                         f"got {tuple(routing.shape)}")
    if bias is not None and tuple(bias.shape) != (experts, out_channels):
        raise ValueError(f"bias must have shape (num_experts, out_channels) = ({experts}, {out_channels}), "
                         f"got {tuple(bias.shape)}")
    if spatial is not None and tuple(spatial.shape) != (batch, kh, kw):
        raise ValueError(f"spatial must have shape (batch, kh, kw) = ({batch}, {kh}, {kw}), "
                         f"got {tuple(spatial.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    stride_ = _pair(stride, "stride")
    dilation_ = _pair(dilation, "dilation")
    if min(stride_) < 1 or min(dilation_) < 1:
        raise ValueError(f"stride and dilation must be positive, got stride={stride!r}, dilation={dilation!r}")
    pads = resolve_padding(padding, (kh, kw), stride_, dilation_)
    out_h = conv_output_size(height, kh, stride_[0], dilation_[0], pads[2], pads[3])
    out_w = conv_output_size(width, kw, stride_[1], dilation_[1], pads[0], pads[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"input of size {height}x{width} is too small for a {kh}x{kw} kernel "
                         f"(dilation {dilation_}, padding {pads}): output would be {out_h}x{out_w}")
    return _Call(batch, in_channels, out_channels, experts, (kh, kw), stride_, dilation_, pads, (out_h, out_w))


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
    """
    _check_strategy(strategy)
    call = _validate(x, weight, routing, bias, stride, padding, dilation, groups, padding_mode, spatial)
    _check_scales(in_scale, out_scale, call.batch, call.in_channels, call.out_channels)
    return _run_validated(x, weight, routing, bias, groups, padding_mode, spatial, strategy, call, in_scale, out_scale)


def _run_validated(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, groups: int, padding_mode: str,
                   spatial: Tensor | None, strategy: str, call: _Call, in_scale: Tensor | None = None,
                   out_scale: Tensor | None = None) -> Tensor:
    """:func:`dynamic_conv2d` after :func:`_validate` (the layers call it with a validation cached per input shape)."""
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
        return _triton(x, weight, routing, bias, spatial, in_scale, out_scale, groups, padding_mode, call)
    if in_scale is not None:
        x = x * in_scale.to(x.dtype)[:, :, None, None]
    mixed_bias = None if bias is None else torch.matmul(routing, bias)
    if mixed_bias is not None and out_scale is None and mixed_bias.dtype == x.dtype and not autocast:
        return _execute(chosen, x, weight, routing, spatial, groups, padding_mode, call, mixed_bias)  # bias inside
    out = _execute(chosen, x, weight, routing, spatial, groups, padding_mode, call)
    if out_scale is not None:
        out = out * out_scale.to(out.dtype)[:, :, None, None]
    if mixed_bias is not None:
        if mixed_bias.dtype != out.dtype:
            mixed_bias = mixed_bias.to(out.dtype)
        out = out + mixed_bias.reshape(-1, call.out_channels, 1, 1)
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


def _execute(chosen: str, x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None, groups: int,
             padding_mode: str, call: _Call, bias: Tensor | None = None) -> Tensor:
    """Run strategy ``chosen`` (not ``'auto'``); ``bias``: the mixed bias ``(B, C_out)``, added the cheapest way."""
    pads = call.pads
    # Explicit padding unless it is symmetric zero padding the convolution can do itself.
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    if padding_mode != "zeros" or not symmetric or (chosen == "bmm" and call.kernel_size == (1, 1)) or \
            (chosen == "experts" and spatial is not None):
        if any(pads):
            x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
        conv_pad = (0, 0)
    else:
        conv_pad = (pads[2], pads[0])
    geometry = (call.stride, conv_pad, call.dilation, groups)
    if chosen == "experts":
        out = decomposed.experts(x, weight, routing, spatial, geometry, call.out_hw)
        return out if bias is None else out + bias.reshape(-1, call.out_channels, 1, 1)
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
    if _use_fused(x, weight, routing, spatial) and not needs_grad(x, weight, routing, spatial):
        kernel = cpu_tiled.mix_into_workspace(routing, weight, spatial)[0]  # no fresh pages for a big kernel
    else:
        kernel = mix_kernels(routing, weight, spatial)[0]  # single
    return F.conv2d(x, kernel, None if bias is None else bias[0], call.stride, conv_pad, call.dilation, groups)


def _use_fused(x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None) -> bool:
    """Whether the ``bmm`` strategy runs through the chunked, workspace-reusing CPU path."""
    if not FUSED_CPU or x.device.type != "cpu" or is_tracing() or autocast_on("cpu"):
        return False
    return x.dtype == weight.dtype == routing.dtype and (spatial is None or spatial.dtype == x.dtype)


def _nd_pads(padding, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """Padding of an N-d convolution as :func:`torch.nn.functional.pad` takes it (last axis first, before/after)."""
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * n)
        if padding != "same":
            raise ValueError(f"padding must be an int, a tuple of ints, 'same' or 'valid', got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError(f"padding='same' requires stride 1, got stride={tuple(stride)}")
        pads = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            pads += [d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2]
        return pads
    values = [padding] * n if isinstance(padding, int) and not isinstance(padding, bool) else padding
    if not isinstance(values, Sequence) or len(values) != n or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"padding must be a non-negative int or {n} of them, got {padding!r}")
    return [p for v in reversed(values) for p in (v, v)]


def _kernels_nd(x: Tensor, kernels: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                padding_mode: str) -> Tensor:
    """3-D inputs: per-example kernels by the grouped trick (batch folded into the groups)."""
    n, conv = 3, F.conv3d
    stride_, dilation_ = ((v,) * n if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
                          for v in (stride, dilation))
    pads = _nd_pads(padding, kernels.shape[3:], stride_, dilation_)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
    batch = x.shape[0]
    if batch == 0:  # the output's shape from a shape-only convolution; keep the graph connected
        probe = conv(torch.empty((1, *x.shape[1:]), device="meta"), torch.empty(kernels.shape[1:], device="meta"),
                     None, stride_, 0, dilation_, groups)
        return x.new_zeros((0, *probe.shape[1:])) + 0 * kernels.sum()
    flat_bias = None if bias is None else bias.expand(batch, kernels.shape[1]).reshape(-1)
    out = conv(x.reshape(1, -1, *x.shape[2:]), kernels.reshape(-1, *kernels.shape[2:]), flat_bias, stride_, 0,
               dilation_, batch * groups)
    return out.reshape(batch, kernels.shape[1], *out.shape[2:])


def conv_with_kernels(x: Tensor, kernels: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                      groups: int = 1, padding_mode: str = "zeros", strategy: str = "auto") -> Tensor:
    """Convolve every example with its own, already assembled kernel (KernelWarehouse's per-example kernels).

    The convolution half of :func:`dynamic_conv2d`: the same strategies run it, given the kernels instead of
    experts and routing. ``'experts'`` and ``'triton'`` need an expert bank, which assembled kernels do not have:
    they run as ``'bmm'`` (which, like ``'experts'``, keeps a traced batch symbolic). 1-D inputs run as 2-D ones of
    height 1; 3-D inputs use the grouped trick (:func:`torch.nn.functional.conv3d` with ``groups = B * groups``)
    whatever the strategy.

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
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if x.dim() == 3:  # 1-D as 2-D of height 1: every strategy applies (and exports with a dynamic batch)
        def pair(value, fill):
            return value if isinstance(value, str) else (fill, value if isinstance(value, int) else value[0])

        out = conv_with_kernels(x.unsqueeze(2), kernels.unsqueeze(3), bias, pair(stride, 1), pair(padding, 0),
                                pair(dilation, 1), groups, padding_mode, strategy)
        return out.squeeze(2)
    if x.dim() == 5:
        positive_int(groups, "groups")
        return _kernels_nd(x, kernels, bias, stride, padding, dilation, groups, padding_mode)
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
    pads = call.pads
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    conv_pad = (pads[2], pads[0])
    if padding_mode != "zeros" or not symmetric or (chosen == "bmm" and call.kernel_size == (1, 1)):
        if any(pads):
            x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
        conv_pad = (0, 0)
    geometry = (call.stride, conv_pad, call.dilation, groups)
    per_example = None if bias is None else bias.expand(call.batch, call.out_channels)
    if kernels.dtype != x.dtype and not autocast_on(x.device.type):
        kernels = kernels.to(x.dtype)
    if per_example is not None and per_example.dtype != x.dtype and not autocast_on(x.device.type):
        per_example = per_example.to(x.dtype)
    if chosen == "grouped":
        return decomposed.grouped(x, kernels, geometry, call.out_hw, per_example)
    if chosen == "bmm":
        return decomposed.bmm(x, kernels, geometry, call.out_hw, per_example)
    if chosen == "scan":
        return decomposed.scan(x, kernels, geometry, call.out_hw, per_example)
    return F.conv2d(x, kernels[0], None if per_example is None else per_example[0], call.stride, conv_pad,
                    call.dilation, groups)
