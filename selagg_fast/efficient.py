"""Efficient probing (EP, Psomas et al., "Attention, Please! Revisiting Attentive Probing Through
the Lens of Efficiency") computed through the fold.

EP keeps Q learned queries ``q_m`` and one value map ``W_v`` (no key map, no bias): query m's
weights are ``a_{m,t} = softmax_t(q_m · x_t / √D)`` and its output is slice m of the value map,
``W_v,m Σ_t a_{m,t} x_t`` with ``W_v,m`` the rows ``[m c, (m + 1) c)``, ``c = D / (Q d_out)``;
the Q slices concatenated give ``[B, D / d_out]``. So EP is a Q-branch ``abmilp_pool`` with
weights ``q_m / √D`` followed by Q tiny matrices on ``[B, Q, D]``: no value of any token is
computed. Maths: docs/semantics.md ("Efficient probing"); API: docs/api.md ("EfficientProbing").
"""
from __future__ import annotations

import torch
from torch import nn

from .branches import PoolingProtocol, check_pooled

NAME = "EfficientProbing"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{NAME}: {name} must be a positive int, got {value!r}")
    return value


class EfficientProbing(PoolingProtocol, nn.Module):
    """Efficient probe: ``num_queries`` learned queries, one value map, over the patch tokens.

    Parameters, initialisation and state-dict keys are those of the efficient-probing code's
    ``EfficientProbing(dim, num_queries=Q, d_out=d_out)`` (one head, no value bias):
    ``v.weight [D / d_out, D]`` (``nn.Linear``'s initialisation, drawn first) and
    ``cls_token [1, Q, D]`` drawn from N(0, 0.02²); a state dict of either loads into the other.

    ``forward(tokens [B, T, D], return_weights=False)`` pools tokens ``num_prefix_tokens..T-1``
    and returns ``[B, D / d_out]`` (and the float32 weights ``[B, Q, N]``):
    ``forward = finish(pool_branches(tokens, *branch_weights(), ...))`` (the pooling protocol of
    ``selagg_fast.branches``). ``D`` must be a multiple of ``Q * d_out``.
    """

    def __init__(self, dim: int, num_queries: int = 32, *, d_out: int = 1, num_prefix_tokens: int = 1,
                 device=None, dtype=None):
        super().__init__()
        dim = _positive_int("dim", dim)
        num_queries = _positive_int("num_queries", num_queries)
        d_out = _positive_int("d_out", d_out)
        if dim % (num_queries * d_out):
            raise ValueError(f"{NAME}: num_queries * d_out = {num_queries} * {d_out} does not divide dim={dim}")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"{NAME}: num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.num_queries, self.d_out = dim, num_queries, d_out
        self.num_prefix_tokens = num_prefix_tokens
        # created in the efficient-probing code's order, so that one seed gives its initial parameters
        self.v = nn.Linear(dim, dim // d_out, bias=False, **dd)
        self.cls_token = nn.Parameter(torch.randn(1, num_queries, dim, **dd) * 0.02)

    @property
    def out_features(self) -> int:
        return self.dim // self.d_out

    def branch_weights(self):
        """``(q_m / √D [Q, D], None)``: the branches of the shared pooling call, from the
        parameter every call (autograd carries the gradient to ``cls_token``)."""
        return self.cls_token.view(self.num_queries, self.dim) * self.dim ** -0.5, None

    def finish(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, Q, D]`` pooled tokens -> ``[B, D / d_out]``: query m's pooled vector through its
        block of ``W_v``, the Q blocks concatenated."""
        Q, D = self.num_queries, self.dim
        check_pooled(NAME, pooled, Q, D)
        w_v = self.v.weight.view(Q, D // (Q * self.d_out), D)
        out = torch.einsum("bqd,qcd->bqc", pooled.to(w_v.dtype), w_v)
        return out.reshape(pooled.shape[0], self.out_features)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_queries={self.num_queries}, d_out={self.d_out}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")
