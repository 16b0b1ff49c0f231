"""Triton kernels for Selective Aggregation (AbMILP pooling).

K = 1: one program owns one image: it streams the image's pooled tokens once, keeping an
online softmax (running max ``m``, running sum ``l``) and the weighted token sum in
registers, so the tokens are read exactly once. The backward reads the forward's scores
back instead of recomputing them.

K > 1, two families (the launcher picks the faster on a GPU, see ops/abmilp.py):
- "batched" (``abmilp_fwd_kernel`` / ``abmilp_bwd_kernel``): one program per image, the
  feature dim as NC chunks batched through 3-D ``tl.dot``s, a [NC, BK, BC] accumulator;
- "split" (``*_split_kernel``): one program per (image, D-chunk of BC features). Every
  program computes the full scores (a loop over all chunks: tensor-core work is cheap here)
  and accumulates only its own chunk, so the accumulator is [BC, BK] and occupancy stays
  high; the chunk programs of an image run side by side, so HBM serves each token once and
  the other chunk programs read it from L2.
Maths: README, `abmilp_pool`.
"""
import triton
import triton.language as tl


@triton.jit
def _single_tile(b_x, o_t, m_t, b_w, bias, m_i, l_i, b_acc, s_ptr, i_b, N, STORE_SCORES: tl.constexpr):
    # one [BT, BD] float32 tile of tokens: scores, online-softmax update, weighted sum
    b_s = tl.sum(b_x * b_w[None, :], axis=1) + bias  # [BT]
    b_s = tl.where(m_t, b_s, float("-inf"))
    if STORE_SCORES:
        tl.store(s_ptr + i_b * N + o_t, b_s, mask=m_t)
    m_new = tl.maximum(m_i, tl.max(b_s, axis=0))
    alpha = tl.exp(m_i - m_new)
    b_p = tl.exp(b_s - m_new)  # [BT]
    l_i = l_i * alpha + tl.sum(b_p, axis=0)
    b_acc = b_acc * alpha + tl.sum(b_p[:, None] * b_x, axis=0)
    return m_new, l_i, b_acc


@triton.jit(do_not_specialize=["P", "N"])
def abmilp_fwd_single_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, out32_ptr, lse_ptr, s_ptr,
    stride_xb, stride_xt, P, N, D,
    HAS_BIAS: tl.constexpr, STORE_F32: tl.constexpr, STORE_SCORES: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, PREFETCH: tl.constexpr = False,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    p_x = x_ptr + i_b * stride_xb + P * stride_xt

    m_i = float("-inf")
    l_i = 0.0
    b_acc = tl.zeros([BD], dtype=tl.float32)
    if PREFETCH:
        # the next tile's load is issued before this tile's math: two tiles in flight per program
        o_t = tl.arange(0, BT)
        b_x = tl.load(p_x + o_t[:, None] * stride_xt + o_d[None, :], mask=(o_t < N)[:, None] & m_d[None, :],
                      other=0.0)
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            o_n = o_t + BT
            b_next = tl.load(p_x + o_n[:, None] * stride_xt + o_d[None, :],
                             mask=(o_n < N)[:, None] & m_d[None, :], other=0.0)
            m_i, l_i, b_acc = _single_tile(b_x.to(tl.float32), o_t, o_t < N, b_w, bias, m_i, l_i, b_acc,
                                           s_ptr, i_b, N, STORE_SCORES)
            b_x = b_next
    else:
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            b_x = tl.load(p_x + o_t[:, None] * stride_xt + o_d[None, :],
                          mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BT, BD]
            m_i, l_i, b_acc = _single_tile(b_x, o_t, m_t, b_w, bias, m_i, l_i, b_acc, s_ptr, i_b, N, STORE_SCORES)

    b_out = b_acc / l_i
    tl.store(out_ptr + i_b * D + o_d, b_out.to(out_ptr.dtype.element_ty), mask=m_d)
    if STORE_F32:
        tl.store(out32_ptr + i_b * D + o_d, b_out, mask=m_d)
    tl.store(lse_ptr + i_b, m_i + tl.log(l_i))


