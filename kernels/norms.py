"""Triton kernel for per-token norm ratios of two [B, T, D] tensors (one read of each)."""
import triton
import triton.language as tl


@triton.jit
def token_norm_ratio_kernel(
    num_ptr, den_ptr, out_ptr, stride_nb, stride_nt, stride_db, stride_dt, T, D,
    BT: tl.constexpr, BD: tl.constexpr,
):
    # program (token tile, image): ||num_t|| / ||den_t|| for BT tokens, float32 sums of squares;
    # b_num / b_den: the [BT, BD] tiles of the two tensors
    i_t = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_t = o_t < T
    m_x = m_t[:, None] & (o_d < D)[None, :]
    b_num = tl.load(num_ptr + i_b * stride_nb + o_t[:, None] * stride_nt + o_d[None, :], mask=m_x, other=0.0)
    b_den = tl.load(den_ptr + i_b * stride_db + o_t[:, None] * stride_dt + o_d[None, :], mask=m_x, other=0.0)
    b_num = b_num.to(tl.float32)
    b_den = b_den.to(tl.float32)
    b_den_norm = tl.where(m_t, tl.sqrt(tl.sum(b_den * b_den, axis=1)), 1.0)  # [BT]; rows past T: no 0/0
    b_ratio = tl.sqrt(tl.sum(b_num * b_num, axis=1)) / b_den_norm
    tl.store(out_ptr + i_b * T + o_t, b_ratio, mask=m_t)
