"""Softmax pooling over given scores: launchers, autograd Function, public op."""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from ..kernels.softmax_pool import softmax_pool_bwd_kernel, softmax_pool_fwd_kernel
from ..reference import softmax_pool_reference
from . import _dispatch
from ._dispatch import (
    ACC_ELEMENTS,
    MAX_TILE_ELEMENTS,
    MIN_DOT_DIM,
    TILE_ELEMENTS,
    LaunchConfig,
    check_float,
    check_num_prefix_tokens,
    check_same_device,
    choose_backend,
    config_list,
    dot_dim,
    dot_settings,
    launcher,
    next_pow2,
    persistent_programs,
    without,
)

OP = "softmax_pool"
MAX_K = 64  # branches: the K > 1 kernels keep a [BC, BK] accumulator and [BC, BK] tiles of dout
MAX_BD = MAX_TILE_ELEMENTS  # the widest token any config tiles
# scores read per step of the forward's log-sum-exp pass ([BK, BN] tile)
SCORE_TILE = 4096
# K = 1 is pure bandwidth: a program pools at most SINGLE_CHUNK features of an image, with 8
# warps once its chunk is wider than SINGLE_FOUR_WARP_CHUNK
SINGLE_CHUNK = 1024
SINGLE_FOUR_WARP_CHUNK = 512
# K > 1 default chunk widths: float32 operands (3xTF32 splits each into two) need narrower ones
SPLIT_CHUNK, SPLIT_CHUNK_F32 = 128, 64
TOKENS_A_STEP = 16  # tokens a step of the defaults (and the backward's token split granule)
# the entries every candidate of a launcher shares: passed to the kernel directly
FIXED = ("BK", "BN")


