"""nn.Modules that hold parameters and call the fused ops."""
from __future__ import annotations

import math

import torch
from torch import nn

from .ops import abmilp_pool


class SelectiveAggregation(nn.Module):
    """AbMILP head: ``softmax_i(w_k . z_i + b_k)``-weighted sum of the patch tokens.

    Args:
        dim: token width D.
        branches: K independent score vectors; ``forward`` returns ``[B, D]`` for K = 1
            and ``[B, K, D]`` otherwise.
        num_prefix_tokens: leading tokens left out of the pool (1 for a ViT with [cls],
            more with registers, 0 to pool every token).
    """

    def __init__(self, dim: int, branches: int = 1, num_prefix_tokens: int = 1):
        super().__init__()
        if dim <= 0 or branches <= 0:
            raise ValueError(f"SelectiveAggregation: dim and branches must be positive, got {dim}, {branches}")
        self.dim, self.branches, self.num_prefix_tokens = dim, branches, num_prefix_tokens
        self.weight = nn.Parameter(torch.empty(branches, dim))
        self.bias = nn.Parameter(torch.empty(branches))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as nn.Linear(dim, branches).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, branches={self.branches}, num_prefix_tokens={self.num_prefix_tokens}"

    def forward(self, tokens: torch.Tensor, return_weights: bool = False):
        weight = self.weight[0] if self.branches == 1 else self.weight
        bias = self.bias[0] if self.branches == 1 else self.bias
        return abmilp_pool(tokens, weight, bias, num_prefix_tokens=self.num_prefix_tokens,
                           return_weights=return_weights)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept the paper code's head: attention_predictor.0.weight [1, D] / .bias [1].
        ref_w, ref_b = prefix + "attention_predictor.0.weight", prefix + "attention_predictor.0.bias"
        if ref_w in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(ref_w)
            if ref_b in state_dict:
                state_dict[prefix + "bias"] = state_dict.pop(ref_b)
            for key in [k for k in state_dict if k.startswith(prefix + "pos_embed")]:
                state_dict.pop(key)  # the reference's unused positional embedding
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
