"""The engine's CPU path for per-example kernels: batch chunks and output-channel tiles in reused buffers.

On the CPU, memory traffic is the real cost of per-example kernels: mixing writes one full kernel per example, and
a fresh multi-megabyte allocation is served by glibc with newly mapped pages that are faulted in and zeroed on every
call. So per-example kernels are mixed chunk by chunk over the batch, each chunk's kernels at most
:data:`CHUNK_BYTES` big, into per-thread buffers reused across calls (:func:`workspace`). :class:`MixedMatmul` is
the ``bmm`` strategy as one custom autograd function over such tiles, with a backward that re-mixes each tile
instead of keeping every example's kernel alive. Every function serves 1-D, 2-D and 3-D convolutions alike.
"""

from __future__ import annotations

import itertools
import math
import threading
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from condconv.nn.ops.context import autocast_on, is_tracing, needs_grad
from condconv.nn.ops.decomposed import bmm_columns, mix_kernels, window

__all__ = ["CHUNK_BYTES", "GROUPED_CHUNK_BYTES", "SCAN_CHUNK_BYTES", "Columns", "MixedMatmul", "clear_workspace",
           "fused_bmm", "mix_into_workspace", "per_example", "workspace"]

# glibc's allocator serves blocks under its adaptive mmap threshold from reusable heap memory, larger ones from
# fresh pages that are faulted in and zero-filled on every call (measured: this costs more than the mixing): each
# chunk's kernels stay within this budget.
CHUNK_BYTES = 8 * 2**20
# The grouped convolution loses efficiency when split into small batches; it takes larger chunks.
GROUPED_CHUNK_BYTES = 64 * 2**20
# The ``scan`` strategy's per-example convolutions: big chunks, so that the experts are read few times (measured).
SCAN_CHUNK_BYTES = GROUPED_CHUNK_BYTES

_state = threading.local()


def workspace(numel: int, like: Tensor, slot: int = 0) -> Tensor:
    """A per-thread reusable flat buffer (grown on demand; about ``CHUNK_BYTES`` per slot, device and dtype)."""
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
    """Free this thread's reusable CPU buffers (up to ``GROUPED_CHUNK_BYTES`` per dtype, re-created on demand)."""
    _state.workspace = {}


def mix_into_workspace(routing: Tensor, weight: Tensor, spatial: Tensor | None = None, slot: int = 3) -> Tensor:
    """:func:`~condconv.nn.ops.decomposed.mix_kernels` into this thread's reusable buffer ``slot`` (inference only: the
    result is overwritten by the next call). A fresh multi-megabyte kernel would fault in new pages on every call."""
    batch, experts = routing.shape
    numel = weight[0].numel()
    kernels = torch.matmul(routing, weight.reshape(experts, numel),
                           out=workspace(batch * numel, weight, slot=slot).view(batch, numel))
    kernels = kernels.view(batch, *weight.shape[1:])
    if spatial is not None:
        kernels.mul_(spatial.reshape(batch, 1, 1, *spatial.shape[1:]))
    return kernels