def _launch_config(D: int, K: int, fp32: bool = False) -> LaunchConfig:
    """Untuned defaults. K = 1 is pure bandwidth (as abmilp's K = 1 kernel): a program per image
    and up to SINGLE_CHUNK features, ~TILE_ELEMENTS tiles. K > 1: [BC, BK] tiles for tl.dot
    within ACC_ELEMENTS."""
    BD = dot_dim(D)
    if K == 1:
        BC = min(BD, SINGLE_CHUNK)
        return dict(BK=1, BN=SCORE_TILE, BC=BC, BT=max(1, min(TOKENS_A_STEP, TILE_ELEMENTS // BC)),
                    num_warps=4 if BC <= SINGLE_FOUR_WARP_CHUNK else 8)
    BK = dot_dim(K)
    return dict(BK=BK, BN=max(MIN_DOT_DIM, SCORE_TILE // BK),
                BC=max(MIN_DOT_DIM, min(BD, SPLIT_CHUNK_F32 if fp32 else SPLIT_CHUNK, ACC_ELEMENTS // BK)),
                BT=TOKENS_A_STEP, num_warps=4)


def _chunks(BD: int, shapes) -> list:
    """Candidates from (feature chunk, tokens a step, warps) triples, the chunk clipped to BD."""
    return [dict(BC=min(bc, BD), BT=bt, num_warps=w) for bc, bt, w in shapes]


def _fwd_configs(D: int, K: int, fp32: bool) -> list:
    """Forward autotune list: the default, then wider / narrower feature chunks (more programs an
    image share its tokens through L2) and more tokens a step, each tile within MAX_TILE_ELEMENTS."""
    default = _launch_config(D, K, fp32)
    BD, BK = dot_dim(D), default["BK"]
    if K == 1:
        shapes = ((256, 16, 4), (512, 16, 4), (1024, 8, 4), (1024, 16, 8), (BD, 4, 4), (BD, 8, 8))
    else:
        shapes = ((32, 16, 4), (64, 32, 4)) if fp32 else ((128, 32, 4), (256, 16, 4), (256, 32, 8))
    return config_list(without(default, FIXED), *_chunks(BD, shapes),
                       fits=lambda c: c["BC"] * max(c["BT"], BK) <= MAX_TILE_ELEMENTS)


def _bwd_configs(D: int, K: int, fp32: bool) -> list:
    """Backward autotune list: feature chunk x tokens a step x warps (sm_90 compiles without
    spills, bench/compile_cases_softmax_pool.py; float32 dots need narrow chunks)."""
    default = _launch_config(D, K, fp32)
    BD = dot_dim(D)
    if K == 1:
        shapes = ((min(BD, SINGLE_CHUNK), 4, 4), (256, 16, 4), (512, 8, 4))
    else:
        shapes = ((32, 16, 4), (64, 32, 4)) if fp32 else ((64, 16, 4), (128, 32, 4), (256, 16, 8))
    return config_list(without(default, FIXED), *_chunks(BD, shapes))


@functools.lru_cache(maxsize=None)
def _launcher(kernel, D: int, K: int, fp32: bool, backward: bool):
    configs = (_bwd_configs if backward else _fwd_configs)(D, K, fp32)
    return launcher(kernel, configs, key=["D", "K"])


def softmax_pool_fwd(scores, x, P, store_f32):
    """Launch the forward. scores [B, K, N] contiguous, x [B, T, D] (unit last stride).

    Returns out [B, K, D] in x.dtype, out32 (float32 output or None), lse [B, K] float32."""
    B, T, D = x.shape
    K, N = scores.shape[1], scores.shape[2]
    out = _dispatch.empty((B, K, D), x.device, x.dtype)
    out32 = out if x.dtype == torch.float32 else (
        _dispatch.empty((B, K, D), x.device, torch.float32) if store_f32 else None)
    lse = _dispatch.empty((B, K), x.device, torch.float32)
    fp32 = x.dtype == torch.float32
    cfg = _launch_config(D, K, fp32)
    _launcher(softmax_pool_fwd_kernel, D, K, fp32, False)(
        lambda meta: (B * triton.cdiv(D, meta["BC"]),), x.device, without(cfg, FIXED),
        s_ptr=scores, x_ptr=x, out_ptr=out, out32_ptr=out32 if out32 is not None else out, lse_ptr=lse,
        stride_xb=x.stride(0), stride_xt=x.stride(1), P=P, N=N, D=D, K=K,
        STORE_F32=out32 is not None and out32 is not out, SINGLE=K == 1, BK=cfg["BK"], BN=cfg["BN"],
        **dot_settings(x.dtype))
    return out, out32, lse


def softmax_pool_bwd(scores, x, P, lse, out32, dout, need_ds, need_dx):
    """Launch the backward. dout [B, K, D] in x.dtype, contiguous.

    Returns dscores [B, K, N] float32 (or None) and dx like x (or None)."""
    B, T, D = x.shape
    K, N = scores.shape[1], scores.shape[2]
    ds = _dispatch.empty((B, K, N), x.device, torch.float32) if need_ds else None
    dx = None
    if need_dx:
        dx = _dispatch.empty(x.shape, x.device, x.dtype)
        dx[:, :P].zero_()
    fp32 = x.dtype == torch.float32
    cfg = _launch_config(D, K, fp32)

    # token splits an image: enough programs to fill the GPU (4 an SM); any NTS >= 1 covers every tile
    NTS = max(1, min(triton.cdiv(N, TOKENS_A_STEP), triton.cdiv(persistent_programs(x.device, 1 << 30), B)))
    _launcher(softmax_pool_bwd_kernel, D, K, fp32, True)(
        (B * NTS,), x.device, without(cfg, FIXED),
        s_ptr=scores, x_ptr=x, lse_ptr=lse, out32_ptr=out32, dout_ptr=dout,
        ds_ptr=ds if ds is not None else lse, dx_ptr=dx if dx is not None else x,
        stride_xb=x.stride(0), stride_xt=x.stride(1),
        stride_dxb=dx.stride(0) if dx is not None else 0, stride_dxt=dx.stride(1) if dx is not None else 0,
        P=P, N=N, D=D, K=K, NTS=NTS, HAS_DS=need_ds, HAS_DX=need_dx, SINGLE=K == 1, BK=cfg["BK"],
        **dot_settings(x.dtype))
    return ds, dx


def _unsupported_reason(scores: torch.Tensor, x: torch.Tensor) -> Optional[str]:
    K = 1 if scores.dim() == 2 else scores.shape[1]
    if K > MAX_K:
        return f"K={K} branches exceed {MAX_K}"
    if next_pow2(x.shape[-1]) > MAX_BD:
        return f"token dim D={x.shape[-1]} exceeds {MAX_BD}"
    return None


class SoftmaxPoolFunction(torch.autograd.Function):
    """Fused softmax pooling with K branches. Saves the scores, x, the log-sum-exp [B, K] and
    the float32 output [B, K, D] (for g . out); never the weights."""

    @staticmethod
    def forward(ctx, scores, x, num_prefix_tokens):
        out, out32, lse = softmax_pool_fwd(scores, x, num_prefix_tokens, True)
        ctx.save_for_backward(scores, x, lse, out32)
        ctx.num_prefix_tokens = num_prefix_tokens
        ctx.set_materialize_grads(False)  # lse gets no gradient: no zero tensor made for it
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        scores, x, lse, out32 = ctx.saved_tensors
        need_ds, need_dx = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ds, dx = softmax_pool_bwd(scores, x, ctx.num_prefix_tokens, lse, out32, dout.to(x.dtype).contiguous(),
                                  need_ds, need_dx)
        return (ds.to(scores.dtype) if ds is not None else None), dx, None


def _check_inputs(scores, x, num_prefix_tokens):
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{OP}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{OP}: scores must have a floating-point dtype, got {scores.dtype}")
    check_float(OP, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{OP}: x must be [B, T, D], got shape {tuple(x.shape)}")
    if scores.dim() not in (2, 3):
        raise ValueError(f"{OP}: scores must be [B, N] or [B, K, N], got shape {tuple(scores.shape)}")
    check_num_prefix_tokens(OP, num_prefix_tokens)
    B, T, _ = x.shape
    N = T - num_prefix_tokens
    if N <= 0:
        raise ValueError(f"{OP}: no tokens left to pool: T={T} with num_prefix_tokens={num_prefix_tokens}")
    if scores.shape[0] != B:
        raise ValueError(f"{OP}: scores have B={scores.shape[0]} images but x has B={B}")
    if scores.shape[-1] != N:
        raise ValueError(f"{OP}: scores have N={scores.shape[-1]} tokens but x has N=T-num_prefix_tokens="
                         f"{T}-{num_prefix_tokens}={N}")
    if scores.dim() == 3 and scores.shape[1] == 0:
        raise ValueError(f"{OP}: scores have K=0 branches")
    check_same_device(OP, scores=scores, x=x)


def softmax_pool(
    scores: torch.Tensor,
    x: torch.Tensor,
    *,
    num_prefix_tokens: int = 0,
    return_weights: bool = False,
    backend: str = "auto",
):
    """Softmax over given scores, then the weighted sum of the tokens (K branches, one read of x).

    Args:
        scores: ``[B, N]`` or ``[B, K, N]`` logits over the pooled tokens, any float dtype.
            ``-inf`` masks a token (weight 0); a row that is all ``-inf`` pools to NaN (no
            error: checking would cost a device sync), as ``torch.softmax`` does.
        x: tokens ``[B, T, D]`` (float32, bfloat16 or float16), ``N = T - num_prefix_tokens``;
            any batch/token strides with a unit last stride are read in place.
        num_prefix_tokens: leading tokens ([cls], registers) left out of the pool.
        return_weights: also return the softmax weights, float32 ``[B, N]`` / ``[B, K, N]``.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else the reference),
            "triton" or "reference".

    Returns:
        pooled ``[B, D]`` / ``[B, K, D]`` in ``x.dtype`` (accumulated in float32), and the
        weights when ``return_weights``. Gradients flow to ``scores`` and ``x``.
    """
    _check_inputs(scores, x, num_prefix_tokens)
    single = scores.dim() == 2
    B, T, D = x.shape
    N = T - num_prefix_tokens
    K = 1 if single else scores.shape[1]
    if B == 0:
        pooled = x.new_empty((0, D) if single else (0, K, D))
        weights = torch.empty(tuple(scores.shape), device=x.device, dtype=torch.float32)
        return (pooled, weights) if return_weights else pooled

    path = choose_backend(OP, backend, x.device, _unsupported_reason(scores, x))
    if path == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return softmax_pool_reference(scores, x, num_prefix_tokens=num_prefix_tokens,
                                          return_weights=return_weights)

    if x.stride(-1) != 1:
        x = x.contiguous()
    s3 = scores.reshape(B, K, N).contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or s3.requires_grad):
        out, lse = SoftmaxPoolFunction.apply(s3, x, num_prefix_tokens)
    else:  # nothing to differentiate: skip the autograd Function
        out, _, lse = softmax_pool_fwd(s3, x, num_prefix_tokens, False)
    if single:
        out = out.view(B, D)
    if not return_weights:
        return out
    weights = torch.exp(s3.detach().float() - lse.unsqueeze(-1))
    return out, weights.view(B, N) if single else weights
