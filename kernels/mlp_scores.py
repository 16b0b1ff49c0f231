"""Triton kernels for the reference head's depth-2 scorer (paper Table 4, "2-layer MLP").

    pre_t = W1 z_t + b1                    (W1 [Dh, D]: the GEMM, on the tensor cores)
    h_t   = act(pre_t)                     (tanh or relu)
    s_kt  = w2_k . h_t + b2_k              (w2 [K, Dh])

Forward: a program owns BM pooled tokens (rows of the flattened [B * N] token list) and walks the
hidden units in blocks of BN: pre [BM, BN] = sum over D in BD-wide steps of x . W1^T, then the
activation and its share of the second layer in registers. Only the scores [B, K, N] are written:
the hidden activation never leaves the chip.
Backward (given ds = dL/ds): the same tiles recompute pre, then
    dpre = (ds . w2) * act'(pre)           written transiently for the launcher's dW1 = dpre^T x GEMM
    dw2 += ds^T h,  db1 += sum_t dpre      per-program partials, reduced by the launcher
tanh' = 1 - h^2, relu' = [pre > 0]. Legend: ``b_pre`` pre-activation tile, ``b_h`` activation,
``b_dpre`` its gradient; ACT 0 = tanh, 1 = relu; FAST_TANH: the GPU's tanh.approx.f32 (used
only where the operands are bf16/fp16 already).
"""
import triton
import triton.language as tl


@triton.jit
def _tanh(x, FAST_TANH: tl.constexpr):
    if FAST_TANH:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        # exact to float32 rounding in absolute terms; exp overflows to inf for large x: 1 - 0
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _activate(b_pre, ACT: tl.constexpr, FAST_TANH: tl.constexpr):
    # the forward and the backward recompute the same activation (inlined: no register cost)
    if ACT == 0:
        return _tanh(b_pre, FAST_TANH)
    else:
        return tl.maximum(b_pre, 0.0)


@triton.jit
def _dot32(a, b, LOWP: tl.constexpr, F32_PRECISION: tl.constexpr):
    # the second layer's float32 products (K > 1): one TF32 pass where the first layer's operands
    # are bf16/fp16 anyway (3xTF32 spills registers there), else F32_PRECISION
    if LOWP:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision=F32_PRECISION)