@triton.jit
def _dot(a, b, LOWP: tl.constexpr, F32_PRECISION: tl.constexpr):
    # Batched [NC, M, R] x [NC, R, N] -> float32. bf16/fp16 operands feed the tensor cores
    # directly (the eager head does its Linear in bf16 under autocast too); float32 uses 3xTF32.
    if LOWP:
        return tl.dot(a, b)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=F32_PRECISION)


@triton.jit
def _branch_bias(bias_ptr, o_k, m_k, HAS_BIAS: tl.constexpr, BK: tl.constexpr):
    # [BK] float32: each branch's bias, 0 without one
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        b_bias = tl.zeros([BK], dtype=tl.float32)
    return b_bias


@triton.jit
def _softmax_step(b_s, m_i, l_i):
    # online softmax over tokens, one column per branch: scores [BT, BK] and running max / sum [BK]
    # -> new max, the factor rescaling what was accumulated so far, the tile's weights, new sum
    m_new = tl.maximum(m_i, tl.max(b_s, axis=0))
    alpha = tl.exp(m_i - m_new)
    b_p = tl.exp(b_s - m_new[None, :])
    return m_new, alpha, b_p, l_i * alpha + tl.sum(b_p, axis=0)


@triton.jit(do_not_specialize=["P", "N"])
def abmilp_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, out32_ptr, lse_ptr, s_ptr,
    stride_xb, stride_xt, P, N, D, K,
    HAS_BIAS: tl.constexpr, STORE_F32: tl.constexpr, STORE_SCORES: tl.constexpr,
    LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr,
):
    # The feature dim is split into NC chunks of BC so that tl.dot batches over the chunks:
    # the score reduction over D spreads across warps instead of one warp holding all of D.
    i_b = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, NC)
    o_e = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_dx = o_c[:, None, None] * BC + o_e[None, None, :]  # [NC, 1, BC]
    o_dw = o_c[:, None, None] * BC + o_e[None, :, None]  # [NC, BC, 1]
    b_wt = tl.load(w_ptr + o_k[None, None, :] * D + o_dw,
                   mask=(o_dw < D) & m_k[None, None, :], other=0.0)  # [NC, BC, BK]
    if not LOWP:
        b_wt = b_wt.to(tl.float32)
    b_bias = _branch_bias(bias_ptr, o_k, m_k, HAS_BIAS, BK)
    p_x = x_ptr + i_b * stride_xb + P * stride_xt

    m_i = tl.full([BK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BK], dtype=tl.float32)
    b_acc = tl.zeros([NC, BK, BC], dtype=tl.float32)
    for t0 in range(0, N, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < N
        b_x = tl.load(p_x + o_t[None, :, None] * stride_xt + o_dx,
                      mask=m_t[None, :, None] & (o_dx < D), other=0.0)  # [NC, BT, BC]
        if not LOWP:
            b_x = b_x.to(tl.float32)
        b_s = tl.sum(_dot(b_x, b_wt, LOWP, F32_PRECISION), axis=0) + b_bias[None, :]  # [BT, BK]
        b_s = tl.where(m_t[:, None], b_s, float("-inf"))
        if STORE_SCORES:
            tl.store(s_ptr + i_b * K * N + o_k[None, :] * N + o_t[:, None], b_s,
                     mask=m_t[:, None] & m_k[None, :])
        m_new, alpha, b_p, l_i = _softmax_step(b_s, m_i, l_i)  # b_p [BT, BK]
        b_pt = tl.broadcast_to(tl.trans(b_p).to(b_x.dtype)[None, :, :], [NC, BK, BT])
        b_acc = b_acc * alpha[None, :, None] + _dot(b_pt, b_x, LOWP, F32_PRECISION)  # [NC, BK, BC]
        m_i = m_new

    b_out = b_acc / l_i[None, :, None]
    o_out = i_b * K * D + o_k[None, :, None] * D + o_dx  # [NC, BK, BC]
    m_out = m_k[None, :, None] & (o_dx < D)
    tl.store(out_ptr + o_out, b_out.to(out_ptr.dtype.element_ty), mask=m_out)
    if STORE_F32:
        tl.store(out32_ptr + o_out, b_out, mask=m_out)
    tl.store(lse_ptr + i_b * K + o_k, m_i + tl.log(l_i), mask=m_k)


@triton.jit(do_not_specialize=["B", "P", "N"])
def abmilp_bwd_single_kernel(
    x_ptr, w_ptr, s_ptr, lse_ptr, out32_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
    stride_xb, stride_xt, stride_dxb, stride_dxt, stride_part, B, P, N, D,
    HAS_DX: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr = 4,  # read by the launcher's grid only: the kernel uses num_programs
):
    # Each program walks images i_p, i_p + G, ... and keeps its dw / db partials in registers,
    # stored as row i_p of one [G, stride_part] buffer (dw, then db), so that the launcher
    # reduces both with one sum. The forward's scores s [B, N] are read back, so a token costs one reduction over D
    # (<x, dout>), not two.
    i_p = tl.program_id(0)
    G = tl.num_programs(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if HAS_DX:
        b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    else:
        b_w = tl.zeros([BD], dtype=tl.float32)  # unused
    b_dw = tl.zeros([BD], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for i_img in range(i_p, B, G):
        i_b = tl.cast(i_img, tl.int64)
        b_g = tl.load(dout_ptr + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
        b_o = tl.load(out32_ptr + i_b * D + o_d, mask=m_d, other=0.0)  # [BD]
        c = tl.sum(b_g * b_o, axis=0)
        lse = tl.load(lse_ptr + i_b)
        p_x = x_ptr + i_b * stride_xb + P * stride_xt
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            m_x = m_t[:, None] & m_d[None, :]
            b_x = tl.load(p_x + o_t[:, None] * stride_xt + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)
            b_s = tl.load(s_ptr + i_b * N + o_t, mask=m_t, other=0.0)  # [BT]
            b_a = tl.where(m_t, tl.exp(b_s - lse), 0.0)
            b_ds = b_a * (tl.sum(b_x * b_g[None, :], axis=1) - c)  # [BT]
            b_dw += tl.sum(b_ds[:, None] * b_x, axis=0)
            b_db += b_ds
            if HAS_DX:
                b_dx = b_a[:, None] * b_g[None, :] + b_ds[:, None] * b_w[None, :]  # [BT, BD]
                p_dx = dx_ptr + i_b * stride_dxb + (P + o_t[:, None]) * stride_dxt + o_d[None, :]
                tl.store(p_dx, b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)
    tl.store(dw_ptr + i_p * stride_part + o_d, b_dw, mask=m_d)
    tl.store(db_ptr + i_p * stride_part, tl.sum(b_db, axis=0))


@triton.jit(do_not_specialize=["B", "P", "N"])
def abmilp_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, lse_ptr, out32_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
    stride_xb, stride_xt, stride_dxb, stride_dxt, stride_part, B, P, N, D, K,
    HAS_BIAS: tl.constexpr, HAS_DX: tl.constexpr,
    LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr,
):
    # Each program walks images i_p, i_p + G, ... and keeps its dw / db partials in registers.
    i_p = tl.program_id(0)
    G = tl.num_programs(0)
    o_c = tl.arange(0, NC)
    o_e = tl.arange(0, BC)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_dx = o_c[:, None, None] * BC + o_e[None, None, :]  # [NC, 1, BC]
    o_dw = o_c[:, None, None] * BC + o_e[None, :, None]  # [NC, BC, 1]
    o_kd = o_k[None, :, None] * D + o_dx  # [NC, BK, BC]
    m_kd = m_k[None, :, None] & (o_dx < D)
    b_wt = tl.load(w_ptr + o_k[None, None, :] * D + o_dw,
                   mask=(o_dw < D) & m_k[None, None, :], other=0.0)  # [NC, BC, BK]
    if not LOWP:
        b_wt = b_wt.to(tl.float32)
    b_bias = _branch_bias(bias_ptr, o_k, m_k, HAS_BIAS, BK)
    b_dw = tl.zeros([NC, BK, BC], dtype=tl.float32)
    b_db = tl.zeros([BK], dtype=tl.float32)
    for i_img in range(i_p, B, G):
        i_b = tl.cast(i_img, tl.int64)
        b_g = tl.load(dout_ptr + i_b * K * D + o_kd, mask=m_kd, other=0.0)  # [NC, BK, BC]
        b_o = tl.load(out32_ptr + i_b * K * D + o_kd, mask=m_kd, other=0.0)
        b_c = tl.sum(tl.sum(b_g.to(tl.float32) * b_o, axis=2), axis=0)  # [BK]
        if not LOWP:
            b_g = b_g.to(tl.float32)
        b_lse = tl.load(lse_ptr + i_b * K + o_k, mask=m_k, other=0.0)  # [BK]
        p_x = x_ptr + i_b * stride_xb + P * stride_xt
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            m_x = m_t[None, :, None] & (o_dx < D)
            b_x = tl.load(p_x + o_t[None, :, None] * stride_xt + o_dx, mask=m_x, other=0.0)  # [NC, BT, BC]
            if not LOWP:
                b_x = b_x.to(tl.float32)
            b_s = tl.sum(_dot(b_x, b_wt, LOWP, F32_PRECISION), axis=0) + b_bias[None, :]  # [BT, BK]
            b_a = tl.where(m_t[:, None] & m_k[None, :], tl.exp(b_s - b_lse[None, :]), 0.0)
            b_gz = tl.sum(_dot(b_x, tl.permute(b_g, (0, 2, 1)), LOWP, F32_PRECISION), axis=0)  # [BT, BK]
            b_ds = b_a * (b_gz - b_c[None, :])
            b_dst = tl.broadcast_to(tl.trans(b_ds).to(b_x.dtype)[None, :, :], [NC, BK, BT])
            b_dw += _dot(b_dst, b_x, LOWP, F32_PRECISION)  # [NC, BK, BC]
            b_db += tl.sum(b_ds, axis=0)
            if HAS_DX:
                b_a3 = tl.broadcast_to(b_a.to(b_x.dtype)[None, :, :], [NC, BT, BK])
                b_ds3 = tl.broadcast_to(b_ds.to(b_x.dtype)[None, :, :], [NC, BT, BK])
                b_dx = _dot(b_a3, b_g, LOWP, F32_PRECISION) \
                    + _dot(b_ds3, tl.permute(b_wt, (0, 2, 1)), LOWP, F32_PRECISION)  # [NC, BT, BC]
                p_dx = dx_ptr + i_b * stride_dxb + (P + o_t[None, :, None]) * stride_dxt + o_dx
                tl.store(p_dx, b_dx.to(dx_ptr.dtype.element_ty), mask=m_x)
    tl.store(dw_ptr + i_p * stride_part + o_kd, b_dw, mask=m_kd)
    tl.store(db_ptr + i_p * stride_part + o_k, b_db, mask=m_k)


@triton.jit
def _split_scores(p_x, o_t, m_t, stride_xt, w_ptr, o_k, m_k, D, BC: tl.constexpr,
                  LOWP: tl.constexpr, F32_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    # [BT, BK] scores x_t . w_k over all of D, one BC-wide chunk at a time
    o_e = tl.arange(0, BC)
    b_s = tl.zeros([BT, BK], dtype=tl.float32)
    for d0 in range(0, D, BC):
        o_d = d0 + o_e
        m_d = o_d < D
        b_x = tl.load(p_x + o_t[:, None] * stride_xt + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        b_wt = tl.load(w_ptr + o_k[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_k[None, :], other=0.0)
        b_s += _dot(b_x, b_wt, LOWP, F32_PRECISION)
    return b_s


@triton.jit
def _token_tile(p_x, o_t, m_t, stride_xt, o_d, m_d):
    # tokens o_t x features o_d of one image, [BT, BC] (WHOLE: every feature of the tile)
    return tl.load(p_x + o_t[:, None] * stride_xt + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)


@triton.jit(do_not_specialize=["P", "N"])
def abmilp_fwd_split_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, out32_ptr, lse_ptr, s_ptr,
    stride_xb, stride_xt, P, N, D, K,
    HAS_BIAS: tl.constexpr, STORE_F32: tl.constexpr, STORE_SCORES: tl.constexpr,
    LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, WHOLE: tl.constexpr = False,
):
    # Program pid = image * NSPLIT + chunk: the chunk programs of one image are neighbours in
    # launch order, so they stream the image's tokens at the same time (L2 reuse).
    # WHOLE (the launcher sets it only with BC >= D: one program an image): the weights are
    # loaded once, before the token loop, and each token tile is read once and feeds both dots
    # (scores x.w, and the weighted sum through its transpose), instead of re-reading the
    # weights every tile and the tile again for the sum.
    NSPLIT = tl.cdiv(D, BC)
    pid = tl.program_id(0)
    i_c = pid % NSPLIT
    i_b = (pid // NSPLIT).to(tl.int64)
    o_own = i_c * BC + tl.arange(0, BC)
    m_own = o_own < D
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_bias = _branch_bias(bias_ptr, o_k, m_k, HAS_BIAS, BK)
    p_x = x_ptr + i_b * stride_xb + P * stride_xt

    m_i = tl.full([BK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BK], dtype=tl.float32)
    b_acc = tl.zeros([BC, BK], dtype=tl.float32)  # this chunk of the K weighted sums, transposed
    if WHOLE:
        b_w = tl.load(w_ptr + o_k[None, :] * D + o_own[:, None], mask=m_own[:, None] & m_k[None, :], other=0.0)
    for t0 in range(0, N, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < N
        if WHOLE:
            b_x = _token_tile(p_x, o_t, m_t, stride_xt, o_own, m_own)
            b_s = _dot(b_x, b_w, LOWP, F32_PRECISION)
        else:
            b_s = _split_scores(p_x, o_t, m_t, stride_xt, w_ptr, o_k, m_k, D, BC, LOWP, F32_PRECISION, BT, BK)
        b_s = tl.where(m_t[:, None], b_s + b_bias[None, :], float("-inf"))  # [BT, BK]
        if STORE_SCORES:
            if i_c == 0:
                tl.store(s_ptr + i_b * K * N + o_k[None, :] * N + o_t[:, None], b_s,
                         mask=m_t[:, None] & m_k[None, :])
        m_new, alpha, b_p, l_i = _softmax_step(b_s, m_i, l_i)  # b_p [BT, BK]
        if WHOLE:
            b_xo = tl.trans(b_x)
        else:
            # this program's features of the tile, [BC, BT]: just read by the score loop (L1)
            b_xo = tl.load(p_x + o_t[None, :] * stride_xt + o_own[:, None], mask=m_t[None, :] & m_own[:, None],
                           other=0.0)
        if not LOWP:
            b_xo = b_xo.to(tl.float32)
        b_acc = b_acc * alpha[None, :] + _dot(b_xo, b_p.to(b_xo.dtype), LOWP, F32_PRECISION)  # [BC, BK]
        m_i = m_new

    b_out = b_acc / l_i[None, :]
    o_out = i_b * K * D + o_k[None, :] * D + o_own[:, None]
    m_out = m_k[None, :] & m_own[:, None]
    tl.store(out_ptr + o_out, b_out.to(out_ptr.dtype.element_ty), mask=m_out)
    if STORE_F32:
        tl.store(out32_ptr + o_out, b_out, mask=m_out)
    if i_c == 0:
        tl.store(lse_ptr + i_b * K + o_k, m_i + tl.log(l_i), mask=m_k)


@triton.jit(do_not_specialize=["B", "P", "N"])
def abmilp_bwd_split_kernel(
    x_ptr, w_ptr, bias_ptr, lse_ptr, out32_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
    stride_xb, stride_xt, stride_dxb, stride_dxt, stride_part, B, P, N, D, K,
    HAS_BIAS: tl.constexpr, HAS_DX: tl.constexpr,
    LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, WHOLE: tl.constexpr = False,
):
    # Program pid = i_p * NSPLIT + chunk walks images i_p, i_p + G, ... and keeps the dw
    # partial of its chunk in registers; every chunk program recomputes the full scores.
    # WHOLE (only with BC >= D, as in the forward): each token tile is read once and feeds the
    # scores, <x, dout> and dw through the on-chip weights, output gradient and its transpose.
    NSPLIT = tl.cdiv(D, BC)
    pid = tl.program_id(0)
    i_c = pid % NSPLIT
    i_p = pid // NSPLIT
    G = tl.num_programs(0) // NSPLIT
    o_e = tl.arange(0, BC)
    o_own = i_c * BC + o_e
    m_own = o_own < D
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_ko = m_k[:, None] & m_own[None, :]  # [BK, BC]
    b_bias = _branch_bias(bias_ptr, o_k, m_k, HAS_BIAS, BK)
    b_w = tl.load(w_ptr + o_k[:, None] * D + o_own[None, :], mask=m_ko, other=0.0)  # [BK, BC], for dx
    if not LOWP:
        b_w = b_w.to(tl.float32)
    b_dw = tl.zeros([BC, BK], dtype=tl.float32)
    b_db = tl.zeros([BK], dtype=tl.float32)
    for i_img in range(i_p, B, G):
        i_b = tl.cast(i_img, tl.int64)
        p_g = dout_ptr + i_b * K * D
        # c_k = <dout_k, out_k> over all of D
        b_c = tl.zeros([BK], dtype=tl.float32)
        for d0 in range(0, D, BC):
            o_d = d0 + o_e
            m_kd = m_k[:, None] & (o_d < D)[None, :]
            b_gc = tl.load(p_g + o_k[:, None] * D + o_d[None, :], mask=m_kd, other=0.0).to(tl.float32)
            b_oc = tl.load(out32_ptr + i_b * K * D + o_k[:, None] * D + o_d[None, :], mask=m_kd, other=0.0)
            b_c += tl.sum(b_gc * b_oc, axis=1)
        b_lse = tl.load(lse_ptr + i_b * K + o_k, mask=m_k, other=0.0)
        b_go = tl.load(p_g + o_k[:, None] * D + o_own[None, :], mask=m_ko, other=0.0)  # [BK, BC]
        if not LOWP:
            b_go = b_go.to(tl.float32)
        p_x = x_ptr + i_b * stride_xb + P * stride_xt
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            # scores and <x_t, dout_k> over all of D, [BT, BK] each
            if WHOLE:
                b_x = _token_tile(p_x, o_t, m_t, stride_xt, o_own, m_own)
                b_s = _dot(b_x, tl.trans(b_w), LOWP, F32_PRECISION)
                b_gz = _dot(b_x, tl.trans(b_go), LOWP, F32_PRECISION)
            else:
                b_s = _split_scores(p_x, o_t, m_t, stride_xt, w_ptr, o_k, m_k, D, BC, LOWP, F32_PRECISION, BT, BK)
                b_gz = _split_scores(p_x, o_t, m_t, stride_xt, p_g, o_k, m_k, D, BC, LOWP, F32_PRECISION, BT, BK)
            b_a = tl.where(m_t[:, None] & m_k[None, :], tl.exp(b_s + b_bias[None, :] - b_lse[None, :]), 0.0)
            b_ds = b_a * (b_gz - b_c[None, :])  # d loss / d score
            if WHOLE:
                b_xo = tl.trans(b_x)
            else:
                b_xo = tl.load(p_x + o_t[None, :] * stride_xt + o_own[:, None], mask=m_t[None, :] & m_own[:, None],
                               other=0.0)  # [BC, BT]
            if not LOWP:
                b_xo = b_xo.to(tl.float32)
            b_dw += _dot(b_xo, b_ds.to(b_xo.dtype), LOWP, F32_PRECISION)  # [BC, BK]
            b_db += tl.sum(b_ds, axis=0)
            if HAS_DX:
                b_dx = _dot(b_a.to(b_go.dtype), b_go, LOWP, F32_PRECISION) \
                    + _dot(b_ds.to(b_w.dtype), b_w, LOWP, F32_PRECISION)  # [BT, BC]
                p_dx = dx_ptr + i_b * stride_dxb + (P + o_t[:, None]) * stride_dxt + o_own[None, :]
                tl.store(p_dx, b_dx.to(dx_ptr.dtype.element_ty), mask=m_t[:, None] & m_own[None, :])
    tl.store(dw_ptr + i_p * stride_part + o_k[None, :] * D + o_own[:, None], b_dw, mask=m_k[None, :] & m_own[:, None])
    if i_c == 0:
        tl.store(db_ptr + i_p * stride_part + o_k, b_db, mask=m_k)
