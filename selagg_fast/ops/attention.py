"""Attention with per-row statistics: launcher, autograd Function, public op."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from ..kernels.attention import attention_stats_fwd_kernel
from ..reference import AttentionStats, attention_with_stats_reference
from . import _dispatch
from ._dispatch import (
    MIN_DOT_DIM,
    LaunchConfig,
    check_float,
    check_num_prefix_tokens,
    check_same_device,
    choose_backend,
    dot_dim,
    interpreter_active,
    launcher,
    without,
)

OP = "attention_with_stats"
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


MIN_BN = 32  # every config's key block holds all prefix tokens when P <= MIN_BN
KEY = ["BD", "UPCAST", "T", "HAS_BIAS"]  # what the tuned launches are tuned for
# Tiles x warps x stages, each with the key loop as one masked loop or with the tail block peeled
# off (full blocks unmasked): the tuner keeps whichever is faster for the sequence length.
_CONFIGS: list = [dict(BM=bm, BN=bn, num_warps=w, num_stages=s, PEEL_TAIL=peel)
            for bm, bn, w, s in ((64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2))
            for peel in (False, True)]
_launch = launcher(attention_stats_fwd_kernel, _CONFIGS, key=KEY)
# Query tail: T = 197 in 64-row blocks is 3 full blocks and one of 5 rows that costs as much as a
# full one (a quarter of the work for 2.5% of the rows). When the last block would be at most half
# full, full 64-row blocks run in one launch and the remaining rows in a second, narrower one.
SPLIT_BM = 64
_launch_full_blocks = launcher(attention_stats_fwd_kernel, [c for c in _CONFIGS if c["BM"] == SPLIT_BM], key=KEY)
# the tail launch tunes its key block and warps per row-block height (16 or 32 rows)
_TAIL_LAUNCHERS = {bm: launcher(attention_stats_fwd_kernel,
                                [dict(BM=bm, BN=bn, num_warps=w, num_stages=2, PEEL_TAIL=False)
                                 for bn in (32, 64) for w in (2, 4)], key=KEY)
                   for bm in (MIN_DOT_DIM, 2 * MIN_DOT_DIM)}

# fp32 inputs use 3xTF32 dots (float32-accurate), whose operands need more shared memory
_F32_CONFIG: LaunchConfig = dict(BM=32, BN=32, num_warps=4, num_stages=1)
_launch_f32 = launcher(attention_stats_fwd_kernel, [_F32_CONFIG], key=["BD", "HAS_BIAS"])


def _launch_tail_rows(grid, device, cfg: LaunchConfig, **kwargs) -> None:
    _TAIL_LAUNCHERS[cfg["BM"]](grid, device, cfg, **kwargs)


def _launch_config(d: int, fp32: bool = False) -> LaunchConfig:
    """The untuned launch: 64-row blocks (SPLIT_BM), key blocks and stages that fit the head dim
    in shared memory (BD, the padded head dim, is passed to the kernel directly)."""
    BD = dot_dim(d)
    if fp32:
        return dict(_F32_CONFIG, BD=BD)
    return dict(BM=64, BN=32 if BD > 64 else 64, BD=BD, num_warps=4, num_stages=3 if BD <= 64 else 2)


def _tail_rows_config(rows: int, BD: int) -> LaunchConfig:
    """The second launch's untuned config for the last ``rows`` (<= half a block, <= 32) query rows."""
    return dict(BM=dot_dim(rows), BN=32 if BD > 64 else 64, num_warps=4, num_stages=2, PEEL_TAIL=False)


def _unsupported_reason(q: torch.Tensor, num_prefix_tokens: int, scale: float) -> Optional[str]:
    d = q.shape[-1]
    if scale <= 0:  # the kernel takes row maxima of the unscaled logits and masks them unscaled
        return f"scale {scale} <= 0"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    if num_prefix_tokens > MIN_BN:
        return f"{num_prefix_tokens} prefix tokens exceed one key block ({MIN_BN})"
    return None


