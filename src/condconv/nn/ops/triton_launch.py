"""Launches of the Triton dynamic convolution kernels (imported on first use): regimes, tiles, guards.

Every call is first *planned* (:func:`plan`: the kernels, grids, arguments and tile choices of the forward, the
input gradient and the kernel gradients) and then run under the input's CUDA device. The plan is what the offline
compile check (:mod:`condconv.nn.ops.triton_offline`) compiles for sm_80 and sm_90a, so the specialisations checked
there are the ones launched here.

Regimes of the dense and grouped kernels (:mod:`condconv.nn.ops.triton_gemm`): up to :data:`SMALL_MAP_POSITIONS`
positions per example (every default CondConv placement), a program owns ``G`` examples and mixes their kernel
tiles from one load of the experts' tiles; larger maps mix the per-example kernels of a chunk of examples into a
workspace of at most :data:`WORKSPACE_BYTES` (so that it stays in L2) and run a plain implicit GEMM per example; their
kernel gradients likewise go through a workspace (each example's kernel gradient, all kernel positions, by one
implicit GEMM, then the reductions over groups of examples: :mod:`condconv.nn.ops.triton_wgrad`).

Tile sizes come from small shape rules, not from ``triton.autotune`` (a training run whose batch or image size varies
would re-tune at every new shape). They have not been timed on a GPU (none was available): they are checked against
the register, spill and shared-memory reports of the kernels compiled offline (``tests/test_triton_compile.py``).
Under Triton's interpreter one small configuration is used (:data:`INTERPRETER_TILES`).

32-bit offsets: every kernel computes example bases in 64 bits and offsets within an example, an expert bank or a
workspace in 32 bits; :func:`check_offsets` refuses any tensor whose per-example extent would not fit.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from condconv.nn.ops import triton_gemm as gemm
from condconv.nn.ops import triton_kernels as kern
from condconv.nn.ops import triton_wgrad as wgrad
from condconv.nn.ops.shapes import memory_format_of, output_hw

__all__ = ["forward", "backward", "plan", "interpreted", "check_offsets", "Launch", "Target", "INTERPRETER_TILES"]

# Tiles used under TRITON_INTERPRET=1 (tests shrink them to exercise multi-block loops, and change G; the
# interpreter's tl.dot takes any size, a GPU's needs 16 along the reduction for 16-bit operands).
INTERPRETER_TILES = {"BM": 64, "BN": 16, "BK": 16, "BP": 64, "G": 2}
SMALL_MAP_POSITIONS = 256  # output (forward) / input (input gradient) positions per example of the small-map regime
WORKSPACE_BYTES = 16 << 20  # large-map regime: the mixed kernels of one chunk of examples
FORCE_REGIME: str | None = None  # tests: "group" or "panel" for every dense layer
# Keep the experts in the kernels' layout and dtype between calls while the weight's storage and version counter are
# unchanged. Off by default: a write through ``weight.data`` (gradcheck does it, as does old-style user code) does
# not bump the weight's version counter and would go unnoticed. Safe where weights only change through in-place
# operations on the parameters themselves (optimizers, load_state_dict); switch on with
# CONDCONV_TRITON_CACHE_BANK=1 or by setting this flag.
CACHE_BANK = os.environ.get("CONDCONV_TRITON_CACHE_BANK", "0").strip().lower() in ("1", "true", "yes", "on")
_INT32 = 2**31


class Target(NamedTuple):
    """What the tile rules need to know of a GPU: shared memory a block may use, and its SM count."""

    smem: int
    sms: int


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **kwargs)``; ``role`` names it in reports."""

    role: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


def interpreted() -> bool:
    """Whether the kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""
    return type(kern._fwd_depthwise_kernel).__name__ == "InterpretedFunction"


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


@functools.cache
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(getattr(props, "shared_memory_per_block_optin", 99 * 1024), props.multi_processor_count)


def _target(device: torch.device) -> Target:
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    return Target(227 * 1024, 132)  # meta tensors (offline plans: an H100/H200) and the interpreter


def _device_guard(device: torch.device):
    """Launches go to the current CUDA device: make it the input's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run(launches: list[Launch], device: torch.device) -> None:
    with _device_guard(device):
        for launch in launches:
            launch.kernel[launch.grid](*launch.args, **launch.kwargs)


# ------------------------------------------------------------------------------------------------ checks


