"""Triton kernels of the dense and grouped dynamic convolution: forward and input gradient, in two regimes.

The expert bank comes in the kernels' layout: ``(E, kh * kw, C_in / groups, C_out)`` for the forward (a tile of one
kernel position is contiguous along the output channels) and the transposed ``(E, kh * kw, C_out / groups, C_in)``
for the input gradient (contiguous along the input channels). The launcher caches it, in the compute dtype.

- **Small maps** (``_fwd_group_kernel``, ``_dgrad_group_kernel``): a program owns ``G`` examples, one block of
  ``BM`` output (input) positions and one block of ``BN`` channels. Each reduction step loads the ``[E, BK, BN]``
  tile of every expert once (one 3-D load, no loop over the experts however many there are), mixes the ``G``
  per-example tiles with one product ``routing[G, E] x tile[E, BK * BN]`` (tensor cores for 16-bit and TF32 inputs),
  scales them by ODConv's attentions, and runs the ``G`` per-example products as one batched ``tl.dot``. Every
  expert byte serves ``G * BM`` output rows instead of ``BM``.
- **Large maps** (``_mix_kernel`` then ``_fwd_panel_kernel`` / ``_dgrad_panel_kernel``): the per-example kernels of
  a chunk of examples are mixed once into a workspace (in the compute dtype, a chunk small enough to stay in L2),
  then a plain implicit GEMM per example sweeps all positions (a 2-D ``tl.dot``: wgmma on sm_90).

The input gradient is a transposed convolution computed per stride phase ``(ih % SH, iw % SW)``: the launcher
passes, for each phase, the kernel positions that reach it and the output offsets they read (``taps``: rows of
``(kpos, d_oh, d_ow)``, ``ntaps`` per phase), so the main loop runs over valid taps only and has no branch.

Addresses: every per-example base is a 64-bit product (example index times its stride); offsets within one example,
one expert bank or one workspace fit in 32 bits (checked by the launcher before any launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from condconv.nn.ops.triton_kernels import _mm, _phase_rows


@triton.jit
def _mm3(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    """Batched ``acc + a @ b`` (``[G, M, K] x [G, K, N]``); ``DOT`` as in :func:`triton_kernels._mm`."""
    if DOT == "fp64":
        acc += tl.sum(a[:, :, :, None].to(tl.float64) * b[:, None, :, :].to(tl.float64), axis=2)
    elif DOT == "fp32":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _mix_tiles(rs, w3, MIX: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
               G: tl.constexpr, EB: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    """``[G, BK, BN]`` per-example tiles ``sum_e rs[g, e] * w3[e]`` in ``ACC``. ``MIX``: ``'dot'`` (one product
    ``rs @ w3`` with the operands in the bank's dtype, on tensor cores), ``'fp32'`` (the same in float32, exact:
    the interpreter's 16-bit dot is wrong) or ``'fp64'`` (a broadcast product)."""
    flat = tl.reshape(w3, [EB, BK * BN])
    if MIX == "fp64":
        mixed = tl.sum(rs.to(tl.float64)[:, :, None] * flat.to(tl.float64)[None, :, :], axis=1)
    elif MIX == "fp32":
        mixed = tl.dot(rs.to(tl.float32), flat.to(tl.float32), input_precision="ieee")
    else:
        mixed = tl.dot(rs.to(flat.dtype), flat, input_precision=PREC, out_dtype=tl.float32)
    return tl.reshape(mixed.to(ACC), [G, BK, BN])


@triton.jit
def _group_rows(pid, B, P, G: tl.constexpr, BM: tl.constexpr, PARTS):
    """Split a small-map program id ``(m-block, example group, rest)``: ``(rest, offs_g, g_ok, offs_m, m_ok)``."""
    n_mb = tl.cdiv(P, BM)
    pid_m = pid % n_mb
    rest = pid // n_mb
    offs_g = (rest // PARTS) * G + tl.arange(0, G)
    offs_m = pid_m * BM + tl.arange(0, BM)
    return rest % PARTS, offs_g, offs_g < B, offs_m, offs_m < P


# ---------------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_epilogue(acc, y_ptr, r, bias_ptr, os_ptr, offs_g, g_ok, co, n_ok, offs_m, m_ok, O, OW,
                  syb, syc, syh, syw, E: tl.constexpr, EB: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_OS: tl.constexpr, ACC: tl.constexpr):
    """``out_scale * acc + routing @ bias`` for ``G`` examples (``acc``: ``[G, BM, BN]``), stored in ``y``'s dtype."""
    gn_ok = g_ok[:, None] & n_ok[None, :]
    if HAS_OS:
        acc = acc * tl.load(os_ptr + offs_g[:, None] * O + co[None, :], mask=gn_ok, other=0.0).to(ACC)[:, None, :]
    if HAS_BIAS:
        offs_e = tl.arange(0, EB)
        bias = tl.load(bias_ptr + offs_e[:, None] * O + co[None, :], mask=(offs_e < E)[:, None] & n_ok[None, :],
                       other=0.0).to(ACC)
        acc += tl.sum(r[:, :, None] * bias[None, :, :], axis=1)[:, None, :]
    pos = (offs_m // OW) * syh + (offs_m % OW) * syw
    ptrs = y_ptr + offs_g.to(tl.int64)[:, None, None] * syb + co[None, None, :] * syc + pos[None, :, None]
    mask = g_ok[:, None, None] & m_ok[None, :, None] & n_ok[None, None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_group_kernel(x_ptr, w_ptr, r_ptr, bias_ptr, sp_ptr, is_ptr, os_ptr, y_ptr,
                      B, C, H, W, O, OH, OW, CG, OG, GROUPS,
                      sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                      SH, SW, PT, PL, DH, DW,
                      E: tl.constexpr, EB: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                      DOT: tl.constexpr, MIX: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                      G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Small-map forward. Grid: (m-blocks * example groups * groups, n-blocks); bank ``(E, KK, CG, O)``."""
    KK: tl.constexpr = KH * KW
    g, offs_g, g_ok, offs_m, m_ok = _group_rows(tl.program_id(0), B, OH * OW, G, BM, GROUPS)
    ih0 = (offs_m // OW) * SH - PT
    iw0 = (offs_m % OW) * SW - PL
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < OG
    co = g * OG + offs_n
    offs_k = tl.arange(0, BK)
    offs_e = tl.arange(0, EB)
    e_ok = offs_e < E
    x_ex = x_ptr + offs_g.to(tl.int64) * sxb + (g * CG).to(tl.int64) * sxc  # [G] example bases
    r = tl.load(r_ptr + offs_g[:, None] * E + offs_e[None, :], mask=g_ok[:, None] & e_ok[None, :],
                other=0.0).to(ACC)
    w_tile = offs_e[:, None, None] * (KK * CG * O) + offs_k[None, :, None] * O + co[None, None, :]
    n_kb = tl.cdiv(CG, BK)
    acc = tl.zeros([G, BM, BN], ACC)
    for t in range(KK * n_kb):
        kpos = t // n_kb
        c0 = (t - kpos * n_kb) * BK
        ck = c0 + offs_k
        k_ok = ck < CG
        w3 = tl.load(w_ptr + (kpos * CG + c0) * O + w_tile,
                     mask=e_ok[:, None, None] & k_ok[None, :, None] & n_ok[None, None, :], other=0.0)
        rs = r
        if HAS_SP:
            rs = r * tl.load(sp_ptr + offs_g * KK + kpos, mask=g_ok, other=0.0).to(ACC)[:, None]
        mixed = _mix_tiles(rs, w3, MIX, PREC, ACC, G, EB, BK, BN)
        if HAS_IS:  # scaling the kernel's input axis == scaling the input's channels
            mixed *= tl.load(is_ptr + offs_g[:, None] * C + g * CG + ck[None, :],
                             mask=g_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)[:, :, None]
        ih = ih0 + (kpos // KW) * DH
        iw = iw0 + (kpos % KW) * DW
        pos_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_ex[:, None, None] + (ih * sxh + iw * sxw)[None, :, None] + ck[None, None, :] * sxc,
                     mask=g_ok[:, None, None] & pos_ok[None, :, None] & k_ok[None, None, :], other=0.0)
        acc = _mm3(xt, mixed.to(xt.dtype), acc, DOT, PREC)
    _fwd_epilogue(acc, y_ptr, r, bias_ptr, os_ptr, offs_g, g_ok, co, n_ok, offs_m, m_ok, O, OW, syb, syc, syh, syw,
                  E, EB, HAS_BIAS, HAS_OS, ACC)


@triton.jit
def _mix_kernel(r_ptr, w_ptr, ws_ptr, B0, B1, N, E: tl.constexpr, EB: tl.constexpr, MIX: tl.constexpr,
                PREC: tl.constexpr, ACC: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr):
    """Mixed kernels of examples ``B0 .. B1`` into the workspace (``(B1 - B0, N)``, its dtype):
    ``ws[b - B0] = sum_e routing[b, e] * bank[e]`` (bank ``(E, N)``). Grid: (example groups, column blocks)."""
    offs_g = B0 + tl.program_id(0) * G + tl.arange(0, G)
    g_ok = offs_g < B1
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n_ok = offs_n < N
    offs_e = tl.arange(0, EB)
    e_ok = offs_e < E
    r = tl.load(r_ptr + offs_g[:, None] * E + offs_e[None, :], mask=g_ok[:, None] & e_ok[None, :],
                other=0.0).to(ACC)
    w = tl.load(w_ptr + offs_e[:, None].to(tl.int64) * N + offs_n[None, :], mask=e_ok[:, None] & n_ok[None, :],
                other=0.0)
    mixed = tl.reshape(_mix_tiles(r, w, MIX, PREC, ACC, G, EB, 1, BLOCK), [G, BLOCK])
    ptrs = ws_ptr + (offs_g - B0).to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(ptrs, mixed.to(ws_ptr.dtype.element_ty), mask=g_ok[:, None] & n_ok[None, :])


@triton.jit
def _fwd_panel_kernel(x_ptr, ws_ptr, r_ptr, bias_ptr, sp_ptr, is_ptr, os_ptr, y_ptr,
                      B0, C, H, W, O, OH, OW, CG, OG, GROUPS,
                      sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                      SH, SW, PT, PL, DH, DW,
                      E: tl.constexpr, EB: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                      DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Large-map forward: implicit GEMM of example ``B0 + i`` against its mixed kernel ``ws[i]`` (layout
    ``(KK, CG, O)``). Grid: (m-blocks * chunk examples * groups, n-blocks)."""
    KK: tl.constexpr = KH * KW
    n_mb = tl.cdiv(OH * OW, BM)
    pid = tl.program_id(0)
    offs_m = (pid % n_mb) * BM + tl.arange(0, BM)
    m_ok = offs_m < OH * OW
    rest = pid // n_mb
    g = rest % GROUPS
    i = rest // GROUPS
    b = B0 + i
    ih0 = (offs_m // OW) * SH - PT
    iw0 = (offs_m % OW) * SW - PL
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < OG
    co = g * OG + offs_n
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + b.to(tl.int64) * sxb + (g * CG).to(tl.int64) * sxc
    ws = ws_ptr + i.to(tl.int64) * (KK * CG * O)
    w_tile = offs_k[:, None] * O + co[None, :]
    n_kb = tl.cdiv(CG, BK)
    acc = tl.zeros([BM, BN], ACC)
    for t in range(KK * n_kb):
        kpos = t // n_kb
        c0 = (t - kpos * n_kb) * BK
        ck = c0 + offs_k
        k_ok = ck < CG
        wk = tl.load(ws + (kpos * CG + c0) * O + w_tile, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_SP or HAS_IS:
            wk = wk.to(ACC)
            if HAS_SP:
                wk *= tl.load(sp_ptr + b * KK + kpos).to(ACC)
            if HAS_IS:
                wk *= tl.load(is_ptr + b * C + g * CG + ck, mask=k_ok, other=0.0).to(ACC)[:, None]
        ih = ih0 + (kpos // KW) * DH
        iw = iw0 + (kpos % KW) * DW
        pos_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_rows + (ih * sxh + iw * sxw)[:, None] + ck[None, :] * sxc,
                     mask=pos_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mm(xt, wk.to(xt.dtype), acc, DOT, PREC)
    offs_e = tl.arange(0, EB)
    r = tl.load(r_ptr + b * E + offs_e, mask=offs_e < E, other=0.0).to(ACC)[None, :]
    offs_g = b + tl.arange(0, 1)
    _fwd_epilogue(acc[None, :, :], y_ptr, r, bias_ptr, os_ptr, offs_g, offs_g >= 0, co, n_ok, offs_m, m_ok, O, OW,
                  syb, syc, syh, syw, E, EB, HAS_BIAS, HAS_OS, ACC)


# ---------------------------------------------------------------------------------------------------- input grad


@triton.jit
def _dgrad_group_kernel(dy_ptr, w_ptr, r_ptr, sp_ptr, is_ptr, os_ptr, gx_ptr, tap_ptr, ntap_ptr,
                        B, C, H, W, O, OH, OW, CG, OG, GROUPS,
                        sdb, sdc, sdh, sdw, sgb, sgc, sgh, sgw,
                        SH, SW,
                        E: tl.constexpr, EB: tl.constexpr, KK: tl.constexpr,
                        HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                        DOT: tl.constexpr, MIX: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Small-map input gradient. Grid: (stride phases * row blocks * example groups * groups, c-blocks); bank
    ``(E, KK, OG, C)``; rows: the input positions of one stride phase, reading the valid taps only."""
    rest, phase, ih, iw, qi, qj, m_ok = _phase_rows(tl.program_id(0), H, W, SH, SW, BM)
    g = rest % GROUPS
    offs_g = (rest // GROUPS) * G + tl.arange(0, G)
    g_ok = offs_g < B
    offs_c = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = offs_c < CG
    ci = g * CG + offs_c
    offs_k = tl.arange(0, BK)
    offs_e = tl.arange(0, EB)
    e_ok = offs_e < E
    dy_ex = dy_ptr + offs_g.to(tl.int64) * sdb + (g * OG).to(tl.int64) * sdc
    r = tl.load(r_ptr + offs_g[:, None] * E + offs_e[None, :], mask=g_ok[:, None] & e_ok[None, :],
                other=0.0).to(ACC)
    w_tile = offs_e[:, None, None] * (KK * OG * C) + offs_k[None, :, None] * C + ci[None, None, :]
    n_ob = tl.cdiv(OG, BK)
    acc = tl.zeros([G, BM, BN], ACC)
    for t in range(tl.load(ntap_ptr + phase) * n_ob):
        tap = tap_ptr + (phase * KK + t // n_ob) * 3
        kpos = tl.load(tap)
        oh = qi + tl.load(tap + 1)
        ow = qj + tl.load(tap + 2)
        o0 = (t % n_ob) * BK
        offs_o = o0 + offs_k
        o_ok = offs_o < OG
        w3 = tl.load(w_ptr + (kpos * OG + o0) * C + w_tile,
                     mask=e_ok[:, None, None] & o_ok[None, :, None] & c_ok[None, None, :], other=0.0)
        rs = r
        if HAS_SP:
            rs = r * tl.load(sp_ptr + offs_g * KK + kpos, mask=g_ok, other=0.0).to(ACC)[:, None]
        mixed = _mix_tiles(rs, w3, MIX, PREC, ACC, G, EB, BK, BN)
        if HAS_OS:  # dy' = dy * out_scale, folded into the kernel's output axis
            mixed *= tl.load(os_ptr + offs_g[:, None] * O + g * OG + offs_o[None, :],
                             mask=g_ok[:, None] & o_ok[None, :], other=0.0).to(ACC)[:, :, None]
        ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        dyt = tl.load(dy_ex[:, None, None] + (oh * sdh + ow * sdw)[None, :, None] + offs_o[None, None, :] * sdc,
                      mask=g_ok[:, None, None] & ok[None, :, None] & o_ok[None, None, :], other=0.0)
        acc = _mm3(dyt, mixed.to(dyt.dtype), acc, DOT, PREC)
    if HAS_IS:
        acc *= tl.load(is_ptr + offs_g[:, None] * C + ci[None, :], mask=g_ok[:, None] & c_ok[None, :],
                       other=0.0).to(ACC)[:, None, :]
    ptrs = (gx_ptr + offs_g.to(tl.int64)[:, None, None] * sgb + ci[None, None, :] * sgc
            + (ih * sgh + iw * sgw)[None, :, None])
    mask = g_ok[:, None, None] & m_ok[None, :, None] & c_ok[None, None, :]
    tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dgrad_panel_kernel(dy_ptr, ws_ptr, sp_ptr, is_ptr, os_ptr, gx_ptr, tap_ptr, ntap_ptr,
                        B0, C, H, W, O, OH, OW, CG, OG, GROUPS,
                        sdb, sdc, sdh, sdw, sgb, sgc, sgh, sgw,
                        SH, SW,
                        KK: tl.constexpr, HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                        DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Large-map input gradient of example ``B0 + i`` with its mixed transposed kernel ``ws[i]`` (``(KK, OG, C)``).
    Grid: (stride phases * row blocks * chunk examples * groups, c-blocks)."""
    rest, phase, ih, iw, qi, qj, m_ok = _phase_rows(tl.program_id(0), H, W, SH, SW, BM)
    g = rest % GROUPS
    i = rest // GROUPS
    b = B0 + i
    offs_c = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = offs_c < CG
    ci = g * CG + offs_c
    offs_k = tl.arange(0, BK)
    dy_rows = dy_ptr + b.to(tl.int64) * sdb + (g * OG).to(tl.int64) * sdc
    ws = ws_ptr + i.to(tl.int64) * (KK * OG * C)
    w_tile = offs_k[:, None] * C + ci[None, :]
    n_ob = tl.cdiv(OG, BK)
    acc = tl.zeros([BM, BN], ACC)
    for t in range(tl.load(ntap_ptr + phase) * n_ob):
        tap = tap_ptr + (phase * KK + t // n_ob) * 3
        kpos = tl.load(tap)
        oh = qi + tl.load(tap + 1)
        ow = qj + tl.load(tap + 2)
        o0 = (t % n_ob) * BK
        offs_o = o0 + offs_k
        o_ok = offs_o < OG
        wk = tl.load(ws + (kpos * OG + o0) * C + w_tile, mask=o_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_SP or HAS_OS:
            wk = wk.to(ACC)
            if HAS_SP:
                wk *= tl.load(sp_ptr + b * KK + kpos).to(ACC)
            if HAS_OS:
                wk *= tl.load(os_ptr + b * O + g * OG + offs_o, mask=o_ok, other=0.0).to(ACC)[:, None]
        ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        dyt = tl.load(dy_rows + (oh * sdh + ow * sdw)[:, None] + offs_o[None, :] * sdc,
                      mask=ok[:, None] & o_ok[None, :], other=0.0)
        acc = _mm(dyt, wk.to(dyt.dtype), acc, DOT, PREC)
    if HAS_IS:
        acc *= tl.load(is_ptr + b * C + ci, mask=c_ok, other=0.0).to(ACC)[None, :]
    ptrs = gx_ptr + b.to(tl.int64) * sgb + ci[None, :] * sgc + (ih * sgh + iw * sgw)[:, None]
    tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])
