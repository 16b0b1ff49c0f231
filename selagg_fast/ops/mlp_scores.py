"""The reference head's depth-2 scorer (Linear -> tanh/relu -> Linear): launchers, autograd Function, public op."""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from ..kernels.mlp_scores import mlp_scores_bwd_kernel, mlp_scores_fwd_kernel
from ..reference import mlp_scores_reference
from . import _dispatch
from ._dispatch import (
    check_float,
    check_num_prefix_tokens,
    check_same_device,
    LaunchConfig,
    choose_backend,
    config_list,
    dot_dim,
    dot_settings,
    launcher,
    without,
)

OP = "mlp_scores"
ACTIVATIONS = ("tanh", "relu")
MAX_K = 64  # second-layer outputs: [BM, BK] score / gradient tiles
# The backward writes dpre (the pre-activation gradient, x.dtype) for at most this many bytes at a
# time: images are processed in chunks and dW1 accumulates one GEMM per chunk (ViT-B bf16: 296 KiB
# an image, 443 images a chunk, 3 chunks at B = 1024).
DPRE_CHUNK_BYTES = 128 << 20


# GEMM tiles (BM token rows, BN hidden units, BD-deep steps of D, warps, stages) for sm_90: wgmma
# wants 64-row warp groups and 64-wide bf16 steps. The first of each list is the untuned default.
# The backward holds four [BM, BN] float32 tiles (pre, h, act', dpre), so its hidden blocks are
# narrower (sm_90 compiles, Triton 3.8, bench/compile_cases_softmax_pool.py: no spills in either
# list; 128 x 128 backward tiles spill).
FWD_TILES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 8, 3),
             (128, 64, 64, 4, 4), (64, 128, 64, 4, 3))
BWD_TILES = ((128, 64, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 4),
             (64, 64, 64, 4, 4))


FIXED = ("BK",)  # the entry every candidate shares: passed to the kernel directly


def _configs(D: int, DH: int, K: int, backward: bool) -> list:
    """The autotune list (tile dims clipped to the problem, each >= 16 for tl.dot)."""
    BND, BDD = dot_dim(DH), dot_dim(D)
    return config_list(*(dict(BM=bm, BN=min(bn, BND), BD=min(bd, BDD), num_warps=w, num_stages=st)
                         for bm, bn, bd, w, st in (BWD_TILES if backward else FWD_TILES)))


def _launch_config(D: int, DH: int, K: int, backward: bool = False) -> LaunchConfig:
    """The untuned launch: the first config of the list, plus BK (second-layer outputs, padded)."""
    return dict(_configs(D, DH, K, backward)[0], BK=1 if K == 1 else dot_dim(K))


@functools.lru_cache(maxsize=None)
def _launcher(kernel, D: int, DH: int, K: int, backward: bool):
    return launcher(kernel, _configs(D, DH, K, backward), key=["D", "DH", "K"])


def _kernel_settings(x_dtype: torch.dtype, activation: str) -> dict:
    dot = dot_settings(x_dtype)
    # tanh.approx.f32 (max relative error 2^-11) only where bf16/fp16 operands already round more
    return dict(dot, ACT=ACTIVATIONS.index(activation), FAST_TANH=dot["LOWP"] and activation == "tanh")


