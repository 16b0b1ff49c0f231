"""Selective Aggregation (AbMILP) pooling: launchers, autograd Function, public op."""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from ..kernels.abmilp import (
    abmilp_bwd_single_kernel,
    abmilp_bwd_split_kernel,
    abmilp_fwd_single_kernel,
    abmilp_fwd_split_kernel,
)
from ..reference import abmilp_pool_reference
from . import _dispatch
from ._dispatch import (
    ACC_ELEMENTS,
    MAX_ACC_ELEMENTS,
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
    token_tile,
    without,
)

OP = "abmilp_pool"
# K = 1 holds a whole token in one tile row: at least 2-token tiles within MAX_TILE_ELEMENTS.
MAX_SINGLE_BD = MAX_TILE_ELEMENTS // 2
# K > 1 ("split"): past 64 branches the [BC, BK] accumulator leaves too few features per program to pay.
MAX_K = 64
# K > 1 default chunk widths (3 programs per ViT-B image); float32 operands (3xTF32 splits each
# into two) take narrower ones: wider ones spill on sm_90
SPLIT_CHUNK, SPLIT_CHUNK_F32 = 256, 64
TOKENS_A_STEP = 16  # tokens a step of the defaults
# the entries every candidate of a launcher shares: passed to the kernel directly
SINGLE_FIXED, SPLIT_FIXED = ("BD",), ("BD", "BK")
# Launcher setting (not a kernel parameter): image-walking programs per SM of the K = 1 backward.
# Each program reduces its images into one partial row; 4 a SM is the occupancy of its 4-warp
# default (~128 registers a thread). `bench sweep` times 4 and 8.
SINGLE_BWD_PROGRAMS_PER_SM = 4


def single_config(D: int) -> LaunchConfig:
    """K = 1 default (forward and backward, and the launch where nothing is tuned): the shared
    whole-token tile (ops/_dispatch.token_tile), at most TOKENS_A_STEP tokens a step."""
    return dict(token_tile(D, max_tokens=TOKENS_A_STEP), PREFETCH=False)


def single_configs(BD: int, *, prefetch: bool) -> list:
    """K = 1 autotune list (tile tokens x warps). The pass is pure bandwidth, so the list spans
    small programs (1-2 warps, 2-4 tokens: many programs and loads in flight per SM) to the
    default and twice its tile; ``prefetch`` (forward only) adds programs that issue the next
    tile's load before this tile's math (two tiles in flight, so each <= TILE_ELEMENTS)."""
    pairs = ((2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4), (8, 8), (16, 4), (16, 8))
    configs = [dict(BT=bt, num_warps=w) for bt, w in pairs if bt * BD <= MAX_TILE_ELEMENTS]
    if prefetch:
        configs = [dict(c, PREFETCH=False) for c in configs] + [
            dict(BT=bt, num_warps=w, PREFETCH=True) for bt in (4, 8) for w in (2, 4) if bt * BD <= TILE_ELEMENTS]
    return configs


