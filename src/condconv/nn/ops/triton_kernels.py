"""Triton kernels of the fused dynamic convolution (see :mod:`condconv.nn.ops.triton_conv` for the operation).

Every kernel works on one example at a time (each example has its own mixed kernel) and recomputes tiles of that
kernel, ``K_b = sum_e routing[b, e] * W_e (* spatial[b])``, from the expert bank where it needs them: per-example
kernels are never written to global memory, neither are im2col columns.

The expert bank is read in the layout ``(E, kh, kw, C_in / groups, C_out)`` (permuted once per call by the
launcher), so a tile of one kernel position is contiguous along the output channels.

- ``_fwd_dense_kernel``: implicit GEMM. Rows: output positions of one example; columns: output channels of one
  group; reduction: (kernel position, input channel). The expert tiles of each reduction step are mixed in fp32,
  times the spatial attention and the input-channel scale (scaling the kernel's input axis is scaling the input,
  and costs ``BK * BN`` instead of ``BM * BK`` multiplies), rounded to the input's dtype and fed to ``tl.dot`` with
  the input tile gathered on the fly (zero padding by masks). Epilogue: output scale, mixed bias, store.
- ``_fwd_depthwise_kernel``: direct convolution, vectorised over output positions and output channels.
- ``_dgrad_dense_kernel`` / ``_dgrad_depthwise_kernel``: gradient of the input, a transposed convolution with the
  re-mixed kernel. Input positions are split by stride phase so that each (phase, kernel position) pair is either
  wholly valid or skipped: no work is wasted on the zeros of a strided transposed convolution.
- ``_wgrad_dense_kernel`` / ``_wgrad_depthwise_kernel``: one tile of the per-example kernel gradient ``G_b`` (a
  product over that example's output positions) is reduced on the spot into the gradients of the experts, the
  routing, the spatial attention and both channel attentions; a program loops over a chunk of the batch and keeps
  the experts' gradient tile in registers, so only one atomic add per program and expert tile reaches memory.

Every ``@triton.jit`` function also runs under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------- helpers


@triton.jit
def _mm(a, b, acc, DOT: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ b``. ``DOT``: ``'dot'`` (``tl.dot``), ``'fp64'`` (a broadcast product: ``tl.dot``'s float64
    support varies by target) or ``'fp32'`` (``tl.dot`` of the operands upcast: the interpreter's 16-bit dot is
    wrong, while products of 16-bit floats are exact in float32, as on the GPU)."""
    if DOT == "fp64":
        acc += tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    elif DOT == "fp32":
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _mix(w_ptr, r_row, off, mask, E_STRIDE, E: tl.constexpr, ACC: tl.constexpr):
    """``sum_e r_row[e] * w_ptr[e * E_STRIDE + off]`` in ``ACC``: a tile of one example's kernel (or bias)."""
    mixed = tl.load(r_row).to(ACC) * tl.load(w_ptr + off, mask=mask, other=0.0).to(ACC)
    if E <= 8:  # unrolled: the loads of all experts are in flight together
        for e in tl.static_range(1, E):
            mixed += tl.load(r_row + e).to(ACC) * tl.load(w_ptr + e * E_STRIDE + off, mask=mask, other=0.0).to(ACC)
    else:  # more experts would spill registers when unrolled
        for e in range(1, E):
            mixed += tl.load(r_row + e).to(ACC) * tl.load(w_ptr + e * E_STRIDE + off, mask=mask, other=0.0).to(ACC)
    return mixed


