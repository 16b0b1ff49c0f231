"""Softmax pooling over given scores: launchers, autograd Function, public op."""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import softmax_pool_reference
from ._dispatch import check_float, check_num_prefix_tokens, check_same_device, choose_backend

OP = "softmax_pool"


def _unsupported_reason(scores: torch.Tensor, x: torch.Tensor) -> Optional[str]:
    return "kernels not written yet"


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
    path = choose_backend(OP, backend, x.device, _unsupported_reason(scores, x))
    with torch.autocast(x.device.type, enabled=False):
        return softmax_pool_reference(scores, x, num_prefix_tokens=num_prefix_tokens, return_weights=return_weights)
