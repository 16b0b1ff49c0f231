"""One adapter per attention family: its q, k, v, logit bias and output projection.

The attention statistics (``modules.record_attention_stats``) and the attention rows of the
token selections (``selection.capture_attention_rows``) both replace or watch a backbone's
attention layer; they read its maths here, so every family is supported by both or by neither:

- timm ``vision_transformer.Attention`` (MAE, DINO, iBOT, MoCo-v3, I-JEPA, DINOv2 with or without
  registers, ``qk_norm``): one ``qkv`` Linear, ``q_norm`` / ``k_norm``, then ``norm``, ``gate``
  and ``proj`` on the merged heads;
- timm ``beit.Attention`` (BEiT, BEiT-v2, SimMIM): ``qkv`` without bias plus ``q_bias`` /
  ``v_bias`` (the key bias is zero), and a relative position bias added to the logits: the
  block's own table, the model's shared one (passed as ``shared_rel_pos_bias=``) or both;
- any module with ``heads(x) -> (q, k, v, bias, scale)`` and ``merge_heads(out) -> [B, T, D]``
  (the project's CAPI attention: RoPE applied inside ``heads``).

An adapter's ``heads`` returns what the softmax sees, ``softmax(q k^T * scale + bias)``; the
layer's own forward computes the same (the validators accept a class only where its forward is
the family's, not a subclass that overrides it). :func:`token_layout` is the one place that
reads a model's prefix tokens, [cls] and patch grid.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class AttentionHeads(NamedTuple):
    """Per-head inputs of one attention call: ``q, k, v [B, H, T, d]`` (after q/k norms, q/v biases
    and rotary embeddings), ``bias`` an additive logit bias ``[H, T, T]`` shared by the batch or
    None, and ``scale`` the logit scale."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float


class QueryKeys(NamedTuple):
    """What one block's attention rows need: ``q [B, H, Q, d]`` of the query tokens only, every
    key ``k [B, H, T, d]``, the bias rows ``[H, Q, T]`` (or None) and the scale."""
    q: torch.Tensor
    k: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float


class TokenLayout(NamedTuple):
    """A ViT's token order: ``num_prefix_tokens`` ([cls] first when ``has_cls``, then registers)
    before the ``grid = (rows, cols)`` patch tokens, row-major."""
    num_prefix_tokens: int
    has_cls: bool
    grid: tuple


def _rows(t: torch.Tensor, queries: Sequence[int], dim: int) -> torch.Tensor:
    # basic indexing per query: an index tensor would be a host-to-device copy (a sync) per batch
    return torch.stack([t.select(dim, int(i)) for i in queries], dim)


def _split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, T, H * d] -> [B, H, T, d]``."""
    B, T, _ = t.shape
    return t.reshape(B, T, num_heads, -1).transpose(1, 2)


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, d] -> [B, T, H * d]``."""
    B, H, T, d = out.shape
    return out.transpose(1, 2).reshape(B, T, H * d)


def _query_keys_from_qkv(x, weight, bias, num_heads, queries, q_norm=None, k_norm=None):
    """q of the query tokens and k of every token from a fused ``qkv`` weight ``[3 * H * d, C]``:
    neither the values nor the other tokens' queries are projected."""
    dim = weight.shape[0] // 3
    q = F.linear(_rows(x, queries, 1), weight[:dim], None if bias is None else bias[:dim])
    k = F.linear(x, weight[dim:2 * dim], None if bias is None else bias[dim:2 * dim])
    q, k = _split_heads(q, num_heads), _split_heads(k, num_heads)
    return (q, k) if q_norm is None else (q_norm(q), k_norm(k))


