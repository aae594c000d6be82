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
    "clear_workspace",
]

STRATEGIES = ("auto", "grouped", "experts", "bmm", "single")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# On the CPU, per-example kernels are mixed chunk by chunk over the batch, each chunk's kernels at most this big:
# glibc's allocator serves blocks under its adaptive mmap threshold from reusable heap memory, larger ones from
# fresh pages that are faulted in and zero-filled on every call (measured: this costs more than the mixing).
_CHUNK_BYTES = 8 * 2**20
# The grouped convolution loses efficiency when split into small batches; it takes larger chunks.
_GROUPED_CHUNK_BYTES = 64 * 2**20

# The CPU ``bmm`` path runs through a custom autograd function with reused buffers; False falls back to plain
# autograd over mix_kernels + matmul (both are tested against the reference).
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

    Rules, from the layer benchmark (``condconv bench layers``; figures in the README):

    - tracing, exporting or compiling: ``'bmm'`` for dense 1x1 layers, ``'experts'`` otherwise — neither has a
      batch-dependent ``groups``, so the graph exports and compiles with a dynamic batch;
    - batch 1: ``'single'`` (a plain convolution with the one mixed kernel);
    - dense 1x1 layers: ``'bmm'`` (a batched matmul; on the CPU tiled with reused buffers);
    - dense kxk layers: ``'grouped'`` on the CPU, where oneDNN's grouped convolution beats im2col + matmul, and
      ``'bmm'`` on CUDA (not measured here: no GPU was available; force a strategy if yours differs);
    - depthwise and other grouped layers: ``'grouped'``.

    ``num_experts`` and ``out_hw`` are accepted so that measured tables can refine the rule without an API change.
    """
    kh, kw = kernel_size
    pointwise = kh == 1 and kw == 1
    if tracing:
        return "bmm" if (pointwise and groups == 1) else "experts"
    if batch <= 1:
        return "single"
    if groups > 1:
        return "grouped"
    if pointwise:
        return "bmm"
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return "bmm" if device_type == "cuda" else "grouped"


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
    for name, value in (("x", x), ("weight", weight), ("routing", routing), ("bias", bias), ("spatial", spatial)):
        if not isinstance(value, Tensor) and (value is not None or name in ("x", "weight", "routing")):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
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
    if routing.dtype != weight.dtype and not _autocast_on(x.device.type):
        routing = routing.to(weight.dtype)  # the kernels are mixed in the experts' dtype
    if spatial is not None and spatial.dtype != weight.dtype and not _autocast_on(x.device.type):
        spatial = spatial.to(weight.dtype)
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
        if _use_fused(x, weight, routing, spatial):
            out = _fused_bmm(x, weight, routing, spatial, geometry, (out_h, out_w))
        else:
            out = _per_example(_bmm, x, weight, routing, spatial, geometry, (out_h, out_w))
    elif chosen == "grouped":
        out = _per_example(_grouped, x, weight, routing, spatial, geometry, (out_h, out_w), _GROUPED_CHUNK_BYTES)
    else:  # single
        kernel = mix_kernels(routing, weight, spatial)[0]
        out = F.conv2d(x, kernel, None, stride_, conv_pad, dilation_, groups)
    if mixed_bias is not None:
        out = out + mixed_bias.reshape(batch, out_channels, 1, 1).to(out.dtype)
    return out


def _use_fused(x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None) -> bool:
    """Whether the ``bmm`` strategy runs through the chunked, workspace-reusing :class:`_MixedMatmul`."""
    if not FUSED_CPU or x.device.type != "cpu" or _is_tracing() or _autocast_on("cpu"):
        return False
    return x.dtype == weight.dtype == routing.dtype and (spatial is None or spatial.dtype == x.dtype)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _workspace(numel: int, like: Tensor, slot: int = 0) -> Tensor:
    """A per-thread reusable flat buffer (grown on demand; about ``_CHUNK_BYTES`` per slot, device and dtype)."""
    cache = getattr(_state, "workspace", None)
    if cache is None:
        cache = _state.workspace = {}
    # a buffer made under torch.inference_mode() is an inference tensor, which may not be written outside it:
    # keep separate buffers per mode
    key = (like.device, like.dtype, slot, torch.is_inference_mode_enabled())
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, device=like.device, dtype=like.dtype)
    return buf[:numel]


def clear_workspace() -> None:
    """Free this thread's reusable CPU buffers (up to ``_GROUPED_CHUNK_BYTES`` per dtype, re-created on demand)."""
    _state.workspace = {}


