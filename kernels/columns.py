"""Triton kernel for the analysis columns of one block: per-image means of the attention
statistics, summed over a chunk of images (``selagg_fast.ops.columns``)."""
import triton
import triton.language as tl


@triton.jit
def _patch_mean(b_v, m_patch, n_patch):
    # [BB, BT] -> [BB]: mean over the patch rows (t >= P) of each image, in float32
    return tl.sum(tl.where(m_patch, b_v, 0.0), axis=1) / n_patch


@triton.jit
def _first_row(b_v, m_first):
    # [BB, BT] -> [BB]: row 0 (the [cls] query) of each image
    return tl.sum(tl.where(m_first, b_v, 0.0), axis=1)


@triton.jit
def _store_chunk_sum(p, b_v, m_b, p_prev, g, HAS_PREV: tl.constexpr):
    # per-image float32 values [BB] -> their sum over the chunk in float64 (images past B add 0),
    # plus, in chunk 0, the running sum at p_prev
    total = tl.sum(tl.where(m_b, b_v, 0.0).to(tl.float64), axis=0)
    if HAS_PREV:
        total += tl.load(p_prev, mask=g == 0, other=0.0)
    tl.store(p, total)


@triton.jit(do_not_specialize=["B", "T", "P"])
def attention_columns_kernel(
    rows_ptr, prev_ptr, part_ptr, B, H, T, P,
    HAS_CLS: tl.constexpr, HAS_PREV: tl.constexpr, BB: tl.constexpr, BT: tl.constexpr,
):
    # Program (head h, chunk g of BB images). rows: [4, B, H, T] float32 (self, prefix, entropy,
    # [cls] attention per query row). Writes part[g, c, h] (float64): the sum over the chunk's
    # images of column c, in the recorder's column order: patch-row means of self, self adjusted
    # for the prefix mass, entropy; with a [cls] token also the patch-row mean of the [cls]
    # attention and the [cls] row's self, adjusted self, patch mass / patches and entropy.
    # HAS_PREV: chunk 0 also adds the running sums prev [C, H], so that summing part over the
    # chunks gives the new running sums (no separate accumulate launch).
    h = tl.program_id(0)
    g = tl.program_id(1)
    C: tl.constexpr = 8 if HAS_CLS else 3
    plane = B.to(tl.int64) * H * T  # elements of one statistic
    o_b = g * BB + tl.arange(0, BB)
    o_t = tl.arange(0, BT)
    m_b = o_b < B
    m = m_b[:, None] & (o_t < T)[None, :]
    m_patch = m & (o_t >= P)[None, :]
    n_patch = (T - P).to(tl.float32)
    off = (o_b.to(tl.int64)[:, None] * H + h) * T + o_t[None, :]
    b_self = tl.load(rows_ptr + off, mask=m, other=0.0)
    b_prefix = tl.load(rows_ptr + plane + off, mask=m, other=0.0)
    b_ent = tl.load(rows_ptr + 2 * plane + off, mask=m, other=0.0)
    p_out = part_ptr + g.to(tl.int64) * C * H + h
    p_prev = prev_ptr + h
    _store_chunk_sum(p_out, _patch_mean(b_self, m_patch, n_patch), m_b, p_prev, g, HAS_PREV)
    _store_chunk_sum(p_out + H, _patch_mean(b_self / (1.0 - b_prefix), m_patch, n_patch), m_b, p_prev + H,
                     g, HAS_PREV)
    _store_chunk_sum(p_out + 2 * H, _patch_mean(b_ent, m_patch, n_patch), m_b, p_prev + 2 * H, g, HAS_PREV)
    if HAS_CLS:
        b_cls = tl.load(rows_ptr + 3 * plane + off, mask=m, other=0.0)
        m_first = m & (o_t == 0)[None, :]
        self0 = _first_row(b_self, m_first)
        den0 = 1.0 - _first_row(b_prefix, m_first)  # the [cls] row's mass on patch keys
        _store_chunk_sum(p_out + 3 * H, _patch_mean(b_cls, m_patch, n_patch), m_b, p_prev + 3 * H, g, HAS_PREV)
        _store_chunk_sum(p_out + 4 * H, self0, m_b, p_prev + 4 * H, g, HAS_PREV)
        _store_chunk_sum(p_out + 5 * H, self0 / den0, m_b, p_prev + 5 * H, g, HAS_PREV)
        _store_chunk_sum(p_out + 6 * H, den0 / n_patch, m_b, p_prev + 6 * H, g, HAS_PREV)
        _store_chunk_sum(p_out + 7 * H, _first_row(b_ent, m_first), m_b, p_prev + 7 * H, g, HAS_PREV)
