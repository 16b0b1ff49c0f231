"""Attentive probing (timm's ``AttentionPoolLatent``) computed through the fold.

With one learned query per head and no q/k normalisation, head h's logit for token t is
``z_t · u_h + c_h`` with ``u_h = W_k,hᵀ q_h / √d`` and ``c_h = q_h · b_k,h / √d`` the same for
every token (it cancels in the softmax). Head h's output is ``W_v,h p_h + b_v,h`` with
``p_h = Σ_t a_{h,t} z_t``. So an H-head attentive pool is an H-branch ``abmilp_pool`` with
weights ``u_h`` followed by tiny per-head matrices on ``[B, H, D]``: no key or value of any
token is computed. A token LayerNorm ``z = γ ∘ x̂ + β`` folds too: the pool standardises the
tokens on the fly with weights ``γ ∘ u_h``, and ``γ ∘ p + β`` follows the pool.
Maths: docs/semantics.md ("Attentive probing"); API: docs/api.md ("AttentivePooling",
"The pooling protocol").
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .branches import PoolingProtocol

NAME = "AttentivePooling"
TOKEN_NORM_EPS = 1e-6


class _Mlp(nn.Module):
    """timm's ``Mlp`` (fc1 -> GELU -> fc2) with its state-dict keys; its dropouts are 0."""

    def __init__(self, dim: int, hidden: int, **dd):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **dd)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{NAME}: {name} must be a positive int, got {value!r}")
    return value


