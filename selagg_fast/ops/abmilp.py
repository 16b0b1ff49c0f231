"""Selective Aggregation (AbMILP) pooling: launchers, autograd Function, public op."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton

from ..kernels.abmilp import (
    abmilp_bwd_kernel,
    abmilp_bwd_single_kernel,
    abmilp_bwd_split_kernel,
    abmilp_fwd_kernel,
    abmilp_fwd_single_kernel,
    abmilp_fwd_split_kernel,
)
from ..reference import abmilp_pool_reference
from . import _dispatch
from ._dispatch import (
    autotuning,
    check_float,
    check_num_prefix_tokens,
    check_same_device,
    choose_backend,
    dot_settings,
    launcher,
    logger,
    next_pow2,
    persistent_programs,
)

OP = "abmilp_pool"
MAX_SINGLE_BD = 8192
# The "batched" K>1 kernels keep a [NC, BK, BC] float32 accumulator (BK * BD elements) in registers.
MAX_BATCHED_ACC = 16384
# The "split" K>1 kernels keep [BC, BK]; past 64 branches the tile would be too thin to pay.
MAX_SPLIT_K = 64
MULTI_VARIANTS = ("split", "batched")
# K = 1 backward: image walkers per SM, tuned (the first is the untuned default). 4 a SM gives each
# ViT-B program ~2 images; 8 gives the forward's one image a program (more loads in flight, as
# many partial rows to reduce as images: 3 MB at ViT-B, B = 1024).
SINGLE_BWD_PROGRAMS_PER_SM = (4, 8)
# (pass, D, K, dtype, dx) -> the K>1 kernel family timed fastest on this GPU
_chosen_variant: dict = {}


def _launch_config(D: int, K: int, variant: str = "split", fp32: bool = False) -> dict:
    BD = next_pow2(D)
    if K == 1:
        # ~8K tile elements per step: 8 tokens at ViT-B, fewer for very wide tokens. (Tiling D
        # as a power of two plus a masked remainder, to skip padded lanes, ran 3x slower on an H200.)
        return dict(BD=BD, BT=max(1, min(16, 8192 // BD)), num_warps=4 if BD <= 1024 else 8, PREFETCH=False,
                    PROGRAMS_PER_SM=SINGLE_BWD_PROGRAMS_PER_SM[0])
    BK = max(16, next_pow2(K))
    if variant == "batched":
        # The feature dim is processed as NC chunks of BC (see the kernel); 8 warps, 16 tokens a
        # step keep the [NC, BK, BC] accumulator in registers without spills on sm_90 at BK*BD <= 16K.
        BC = min(128, BD)
        return dict(BD=BD, BK=BK, BC=BC, NC=BD // BC, BT=16, num_warps=8)
    # split: 256-feature chunks (3 programs per ViT-B image), narrower as K grows so that the
    # [BC, BK] accumulator stays at <= 4K elements; tl.dot needs every tile dim >= 16. float32
    # operands (3xTF32 splits each into two) spill past 64-wide chunks on sm_90.
    return dict(BK=BK, BC=max(16, min(BD, 64 if fp32 else 256, 4096 // BK)), BT=16, num_warps=4)


def _split_configs(D: int, K: int, fp32: bool = False, whole: bool = False) -> list:
    """Autotune list of the split kernels: chunk width x tokens per step x warps (sm_90 compiles
    at ViT-B, bf16 and float32, Triton 3.6 and 3.8: spills of at most a few dozen bytes, in the
    1024-wide and float32 backward; bench/compile_report.py). ``whole``: also the
    one-program-an-image configs (WHOLE: weights on chip, each token tile read once)."""
    default = _launch_config(D, K, fp32=fp32)
    BD, BK = max(16, next_pow2(D)), default["BK"]
    # 512- and 1024-wide chunks read each token from L2 fewer times (2x, 1x at ViT-B). H200 sweep,
    # ViT-B K=16 forward: 1024 x 16 tokens x 4 warps 0.290 ms, 1024 x 32 x 8 0.295, 512 x 32 x 4
    # 0.311, batched 0.322, 256 x 16 x 4 (the default) 0.391, 1024 x 16 x 8 0.407.
    shapes = ((32, 16, 4), (64, 16, 8)) if fp32 else ((512, 32, 4), (1024, 16, 4), (1024, 32, 8))
    configs = [default]
    for bc, bt, w in shapes:
        cfg = dict(BK=BK, BC=min(bc, BD), BT=bt, num_warps=w)
        if cfg["BC"] * BK <= 16384 and cfg not in configs:
            configs.append(cfg)
    if whole and not fp32 and BD * BK <= 16384:  # the [BD, BK] accumulator over 8 warps
        # sm_90, Triton 3.6: 207-211 registers, no spills, wgmma, async copies (one program per SM,
        # so a third stage of copies in flight is worth a try)
        configs += [dict(BK=BK, BC=BD, BT=bt, num_warps=8, num_stages=ns, WHOLE=True)
                    for bt, ns in ((16, 2), (32, 2), (16, 3))]
    return configs


@functools.lru_cache(maxsize=None)
def _single_launcher(kernel, BD: int, prefetch: bool = False, programs_per_sm: tuple = ()):
    # K = 1 is pure bandwidth: tune tokens per step and warps (anchors: 8 tokens, 4 warps ~70%), and
    # for the forward whether the next tile is loaded before this one's math (PREFETCH: two tiles
    # in flight per program; no async copies are generated for these loads on sm_90).
    # (H200 sweep, ViT-B: 4 tokens x 2 warps 0.090 ms, 4 x 4 0.094, 8 x 4 0.102: the smaller the
    # tile and the program, the better so far, so 2-token tiles and 1-warp programs are tried too)
    pairs = ((2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4), (8, 8), (16, 4), (16, 8))
    configs = [dict(BT=bt, num_warps=w) for bt, w in pairs if bt * BD <= 16384]
    if prefetch:  # two tiles of <= 8K elements in registers: small tiles, 2-4 warps
        configs = [dict(c, PREFETCH=False) for c in configs] + [
            dict(BT=bt, num_warps=w, PREFETCH=True) for bt in (4, 8) for w in (2, 4) if bt * BD <= 8192]
    if programs_per_sm:  # the backward's grid: more, smaller programs are tried with <= 4 warps
        configs = [dict(c, PROGRAMS_PER_SM=n) for c in configs for n in programs_per_sm
                   if n == programs_per_sm[0] or c["num_warps"] <= 4]
    return launcher(kernel, configs, key=["D"])


@functools.lru_cache(maxsize=None)
def _batched_launcher(kernel):
    return launcher(kernel, [dict(BT=16, num_warps=8, num_stages=s) for s in (1, 2)], key=["D", "K"])


@functools.lru_cache(maxsize=None)
def _split_launcher(kernel, D: int, K: int, fp32: bool):
    configs = [{k: v for k, v in c.items() if k != "BK"} for c in _split_configs(D, K, fp32, whole=True)]
    return launcher(kernel, configs, key=["D", "K"])


def multi_variants(x: torch.Tensor, K: int) -> tuple:
    """The K>1 kernel families that can run this call (``SELAGG_ABMILP_MULTI`` forces one)."""
    D = x.shape[-1]
    runnable = []
    if K <= MAX_SPLIT_K:
        runnable.append("split")
    # fp32 operands of the batched kernels' 3-D tl.dot need more shared memory than an SM has
    if max(16, next_pow2(K)) * next_pow2(D) <= MAX_BATCHED_ACC and not (
            x.dtype == torch.float32 and x.device.type == "cuda"):
        runnable.append("batched")
    forced = os.environ.get("SELAGG_ABMILP_MULTI", "")
    if forced:
        if forced not in MULTI_VARIANTS:
            raise ValueError(f"SELAGG_ABMILP_MULTI must be one of {MULTI_VARIANTS}, got {forced!r}")
        return tuple(v for v in runnable if v == forced)
    return tuple(runnable)


def _unsupported_reason(x: torch.Tensor, K: int) -> Optional[str]:
    D = x.shape[-1]
    if K == 1 and next_pow2(D) > MAX_SINGLE_BD:
        return f"token dim D={D} exceeds {MAX_SINGLE_BD}"
    if K > 1 and not multi_variants(x, K):
        forced = os.environ.get("SELAGG_ABMILP_MULTI", "")
        return (f"SELAGG_ABMILP_MULTI={forced} cannot run K={K}, D={D}, {x.dtype}" if forced
                else f"K={K} branches exceed {MAX_SPLIT_K}")
    return None


def _pick_variant(key: tuple, variants: tuple, device: torch.device, run) -> str:
    """On a GPU, time each K>1 kernel family once per key (each autotuned first) and keep the faster."""
    if len(variants) == 1 or not autotuning(device):
        return variants[0]
    if key not in _chosen_variant:
        from triton.testing import do_bench
        times, errors = {}, {}
        for v in variants:
            try:
                times[v] = do_bench(lambda v=v: run(v), return_mode="median")
            except Exception as e:  # e.g. a family that fails to compile on this GPU: use the other
                errors[v] = e
                logger.warning("%s %s: the %s kernels failed (%s: %s); using the others", OP, key, v,
                               type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        if not times:
            raise next(iter(errors.values()))
        _chosen_variant[key] = min(times, key=times.get)
        logger.info("%s %s: %s kernels (median ms %s)", OP, key, _chosen_variant[key],
                    {k: round(t, 4) for k, t in times.items()})
    return _chosen_variant[key]


def _default(cfg: dict, tuned=("BT", "num_warps")) -> dict:
    """The launch used where nothing is tuned: the ``tuned`` entries of ``cfg`` (and num_stages
    where a config names it, as the sweep's do)."""
    return {k: cfg[k] for k in (*tuned, "num_stages") if k in cfg}


def _launch_multi(variant: str, split_kernel, batched_kernel, programs: int, x: torch.Tensor, K: int,
                  kwargs: dict) -> None:
    """Launch one K>1 kernel family. ``programs``: images (forward) or image walkers (backward);
    the split kernels run that many per feature chunk."""
    D, fp32 = x.shape[-1], x.dtype == torch.float32
    cfg = _launch_config(D, K, variant, fp32)
    if variant == "split":
        _split_launcher(split_kernel, D, K, fp32)(
            lambda meta: (programs * triton.cdiv(D, meta["BC"]),), x.device,
            _default(cfg, ("BC", "BT", "num_warps", "WHOLE")), **kwargs, BK=cfg["BK"])
    else:
        _batched_launcher(batched_kernel)(
            (programs,), x.device, _default(cfg), **kwargs, BK=cfg["BK"], NC=cfg["NC"], BC=cfg["BC"])


def _dot_operands(weight: torch.Tensor, x_dtype: torch.dtype) -> dict:
    """On the GPU, bf16/fp16 tokens meet the weights in their own dtype inside tl.dot."""
    dot = dot_settings(x_dtype)
    return dict(w_ptr=weight.to(x_dtype) if dot["LOWP"] else weight, **dot)


def abmilp_fwd(x, weight, bias, P, store_f32, store_scores):
    """Launch the forward. x [B, T, D] (unit last stride), weight [K, D], bias None or [K].

    Returns out [B, K, D] in x.dtype, out32 (float32 copy or None), lse [B, K], scores [B, K, N] or None.
    """
    B, T, D = x.shape
    K = weight.shape[0]
    N = T - P
    out = _dispatch.empty((B, K, D), x.device, x.dtype)
    out32 = out if x.dtype == torch.float32 else (
        _dispatch.empty((B, K, D), x.device, torch.float32) if store_f32 else None)
    lse = _dispatch.empty((B, K), x.device, torch.float32)
    scores = _dispatch.empty((B, K, N), x.device, torch.float32) if store_scores else None
    common = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else weight,
        out_ptr=out, out32_ptr=out32 if out32 is not None else out, lse_ptr=lse,
        s_ptr=scores if scores is not None else lse,
        stride_xb=x.stride(0), stride_xt=x.stride(1), P=P, N=N, D=D,
        HAS_BIAS=bias is not None, STORE_F32=out32 is not None and out32 is not out,
        STORE_SCORES=scores is not None,
    )
    if K == 1:
        cfg = _launch_config(D, 1)
        _single_launcher(abmilp_fwd_single_kernel, cfg["BD"], prefetch=True)(
            (B,), x.device, _default(cfg, ("BT", "num_warps", "PREFETCH")), **common, BD=cfg["BD"])
        return out, out32, lse, scores

    multi = dict(common, **_dot_operands(weight, x.dtype), K=K)

    def run(variant):
        _launch_multi(variant, abmilp_fwd_split_kernel, abmilp_fwd_kernel, B, x, K, multi)

    run(_pick_variant(("fwd", D, K, x.dtype), multi_variants(x, K), x.device, run))
    return out, out32, lse, scores


