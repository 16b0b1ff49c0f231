"""Triton kernels for Selective Aggregation (AbMILP pooling).

Maths (docs/semantics.md, "Selective Aggregation"; docs/kernels.md, abmilp_pool). For the N pooled tokens x_t of one image (after
the P prefix tokens) and branch k:

    s_tk = w_k . z_t + b_k        a_tk = softmax_t(s_tk)        out_k = sum_t a_tk z_t

with z_t = x_t, or, with STANDARDIZE, z_t = xh_t = (x_t - mu_t) * rstd_t, mu_t = mean_D(x_t),
rstd_t = 1 / sqrt(var_D(x_t) + eps) (biased variance: nn.LayerNorm without affine). Backward,
g_k = dL/dout_k and c_k = g_k . out_k:

    ds_tk = a_tk (g_k . z_t - c_k)     dw_k = sum_t ds_tk z_t     db_k = sum_t ds_tk = 0
    dz_t  = sum_k a_tk g_k + ds_tk w_k
    dx_t  = dz_t, or with STANDARDIZE (LayerNorm's backward)
          = rstd_t (dz_t - mean_D(dz_t) - xh_t mean_D(dz_t * xh_t)),
            mean_D(dz_t)         = sum_k a_tk gbar_k + ds_tk wbar_k      (gbar, wbar: means over D)
            mean_D(dz_t * xh_t)  = sum_k (a_tk gz_tk + ds_tk sw_tk) / D  (gz = g.xh, sw = w.xh)

so the standardised backward needs no second pass over the features; it reads the mean and rstd
the forward stored (stats [B, 2, N] float32, 8 bytes a token) instead of recomputing them. db is
zero analytically (softmax is shift invariant per branch): every kernel writes zeros for it.

K = 1 (``*_single_kernel``): one program owns one image (the backward: walks images i_p, i_p + G,
...). Tiles hold whole tokens in float32: an online softmax (running max, running sum) and the
weighted token sum stay in registers, so the forward reads the tokens once; the backward reads
the forward's scores back instead of recomputing them. STANDARDIZE centres each tile in registers
(two-pass mean and variance from the same read) and pools the centred tokens times rstd.

K > 1 ("split" kernels): one program per (image, chunk of BC features). Every program computes
the full scores (a loop over all chunks: tensor-core work is cheap here) and accumulates only its
own chunk, so the accumulator is [BC, BK]; the chunk programs of an image run side by side, so HBM
serves each token once and L2 the rest. WHOLE (BC >= D: one program an image) keeps the weights on
chip and reads each token tile once. With STANDARDIZE the dots take the raw tokens and the
statistics fold in per token: w.xh_t = rstd_t (w.x_t - mu_t sum_D w) and
sum_t p_t xh_t = sum_t (p_t rstd_t) x_t - sum_t p_t rstd_t mu_t; mu and rstd come from the same
read as the scores (WHOLE: two-pass from registers; chunked: per-chunk means and squared
deviations merged pairwise, Chan, Golub & LeVeque 1979), so no normalised copy is made.

Legend: ``o_`` offsets, ``m_`` masks, ``p_`` pointers, ``b_`` register blocks [shape]:
  b_x / b_xt     token tile [BT, BD|BC] / its transpose [BC, BT] (split: this program's features)
  b_s            scores [BT(, BK)] (split backward: without the bias, added inside the exp)
  b_max, b_sum   online softmax: running max of the scores, running sum of exp(s - b_max)
  b_scale        exp(old max - new max): rescales what was accumulated before the new max
  b_p            exp(s - b_max) of the tile;  b_a  softmax weights a = exp(s - lse)
  b_acc          running weighted token sum (divided by b_sum at the end)
  b_g, b_go      output gradient g = dL/dout (b_go: this program's feature chunk, [BK, BC])
  b_gc, b_oc     one D-chunk of g and of the float32 output, for c = g . out
  b_out          pooled output;  b_c  c = g . out per branch
  b_gz           g . z_t per token (and branch);  b_ds  dL/ds per token (and branch)
  b_dx           dz_t, then (STANDARDIZE) dx_t;  b_dw, b_db  weight / bias gradient partials
  b_mu, b_rstd   per-token mean and 1/std (STANDARDIZE; stored by the forward with STORE_STATS
                 for the backward);  b_xc  x - mu (0 on masked features);  b_xh, b_xo  x-hat and
                 x of this program's features;  b_m2, b_delta  Chan's running squared deviations
                 and chunk-mean difference;  n_seen, n_chunk  features merged so far / in a chunk
  b_wsum, b_gsum sum_D w_k, sum_D g_k (fold the mean out of the dots);  wbar, gbar  their means
  b_sw           w . x-hat (score without bias);  b_mean_dz, b_mean_dzx  mean_D(dz), mean_D(dz * x-hat)
  b_dsr          ds * rstd (the dot's weights for dw);  b_corr  sum_t p rstd mu (forward) /
                 sum_t ds rstd mu (backward): the mean's share taken out of the raw-token dots
"""
import triton
import triton.language as tl