@triton.jit
def _hidden_tile(p_row, m_m, w1_ptr, b1_ptr, n0, D, DH,
                 HAS_B1: tl.constexpr, LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    # [BM, BN] float32 pre-activations of hidden units n0 .. n0 + BN for the BM token rows p_row
    o_n = n0 + tl.arange(0, BN)
    m_n = o_n < DH
    b_pre = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_x = tl.load(p_row[:, None] + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        b_w = tl.load(w1_ptr + o_n[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_n[None, :], other=0.0)  # [BD, BN]
        if LOWP:
            b_pre = tl.dot(b_x, b_w, b_pre)
        else:
            b_pre = tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), b_pre, input_precision=F32_PRECISION)
    if HAS_B1:
        b_pre += tl.load(b1_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    return b_pre


@triton.jit
def _rows(pid, x_ptr, stride_xb, stride_xt, b0, P, N, M, BM: tl.constexpr):
    # the program's BM token rows: flat index within the launch, image, token, row pointers, mask
    o_m = pid.to(tl.int64) * BM + tl.arange(0, BM)
    m_m = o_m < M
    i_b = b0 + o_m // N
    i_t = o_m % N
    p_row = x_ptr + i_b * stride_xb + (P + i_t) * stride_xt
    return o_m, m_m, i_b, i_t, p_row


@triton.jit(do_not_specialize=["P", "N", "M"])
def mlp_scores_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, s_ptr,
    stride_xb, stride_xt, P, N, M, D, DH, K,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACT: tl.constexpr, FAST_TANH: tl.constexpr,
    SINGLE: tl.constexpr, LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    o_m, m_m, i_b, i_t, p_row = _rows(pid, x_ptr, stride_xb, stride_xt, 0, P, N, M, BM)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_s = tl.zeros([BM, BK], dtype=tl.float32)
    for n0 in range(0, DH, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < DH
        b_pre = _hidden_tile(p_row, m_m, w1_ptr, b1_ptr, n0, D, DH, HAS_B1, LOWP, F32_PRECISION, BM, BN, BD)
        b_h = _activate(b_pre, ACT, FAST_TANH)
        if SINGLE:
            b_w2 = tl.load(w2_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BN]
            b_s += tl.sum(b_h * b_w2[None, :], axis=1)[:, None]
        else:
            b_w2t = tl.load(w2_ptr + o_k[None, :] * DH + o_n[:, None], mask=m_n[:, None] & m_k[None, :],
                            other=0.0).to(tl.float32)  # [BN, BK]
            b_s += _dot32(b_h, b_w2t, LOWP, F32_PRECISION)
    if HAS_B2:
        b_s += tl.load(b2_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)[None, :]
    tl.store(s_ptr + i_b[:, None] * K * N + o_k[None, :] * N + i_t[:, None], b_s, mask=m_m[:, None] & m_k[None, :])


@triton.jit(do_not_specialize=["b0", "P", "N", "M", "T"])
def mlp_scores_bwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, ds_ptr, dpre_ptr, part_ptr,
    stride_xb, stride_xt, stride_part, b0, P, N, M, T, D, DH, K,
    HAS_B1: tl.constexpr, ACT: tl.constexpr, FAST_TANH: tl.constexpr,
    SINGLE: tl.constexpr, LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
):
    # Rows here are all M = images * T tokens of images b0, b0 + 1, ..., prefix tokens included
    # (their ds is 0, so their dpre rows are written as zeros): dpre [M, DH] then lines up with
    # the [images * T, D] token view for the launcher's dW1 = dpre^T x GEMM, and a program's dpre
    # rows are contiguous (a gather-store costs sm_90 ~100 registers more). Partials: row pid of
    # [G, stride_part] holds dw2 [K, DH] then db1 [DH].
    pid = tl.program_id(0)
    o_m, m_m, i_b, i_t, p_row = _rows(pid, x_ptr, stride_xb, stride_xt, b0, 0, T, M, BM)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_mk = (m_m & (i_t >= P))[:, None] & m_k[None, :]
    b_ds = tl.load(ds_ptr + i_b[:, None] * K * N + o_k[None, :] * N + (i_t - P)[:, None], mask=m_mk,
                   other=0.0)  # [BM, BK]
    o_dpre = (o_m * DH).to(tl.int32)  # [BM] (a chunk holds < 2^31 elements; int32 offsets: fewer registers)
    p_part = part_ptr + pid.to(tl.int64) * stride_part
    for n0 in range(0, DH, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < DH
        b_pre = _hidden_tile(p_row, m_m, w1_ptr, b1_ptr, n0, D, DH, HAS_B1, LOWP, F32_PRECISION, BM, BN, BD)
        b_h = _activate(b_pre, ACT, FAST_TANH)
        if ACT == 0:
            b_dact = 1.0 - b_h * b_h
        else:
            b_dact = tl.where(b_pre > 0.0, 1.0, 0.0)
        if SINGLE:
            b_w2 = tl.load(w2_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BN]
            b_dpre = (b_ds * b_w2[None, :]) * b_dact  # [BM, 1] x [1, BN]
            b_dw2 = tl.sum(b_ds * b_h, axis=0)  # [BN]; rows past M have ds = 0
            tl.store(p_part + o_n, b_dw2, mask=m_n)
        else:
            b_w2 = tl.load(w2_ptr + o_k[:, None] * DH + o_n[None, :], mask=m_k[:, None] & m_n[None, :],
                           other=0.0).to(tl.float32)  # [BK, BN]
            b_dpre = _dot32(b_ds, b_w2, LOWP, F32_PRECISION) * b_dact
            b_dw2 = _dot32(tl.trans(b_ds), b_h, LOWP, F32_PRECISION)  # [BK, BN]
            tl.store(p_part + o_k[:, None] * DH + o_n[None, :], b_dw2, mask=m_k[:, None] & m_n[None, :])
        tl.store(p_part + K * DH + o_n, tl.sum(b_dpre, axis=0), mask=m_n)
        tl.store(dpre_ptr + (o_dpre[:, None] + o_n[None, :]), b_dpre.to(dpre_ptr.dtype.element_ty),
                 mask=m_m[:, None] & m_n[None, :])
