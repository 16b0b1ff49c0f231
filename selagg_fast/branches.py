"""The pooling protocol shared by the folded heads, and the one call that pools their branches.

``SelectiveAggregation`` (its linear head), ``AttentivePooling`` and ``EfficientProbing`` all
compute a softmax over the pooled tokens of a score linear in the tokens, then something small
on the K pooled vectors. Each exposes the same two steps, so that any number of them share one
``abmilp_pool`` call (the tokens are read once for all of them):

- ``branch_weights()`` -> ``(weight [K, D], bias [K] or None)``: the score vectors of the shared
  call (``None`` where the scores are not linear in the tokens: the module pools by itself);
- ``finish(pooled [B, K, D])`` -> the module's output, so that
  ``forward(tokens) == finish(pool_branches(tokens, *branch_weights(), ...))``;

plus ``num_prefix_tokens``, ``standardize`` / ``eps`` (tokens standardised in the pool),
``out_features`` (the width of the flattened output) and ``check_num_tokens(T)``.
:class:`PoolingProtocol` holds the members they share and the forward of the heads whose scores
are always linear (attentive and efficient probing). See docs/api.md ("The pooling protocol").
"""
from __future__ import annotations

from typing import Optional

import torch

from .ops import abmilp_pool
from .ops.abmilp import MAX_K


def single_branch(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """K = 1 weights as views (``[D]``, scalar), whose backward is free (indexing's fills zeros)."""
    if weight.dim() == 2 and weight.shape[0] == 1:
        weight = weight.view(weight.shape[1])
        bias = None if bias is None else bias.view(())
    return weight, bias


def pool_branches(tokens: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  num_prefix_tokens: int, standardize: bool = False, eps: Optional[float] = None,
                  return_weights: bool = False, backend: str = "auto"):
    """``abmilp_pool`` of ``weight [K, D]`` (``bias [K]`` or None) -> ``[B, K, D]`` for every K
    (and the float32 softmax weights ``[B, K, N]``); K = 1 runs as the single-branch op."""
    w, b = single_branch(weight, bias)
    extra = dict(standardize=True, eps=eps) if standardize else {}
    res = abmilp_pool(tokens, w, b, num_prefix_tokens=num_prefix_tokens, return_weights=return_weights,
                      backend=backend, **extra)
    pooled, weights = res if return_weights else (res, None)
    B, K = tokens.shape[0], weight.shape[0]
    pooled = pooled.view(B, K, tokens.shape[-1])  # a view: free backward
    return (pooled, weights.view(B, K, -1)) if return_weights else pooled


def branch_groups(sizes, limit: int = MAX_K) -> list:
    """Indices of consecutive members packed into calls of at most ``limit`` branches (the
    kernels' largest K); a member wider than ``limit`` gets a call of its own."""
    groups, current, width = [], [], 0
    for i, k in enumerate(sizes):
        if current and width + k > limit:
            groups.append(current)
            current, width = [], 0
        current.append(i)
        width += k
    if current:
        groups.append(current)
    return groups


def check_pooled(name: str, pooled: torch.Tensor, K: int, D: int) -> None:
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 3 or pooled.shape[1:] != (K, D):
        shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ValueError(f"{name}: pooled must be [B, K={K}, D={D}], got shape {shape}")


def check_token_count(name: str, num_tokens: int, num_prefix_tokens: int) -> None:
    if num_tokens - num_prefix_tokens <= 0:
        raise ValueError(f"{name}: no tokens left to pool: T={num_tokens} with num_prefix_tokens={num_prefix_tokens}")


class PoolingProtocol:
    """Mixin (before ``nn.Module``) of the pooling protocol's shared members: raw tokens
    (``standardize`` False, ``eps`` None: a subclass with a token norm overrides both), the
    token-count check, and ``forward = finish(pool_branches(tokens, *branch_weights(), ...))``
    for a module whose ``branch_weights()`` is never None. The subclass has ``dim`` and
    ``num_prefix_tokens``; errors name its class."""
    standardize = False
    eps = None

    def check_num_tokens(self, num_tokens: int) -> None:
        """ValueError when ``num_tokens`` tokens leave nothing to pool."""
        check_token_count(type(self).__name__, num_tokens, self.num_prefix_tokens)

    def forward(self, tokens: torch.Tensor, return_weights: bool = False, *, backend: str = "auto"):
        """tokens ``[B, T, D]`` -> ``finish`` of the K pooled vectors (and the float32 softmax
        weights ``[B, K, N]``, N = T - num_prefix_tokens)."""
        name = type(self).__name__
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name}: tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"{name}: tokens must be [B, T, D={self.dim}], got shape {tuple(tokens.shape)}")
        res = pool_branches(tokens, *self.branch_weights(), num_prefix_tokens=self.num_prefix_tokens,
                            standardize=self.standardize, eps=self.eps, return_weights=return_weights, backend=backend)
        pooled, weights = res if return_weights else (res, None)
        out = self.finish(pooled)
        return (out, weights) if return_weights else out
