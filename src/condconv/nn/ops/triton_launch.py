"""Tile sizes and launches of the Triton dynamic convolution kernels (imported on first use).

Tile sizes come from small shape rules (:func:`_gemm_tiles`, :func:`_direct_tiles`, :func:`_wgrad_tiles`), not
from ``triton.autotune``: the backward kernels accumulate with atomics (autotuning would have to re-zero their
buffers between trials), and a training run whose batch or image size varies would re-tune at every new shape.
The rules have not been timed on a GPU (none was available): they are the usual implicit-GEMM choices, checked
against the register and shared-memory reports of the kernels compiled offline for sm_90 so that nothing spills.
Under Triton's interpreter one small fixed configuration is used instead (:data:`INTERPRETER_TILES`; there the
cost grows with the number of programs and loop steps, not with the tile size).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from condconv.nn.ops import triton_kernels as kern
from condconv.nn.ops.shapes import memory_format_of, output_hw

__all__ = ["forward", "backward", "interpreted", "INTERPRETER_TILES"]

# Tiles used under TRITON_INTERPRET=1 (tests may shrink them below 16 to exercise multi-block loops: the
# interpreter's tl.dot takes any size, a GPU's needs 16).
INTERPRETER_TILES = {"BM": 64, "BN": 16, "BK": 16, "BP": 64}



def interpreted() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return type(kern._fwd_dense_kernel).__name__ == "InterpretedFunction"


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


@functools.cache
def _smem_budget(index: int) -> int:
    """Bytes of shared memory a program may plan for: 3/4 of the device's opt-in maximum per block."""
    props = torch.cuda.get_device_properties(index)
    return 3 * getattr(props, "shared_memory_per_block_optin", 99 * 1024) // 4


def _gemm_tiles(device: torch.device, rows: int, cols: int, depth: int, experts: int, in_size: int, w_size: int,
                fp64: bool, precision: str) -> dict:
    """Tiles of the implicit GEMMs (forward, input gradient), whose B operand is mixed from the experts on the fly.

    Chosen from register and shared-memory reports of the kernels compiled offline for sm_90 (no spills for up to
    32 experts), not from timings: ``BN <= 64`` and ``BK = 16`` when the experts' tiles are mixed unrolled (2 to 8
    experts; more go through a loop), half-size tiles for exact (non-TF32) float32, whose product runs on FMA units.
    """
    if interpreted():
        t = INTERPRETER_TILES
        return {"BM": t["BM"], "BN": t["BN"], "BK": t["BK"], "num_warps": 4, "num_stages": 1}
    if fp64:  # the float64 product is a [BM, BK, BN] broadcast held in registers
        return {"BM": 16, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1}
    bm, bn = _pow2(rows, 16, 128), _pow2(cols, 16, 64)
    bk = 32 if depth >= 32 and not 4 < experts <= 8 else 16
    if in_size == 4 and precision == "ieee":
        bm, bn, bk = min(bm, 64), min(bn, 32), 16
    stages = 3
    unrolled = experts if experts <= 8 else 1  # expert tiles the pipeline may buffer per stage
    budget = _smem_budget(device.index if device.index is not None else torch.cuda.current_device())
    while stages > 1 and stages * (bm * bk * in_size + unrolled * bk * bn * w_size) > budget:
        stages -= 1
    return {"BM": bm, "BN": bn, "BK": bk, "num_warps": 8 if bm * bn >= 8192 else 4, "num_stages": stages}


def _direct_tiles(rows: int, channels: int) -> dict:
    """Tiles of the depthwise forward and input-gradient kernels: (positions, channels) blocks."""
    if interpreted():
        t = INTERPRETER_TILES
        return {"BM": t["BM"], "BN": t["BN"], "num_warps": 4}
    return {"BM": _pow2(rows, 16, 64), "BN": _pow2(channels, 16, 32), "num_warps": 4}


