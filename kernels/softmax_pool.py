"""Triton kernels for softmax pooling over given scores.

    a_{k,t}  = exp(s_{k,t} - lse_k),   lse_k = log sum_t exp(s_{k,t})
    out_k    = sum_t a_{k,t} x_t
    ds_{k,t} = a_{k,t} (g_k . x_t - g_k . out_k)          (g_k = dL/dout_k)
    dx_t     = sum_k a_{k,t} g_k

The scores are small next to the tokens (K * 4 bytes against D * 2 bytes a token), so the
forward computes each branch's log-sum-exp first (one pass over the scores, online max and
sum), then reads every token once with exact weights: no rescaling of the accumulator, and a
score of -inf (a masked token) never meets another -inf in a subtraction, except in a row that
is all -inf, which pools to NaN as ``torch.softmax`` does.
Forward: one program per (image, chunk of BC features), the chunk programs of an image side by
side. Backward: one program per (image, token split); ``<g_k, out_k>`` comes from the forward's
float32 output, so every token is independent: no partials to reduce.
Maths: docs/semantics.md ("Fused softmax pool"); layout: docs/kernels.md (`softmax_pool`).
Legend: ``b_a`` weights, ``b_gx`` g . x, ``b_c`` g . out, SINGLE: K = 1 without tl.dot.
"""
import triton
import triton.language as tl

from .dots import dot as _dot


@triton.jit
def _row_lse(p_s, o_k, m_k, N, BK: tl.constexpr, BN: tl.constexpr):
    # [BK] log-sum-exp of each branch's N scores (-inf for a row of -inf only, NaN with a NaN; 0 for padding)
    b_max = tl.full([BK], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BK], dtype=tl.float32)
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        b_s = tl.load(p_s + o_k[:, None] * N + o_n[None, :], mask=m_k[:, None] & (o_n < N)[None, :],
                      other=float("-inf")).to(tl.float32)  # [BK, BN]
        b_s = tl.where(m_k[:, None], b_s, 0.0)  # padded branches: finite, never used
        b_max_new = tl.maximum(b_max, tl.max(b_s, axis=1))
        b_max_safe = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)  # no -inf - -inf in all -inf rows
        b_sum = b_sum * tl.exp(b_max - b_max_safe) + tl.sum(tl.exp(b_s - b_max_safe[:, None]), axis=1)
        b_max = b_max_new
    return tl.where(b_max == float("-inf"), 0.0, b_max) + tl.log(tl.where(m_k, b_sum, 1.0))


