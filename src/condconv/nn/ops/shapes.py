"""Shape and layout rules shared by the engine and the Triton operator's front end (:mod:`condconv.nn.ops.triton_conv`,
which must work without Triton) and its kernel launches (:mod:`condconv.nn.ops.triton_launch`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["memory_format_of", "output_hw", "output_size"]


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format of an output or gradient made for ``x``: channels_last (channels_last_3d for a 5-D ``x``) if
    ``x`` is (and is not also contiguous), else contiguous."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is None or x.is_contiguous() or not x.is_contiguous(memory_format=channels_last):
        return torch.contiguous_format
    return channels_last


def output_size(size: Sequence, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> tuple:
    """The output's spatial size for any rank: ``size``, ``kernel_size``, ``stride``, ``dilation`` one entry per
    spatial axis, ``padding`` in :func:`torch.nn.functional.pad`'s order (last axis first, ``(before, after)`` per
    axis). Works on symbolic sizes."""
    rank = len(kernel_size)
    return tuple((size[i] + padding[2 * (rank - 1 - i)] + padding[2 * (rank - 1 - i) + 1]
                  - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1 for i in range(rank))


def output_hw(height, width, kh: int, kw: int, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int]):
    """``(H_out, W_out)`` for padding ``(left, right, top, bottom)`` (works on symbolic sizes)."""
    return output_size((height, width), (kh, kw), stride, padding, dilation)