from .dots import dot as _dot


@triton.jit
def _token_tile(p_x, o_t, m_t, stride_xt, o_d, m_d, TRANS: tl.constexpr = False):
    # tokens o_t x features o_d of one image, [BT, BD] ([BD, BT] with TRANS); masked lanes read 0
    if TRANS:
        b_x = tl.load(p_x + o_t[None, :] * stride_xt + o_d[:, None], mask=m_t[None, :] & m_d[:, None], other=0.0)
    else:
        b_x = tl.load(p_x + o_t[:, None] * stride_xt + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
    return b_x


@triton.jit
def _store_stats(stats_ptr, i_b, N, o_t, m_t, b_mu, b_rstd):
    # the tokens' mean and rstd for the backward: stats [B, 2, N] float32
    tl.store(stats_ptr + i_b * 2 * N + o_t, b_mu, mask=m_t)
    tl.store(stats_ptr + i_b * 2 * N + N + o_t, b_rstd, mask=m_t)


@triton.jit
def _load_stats(stats_ptr, i_b, N, o_t, m_t):
    # [BT] mean and rstd the forward stored (masked tokens: 0 and 1)
    b_mu = tl.load(stats_ptr + i_b * 2 * N + o_t, mask=m_t, other=0.0)
    b_rstd = tl.load(stats_ptr + i_b * 2 * N + N + o_t, mask=m_t, other=1.0)
    return b_mu, b_rstd


@triton.jit
def _centre(b_x, m_d, D, eps):
    # [BT, BD] float32 whole tokens -> x - mu (0 on masked features) [BT, BD], mu [BT], rstd [BT]
    b_mu = tl.sum(b_x, axis=1) / D
    b_xc = tl.where(m_d[None, :], b_x - b_mu[:, None], 0.0)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_xc * b_xc, axis=1) / D + eps)
    return b_xc, b_mu, b_rstd


@triton.jit
def _single_tile(b_x, o_t, m_t, m_d, b_w, bias, b_max, b_sum, b_acc, s_ptr, stats_ptr, i_b, N, D, eps,
                 STORE_SCORES: tl.constexpr, STANDARDIZE: tl.constexpr, STORE_STATS: tl.constexpr):
    # one [BT, BD] float32 tile of tokens: scores, online-softmax update, weighted sum
    if STANDARDIZE:
        b_xc, b_mu, b_rstd = _centre(b_x, m_d, D, eps)
        if STORE_STATS:
            _store_stats(stats_ptr, i_b, N, o_t, m_t, b_mu, b_rstd)
        b_s = tl.sum(b_xc * b_w[None, :], axis=1) * b_rstd + bias  # [BT]
    else:
        b_s = tl.sum(b_x * b_w[None, :], axis=1) + bias  # [BT]
    b_s = tl.where(m_t, b_s, float("-inf"))
    if STORE_SCORES:
        tl.store(s_ptr + i_b * N + o_t, b_s, mask=m_t)
    b_max_new = tl.maximum(b_max, tl.max(b_s, axis=0))
    b_scale = tl.exp(b_max - b_max_new)
    b_p = tl.exp(b_s - b_max_new)  # [BT]
    b_sum = b_sum * b_scale + tl.sum(b_p, axis=0)
    if STANDARDIZE:
        b_acc = b_acc * b_scale + tl.sum((b_p * b_rstd)[:, None] * b_xc, axis=0)
    else:
        b_acc = b_acc * b_scale + tl.sum(b_p[:, None] * b_x, axis=0)
    return b_max_new, b_sum, b_acc