class AttentivePooling(PoolingProtocol, nn.Module):
    """Attentive probe: one learned latent query, ``num_heads`` heads, over the patch tokens.

    Parameters, initialisation and state-dict keys are those of timm's
    ``AttentionPoolLatent(dim, num_heads=H, mlp_ratio=mlp_ratio, qkv_bias=True, latent_len=1,
    norm_layer=nn.LayerNorm)``: ``latent [1, 1, D]``, ``q``, ``kv``, ``proj``, ``norm``,
    ``mlp.fc1``, ``mlp.fc2``; a state dict of either loads into the other. ``token_norm=True``
    adds ``token_norm = nn.LayerNorm(dim, eps=1e-6)`` on the tokens before keys and values
    (V-JEPA / CAE practice); the pool folds its affine parameters and standardises the tokens
    on the fly.

    ``forward(tokens [B, T, D], return_weights=False)`` pools tokens ``num_prefix_tokens..T-1``
    and returns ``[B, D]`` (and the float32 attention weights ``[B, H, N]``). It equals timm's
    module on the patch tokens, gradients included, but never computes keys or values:
    ``forward = finish(pool_branches(tokens, *branch_weights(), ...))`` (the pooling protocol of
    ``selagg_fast.branches``: H branches, no bias, finished on ``[B, H, D]``).
    """

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, token_norm: bool = False,
                 num_prefix_tokens: int = 1, device=None, dtype=None):
        super().__init__()
        dim = _positive_int("dim", dim)
        num_heads = _positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"{NAME}: num_heads={num_heads} does not divide dim={dim}")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"{NAME}: num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
        hidden = int(dim * mlp_ratio)
        if hidden <= 0:
            raise ValueError(f"{NAME}: mlp_ratio={mlp_ratio} gives no MLP hidden units for dim={dim}")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.mlp_ratio = mlp_ratio
        self.num_prefix_tokens = num_prefix_tokens
        # created in timm's order, so that one seed gives timm's initial parameters
        self.latent = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.q = nn.Linear(dim, dim, **dd)
        self.kv = nn.Linear(dim, 2 * dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        self.mlp = _Mlp(dim, hidden, **dd)
        self.token_norm = nn.LayerNorm(dim, eps=TOKEN_NORM_EPS, **dd) if token_norm else None
        self.reset_latent()

    def reset_latent(self) -> None:
        """timm's ``trunc_normal_tf_(latent, std=D ** -0.5)``: N(0, 1) cut at ±2 (by its inverse-CDF
        draw, so that one seed gives timm's values), then scaled."""
        lo, hi = (1 + math.erf(-2 / math.sqrt(2))) / 2, (1 + math.erf(2 / math.sqrt(2))) / 2
        with torch.no_grad():
            self.latent.uniform_(2 * lo - 1, 2 * hi - 1).erfinv_().mul_(math.sqrt(2.0)).clamp_(-2.0, 2.0)
            self.latent.mul_(self.dim ** -0.5)

    @property
    def standardize(self) -> bool:
        """True when the pool must standardise the tokens (``token_norm``)."""
        return self.token_norm is not None

    @property
    def eps(self) -> Optional[float]:
        return self.token_norm.eps if self.token_norm is not None else None

    @property
    def out_features(self) -> int:
        return self.dim

    def branch_weights(self):
        """``(folded_queries() [H, D], None)``: the branches of the shared pooling call (the key
        bias cancels in the softmax)."""
        return self.folded_queries(), None

    def folded_queries(self) -> torch.Tensor:
        """The pool's weights ``[H, D]``: ``u_h = W_k,hᵀ q_h / √d`` (times γ with ``token_norm``).

        Computed in the parameters' dtype (autocast off: D² multiply-adds), from the
        parameters every call, so autograd carries their gradients to ``latent``, ``q``, ``kv``.
        """
        H, d, D = self.num_heads, self.head_dim, self.dim
        with torch.autocast(self.latent.device.type, enabled=False):
            q = F.linear(self.latent.reshape(1, D), self.q.weight, self.q.bias).view(H, 1, d)
            w_k = self.kv.weight[:D].view(H, d, D)
            u = torch.bmm(q, w_k).view(H, D) * (d ** -0.5)  # [H, D]
            if self.token_norm is not None:
                u = u * self.token_norm.weight
        return u

    def finish(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, H, D]`` pooled tokens (standardised ones with ``token_norm``) -> ``[B, D]``.

        Applies γ/β (``token_norm``), the per-head value maps ``W_v,h p_h + b_v,h``, ``proj``
        and ``o + mlp(norm(o))``, as timm does after its attention.
        """
        H, d, D = self.num_heads, self.head_dim, self.dim
        if pooled.dim() != 3 or pooled.shape[1:] != (H, D):
            raise ValueError(f"{NAME}: pooled must be [B, H={H}, D={D}], got shape {tuple(pooled.shape)}")
        B = pooled.shape[0]
        pooled = pooled.to(self.kv.weight.dtype)
        if self.token_norm is not None:
            pooled = torch.addcmul(self.token_norm.bias, pooled, self.token_norm.weight)
        w_v = self.kv.weight[D:].view(H, d, D)
        o = torch.einsum("bhc,hdc->bhd", pooled, w_v).reshape(B, D) + self.kv.bias[D:]
        o = self.proj(o)
        return o + self.mlp(self.norm(o))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, mlp_ratio={self.mlp_ratio}, "
                f"token_norm={self.standardize}, num_prefix_tokens={self.num_prefix_tokens}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _refuse_unfoldable_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @classmethod
    def from_timm(cls, module: nn.Module, *, num_prefix_tokens: int = 1) -> "AttentivePooling":
        """An ``AttentivePooling`` with the parameters of timm's ``AttentionPoolLatent`` ``module``.

        Refuses, with ``ValueError``, what breaks the fold (q/k normalisation, several latents,
        position embeddings) and layouts this class does not hold (no q projection, no qkv bias,
        latent or embed width unlike the input width, a different output width, pre-logits
        mode, a norm other than LayerNorm, an activation other than exact GELU).
        """
        name = type(module).__name__
        if name != "AttentionPoolLatent":
            raise TypeError(f"{NAME}.from_timm: expected timm's AttentionPoolLatent, got {name}")
        problems = []
        if getattr(module, "pos_embed", None) is not None:
            problems.append("position embeddings (pos_embed='abs') break the fold")
        if not isinstance(module.q_norm, nn.Identity) or not isinstance(module.k_norm, nn.Identity):
            problems.append("q/k normalisation (qk_norm=True) breaks the fold")
        if module.latent_len != 1:
            problems.append(f"latent_len={module.latent_len}: several latents are not supported (one query per head)")
        if not isinstance(module.q, nn.Linear):
            problems.append("q_proj=False (no query projection) is not this layout")
        dim = module.kv.in_features
        if module.latent.shape[-1] != dim or module.kv.out_features != 2 * dim:
            problems.append(f"latent/embed width {module.latent.shape[-1]}/{module.kv.out_features // 2} "
                            f"differs from the input width {dim}")
        if module.kv.bias is None or (isinstance(module.q, nn.Linear) and module.q.bias is None):
            problems.append("qkv_bias=False is not this layout")
        if module.mlp is None or not isinstance(module.proj, nn.Linear):
            problems.append("pre-logits mode (out_features=0) is not this layout")
        elif module.proj.out_features != dim:
            problems.append(f"out_features={module.proj.out_features} differs from the input width {dim}")
        if not isinstance(module.norm, nn.LayerNorm):
            problems.append(f"norm {type(module.norm).__name__} is not nn.LayerNorm (use norm_layer=nn.LayerNorm)")
        if module.mlp is not None and not (type(module.mlp.act) is nn.GELU and module.mlp.act.approximate == "none"):
            problems.append(f"MLP activation {module.mlp.act} is not nn.GELU()")
        if problems:
            raise ValueError(f"{NAME}.from_timm: cannot fold this AttentionPoolLatent: " + "; ".join(problems))
        hidden = module.mlp.fc1.out_features
        ref = module.kv.weight
        new = cls(dim, module.num_heads, mlp_ratio=hidden / dim, num_prefix_tokens=num_prefix_tokens,
                  device=ref.device, dtype=ref.dtype)
        if new.mlp.fc1.out_features != hidden:
            raise ValueError(f"{NAME}.from_timm: MLP hidden width {hidden} is not int(dim * ratio) for any ratio")
        new.norm.eps = module.norm.eps
        new.load_state_dict(module.state_dict())
        return new


def _refuse_unfoldable_keys(state_dict, prefix: str) -> None:
    """A state dict of a configuration that breaks the fold is refused, never approximated."""
    keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    problems = []
    if "pos_embed" in keys:
        problems.append("'pos_embed' (position embeddings break the fold)")
    qk = sorted(k for k in keys if k.startswith(("q_norm.", "k_norm.")))
    if qk:
        problems.append(f"{qk} (q/k normalisation breaks the fold)")
    latent = state_dict.get(prefix + "latent")
    if latent is not None and latent.dim() == 3 and latent.shape[1] != 1:
        problems.append(f"'latent' of shape {tuple(latent.shape)} (several latents; one query per head is supported)")
    if problems:
        raise ValueError(f"{NAME}: the state dict holds " + ", ".join(problems))