def _wgrad_tiles(out_per_group: int, in_per_group: int, positions: int, eb: int, in_size: int, fp64: bool) -> dict:
    """Tiles of the dense kernel-gradient kernel, which keeps ``eb`` expert tiles and their gradients in registers
    (``eb * BO * BC`` capped so that nothing spills, per the offline sm_90 compile reports)."""
    if interpreted():
        t = INTERPRETER_TILES
        return {"BO": t["BN"], "BC": t["BK"], "BP": t["BP"], "num_warps": 4}
    if fp64:
        return {"BO": 16, "BC": 16, "BP": 16, "num_warps": 4}
    bo, bc = _pow2(out_per_group, 16, 32), _pow2(in_per_group, 16, 32)
    limit = 8192 if eb <= 8 else 4096
    while eb * bo * bc > limit and max(bo, bc) > 16:
        if bc >= bo:
            bc //= 2
        else:
            bo //= 2
    bp = _pow2(positions, 16, 64 if in_size <= 2 else 32)
    return {"BO": bo, "BC": bc, "BP": bp, "num_warps": 8 if bo * bc >= 1024 else 4}


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _batch_chunk(device: torch.device, batch: int, base_programs: int) -> int:
    """Examples per kernel-gradient program: the whole batch under the interpreter; on a GPU, enough programs
    (batch chunks x tiles) to fill the device about four times over."""
    if interpreted() or device.type != "cuda":
        return max(1, batch)
    target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    chunks = max(1, min(batch, triton.cdiv(target, max(1, base_programs))))
    return triton.cdiv(batch, chunks)


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 only when torch's matmul precision allows it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _dot_mode(dtype: torch.dtype) -> str:
    """How the kernels multiply tiles (see ``triton_kernels._mm``)."""
    if dtype == torch.float64:
        return "fp64"
    return "fp32" if dtype in (torch.float16, torch.bfloat16) and interpreted() else "dot"


def _acc(dtype: torch.dtype) -> tuple[bool, object, torch.dtype]:
    fp64 = dtype == torch.float64
    return fp64, (tl.float64 if fp64 else tl.float32), (torch.float64 if fp64 else torch.float32)


def _expert_bank(weight: Tensor) -> Tensor:
    """``(E, C_out, C_in/g, kh, kw)`` -> contiguous ``(E, kh, kw, C_in/g, C_out)`` (tiles contiguous along C_out)."""
    return weight.permute(0, 3, 4, 2, 1).contiguous()


def _geometry(stride, padding, dilation) -> tuple[int, ...]:
    return (stride[0], stride[1], padding[2], padding[0], dilation[0], dilation[1])


def _flat(t: Tensor | None, fallback: Tensor, *shape: int) -> Tensor:
    return fallback if t is None else t.reshape(*shape).contiguous()