@triton.jit
def _store_output(acc, y_ptr, r_row, bias_ptr, os_ptr, b, co, n_ok, offs_m, m_ok, O, OW, syb, syc, syh, syw,
                  E: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OS: tl.constexpr, ACC: tl.constexpr):
    """Forward epilogue: ``out_scale * acc + sum_e routing[b, e] * bias[e]``, stored in ``y``'s dtype."""
    if HAS_OS:
        acc = acc * tl.load(os_ptr + b * O + co, mask=n_ok, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        acc += _mix(bias_ptr, r_row, co, n_ok, O, E, ACC)[None, :]
    ptrs = y_ptr + b.to(tl.int64) * syb + co[None, :] * syc + ((offs_m // OW) * syh + (offs_m % OW) * syw)[:, None]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_dense_kernel(x_ptr, w_ptr, r_ptr, bias_ptr, sp_ptr, is_ptr, os_ptr, y_ptr,
                      C, H, W, O, OH, OW, CG, OG, GROUPS,
                      sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                      SH, SW, PT, PL, DH, DW,
                      E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                      DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Dense or grouped forward. Grid: (m-blocks * B * groups, n-blocks).

    Reduction steps run over (kernel position, input-channel block) pairs in one flat loop (one pipelined loop on
    the GPU, however few channels a group has).
    """
    KK: tl.constexpr = KH * KW
    n_mb = tl.cdiv(OH * OW, BM)
    pid = tl.program_id(0)
    pid_m = pid % n_mb
    bg = pid // n_mb
    b = bg // GROUPS
    g = bg % GROUPS
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < OH * OW
    ih0 = (offs_m // OW) * SH - PT  # input row/column of kernel position (0, 0)
    iw0 = (offs_m % OW) * SW - PL
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < OG
    co = g * OG + offs_n
    offs_k = tl.arange(0, BK)
    x_rows = x_ptr + b.to(tl.int64) * sxb + (g * CG).to(tl.int64) * sxc
    r_row = r_ptr + b * E
    sp_row = sp_ptr + b * KK
    is_row = is_ptr + b * C + g * CG
    w_tile = offs_k[:, None] * O + co[None, :]  # (input channel, output channel) offsets in the expert bank
    n_kb = tl.cdiv(CG, BK)
    acc = tl.zeros([BM, BN], ACC)
    for t in range(KK * n_kb):
        kpos = t // n_kb
        c0 = (t - kpos * n_kb) * BK
        ck = c0 + offs_k
        k_ok = ck < CG
        ih = ih0 + (kpos // KW) * DH
        iw = iw0 + (kpos % KW) * DW
        pos_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = tl.load(x_rows + (ih * sxh + iw * sxw)[:, None] + ck[None, :] * sxc,
                     mask=pos_ok[:, None] & k_ok[None, :], other=0.0)
        wk = _mix(w_ptr + (kpos * CG + c0) * O, r_row, w_tile, k_ok[:, None] & n_ok[None, :], KK * CG * O, E, ACC)
        if HAS_SP:
            wk *= tl.load(sp_row + kpos).to(ACC)
        if HAS_IS:  # scaling the kernel's input axis == scaling the input's channels
            wk *= tl.load(is_row + ck, mask=k_ok, other=0.0).to(ACC)[:, None]
        acc = _mm(xt, wk.to(xt.dtype), acc, DOT, PREC)
    _store_output(acc, y_ptr, r_row, bias_ptr, os_ptr, b, co, n_ok, offs_m, m_ok, O, OW, syb, syc, syh, syw,
                  E, HAS_BIAS, HAS_OS, ACC)


@triton.jit
def _fwd_depthwise_kernel(x_ptr, w_ptr, r_ptr, bias_ptr, sp_ptr, is_ptr, os_ptr, y_ptr,
                          C, H, W, O, OH, OW, MULT,
                          sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                          SH, SW, PT, PL, DH, DW,
                          E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                          ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Depthwise forward (``groups == C_in``, ``C_out = MULT * C_in``). Grid: (m-blocks * B, channel blocks)."""
    KK: tl.constexpr = KH * KW
    n_mb = tl.cdiv(OH * OW, BM)
    pid = tl.program_id(0)
    pid_m = pid % n_mb
    b = pid // n_mb
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < OH * OW
    ih0 = (offs_m // OW) * SH - PT
    iw0 = (offs_m % OW) * SW - PL
    co = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = co < O
    ci = co // MULT
    x_cols = x_ptr + b.to(tl.int64) * sxb + ci[None, :] * sxc
    r_row = r_ptr + b * E
    sp_row = sp_ptr + b * KK
    if HAS_IS:
        isv = tl.load(is_ptr + b * C + ci, mask=n_ok, other=0.0).to(ACC)
    acc = tl.zeros([BM, BN], ACC)
    for kpos in range(KK):
        ih = ih0 + (kpos // KW) * DH
        iw = iw0 + (kpos % KW) * DW
        pos_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        kv = _mix(w_ptr + kpos * O, r_row, co, n_ok, KK * O, E, ACC)
        if HAS_SP:
            kv *= tl.load(sp_row + kpos).to(ACC)
        if HAS_IS:
            kv *= isv
        xt = tl.load(x_cols + (ih * sxh + iw * sxw)[:, None], mask=pos_ok[:, None] & n_ok[None, :], other=0.0)
        acc += xt.to(ACC) * kv[None, :]
    _store_output(acc, y_ptr, r_row, bias_ptr, os_ptr, b, co, n_ok, offs_m, m_ok, O, OW, syb, syc, syh, syw,
                  E, HAS_BIAS, HAS_OS, ACC)


# ---------------------------------------------------------------------------------------------------- input grad


@triton.jit
def _phase_rows(pid, H, W, SH, SW, BM: tl.constexpr):
    """The input rows of program ``pid`` of an input-gradient grid ``(row blocks * rest * stride phases)``: ``(rest,
    ph, pw, ih, iw, qi, qj, ok)``: the index left for the caller (example, group), the stride phase ``(ph, pw)``, its
    input positions ``(ih, iw)`` handled by this row block, their coordinates ``(qi, qj)`` within the phase
    (``ih = ph + qi * SH``) and validity."""
    n_mb = tl.cdiv(tl.cdiv(H, SH) * tl.cdiv(W, SW), BM)
    pid_m = pid % n_mb
    rest = pid // n_mb
    phase = rest % (SH * SW)
    ph = phase // SW
    pw = phase % SW
    qw = (W - pw + SW - 1) // SW
    qh = (H - ph + SH - 1) // SH
    q = pid_m * BM + tl.arange(0, BM)
    qw_ = tl.maximum(qw, 1)  # a phase may be empty (qw == 0): its rows all fail the validity test
    qi = q // qw_
    qj = q % qw_
    return rest // (SH * SW), ph, pw, ph + qi * SH, pw + qj * SW, qi, qj, q < qh * qw


@triton.jit
def _dgrad_dense_step(acc, dy_rows, w_ptr, w_tile, r_row, sp_row, os_row, kpos, o0, oh, ow, m_ok, c_ok, offs_k,
                      O, OH, OW, CG, OG, sdc, sdh, sdw,
                      E: tl.constexpr, KK: tl.constexpr, HAS_SP: tl.constexpr, HAS_OS: tl.constexpr,
                      DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """``acc += dy'[rows, o0:o0+BK] @ K_b[o0:o0+BK, channels, kpos]``, rows reading output ``(oh, ow)``."""
    ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
    offs_o = o0 + offs_k
    o_ok = offs_o < OG
    dyt = tl.load(dy_rows + (oh * sdh + ow * sdw)[:, None] + offs_o[None, :] * sdc,
                  mask=ok[:, None] & o_ok[None, :], other=0.0)
    wk = _mix(w_ptr + kpos * CG * O + o0, r_row, w_tile, o_ok[:, None] & c_ok[None, :], KK * CG * O, E, ACC)
    if HAS_SP:
        wk *= tl.load(sp_row + kpos).to(ACC)
    if HAS_OS:  # dy' = dy * out_scale, folded into the kernel's output axis
        wk *= tl.load(os_row + offs_o, mask=o_ok, other=0.0).to(ACC)[:, None]
    return _mm(dyt, wk.to(dyt.dtype), acc, DOT, PREC)


@triton.jit
def _dgrad_dense_kernel(dy_ptr, w_ptr, r_ptr, sp_ptr, is_ptr, os_ptr, gx_ptr,
                        C, H, W, O, OH, OW, CG, OG, GROUPS,
                        sdb, sdc, sdh, sdw, sgb, sgc, sgh, sgw,
                        SH, SW, PT, PL, DH, DW,
                        E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                        HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr, STRIDED: tl.constexpr,
                        DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Input gradient of a dense or grouped layer. Grid: (row blocks * B * groups * stride phases, channel blocks).

    Rows are the input positions of one stride phase ``(ih % SH, iw % SW)``: for each kernel position, either all
    of them receive from the output grid or none do, and the ones that do not are skipped.
    """
    KK: tl.constexpr = KH * KW
    bg, ph, pw, ih, iw, qi, qj, m_ok = _phase_rows(tl.program_id(0), H, W, SH, SW, BM)
    b = bg // GROUPS
    g = bg % GROUPS
    offs_c = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = offs_c < CG
    offs_k = tl.arange(0, BK)
    dy_rows = dy_ptr + b.to(tl.int64) * sdb + (g * OG).to(tl.int64) * sdc
    w_tile = offs_c[None, :] * O + g * OG + offs_k[:, None]  # (output channel, input channel) bank offsets
    r_row = r_ptr + b * E
    sp_row = sp_ptr + b * KK
    os_row = os_ptr + b * O + g * OG
    # output row of kernel position kh: oh = (ih + PT - kh * DH) / SH; offset by a multiple of the stride so that
    # % and // only ever see non-negative numbers
    th0 = ph + PT + SH * KH * DH
    tw0 = pw + PL + SW * KW * DW
    oh0 = qi - KH * DH
    ow0 = qj - KW * DW
    n_ob = tl.cdiv(OG, BK)
    acc = tl.zeros([BM, BN], ACC)
    for t in range(KK * n_ob):
        kpos = t // n_ob
        o0 = (t - kpos * n_ob) * BK
        th = th0 - (kpos // KW) * DH
        tw = tw0 - (kpos % KW) * DW
        if STRIDED:
            if (th % SH == 0) & (tw % SW == 0):
                acc = _dgrad_dense_step(acc, dy_rows, w_ptr, w_tile, r_row, sp_row, os_row, kpos, o0,
                                        oh0 + th // SH, ow0 + tw // SW, m_ok, c_ok, offs_k, O, OH, OW, CG, OG,
                                        sdc, sdh, sdw, E, KK, HAS_SP, HAS_OS, DOT, ACC, PREC)
        else:
            acc = _dgrad_dense_step(acc, dy_rows, w_ptr, w_tile, r_row, sp_row, os_row, kpos, o0, oh0 + th, ow0 + tw,
                                    m_ok, c_ok, offs_k, O, OH, OW, CG, OG, sdc, sdh, sdw, E, KK, HAS_SP, HAS_OS,
                                    DOT, ACC, PREC)
    ci = g * CG + offs_c
    if HAS_IS:
        acc *= tl.load(is_ptr + b * C + ci, mask=c_ok, other=0.0).to(ACC)[None, :]
    ptrs = gx_ptr + b.to(tl.int64) * sgb + ci[None, :] * sgc + (ih * sgh + iw * sgw)[:, None]
    tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _dgrad_depthwise_step(acc, dy_ptr, w_ptr, r_row, sp_row, os_row, kpos, j, oh, ow, m_ok, ci, c_ok,
                          O, OH, OW, MULT, sdc, sdh, sdw,
                          E: tl.constexpr, KK: tl.constexpr, HAS_SP: tl.constexpr, HAS_OS: tl.constexpr,
                          ACC: tl.constexpr):
    """``acc += dy'[rows, c * MULT + j] * K_b[c * MULT + j, kpos]`` for one kernel position and multiplier slot."""
    ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
    co = ci * MULT + j
    kv = _mix(w_ptr + kpos * O, r_row, co, c_ok, KK * O, E, ACC)
    if HAS_SP:
        kv *= tl.load(sp_row + kpos).to(ACC)
    if HAS_OS:
        kv *= tl.load(os_row + co, mask=c_ok, other=0.0).to(ACC)
    dyt = tl.load(dy_ptr + (oh * sdh + ow * sdw)[:, None] + co[None, :] * sdc, mask=ok[:, None] & c_ok[None, :],
                  other=0.0)
    return acc + dyt.to(ACC) * kv[None, :]


@triton.jit
def _dgrad_depthwise_kernel(dy_ptr, w_ptr, r_ptr, sp_ptr, is_ptr, os_ptr, gx_ptr,
                            C, H, W, O, OH, OW, MULT,
                            sdb, sdc, sdh, sdw, sgb, sgc, sgh, sgw,
                            SH, SW, PT, PL, DH, DW,
                            E: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                            HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                            STRIDED: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Input gradient of a depthwise layer. Grid: (row blocks * B * stride phases, channel blocks)."""
    KK: tl.constexpr = KH * KW
    b, ph, pw, ih, iw, qi, qj, m_ok = _phase_rows(tl.program_id(0), H, W, SH, SW, BM)
    ci = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = ci < C
    dy_b = dy_ptr + b.to(tl.int64) * sdb
    r_row = r_ptr + b * E
    sp_row = sp_ptr + b * KK
    os_row = os_ptr + b * O
    th0 = ph + PT + SH * KH * DH
    tw0 = pw + PL + SW * KW * DW
    oh0 = qi - KH * DH
    ow0 = qj - KW * DW
    acc = tl.zeros([BM, BN], ACC)
    for t in range(KK * MULT):
        kpos = t // MULT
        j = t - kpos * MULT
        th = th0 - (kpos // KW) * DH
        tw = tw0 - (kpos % KW) * DW
        if STRIDED:
            if (th % SH == 0) & (tw % SW == 0):
                acc = _dgrad_depthwise_step(acc, dy_b, w_ptr, r_row, sp_row, os_row, kpos, j, oh0 + th // SH,
                                            ow0 + tw // SW, m_ok, ci, c_ok, O, OH, OW, MULT, sdc, sdh, sdw,
                                            E, KK, HAS_SP, HAS_OS, ACC)
        else:
            acc = _dgrad_depthwise_step(acc, dy_b, w_ptr, r_row, sp_row, os_row, kpos, j, oh0 + th, ow0 + tw,
                                        m_ok, ci, c_ok, O, OH, OW, MULT, sdc, sdh, sdw, E, KK, HAS_SP, HAS_OS, ACC)
    if HAS_IS:
        acc *= tl.load(is_ptr + b * C + ci, mask=c_ok, other=0.0).to(ACC)[None, :]
    ptrs = gx_ptr + b.to(tl.int64) * sgb + ci[None, :] * sgc + (ih * sgh + iw * sgw)[:, None]
    tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


# ---------------------------------------------------------------------------------------------------- kernel grads


@triton.jit
def _tap_rows(p0, OH, OW, H, W, SH, SW, dh0, dw0, BP: tl.constexpr):
    """Output positions ``p0 .. p0 + BP`` of one kernel position (input offset ``dh0, dw0``): ``(p_ok, oh, ow, ih,
    iw, x_ok)``, ``x_ok`` where the input row/column falls inside the image."""
    p = p0 + tl.arange(0, BP)
    p_ok = p < OH * OW
    oh = p // OW
    ow = p % OW
    ih = oh * SH + dh0
    iw = ow * SW + dw0
    x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return p_ok, oh, ow, ih, iw, x_ok


@triton.jit
def _attention_factors(graw, isv, osv, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr):
    """From the raw gradient of one example's kernel (``dy`` times ``x``) and its channel attentions (already shaped
    to broadcast; ignored unless ``HAS_*``): the gradient of the kernel without the output-channel factor, without
    the input-channel factor, and with both (the gradient of ``K_b``)."""
    g_no_os = graw
    g_no_is = graw
    if HAS_IS:
        g_no_os = graw * isv
    gk = g_no_os
    if HAS_OS:
        g_no_is = graw * osv
        gk = g_no_os * osv
    return g_no_os, g_no_is, gk


@triton.jit
def _wgrad_dense_kernel(x_ptr, dy_ptr, w_ptr, r_ptr, sp_ptr, is_ptr, os_ptr,
                        gw_ptr, gr_ptr, gsp_ptr, gis_ptr, gos_ptr,
                        B, C, H, W, O, OH, OW, CG, OG, GROUPS, BCHUNK,
                        sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                        SH, SW, PT, PL, DH, DW,
                        E: tl.constexpr, EB: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                        HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                        NEED_W: tl.constexpr, NEED_R: tl.constexpr, NEED_SP: tl.constexpr, NEED_IS: tl.constexpr,
                        NEED_OS: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        BO: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr):
    """Kernel-side gradients of a dense or grouped layer.

    Grid: (o-blocks * c-blocks * groups * batch chunks, kernel positions). A program owns one tile
    ``(o, c)`` of one kernel position and group; for each example of its chunk it computes
    ``Graw[o, c] = sum_p dy[b, o, p] * x[b, c, p + kpos]`` (one ``tl.dot`` chain over the example's positions) and
    reduces it at once. With ``G = out_scale[o] * in_scale[c] * Graw`` (the gradient of ``K_b``) and
    ``K_b = s * M``, ``M = sum_e r[b, e] W_e``:
    ``grad_W[e] += r[b, e] * s * G``, ``grad_routing[b, e] += s * <G, W_e>``, ``grad_spatial[b, kpos] += <G, M>``,
    ``grad_out_scale[b, o] += sum_c (G / out_scale)[o, c] K_b[o, c]``, ``grad_in_scale[b, c] += sum_o (G / in_scale)
    [o, c] K_b[o, c]`` (the divisions are never performed: those factors are simply not applied).
    """
    KK: tl.constexpr = KH * KW
    kpos = tl.program_id(1)
    dh0 = (kpos // KW) * DH - PT  # input offset of this kernel position
    dw0 = (kpos % KW) * DW - PL
    n_ob = tl.cdiv(OG, BO)
    n_cb = tl.cdiv(CG, BC)
    pid = tl.program_id(0)
    pid_o = pid % n_ob
    rest = pid // n_ob
    pid_c = rest % n_cb
    rest = rest // n_cb
    g = rest % GROUPS
    b0 = (rest // GROUPS) * BCHUNK
    b1 = tl.minimum(b0 + BCHUNK, B)
    offs_o = pid_o * BO + tl.arange(0, BO)
    o_ok = offs_o < OG
    co = g * OG + offs_o
    offs_c = pid_c * BC + tl.arange(0, BC)
    c_ok = offs_c < CG
    ci = g * CG + offs_c
    offs_e = tl.arange(0, EB)
    e_ok = offs_e < E
    w_off = offs_e[:, None, None] * (KK * CG * O) + kpos * CG * O + offs_c[None, None, :] * O + co[None, :, None]
    w_mask = e_ok[:, None, None] & o_ok[None, :, None] & c_ok[None, None, :]
    w3 = tl.load(w_ptr + w_off, mask=w_mask, other=0.0).to(ACC)
    acc_w = tl.zeros([EB, BO, BC], ACC)
    for i in range(b1 - b0):  # (b0 + i, not a range over b: b must be a tensor in the interpreter too)
        b = b0 + i
        graw = tl.zeros([BO, BC], ACC)
        for p0 in range(0, OH * OW, BP):
            p_ok, oh, ow, ih, iw, x_ok = _tap_rows(p0, OH, OW, H, W, SH, SW, dh0, dw0, BP)
            dyt = tl.load(dy_ptr + b.to(tl.int64) * sdb + co[:, None] * sdc + (oh * sdh + ow * sdw)[None, :],
                          mask=o_ok[:, None] & p_ok[None, :], other=0.0)
            xt = tl.load(x_ptr + b.to(tl.int64) * sxb + ci[None, :] * sxc + (ih * sxh + iw * sxw)[:, None],
                         mask=x_ok[:, None] & c_ok[None, :], other=0.0)
            graw = _mm(dyt, xt.to(dyt.dtype), graw, DOT, PREC)
        rv = tl.load(r_ptr + b * E + offs_e, mask=e_ok, other=0.0).to(ACC)
        s = 1.0
        if HAS_SP:
            s = tl.load(sp_ptr + b * KK + kpos).to(ACC)
        isv = 1.0
        osv = 1.0
        if HAS_IS:
            isv = tl.load(is_ptr + b * C + ci, mask=c_ok, other=0.0).to(ACC)[None, :]
        if HAS_OS:
            osv = tl.load(os_ptr + b * O + co, mask=o_ok, other=0.0).to(ACC)[:, None]
        g_no_os, g_no_is, gk = _attention_factors(graw, isv, osv, HAS_IS, HAS_OS)
        if NEED_W:
            acc_w += (rv * s)[:, None, None] * gk[None, :, :]
        if NEED_R or NEED_SP:
            ge = tl.sum(tl.sum(w3 * gk[None, :, :], axis=2), axis=1)
            if NEED_R:
                tl.atomic_add(gr_ptr + b * E + offs_e, ge * s, mask=e_ok)
            if NEED_SP:
                tl.atomic_add(gsp_ptr + b * KK + kpos, tl.sum(ge * rv, axis=0))
        if NEED_OS or NEED_IS:
            kb = tl.sum(w3 * rv[:, None, None], axis=0) * s
            if NEED_OS:
                tl.atomic_add(gos_ptr + b * O + co, tl.sum(g_no_os * kb, axis=1), mask=o_ok)
            if NEED_IS:
                tl.atomic_add(gis_ptr + b * C + ci, tl.sum(g_no_is * kb, axis=0), mask=c_ok)
    if NEED_W:
        tl.atomic_add(gw_ptr + w_off, acc_w, mask=w_mask)


@triton.jit
def _wgrad_depthwise_kernel(x_ptr, dy_ptr, w_ptr, r_ptr, sp_ptr, is_ptr, os_ptr,
                            gw_ptr, gr_ptr, gsp_ptr, gis_ptr, gos_ptr,
                            B, C, H, W, O, OH, OW, MULT, BCHUNK,
                            sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                            SH, SW, PT, PL, DH, DW,
                            E: tl.constexpr, EB: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                            HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                            NEED_W: tl.constexpr, NEED_R: tl.constexpr, NEED_SP: tl.constexpr,
                            NEED_IS: tl.constexpr, NEED_OS: tl.constexpr, ACC: tl.constexpr,
                            BO: tl.constexpr, BP: tl.constexpr):
    """Kernel-side gradients of a depthwise layer: as ``_wgrad_dense_kernel`` with one input channel per output
    channel (``c = o // MULT``), the per-example products reduced elementwise. Grid: (o-blocks * batch chunks, KK).
    """
    KK: tl.constexpr = KH * KW
    kpos = tl.program_id(1)
    dh0 = (kpos // KW) * DH - PT  # input offset of this kernel position
    dw0 = (kpos % KW) * DW - PL
    n_ob = tl.cdiv(O, BO)
    pid = tl.program_id(0)
    co = (pid % n_ob) * BO + tl.arange(0, BO)
    b0 = (pid // n_ob) * BCHUNK
    b1 = tl.minimum(b0 + BCHUNK, B)
    o_ok = co < O
    ci = co // MULT
    offs_e = tl.arange(0, EB)
    e_ok = offs_e < E
    w_off = offs_e[:, None] * (KK * O) + kpos * O + co[None, :]
    w_mask = e_ok[:, None] & o_ok[None, :]
    w2 = tl.load(w_ptr + w_off, mask=w_mask, other=0.0).to(ACC)
    acc_w = tl.zeros([EB, BO], ACC)
    for i in range(b1 - b0):  # (b0 + i, not a range over b: b must be a tensor in the interpreter too)
        b = b0 + i
        prod = tl.zeros([BP, BO], ACC)
        for p0 in range(0, OH * OW, BP):
            p_ok, oh, ow, ih, iw, x_ok = _tap_rows(p0, OH, OW, H, W, SH, SW, dh0, dw0, BP)
            dyt = tl.load(dy_ptr + b.to(tl.int64) * sdb + co[None, :] * sdc + (oh * sdh + ow * sdw)[:, None],
                          mask=p_ok[:, None] & o_ok[None, :], other=0.0)
            xt = tl.load(x_ptr + b.to(tl.int64) * sxb + ci[None, :] * sxc + (ih * sxh + iw * sxw)[:, None],
                         mask=x_ok[:, None] & o_ok[None, :], other=0.0)
            prod += dyt.to(ACC) * xt.to(ACC)
        graw = tl.sum(prod, axis=0)
        rv = tl.load(r_ptr + b * E + offs_e, mask=e_ok, other=0.0).to(ACC)
        s = 1.0
        if HAS_SP:
            s = tl.load(sp_ptr + b * KK + kpos).to(ACC)
        isv = 1.0
        osv = 1.0
        if HAS_IS:
            isv = tl.load(is_ptr + b * C + ci, mask=o_ok, other=0.0).to(ACC)
        if HAS_OS:
            osv = tl.load(os_ptr + b * O + co, mask=o_ok, other=0.0).to(ACC)
        g_no_os, g_no_is, gk = _attention_factors(graw, isv, osv, HAS_IS, HAS_OS)
        if NEED_W:
            acc_w += (rv * s)[:, None] * gk[None, :]
        if NEED_R or NEED_SP:
            ge = tl.sum(w2 * gk[None, :], axis=1)
            if NEED_R:
                tl.atomic_add(gr_ptr + b * E + offs_e, ge * s, mask=e_ok)
            if NEED_SP:
                tl.atomic_add(gsp_ptr + b * KK + kpos, tl.sum(ge * rv, axis=0))
        if NEED_OS or NEED_IS:
            kb = tl.sum(w2 * rv[:, None], axis=0) * s
            if NEED_OS:
                tl.atomic_add(gos_ptr + b * O + co, g_no_os * kb, mask=o_ok)
            if NEED_IS:  # several output channels (the multiplier) share one input channel: atomics add them up
                tl.atomic_add(gis_ptr + b * C + ci, g_no_is * kb, mask=o_ok)
    if NEED_W:
        tl.atomic_add(gw_ptr + w_off, acc_w, mask=w_mask)