class AttentionAdapter:
    """The interface: ``matches(attn)``, ``heads(attn, x, **forward_kwargs) -> AttentionHeads``,
    ``finish(attn, out [B, H, T, d], x) -> y [B, T, D]`` (the layer's output) and
    ``query_keys(attn, x, queries, **forward_kwargs) -> QueryKeys`` (by default from ``heads``)."""

    name = "attention"

    def matches(self, attn: nn.Module) -> bool:
        raise NotImplementedError

    def heads(self, attn: nn.Module, x: torch.Tensor, **forward_kwargs) -> AttentionHeads:
        raise NotImplementedError

    def finish(self, attn: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def query_keys(self, attn: nn.Module, x: torch.Tensor, queries: Sequence[int], **forward_kwargs) -> QueryKeys:
        h = self.heads(attn, x, **forward_kwargs)
        bias = None if h.bias is None else _rows(h.bias, queries, 1)
        return QueryKeys(_rows(h.q, queries, 2), h.k, bias, h.scale)


def _same_forward(attn: nn.Module, cls) -> bool:
    return cls is not None and isinstance(attn, cls) and type(attn).forward is cls.forward


class TimmVitAttention(AttentionAdapter):
    """timm ``vision_transformer.Attention``: ``softmax(q_norm(q) k_norm(k)^T * scale) v``, then
    ``norm``, ``* sigmoid(gate(x))`` where present, ``proj``."""

    name = "timm vision_transformer.Attention"

    def __init__(self):
        try:
            from timm.models.vision_transformer import Attention
        except ImportError:  # a timm without this layer: nothing can match
            Attention = None
        self.cls = Attention

    def matches(self, attn):
        return _same_forward(attn, self.cls)

    @staticmethod
    def _no_mask(attn_mask, is_causal):
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks (attn_mask / is_causal) are not supported by the attention statistics "
                             "or selections")

    def heads(self, attn, x, attn_mask=None, is_causal=False):
        self._no_mask(attn_mask, is_causal)
        B, T, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return AttentionHeads(attn.q_norm(q), attn.k_norm(k), v, None, attn.scale)

    def finish(self, attn, out, x):
        y = _merge_heads(out)
        if getattr(attn, "norm", None) is not None:
            y = attn.norm(y)
        if getattr(attn, "gate", None) is not None:
            y = y * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(y))

    def query_keys(self, attn, x, queries, attn_mask=None, is_causal=False):
        self._no_mask(attn_mask, is_causal)
        q, k = _query_keys_from_qkv(x, attn.qkv.weight, attn.qkv.bias, attn.num_heads, queries,
                                    attn.q_norm, attn.k_norm)
        return QueryKeys(q, k, None, attn.scale)


class TimmBeitAttention(AttentionAdapter):
    """timm ``beit.Attention``: ``qkv`` with the bias ``[q_bias, 0, v_bias]``, logits
    ``q k^T * scale + rel_pos_bias`` (the block's table and / or ``shared_rel_pos_bias``), ``proj``."""

    name = "timm beit.Attention"

    def __init__(self):
        try:
            from timm.models.beit import Attention
        except ImportError:
            Attention = None
        self.cls = Attention

    def matches(self, attn):
        return _same_forward(attn, self.cls)

    @staticmethod
    def _qkv_bias(attn):
        # k_bias is timm's zero buffer: the same concatenation as the layer's forward
        return None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))

    @staticmethod
    def logit_bias(attn, shared_rel_pos_bias=None) -> Optional[torch.Tensor]:
        """The relative position bias ``[H, T, T]`` this call adds to the scaled logits, or None."""
        bias = None
        if attn.relative_position_bias_table is not None:
            bias = attn._get_rel_pos_bias()[0]  # [1, H, T, T] -> [H, T, T]
        if shared_rel_pos_bias is not None:
            shared = shared_rel_pos_bias
            if shared.dim() == 4:
                if shared.shape[0] != 1:
                    raise ValueError(f"shared_rel_pos_bias: expected [H, T, T] or [1, H, T, T], got "
                                     f"{tuple(shared.shape)}")
                shared = shared[0]
            bias = shared if bias is None else bias + shared
        return bias

    def heads(self, attn, x, shared_rel_pos_bias=None):
        qkv = F.linear(x, attn.qkv.weight, self._qkv_bias(attn))
        B, T, _ = x.shape
        q, k, v = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return AttentionHeads(q, k, v, self.logit_bias(attn, shared_rel_pos_bias), attn.scale)

    def finish(self, attn, out, x):
        return attn.proj_drop(attn.proj(_merge_heads(out)))

    def query_keys(self, attn, x, queries, shared_rel_pos_bias=None):
        q, k = _query_keys_from_qkv(x, attn.qkv.weight, self._qkv_bias(attn), attn.num_heads, queries)
        bias = self.logit_bias(attn, shared_rel_pos_bias)
        return QueryKeys(q, k, None if bias is None else _rows(bias, queries, 1), attn.scale)


