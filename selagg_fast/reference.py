"""Eager PyTorch semantics of every op in selagg_fast.

These functions compute the specification: the tests compare the Triton kernels against
them (in float64), and the ops fall back to them on CPU when the Triton interpreter is not active. They compute the formulas of
docs/semantics.md exactly (without the paper code's ``1e-6`` terms).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


def abmilp_pool_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    num_prefix_tokens: int = 0,
    return_weights: bool = False,
    compute_dtype: Optional[torch.dtype] = torch.float32,
    standardize: bool = False,
    eps: float = 1e-6,
):
    """Selective Aggregation (AbMILP) the eager way.

    x: [B, T, D]; weight: [D] or [K, D]; bias: None, scalar or [K].
    Returns pooled [B, D] / [B, K, D] in ``x.dtype`` (and the softmax weights
    [B, N] / [B, K, N] in float32 when ``return_weights``), N = T - num_prefix_tokens.
    ``compute_dtype`` is the accumulation dtype (float32, or float64 for tests);
    ``None`` computes in the inputs' own dtypes. ``standardize``: every pooled token is
    replaced by ``(x_t - mean_D(x_t)) / sqrt(var_D(x_t) + eps)`` (biased variance, as
    ``nn.LayerNorm`` without affine) in both the scores and the weighted sum.
    """
    single = weight.dim() == 1
    w = weight.reshape(-1, weight.shape[-1])  # [K, D]
    z = x[:, num_prefix_tokens:, :]
    if compute_dtype is not None:
        z = z.to(compute_dtype)
        w = w.to(compute_dtype)
    if standardize:
        z = torch.nn.functional.layer_norm(z, z.shape[-1:], eps=eps)
    # bmm on the strided token view, one GEMM per image: einsum would first copy the tokens
    scores = torch.bmm(z, w.t().expand(z.shape[0], -1, -1))  # [B, N, K]
    if bias is not None:
        scores = scores + bias.reshape(-1).to(scores.dtype)
    attn = torch.softmax(scores, dim=1)
    pooled = torch.bmm(attn.transpose(1, 2), z).to(x.dtype)  # [B, K, D]
    attn = attn.transpose(1, 2)  # [B, K, N]
    if single:
        pooled, attn = pooled[:, 0], attn[:, 0]
    if return_weights:
        return pooled, (attn.float() if attn.dtype != torch.float64 else attn).contiguous()
    return pooled


class AttentionStats(NamedTuple):
    """Per query-row attention statistics, float32 ``[B, H, T]`` each.

    self_attn:     A_ii, the attention a token pays to itself.
    prefix_attn:   sum_{j<P} A_ij, the mass on the prefix ([cls] and register) keys.
    patch_entropy: entropy (nats) of row i restricted to the patch keys j >= P and
                   renormalised; over all keys when P = 0.
    cls_attn:      A_i0, the attention paid to key 0 ([cls] when P > 0); equals
                   prefix_attn when P = 1, differs with registers.
    """

    self_attn: torch.Tensor
    prefix_attn: torch.Tensor
    patch_entropy: torch.Tensor
    cls_attn: torch.Tensor


def attention_with_stats_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    num_prefix_tokens: int = 1,
    bias: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
):
    """Attention output and per-row statistics from the materialised map.

    q, k, v: [B, H, T, d]; bias: optional [H, T, T] logit bias shared by every image (BEiT's
    relative position bias), added after scaling: ``softmax(q k^T * scale + bias[h])``.
    Returns (out [B, H, T, d] in q.dtype, AttentionStats of the biased attention).
    """
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    P = num_prefix_tokens
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    s = torch.einsum("bhid,bhjd->bhij", qc, kc) * scale
    if bias is not None:
        s = s + bias.to(compute_dtype)
    attn = torch.softmax(s, dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, vc).to(q.dtype)
    self_attn = torch.diagonal(attn, dim1=-2, dim2=-1)
    prefix = attn[..., :P].sum(-1)
    patch_logits = s[..., P:]
    log_p = torch.log_softmax(patch_logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    stats = AttentionStats(self_attn.float(), prefix.float(), entropy.float(), attn[..., 0].float())
    return out, stats


# Columns that read token 0 as [cls]; absent for models without one.
CLS_COLUMNS = ("cls_cls_attention", "cls_cls_attention_adj_for_cls", "cls_pos_attention", "cls_pos_entropy",
               "pos_cls_attention")


def attention_stats_columns(stats: AttentionStats, num_prefix_tokens: int) -> dict:
    """The paper code's per-image columns from per-row statistics.

    Returns a dict of column name -> float64 [B, H] tensors (one value per image and
    head). Columns that need a [cls] token are absent when num_prefix_tokens == 0.
    Definitions: docs/statistics.md, table of columns.
    """
    P = num_prefix_tokens
    self_attn = stats.self_attn.double()
    prefix = stats.prefix_attn.double()
    entropy = stats.patch_entropy.double()
    den = 1.0 - prefix  # mass on patch keys
    cols = {
        "pos_self_attention": self_attn[..., P:].mean(-1),
        "pos_self_attention_adj_for_cls": (self_attn[..., P:] / den[..., P:]).mean(-1),
        "pos_pos_entropy": entropy[..., P:].mean(-1),
    }
    if P > 0:
        n_patches = self_attn.shape[-1] - P
        cols.update(
            cls_cls_attention=self_attn[..., 0],
            cls_cls_attention_adj_for_cls=self_attn[..., 0] / den[..., 0],
            cls_pos_attention=den[..., 0] / n_patches,
            cls_pos_entropy=entropy[..., 0],
            pos_cls_attention=stats.cls_attn.double()[..., P:].mean(-1),
        )
    return cols


def softmax_pool_reference(
    scores: torch.Tensor,
    x: torch.Tensor,
    *,
    num_prefix_tokens: int = 0,
    return_weights: bool = False,
    compute_dtype: Optional[torch.dtype] = torch.float32,
):
    """Softmax over given scores, then the weighted sum of the pooled tokens.

    scores: [B, N] or [B, K, N] (any float dtype; -inf masks a token); x: [B, T, D] with
    N = T - num_prefix_tokens. Returns pooled [B, D] / [B, K, D] in ``x.dtype`` (and the
    weights, float32, when ``return_weights``). A row whose scores are all -inf gives NaN
    (as ``torch.softmax`` does). ``compute_dtype`` as in ``abmilp_pool_reference``.
    """
    single = scores.dim() == 2
    s = scores.unsqueeze(1) if single else scores  # [B, K, N]
    z = x[:, num_prefix_tokens:, :]
    if compute_dtype is not None:
        z, s = z.to(compute_dtype), s.to(compute_dtype)
    attn = torch.softmax(s, dim=-1)
    pooled = torch.einsum("bkt,btd->bkd", attn.to(z.dtype), z).to(x.dtype)
    if single:
        pooled, attn = pooled[:, 0], attn[:, 0]
    if return_weights:
        return pooled, attn.float() if attn.dtype != torch.float64 else attn
    return pooled


def mlp_scores_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor] = None,
    *,
    activation: str = "tanh",
    num_prefix_tokens: int = 0,
    compute_dtype: Optional[torch.dtype] = torch.float32,
) -> torch.Tensor:
    """The reference head's depth-2 scorer: s_t = w2 · act(W1 z_t + b1) + b2 for the pooled tokens.

    x: [B, T, D]; w1: [Dh, D]; b1: None or [Dh]; w2: [Dh] or [K, Dh]; b2: None, scalar or [K].
    Returns float32 scores [B, N] (w2 one-dimensional) or [B, K, N], N = T - num_prefix_tokens
    (float64 when computing in float64). ``compute_dtype`` as in ``abmilp_pool_reference``.
    """
    act = {"tanh": torch.tanh, "relu": torch.relu}[activation]
    z = x[:, num_prefix_tokens:, :]
    w2k = w2.reshape(-1, w2.shape[-1])  # [K, Dh]
    if compute_dtype is not None:
        z, w1, w2k = z.to(compute_dtype), w1.to(compute_dtype), w2k.to(compute_dtype)
    h = torch.nn.functional.linear(z, w1, None if b1 is None else b1.to(w1.dtype))  # [B, N, Dh]
    s = torch.nn.functional.linear(act(h), w2k, None if b2 is None else b2.reshape(-1).to(w2k.dtype))  # [B, N, K]
    s = s.transpose(1, 2)
    if w2.dim() == 1:
        s = s[:, 0]
    return s if s.dtype == torch.float64 else s.float()