def _per_example(apply, x, weight, routing, spatial, geometry, out_hw, chunk_bytes: int | None = None) -> Tensor:
    """Mix per-example kernels and ``apply`` them, over batch chunks whose kernels fit in ``chunk_bytes``.

    Without autograd on the CPU, each chunk's kernels are mixed into one reused buffer (``matmul(out=)``): fresh
    multi-megabyte allocations fault in zeroed pages on every call, which can cost more than the mixing itself.
    """
    batch, experts = routing.shape
    numel = weight[0].numel()
    chunk = batch
    if x.device.type == "cpu" and not _is_tracing():
        chunk = _chunk_size(batch, numel, weight, chunk_bytes or _CHUNK_BYTES)
    reuse = (x.device.type == "cpu" and not _needs_grad(x, weight, routing, spatial) and not _is_tracing()
             and not _autocast_on("cpu") and routing.dtype == weight.dtype)
    if chunk >= batch and not reuse:
        return apply(x, mix_kernels(routing, weight, spatial), geometry, out_hw)
    flat_weight = weight.reshape(experts, numel)
    buffer = _workspace(chunk * numel, weight) if reuse else None
    outs = []
    for i in range(0, batch, chunk):
        j = min(i + chunk, batch)
        if buffer is not None:
            kernels = torch.matmul(routing[i:j], flat_weight, out=buffer[:(j - i) * numel].view(j - i, numel))
            kernels = kernels.view(j - i, *weight.shape[1:])
            if spatial is not None:
                kernels.mul_(spatial[i:j].reshape(j - i, 1, 1, *spatial.shape[1:]))
        else:
            kernels = mix_kernels(routing[i:j], weight, None if spatial is None else spatial[i:j])
        outs.append(apply(x[i:j], kernels, geometry, out_hw))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _grouped(x: Tensor, kernels: Tensor, geometry, out_hw) -> Tensor:
    stride, pad, dilation, groups = geometry
    batch, channels, height, width = x.shape
    out_channels = kernels.shape[1]
    out = F.conv2d(x.reshape(1, batch * channels, height, width), kernels.reshape(-1, *kernels.shape[2:]), None,
                   stride, pad, dilation, batch * groups)
    return out.reshape(batch, out_channels, *out.shape[-2:])


