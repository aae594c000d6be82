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
``auto``
    Picks one of the above per call from the shapes (see :func:`select_strategy`).

The choice can be forced per call (``strategy=``), per layer (the layers' ``strategy`` attribute) or globally
(:func:`use_strategy`, :func:`set_default_strategy`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "STRATEGIES",
    "PADDING_MODES",
    "dynamic_conv2d",
    "mix_kernels",
    "select_strategy",
    "use_strategy",
    "set_default_strategy",
    "get_default_strategy",
    "conv_output_size",
    "resolve_padding",
]

STRATEGIES = ("auto", "grouped", "experts", "bmm", "single")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# Temporaries bigger than this are produced chunk by chunk over the batch: glibc's allocator serves blocks under
# its (adaptive, at most 32 MiB) mmap threshold from reusable heap memory, larger ones from fresh pages that
# are zero-filled on every call. Keeping the mixed kernels of one chunk below it roughly halves their cost.
_CHUNK_BYTES = 16 * 2**20

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


def mix_kernels(routing: Tensor, weight: Tensor, spatial: Tensor | None = None) -> Tensor:
    """Per-example kernels ``K[b] = sum_e routing[b, e] * weight[e]`` (times ``spatial[b]`` if given).

    Args:
        routing: ``(B, E)`` mixing weights.
        weight: ``(E, *kernel_shape)`` expert bank, e.g. ``(E, C_out, C_in // groups, kh, kw)``.
        spatial: optional ``(B, kh, kw)`` per-example multiplier of the kernel's spatial positions.

    Returns:
        ``(B, *kernel_shape)``. One matrix multiply: ``B * E * prod(kernel_shape)`` multiply-adds.
    """
    batch, experts = routing.shape
    kernels = torch.matmul(routing, weight.reshape(experts, -1)).reshape(batch, *weight.shape[1:])
    if spatial is not None:
        kernels = kernels * spatial.reshape(batch, 1, 1, *spatial.shape[1:])
    return kernels


def _is_tracing() -> bool:
    """True while the call is being traced for export or compilation (where per-example kernels hurt)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if getattr(compiler, "is_exporting", lambda: False)():
            return True
        if getattr(compiler, "is_compiling", lambda: False)():
            return True
    return False


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
    tracing: bool = False,
) -> str:
    """The strategy ``'auto'`` resolves to for one call.

    Rules, from the layer benchmark (``condconv bench layers``, see the README):

    - tracing, exporting or compiling: ``'experts'`` for grouped/depthwise layers and 3x3 layers, ``'bmm'`` for dense
      1x1 layers — neither has a batch-dependent ``groups``, so both export and compile with a dynamic batch;
    - batch 1: ``'single'``;
    - depthwise and other grouped layers: ``'grouped'``;
    - dense 1x1 layers: ``'bmm'``;
    - dense kxk layers: ``'bmm'`` (im2col) while the unfolded input stays small, ``'experts'`` when few experts make
      the dense convolution cheaper than mixing the kernels, otherwise ``'grouped'``.
    """
    kh, kw = kernel_size
    pointwise = kh == 1 and kw == 1
    if tracing:
        return "bmm" if (pointwise and groups == 1 and not spatial) else "experts"
    if batch <= 1:
        return "single"
    if groups > 1:
        return "grouped"
    if pointwise:
        return "bmm"
    # Dense kxk. Kernel mixing costs E * params per example; the convolution params * out_pixels.
    pixels = out_hw[0] * out_hw[1]
    if num_experts * (kh * kw) <= 8 and pixels >= 3136 and not spatial:
        # few experts on a large map: E x the dense conv beats both mixing and unfolding
        return "experts"
    if pixels <= 1024:
        return "bmm"
    return "grouped"


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
    strategy: str = "auto",
) -> Tensor:
    """Convolution of each example with its own mixture of expert kernels.

    Computes, for every example ``b``: ``conv(x[b], sum_e routing[b, e] * weight[e] * spatial[b]) +
    sum_e routing[b, e] * bias[e]``, with the semantics of :func:`torch.nn.functional.conv2d` (and of
    :class:`torch.nn.Conv2d` for ``padding_mode``).

    Args:
        x: input ``(B, C_in, H, W)``; any memory format.
        weight: expert kernels ``(E, C_out, C_in // groups, kh, kw)``.
        routing: mixing weights ``(B, E)``.
        bias: optional per-expert bias ``(E, C_out)``, mixed like the kernels.
        stride, padding, dilation, groups, padding_mode: as in :class:`torch.nn.Conv2d`.
        spatial: optional ``(B, kh, kw)`` per-example multiplier of kernel positions (ODConv's spatial attention).
        strategy: one of :data:`STRATEGIES`. ``'auto'`` defers to :func:`use_strategy` if active, else picks from
            the shapes. An explicit strategy is honoured, except that :func:`use_strategy` overrides everything.

    Returns:
        ``(B, C_out, H_out, W_out)``.
    """
    _check_strategy(strategy)
    if weight.dim() != 5:
        raise ValueError(f"weight must be 5-D (num_experts, out_channels, in_channels // groups, kh, kw), "
                         f"got shape {tuple(weight.shape)}")
    experts, out_channels, in_per_group, kh, kw = weight.shape
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if out_channels % groups:
        raise ValueError(f"weight's out_channels ({out_channels}) must be divisible by groups ({groups})")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (batch, channels, height, width), got shape {tuple(x.shape)}")
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

    if batch == 0:
        dtype = torch.promote_types(x.dtype, weight.dtype)
        out = x.new_zeros((0, out_channels, out_h, out_w), dtype=dtype)
        # keep the graph connected so backward works for an empty batch
        return out + 0 * (weight.sum() + routing.sum() + (bias.sum() if bias is not None else 0))

    tracing = _is_tracing()
    chosen = _forced_strategy() or strategy
    if chosen == "auto":
        chosen = select_strategy(batch, in_channels, out_channels, (kh, kw), groups, experts, (out_h, out_w),
                                 spatial=spatial is not None, device=x.device, tracing=tracing)
    if chosen == "single" and batch != 1:
        raise ValueError(f"strategy='single' needs batch size 1, got {batch}")

    # Explicit padding unless it is symmetric zero padding the convolution can do itself.
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    if padding_mode != "zeros" or not symmetric or (chosen == "bmm" and (kh, kw) == (1, 1)) or \
            (chosen == "experts" and spatial is not None):
        if any(pads):
            mode = "constant" if padding_mode == "zeros" else padding_mode
            x = F.pad(x, pads, mode=mode)
        conv_pad = (0, 0)
    else:
        conv_pad = (pads[2], pads[0])

    mixed_bias = None if bias is None else torch.matmul(routing, bias)
    geometry = (stride_, conv_pad, dilation_, groups)
    if chosen == "experts":
        out = _experts(x, weight, routing, spatial, geometry, (out_h, out_w))
    elif chosen == "bmm":
        out = _chunked(_bmm, x, weight, routing, spatial, geometry, (out_h, out_w))
    elif chosen == "grouped":
        out = _chunked(_grouped, x, weight, routing, spatial, geometry, (out_h, out_w))
    else:  # single
        kernel = mix_kernels(routing, weight, spatial)[0]
        out = F.conv2d(x, kernel, None, stride_, conv_pad, dilation_, groups)
    if mixed_bias is not None:
        out = out + mixed_bias.reshape(batch, out_channels, 1, 1).to(out.dtype)
    return out


def _chunked(fn, x, weight, routing, spatial, geometry, out_hw) -> Tensor:
    """Run a per-example-kernel strategy over batch chunks whose mixed kernels fit in ``_CHUNK_BYTES``."""
    batch = x.shape[0]
    kernel_bytes = weight[0].numel() * x.element_size()
    chunk = max(1, _CHUNK_BYTES // max(1, kernel_bytes))
    if chunk >= batch or _is_tracing():
        return fn(x, weight, routing, spatial, geometry, out_hw)
    outs = [
        fn(x[i:i + chunk], weight, routing[i:i + chunk], None if spatial is None else spatial[i:i + chunk],
           geometry, out_hw)
        for i in range(0, batch, chunk)
    ]
    return torch.cat(outs, 0)


def _grouped(x, weight, routing, spatial, geometry, out_hw) -> Tensor:
    stride, pad, dilation, groups = geometry
    batch, channels, height, width = x.shape
    kernels = mix_kernels(routing, weight, spatial)  # (B, O, I/g, kh, kw)
    kernels = kernels.reshape(batch * weight.shape[1], *weight.shape[2:])
    out = F.conv2d(x.reshape(1, batch * channels, height, width), kernels, None, stride, pad, dilation,
                   batch * groups)
    return out.reshape(batch, weight.shape[1], *out.shape[-2:])


def _bmm(x, weight, routing, spatial, geometry, out_hw) -> Tensor:
    stride, pad, dilation, groups = geometry
    batch, channels = x.shape[:2]
    experts, out_channels, in_per_group, kh, kw = weight.shape
    out_h, out_w = out_hw
    kernels = mix_kernels(routing, weight, spatial)
    if (kh, kw) == (1, 1):
        if stride != (1, 1):
            x = x[:, :, ::stride[0], ::stride[1]]
        if groups == 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # channels-last: (B, HW, C) is a free view; the result comes back channels-last as well
            cols = x.permute(0, 2, 3, 1).reshape(batch, out_h * out_w, channels)
            out = torch.bmm(cols, kernels.reshape(batch, out_channels, channels).transpose(1, 2))
            return out.reshape(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)
        cols = x.reshape(batch, groups, in_per_group, out_h * out_w)
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=pad, stride=stride)  # (B, C*kh*kw, L)
        cols = cols.reshape(batch, groups, in_per_group * kh * kw, out_h * out_w)
    kernels = kernels.reshape(batch, groups, out_channels // groups, in_per_group * kh * kw)
    out = torch.matmul(kernels, cols)  # (B, g, O/g, L)
    return out.reshape(batch, out_channels, out_h, out_w)


def _stack_experts(weight: Tensor, groups: int) -> Tensor:
    """``(E, O, I/g, kh, kw)`` -> ``(g*E*O/g, I/g, kh, kw)``, output channels ordered (group, expert, channel)."""
    experts, out_channels, in_per_group, kh, kw = weight.shape
    stacked = weight.reshape(experts, groups, out_channels // groups, in_per_group, kh, kw).transpose(0, 1)
    return stacked.reshape(groups * experts * (out_channels // groups), in_per_group, kh, kw)


def _weighted_expert_sum(z: Tensor, routing: Tensor, groups: int) -> Tensor:
    """``(B, g*E*O/g, H, W)`` expert outputs -> ``(B, O, H, W)`` routing-weighted sum."""
    batch, _, out_h, out_w = z.shape
    experts = routing.shape[1]
    z = z.reshape(batch, groups, experts, -1, out_h, out_w)
    out = (z * routing.to(z.dtype).reshape(batch, 1, experts, 1, 1, 1)).sum(2)
    return out.reshape(batch, -1, out_h, out_w)


def _experts(x, weight, routing, spatial, geometry, out_hw) -> Tensor:
    stride, pad, dilation, groups = geometry
    kh, kw = weight.shape[-2:]
    stacked = _stack_experts(weight, groups)
    if spatial is None:
        z = F.conv2d(x, stacked, None, stride, pad, dilation, groups)
        return _weighted_expert_sum(z, routing, groups)
    # Spatial attention scales each kernel position per example: decompose the kxk convolution into kh*kw
    # 1x1 convolutions of shifted views of the (already padded) input, each weighted by routing * spatial.
    out_h, out_w = out_hw
    out = None
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            shifted = x[:, :, top:top + stride[0] * (out_h - 1) + 1:stride[0],
                        left:left + stride[1] * (out_w - 1) + 1:stride[1]]
            z = F.conv2d(shifted, stacked[:, :, i:i + 1, j:j + 1], None, 1, 0, 1, groups)
            term = _weighted_expert_sum(z, routing * spatial[:, i, j:j + 1], groups)
            out = term if out is None else out + term
    return out