def _log2_bias(bias: torch.Tensor, T: int) -> torch.Tensor:
    """The kernel's view of a [H, T, T] logit bias: float32 times log2(e), zero-padded to whole row
    blocks (BM <= 128) and key blocks (BN <= 64). Every tile is then one unmasked load with
    16-byte-aligned rows (T = 197 rows are 788 bytes apart: scalar loads otherwise)."""
    rows, cols = triton.cdiv(T, 128) * 128, triton.cdiv(T, 64) * 64
    return F.pad(bias.float(), (0, cols - T, 0, rows - T)).mul_(LOG2E)


def attention_stats_fwd(q, k, v, scale: float, P: int, bias: Optional[torch.Tensor] = None):
    """Launch the forward. Returns out [B, H, T, d] (a view of a [B, T, H, d] buffer) and the statistics."""
    B, H, T, d = q.shape
    if bias is not None:
        bias = _log2_bias(bias, T)
    out = _dispatch.empty((B, T, H, d), q.device, q.dtype).transpose(1, 2)
    # one [4, B, H, T] buffer: record_attention_stats reduces all four rows in one pass
    stats = _dispatch.empty((4, B, H, T), q.device, torch.float32).unbind(0)
    fp32 = q.dtype == torch.float32
    cfg = _launch_config(d, fp32)
    BD, cfg = cfg["BD"], without(cfg, ("BD",))
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out,
        self_ptr=stats[0], prefix_ptr=stats[1], ent_ptr=stats[2], cls_ptr=stats[3], bias_ptr=bias,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qt=q.stride(2),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kt=k.stride(2),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vt=v.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_ot=out.stride(2),
        stride_bh=bias.stride(0) if bias is not None else 0, stride_bt=bias.stride(1) if bias is not None else 0,
        HAS_BIAS=bias is not None,
        H=H, T=T, P=P, d=d, qk_scale=scale * LOG2E, BD=BD,
        MASK_D=BD != d,  # a power-of-two head dim needs no column mask
        # the interpreter computes bf16/fp16 dots on raw bits: upcast there, never on a GPU
        UPCAST=interpreter_active() or q.dtype == torch.float32,
        F32_PRECISION="ieee" if interpreter_active() else "tf32x3",
    )
    # the untuned block height (64: SPLIT_BM, the tuned list's); a patched one (the sweep's) splits alike
    block = cfg["BM"]
    full_rows, tail_rows = divmod(T, block)
    full_rows *= block
    if fp32 or not 0 < tail_rows <= min(block // 2, 32):  # one launch (fp32 tiles are 32 rows already)
        (_launch_f32 if fp32 else _launch)(
            lambda meta: (triton.cdiv(T, meta["BM"]), B * H), q.device, cfg, q_start=0, **args)
    else:
        if full_rows:
            _launch_full_blocks(lambda meta: (full_rows // meta["BM"], B * H), q.device, cfg, q_start=0, **args)
        _launch_tail_rows((1, B * H), q.device, _tail_rows_config(tail_rows, BD), q_start=full_rows, **args)
    return out, AttentionStats(*stats)


class AttentionWithStatsFunction(torch.autograd.Function):
    """Forward: the streaming kernel. Backward: recomputes through SDPA, the bias as its float
    ``attn_mask`` (statistics get no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, num_prefix_tokens, bias=None):
        out, stats = attention_stats_fwd(q, k, v, scale, num_prefix_tokens, bias)
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale = scale
        ctx.mark_non_differentiable(*stats)
        ctx.set_materialize_grads(False)  # no zero-filled [B, H, T] gradients for the statistics
        return (out, *stats)

    @staticmethod
    def backward(ctx, dout, *_dstats):
        q, k, v, bias = ctx.saved_tensors
        if dout is None:
            return None, None, None, None, None, None
        with torch.enable_grad():
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            inputs = [qg, kg, vg]
            mask = None
            if bias is not None:
                # SDPA wants the mask in the query dtype; [1, H, T, T] broadcasts over the batch
                mask = bias.detach().to(q.dtype).requires_grad_(ctx.needs_input_grad[5])
                if ctx.needs_input_grad[5]:
                    inputs.append(mask)
                mask = mask[None]
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=ctx.scale)
            grads = torch.autograd.grad(out, inputs, dout)
        dbias = grads[3].to(bias.dtype) if len(grads) == 4 else None
        return grads[0], grads[1], grads[2], None, None, dbias


def _check_bias(bias, q):
    if bias is None:
        return
    check_float(OP, "bias", bias)
    B, H, T, _ = q.shape
    if tuple(bias.shape) != (H, T, T):
        raise ValueError(f"{OP}: bias must be [H, T, T] = [{H}, {T}, {T}] (one per head, shared by the batch), "
                         f"got shape {tuple(bias.shape)}")
    check_same_device(OP, q=q, bias=bias)


def _check_inputs(q, k, v, num_prefix_tokens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be [B, H, T, d], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{OP}: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(OP, q=q, k=k, v=v)
    T = q.shape[2]
    check_num_prefix_tokens(OP, num_prefix_tokens)
    if num_prefix_tokens > T:
        raise ValueError(f"{OP}: num_prefix_tokens={num_prefix_tokens} exceeds the sequence length T={T}")
    if T == 0:
        raise ValueError(f"{OP}: T must be at least 1")


def attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    num_prefix_tokens: int = 1,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """``softmax(q k^T * scale + bias[h]) v`` plus per-row attention statistics, without attention maps.

    Args:
        q, k, v: ``[B, H, T, d]`` (float32, bfloat16 or float16, one dtype); any strides
            with a unit last stride (e.g. timm's ``qkv.unbind``) are read in place.
        scale: logit scale, default ``d ** -0.5``.
        num_prefix_tokens: P, the leading [cls]/register tokens.
        bias: optional additive logit bias ``[H, T, T]``, one per head and the same for every
            image (BEiT's relative position bias); float32, bfloat16 or float16, read as float32.
            The statistics are those of the biased attention. It gets a gradient when it
            requires one (through SDPA's float ``attn_mask``, in ``q.dtype``).
        backend: "auto", "triton" or "reference" (see ``abmilp_pool``).

    Returns:
        ``(out, stats)``: ``out`` ``[B, H, T, d]`` in ``q.dtype`` (SDPA semantics), and
        :class:`AttentionStats` of float32 ``[B, H, T]`` tensors ``self_attn`` (A_ii),
        ``prefix_attn`` (sum_{j<P} A_ij), ``patch_entropy`` (nats, over keys j >= P
        renormalised; all keys when P = 0; exact also when a prefix key outscores every patch
        key by hundreds of nats, an attention sink) and ``cls_attn`` (A_i0). ``out`` is
        differentiable (backward recomputes via SDPA); the statistics are not.
    """
    _check_inputs(q, k, v, num_prefix_tokens)
    _check_bias(bias, q)
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{OP}: scale must be finite, got {scale}")
    path = choose_backend(OP, backend, q.device, _unsupported_reason(q, num_prefix_tokens, scale))
    if path == "reference" or q.shape[0] * q.shape[1] == 0:
        with torch.autocast(q.device.type, enabled=False):
            return attention_with_stats_reference(q, k, v, scale=scale, num_prefix_tokens=num_prefix_tokens,
                                                  bias=bias)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        out, *stats = AttentionWithStatsFunction.apply(q, k, v, scale, num_prefix_tokens, bias)
        return out, AttentionStats(*stats)
    return attention_stats_fwd(q, k, v, scale, num_prefix_tokens, bias)  # analysis: no autograd bookkeeping
