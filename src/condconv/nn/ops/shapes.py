"""Shape and layout rules shared by the Triton operator's front end (:mod:`condconv.nn.ops.triton_conv`, which must work
without Triton) and its kernel launches (:mod:`condconv.nn.ops.triton_launch`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["memory_format_of", "output_hw"]


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format of an output or gradient made for ``x``: channels_last if ``x`` is (and is not also
    NCHW-contiguous), else contiguous."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def output_hw(height, width, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int]):
    """``(H_out, W_out)`` for padding ``(left, right, top, bottom)`` (works on symbolic sizes)."""
    out_h = (height + padding[2] + padding[3] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + padding[0] + padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out_h, out_w