def per_example(apply, x, weight, routing, spatial, geometry, out_hw, chunk_bytes: int | None = None,
                bias: Tensor | None = None) -> Tensor:
    """Mix per-example kernels and ``apply`` them, over batch chunks whose kernels fit in ``chunk_bytes``.

    Without autograd on the CPU, each chunk's kernels are mixed into one reused buffer (``matmul(out=)``): fresh
    multi-megabyte allocations fault in zeroed pages on every call, which can cost more than the mixing itself.
    """
    batch = routing.shape[0]
    numel = weight[0].numel()
    chunk = batch
    if x.device.type == "cpu" and not is_tracing():
        chunk = _chunk_size(batch, numel, weight, chunk_bytes or CHUNK_BYTES)
    reuse = (x.device.type == "cpu" and not needs_grad(x, weight, routing, spatial) and not is_tracing()
             and not autocast_on("cpu") and routing.dtype == weight.dtype)
    if chunk >= batch and not reuse:
        return apply(x, mix_kernels(routing, weight, spatial), geometry, out_hw, bias)
    mix = partial(mix_into_workspace, slot=0) if reuse else mix_kernels  # reuse: one buffer for every chunk
    outs = []
    for i in range(0, batch, chunk):
        j = min(i + chunk, batch)
        kernels = mix(routing[i:j], weight, None if spatial is None else spatial[i:j])
        outs.append(apply(x[i:j], kernels, geometry, out_hw, None if bias is None else bias[i:j]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


class Columns:
    """im2col for one convolution geometry (any rank), applied chunk by chunk, and its adjoint (col2im) for the
    gradient."""

    def __init__(self, x_shape, kernel_size, geometry, out_hw) -> None:
        self.stride, self.pad, self.dilation, self.groups = geometry
        self.kernel_size = tuple(kernel_size)
        self.pointwise = all(k == 1 for k in self.kernel_size)
        self.in_hw = tuple(x_shape[2:])
        self.channels = x_shape[1]
        self.out_hw = tuple(out_hw)

    def __call__(self, x: Tensor) -> Tensor:
        if self.pointwise:
            return bmm_columns(x, self.kernel_size, (self.stride, self.pad, self.dilation, self.groups), self.out_hw)
        # im2col as one strided copy of the padded input: several times faster than F.unfold on the CPU
        if any(self.pad):
            x = F.pad(x, tuple(p for p in reversed(self.pad) for _ in range(2)))
        n, c = x.shape[:2]
        st = x.stride()[2:]
        sizes = (n, c, *self.kernel_size, *self.out_hw)
        strides = (*x.stride()[:2], *(d * t for d, t in zip(self.dilation, st)),
                   *(s * t for s, t in zip(self.stride, st)))
        windows = x.as_strided(sizes, strides, x.storage_offset())
        return windows.reshape(n, self.groups, (c // self.groups) * math.prod(self.kernel_size),
                               math.prod(self.out_hw))

    def adjoint(self, grad_cols: Tensor) -> Tensor:
        """Gradient wrt the input chunk from the gradient wrt its columns ``(n, g, D, L)``."""
        n = grad_cols.shape[0]
        if self.pointwise:
            grad = grad_cols.reshape(n, self.channels, *self.out_hw)
            if all(s == 1 for s in self.stride):
                return grad
            full = grad.new_zeros((n, self.channels, *self.in_hw))
            full[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))] = grad
            return full
        if len(self.kernel_size) == 2:
            return F.fold(grad_cols.reshape(n, -1, math.prod(self.out_hw)), self.in_hw, self.kernel_size,
                          dilation=self.dilation, padding=self.pad, stride=self.stride)
        # other ranks: each kernel position's columns added back into the strided view of the padded input they
        # were read from, then the padding cropped
        padded = [size + 2 * p for size, p in zip(self.in_hw, self.pad)]
        full = grad_cols.new_zeros((n, self.channels, *padded))
        grad = grad_cols.reshape(n, self.channels, *self.kernel_size, *self.out_hw)
        for position in itertools.product(*(range(k) for k in self.kernel_size)):
            offset = [i * d for i, d in zip(position, self.dilation)]
            window(full, offset, self.stride, self.out_hw).add_(grad[(slice(None), slice(None), *position)])
        return full[(slice(None), slice(None), *(slice(p, p + size) for p, size in zip(self.pad, self.in_hw)))]


class MixedMatmul(torch.autograd.Function):
    """``out[b] = (sum_e r[b, e] W[e] * s[b]) @ im2col(x[b])`` in tiles (the CPU ``bmm`` path).

    Autograd through ``mix_kernels`` + ``unfold`` + ``matmul`` keeps the whole batch of mixed kernels and unfolded
    inputs alive for backward and allocates as much again for their gradients. Here the work is tiled over batch
    chunks and, for dense layers, over output channels, so that each tile's mixed kernels fit a per-thread buffer
    of ``CHUNK_BYTES`` that is reused across tiles and calls; each expert tile is read once per batch chunk.
    Backward re-mixes each tile instead of keeping kernels alive, and folds the kernel gradient straight into the
    gradients of the experts, the routing and the spatial attention.

    Shapes: ``x (B, C_in, H, W)``, ``weight (E, g, O/g, D)`` with ``D = C_in/g * kh * kw``, ``routing (B, E)``,
    ``spatial (B, kh * kw)`` or None -> ``(B, g, O/g, L)`` (in any rank: ``D = C_in/g * prod(kernel_size)``, ``L``
    the number of output positions).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None, columns: Columns,
                bias: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(x, weight, routing, spatial)
        ctx.columns = columns
        ctx.has_bias = bias is not None
        return _mixed_matmul_forward(x, weight, routing, spatial, columns, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, routing, spatial = ctx.saved_tensors
        columns = ctx.columns
        grad_bias = grad_out.sum(-1) if ctx.has_bias and ctx.needs_input_grad[5] else None
        if torch.is_grad_enabled():
            # create_graph=True (double backward, gradient penalties): differentiate the plain formulation instead
            return MixedMatmul._differentiable_backward(ctx, grad_out, x, weight, routing, spatial, columns) + \
                (grad_bias,)
        need_x, need_weight, need_routing, need_spatial = ctx.needs_input_grad[:4]
        need_spatial = need_spatial and spatial is not None
        batch = x.shape[0]
        experts, groups, per_group_out, depth = weight.shape
        length = grad_out.shape[-1]
        chunk, tile = _tiling(batch, groups, per_group_out, depth, length, columns, weight)
        size = chunk * groups * tile * depth
        mixed_buf = workspace(size, weight, slot=0)
        grad_buf = workspace(size, weight, slot=1)
        kern_buf = workspace(size, weight, slot=2) if spatial is not None else None
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
        return grad_x, grad_weight, grad_routing, grad_spatial, None, grad_bias

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


def _tiling(batch: int, groups: int, per_group_out: int, depth: int, length: int, columns: Columns,
            like: Tensor) -> tuple[int, int]:
    """(batch chunk, output-channel tile) so one tile of mixed kernels stays within ``CHUNK_BYTES``.

    Dense layers are tiled over output channels, which lets a large batch chunk share each read of the experts;
    grouped ones only over the batch. The unfolded input of a kxk chunk is held to the same budget.
    """
    item = like.element_size()
    per_item = groups * per_group_out * depth * item
    chunk = batch
    if not columns.pointwise:
        chunk = max(1, min(batch, CHUNK_BYTES // max(1, groups * depth * length * item)))
    if groups > 1 or chunk * per_item <= CHUNK_BYTES:
        return max(1, min(chunk, CHUNK_BYTES // max(1, per_item))), per_group_out
    min_tile = min(per_group_out, 32)
    chunk = max(1, min(chunk, CHUNK_BYTES // (min_tile * depth * item)))
    tile = max(min_tile, min(per_group_out, CHUNK_BYTES // (chunk * depth * item)))
    return chunk, tile


def _chunk_size(batch: int, numel: int, like: Tensor, budget: int | None = None) -> int:
    return max(1, min(batch, (budget or CHUNK_BYTES) // max(1, numel * like.element_size())))


def _mixed_matmul_forward(x: Tensor, weight: Tensor, routing: Tensor, spatial: Tensor | None, columns: Columns,
                          bias: Tensor | None = None) -> Tensor:
    batch = x.shape[0]
    experts, groups, per_group_out, depth = weight.shape
    length = math.prod(columns.out_hw)
    chunk, tile = _tiling(batch, groups, per_group_out, depth, length, columns, weight)
    buf = workspace(chunk * groups * tile * depth, weight, slot=0)
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
            k3 = kernels.view(n * groups, o1 - o0, depth)
            if bias is None:
                result = torch.bmm(k3, cols, out=target.view(n * groups, -1, length)) if tile == per_group_out \
                    else torch.bmm(k3, cols)
            else:  # the bias goes in as the GEMM's accumulator: no extra pass over the output
                b3 = bias[i:j, :, o0:o1].reshape(n * groups, o1 - o0, 1)
                result = torch.baddbmm(b3, k3, cols, out=target.view(n * groups, -1, length)) \
                    if tile == per_group_out else torch.baddbmm(b3, k3, cols)
            if tile != per_group_out:
                target.copy_(result.view_as(target))
    return out


def fused_bmm(x, weight, routing, spatial, geometry, out_hw, bias: Tensor | None = None) -> Tensor:
    """The ``bmm`` strategy through :class:`MixedMatmul` (CPU, no autocast, not tracing); ``bias``: ``(B, C_out)``."""
    groups = geometry[3]
    experts, out_channels, in_per_group, *kernel_size = weight.shape
    positions = math.prod(kernel_size)
    columns = Columns(x.shape, kernel_size, geometry, out_hw)
    w = weight.reshape(experts, groups, out_channels // groups, in_per_group * positions)
    s = None if spatial is None else spatial.reshape(spatial.shape[0], positions)
    b = None if bias is None else bias.reshape(bias.shape[0], groups, out_channels // groups)
    if needs_grad(x, weight, routing, spatial, bias):
        out = MixedMatmul.apply(x, w, routing, s, columns, b)
    else:
        out = _mixed_matmul_forward(x, w, routing, s, columns, b)
    return out.reshape(x.shape[0], out_channels, *out_hw)