def _bmm_columns(x: Tensor, kernel_size, geometry, out_hw) -> Tensor:
    """The input as matmul columns ``(B, groups, C_in/groups * kh * kw, H_out * W_out)`` (a view for 1x1)."""
    stride, pad, dilation, groups = geometry
    batch, channels = x.shape[:2]
    kh, kw = kernel_size
    length = out_hw[0] * out_hw[1]
    if (kh, kw) == (1, 1):
        if stride != (1, 1):
            x = x[:, :, ::stride[0], ::stride[1]]
        return x.reshape(batch, groups, channels // groups, length)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=pad, stride=stride)  # (B, C*kh*kw, L)
    return cols.reshape(batch, groups, (channels // groups) * kh * kw, length)


def _bmm(x: Tensor, kernels: Tensor, geometry, out_hw) -> Tensor:
    groups = geometry[3]
    batch = x.shape[0]
    out_channels, in_per_group, kh, kw = kernels.shape[1:]
    cols = _bmm_columns(x, (kh, kw), geometry, out_hw)
    out = torch.matmul(kernels.reshape(batch, groups, out_channels // groups, in_per_group * kh * kw), cols)
    return out.reshape(batch, out_channels, *out_hw)


class _Columns:
    """im2col for one convolution geometry, applied chunk by chunk, and its adjoint (col2im) for the gradient."""

    def __init__(self, x_shape, kernel_size, geometry, out_hw) -> None:
        self.stride, self.pad, self.dilation, self.groups = geometry
        self.kernel_size = tuple(kernel_size)
        self.in_hw = tuple(x_shape[2:])
        self.channels = x_shape[1]
        self.out_hw = tuple(out_hw)

    def __call__(self, x: Tensor) -> Tensor:
        if self.kernel_size == (1, 1):
            return _bmm_columns(x, self.kernel_size, (self.stride, self.pad, self.dilation, self.groups), self.out_hw)
        # im2col as one strided copy of the padded input: several times faster than F.unfold on the CPU
        if any(self.pad):
            x = F.pad(x, (self.pad[1], self.pad[1], self.pad[0], self.pad[0]))
        n, c = x.shape[:2]
        (kh, kw), (dh, dw), (sh, sw), (oh, ow) = self.kernel_size, self.dilation, self.stride, self.out_hw
        st = x.stride()
        windows = x.as_strided((n, c, kh, kw, oh, ow), (st[0], st[1], dh * st[2], dw * st[3], sh * st[2], sw * st[3]),
                               x.storage_offset())
        return windows.reshape(n, self.groups, (c // self.groups) * kh * kw, oh * ow)

    def adjoint(self, grad_cols: Tensor) -> Tensor:
        """Gradient wrt the input chunk from the gradient wrt its columns ``(n, g, D, L)``."""
        n = grad_cols.shape[0]
        if self.kernel_size == (1, 1):
            grad = grad_cols.reshape(n, self.channels, *self.out_hw)
            if self.stride == (1, 1):
                return grad
            full = grad.new_zeros((n, self.channels, *self.in_hw))
            full[:, :, ::self.stride[0], ::self.stride[1]] = grad
            return full
        return F.fold(grad_cols.reshape(n, -1, self.out_hw[0] * self.out_hw[1]), self.in_hw, self.kernel_size,
                      dilation=self.dilation, padding=self.pad, stride=self.stride)


class _MixedMatmul(torch.autograd.Function):
    """``out[b] = (sum_e r[b, e] W[e] * s[b]) @ im2col(x[b])`` in tiles (the CPU ``bmm`` path).

    Autograd through ``mix_kernels`` + ``unfold`` + ``matmul`` keeps the whole batch of mixed kernels and unfolded
    inputs alive for backward and allocates as much again for their gradients. Here the work is tiled over batch
    chunks and, for dense layers, over output channels, so that each tile's mixed kernels fit a per-thread buffer
    of ``_CHUNK_BYTES`` that is reused across tiles and calls; each expert tile is read once per batch chunk.
    Backward re-mixes each tile instead of keeping kernels alive, and folds the kernel gradient straight into the
    gradients of the experts, the routing and the spatial attention.

    Shapes: ``x (B, C_in, H, W)``, ``weight (E, g, O/g, D)`` with ``D = C_in/g * kh * kw``, ``routing (B, E)``,
    ``spatial (B, kh * kw)`` or None -> ``(B, g, O/g, L)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None, columns: _Columns) -> Tensor:
        ctx.save_for_backward(x, weight, routing, spatial)
        ctx.columns = columns
        return _mixed_matmul_forward(x, weight, routing, spatial, columns)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, routing, spatial = ctx.saved_tensors
        columns = ctx.columns
        if torch.is_grad_enabled():
            # create_graph=True (double backward, gradient penalties): differentiate the plain formulation instead
            return _MixedMatmul._differentiable_backward(ctx, grad_out, x, weight, routing, spatial, columns)
        need_x, need_weight, need_routing, need_spatial = ctx.needs_input_grad[:4]
        need_spatial = need_spatial and spatial is not None
        batch = x.shape[0]
        experts, groups, per_group_out, depth = weight.shape
        length = grad_out.shape[-1]
        chunk, tile = _tiling(batch, groups, per_group_out, depth, length, columns, weight)
        size = chunk * groups * tile * depth
        mixed_buf = _workspace(size, weight, slot=0)
        grad_buf = _workspace(size, weight, slot=1)
        kern_buf = _workspace(size, weight, slot=2) if spatial is not None else None
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_routing = torch.zeros_like(routing) if need_routing else None
        grad_spatial = torch.zeros_like(spatial) if need_spatial else None
        kk = None if spatial is None else spatial.shape[1]
        for i in range(0, batch, chunk):
            j = min(i + chunk, batch)
            n = j - i
            cols = None
            if need_weight or need_routing or need_spatial:
                cols = columns(x[i:j]).reshape(n * groups, depth, length)
            grad_cols = None
            for o0 in range(0, per_group_out, tile):
                o1 = min(o0 + tile, per_group_out)
                t = o1 - o0
                numel = groups * t * depth
                w_tile = _weight_tile(weight, o0, o1)
                mixed = torch.matmul(routing[i:j], w_tile, out=mixed_buf[:n * numel].view(n, numel))
                gy = grad_out[i:j, :, o0:o1].reshape(n * groups, t, length)
                if need_x:
                    kernels = mixed
                    if spatial is not None:
                        kernels = torch.mul(mixed.view(n, -1, kk), spatial[i:j, None, :],
                                            out=kern_buf[:n * numel].view(n, -1, kk)).view(n, numel)
                    kt = kernels.view(n * groups, t, depth).transpose(1, 2)
                    grad_cols = torch.bmm(kt, gy) if grad_cols is None else grad_cols.baddbmm_(kt, gy)
                if cols is not None:
                    grad_k = torch.bmm(gy, cols.transpose(1, 2),
                                       out=grad_buf[:n * numel].view(n * groups, t, depth)).view(n, numel)
                    if spatial is not None:
                        if need_spatial:
                            grad_spatial[i:j] += (grad_k.view(n, -1, kk) * mixed.view(n, -1, kk)).sum(1)
                        grad_k.view(n, -1, kk).mul_(spatial[i:j, None, :])
                    if need_weight:
                        _weight_tile(grad_weight, o0, o1).addmm_(routing[i:j].t(), grad_k)
                    if need_routing:
                        grad_routing[i:j].addmm_(grad_k, w_tile.t())
            if need_x:
                grad_x[i:j] = columns.adjoint(grad_cols.view(n, groups, depth, length))
        return grad_x, grad_weight, grad_routing, grad_spatial, None

    @staticmethod
    def _differentiable_backward(ctx, grad_out, x, weight, routing, spatial, columns):
        inputs = (x, weight, routing, spatial)
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:4]) if need and t is not None]
        with torch.enable_grad():
            kernels = torch.matmul(routing, weight.reshape(weight.shape[0], -1))
            if spatial is not None:
                kernels = (kernels.reshape(x.shape[0], -1, spatial.shape[1]) * spatial[:, None, :])
            out = torch.matmul(kernels.reshape(x.shape[0], *weight.shape[1:]), columns(x))
            grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True))
        return tuple(next(grads) if (need and t is not None) else None
                     for t, need in zip(inputs, ctx.needs_input_grad[:4])) + (None,)


def _weight_tile(weight: Tensor, o0: int, o1: int) -> Tensor:
    """Rows ``o0:o1`` of every group of ``weight (E, g, O/g, D)`` as an ``(E, g * (o1 - o0) * D)`` matrix view."""
    experts, groups, per_group_out, depth = weight.shape
    if o0 == 0 and o1 == per_group_out:
        return weight.reshape(experts, -1)
    return weight[:, 0, o0:o1, :].reshape(experts, -1) if groups == 1 else weight[:, :, o0:o1].reshape(experts, -1)


def _tiling(batch: int, groups: int, per_group_out: int, depth: int, length: int, columns: _Columns,
            like: Tensor) -> tuple[int, int]:
    """(batch chunk, output-channel tile) so one tile of mixed kernels stays within ``_CHUNK_BYTES``.

    Dense layers are tiled over output channels, which lets a large batch chunk share each read of the experts;
    grouped ones only over the batch. The unfolded input of a kxk chunk is held to the same budget.
    """
    item = like.element_size()
    per_example = groups * per_group_out * depth * item
    chunk = batch
    if columns.kernel_size != (1, 1):
        chunk = max(1, min(batch, _CHUNK_BYTES // max(1, groups * depth * length * item)))
    if groups > 1 or chunk * per_example <= _CHUNK_BYTES:
        return max(1, min(chunk, _CHUNK_BYTES // max(1, per_example))), per_group_out
    min_tile = min(per_group_out, 32)
    chunk = max(1, min(chunk, _CHUNK_BYTES // (min_tile * depth * item)))
    tile = max(min_tile, min(per_group_out, _CHUNK_BYTES // (chunk * depth * item)))
    return chunk, tile


def _chunk_size(batch: int, numel: int, like: Tensor, budget: int | None = None) -> int:
    return max(1, min(batch, (budget or _CHUNK_BYTES) // max(1, numel * like.element_size())))


def _mixed_matmul_forward(x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None,
                          columns: _Columns) -> Tensor:
    batch = x.shape[0]
    experts, groups, per_group_out, depth = weight.shape
    length = columns.out_hw[0] * columns.out_hw[1]
    chunk, tile = _tiling(batch, groups, per_group_out, depth, length, columns, weight)
    buf = _workspace(chunk * groups * tile * depth, weight, slot=0)
    out = x.new_empty((batch, groups, per_group_out, length))
    kk = None if spatial is None else spatial.shape[1]
    for i in range(0, batch, chunk):
        j = min(i + chunk, batch)
        n = j - i
        cols = columns(x[i:j]).reshape(n * groups, depth, length)
        for o0 in range(0, per_group_out, tile):
            o1 = min(o0 + tile, per_group_out)
            numel = groups * (o1 - o0) * depth
            kernels = torch.matmul(routing[i:j], _weight_tile(weight, o0, o1), out=buf[:n * numel].view(n, numel))
            if spatial is not None:
                kernels.view(n, -1, kk).mul_(spatial[i:j, None, :])
            target = out[i:j, :, o0:o1]
            if tile == per_group_out:
                torch.bmm(kernels.view(n * groups, o1 - o0, depth), cols, out=target.view(n * groups, -1, length))
            else:
                target.copy_(torch.bmm(kernels.view(n * groups, o1 - o0, depth), cols).view_as(target))
    return out


def _fused_bmm(x, weight, routing, spatial, geometry, out_hw) -> Tensor:
    """The ``bmm`` strategy through :class:`_MixedMatmul` (CPU, no autocast, not tracing)."""
    groups = geometry[3]
    experts, out_channels, in_per_group, kh, kw = weight.shape
    columns = _Columns(x.shape, (kh, kw), geometry, out_hw)
    w = weight.reshape(experts, groups, out_channels // groups, in_per_group * kh * kw)
    s = None if spatial is None else spatial.reshape(spatial.shape[0], kh * kw)
    if _needs_grad(x, weight, routing, spatial):
        out = _MixedMatmul.apply(x, w, routing, s, columns)
    else:
        out = _mixed_matmul_forward(x, w, routing, s, columns)
    return out.reshape(x.shape[0], out_channels, *out_hw)


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
