"""The engine's plain formulations, in ordinary PyTorch operations (any device, autograd, tracing).

Each takes the input already padded as the convolution needs (``geometry = (stride, conv_pad, dilation, groups)``,
one entry per spatial axis, ``conv_pad`` the symmetric padding left to the convolution itself) and returns
``(B, C_out, *out_size)`` without bias. Every function serves 1-D, 2-D and 3-D convolutions alike (the rank is the
kernels' number of spatial axes); shapes below are written for 2-D:

- :func:`grouped`: per-example kernels, batch folded into the channels, one grouped convolution;
- :func:`bmm`: per-example kernels applied by a batched matmul (directly for 1x1, after im2col otherwise);
- :func:`experts`: one convolution with every expert stacked on the output axis, then a routing-weighted sum;
- :func:`scan`: per-example kernels, one plain convolution per example (a ``scan`` loop when traced by dynamo).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from condconv.nn.ops.context import tracing_kind

try:  # torch >= 2.6: a loop that torch.export keeps symbolic in the batch (exported to ONNX as ``Scan``)
    from torch._higher_order_ops.scan import scan as _scan_api
    from torch._higher_order_ops.scan import scan_op as _scan_op
except ImportError:  # pragma: no cover - older torch
    _scan_api = _scan_op = None

__all__ = ["mix_kernels", "grouped", "bmm", "bmm_columns", "experts", "stack_experts", "weighted_expert_sum", "scan",
           "SCAN_TRACEABLE", "CONV_FUNCTIONS", "window"]

#: Whether this torch has the ``scan`` higher-order operation (so the ``scan`` strategy exports with any batch).
SCAN_TRACEABLE = _scan_op is not None


#: The plain convolution of each spatial rank.
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def window(x: Tensor, offset, stride, out_size) -> Tensor:
    """The strided view of ``x (B, C, *size)`` that a kernel position at ``offset`` (one start per spatial axis)
    meets: ``x[:, :, o0:o0 + s0 * (n0 - 1) + 1:s0, ...]``, of spatial size ``out_size``."""
    index = tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(offset, stride, out_size))
    return x[(slice(None), slice(None), *index)]


def _lead(batch: int) -> int:
    """The batch size for a reshape: ``-1`` while traced, so a graph with a symbolic batch needs no shape arithmetic
    (``-1`` cannot stand for an empty batch, which eager calls may have)."""
    return -1 if tracing_kind() is not None else batch


def mix_kernels(routing: Tensor, weight: Tensor, spatial: Tensor | None = None) -> Tensor:
    """Per-example kernels ``K[b] = sum_e routing[b, e] * weight[e]`` (times ``spatial[b]`` if given).

    Args:
        routing: ``(B, E)`` mixing weights.
        weight: ``(E, *kernel_shape)`` expert bank, e.g. ``(E, C_out, C_in // groups, kh, kw)``.
        spatial: optional ``(B, kh, kw)`` (``(B, *kernel_size)`` in any rank) per-example multiplier of the
            kernel's spatial positions.

    Returns:
        ``(B, *kernel_shape)``. One matrix multiply: ``B * E * prod(kernel_shape)`` multiply-adds.
    """
    batch, num_experts = routing.shape
    lead = _lead(batch)
    kernels = torch.matmul(routing, weight.reshape(num_experts, -1))
    if spatial is not None:
        # traced for export: the (kh, kw) pattern repeated along each kernel row of C_in/g * kh * kw values, so that the
        # multiply broadcasts over a long inner span (onnxruntime's Mul is ~10x slower broadcasting a 3x3 pattern)
        positions = math.prod(spatial.shape[1:])
        span = math.prod(weight.shape[2:]) if weight.dim() > 3 else positions
        if lead != -1 or span == positions:
            pattern = spatial.reshape(lead, 1, 1, positions)
        else:
            pattern = spatial.reshape(lead, 1, 1, positions).repeat(1, 1, span // positions, 1)
        kernels = kernels.reshape(lead, kernels.shape[1] // span, span // positions, positions) * pattern
    return kernels.reshape(lead, *weight.shape[1:])


def grouped(x: Tensor, kernels: Tensor, geometry, out_hw, bias: Tensor | None = None) -> Tensor:
    """``kernels (B, C_out, C_in/g, kh, kw)`` applied as one convolution with ``B * groups`` groups (``bias``:
    ``(B, C_out)``, added by the convolution)."""
    stride, pad, dilation, groups = geometry
    batch, channels, *size = x.shape
    rank = len(size)
    out_channels = kernels.shape[1]
    out = CONV_FUNCTIONS[rank](x.reshape(1, batch * channels, *size), kernels.reshape(-1, *kernels.shape[2:]),
                               None if bias is None else bias.reshape(-1), stride, pad, dilation, batch * groups)
    return out.reshape(batch, out_channels, *out.shape[-rank:])


def bmm_columns(x: Tensor, kernel_size, geometry, out_hw) -> Tensor:
    """The input as matmul columns ``(B, groups, C_in/groups * kh * kw, H_out * W_out)`` (a view for 1x1).

    2-D: :func:`torch.nn.functional.unfold`; other ranks: the kernel positions' strided views stacked (the same
    columns, in the same order)."""
    stride, pad, dilation, groups = geometry
    batch = _lead(x.shape[0])
    channels = x.shape[1]
    kernel_size = tuple(kernel_size)
    rank = len(kernel_size)
    length = math.prod(out_hw)
    depth = (channels // groups) * math.prod(kernel_size)
    if all(k == 1 for k in kernel_size):
        if any(s != 1 for s in stride):
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        return x.reshape(batch, groups, channels // groups, length)
    if rank == 2:
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=pad, stride=stride)  # (B, C*kh*kw, L)
        return cols.reshape(batch, groups, depth, length)
    if any(pad):
        x = F.pad(x, tuple(p for p in reversed(pad) for _ in range(2)))
    views = [window(x, [i * d for i, d in zip(position, dilation)], stride, out_hw)
             for position in itertools.product(*(range(k) for k in kernel_size))]
    cols = torch.stack(views, 2)  # (B, C, prod(kernel), *out): channel-major, kernel positions in row-major order
    return cols.reshape(batch, groups, depth, length)


def bmm(x: Tensor, kernels: Tensor, geometry, out_hw, bias: Tensor | None = None) -> Tensor:
    """``kernels (B, C_out, C_in/g, kh, kw)`` applied by a batched matmul with the im2col columns (``bias``:
    ``(B, C_out)``, the matmul's accumulator)."""
    groups = geometry[3]
    batch = _lead(x.shape[0])
    out_channels, in_per_group, *kernel_size = kernels.shape[1:]
    cols = bmm_columns(x, kernel_size, geometry, out_hw)
    kernels = kernels.reshape(batch, groups, out_channels // groups, in_per_group * math.prod(kernel_size))
    if bias is None:
        out = kernels.matmul(cols)
    elif tracing_kind() is not None:
        out = kernels.matmul(cols) + bias.reshape(batch, groups, out_channels // groups, 1)
    else:
        n = x.shape[0] * groups
        out = torch.baddbmm(bias.reshape(n, out_channels // groups, 1), kernels.reshape(n, out_channels // groups, -1),
                            cols.reshape(n, cols.shape[-2], cols.shape[-1]))
    return out.reshape(batch, out_channels, *out_hw)


def stack_experts(weight: Tensor, groups: int) -> Tensor:
    """``(E, O, I/g, kh, kw)`` -> ``(g*E*O/g, I/g, kh, kw)``, output channels ordered (group, expert, channel)."""
    experts_, out_channels, in_per_group, *kernel_size = weight.shape
    stacked = weight.reshape(experts_, groups, out_channels // groups, in_per_group, *kernel_size).transpose(0, 1)
    return stacked.reshape(groups * experts_ * (out_channels // groups), in_per_group, *kernel_size)


def weighted_expert_sum(z: Tensor, routing: Tensor, groups: int) -> Tensor:
    """``(B, g*E*O/g, H, W)`` expert outputs -> ``(B, O, H, W)`` routing-weighted sum."""
    batch, _, *size = z.shape
    num_experts = routing.shape[1]
    z = z.reshape(batch, groups, num_experts, -1, *size)
    out = (z * routing.to(z.dtype).reshape(batch, 1, num_experts, 1, *(1,) * len(size))).sum(2)
    return out.reshape(batch, -1, *size)


def experts(x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None, geometry, out_hw) -> Tensor:
    """Every expert's output from one dense convolution, then the routing-weighted sum (``E`` x the MACs)."""
    stride, pad, dilation, groups = geometry
    kernel_size = weight.shape[3:]
    conv = CONV_FUNCTIONS[len(kernel_size)]
    stacked = stack_experts(weight, groups)
    if spatial is None:
        z = conv(x, stacked, None, stride, pad, dilation, groups)
        return weighted_expert_sum(z, routing, groups)
    # Spatial attention scales each kernel position per example: decompose the kxk convolution into kh*kw
    # 1x1 convolutions of shifted views of the (already padded) input, each weighted by routing * spatial.
    positions = spatial.reshape(spatial.shape[0], -1)
    out = None
    for index, position in enumerate(itertools.product(*(range(k) for k in kernel_size))):
        shifted = window(x, [i * d for i, d in zip(position, dilation)], stride, out_hw)
        tap = stacked[(slice(None), slice(None), *(slice(i, i + 1) for i in position))]
        z = conv(shifted, tap, None, 1, 0, 1, groups)
        term = weighted_expert_sum(z, routing * positions[:, index:index + 1], groups)
        out = term if out is None else out + term
    return out


def _dynamo_compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_dynamo_compiling", None)
    return bool(check is not None and check())


def scan(x: Tensor, kernels: Tensor, geometry, out_hw, bias: Tensor | None = None) -> Tensor:
    """``kernels (B, C_out, C_in/g, kh, kw)``: one plain convolution of each example with its own kernel (and its
    own bias ``(C_out,)``, a row of ``bias (B, C_out)``).

    At batch size 1 this is exactly the static convolution's work with the mixed kernel. Under ``torch.export``
    (and so the dynamo-based ONNX exporter) and ``torch.compile`` the loop is torch's ``scan`` higher-order
    operation, which keeps the batch symbolic: ONNX ``Scan`` with one ``Conv`` (static ``group``) in its body.
    Eager, and in a static-batch export, it is a Python loop.
    """
    stride, pad, dilation, groups = geometry
    plain = CONV_FUNCTIONS[kernels.dim() - 3]

    def conv(xb: Tensor, kb: Tensor, bb: Tensor | None = None) -> Tensor:
        return plain(xb.unsqueeze(0), kb, bb, stride, pad, dilation, groups)

    if tracing_kind() in ("export", "compile"):
        if _scan_op is None:
            raise RuntimeError("strategy='scan' needs torch.export's scan operation (torch >= 2.6) to be traced")

        init = x.new_zeros(())
        if bias is None and kernels.dim() == 6:
            # the dynamo ONNX exporter translates a bias-less conv3d inside the Scan body into a Conv whose bias input
            # names a value of the outer graph (onnxruntime: "bias must be a 1D tensor"): give it a real zero bias
            bias = kernels.new_zeros((kernels.shape[0], kernels.shape[1]))
        xs = [x, kernels] if bias is None else [x, kernels, bias]
        if _dynamo_compiling():  # torch.compile and strict export: dynamo wants the user-facing function

            def step(carry: Tensor, slices: list[Tensor]) -> tuple[Tensor, Tensor]:
                return carry.clone(), conv(*slices).squeeze(0)

            return _scan_api(step, init, xs)[1]

        # non-strict torch.export (the ONNX exporter's): the operation itself; the wrapper would run dynamo over
        # every call, which took a third of a whole model's export time
        def flat_step(carry: Tensor, *slices: Tensor) -> list[Tensor]:
            return [carry.clone(), conv(*slices).squeeze(0)]

        return _scan_op(flat_step, [init], xs, ())[1]
    return torch.cat([conv(x[b], kernels[b], None if bias is None else bias[b]) for b in range(x.shape[0])], 0)