@triton.jit(do_not_specialize=["P", "N"])
def abmilp_fwd_single_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, out32_ptr, lse_ptr, s_ptr, stats_ptr,
    stride_xb, stride_xt, P, N, D, eps,
    HAS_BIAS: tl.constexpr, STORE_F32: tl.constexpr, STORE_SCORES: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, PREFETCH: tl.constexpr = False, STANDARDIZE: tl.constexpr = False,
    STORE_STATS: tl.constexpr = False,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    p_x = x_ptr + i_b * stride_xb + P * stride_xt

    b_max = float("-inf")
    b_sum = 0.0
    b_acc = tl.zeros([BD], dtype=tl.float32)
    if PREFETCH:
        # the next tile's load is issued before this tile's math: two tiles in flight per program
        o_t = tl.arange(0, BT)
        b_x = _token_tile(p_x, o_t, o_t < N, stride_xt, o_d, m_d)
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            o_n = o_t + BT
            b_next = _token_tile(p_x, o_n, o_n < N, stride_xt, o_d, m_d)
            b_max, b_sum, b_acc = _single_tile(b_x.to(tl.float32), o_t, o_t < N, m_d, b_w, bias, b_max, b_sum,
                                               b_acc, s_ptr, stats_ptr, i_b, N, D, eps, STORE_SCORES, STANDARDIZE,
                                               STORE_STATS)
            b_x = b_next
    else:
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            b_x = _token_tile(p_x, o_t, m_t, stride_xt, o_d, m_d).to(tl.float32)  # [BT, BD]
            b_max, b_sum, b_acc = _single_tile(b_x, o_t, m_t, m_d, b_w, bias, b_max, b_sum, b_acc, s_ptr, stats_ptr,
                                               i_b, N, D, eps, STORE_SCORES, STANDARDIZE, STORE_STATS)

    b_out = b_acc / b_sum
    tl.store(out_ptr + i_b * D + o_d, b_out.to(out_ptr.dtype.element_ty), mask=m_d)
    if STORE_F32:
        tl.store(out32_ptr + i_b * D + o_d, b_out, mask=m_d)
    tl.store(lse_ptr + i_b, b_max + tl.log(b_sum))