def split_config(D: int, K: int, *, fp32: bool) -> LaunchConfig:
    """K > 1 default: SPLIT_CHUNK-feature chunks (SPLIT_CHUNK_F32 for float32 operands), narrower
    as K grows so that the [BC, BK] accumulator stays within ACC_ELEMENTS; tl.dot needs every
    tile dim >= MIN_DOT_DIM."""
    BK = dot_dim(K)
    BC = max(MIN_DOT_DIM, min(next_pow2(D), SPLIT_CHUNK_F32 if fp32 else SPLIT_CHUNK, ACC_ELEMENTS // BK))
    return dict(BK=BK, BC=BC, BT=TOKENS_A_STEP, num_warps=4)


def split_configs(D: int, K: int, *, fp32: bool, standardize: bool = False) -> list:
    """K > 1 autotune list: chunk width x tokens a step x warps (x stages), each within
    MAX_ACC_ELEMENTS. Wider chunks mean fewer programs an image, so each token is read from L2
    fewer times (512: twice at ViT-B; 1024: once); 8 warps for 32-token steps. Whole-image
    configs (WHOLE, BC >= D: the weights stay on chip and each token tile is read once for both
    dots; one program per SM, so a third stage of async copies is tried too) for 16-bit tokens.
    ``standardize`` keeps the configs whose token statistics fit beside the tile: chunks of at
    most 256 features and 16-token whole-image steps (wider chunks and 32-token steps spill
    hundreds to thousands of bytes on sm_90). Registers and spills of every config on sm_90:
    bench/results/compile_sm90_*.txt."""
    default = split_config(D, K, fp32=fp32)
    BD, BK = dot_dim(D), default["BK"]
    shapes = ((32, 16, 4), (64, 16, 8)) if fp32 else ((512, 32, 4), (1024, 16, 4), (1024, 32, 8))
    configs = config_list(default, *(dict(BK=BK, BC=min(bc, BD), BT=bt, num_warps=w) for bc, bt, w in shapes),
                          fits=lambda c: c["BC"] * BK <= MAX_ACC_ELEMENTS)
    if not fp32 and BD * BK <= MAX_ACC_ELEMENTS:
        configs += [dict(BK=BK, BC=BD, BT=bt, num_warps=8, num_stages=ns, WHOLE=True)
                    for bt, ns in ((16, 2), (32, 2), (16, 3))]
    if standardize:
        configs = [c for c in configs if (c["BT"] == 16 if c.get("WHOLE") else c["BC"] <= 256)]
    return configs


@functools.lru_cache(maxsize=None)
def _single_launcher(kernel, BD: int, *, backward: bool):
    key = ["D", "STANDARDIZE"] + (["HAS_DX"] if backward else [])
    return launcher(kernel, single_configs(BD, prefetch=not backward), key=key)


@functools.lru_cache(maxsize=None)
def _split_launcher(kernel, D: int, K: int, *, fp32: bool, standardize: bool, backward: bool):
    key = ["D", "K"] + (["HAS_DX"] if backward else [])  # one launcher per standardize flag
    return launcher(kernel, [without(c, SPLIT_FIXED) for c in split_configs(D, K, fp32=fp32, standardize=standardize)], key=key)


def _launch_split(kernel, programs: int, x: torch.Tensor, K: int, kwargs: dict, *, backward: bool) -> None:
    """Launch a split kernel: ``programs`` (images, or image walkers in the backward) per feature chunk."""
    D, fp32 = x.shape[-1], x.dtype == torch.float32
    cfg = split_config(D, K, fp32=fp32)
    _split_launcher(kernel, D, K, fp32=fp32, standardize=kwargs["STANDARDIZE"], backward=backward)(
        lambda meta: (programs * triton.cdiv(D, meta["BC"]),), x.device, without(cfg, SPLIT_FIXED), **kwargs, BK=cfg["BK"])


def _unsupported_reason(x: torch.Tensor, K: int) -> Optional[str]:
    D = x.shape[-1]
    if K == 1 and next_pow2(D) > MAX_SINGLE_BD:
        return f"token dim D={D} exceeds {MAX_SINGLE_BD}"
    if K > MAX_K:
        return f"K={K} branches exceed {MAX_K}"
    return None


def _dot_operands(weight: torch.Tensor, x_dtype: torch.dtype) -> dict:
    """On the GPU, bf16/fp16 tokens meet the weights in their own dtype inside tl.dot."""
    dot = dot_settings(x_dtype)
    return dict(w_ptr=weight.to(x_dtype) if dot["LOWP"] else weight, **dot)


def abmilp_fwd(x, weight, bias, P, *, store_f32: bool, store_scores: bool, standardize: bool = False,
               eps: float = 1e-6):
    """Launch the forward. x [B, T, D] (unit last stride), weight [K, D], bias None or [K].

    Returns out [B, K, D] in x.dtype, out32 (float32 copy or None), lse [B, K], scores [B, K, N] or
    None, stats (with ``standardize`` and ``store_f32``: each pooled token's mean and rstd,
    float32 [B, 2, N], for the backward; else None).
    """
    B, T, D = x.shape
    K = weight.shape[0]
    N = T - P
    out = _dispatch.empty((B, K, D), x.device, x.dtype)
    out32 = out if x.dtype == torch.float32 else (
        _dispatch.empty((B, K, D), x.device, torch.float32) if store_f32 else None)
    lse = _dispatch.empty((B, K), x.device, torch.float32)
    scores = _dispatch.empty((B, K, N), x.device, torch.float32) if store_scores else None
    stats = _dispatch.empty((B, 2, N), x.device, torch.float32) if standardize and store_f32 else None
    common = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else weight,
        out_ptr=out, out32_ptr=out32 if out32 is not None else out, lse_ptr=lse,
        s_ptr=scores if scores is not None else lse, stats_ptr=stats if stats is not None else lse,
        stride_xb=x.stride(0), stride_xt=x.stride(1), P=P, N=N, D=D, eps=float(eps),
        HAS_BIAS=bias is not None, STORE_F32=out32 is not None and out32 is not out,
        STORE_SCORES=scores is not None, STANDARDIZE=standardize, STORE_STATS=stats is not None,
    )
    if K == 1:
        cfg = single_config(D)
        _single_launcher(abmilp_fwd_single_kernel, cfg["BD"], backward=False)(
            (B,), x.device, without(cfg, SINGLE_FIXED), **common, BD=cfg["BD"])
    else:
        _launch_split(abmilp_fwd_split_kernel, B, x, K, dict(common, **_dot_operands(weight, x.dtype), K=K),
                      backward=False)
    return out, out32, lse, scores, stats


def abmilp_bwd(x, weight, bias, P, lse, out32, dout, *, need_dx: bool, scores=None, stats=None):
    """Launch the backward. Returns dx (or None), dweight [K, D] float32, dbias [K] float32 (exact
    zeros: softmax is shift invariant per branch).

    ``scores``: the forward's [B, 1, N] scores, which K = 1 needs (K > 1 recomputes them).
    ``stats``: the forward's per-token mean and rstd [B, 2, N] when it standardised the tokens."""
    B, T, D = x.shape
    K = weight.shape[0]
    N = T - P
    dx = None
    if need_dx:
        dx = _dispatch.empty(x.shape, x.device, x.dtype)
        dx[:, :P].zero_()
    common = dict(
        x_ptr=x, w_ptr=weight, lse_ptr=lse, out32_ptr=out32, dout_ptr=dout, dx_ptr=dx if dx is not None else x,
        stride_xb=x.stride(0), stride_xt=x.stride(1),
        stride_dxb=dx.stride(0) if dx is not None else 0, stride_dxt=dx.stride(1) if dx is not None else 0,
        B=B, P=P, N=N, D=D, HAS_DX=need_dx, STANDARDIZE=stats is not None,
        stats_ptr=stats if stats is not None else lse,
    )
    if K == 1:  # the scores carry the bias
        cfg = single_config(D)
        G = persistent_programs(x.device, B, SINGLE_BWD_PROGRAMS_PER_SM)
        partials = _partials(x.device, G, K, D)
        _single_launcher(abmilp_bwd_single_kernel, cfg["BD"], backward=True)(
            (G,), x.device, without(cfg, SINGLE_FIXED + ("PREFETCH",)), **common, **_partial_ptrs(partials, K, D),
            s_ptr=scores, BD=cfg["BD"])
    else:
        G = persistent_programs(x.device, B)
        partials = _partials(x.device, G, K, D)
        _launch_split(abmilp_bwd_split_kernel, G, x, K,
                      dict(common, **_partial_ptrs(partials, K, D), **_dot_operands(weight, x.dtype), K=K,
                           bias_ptr=bias if bias is not None else weight, HAS_BIAS=bias is not None),
                      backward=True)
    return (dx, *_reduce_partials(partials, K, D))


def _partials(device, G: int, K: int, D: int) -> torch.Tensor:
    # every program's dw [K, D] and db [K] partials side by side in one row: one reduction for both
    return _dispatch.empty((G, K * D + K), device, torch.float32)


def _partial_ptrs(partials: torch.Tensor, K: int, D: int) -> dict:
    return dict(dw_ptr=partials, db_ptr=partials[:, K * D:], stride_part=partials.stride(0))


def _reduce_partials(partials: torch.Tensor, K: int, D: int) -> tuple:
    """dweight [K, D] and dbias [K] (both contiguous) from the programs' [G, K * D + K] partials."""
    total = partials.sum(0)
    return total[:K * D].view(K, D), total[K * D:]


class AbmilpPoolFunction(torch.autograd.Function):
    """Fused AbMILP pooling with K branches.

    ``AbmilpPoolFunction.apply(x, weight, bias, num_prefix_tokens, store_scores, standardize, eps)``
    (positional, as autograd Functions take them) with x [B, T, D] (unit last stride), weight
    [K, D] and bias None or [K] returns three tensors:

    - ``out`` [B, K, D] in x.dtype: the pooled tokens, the only differentiable output;
    - ``lse`` [B, K] float32: the log-sum-exp of each branch's scores over the N pooled tokens;
    - ``scores`` [B, K, N] float32 (the scores, bias included; ``exp(scores - lse)`` are the
      weights) when ``store_scores``, else an empty tensor.

    Saves x, weight, bias, lse, the float32 output, for K = 1 the float32 scores [B, 1, N]
    (4 bytes a token: the backward then reduces over D once per token instead of twice; K > 1
    recomputes them on the tensor cores) and, with ``standardize``, each token's mean and rstd
    (8 bytes a token: the backward does not recompute them). The bias gradient is exact zeros
    (shift invariance).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_prefix_tokens, store_scores, standardize, eps):
        needs_grad = any(ctx.needs_input_grad[:3])
        keep_scores = needs_grad and weight.shape[0] == 1
        out, out32, lse, scores, stats = abmilp_fwd(x, weight, bias, num_prefix_tokens, store_f32=needs_grad,
                                                    store_scores=store_scores or keep_scores,
                                                    standardize=standardize, eps=eps)
        ctx.save_for_backward(x, weight, bias, lse, out32, scores if keep_scores else None, stats)
        ctx.num_prefix_tokens = num_prefix_tokens
        # lse / scores get no gradient: without this, autograd would fill zero tensors for them
        # every backward (a launch each, for nothing)
        ctx.set_materialize_grads(False)
        if not store_scores:  # K = 1 keeps its scores for the backward; returned only when asked for
            scores = lse.new_empty(0)
        ctx.mark_non_differentiable(lse, scores)
        return out, lse, scores

    @staticmethod
    def backward(ctx, dout, _dlse, _dscores):
        x, weight, bias, lse, out32, scores, stats = ctx.saved_tensors
        dx, dw, db = abmilp_bwd(x, weight, bias, ctx.num_prefix_tokens, lse, out32, dout.to(x.dtype).contiguous(),
                                need_dx=ctx.needs_input_grad[0], scores=scores, stats=stats)
        dbias = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw.to(weight.dtype), dbias, None, None, None, None


def _check_inputs(x, weight, bias, num_prefix_tokens):
    check_float(OP, "x", x)
    check_float(OP, "weight", weight)
    if bias is not None:
        check_float(OP, "bias", bias)
    if x.dim() != 3:
        raise ValueError(f"{OP}: x must be [B, T, D], got shape {tuple(x.shape)}")
    if weight.dim() not in (1, 2):
        raise ValueError(f"{OP}: weight must be [D] or [K, D], got shape {tuple(weight.shape)}")
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"{OP}: weight has D={weight.shape[-1]} but x has D={x.shape[-1]}")
    K = 1 if weight.dim() == 1 else weight.shape[0]
    if K == 0:
        raise ValueError(f"{OP}: weight has K=0 branches")
    if bias is not None and not (bias.dim() == 0 or (bias.dim() == 1 and bias.shape[0] == K)):
        raise ValueError(f"{OP}: bias must be a scalar tensor or [K={K}], got shape {tuple(bias.shape)}")
    check_num_prefix_tokens(OP, num_prefix_tokens)
    if x.shape[1] - num_prefix_tokens <= 0:
        raise ValueError(
            f"{OP}: no tokens left to pool: T={x.shape[1]} with num_prefix_tokens={num_prefix_tokens}")
    check_same_device(OP, x=x, weight=weight, bias=bias)
    return K


def _check_standardize(standardize, eps):
    if not isinstance(standardize, bool):
        raise TypeError(f"{OP}: standardize must be a bool, got {type(standardize).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{OP}: eps must be a non-negative float, got {eps!r}")


def abmilp_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    num_prefix_tokens: int = 0,
    return_weights: bool = False,
    backend: str = "auto",
    standardize: bool = False,
    eps: float = 1e-6,
):
    """Selective Aggregation: softmax over tokens of a linear score, then the weighted token sum.

    Args:
        x: tokens ``[B, T, D]`` (float32, bfloat16 or float16); any batch/token strides
            with a unit last stride are read in place.
        weight: ``[D]`` (one branch) or ``[K, D]`` (K independent branches, one read of x).
        bias: None, a scalar tensor, or ``[K]``.
        num_prefix_tokens: leading tokens ([cls], registers) left out of the pool.
        return_weights: also return the softmax weights, float32 ``[B, N]`` / ``[B, K, N]``
            with ``N = T - num_prefix_tokens``.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else the reference),
            "triton" or "reference".
        standardize: replace every pooled token ``x_t`` by its standardisation
            ``(x_t - mean_D(x_t)) / sqrt(var_D(x_t) + eps)`` (biased variance: ``nn.LayerNorm``
            without affine) in the scores and in the weighted sum; gradients flow through it.
        eps: the variance floor of ``standardize``.

    Returns:
        pooled ``[B, D]`` / ``[B, K, D]`` in ``x.dtype`` (accumulated in float32), and the
        weights when ``return_weights``. Gradients flow to ``x``, ``weight`` and ``bias``.
    """
    K = _check_inputs(x, weight, bias, num_prefix_tokens)
    _check_standardize(standardize, eps)
    single = weight.dim() == 1
    B, T, D = x.shape
    N = T - num_prefix_tokens
    if B == 0:
        pooled = x.new_empty((0, D) if single else (0, K, D))
        weights = torch.empty((0, N) if single else (0, K, N), device=x.device, dtype=torch.float32)
        return (pooled, weights) if return_weights else pooled

    path = choose_backend(OP, backend, x.device, _unsupported_reason(x, K))
    if path == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return abmilp_pool_reference(x, weight, bias, num_prefix_tokens=num_prefix_tokens,
                                         return_weights=return_weights, standardize=standardize, eps=eps)

    if x.stride(-1) != 1:
        x = x.contiguous()
    w2 = weight.reshape(K, D).contiguous()
    b1 = None if bias is None else bias.reshape(-1).expand(K).contiguous()  # a scalar: every branch
    if torch.is_grad_enabled() and (x.requires_grad or w2.requires_grad or (b1 is not None and b1.requires_grad)):
        out, lse, scores = AbmilpPoolFunction.apply(x, w2, b1, num_prefix_tokens, return_weights, standardize, eps)
    else:  # nothing to differentiate: skip the autograd Function's bookkeeping (host time)
        out, _, lse, scores, _ = abmilp_fwd(x, w2, b1, num_prefix_tokens, store_f32=False,
                                            store_scores=return_weights, standardize=standardize, eps=eps)
    if single:
        out = out.view(B, D)  # a view, not out[:, 0]: its backward is free (select's fills a zero tensor)
    if not return_weights:
        return out
    weights = torch.exp(scores - lse.unsqueeze(-1))
    return out, weights.view(B, N) if single else weights