def forward(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None,
            in_scale: Tensor | None, out_scale: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """The forward convolution (shapes validated by the caller); output in ``x``'s dtype and memory format."""
    batch, channels, height, width = x.shape
    experts, out_channels, in_per_group, kh, kw = weight.shape
    out_h, out_w = output_hw(height, width, kh, kw, stride, padding, dilation)
    y = torch.empty((batch, out_channels, out_h, out_w), dtype=x.dtype, device=x.device,
                    memory_format=memory_format_of(x))
    if y.numel() == 0:
        return y
    wt = _expert_bank(weight)
    r = routing.contiguous()
    tensors = (x, wt, r, _flat(bias, wt, experts, out_channels), _flat(spatial, wt, batch, kh * kw),
               _flat(in_scale, wt, batch, channels), _flat(out_scale, wt, batch, out_channels), y)
    flags = {"E": experts, "KH": kh, "KW": kw, "HAS_BIAS": bias is not None, "HAS_SP": spatial is not None,
             "HAS_IS": in_scale is not None, "HAS_OS": out_scale is not None}
    fp64, acc, _ = _acc(x.dtype)
    positions = out_h * out_w
    if groups == channels and in_per_group == 1:
        t = _direct_tiles(positions, out_channels)
        grid = (triton.cdiv(positions, t["BM"]) * batch, triton.cdiv(out_channels, t["BN"]))
        kern._fwd_depthwise_kernel[grid](
            *tensors, channels, height, width, out_channels, out_h, out_w, out_channels // channels,
            *x.stride(), *y.stride(), *_geometry(stride, padding, dilation), **flags, ACC=acc, **t)
        return y
    out_per_group = out_channels // groups
    t = _gemm_tiles(x.device, positions, out_per_group, in_per_group, experts, x.element_size(),
                    weight.element_size(), fp64, _precision(x.dtype))
    grid = (triton.cdiv(positions, t["BM"]) * batch * groups, triton.cdiv(out_per_group, t["BN"]))
    kern._fwd_dense_kernel[grid](
        *tensors, channels, height, width, out_channels, out_h, out_w, in_per_group, out_per_group, groups,
        *x.stride(), *y.stride(), *_geometry(stride, padding, dilation), **flags, DOT=_dot_mode(x.dtype),
        ACC=acc, PREC=_precision(x.dtype), **t)
    return y


def _input_grad(grad: Tensor, x: Tensor, wt: Tensor, r: Tensor, sp: Tensor, isc: Tensor, osc: Tensor,
                flags: dict, stride, padding, dilation, groups: int) -> Tensor:
    batch, channels, height, width = x.shape
    _, out_channels, out_h, out_w = grad.shape
    in_per_group = wt.shape[3]
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    if gx.numel() == 0:
        return gx
    fp64, acc, _ = _acc(x.dtype)
    phases = stride[0] * stride[1]
    rows = triton.cdiv(height, stride[0]) * triton.cdiv(width, stride[1])
    strided = phases > 1
    args = (grad, wt, r, sp, isc, osc, gx)
    geometry = _geometry(stride, padding, dilation)
    if groups == channels and in_per_group == 1:
        t = _direct_tiles(rows, channels)
        grid = (triton.cdiv(rows, t["BM"]) * batch * phases, triton.cdiv(channels, t["BN"]))
        kern._dgrad_depthwise_kernel[grid](
            *args, channels, height, width, out_channels, out_h, out_w, out_channels // channels,
            *grad.stride(), *gx.stride(), *geometry, **flags, STRIDED=strided, ACC=acc, **t)
        return gx
    out_per_group = out_channels // groups
    t = _gemm_tiles(x.device, rows, in_per_group, out_per_group, wt.shape[0], grad.element_size(),
                    wt.element_size(), fp64, _precision(grad.dtype))
    grid = (triton.cdiv(rows, t["BM"]) * batch * groups * phases, triton.cdiv(in_per_group, t["BN"]))
    kern._dgrad_dense_kernel[grid](
        *args, channels, height, width, out_channels, out_h, out_w, in_per_group, out_per_group, groups,
        *grad.stride(), *gx.stride(), *geometry, **flags, STRIDED=strided, DOT=_dot_mode(grad.dtype),
        ACC=acc, PREC=_precision(grad.dtype), **t)
    return gx


def _kernel_grads(grad: Tensor, x: Tensor, wt: Tensor, r: Tensor, sp: Tensor, isc: Tensor, osc: Tensor,
                  flags: dict, need: dict, stride, padding, dilation, groups: int) -> dict:
    """fp32 (fp64) gradients of the experts (in the permuted bank layout), routing, spatial and channel scales."""
    batch, channels, height, width = x.shape
    _, out_channels, out_h, out_w = grad.shape
    experts, kh, kw, in_per_group, _ = wt.shape
    fp64, acc, acc_dtype = _acc(x.dtype)
    shapes = {"W": wt.shape, "R": (batch, experts), "SP": (batch, kh * kw), "IS": (batch, channels),
              "OS": (batch, out_channels)}
    bufs = {k: torch.zeros(shapes[k] if need[k] else (1,), dtype=acc_dtype, device=x.device) for k in shapes}
    if batch == 0:
        return bufs
    need_flags = {f"NEED_{k}": need[k] for k in shapes}
    args = (x, grad, wt, r, sp, isc, osc, bufs["W"], bufs["R"], bufs["SP"], bufs["IS"], bufs["OS"])
    geometry = _geometry(stride, padding, dilation)
    eb = triton.next_power_of_2(experts)
    positions = out_h * out_w
    if groups == channels and in_per_group == 1:
        bo = INTERPRETER_TILES["BN"] if interpreted() else _pow2(out_channels, 16, 32)
        bp = INTERPRETER_TILES["BP"] if interpreted() else _pow2(positions, 16, 64)
        chunk = _batch_chunk(x.device, batch, triton.cdiv(out_channels, bo) * kh * kw)
        grid = (triton.cdiv(out_channels, bo) * triton.cdiv(batch, chunk), kh * kw)
        kern._wgrad_depthwise_kernel[grid](
            *args, batch, channels, height, width, out_channels, out_h, out_w, out_channels // channels, chunk,
            *x.stride(), *grad.stride(), *geometry, **flags, EB=eb, **need_flags, ACC=acc, BO=bo, BP=bp,
            num_warps=4)
        return bufs
    out_per_group = out_channels // groups
    t = _wgrad_tiles(out_per_group, in_per_group, positions, eb, x.element_size(), fp64)
    bo, bc = t["BO"], t["BC"]
    tiles = triton.cdiv(out_per_group, bo) * triton.cdiv(in_per_group, bc) * groups
    chunk = _batch_chunk(x.device, batch, tiles * kh * kw)
    grid = (tiles * triton.cdiv(batch, chunk), kh * kw)
    kern._wgrad_dense_kernel[grid](
        *args, batch, channels, height, width, out_channels, out_h, out_w, in_per_group, out_per_group, groups,
        chunk, *x.stride(), *grad.stride(), *geometry, **flags, EB=eb, **need_flags, DOT=_dot_mode(grad.dtype),
        ACC=acc, PREC=_precision(grad.dtype), **t)
    return bufs


def backward(grad: Tensor, x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None,
             in_scale: Tensor | None, out_scale: Tensor | None, stride, padding, dilation, groups: int,
             output_mask) -> list[Tensor]:
    """Gradients of x, weight, routing, bias, spatial, in_scale, out_scale (empty tensors where not requested)."""
    need_x, need_w, need_r, need_b, need_sp, need_is, need_os = (bool(m) for m in output_mask)
    batch, channels = x.shape[:2]
    experts, out_channels, _, kh, kw = weight.shape
    _, _, acc_dtype = _acc(x.dtype)
    wt = _expert_bank(weight)
    r = routing.contiguous()
    sp = _flat(spatial, wt, batch, kh * kw)
    isc = _flat(in_scale, wt, batch, channels)
    osc = _flat(out_scale, wt, batch, out_channels)
    flags = {"E": experts, "KH": kh, "KW": kw, "HAS_SP": spatial is not None, "HAS_IS": in_scale is not None,
             "HAS_OS": out_scale is not None}
    out = [x.new_empty(0) for _ in range(7)]
    if need_x:
        out[0] = _input_grad(grad, x, wt, r, sp, isc, osc, flags, stride, padding, dilation, groups)
    need = {"W": need_w, "R": need_r, "SP": need_sp, "IS": need_is, "OS": need_os}
    if any(need.values()):
        bufs = _kernel_grads(grad, x, wt, r, sp, isc, osc, flags, need, stride, padding, dilation, groups)
        if need_w:
            out[1] = torch.empty_like(weight, memory_format=torch.contiguous_format)
            out[1].copy_(bufs["W"].permute(0, 4, 3, 1, 2))
        if need_sp:
            out[4] = bufs["SP"].to(spatial.dtype).reshape(batch, kh, kw)
        if need_is:
            out[5] = bufs["IS"].to(in_scale.dtype)
        if need_os:
            out[6] = bufs["OS"].to(out_scale.dtype)
    if need_b or (need_r and bias is not None):
        grad_sum = grad.sum(dim=(2, 3), dtype=acc_dtype)  # (B, C_out)
        if need_b:
            out[3] = (routing.to(acc_dtype).t() @ grad_sum).to(bias.dtype)
        if need_r:
            bufs["R"] += grad_sum @ bias.to(acc_dtype).t()
    if need_r:
        out[2] = bufs["R"].to(routing.dtype)
    return out
