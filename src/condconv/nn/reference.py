"""Slow, obviously-correct references for testing the engine and layers, in 1-D, 2-D and 3-D.

Each example is convolved on its own by a plain :class:`torch.nn.Conv1d`, :class:`torch.nn.Conv2d` or
:class:`torch.nn.Conv3d` (chosen by the kernel's rank; through :func:`torch.func.functional_call`, so PyTorch's own
padding logic is used and gradients flow) with a kernel built straight from the formula, expert by expert, in Python
loops. Nothing here is shared with the engine. The ``2d`` names are historical: every function takes any rank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["reference_dynamic_conv", "reference_dynamic_conv2d", "reference_odconv", "reference_odconv2d"]

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _static_conv(weight: Tensor, stride, padding, dilation, groups, padding_mode, has_bias: bool) -> nn.Module:
    experts, out_channels, in_per_group, *kernel_size = weight.shape
    if len(kernel_size) not in _CONVS:
        raise ValueError(f"weight must be (experts, out, in // groups, *kernel_size) with 1 to 3 kernel axes, got "
                         f"shape {tuple(weight.shape)}")
    return _CONVS[len(kernel_size)](in_per_group * groups, out_channels, tuple(kernel_size), stride, padding,
                                    dilation, groups, has_bias, padding_mode, device="meta")


def reference_dynamic_conv(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None = None, stride=1,
                           padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros", *,
                           spatial: Tensor | None = None) -> Tensor:
    """Per-example loop: ``conv(x[b], sum_e r[b, e] * weight[e] * spatial[b]) + sum_e r[b, e] * bias[e]``.

    ``weight``: ``(E, C_out, C_in // groups, *kernel_size)`` with 1, 2 or 3 kernel axes; ``spatial``: ``(B,
    *kernel_size)``.
    """
    conv = _static_conv(weight, stride, padding, dilation, groups, padding_mode, bias is not None)
    kernel_size = tuple(weight.shape[3:])
    outs = []
    for b in range(x.shape[0]):
        kernel = sum(routing[b, e] * weight[e] for e in range(weight.shape[0]))
        if spatial is not None:
            kernel = kernel * spatial[b].reshape(1, 1, *kernel_size)
        params = {"weight": kernel}
        if bias is not None:
            params["bias"] = sum(routing[b, e] * bias[e] for e in range(weight.shape[0]))
        outs.append(functional_call(conv, params, (x[b:b + 1],)))
    if not outs:
        raise ValueError("the reference needs a non-empty batch")
    return torch.cat(outs, 0)


def reference_odconv(x: Tensor, weight: Tensor, expert: Tensor | None, spatial: Tensor | None,
                     in_channel: Tensor | None, out_channel: Tensor | None, bias: Tensor | None = None, stride=1,
                     padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros") -> Tensor:
    """ODConv straight from the formula: ``conv(x[b], sum_i a_e[i] * (a_s ⊙ a_in ⊙ a_out ⊙ W_i))`` per example.

    The input-channel attention multiplies the kernel's input axis (entry ``c`` of group ``g`` of the kernel
    meets input channel ``g * C_in/groups + c``); the bias is mixed by the expert attention only. Any rank:
    ``weight (E, C_out, C_in // groups, *kernel_size)``, ``spatial (B, *kernel_size)``.
    """
    experts, out_channels, in_per_group, *kernel_size = weight.shape
    kernel_size = tuple(kernel_size)
    conv = _static_conv(weight, stride, padding, dilation, groups, padding_mode, bias is not None)
    out_per_group = out_channels // groups
    outs = []
    for b in range(x.shape[0]):
        # attention over the kernel's (out, in, *kernel_size) entries, built entry by entry from its factors
        att = torch.ones(out_channels, in_per_group, *kernel_size, dtype=weight.dtype)
        for o in range(out_channels):
            g = o // out_per_group
            for c in range(in_per_group):
                factor = torch.ones((), dtype=weight.dtype)
                if in_channel is not None:
                    factor = factor * in_channel[b, g * in_per_group + c]
                if out_channel is not None:
                    factor = factor * out_channel[b, o]
                att[o, c] = factor * (spatial[b] if spatial is not None else torch.ones(kernel_size,
                                                                                       dtype=weight.dtype))
        kernel = sum((expert[b, i] if expert is not None else 1.0) * (att * weight[i]) for i in range(experts))
        params = {"weight": kernel}
        if bias is not None:
            params["bias"] = sum((expert[b, i] if expert is not None else 1.0) * bias[i] for i in range(experts))
        outs.append(functional_call(conv, params, (x[b:b + 1],)))
    return torch.cat(outs, 0)


#: The 2-D names the tests and earlier releases use (the functions take any rank).
reference_dynamic_conv2d = reference_dynamic_conv
reference_odconv2d = reference_odconv
