"""Triton kernel for attention with per-row statistics (flash-attention style forward).

One program owns BM query rows of one (image, head) and streams the keys/values once with
an online softmax in the log2 domain (running max ``m``, sum ``l``). Besides the output it
keeps, per row, the patch-key sum ``l_p`` and ``u = sum_{j>=P} p_j (s_j - m)`` for the
entropy, and the prefix mass. Only the first key block holds prefix keys, so it is peeled
off the loop; the diagonal logit is one row-wise dot product. Maths: README.

Attention sinks: ``l_p`` and ``u`` share the running max ``m`` with the prefix keys, so when a
prefix key outscores every patch key by tens of nats the patch terms sink towards float32's
underflow (past ~80 nats the one-pass entropy is off by tenths of a nat). A tile holding such a
row (``l_p < LP_EXACT`` with patch keys present) recomputes ``l_p`` and ``u`` in a second pass
over the keys with the patch keys' own running max (logits only, no values); other tiles pay one
``[BM]`` minimum and a branch.

Logit bias (``HAS_BIAS``, BEiT's relative position bias): ``bias[h]`` ``[T, T]`` is added to the
scaled logits, in log2 units (times log2 e) like them, as one ``[BM, BN]`` tile next to each key
block's logits, in every pass (the peeled first block, the key loop, the sink pass) and on the
diagonal logit. The tile depends on the head only: every image of the batch reads the same
``H * T * T`` values, which stay in L2, so the bias adds no per-image HBM traffic. Without it the
kernel specialises to the unbiased code.
"""
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
# patch mass relative to the shared max below which the one-pass entropy loses digits (2^-60: the
# patch max sits >= 60 - log2(T) binades under m; float32 terms underflow 126 binades down)
LP_EXACT = tl.constexpr(8.673617379884035e-19)


