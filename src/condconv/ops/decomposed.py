"""The engine's plain formulations, in ordinary PyTorch operations (any device, autograd, tracing).

Each takes the input already padded as the convolution needs (``geometry = (stride, conv_pad, dilation, groups)``,
``conv_pad`` the symmetric padding left to the convolution itself) and returns ``(B, C_out, H_out, W_out)``
without bias:

- :func:`grouped`: per-example kernels, batch folded into the channels, one grouped convolution;
- :func:`bmm`: per-example kernels applied by a batched matmul (directly for 1x1, after im2col otherwise);
- :func:`experts`: one convolution with every expert stacked on the output axis, then a routing-weighted sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mix_kernels", "grouped", "bmm", "bmm_columns", "experts", "stack_experts", "weighted_expert_sum"]


def mix_kernels(routing: Tensor, weight: Tensor, spatial: Tensor | None = None) -> Tensor:
    """Per-example kernels ``K[b] = sum_e routing[b, e] * weight[e]`` (times ``spatial[b]`` if given).

    Args:
        routing: ``(B, E)`` mixing weights.
        weight: ``(E, *kernel_shape)`` expert bank, e.g. ``(E, C_out, C_in // groups, kh, kw)``.
        spatial: optional ``(B, kh, kw)`` per-example multiplier of the kernel's spatial positions.

    Returns:
        ``(B, *kernel_shape)``. One matrix multiply: ``B * E * prod(kernel_shape)`` multiply-adds.
    """
    batch, num_experts = routing.shape
    kernels = torch.matmul(routing, weight.reshape(num_experts, -1)).reshape(batch, *weight.shape[1:])
    if spatial is not None:
        kernels = kernels * spatial.reshape(batch, 1, 1, *spatial.shape[1:])
    return kernels


def grouped(x: Tensor, kernels: Tensor, geometry, out_hw) -> Tensor:
    """``kernels (B, C_out, C_in/g, kh, kw)`` applied as one convolution with ``B * groups`` groups."""
    stride, pad, dilation, groups = geometry
    batch, channels, height, width = x.shape
    out_channels = kernels.shape[1]
    out = F.conv2d(x.reshape(1, batch * channels, height, width), kernels.reshape(-1, *kernels.shape[2:]), None,
                   stride, pad, dilation, batch * groups)
    return out.reshape(batch, out_channels, *out.shape[-2:])


def bmm_columns(x: Tensor, kernel_size, geometry, out_hw) -> Tensor:
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


def bmm(x: Tensor, kernels: Tensor, geometry, out_hw) -> Tensor:
    """``kernels (B, C_out, C_in/g, kh, kw)`` applied by a batched matmul with the im2col columns."""
    groups = geometry[3]
    batch = x.shape[0]
    out_channels, in_per_group, kh, kw = kernels.shape[1:]
    cols = bmm_columns(x, (kh, kw), geometry, out_hw)
    out = kernels.reshape(batch, groups, out_channels // groups, in_per_group * kh * kw).matmul(cols)
    return out.reshape(batch, out_channels, *out_hw)


def stack_experts(weight: Tensor, groups: int) -> Tensor:
    """``(E, O, I/g, kh, kw)`` -> ``(g*E*O/g, I/g, kh, kw)``, output channels ordered (group, expert, channel)."""
    experts_, out_channels, in_per_group, kh, kw = weight.shape
    stacked = weight.reshape(experts_, groups, out_channels // groups, in_per_group, kh, kw).transpose(0, 1)
    return stacked.reshape(groups * experts_ * (out_channels // groups), in_per_group, kh, kw)


def weighted_expert_sum(z: Tensor, routing: Tensor, groups: int) -> Tensor:
    """``(B, g*E*O/g, H, W)`` expert outputs -> ``(B, O, H, W)`` routing-weighted sum."""
    batch, _, out_h, out_w = z.shape
    num_experts = routing.shape[1]
    z = z.reshape(batch, groups, num_experts, -1, out_h, out_w)
    out = (z * routing.to(z.dtype).reshape(batch, 1, num_experts, 1, 1, 1)).sum(2)
    return out.reshape(batch, -1, out_h, out_w)


def experts(x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None, geometry, out_hw) -> Tensor:
    """Every expert's output from one dense convolution, then the routing-weighted sum (``E`` x the MACs)."""
    stride, pad, dilation, groups = geometry
    kh, kw = weight.shape[-2:]
    stacked = stack_experts(weight, groups)
    if spatial is None:
        z = F.conv2d(x, stacked, None, stride, pad, dilation, groups)
        return weighted_expert_sum(z, routing, groups)
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
            term = weighted_expert_sum(z, routing * spatial[:, i, j:j + 1], groups)
            out = term if out is None else out + term
    return out