def abmilp_bwd(x, weight, bias, P, lse, out32, dout, need_dx, scores=None):
    """Launch the backward. Returns dx (or None), dweight [K, D] float32, dbias [K] float32.

    ``scores``: the forward's [B, 1, N] scores, which K = 1 needs (K > 1 recomputes them)."""
    B, T, D = x.shape
    K = weight.shape[0]
    N = T - P
    dx = None
    if need_dx:
        dx = _dispatch.empty(x.shape, x.device, x.dtype)
        dx[:, :P].zero_()
    common = dict(
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else weight, lse_ptr=lse,
        out32_ptr=out32, dout_ptr=dout, dx_ptr=dx if dx is not None else x,
        stride_xb=x.stride(0), stride_xt=x.stride(1),
        stride_dxb=dx.stride(0) if dx is not None else 0, stride_dxt=dx.stride(1) if dx is not None else 0,
        B=B, P=P, N=N, D=D, HAS_BIAS=bias is not None, HAS_DX=need_dx,
    )
    if K == 1:
        cfg = _launch_config(D, 1)
        # the tuner also picks the grid (programs per SM): partials are sized for the largest, and
        # only the rows of the programs that ran are reduced
        partials = _partials(x.device, persistent_programs(x.device, B, max(SINGLE_BWD_PROGRAMS_PER_SM)), K, D)
        single = {k: v for k, v in common.items() if k not in ("bias_ptr", "HAS_BIAS")}  # scores carry the bias
        ran = _single_launcher(abmilp_bwd_single_kernel, cfg["BD"], programs_per_sm=SINGLE_BWD_PROGRAMS_PER_SM)(
            lambda meta: (persistent_programs(x.device, B, meta["PROGRAMS_PER_SM"]),), x.device,
            _default(cfg, ("BT", "num_warps", "PROGRAMS_PER_SM")), **single, **_partial_ptrs(partials, K, D),
            s_ptr=scores, BD=cfg["BD"])
        G = persistent_programs(x.device, B, ran["PROGRAMS_PER_SM"])
        return (dx, *_reduce_partials(partials[:G], K, D))

    G = persistent_programs(x.device, B)
    partials = _partials(x.device, G, K, D)
    multi = dict(common, **_partial_ptrs(partials, K, D), **_dot_operands(weight, x.dtype), K=K)

    def run(variant):
        _launch_multi(variant, abmilp_bwd_split_kernel, abmilp_bwd_kernel, G, x, K, multi)

    run(_pick_variant(("bwd", D, K, x.dtype, need_dx), multi_variants(x, K), x.device, run))
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
    """Fused AbMILP pooling with K branches. Saves x, weight, bias, lse, the float32 output and,
    for K = 1, the float32 scores [B, 1, N] (4 bytes a token: the backward then reduces over D
    once per token instead of twice; K > 1 recomputes them on the tensor cores)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_prefix_tokens, store_scores):
        needs_grad = any(ctx.needs_input_grad[:3])
        keep_scores = needs_grad and weight.shape[0] == 1
        out, out32, lse, scores = abmilp_fwd(x, weight, bias, num_prefix_tokens, needs_grad,
                                             store_scores or keep_scores)
        ctx.save_for_backward(x, weight, bias, lse, out32, scores if keep_scores else None)
        ctx.num_prefix_tokens = num_prefix_tokens
        # lse / scores get no gradient: without this, autograd would fill zero tensors for them
        # every backward (a launch each, for nothing)
        ctx.set_materialize_grads(False)
        if scores is None:
            scores = lse.new_empty(0)
        ctx.mark_non_differentiable(lse, scores)
        return out, lse, scores

    @staticmethod
    def backward(ctx, dout, _dlse, _dscores):
        x, weight, bias, lse, out32, scores = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dx, dw, db = abmilp_bwd(x, weight, bias, ctx.num_prefix_tokens, lse, out32,
                                dout.to(x.dtype).contiguous(), need_dx, scores)
        dbias = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw.to(weight.dtype), dbias, None, None


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
    if path == "reference" or standardize:
        with torch.autocast(x.device.type, enabled=False):
            return abmilp_pool_reference(x, weight, bias, num_prefix_tokens=num_prefix_tokens,
                                         return_weights=return_weights, standardize=standardize, eps=eps)

    if x.stride(-1) != 1:
        x = x.contiguous()
    w2 = weight.reshape(K, D).contiguous()
    b1 = None if bias is None else bias.reshape(K).contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or w2.requires_grad or (b1 is not None and b1.requires_grad)):
        out, lse, scores = AbmilpPoolFunction.apply(x, w2, b1, num_prefix_tokens, return_weights)
    else:  # nothing to differentiate: skip the autograd Function's bookkeeping (~10 us of host time)
        out, _, lse, scores = abmilp_fwd(x, w2, b1, num_prefix_tokens, False, return_weights)
    if single:
        out = out.view(B, D)  # a view, not out[:, 0]: its backward is free (select's fills a zero tensor)
    if not return_weights:
        return out
    weights = torch.exp(scores - lse.unsqueeze(-1))
    return out, weights.view(B, N) if single else weights