@triton.jit
def _load(p, o_rows, o_cols, n_rows, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    # masks only where a block can overrun: the tail key block (rows), a padded head dim (cols)
    if MASK_ROWS and MASK_COLS:
        return tl.load(p, mask=(o_rows < n_rows) & (o_cols < n_cols), other=0.0)
    elif MASK_ROWS:
        return tl.load(p, mask=o_rows < n_rows, other=0.0)
    elif MASK_COLS:
        return tl.load(p, mask=o_cols < n_cols, other=0.0)
    else:
        return tl.load(p)


@triton.jit
def _qk(b_q, p_k, o_n, o_d, T, d, stride_kt, UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr,
        MASK_N: tl.constexpr, MASK_D: tl.constexpr):
    # [BM, BD] x keys [BN] -> raw logits [BM, BN] float32 (scale applied by the caller).
    b_k = _load(p_k + o_n[None, :] * stride_kt + o_d[:, None], o_n[None, :], o_d[:, None], T, d,
                MASK_N, MASK_D)  # [BD, BN]
    if UPCAST:
        return tl.dot(b_q, b_k.to(tl.float32), input_precision=F32_PRECISION)
    return tl.dot(b_q, b_k)


@triton.jit
def _bias_tile(p_b, o_m, o_n, T, stride_bt, MASK_N: tl.constexpr):
    # bias[h] rows o_m x keys o_n in log2 units, float32 [BM, BN]. Query rows past T (the last
    # row block) read row T - 1 instead of a masked load: their results are never stored.
    o_r = tl.minimum(o_m, T - 1)
    p = p_b + o_r[:, None] * stride_bt + o_n[None, :]
    if MASK_N:
        b = tl.load(p, mask=o_n[None, :] < T, other=0.0)
    else:
        b = tl.load(p)
    return b.to(tl.float32) * LOG2E


@triton.jit
def _pv(b_p, p_v, o_n, o_d, T, d, stride_vt, UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr,
        MASK_N: tl.constexpr, MASK_D: tl.constexpr):
    b_v = _load(p_v + o_n[:, None] * stride_vt + o_d[None, :], o_n[:, None], o_d[None, :], T, d,
                MASK_N, MASK_D)  # [BN, BD]
    if UPCAST:
        return tl.dot(b_p, b_v.to(tl.float32), input_precision=F32_PRECISION)
    return tl.dot(b_p.to(b_v.dtype), b_v)


@triton.jit
def _patch_block(b_q, p_k, p_v, n0, m_i, l_i, lp_i, u_i, pre_i, b_acc, o_d, T, d, stride_kt, stride_vt, qk_scale,
                 p_b, o_m, stride_bt,
                 UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr, BN: tl.constexpr,
                 MASK_N: tl.constexpr, MASK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    # one key block past the first (patch keys only): online-softmax update of every running sum.
    # The scale is folded into one multiply-add per logit, s * scale - m, shared by the exponent
    # and the entropy term; the row max is taken on the raw logits (qk_scale >= 0, see launcher).
    # A bias breaks that (the max must be the biased logits'): scale and add first.
    o_n = n0 + tl.arange(0, BN)
    b_raw = _qk(b_q, p_k, o_n, o_d, T, d, stride_kt, UPCAST, F32_PRECISION, MASK_N, MASK_D)
    if HAS_BIAS:
        b_s = b_raw * qk_scale + _bias_tile(p_b, o_m, o_n, T, stride_bt, MASK_N)
        if MASK_N:
            b_s = tl.where(o_n[None, :] < T, b_s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
    else:
        if MASK_N:
            b_raw = tl.where(o_n[None, :] < T, b_raw, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(b_raw, axis=1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    if HAS_BIAS:
        b_z = b_s - m_new[:, None]
    else:
        b_z = b_raw * qk_scale - m_new[:, None]  # log2 units, <= 0
    b_p = tl.exp2(b_z)
    r_i = tl.sum(b_p, axis=1)
    # u is kept relative to the running max: shifting the max adds (m_old - m_new) * l_p
    u_i = alpha * (u_i + (m_i - m_new) * lp_i) + tl.sum(b_p * b_z, axis=1)
    l_i = l_i * alpha + r_i
    lp_i = lp_i * alpha + r_i
    pre_i = pre_i * alpha
    b_acc = b_acc * alpha[:, None] + _pv(b_p, p_v, o_n, o_d, T, d, stride_vt, UPCAST, F32_PRECISION, MASK_N, MASK_D)
    return m_new, l_i, lp_i, u_i, pre_i, b_acc


@triton.jit
def _patch_sums_exact(b_q, p_k, o_d, T, P, d, stride_kt, qk_scale, p_b, o_m, stride_bt,
                      UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      MASK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    # l_p and u over the patch keys only, relative to their own running max (the sink pass)
    b_mx = tl.full([BM], -1.0e30, dtype=tl.float32)
    lp_i = tl.zeros([BM], dtype=tl.float32)
    u_i = tl.zeros([BM], dtype=tl.float32)
    for n0 in tl.range(0, T, BN, num_stages=1):
        o_n = n0 + tl.arange(0, BN)
        m_n = (o_n >= P) & (o_n < T)
        b_s = _qk(b_q, p_k, o_n, o_d, T, d, stride_kt, UPCAST, F32_PRECISION, True, MASK_D) * qk_scale
        if HAS_BIAS:
            b_s += _bias_tile(p_b, o_m, o_n, T, stride_bt, True)
        b_s = tl.where(m_n[None, :], b_s, -1.0e30)
        mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1))
        alpha = tl.exp2(b_mx - mx_new)
        b_z = b_s - mx_new[:, None]
        b_p = tl.where(m_n[None, :], tl.exp2(b_z), 0.0)
        u_i = alpha * (u_i + (b_mx - mx_new) * lp_i) + tl.sum(b_p * b_z, axis=1)
        lp_i = lp_i * alpha + tl.sum(b_p, axis=1)
        b_mx = mx_new
    return lp_i, u_i


@triton.jit(do_not_specialize=["T", "P", "q_start"])
def attention_stats_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, self_ptr, prefix_ptr, ent_ptr, cls_ptr, bias_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_bh, stride_bt,
    H, T, P, d, qk_scale, q_start,
    UPCAST: tl.constexpr, F32_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    PEEL_TAIL: tl.constexpr = False, MASK_D: tl.constexpr = True, HAS_BIAS: tl.constexpr = False,
):
    # bias_ptr: [H, T, T] logit bias with unit last stride when HAS_BIAS (else unused, may be None)
    # program (i_m, i_bh): query rows q_start + i_m * BM ... (the launcher may cover the last few
    # rows with a second, narrower launch: a 64-row block for ViT-B's 5 tail rows is 19% of the work)
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_m = q_start + i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = o_m < T
    m_d = o_d < d
    p_q = q_ptr + i_b * stride_qb + i_h * stride_qh
    p_k = k_ptr + i_b * stride_kb + i_h * stride_kh
    p_v = v_ptr + i_b * stride_vb + i_h * stride_vh
    p_b = bias_ptr
    if HAS_BIAS:
        p_b = bias_ptr + i_h * stride_bh
    b_q = tl.load(p_q + o_m[:, None] * stride_qt + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    # the diagonal logit s_ii, straight from the matching key rows  [BM]
    b_kd = tl.load(p_k + o_m[:, None] * stride_kt + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
    s_diag = tl.sum(b_q.to(tl.float32) * b_kd.to(tl.float32), axis=1) * qk_scale
    if HAS_BIAS:
        o_r = tl.minimum(o_m, T - 1)  # rows past T are never stored
        s_diag += tl.load(p_b + o_r * stride_bt + o_r).to(tl.float32) * LOG2E

    # first key block: the only one holding prefix keys (P <= BN is checked by the launcher)
    o_n = tl.arange(0, BN)
    b_s = _qk(b_q, p_k, o_n, o_d, T, d, stride_kt, UPCAST, F32_PRECISION, True, MASK_D) * qk_scale  # [BM, BN], log2
    if HAS_BIAS:
        b_s += _bias_tile(p_b, o_m, o_n, T, stride_bt, True)
    b_s = tl.where(o_n[None, :] < T, b_s, -1.0e30)
    m_i = tl.max(b_s, axis=1)  # [BM]
    b_p = tl.exp2(b_s - m_i[:, None])
    is_patch = o_n[None, :] >= P
    l_i = tl.sum(b_p, axis=1)
    lp_i = tl.sum(tl.where(is_patch, b_p, 0.0), axis=1)
    u_i = tl.sum(tl.where(is_patch, b_p * (b_s - m_i[:, None]), 0.0), axis=1)
    pre_i = tl.sum(tl.where(is_patch, 0.0, b_p), axis=1)
    s_cls = tl.sum(tl.where(o_n[None, :] == 0, b_s, 0.0), axis=1)
    b_acc = _pv(b_p, p_v, o_n, o_d, T, d, stride_vt, UPCAST, F32_PRECISION, True, MASK_D)  # [BM, BD]

    if PEEL_TAIL:
        # full key blocks without row masks, then the partial tail block (if any) masked
        n_full = (T // BN) * BN
        for n0 in range(BN, n_full, BN):
            m_i, l_i, lp_i, u_i, pre_i, b_acc = _patch_block(
                b_q, p_k, p_v, n0, m_i, l_i, lp_i, u_i, pre_i, b_acc, o_d, T, d, stride_kt, stride_vt, qk_scale,
                p_b, o_m, stride_bt, UPCAST, F32_PRECISION, BN, False, MASK_D, HAS_BIAS)
        if (n_full < T) & (n_full >= BN):
            m_i, l_i, lp_i, u_i, pre_i, b_acc = _patch_block(
                b_q, p_k, p_v, n_full, m_i, l_i, lp_i, u_i, pre_i, b_acc, o_d, T, d, stride_kt, stride_vt, qk_scale,
                p_b, o_m, stride_bt, UPCAST, F32_PRECISION, BN, True, MASK_D, HAS_BIAS)
    else:
        for n0 in range(BN, T, BN):
            m_i, l_i, lp_i, u_i, pre_i, b_acc = _patch_block(
                b_q, p_k, p_v, n0, m_i, l_i, lp_i, u_i, pre_i, b_acc, o_d, T, d, stride_kt, stride_vt, qk_scale,
                p_b, o_m, stride_bt, UPCAST, F32_PRECISION, BN, True, MASK_D, HAS_BIAS)

    inv_l = 1.0 / l_i
    b_out = b_acc * inv_l[:, None]
    p_o = out_ptr + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_ot + o_d[None, :]
    tl.store(p_o, b_out.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    o_row = i_bh.to(tl.int64) * T + o_m
    tl.store(self_ptr + o_row, tl.exp2(s_diag - m_i) * inv_l, mask=m_m)
    tl.store(prefix_ptr + o_row, pre_i * inv_l, mask=m_m)
    tl.store(cls_ptr + o_row, tl.exp2(s_cls - m_i) * inv_l, mask=m_m)
    # H = ln(l_p) - ln2 * u / l_p  (u in log2 units relative to m); 0 when there are no patch keys
    has_patch = lp_i > 0
    safe_lp = tl.where(has_patch, lp_i, 1.0)
    tl.store(ent_ptr + o_row, tl.where(has_patch, tl.log(safe_lp) - LN2 * u_i / safe_lp, 0.0), mask=m_m)
    # a prefix key far above every patch key (a sink): l_p, u again with the patch keys' own max
    if (tl.min(tl.where(m_m, lp_i, 1.0), axis=0) < LP_EXACT) & (P < T):
        lp_i, u_i = _patch_sums_exact(b_q, p_k, o_d, T, P, d, stride_kt, qk_scale, p_b, o_m, stride_bt,
                                      UPCAST, F32_PRECISION, BM, BN, MASK_D, HAS_BIAS)
        tl.store(ent_ptr + o_row, tl.log(lp_i) - LN2 * u_i / lp_i, mask=m_m)