@triton.jit(do_not_specialize=["B", "P", "N"])
def abmilp_bwd_single_kernel(
    x_ptr, w_ptr, s_ptr, stats_ptr, lse_ptr, out32_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
    stride_xb, stride_xt, stride_dxb, stride_dxt, stride_part, B, P, N, D,
    HAS_DX: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, STANDARDIZE: tl.constexpr = False,
):
    # Each program walks images i_p, i_p + G, ... and keeps its dw partial in registers, stored as
    # row i_p of one [G, stride_part] buffer (dw, then db = 0), so that the launcher reduces both
    # with one sum. The forward's scores s [B, N] (bias included) are read back, so a token costs
    # one reduction over D (<z, g>), not two; with STANDARDIZE also its mean and rstd.
    i_p = tl.program_id(0)
    G = tl.num_programs(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if HAS_DX:
        b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    else:
        b_w = tl.zeros([BD], dtype=tl.float32)  # unused
    if STANDARDIZE:
        wbar = tl.sum(b_w, axis=0) / D
    b_dw = tl.zeros([BD], dtype=tl.float32)
    for i_img in range(i_p, B, G):
        i_b = tl.cast(i_img, tl.int64)
        b_g = tl.load(dout_ptr + i_b * D + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
        b_out = tl.load(out32_ptr + i_b * D + o_d, mask=m_d, other=0.0)  # [BD]
        c = tl.sum(b_g * b_out, axis=0)
        if STANDARDIZE:
            gbar = tl.sum(b_g, axis=0) / D
        lse = tl.load(lse_ptr + i_b)
        p_x = x_ptr + i_b * stride_xb + P * stride_xt
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            b_x = _token_tile(p_x, o_t, m_t, stride_xt, o_d, m_d).to(tl.float32)  # [BT, BD]
            b_s = tl.load(s_ptr + i_b * N + o_t, mask=m_t, other=0.0)  # [BT]
            b_a = tl.where(m_t, tl.exp(b_s - lse), 0.0)
            if STANDARDIZE:
                b_mu, b_rstd = _load_stats(stats_ptr, i_b, N, o_t, m_t)
                b_xc = tl.where(m_d[None, :], b_x - b_mu[:, None], 0.0)
                b_gz = tl.sum(b_xc * b_g[None, :], axis=1) * b_rstd  # [BT]
                b_ds = b_a * (b_gz - c)
                b_dw += tl.sum((b_ds * b_rstd)[:, None] * b_xc, axis=0)
            else:
                b_ds = b_a * (tl.sum(b_x * b_g[None, :], axis=1) - c)  # [BT]
                b_dw += tl.sum(b_ds[:, None] * b_x, axis=0)
            if HAS_DX:
                b_dx = b_a[:, None] * b_g[None, :] + b_ds[:, None] * b_w[None, :]  # [BT, BD]
                if STANDARDIZE:
                    b_sw = tl.sum(b_xc * b_w[None, :], axis=1) * b_rstd  # w . xh, [BT]
                    b_mean_dz = b_a * gbar + b_ds * wbar
                    b_mean_dzx = (b_a * b_gz + b_ds * b_sw) / D
                    b_dx = b_rstd[:, None] * (b_dx - b_mean_dz[:, None]
                                              - (b_xc * b_rstd[:, None]) * b_mean_dzx[:, None])
                p_dx = dx_ptr + i_b * stride_dxb + (P + o_t[:, None]) * stride_dxt + o_d[None, :]
                tl.store(p_dx, b_dx.to(dx_ptr.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    tl.store(dw_ptr + i_p * stride_part + o_d, b_dw, mask=m_d)
    tl.store(db_ptr + i_p * stride_part, 0.0)


@triton.jit
def _branch_bias(bias_ptr, o_k, m_k, HAS_BIAS: tl.constexpr, BK: tl.constexpr):
    # [BK] float32: each branch's bias, 0 without one
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_k, mask=m_k, other=0.0).to(tl.float32)
    else:
        b_bias = tl.zeros([BK], dtype=tl.float32)
    return b_bias


@triton.jit
def _softmax_step(b_s, b_max, b_sum):
    # online softmax over tokens, one column per branch: scores [BT, BK], running max / sum [BK]
    # -> new max, the factor rescaling what was accumulated so far, the tile's exp, new sum
    b_max_new = tl.maximum(b_max, tl.max(b_s, axis=0))
    b_scale = tl.exp(b_max - b_max_new)
    b_p = tl.exp(b_s - b_max_new[None, :])
    return b_max_new, b_scale, b_p, b_sum * b_scale + tl.sum(b_p, axis=0)


@triton.jit
def _row_sums(p_rows, o_k, m_k, D, BC: tl.constexpr, BK: tl.constexpr):
    # [BK] float32: sum over the D features of each of the K rows at p_rows ([K, D], unit stride)
    o_e = tl.arange(0, BC)
    b_total = tl.zeros([BK], dtype=tl.float32)
    for d0 in range(0, D, BC):
        o_d = d0 + o_e
        b_rows = tl.load(p_rows + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None] & (o_d < D)[None, :],
                         other=0.0)
        b_total += tl.sum(b_rows.to(tl.float32), axis=1)
    return b_total


@triton.jit
def _split_scores(p_x, o_t, m_t, stride_xt, w_ptr, o_k, m_k, D, BC: tl.constexpr,
                  LOWP: tl.constexpr, F32_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    # [BT, BK] scores x_t . w_k over all of D, one BC-wide chunk at a time
    o_e = tl.arange(0, BC)
    b_s = tl.zeros([BT, BK], dtype=tl.float32)
    for d0 in range(0, D, BC):
        o_d = d0 + o_e
        m_d = o_d < D
        b_x = _token_tile(p_x, o_t, m_t, stride_xt, o_d, m_d)
        b_wt = tl.load(w_ptr + o_k[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_k[None, :], other=0.0)
        b_s += _dot(b_x, b_wt, LOWP, F32_PRECISION)
    return b_s


@triton.jit
def _split_scores_stats(p_x, o_t, m_t, stride_xt, w_ptr, o_k, m_k, D, eps, BC: tl.constexpr,
                        LOWP: tl.constexpr, F32_PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
    # _split_scores plus each token's mean and rstd [BT] from the same chunk reads: per chunk the
    # mean and squared deviations (two-pass in registers), merged into the running ones (Chan et al.)
    o_e = tl.arange(0, BC)
    b_s = tl.zeros([BT, BK], dtype=tl.float32)
    b_mu = tl.zeros([BT], dtype=tl.float32)
    b_m2 = tl.zeros([BT], dtype=tl.float32)
    for d0 in range(0, D, BC):
        o_d = d0 + o_e
        m_d = o_d < D
        b_x = _token_tile(p_x, o_t, m_t, stride_xt, o_d, m_d)
        b_wt = tl.load(w_ptr + o_k[None, :] * D + o_d[:, None], mask=m_d[:, None] & m_k[None, :], other=0.0)
        b_s += _dot(b_x, b_wt, LOWP, F32_PRECISION)
        n_seen = d0 * 1.0
        n_chunk = tl.minimum(D - d0, BC) * 1.0
        b_xc, b_mu_chunk, _ = _centre(b_x.to(tl.float32), m_d, n_chunk, 1.0)
        b_delta = b_mu_chunk - b_mu
        b_mu += b_delta * (n_chunk / (n_seen + n_chunk))
        b_m2 += tl.sum(b_xc * b_xc, axis=1) + b_delta * b_delta * (n_seen * n_chunk / (n_seen + n_chunk))
    return b_s, b_mu, 1.0 / tl.sqrt(b_m2 / D + eps)


@triton.jit(do_not_specialize=["P", "N"])
def abmilp_fwd_split_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, out32_ptr, lse_ptr, s_ptr, stats_ptr,
    stride_xb, stride_xt, P, N, D, K, eps,
    HAS_BIAS: tl.constexpr, STORE_F32: tl.constexpr, STORE_SCORES: tl.constexpr,
    LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, WHOLE: tl.constexpr = False,
    STANDARDIZE: tl.constexpr = False, STORE_STATS: tl.constexpr = False,
):
    # Program pid = image * NSPLIT + chunk: the chunk programs of one image are neighbours in
    # launch order, so they stream the image's tokens at the same time (L2 reuse).
    # WHOLE (the launcher sets it only with BC >= D: one program an image): the weights are
    # loaded once, before the token loop, and each token tile is read once and feeds both dots
    # (scores x.w, and the weighted sum through its transpose).
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

    b_max = tl.full([BK], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([BK], dtype=tl.float32)
    b_acc = tl.zeros([BC, BK], dtype=tl.float32)  # this chunk of the K weighted sums, transposed
    if WHOLE:
        b_w = tl.load(w_ptr + o_k[None, :] * D + o_own[:, None], mask=m_own[:, None] & m_k[None, :], other=0.0)
    if STANDARDIZE:
        b_wsum = _row_sums(w_ptr, o_k, m_k, D, BC, BK)
        b_corr = tl.zeros([BK], dtype=tl.float32)
    for t0 in range(0, N, BT):
        o_t = t0 + tl.arange(0, BT)
        m_t = o_t < N
        if WHOLE:
            b_x = _token_tile(p_x, o_t, m_t, stride_xt, o_own, m_own)
            b_s = _dot(b_x, b_w, LOWP, F32_PRECISION)
            if STANDARDIZE:
                _, b_mu, b_rstd = _centre(b_x.to(tl.float32), m_own, D, eps)
        elif STANDARDIZE:
            b_s, b_mu, b_rstd = _split_scores_stats(p_x, o_t, m_t, stride_xt, w_ptr, o_k, m_k, D, eps, BC, LOWP,
                                                    F32_PRECISION, BT, BK)
        else:
            b_s = _split_scores(p_x, o_t, m_t, stride_xt, w_ptr, o_k, m_k, D, BC, LOWP, F32_PRECISION, BT, BK)
        if STANDARDIZE:
            if STORE_STATS:
                if i_c == 0:
                    _store_stats(stats_ptr, i_b, N, o_t, m_t, b_mu, b_rstd)
            b_s = (b_s - b_mu[:, None] * b_wsum[None, :]) * b_rstd[:, None]
        b_s = tl.where(m_t[:, None], b_s + b_bias[None, :], float("-inf"))  # [BT, BK]
        if STORE_SCORES:
            if i_c == 0:
                tl.store(s_ptr + i_b * K * N + o_k[None, :] * N + o_t[:, None], b_s,
                         mask=m_t[:, None] & m_k[None, :])
        b_max_new, b_scale, b_p, b_sum = _softmax_step(b_s, b_max, b_sum)  # b_p [BT, BK]
        if WHOLE:
            b_xt = tl.trans(b_x)
        else:
            # this program's features of the tile, [BC, BT]: just read by the score loop (L1)
            b_xt = _token_tile(p_x, o_t, m_t, stride_xt, o_own, m_own, TRANS=True)
        if not LOWP:
            b_xt = b_xt.to(tl.float32)
        if STANDARDIZE:  # the mean's share from the same (16-bit on the GPU) weights the dot sees
            b_p = (b_p * b_rstd[:, None]).to(b_xt.dtype)
            b_corr = b_corr * b_scale + tl.sum(b_p.to(tl.float32) * b_mu[:, None], axis=0)
        b_acc = b_acc * b_scale[None, :] + _dot(b_xt, b_p.to(b_xt.dtype), LOWP, F32_PRECISION)  # [BC, BK]
        b_max = b_max_new

    if STANDARDIZE:
        b_acc -= b_corr[None, :]
    b_out = b_acc / b_sum[None, :]
    o_out = i_b * K * D + o_k[None, :] * D + o_own[:, None]
    m_out = m_k[None, :] & m_own[:, None]
    tl.store(out_ptr + o_out, b_out.to(out_ptr.dtype.element_ty), mask=m_out)
    if STORE_F32:
        tl.store(out32_ptr + o_out, b_out, mask=m_out)
    if i_c == 0:
        tl.store(lse_ptr + i_b * K + o_k, b_max + tl.log(b_sum), mask=m_k)


@triton.jit(do_not_specialize=["B", "P", "N"])
def abmilp_bwd_split_kernel(
    x_ptr, w_ptr, bias_ptr, stats_ptr, lse_ptr, out32_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
    stride_xb, stride_xt, stride_dxb, stride_dxt, stride_part, B, P, N, D, K,
    HAS_BIAS: tl.constexpr, HAS_DX: tl.constexpr,
    LOWP: tl.constexpr, F32_PRECISION: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, WHOLE: tl.constexpr = False,
    STANDARDIZE: tl.constexpr = False,
):
    # Program pid = i_p * NSPLIT + chunk walks images i_p, i_p + G, ... and keeps the dw
    # partial of its chunk in registers; every chunk program recomputes the full scores.
    # WHOLE (only with BC >= D, as in the forward): each token tile is read once and feeds the
    # scores, <x, g> and dw through the on-chip weights, output gradient and its transpose.
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
    if STANDARDIZE:
        b_wsum = _row_sums(w_ptr, o_k, m_k, D, BC, BK)
        b_corr = tl.zeros([BK], dtype=tl.float32)
    b_dw = tl.zeros([BC, BK], dtype=tl.float32)
    b_db = tl.zeros([BK], dtype=tl.float32)
    for i_img in range(i_p, B, G):
        i_b = tl.cast(i_img, tl.int64)
        p_g = dout_ptr + i_b * K * D
        # c_k = <g_k, out_k> over all of D (and sum_D g_k for STANDARDIZE)
        b_c = tl.zeros([BK], dtype=tl.float32)
        b_gsum = tl.zeros([BK], dtype=tl.float32)
        for d0 in range(0, D, BC):
            o_d = d0 + o_e
            m_kd = m_k[:, None] & (o_d < D)[None, :]
            b_gc = tl.load(p_g + o_k[:, None] * D + o_d[None, :], mask=m_kd, other=0.0).to(tl.float32)
            b_oc = tl.load(out32_ptr + i_b * K * D + o_k[:, None] * D + o_d[None, :], mask=m_kd, other=0.0)
            b_c += tl.sum(b_gc * b_oc, axis=1)
            if STANDARDIZE:
                b_gsum += tl.sum(b_gc, axis=1)
        b_lse = tl.load(lse_ptr + i_b * K + o_k, mask=m_k, other=0.0)
        b_go = tl.load(p_g + o_k[:, None] * D + o_own[None, :], mask=m_ko, other=0.0)  # [BK, BC]
        if not LOWP:
            b_go = b_go.to(tl.float32)
        p_x = x_ptr + i_b * stride_xb + P * stride_xt
        for t0 in range(0, N, BT):
            o_t = t0 + tl.arange(0, BT)
            m_t = o_t < N
            # scores (without the bias) and <x_t, g_k> over all of D, [BT, BK] each
            if WHOLE:
                b_x = _token_tile(p_x, o_t, m_t, stride_xt, o_own, m_own)
                b_s = _dot(b_x, tl.trans(b_w), LOWP, F32_PRECISION)
                b_gz = _dot(b_x, tl.trans(b_go), LOWP, F32_PRECISION)
            else:
                b_s = _split_scores(p_x, o_t, m_t, stride_xt, w_ptr, o_k, m_k, D, BC, LOWP, F32_PRECISION, BT, BK)
                b_gz = _split_scores(p_x, o_t, m_t, stride_xt, p_g, o_k, m_k, D, BC, LOWP, F32_PRECISION, BT, BK)
            if STANDARDIZE:  # w . xh and g . xh, with the forward's statistics
                b_mu, b_rstd = _load_stats(stats_ptr, i_b, N, o_t, m_t)
                b_s = (b_s - b_mu[:, None] * b_wsum[None, :]) * b_rstd[:, None]
                b_gz = (b_gz - b_mu[:, None] * b_gsum[None, :]) * b_rstd[:, None]
            b_a = tl.where(m_t[:, None] & m_k[None, :], tl.exp(b_s + b_bias[None, :] - b_lse[None, :]), 0.0)
            b_ds = b_a * (b_gz - b_c[None, :])  # d loss / d score
            if WHOLE:
                b_xt = tl.trans(b_x)
            else:
                b_xt = _token_tile(p_x, o_t, m_t, stride_xt, o_own, m_own, TRANS=True)  # [BC, BT]
            if not LOWP:
                b_xt = b_xt.to(tl.float32)
            if STANDARDIZE:  # the mean's share from the same (16-bit on the GPU) values the dot sees
                b_dsr = (b_ds * b_rstd[:, None]).to(b_xt.dtype)
                b_corr += tl.sum(b_dsr.to(tl.float32) * b_mu[:, None], axis=0)
                b_dw += _dot(b_xt, b_dsr, LOWP, F32_PRECISION)  # [BC, BK]
            else:
                b_dw += _dot(b_xt, b_ds.to(b_xt.dtype), LOWP, F32_PRECISION)  # [BC, BK]
            b_db += tl.sum(b_ds, axis=0)  # zero analytically: only its rounding noise (see the store)
            if HAS_DX:
                b_dx = _dot(b_a.to(b_go.dtype), b_go, LOWP, F32_PRECISION) \
                    + _dot(b_ds.to(b_w.dtype), b_w, LOWP, F32_PRECISION)  # dz, [BT, BC]
                if STANDARDIZE:
                    b_mean_dz = tl.sum(b_a * b_gsum[None, :] + b_ds * b_wsum[None, :], axis=1) / D  # [BT]
                    b_mean_dzx = tl.sum(b_a * b_gz + b_ds * b_s, axis=1) / D
                    if WHOLE:
                        b_xo = b_x.to(tl.float32)
                    else:  # this program's features of the tile, [BT, BC] (L1)
                        b_xo = _token_tile(p_x, o_t, m_t, stride_xt, o_own, m_own).to(tl.float32)
                    b_xh = (b_xo - b_mu[:, None]) * b_rstd[:, None]
                    b_dx = b_rstd[:, None] * (b_dx - b_mean_dz[:, None] - b_xh * b_mean_dzx[:, None])
                p_dx = dx_ptr + i_b * stride_dxb + (P + o_t[:, None]) * stride_dxt + o_own[None, :]
                tl.store(p_dx, b_dx.to(dx_ptr.dtype.element_ty), mask=m_t[:, None] & m_own[None, :])
    if STANDARDIZE:
        b_dw -= b_corr[None, :]
    tl.store(dw_ptr + i_p * stride_part + o_k[None, :] * D + o_own[:, None], b_dw, mask=m_k[None, :] & m_own[:, None])
    if i_c == 0:
        # db is stored as exact zeros (times 0: NaN / inf inputs still show). The accumulation stays
        # because without it ptxas allocates this kernel worse on sm_90 (bench/compile_report.py).
        tl.store(db_ptr + i_p * stride_part + o_k, b_db * 0.0, mask=m_k)
