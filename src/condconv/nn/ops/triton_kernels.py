"""Triton kernels of the fused dynamic convolution: shared helpers and the depthwise kernels.

(see :mod:`condconv.nn.ops.triton_conv` for the operation; the dense and grouped kernels are in
:mod:`condconv.nn.ops.triton_gemm` (forward, input gradient) and :mod:`condconv.nn.ops.triton_wgrad` (kernel
gradients).)

Each example has its own mixed kernel ``K_b = sum_e routing[b, e] * W_e (* spatial[b])``; no kernel computes more
of it than the tile it needs next, except the large-map regime's chunk workspace (see ``triton_gemm``).

Depthwise layers (``groups == C_in``, ``C_out = MULT * C_in``) have no reduction over channels: their kernels are
direct convolutions vectorised over (positions, channels), the experts of one kernel position mixed with one 2-D
load ``[E, BN]`` (no loop over the experts, however many).

- ``_fwd_depthwise_kernel``: forward, epilogue ``out_scale * acc + routing @ bias``.
- ``_dgrad_depthwise_kernel``: input gradient per stride phase, over the phase's valid taps only (a table made by
  the launcher: no branch in the loop).
- ``_wgrad_depthwise_kernel``: the experts', routing's, spatial and channel attentions' gradients. A program owns
  one channel block, one kernel position and a chunk of the batch; it writes its partial sums to its own slots
  (no atomics), which the launcher adds in a fixed order: the backward is deterministic.

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
def _mix_vec(w_ptr, r, off, mask, E_STRIDE, E: tl.constexpr, EB: tl.constexpr, ACC: tl.constexpr):
    """``sum_e r[e] * w_ptr[e * E_STRIDE + off]`` (``r``: ``[EB]``, zero beyond ``E``): one 2-D load, no loop."""
    offs_e = tl.arange(0, EB)
    w = tl.load(w_ptr + offs_e[:, None] * E_STRIDE + off[None, :], mask=(offs_e < E)[:, None] & mask[None, :],
                other=0.0).to(ACC)
    return tl.sum(r[:, None] * w, axis=0)


@triton.jit
def _routing_row(r_ptr, b, E: tl.constexpr, EB: tl.constexpr, ACC: tl.constexpr):
    offs_e = tl.arange(0, EB)
    return tl.load(r_ptr + b * E + offs_e, mask=offs_e < E, other=0.0).to(ACC)


@triton.jit
def _store_output(acc, y_ptr, r, bias_ptr, os_ptr, b, co, n_ok, offs_m, m_ok, O, OW, syb, syc, syh, syw,
                  E: tl.constexpr, EB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OS: tl.constexpr,
                  ACC: tl.constexpr):
    """Forward epilogue of one example: ``out_scale * acc + sum_e routing[b, e] * bias[e]``, in ``y``'s dtype."""
    if HAS_OS:
        acc = acc * tl.load(os_ptr + b * O + co, mask=n_ok, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        acc += _mix_vec(bias_ptr, r, co, n_ok, O, E, EB, ACC)[None, :]
    ptrs = y_ptr + b.to(tl.int64) * syb + co[None, :] * syc + ((offs_m // OW) * syh + (offs_m % OW) * syw)[:, None]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _phase_rows(pid, H, W, SH, SW, BM: tl.constexpr):
    """Program id ``(stride phase, row block, rest)`` of an input-gradient grid: ``(rest, phase, ih, iw, qi, qj,
    ok)``, the phase's input positions ``ih = ph + qi * SH`` (``iw`` likewise) handled by this row block and their
    validity (a phase may be empty when the stride exceeds the input)."""
    phases = SH * SW
    phase = pid % phases
    pid = pid // phases
    ph = phase // SW
    pw = phase % SW
    qh = (H - ph + SH - 1) // SH
    qw = (W - pw + SW - 1) // SW
    n_mb = tl.cdiv(tl.cdiv(H, SH) * tl.cdiv(W, SW), BM)
    q = (pid % n_mb) * BM + tl.arange(0, BM)
    qw_ = tl.maximum(qw, 1)
    qi = q // qw_
    qj = q % qw_
    return pid // n_mb, phase, ph + qi * SH, pw + qj * SW, qi, qj, q < qh * qw


# ---------------------------------------------------------------------------------------------------- depthwise


@triton.jit
def _fwd_depthwise_kernel(x_ptr, w_ptr, r_ptr, bias_ptr, sp_ptr, is_ptr, os_ptr, y_ptr,
                          C, H, W, O, OH, OW, MULT,
                          sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                          SH, SW, PT, PL, DH, DW,
                          E: tl.constexpr, EB: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                          ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Depthwise forward; bank ``(E, KK, O)``. Grid: (m-blocks * B, channel blocks)."""
    KK: tl.constexpr = KH * KW
    n_mb = tl.cdiv(OH * OW, BM)
    pid = tl.program_id(0)
    b = pid // n_mb
    offs_m = (pid % n_mb) * BM + tl.arange(0, BM)
    m_ok = offs_m < OH * OW
    ih0 = (offs_m // OW) * SH - PT
    iw0 = (offs_m % OW) * SW - PL
    co = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = co < O
    ci = co // MULT
    x_cols = x_ptr + b.to(tl.int64) * sxb + ci[None, :] * sxc
    r = _routing_row(r_ptr, b, E, EB, ACC)
    if HAS_IS:
        isv = tl.load(is_ptr + b * C + ci, mask=n_ok, other=0.0).to(ACC)
    acc = tl.zeros([BM, BN], ACC)
    for kpos in range(KK):
        ih = ih0 + (kpos // KW) * DH
        iw = iw0 + (kpos % KW) * DW
        pos_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        kv = _mix_vec(w_ptr + kpos * O, r, co, n_ok, KK * O, E, EB, ACC)
        if HAS_SP:
            kv *= tl.load(sp_ptr + b * KK + kpos).to(ACC)
        if HAS_IS:
            kv *= isv
        xt = tl.load(x_cols + (ih * sxh + iw * sxw)[:, None], mask=pos_ok[:, None] & n_ok[None, :], other=0.0)
        acc += xt.to(ACC) * kv[None, :]
    _store_output(acc, y_ptr, r, bias_ptr, os_ptr, b, co, n_ok, offs_m, m_ok, O, OW, syb, syc, syh, syw,
                  E, EB, HAS_BIAS, HAS_OS, ACC)


@triton.jit
def _dgrad_depthwise_kernel(dy_ptr, w_ptr, r_ptr, sp_ptr, is_ptr, os_ptr, gx_ptr, tap_ptr, ntap_ptr,
                            C, H, W, O, OH, OW, MULT,
                            sdb, sdc, sdh, sdw, sgb, sgc, sgh, sgw,
                            SH, SW,
                            E: tl.constexpr, EB: tl.constexpr, KK: tl.constexpr,
                            HAS_SP: tl.constexpr, HAS_IS: tl.constexpr, HAS_OS: tl.constexpr,
                            ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Depthwise input gradient. Grid: (stride phases * row blocks * B, channel blocks); taps as in ``triton_gemm``
    (rows ``(kpos, d_oh, d_ow)`` per phase)."""
    b, phase, ih, iw, qi, qj, m_ok = _phase_rows(tl.program_id(0), H, W, SH, SW, BM)
    ci = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = ci < C
    dy_b = dy_ptr + b.to(tl.int64) * sdb
    r = _routing_row(r_ptr, b, E, EB, ACC)
    acc = tl.zeros([BM, BN], ACC)
    for t in range(tl.load(ntap_ptr + phase) * MULT):
        tap = tap_ptr + (phase * KK + t // MULT) * 3
        kpos = tl.load(tap)
        oh = qi + tl.load(tap + 1)
        ow = qj + tl.load(tap + 2)
        co = ci * MULT + t % MULT
        kv = _mix_vec(w_ptr + kpos * O, r, co, c_ok, KK * O, E, EB, ACC)
        if HAS_SP:
            kv *= tl.load(sp_ptr + b * KK + kpos).to(ACC)
        if HAS_OS:
            kv *= tl.load(os_ptr + b * O + co, mask=c_ok, other=0.0).to(ACC)
        ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        dyt = tl.load(dy_b + (oh * sdh + ow * sdw)[:, None] + co[None, :] * sdc, mask=ok[:, None] & c_ok[None, :],
                      other=0.0)
        acc += dyt.to(ACC) * kv[None, :]
    if HAS_IS:
        acc *= tl.load(is_ptr + b * C + ci, mask=c_ok, other=0.0).to(ACC)[None, :]
    ptrs = gx_ptr + b.to(tl.int64) * sgb + ci[None, :] * sgc + (ih * sgh + iw * sgw)[:, None]
    tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


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
    """Kernel-side gradients of a depthwise layer. Grid: (o-blocks * batch chunks, KK).

    Per example: ``Graw[o] = sum_p dy[b, o, p] * x[b, o // MULT, p + kpos]``, then (with ``G`` the gradient of
    ``K_b = s * sum_e r[b, e] W_e`` and the channel attentions as in ``triton_wgrad``) partial sums written to this
    program's own slots: ``gw[chunk, e, kpos, o]``, ``gr[(o-block, kpos), b, e]``, ``gsp[o-block, b, kpos]``,
    ``gos[kpos, b, o]``, ``gis[(kpos, j), b, c]`` (``j = o % MULT``). The launcher sums the slots in a fixed order.
    """
    KK: tl.constexpr = KH * KW
    kpos = tl.program_id(1)
    dh0 = (kpos // KW) * DH - PT
    dw0 = (kpos % KW) * DW - PL
    n_ob = tl.cdiv(O, BO)
    pid = tl.program_id(0)
    pid_o = pid % n_ob
    chunk = pid // n_ob
    co = pid_o * BO + tl.arange(0, BO)
    b0 = chunk * BCHUNK
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
            p = p0 + tl.arange(0, BP)
            p_ok = p < OH * OW
            oh = p // OW
            ow = p % OW
            ih = oh * SH + dh0
            iw = ow * SW + dw0
            x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            dyt = tl.load(dy_ptr + b.to(tl.int64) * sdb + co[None, :] * sdc + (oh * sdh + ow * sdw)[:, None],
                          mask=p_ok[:, None] & o_ok[None, :], other=0.0)
            xt = tl.load(x_ptr + b.to(tl.int64) * sxb + ci[None, :] * sxc + (ih * sxh + iw * sxw)[:, None],
                         mask=x_ok[:, None] & o_ok[None, :], other=0.0)
            prod += dyt.to(ACC) * xt.to(ACC)
        graw = tl.sum(prod, axis=0)
        rv = _routing_row(r_ptr, b, E, EB, ACC)
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
                tl.store(gr_ptr + ((pid_o * KK + kpos) * B + b) * E + offs_e, ge * s, mask=e_ok)
            if NEED_SP:
                tl.store(gsp_ptr + (pid_o * B + b) * KK + kpos, tl.sum(ge * rv, axis=0))
        if NEED_OS or NEED_IS:
            kb = tl.sum(w2 * rv[:, None], axis=0) * s
            if NEED_OS:
                tl.store(gos_ptr + (kpos * B + b).to(tl.int64) * O + co, g_no_os * kb, mask=o_ok)
            if NEED_IS:  # the multiplier's output channels share an input channel: one slot each
                slot = kpos * MULT + co % MULT
                tl.store(gis_ptr + (slot * B + b).to(tl.int64) * C + ci, g_no_is * kb, mask=o_ok)
    if NEED_W:
        tl.store(gw_ptr + chunk.to(tl.int64) * (E * KK * O) + w_off, acc_w, mask=w_mask)