def _gemm_weight(w1: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """W1 as tl.dot reads it: in the tokens' dtype on the GPU (tensor cores), else as given."""
    return (w1.to(x_dtype) if dot_settings(x_dtype)["LOWP"] else w1).contiguous()


def mlp_scores_fwd(x, w1, b1, w2, b2, P, activation):
    """Launch the forward. x [B, T, D] (unit last stride), w1 [DH, D] (as _gemm_weight), w2 [K, DH].

    Returns float32 scores [B, K, N]."""
    B, T, D = x.shape
    DH, K = w1.shape[0], w2.shape[0]
    N = T - P
    M = B * N
    scores = _dispatch.empty((B, K, N), x.device, torch.float32)
    cfg = _launch_config(D, DH, K)
    _launcher(mlp_scores_fwd_kernel, D, DH, K, False)(
        lambda meta: (triton.cdiv(M, meta["BM"]),), x.device, without(cfg, FIXED),
        x_ptr=x, w1_ptr=w1, b1_ptr=b1 if b1 is not None else w1, w2_ptr=w2, b2_ptr=b2 if b2 is not None else w2,
        s_ptr=scores, stride_xb=x.stride(0), stride_xt=x.stride(1), P=P, N=N, M=M, D=D, DH=DH, K=K,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, SINGLE=K == 1, BK=cfg["BK"],
        **_kernel_settings(x.dtype, activation))
    return scores


def _chunk_images(B: int, T: int, DH: int, itemsize: int) -> int:
    return max(1, min(B, DPRE_CHUNK_BYTES // max(1, T * DH * itemsize)))


def mlp_scores_bwd(x, w1, b1, w2, P, activation, ds, need_dx, need_dw1=True):
    """Launch the backward. ds [B, K, N] float32 contiguous.

    Returns dx (or None), dw1 [DH, D] float32 (or None), db1 [DH] float32, dw2 [K, DH] float32. Per chunk of
    images: the kernel recomputes the hidden tiles and writes dpre [images * T, DH] (x.dtype); then
    dW1 += dpre^T x and dx = dpre W1 are torch GEMMs."""
    B, T, D = x.shape
    DH, K = w1.shape[0], w2.shape[0]
    N = T - P
    cfg = _launch_config(D, DH, K, backward=True)
    settings = _kernel_settings(x.dtype, activation)
    w1_mm = w1.to(x.dtype)  # the GEMMs in torch run in the tokens' dtype
    chunk = _chunk_images(B, T, DH, x.element_size())
    dpre_buf = _dispatch.empty((chunk * T, DH), x.device, x.dtype)  # prefix rows are written as zeros
    # partials sized for the smallest tile (the most programs) of the autotune list
    G_max = triton.cdiv(chunk * T, min(c["BM"] for c in _configs(D, DH, K, True)))
    partials = _dispatch.empty((G_max, (K + 1) * DH), x.device, torch.float32)
    dw1 = None
    dx = _dispatch.empty(x.shape, x.device, x.dtype) if need_dx else None
    part_sum = None
    for b0 in range(0, B, chunk):
        nb = min(chunk, B - b0)
        M = nb * T  # every token of the chunk's images, prefix tokens included
        ran = _launcher(mlp_scores_bwd_kernel, D, DH, K, True)(
            lambda meta: (triton.cdiv(M, meta["BM"]),), x.device, without(cfg, FIXED),
            x_ptr=x, w1_ptr=w1, b1_ptr=b1 if b1 is not None else w1, w2_ptr=w2, ds_ptr=ds, dpre_ptr=dpre_buf,
            part_ptr=partials, stride_xb=x.stride(0), stride_xt=x.stride(1), stride_part=partials.stride(0),
            b0=b0, P=P, N=N, M=M, T=T, D=D, DH=DH, K=K, HAS_B1=b1 is not None, SINGLE=K == 1, BK=cfg["BK"],
            **settings)
        G = triton.cdiv(M, ran["BM"])
        total = partials[:G].sum(0)
        part_sum = total if part_sum is None else part_sum + total
        dpre = dpre_buf[:nb * T]
        if need_dw1:
            x2 = x[b0:b0 + nb].reshape(nb * T, D)  # a view for [B, T, D]-contiguous tokens, else a copy
            g = torch.mm(dpre.t(), x2)  # [DH, D]
            dw1 = g.float() if dw1 is None else dw1.add_(g)
        if need_dx:
            torch.mm(dpre, w1_mm, out=dx[b0:b0 + nb].view(nb * T, D))
    return dx, dw1, part_sum[K * DH:], part_sum[:K * DH].view(K, DH)


def _unsupported_reason(x, w1, w2) -> Optional[str]:
    K = 1 if w2.dim() == 1 else w2.shape[0]
    if K > MAX_K:
        return f"K={K} second-layer outputs exceed {MAX_K}"
    return None


class MlpScoresFunction(torch.autograd.Function):
    """Fused depth-2 scorer. Saves x and the parameters only: the hidden activation is recomputed."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation, num_prefix_tokens):
        w1g = _gemm_weight(w1, x.dtype)
        scores = mlp_scores_fwd(x, w1g, b1, w2, b2, num_prefix_tokens, activation)
        ctx.save_for_backward(x, w1, b1, w2, b2)
        ctx.activation, ctx.num_prefix_tokens = activation, num_prefix_tokens
        return scores

    @staticmethod
    def backward(ctx, ds):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw1, db1, dw2 = mlp_scores_bwd(x, _gemm_weight(w1, x.dtype), b1, w2, ctx.num_prefix_tokens,
                                           ctx.activation, ds.float().contiguous(), need[0], need[1])
        db2 = ds.sum((0, 2)).to(b2.dtype) if b2 is not None and need[4] else None
        return (dx, dw1.to(w1.dtype) if dw1 is not None else None, db1.to(b1.dtype) if b1 is not None and need[2] else None,
                dw2.to(w2.dtype) if need[3] else None, db2, None, None)


def _check_inputs(x, w1, b1, w2, b2, activation, num_prefix_tokens) -> int:
    check_float(OP, "x", x)
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None or name in ("w1", "w2"):
            check_float(OP, name, t)
    if x.dim() != 3:
        raise ValueError(f"{OP}: x must be [B, T, D], got shape {tuple(x.shape)}")
    if w1.dim() != 2 or w1.shape[1] != x.shape[-1]:
        raise ValueError(f"{OP}: w1 must be [Dh, D] with D={x.shape[-1]} (x's), got shape {tuple(w1.shape)}")
    Dh = w1.shape[0]
    if Dh == 0:
        raise ValueError(f"{OP}: w1 has Dh=0 hidden units")
    if b1 is not None and tuple(b1.shape) != (Dh,):
        raise ValueError(f"{OP}: b1 must be [Dh={Dh}], got shape {tuple(b1.shape)}")
    if w2.dim() not in (1, 2) or w2.shape[-1] != Dh:
        raise ValueError(f"{OP}: w2 must be [Dh={Dh}] or [K, Dh={Dh}], got shape {tuple(w2.shape)}")
    K = 1 if w2.dim() == 1 else w2.shape[0]
    if K == 0:
        raise ValueError(f"{OP}: w2 has K=0 branches")
    if b2 is not None and not (b2.dim() == 0 or (b2.dim() == 1 and b2.shape[0] == K)):
        raise ValueError(f"{OP}: b2 must be a scalar tensor or [K={K}], got shape {tuple(b2.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_num_prefix_tokens(OP, num_prefix_tokens)
    if x.shape[1] - num_prefix_tokens <= 0:
        raise ValueError(f"{OP}: no tokens left to score: T={x.shape[1]} with num_prefix_tokens={num_prefix_tokens}")
    check_same_device(OP, x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    return K


def mlp_scores(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor] = None,
    *,
    activation: str = "tanh",
    num_prefix_tokens: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scores of the reference head's depth-2 scorer, ``s_t = w2 · act(W1 z_t + b1) + b2``.

    The hidden activation ``[B, N, Dh]`` is never written: the kernel tiles the tokens, runs
    the first layer as a tensor-core GEMM and applies the activation and second layer on chip;
    the backward recomputes it. Compose with :func:`softmax_pool` for the depth-2 head.

    Args:
        x: tokens ``[B, T, D]`` (float32, bfloat16 or float16), unit last stride read in place.
        w1: ``[Dh, D]`` first layer (``attention_predictor.0.weight``); b1: None or ``[Dh]``.
        w2: ``[Dh]`` (scores ``[B, N]``) or ``[K, Dh]`` (scores ``[B, K, N]``); b2: None,
            a scalar tensor or ``[K]``.
        activation: "tanh" or "relu".
        num_prefix_tokens: leading tokens ([cls], registers) that get no score.
        backend: "auto", "triton" or "reference" (as :func:`softmax_pool`).

    Returns:
        float32 scores ``[B, N]`` / ``[B, K, N]``, ``N = T - num_prefix_tokens``. Gradients flow
        to every tensor argument.
    """
    K = _check_inputs(x, w1, b1, w2, b2, activation, num_prefix_tokens)
    single = w2.dim() == 1
    B, T, D = x.shape
    N = T - num_prefix_tokens
    if B == 0:
        return torch.empty((0, N) if single else (0, K, N), device=x.device, dtype=torch.float32)
    path = choose_backend(OP, backend, x.device, _unsupported_reason(x, w1, w2))
    if path == "reference":
        with torch.autocast(x.device.type, enabled=False):
            return mlp_scores_reference(x, w1, b1, w2, b2, activation=activation, num_prefix_tokens=num_prefix_tokens)

    if x.stride(-1) != 1:
        x = x.contiguous()
    w1c = w1.contiguous()
    b1c = None if b1 is None else b1.contiguous()
    w2c = w2.reshape(K, w1.shape[0]).contiguous()
    b2c = None if b2 is None else b2.reshape(-1).expand(K).contiguous()  # a scalar: every branch
    params = (x, w1c, b1c, w2c, b2c)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
        scores = MlpScoresFunction.apply(x, w1c, b1c, w2c, b2c, activation, num_prefix_tokens)
    else:  # nothing to differentiate: skip the autograd Function
        scores = mlp_scores_fwd(x, _gemm_weight(w1c, x.dtype), b1c, w2c, b2c, num_prefix_tokens, activation)
    return scores.view(B, N) if single else scores