@triton.jit(do_not_specialize=["P", "N"])
def softmax_pool_fwd_kernel(
    s_ptr, x_ptr, out_ptr, out32_ptr, lse_ptr,
    stride_xb, stride_xt, P, N, D, K,
    STORE_F32: tl.constexpr, SINGLE: tl.constexpr, LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    NSPLIT = tl.cdiv(D, BC)
    pid = tl.program_id(0)
    i_c = pid % NSPLIT
    i_b = (pid // NSPLIT).to(tl.int64)
    o_d = i_c * BC + tl.arange(0, BC)
    m_d = o_d < D
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    p_s = s_ptr + i_b * K * N  # scores [B, K, N], contiguous
    b_lse = _row_lse(p_s, o_k, m_k, N, BK, BN)  # [BK]
    p_x = x_ptr + i_b * stride_xb + P * stride_xt
    if SINGLE:
        lse = tl.sum(b_lse, axis=0)  # BK = 1
        b_acc = tl.zeros([BC], dtype=tl.float32)
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            b_s = tl.load(p_s + o_t, mask=m_t, other=float("-inf")).to(tl.float32)
            b_a = tl.where(m_t, tl.exp(b_s - lse), 0.0)  # [BT]
            b_x = tl.load(p_x + o_t[:, None] * stride_xt + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                          other=0.0).to(tl.float32)  # [BT, BC]
            b_acc += tl.sum(b_a[:, None] * b_x, axis=0)
        tl.store(out_ptr + i_b * D + o_d, b_acc.to(out_ptr.dtype.element_ty), mask=m_d)
        if STORE_F32:
            tl.store(out32_ptr + i_b * D + o_d, b_acc, mask=m_d)
    else:
        b_acc = tl.zeros([BC, BK], dtype=tl.float32)  # this chunk of the K weighted sums, transposed
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            m_tk = m_t[:, None] & m_k[None, :]
            b_s = tl.load(p_s + o_k[None, :] * N + o_t[:, None], mask=m_tk, other=float("-inf")).to(tl.float32)
            b_a = tl.where(m_tk, tl.exp(b_s - b_lse[None, :]), 0.0)  # [BT, BK]
            b_xt = tl.load(p_x + o_t[None, :] * stride_xt + o_d[:, None], mask=m_t[None, :] & m_d[:, None],
                           other=0.0)  # [BC, BT]
            b_acc += _dot(b_xt, b_a.to(b_xt.dtype), LOWP, F32_PRECISION)
        o_out = i_b * K * D + o_k[None, :] * D + o_d[:, None]
        m_out = m_k[None, :] & m_d[:, None]
        tl.store(out_ptr + o_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_out)
        if STORE_F32:
            tl.store(out32_ptr + o_out, b_acc, mask=m_out)
    if i_c == 0:
        tl.store(lse_ptr + i_b * K + o_k, b_lse, mask=m_k)


@triton.jit(do_not_specialize=["P", "N", "NTS"])
def softmax_pool_bwd_kernel(
    s_ptr, x_ptr, lse_ptr, out32_ptr, dout_ptr, ds_ptr, dx_ptr,
    stride_xb, stride_xt, stride_dxb, stride_dxt, P, N, D, K, NTS,
    HAS_DS: tl.constexpr, HAS_DX: tl.constexpr, SINGLE: tl.constexpr,
    LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    # Program pid = image * NTS + split walks the image's token tiles split, split + NTS, ...
    pid = tl.program_id(0)
    i_ts = pid % NTS
    i_b = (pid // NTS).to(tl.int64)
    o_e = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    p_g = dout_ptr + i_b * K * D
    b_lse = tl.load(lse_ptr + i_b * K + o_k, mask=m_k, other=0.0)  # [BK]
    b_c = tl.zeros([BK], dtype=tl.float32)
    for d0 in range(0, D, BC):
        o_d = d0 + o_e
        m_kd = m_k[:, None] & (o_d < D)[None, :]
        b_g = tl.load(p_g + o_k[:, None] * D + o_d[None, :], mask=m_kd, other=0.0).to(tl.float32)
        b_o = tl.load(out32_ptr + i_b * K * D + o_k[:, None] * D + o_d[None, :], mask=m_kd, other=0.0)
        b_c += tl.sum(b_g * b_o, axis=1)
    p_s = s_ptr + i_b * K * N
    p_x = x_ptr + i_b * stride_xb + P * stride_xt
    p_dx = dx_ptr + i_b * stride_dxb + P * stride_dxt
    for t0 in range(i_ts * BT, N, NTS * BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < N
        m_tk = m_t[:, None] & m_k[None, :]
        b_s = tl.load(p_s + o_k[None, :] * N + o_t[:, None], mask=m_tk, other=float("-inf")).to(tl.float32)
        b_a = tl.where(m_tk, tl.exp(b_s - b_lse[None, :]), 0.0)  # [BT, BK]
        if HAS_DS:
            b_gx = tl.zeros([BT, BK], dtype=tl.float32)
            for d0 in range(0, D, BC):
                o_d = d0 + o_e
                m_d = o_d < D
                b_x = tl.load(p_x + o_t[:, None] * stride_xt + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                              other=0.0)  # [BT, BC]
                if SINGLE:
                    b_g = tl.load(p_g + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BC]
                    b_gx += tl.sum(b_x.to(tl.float32) * b_g[None, :], axis=1)[:, None]
                else:
                    b_gt = tl.load(p_g + o_k[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_k[None, :],
                                   other=0.0)  # [BC, BK]
                    b_gx += _dot(b_x, b_gt, LOWP, F32_PRECISION)
            b_ds = b_a * (b_gx - b_c[None, :])  # [BT, BK]
            tl.store(ds_ptr + i_b * K * N + o_k[None, :] * N + o_t[:, None], b_ds, mask=m_tk)
        if HAS_DX:
            for d0 in range(0, D, BC):
                o_d = d0 + o_e
                m_d = o_d < D
                if SINGLE:
                    b_g = tl.load(p_g + o_d, mask=m_d, other=0.0).to(tl.float32)
                    b_dx = b_a * b_g[None, :]  # [BT, 1] x [1, BC]
                else:
                    b_g = tl.load(p_g + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None] & m_d[None, :],
                                  other=0.0)  # [BK, BC]
                    b_dx = _dot(b_a.to(b_g.dtype), b_g, LOWP, F32_PRECISION)  # [BT, BC]
                tl.store(p_dx + o_t[:, None] * stride_dxt + o_d[None, :], b_dx.to(dx_ptr.dtype.element_ty),
                         mask=m_t[:, None] & m_d[None, :])
