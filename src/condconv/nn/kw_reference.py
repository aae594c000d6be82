"""Slow, obviously-correct reference for KernelWarehouse layers (Li and Yao, ICML 2024, arXiv:2406.07879).

Each example's kernel is built cell by cell in Python loops from the attention and the warehouse's cells, then the
example is convolved on its own by plain :func:`torch.nn.functional.conv1d` / ``conv2d`` / ``conv3d``. Nothing here
is shared with the engine (:mod:`condconv.nn.kernel_warehouse`, :func:`condconv.nn.functional.conv_with_kernels`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["reference_kw_kernel", "reference_kw_conv"]


def reference_kw_kernel(attention: Tensor, cells: Tensor, kernel_shape: tuple[int, ...]) -> Tensor:
    """One example's kernel ``kernel_shape = (C_out, C_in / groups, *kernel)`` from its attention ``(M, C)``.

    Kernel cell ``m = (s * G_out + o) * G_in + i`` (``s`` a kernel position, or 0 without spatial partition; ``o``,
    ``i`` the output/input channel blocks) is ``sum_c attention[m, c] * cells[c]``.
    """
    num_cells, cell_out, cell_in = cells.shape[:3]
    cell_kernel = tuple(cells.shape[3:])
    out_channels, in_per_group = kernel_shape[:2]
    kernel = tuple(kernel_shape[2:])
    groups_out, groups_in = out_channels // cell_out, in_per_group // cell_in
    positions = list(itertools.product(*(range(k // c) for k, c in zip(kernel, cell_kernel))))
    result = torch.zeros(kernel_shape, dtype=cells.dtype)
    for s, pos in enumerate(positions):
        for o in range(groups_out):
            for i in range(groups_in):
                m = (s * groups_out + o) * groups_in + i
                cell = torch.zeros(cells.shape[1:], dtype=cells.dtype)
                for c in range(num_cells):
                    cell = cell + attention[m, c] * cells[c]
                index = [slice(o * cell_out, (o + 1) * cell_out), slice(i * cell_in, (i + 1) * cell_in)]
                index += [slice(p * c, (p + 1) * c) for p, c in zip(pos, cell_kernel)]
                result[tuple(index)] = cell
    return result


def reference_kw_conv(x: Tensor, attention: Tensor, cells: Tensor, kernel_shape: tuple[int, ...],
                      bias: Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1,
                      padding_mode: str = "zeros") -> Tensor:
    """Per-example loop: ``conv(x[b], reference_kw_kernel(attention[b], ...)) + bias``.

    Args:
        x: ``(B, C_in, *spatial)``. attention: ``(B, M, num_cells)``. cells: ``(num_cells, cell_out, cell_in,
        *cell_kernel)``. Others as :class:`torch.nn.Conv2d` (``padding`` ints or a tuple; ``padding_mode`` applied
        with :func:`torch.nn.functional.pad`).
    """
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    n = x.dim() - 2
    pads = (padding,) * n if isinstance(padding, int) else tuple(padding)
    outs = []
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        kernel = reference_kw_kernel(attention[b], cells, kernel_shape)
        if padding_mode != "zeros":
            flat = [p for v in reversed(pads) for p in (v, v)]
            xb, conv_pad = F.pad(xb, flat, mode=padding_mode), 0
        else:
            conv_pad = pads
        outs.append(conv(xb, kernel, bias, stride, conv_pad, dilation, groups))
    return torch.cat(outs, 0)
