"""The reference head's depth-2 scorer (Linear -> tanh/relu -> Linear): launchers, autograd Function, public op."""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import mlp_scores_reference
from ._dispatch import check_float, check_num_prefix_tokens, check_same_device, choose_backend

OP = "mlp_scores"
ACTIVATIONS = ("tanh", "relu")


def _unsupported_reason(x, w1, w2) -> Optional[str]:
    return "kernels not written yet"


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
    _check_inputs(x, w1, b1, w2, b2, activation, num_prefix_tokens)
    path = choose_backend(OP, backend, x.device, _unsupported_reason(x, w1, w2))
    with torch.autocast(x.device.type, enabled=False):
        return mlp_scores_reference(x, w1, b1, w2, b2, activation=activation, num_prefix_tokens=num_prefix_tokens)