def _extent(t: Tensor, skip_batch: bool) -> int:
    """Largest element offset reachable in ``t`` (without the first axis's when ``skip_batch``)."""
    dims = list(zip(t.shape, t.stride()))[1 if skip_batch else 0:]
    return sum((n - 1) * abs(s) for n, s in dims if n > 0)


def check_offsets(tensors: dict, per_example: tuple[str, ...]) -> None:
    """Refuse any tensor whose offsets could overflow 32 bits in the kernels.

    Args:
        tensors: name -> tensor, every tensor a launch touches.
        per_example: names whose first axis is the batch (the kernels compute that offset in 64 bits).

    Raises:
        ValueError: naming the tensor and its extent.
    """
    for name, t in tensors.items():
        extent = _extent(t, name in per_example)
        if extent >= _INT32:
            where = "per example " if name in per_example else ""
            raise ValueError(f"{name} spans {extent + 1} elements {where}(shape {tuple(t.shape)}, strides "
                             f"{tuple(t.stride())}): the Triton kernels address at most 2**31 there; split the batch "
                             "or use another strategy")


# ------------------------------------------------------------------------------------------------ experts


_BANKS: OrderedDict = OrderedDict()


def _bank(weight: Tensor, dtype: torch.dtype, transposed: bool, groups: int) -> Tensor:
    """The experts in the kernels' layout and ``dtype``: ``(E, KK, C_in/g, C_out)`` (forward, kernel gradients) or
    ``(E, KK, C_out/g, C_in)`` (``transposed``: input gradient), cached while the weight is unchanged (its storage,
    strides and version counter), the cached entry holding the weight so that its storage cannot be reused."""
    key = None
    if CACHE_BANK and weight.device.type != "meta" and not weight.is_inference():
        key = (weight.data_ptr(), weight.device, tuple(weight.shape), weight.stride(), weight.dtype,
               weight._version, dtype, transposed, groups)
        hit = _BANKS.get(key)
        if hit is not None:
            _BANKS.move_to_end(key)
            return hit[1]
    e, o, cg, kh, kw = weight.shape
    if transposed:
        bank = weight.reshape(e, groups, o // groups, cg, kh, kw).permute(0, 4, 5, 2, 1, 3)
        bank = bank.reshape(e, kh * kw, o // groups, groups * cg)
    else:
        bank = weight.permute(0, 3, 4, 2, 1).reshape(e, kh * kw, cg, o)
    bank = bank.to(dtype=dtype, memory_format=torch.contiguous_format).contiguous()
    if key is not None:
        _BANKS[key] = (weight, bank)
        while len(_BANKS) > 64:
            _BANKS.popitem(last=False)
    return bank


# ------------------------------------------------------------------------------------------------ tiles


def _modes(dtype: torch.dtype) -> dict:
    """Accumulator, product and mixing modes of the kernels for inputs of ``dtype``."""
    fp64 = dtype == torch.float64
    low = dtype in (torch.float16, torch.bfloat16)
    prec = "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else "ieee"
    dot = "fp64" if fp64 else ("fp32" if low and interpreted() else "dot")
    return {"ACC": tl.float64 if fp64 else tl.float32, "PREC": prec, "DOT": dot, "MIX": dot}


def _experts_block(experts: int, dtype: torch.dtype) -> int:
    """``EB``: experts padded to a power of two, and to the reduction a GPU's ``tl.dot`` needs (16 for 16-bit
    operands, 8 for 32-bit)."""
    eb = triton.next_power_of_2(experts)
    if interpreted() or dtype == torch.float64:
        return eb
    return max(eb, 16 if dtype in (torch.float16, torch.bfloat16) else 8)


def _group_tiles(target: Target, rows: int, cols: int, batch: int, eb: int, dtype: torch.dtype) -> dict:
    """Small-map regime: ``G`` examples x ``BM`` rows x ``BN`` channels per program.

    Every expert byte a program loads serves ``G * BM`` rows, so the rule makes that product large: ``BM`` covers
    the example's rows in one block where it can (up to 256: the experts are then read once per example group and
    the mixing product, ``EB / BM`` of the convolution's multiply-adds, is amortised over the most rows), then ``G``
    as large as ``G * BM * BN`` float32 accumulators allow: 16384 (8 warps; 4096 for exact float32, whose products
    run on FMA units), ``BN`` down to 16 before ``G`` shrinks, and the pipelined input and expert tiles within
    three quarters of the target's shared memory. No spills in the offline reports."""
    if interpreted():
        t = INTERPRETER_TILES
        return {"G": t["G"], "BM": t["BM"], "BN": t["BN"], "BK": t["BK"], "num_warps": 4, "num_stages": 1}
    if dtype == torch.float64:
        return {"G": 2, "BM": 16, "BN": 16, "BK": 8, "num_warps": 4, "num_stages": 1}
    exact32 = _modes(dtype)["PREC"] == "ieee" and dtype == torch.float32
    limit = 4096 if exact32 else 16384  # FMA products: fewer accumulators
    bm, bn, bk, stages = _pow2(rows, 16, 64 if exact32 else 256), _pow2(cols, 16, 32), 16, 2
    g = min(16, triton.next_power_of_2(batch))
    size = torch.empty((), dtype=dtype).element_size()
    while g * bm * bn > limit or stages * (g * bm * bk + eb * bk * bn) * size > target.smem * 3 // 4:
        if bn > 16 and not (exact32 and g > 2):  # exact float32: G=4, BN=16 spills with ODConv's attentions
            bn //= 2
        elif g > 1:
            g //= 2
        else:
            bm //= 2
    return {"G": g, "BM": bm, "BN": bn, "BK": bk, "num_warps": 8 if g * bm * bn >= 8192 else 4, "num_stages": stages}


def _panel_tiles(target: Target, rows: int, cols: int, dtype: torch.dtype) -> dict:
    """Large-map regime: the implicit GEMM's tiles, pipeline depth within the shared memory."""
    if interpreted():
        t = INTERPRETER_TILES
        return {"BM": t["BM"], "BN": t["BN"], "BK": t["BK"], "num_warps": 4, "num_stages": 1}
    if dtype == torch.float64:
        return {"BM": 16, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1}
    size = torch.empty((), dtype=dtype).element_size()
    bm, bn = _pow2(rows, 16, 128), _pow2(cols, 16, 128)
    bk = 32 if size == 2 else 16
    if size == 4 and _modes(dtype)["PREC"] == "ieee":
        bm, bn = min(bm, 64), min(bn, 64)
    stages = 4
    while stages > 2 and stages * (bm + bn) * bk * size > target.smem * 3 // 4:
        stages -= 1
    return {"BM": bm, "BN": bn, "BK": bk, "num_warps": 8 if bm * bn >= 8192 else 4, "num_stages": stages}


def _mix_tiles(eb: int, dtype: torch.dtype) -> dict:
    if interpreted():
        return {"G": INTERPRETER_TILES["G"], "BLOCK": 4 * INTERPRETER_TILES["BN"], "num_warps": 4}
    if dtype == torch.float64:
        return {"G": 4, "BLOCK": 64, "num_warps": 4}
    return {"G": 16, "BLOCK": 4096 // max(eb, 16), "num_warps": 4}


def _small_map(positions: int) -> bool:
    if FORCE_REGIME is not None:
        return FORCE_REGIME == "group"
    return positions <= SMALL_MAP_POSITIONS


def _geometry(stride, padding, dilation) -> tuple[int, ...]:
    return (stride[0], stride[1], padding[2], padding[0], dilation[0], dilation[1])


def _flat(t: Tensor | None, fallback: Tensor, *shape: int) -> Tensor:
    return fallback if t is None else t.reshape(*shape).contiguous()


def _chunk_examples(batch: int, per_example_bytes: int) -> int:
    return max(1, min(batch, WORKSPACE_BYTES // max(1, per_example_bytes)))


def _is_depthwise(x: Tensor, weight: Tensor, groups: int) -> bool:
    return groups == x.shape[1] and weight.shape[2] == 1


def _entry(x: Tensor) -> Tensor:
    """Dense kernels read channels_last tiles (contiguous along the channels)."""
    return x if x.dim() != 4 else x.contiguous(memory_format=torch.channels_last)


@functools.cache
def _tap_table(kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int],
               dilation: tuple[int, int]) -> tuple[list[int], list[int]]:
    """For each stride phase ``(ph, pw)`` of the input gradient, the kernel positions that reach it and the output
    offsets they read, ``(kpos, d_oh, d_ow)`` with ``oh = qi + d_oh`` (``ih = ph + qi * SH``): rows padded to
    ``kh * kw`` per phase (flat), and the count of each phase."""
    (kh, kw), (sh, sw), (pt, pl), (dh, dw) = kernel, stride, pads, dilation
    taps, counts = [], []
    for ph in range(sh):
        for pw in range(sw):
            rows = [(i, (ph + pt - i * dh) // sh) for i in range(kh) if (ph + pt - i * dh) % sh == 0]
            cols = [(j, (pw + pl - j * dw) // sw) for j in range(kw) if (pw + pl - j * dw) % sw == 0]
            phase = [(i * kw + j, d_oh, d_ow) for i, d_oh in rows for j, d_ow in cols]
            counts.append(len(phase))
            taps += [v for tap in phase for v in tap] + [0] * (3 * (kh * kw - len(phase)))
    return taps, counts


def _taps(device: torch.device, kernel, stride, padding, dilation) -> tuple[Tensor, Tensor]:
    taps, counts = _tap_table(tuple(kernel), tuple(stride), (padding[2], padding[0]), tuple(dilation))
    return (torch.tensor(taps, dtype=torch.int32, device=device),
            torch.tensor(counts, dtype=torch.int32, device=device))


# ------------------------------------------------------------------------------------------------ forward


def _plan_forward(x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation, groups,
                  target: Target) -> tuple[Tensor, list[Launch]]:
    batch, channels, height, width = x.shape
    experts, out_channels, in_per_group, kh, kw = weight.shape
    out_h, out_w = output_hw(height, width, kh, kw, stride, padding, dilation)
    y = torch.empty((batch, out_channels, out_h, out_w), dtype=x.dtype, device=x.device,
                    memory_format=memory_format_of(x))
    if y.numel() == 0:
        return y, []
    modes = _modes(x.dtype)
    bank = _bank(weight, x.dtype, False, groups)
    r = routing.contiguous()
    ptrs = (_flat(bias, bank, experts, out_channels), _flat(spatial, bank, batch, kh * kw),
            _flat(in_scale, bank, batch, channels), _flat(out_scale, bank, batch, out_channels))
    flags = {"E": experts, "KH": kh, "KW": kw, "HAS_BIAS": bias is not None, "HAS_SP": spatial is not None,
             "HAS_IS": in_scale is not None, "HAS_OS": out_scale is not None}
    positions = out_h * out_w
    geometry = _geometry(stride, padding, dilation)
    if _is_depthwise(x, weight, groups):
        check_offsets({"x": x, "y": y, "weight": bank, "routing": r}, ("x", "y"))
        bm = INTERPRETER_TILES["BM"] if interpreted() else _pow2(positions, 16, 64)
        bn = INTERPRETER_TILES["BN"] if interpreted() else _pow2(out_channels, 16, 32)
        grid = (triton.cdiv(positions, bm) * batch, triton.cdiv(out_channels, bn))
        args = (x, bank, r, *ptrs[:3], ptrs[3], y, channels, height, width, out_channels, out_h, out_w,
                out_channels // channels, *x.stride(), *y.stride(), *geometry)
        kwargs = {**flags, "EB": triton.next_power_of_2(experts), "ACC": modes["ACC"], "BM": bm, "BN": bn,
                  "num_warps": 4}
        return y, [Launch("forward/depthwise", kern._fwd_depthwise_kernel, grid, args, kwargs)]
    xe = _entry(x)
    out_per_group = out_channels // groups
    eb = _experts_block(experts, x.dtype)
    sizes = (channels, height, width, out_channels, out_h, out_w, in_per_group, out_per_group, groups)
    strides = (*xe.stride(), *y.stride())
    if _small_map(positions):
        t = _group_tiles(target, positions, out_per_group, batch, eb, x.dtype)
        check_offsets({"x": xe, "y": y, "weight": bank, "routing": r}, ("x", "y"))
        grid = (triton.cdiv(positions, t["BM"]) * triton.cdiv(batch, t["G"]) * groups,
                triton.cdiv(out_per_group, t["BN"]))
        args = (xe, bank, r, *ptrs, y, batch, *sizes, *strides, *geometry)
        kwargs = {**flags, "EB": eb, **modes, **t}
        return y, [Launch("forward/small-map", gemm._fwd_group_kernel, grid, args, kwargs)]
    per_example = kh * kw * in_per_group * out_channels
    chunk = _chunk_examples(batch, per_example * x.element_size())
    ws = torch.empty((chunk, per_example), dtype=x.dtype, device=x.device)
    check_offsets({"x": xe, "y": y, "weight": bank, "workspace": ws, "routing": r}, ("x", "y", "workspace"))
    t = _panel_tiles(target, positions, out_per_group, x.dtype)
    m = _mix_tiles(eb, x.dtype)
    launches = []
    panel_flags = {k: v for k, v in {**flags, "EB": eb, **modes, **t}.items() if k != "MIX"}
    for b0 in range(0, batch, chunk):
        n = min(chunk, batch - b0)
        launches.append(Launch("forward/mix", gemm._mix_kernel, (triton.cdiv(n, m["G"]), triton.cdiv(
            per_example, m["BLOCK"])), (r, bank, ws, b0, b0 + n, per_example),
            {"E": experts, "EB": eb, "MIX": modes["MIX"], "PREC": modes["PREC"], "ACC": modes["ACC"], **m}))
        grid = (triton.cdiv(positions, t["BM"]) * n * groups, triton.cdiv(out_per_group, t["BN"]))
        launches.append(Launch("forward/large-map", gemm._fwd_panel_kernel, grid,
                               (xe, ws, r, *ptrs, y, b0, *sizes, *strides, *geometry), panel_flags))
    return y, launches


def forward(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None,
            in_scale: Tensor | None, out_scale: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """The forward convolution (shapes validated by the caller); output in ``x``'s dtype and memory format."""
    y, launches = _plan_forward(x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation,
                                groups, _target(x.device))
    _run(launches, x.device)
    return y


# ------------------------------------------------------------------------------------------------ input gradient


def _plan_input_grad(grad, x, weight, r, sp, isc, osc, flags, stride, padding, dilation, groups,
                     target: Target) -> tuple[Tensor, list[Launch]]:
    batch, channels, height, width = x.shape
    _, out_channels, out_h, out_w = grad.shape
    experts, _, in_per_group, kh, kw = weight.shape
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    if gx.numel() == 0:
        return gx, []
    modes = _modes(grad.dtype)
    phases = stride[0] * stride[1]
    rows = triton.cdiv(height, stride[0]) * triton.cdiv(width, stride[1])
    taps, ntaps = _taps(x.device, (kh, kw), stride, padding, dilation)
    flags = {**flags, "KK": kh * kw}
    if _is_depthwise(x, weight, groups):
        bank = _bank(weight, grad.dtype, False, groups)
        check_offsets({"grad": grad, "grad_x": gx, "weight": bank}, ("grad", "grad_x"))
        bm = INTERPRETER_TILES["BM"] if interpreted() else _pow2(rows, 16, 64)
        bn = INTERPRETER_TILES["BN"] if interpreted() else _pow2(channels, 16, 32)
        grid = (phases * triton.cdiv(rows, bm) * batch, triton.cdiv(channels, bn))
        args = (grad, bank, r, sp, isc, osc, gx, taps, ntaps, channels, height, width, out_channels, out_h, out_w,
                out_channels // channels, *grad.stride(), *gx.stride(), *stride)
        kwargs = {**flags, "EB": triton.next_power_of_2(experts), "ACC": modes["ACC"], "BM": bm, "BN": bn,
                  "num_warps": 4}
        return gx, [Launch("input-grad/depthwise", kern._dgrad_depthwise_kernel, grid, args, kwargs)]
    dy = _entry(grad)
    out_per_group = out_channels // groups
    bank = _bank(weight, grad.dtype, True, groups)
    eb = _experts_block(experts, grad.dtype)
    sizes = (channels, height, width, out_channels, out_h, out_w, in_per_group, out_per_group, groups)
    strides = (*dy.stride(), *gx.stride())
    if _small_map(height * width):
        t = _group_tiles(target, rows, in_per_group, batch, eb, grad.dtype)
        check_offsets({"grad": dy, "grad_x": gx, "weight": bank}, ("grad", "grad_x"))
        grid = (phases * triton.cdiv(rows, t["BM"]) * triton.cdiv(batch, t["G"]) * groups,
                triton.cdiv(in_per_group, t["BN"]))
        args = (dy, bank, r, sp, isc, osc, gx, taps, ntaps, batch, *sizes, *strides, *stride)
        kwargs = {**flags, "EB": eb, **modes, **t}
        return gx, [Launch("input-grad/small-map", gemm._dgrad_group_kernel, grid, args, kwargs)]
    per_example = kh * kw * out_per_group * channels
    chunk = _chunk_examples(batch, per_example * grad.element_size())
    ws = torch.empty((chunk, per_example), dtype=grad.dtype, device=x.device)
    check_offsets({"grad": dy, "grad_x": gx, "weight": bank, "workspace": ws}, ("grad", "grad_x", "workspace"))
    t = _panel_tiles(target, rows, in_per_group, grad.dtype)
    m = _mix_tiles(eb, grad.dtype)
    panel = {k: v for k, v in {**flags, **modes, **t}.items() if k not in ("MIX", "E")}
    launches = []
    for b0 in range(0, batch, chunk):
        n = min(chunk, batch - b0)
        launches.append(Launch("input-grad/mix", gemm._mix_kernel, (triton.cdiv(n, m["G"]), triton.cdiv(
            per_example, m["BLOCK"])), (r, bank, ws, b0, b0 + n, per_example),
            {"E": experts, "EB": eb, "MIX": modes["MIX"], "PREC": modes["PREC"], "ACC": modes["ACC"], **m}))
        grid = (phases * triton.cdiv(rows, t["BM"]) * n * groups, triton.cdiv(in_per_group, t["BN"]))
        launches.append(Launch("input-grad/large-map", gemm._dgrad_panel_kernel, grid,
                               (dy, ws, sp, isc, osc, gx, taps, ntaps, b0, *sizes, *strides, *stride), panel))
    return gx, launches


# ------------------------------------------------------------------------------------------------ kernel gradients


def _wgrad_tiles(out_per_group: int, in_per_group: int, positions: int, eb: int, dtype: torch.dtype) -> dict:
    """Tiles of the dense kernel-gradient kernel (``eb`` expert tiles, their gradients and ``G`` per-example
    gradients in registers: ``eb * BC * BO`` capped so that nothing spills in the offline reports)."""
    if interpreted():
        t = INTERPRETER_TILES
        return {"G": t["G"], "BO": t["BN"], "BC": t["BK"], "BP": t["BP"], "num_warps": 4}
    if dtype == torch.float64:
        return {"G": 2, "BO": 16, "BC": 16, "BP": 16, "num_warps": 4}
    bo, bc = _pow2(out_per_group, 16, 32), _pow2(in_per_group, 16, 32)
    while eb * bo * bc > 4096 and max(bo, bc) > 16:
        if bc >= bo:
            bc //= 2
        else:
            bo //= 2
    bp = _pow2(positions, 16, 32)
    return {"G": 8, "BO": bo, "BC": bc, "BP": bp, "num_warps": 8}


def _batch_chunk(target: Target, batch: int, base_programs: int, g: int, slot_bytes: int) -> int:
    """Examples per kernel-gradient program, a multiple of ``g``: under the interpreter ``g`` (several chunks, so
    that their partial sums are exercised); on a GPU, enough programs to fill the device about four times over,
    with at most 256 MiB of expert-gradient partial sums (``slot_bytes`` each)."""
    if interpreted():
        return g
    chunks = max(1, min(triton.cdiv(batch, g), triton.cdiv(4 * target.sms, max(1, base_programs)),
                        (256 << 20) // max(1, slot_bytes)))
    return triton.cdiv(triton.cdiv(batch, chunks), g) * g


def _plan_kernel_grads(grad, x, weight, r, sp, isc, osc, flags, need, stride, padding, dilation, groups,
                       target: Target) -> tuple[dict, list[Launch]]:
    """Partial-sum buffers (float32, float64 for float64 inputs; summed over their first axis by the caller) of the
    gradients of the experts (bank layout), routing, spatial and channel attentions, and the launches filling them."""
    batch, channels, height, width = x.shape
    _, out_channels, out_h, out_w = grad.shape
    experts, _, in_per_group, kh, kw = weight.shape
    modes = _modes(x.dtype)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    bank = _bank(weight, x.dtype, False, groups)
    kk = kh * kw
    positions = out_h * out_w
    depthwise = _is_depthwise(x, weight, groups)
    if depthwise:
        g = 1
        t = {"BO": INTERPRETER_TILES["BN"] if interpreted() else _pow2(out_channels, 16, 32),
             "BP": INTERPRETER_TILES["BP"] if interpreted() else _pow2(positions, 16, 32), "num_warps": 4}
        n_ob, n_cb = triton.cdiv(out_channels, t["BO"]), 1
        tiles, eb = n_ob, triton.next_power_of_2(experts)
        mult = out_channels // channels
        slots = {"R": n_ob * kk, "SP": n_ob, "OS": kk, "IS": kk * mult}
    else:
        out_per_group = out_channels // groups
        eb = _experts_block(experts, torch.float32 if x.dtype != torch.float64 else x.dtype)
        t = _wgrad_tiles(out_per_group, in_per_group, positions, eb, x.dtype)
        if x.dtype == torch.float64 and eb > 8 and not interpreted():
            t = {**t, "BC": 8, "BO": 8}  # spills at 16 experts otherwise (the offline reports)
        g = t["G"]
        n_ob, n_cb = triton.cdiv(out_per_group, t["BO"]), triton.cdiv(in_per_group, t["BC"])
        tiles = n_ob * n_cb * groups
        slots = {"R": tiles * kk, "SP": tiles, "OS": n_cb * kk, "IS": n_ob * kk}
    panel = not depthwise and not _small_map(positions)
    per_example = kk * in_per_group * out_channels
    ws_chunk = _chunk_examples(batch, per_example * (8 if x.dtype == torch.float64 else 4)) if panel else batch
    chunk = _batch_chunk(target, min(batch, max(1, ws_chunk)), tiles * kk, g, bank.numel() * 4)
    spans = [(b0, min(batch, b0 + ws_chunk)) for b0 in range(0, batch, max(1, ws_chunk))]
    n_chunks = max(1, sum(triton.cdiv(b1 - b0, chunk) for b0, b1 in spans))
    shapes = {"W": (n_chunks, *bank.shape), "R": (slots["R"], batch, experts), "SP": (slots["SP"], batch, kk),
              "IS": (slots["IS"], batch, channels), "OS": (slots["OS"], batch, out_channels)}
    bufs = {k: torch.zeros(shapes[k] if need[k] else (1,), dtype=acc_dtype, device=x.device) for k in shapes}
    if batch == 0:
        return bufs, []
    xe, dy = (x, grad) if depthwise else (_entry(x), _entry(grad))
    ws = torch.empty((min(batch, ws_chunk), per_example) if panel else (1,), dtype=acc_dtype, device=x.device)
    check_offsets({"x": xe, "grad": dy, "weight": bank, **{f"partial {k}": bufs[k] for k in ("R", "SP", "IS", "OS")},
                   "partial W": bufs["W"], "workspace": ws}, ("x", "grad", "partial W", "workspace"))
    geometry = _geometry(stride, padding, dilation)
    kwargs = {**flags, "EB": eb, **{f"NEED_{k}": need[k] for k in shapes}, "ACC": modes["ACC"], **t}
    if depthwise:
        args = (xe, dy, bank, r, sp, isc, osc, bufs["W"], bufs["R"], bufs["SP"], bufs["IS"], bufs["OS"])
        grid = (n_ob * n_chunks, kk)
        args += (batch, channels, height, width, out_channels, out_h, out_w, mult, chunk, *xe.stride(),
                 *dy.stride(), *geometry)
        return bufs, [Launch("kernel-grads/depthwise", kern._wgrad_depthwise_kernel, grid, args, kwargs)]
    kwargs.update(DOT=modes["DOT"], PREC=modes["PREC"], RED="fp64" if x.dtype == torch.float64 else "fp32",
                  FROM_WS=panel)
    sizes = (channels, height, width, out_channels, out_h, out_w, in_per_group, out_channels // groups, groups)
    launches, slot = [], 0
    for b0, b1 in spans:
        if panel:
            p = _panel_tiles(target, kk * in_per_group, out_channels // groups, x.dtype)
            grid = (triton.cdiv(kk * in_per_group, p["BM"]), triton.cdiv(out_channels // groups, p["BN"]),
                    (b1 - b0) * groups)
            launches.append(Launch("kernel-grads/large-map", wgrad._wgrad_panel_kernel, grid,
                                   (xe, dy, ws, b0, *sizes, *xe.stride(), *dy.stride(), *geometry),
                                   {"KH": kh, "KW": kw, "DOT": modes["DOT"], "ACC": modes["ACC"],
                                    "PREC": modes["PREC"], **p}))
        n = triton.cdiv(b1 - b0, chunk)
        args = (xe, dy, bank, r, sp, isc, osc, bufs["W"][slot:slot + n] if need["W"] else bufs["W"], bufs["R"],
                bufs["SP"], bufs["IS"], bufs["OS"], ws, b0, b1, batch, *sizes[:-1], groups, chunk, *xe.stride(),
                *dy.stride(), *geometry)
        launches.append(Launch("kernel-grads/reduce" if panel else "kernel-grads/dense", wgrad._wgrad_group_kernel,
                               (tiles * n, kk), args, kwargs))
        slot += n
    return bufs, launches


# ------------------------------------------------------------------------------------------------ backward


def _backward_inputs(grad, x, weight, routing, spatial, in_scale, out_scale) -> tuple:
    batch, channels = x.shape[:2]
    _, out_channels, _, kh, kw = weight.shape
    r = routing.contiguous()
    sp = _flat(spatial, r, batch, kh * kw)
    isc = _flat(in_scale, r, batch, channels)
    osc = _flat(out_scale, r, batch, out_channels)
    flags = {"E": weight.shape[0], "HAS_SP": spatial is not None, "HAS_IS": in_scale is not None,
             "HAS_OS": out_scale is not None}
    return r, sp, isc, osc, flags


def plan(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None,
         in_scale: Tensor | None, out_scale: Tensor | None, stride, padding, dilation, groups: int,
         target: Target | None = None) -> list[Launch]:
    """Every launch of a forward and a full backward (all gradients) of one call, without running any: what the
    offline compile check compiles (meta tensors are fine; ``target`` defaults to ``x``'s device's)."""
    target = target or _target(x.device)
    y, launches = _plan_forward(x, weight, routing, bias, spatial, in_scale, out_scale, stride, padding, dilation,
                                groups, target)
    grad = torch.empty_like(y)
    r, sp, isc, osc, flags = _backward_inputs(grad, x, weight, routing, spatial, in_scale, out_scale)
    launches += _plan_input_grad(grad, x, weight, r, sp, isc, osc, flags, stride, padding, dilation, groups,
                                 target)[1]
    need = {"W": True, "R": True, "SP": spatial is not None, "IS": in_scale is not None, "OS": out_scale is not None}
    launches += _plan_kernel_grads(grad, x, weight, r, sp, isc, osc, {**flags, "KH": weight.shape[3],
                                   "KW": weight.shape[4]}, need, stride, padding, dilation, groups, target)[1]
    return launches


def backward(grad: Tensor, x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, spatial: Tensor | None,
             in_scale: Tensor | None, out_scale: Tensor | None, stride, padding, dilation, groups: int,
             output_mask) -> list[Tensor]:
    """Gradients of x, weight, routing, bias, spatial, in_scale, out_scale (empty tensors where not requested).

    Deterministic: no kernel accumulates with atomics; partial sums are added in a fixed order."""
    need_x, need_w, need_r, need_b, need_sp, need_is, need_os = (bool(m) for m in output_mask)
    batch = x.shape[0]
    experts, out_channels, in_per_group, kh, kw = weight.shape
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    target = _target(x.device)
    r, sp, isc, osc, flags = _backward_inputs(grad, x, weight, routing, spatial, in_scale, out_scale)
    out = [x.new_empty(0) for _ in range(7)]
    if need_x:
        out[0], launches = _plan_input_grad(grad, x, weight, r, sp, isc, osc, flags, stride, padding, dilation,
                                            groups, target)
        _run(launches, x.device)
    need = {"W": need_w, "R": need_r, "SP": need_sp, "IS": need_is, "OS": need_os}
    sums = {}
    if any(need.values()):
        bufs, launches = _plan_kernel_grads(grad, x, weight, r, sp, isc, osc, {**flags, "KH": kh, "KW": kw}, need,
                                            stride, padding, dilation, groups, target)
        _run(launches, x.device)
        sums = {k: bufs[k].sum(0) for k in need if need[k]}
    if need_w:
        gw = sums["W"].reshape(experts, kh, kw, in_per_group, out_channels).permute(0, 4, 3, 1, 2)
        out[1] = gw.to(weight.dtype).contiguous()
    if need_sp:
        out[4] = sums["SP"].to(spatial.dtype).reshape(batch, kh, kw)
    if need_is:
        out[5] = sums["IS"].to(in_scale.dtype)
    if need_os:
        out[6] = sums["OS"].to(out_scale.dtype)
    if need_b or (need_r and bias is not None):
        grad_sum = grad.sum(dim=(2, 3), dtype=acc_dtype)  # (B, C_out)
        if need_b:
            out[3] = (routing.to(acc_dtype).t() @ grad_sum).to(bias.dtype)
        if need_r:
            sums["R"] = sums["R"] + grad_sum @ bias.to(acc_dtype).t()
    if need_r:
        out[2] = sums["R"].to(routing.dtype)
    return out
