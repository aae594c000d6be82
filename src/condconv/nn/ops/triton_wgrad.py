"""Triton kernel of the kernel-side gradients of a dense or grouped dynamic convolution (deterministic).

With ``Graw_b[c, o] = sum_p x[b, c, p + kpos] * dy[b, o, p]`` (one kernel position), ``G_b = in_scale[b, c] *
out_scale[b, o] * Graw_b`` (the gradient of the mixed kernel ``K_b = s_b * sum_e r[b, e] W_e``, ``s_b`` the spatial
attention of that position):

- ``grad_W[e] = sum_b r[b, e] s_b G_b``: a product ``(r * s)^T [E, G] x G [G, BC * BO]`` per group of ``G``
  examples (tensor cores where the target has them for the accumulation dtype), accumulated in registers over the
  program's chunk of the batch;
- ``grad_r[b, e] = s_b <G_b, W_e>`` and ``grad_spatial[b] = <G_b, M_b>``: one product ``G [G, BC * BO] x W^T``;
- ``grad_out_scale[b, o] = sum_c (G_b / out_scale)[c, o] K_b[c, o]`` and ``grad_in_scale`` likewise, with ``K_b``
  from one product ``(r * s) [G, E] x W [E, BC * BO]`` (the divisions are never performed: the factor is simply not
  applied).

Two regimes, as in the forward (``triton_gemm``):

- small maps (``_wgrad_group_kernel``, one launch): a program owns one kernel position, one ``(c, o)`` tile and a chunk
  of the batch; ``Graw`` of ``G`` examples is one batched tensor-core product over the example's output positions,
  kept in registers for the reductions (at 7x7 a per-example ``Graw`` of a 3x3 512-channel layer is 94x the size of
  its input, so it must not go through memory);
- large maps (``_wgrad_panel_kernel`` then ``_wgrad_group_kernel`` with ``FROM_WS``, per chunk of examples): ``Graw``
  of each example, all kernel positions at once, is one large-tile implicit GEMM over the example's positions (rows
  ``(kpos, c)``: a tile spans several kernel positions and gathers their input windows as one tile; a 2-D
  ``tl.dot``, wgmma on sm_90a) into a float32 workspace of at most 16 MiB (there ``Graw`` is at most a few times
  the size of the example's activations, and each of its elements sums hundreds of positions), then the reduction
  kernel reads it per group of ``G`` examples for the products above.

Every program writes its partial sums to its own slots (no atomics); the launcher adds the slots up in a fixed order,
so the gradients are the same bit for bit from run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from condconv.nn.ops.triton_gemm import _mm3
from condconv.nn.ops.triton_kernels import _attention_factors, _mm


@triton.jit
def _red(a, b, acc, RED: tl.constexpr):
    """``acc + a @ b`` for the reductions over experts and examples (float32 or float64 operands, exact)."""
    if RED == "fp64":
        acc += tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _graw(x_ptr, dy_ptr, offs_g, g_ok, ci, c_ok, co, o_ok, OH, OW, H, W, SH, SW, dh0, dw0,
          sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
          DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
          G: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr, BP: tl.constexpr):
    """``[G, BC, BO]``: ``sum_p x[b, c, p + kpos] * dy[b, o, p]`` for ``G`` examples (input offset ``dh0, dw0``)."""
    x_ex = x_ptr + offs_g.to(tl.int64) * sxb
    dy_ex = dy_ptr + offs_g.to(tl.int64) * sdb
    graw = tl.zeros([G, BC, BO], ACC)
    for p0 in range(0, OH * OW, BP):
        p = p0 + tl.arange(0, BP)
        p_ok = p < OH * OW
        oh = p // OW
        ow = p % OW
        ih = oh * SH + dh0
        iw = ow * SW + dw0
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_ex[:, None, None] + ci[None, :, None] * sxc + (ih * sxh + iw * sxw)[None, None, :],
                     mask=g_ok[:, None, None] & c_ok[None, :, None] & x_ok[None, None, :], other=0.0)
        dyt = tl.load(dy_ex[:, None, None] + (oh * sdh + ow * sdw)[None, :, None] + co[None, None, :] * sdc,
                      mask=g_ok[:, None, None] & p_ok[None, :, None] & o_ok[None, None, :], other=0.0)
        graw = _mm3(xt.to(dyt.dtype), dyt, graw, DOT, PREC)
    return graw


@triton.jit
def _flat_tile(kpos, pid_c, pid_o, g, CG, OG, O, BC: tl.constexpr, BO: tl.constexpr):
    """Offsets ``kpos * CG * O + c * O + o`` of a ``(c, o)`` tile of one kernel position, flattened to ``[BC * BO]``
    (a flat load of the float32 workspace, reshaped after, does not spill where a 3-D load does), and their mask."""
    j = tl.arange(0, BC * BO)
    cj = pid_c * BC + j // BO
    oj = pid_o * BO + j % BO
    return kpos * CG * O + cj * O + g * OG + oj, (cj < CG) & (oj < OG)


@triton.jit
def _experts_dot(gk, w_ptrs, ok, E_STRIDE, E: tl.constexpr, EB: tl.constexpr, G: tl.constexpr, ACC: tl.constexpr):
    """``[G, EB]``: ``sum_n gk[g, n] * w[e, n]`` one expert at a time (``w_ptrs``: expert 0's flat tile; with a
    ``gk`` loaded from the workspace, the same reduction as one product spills in ptxas)."""
    offs_e = tl.arange(0, EB)
    ge = tl.zeros([G, EB], ACC)
    for e in range(E):
        we = tl.load(w_ptrs + e * E_STRIDE, mask=ok, other=0.0).to(ACC)
        ge = tl.where(offs_e[None, :] == e, tl.sum(gk * we[None, :], axis=1)[:, None], ge)
    return ge


@triton.jit
def _wgrad_group_kernel(x_ptr, dy_ptr, w_ptr, r_ptr, sp_ptr, is_ptr, os_ptr,
                        gw_ptr, gr_ptr, gsp_ptr, gis_ptr, gos_ptr, ws_ptr, WS0, BEND,
                        B, C, H, W, O, OH, OW, CG, OG, GROUPS, BCHUNK,
                        sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                        SH, SW, PT, PL, DH, DW,
                        E: tl.constexpr, EB: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                        HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                        NEED_W: tl.constexpr, NEED_R: tl.constexpr, NEED_SP: tl.constexpr, NEED_IS: tl.constexpr,
                        NEED_OS: tl.constexpr, DOT: tl.constexpr, RED: tl.constexpr, ACC: tl.constexpr,
                        PREC: tl.constexpr, G: tl.constexpr, BO: tl.constexpr, BC: tl.constexpr,
                        BP: tl.constexpr, FROM_WS: tl.constexpr):
    """Kernel-side gradients of examples ``WS0 .. BEND``. Grid: (o-blocks * c-blocks * groups * batch chunks, KK);
    bank ``(E, KK, CG, O)``. ``FROM_WS``: read ``Graw`` of example ``b`` from the workspace row ``b - WS0`` (layout
    ``(KK, CG, O)``, written by :func:`_wgrad_panel_kernel`) instead of computing it (small maps).

    Slots (summed by the launcher over their first axis): ``gw[chunk]`` (bank layout), ``gr[tile * KK + kpos, b]``,
    ``gsp[tile, b, kpos]``, ``gos[c-block * KK + kpos, b]``, ``gis[o-block * KK + kpos, b]``; ``tile`` numbers the
    (group, c-block, o-block) tiles.
    """
    KK: tl.constexpr = KH * KW
    kpos = tl.program_id(1)
    n_ob = tl.cdiv(OG, BO)
    n_cb = tl.cdiv(CG, BC)
    pid = tl.program_id(0)
    pid_o = pid % n_ob
    rest = pid // n_ob
    pid_c = rest % n_cb
    rest = rest // n_cb
    g = rest % GROUPS
    chunk = rest // GROUPS
    tile = (g * n_cb + pid_c) * n_ob + pid_o
    b0 = WS0 + chunk * BCHUNK
    b1 = tl.minimum(b0 + BCHUNK, BEND)
    offs_o = pid_o * BO + tl.arange(0, BO)
    o_ok = offs_o < OG
    co = g * OG + offs_o
    offs_c = pid_c * BC + tl.arange(0, BC)
    c_ok = offs_c < CG
    ci = g * CG + offs_c
    offs_e = tl.arange(0, EB)
    e_ok = offs_e < E
    w_off = offs_e[:, None, None] * (KK * CG * O) + kpos * CG * O + offs_c[None, :, None] * O + co[None, None, :]
    w_mask = e_ok[:, None, None] & c_ok[None, :, None] & o_ok[None, None, :]
    w3 = tl.reshape(tl.load(w_ptr + w_off, mask=w_mask, other=0.0).to(ACC), [EB, BC * BO])
    acc_w = tl.zeros([EB, BC * BO], ACC)
    if FROM_WS:
        flat, flat_ok = _flat_tile(kpos, pid_c, pid_o, g, CG, OG, O, BC, BO)
    for i in range(tl.cdiv(b1 - b0, G)):
        offs_g = b0 + i * G + tl.arange(0, G)
        g_ok = offs_g < b1
        if FROM_WS:
            graw = tl.reshape(tl.load(ws_ptr + (offs_g - WS0).to(tl.int64)[:, None] * (KK * CG * O) + flat[None, :],
                                      mask=g_ok[:, None] & flat_ok[None, :], other=0.0).to(ACC), [G, BC, BO])
        else:
            graw = _graw(x_ptr, dy_ptr, offs_g, g_ok, ci, c_ok, co, o_ok, OH, OW, H, W, SH, SW,
                         (kpos // KW) * DH - PT, (kpos % KW) * DW - PL, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                         DOT, PREC, ACC, G, BC, BO, BP)
        rv = tl.load(r_ptr + offs_g[:, None] * E + offs_e[None, :], mask=g_ok[:, None] & e_ok[None, :],
                     other=0.0).to(ACC)
        s = tl.full([G], 1.0, ACC)
        if HAS_SP:
            s = tl.load(sp_ptr + offs_g * KK + kpos, mask=g_ok, other=0.0).to(ACC)
        isv = 1.0
        osv = 1.0
        if HAS_IS:
            isv = tl.load(is_ptr + offs_g[:, None] * C + ci[None, :], mask=g_ok[:, None] & c_ok[None, :],
                          other=0.0).to(ACC)[:, :, None]
        if HAS_OS:
            osv = tl.load(os_ptr + offs_g[:, None] * O + co[None, :], mask=g_ok[:, None] & o_ok[None, :],
                          other=0.0).to(ACC)[:, None, :]
        g_no_os, g_no_is, gk = _attention_factors(graw, isv, osv, HAS_IS, HAS_OS)
        gk = tl.reshape(gk, [G, BC * BO])
        rs = rv * s[:, None]
        if NEED_W:
            acc_w = _red(tl.trans(rs), gk, acc_w, RED)
        if NEED_R or NEED_SP:
            if FROM_WS:
                ge = _experts_dot(gk, w_ptr + flat, flat_ok, KK * CG * O, E, EB, G, ACC)
            else:
                ge = _red(gk, tl.trans(w3), tl.zeros([G, EB], ACC), RED)
            if NEED_R:
                tl.store(gr_ptr + ((tile * KK + kpos) * B + offs_g[:, None]).to(tl.int64) * E + offs_e[None, :],
                         ge * s[:, None], mask=g_ok[:, None] & e_ok[None, :])
            if NEED_SP:
                tl.store(gsp_ptr + (tile * B + offs_g).to(tl.int64) * KK + kpos, tl.sum(ge * rv, axis=1), mask=g_ok)
        if NEED_OS or NEED_IS:
            kb = tl.reshape(_red(rs, w3, tl.zeros([G, BC * BO], ACC), RED), [G, BC, BO])
            if NEED_OS:
                tl.store(gos_ptr + ((pid_c * KK + kpos) * B + offs_g[:, None]).to(tl.int64) * O + co[None, :],
                         tl.sum(g_no_os * kb, axis=1), mask=g_ok[:, None] & o_ok[None, :])
            if NEED_IS:
                tl.store(gis_ptr + ((pid_o * KK + kpos) * B + offs_g[:, None]).to(tl.int64) * C + ci[None, :],
                         tl.sum(g_no_is * kb, axis=2), mask=g_ok[:, None] & c_ok[None, :])
    if NEED_W:
        tl.store(gw_ptr + chunk.to(tl.int64) * (E * KK * CG * O) + w_off, tl.reshape(acc_w, [EB, BC, BO]),
                 mask=w_mask)


@triton.jit
def _wgrad_panel_kernel(x_ptr, dy_ptr, ws_ptr, B0, C, H, W, O, OH, OW, CG, OG, GROUPS,
                        sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                        SH, SW, PT, PL, DH, DW, KH: tl.constexpr, KW: tl.constexpr,
                        DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Large maps: ``Graw`` of example ``B0 + i`` into the workspace row ``i`` (layout ``(KK, CG, O)``, ``ACC``).

    One implicit GEMM per example: rows ``(kpos, c)`` (a tile of ``BM`` rows spans several kernel positions when
    ``CG < BM``: their input windows are gathered as one tile), columns the output channels, reduction over the
    example's output positions in steps of ``BK`` (a 2-D ``tl.dot``: wgmma on sm_90a). Grid: (row blocks, column
    blocks, chunk examples * groups)."""
    KK: tl.constexpr = KH * KW
    rest = tl.program_id(2)
    g = rest % GROUPS
    i = rest // GROUPS
    b = B0 + i
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    r_ok = rows < KK * CG
    kpos = rows // CG
    c = rows % CG
    dh = (kpos // KW) * DH - PT
    dw = (kpos % KW) * DW - PL
    offs_o = tl.program_id(1) * BN + tl.arange(0, BN)
    o_ok = offs_o < OG
    co = g * OG + offs_o
    x_rows = x_ptr + b.to(tl.int64) * sxb + (g * CG + c) * sxc
    dy_b = dy_ptr + b.to(tl.int64) * sdb
    acc = tl.zeros([BM, BN], ACC)
    for p0 in range(0, OH * OW, BK):
        p = p0 + tl.arange(0, BK)
        p_ok = p < OH * OW
        oh = p // OW
        ow = p % OW
        ih = (oh * SH)[None, :] + dh[:, None]
        iw = (ow * SW)[None, :] + dw[:, None]
        x_ok = r_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_rows[:, None] + ih * sxh + iw * sxw, mask=x_ok, other=0.0)
        dyt = tl.load(dy_b + (oh * sdh + ow * sdw)[:, None] + co[None, :] * sdc, mask=p_ok[:, None] & o_ok[None, :],
                      other=0.0)
        acc = _mm(xt.to(dyt.dtype), dyt, acc, DOT, PREC)
    ptrs = ws_ptr + i.to(tl.int64) * (KK * CG * O) + rows[:, None] * O + co[None, :]
    tl.store(ptrs, acc.to(ws_ptr.dtype.element_ty), mask=r_ok[:, None] & o_ok[None, :])