class HeadsAttention(AttentionAdapter):
    """A module that exposes its own maths: ``attn.heads(x, **kwargs) -> (q, k, v, bias, scale)``
    and ``attn.merge_heads(out [B, H, T, d]) -> [B, T, D]`` (the layer's output), as the CAPI
    attention of :mod:`selagg_fast.capi` does."""

    name = "a module with heads() / merge_heads() (CAPI)"

    def matches(self, attn):
        return callable(getattr(attn, "heads", None)) and callable(getattr(attn, "merge_heads", None))

    def heads(self, attn, x, **forward_kwargs):
        return AttentionHeads(*attn.heads(x, **forward_kwargs))

    def finish(self, attn, out, x):
        return attn.merge_heads(out)


ADAPTERS = (TimmVitAttention(), TimmBeitAttention(), HeadsAttention())


def attention_adapter(attn: nn.Module) -> AttentionAdapter:
    """The adapter of ``attn``'s family; TypeError naming the type when none fits."""
    for adapter in ADAPTERS:
        if adapter.matches(attn):
            return adapter
    kind = f"{type(attn).__module__}.{type(attn).__qualname__}"
    raise TypeError(f"unsupported attention layer {kind}: the attention statistics and selections support "
                    + ", ".join(a.name for a in ADAPTERS))


def vit_of(model: nn.Module) -> nn.Module:
    """The ViT that holds ``blocks`` and ``patch_embed``: ``model`` itself or a wrapper's ``.model``
    (a selagg_fast ``Backbone``)."""
    vit = model if hasattr(model, "blocks") else getattr(model, "model", None)
    if vit is None or getattr(vit, "blocks", None) is None or not hasattr(vit, "patch_embed"):
        raise TypeError(f"expected a ViT (timm VisionTransformer / Beit, CAPIViT: .blocks and .patch_embed) or a "
                        f"selagg_fast Backbone, got {type(model).__name__}")
    return vit


def attention_layers(model: nn.Module) -> list:
    """``(block, attn, adapter)`` for every block of ``model``'s ViT; TypeError for an unsupported
    attention layer or a block without ``.attn``."""
    out = []
    for i, block in enumerate(vit_of(model).blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.Module):
            raise TypeError(f"block {i} ({type(block).__name__}) has no attention module .attn")
        out.append((block, attn, attention_adapter(attn)))
    return out


def token_layout(model: nn.Module) -> TokenLayout:
    """Prefix tokens, [cls] and patch grid of a timm ViT / Beit, a CAPIViT or a Backbone of one.

    ``has_cls``: a ``cls_token`` parameter (timm puts it first); ``num_prefix_tokens``: the
    model's own count ([cls] plus registers), else 1 with [cls] and 0 without;
    ``grid``: ``patch_embed.grid_size``.
    """
    vit = vit_of(model)
    has_cls = getattr(vit, "cls_token", None) is not None
    P = getattr(vit, "num_prefix_tokens", None)
    P = int(has_cls) if P is None else int(P)
    if P < int(has_cls):
        raise ValueError(f"{type(vit).__name__}: num_prefix_tokens={P} but the model has a [cls] token")
    grid = getattr(vit.patch_embed, "grid_size", None)
    if grid is None:
        raise TypeError(f"{type(vit).__name__}: patch_embed has no grid_size")
    return TokenLayout(P, has_cls, tuple(int(g) for g in grid))
