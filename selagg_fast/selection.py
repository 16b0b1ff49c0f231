"""Non-trainable token selections: weight vectors over the patch tokens read off a ViT's attention.

The paper's question (App. C.2, Table 5): can patches be selected without training a scorer?
Each method gives, per image, a weight vector over the N patch tokens of the probed block,
computed from that block's attention rows for the one or two query tokens it needs
(``[B, H, Q, T]``, softmax over all T keys); never a ``T x T`` map. Definitions:
``shared/reference-semantics.md``, "Non-trainable token aggregations".

- ``cls_mean``: ``renorm(mean_h A_h[0, :])`` (heads averaged before renormalising);
- ``cls_min_entropy``: per image the head whose ``renorm(A_h[0, :])`` has the lowest entropy;
- ``center_mean``: ``renorm(mean_h A_h[c, :])`` for the central patch ``c`` (row and column
  ``floor(g / 2) - 1`` of each grid side).

``renorm(r) = r[P:] / sum r[P:]`` over the patch keys. With ``renormalize=False`` the patch part
is returned as it is (``mean_h A_h[0, P:]`` for ``cls_mean``): the paper's weights when another
model's [cls] attention aggregates a probed model's tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("cls_mean", "cls_min_entropy", "center_mean")
CLS_METHODS = ("cls_mean", "cls_min_entropy")


class _Stop(Exception):
    """Raised by the capture hook once the chosen block's rows exist: later blocks never run."""


def _vit(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer of ``model`` (itself, or a :class:`~selagg_fast.backbone.Backbone`'s)."""
    vit = getattr(model, "model", model) if not hasattr(model, "blocks") else model
    blocks = getattr(vit, "blocks", None)
    # timm's vit Attention: one qkv Linear, q_norm / k_norm (Identity without qk_norm); BEiT-style
    # attention (separate q/v biases, relative position bias) computes other logits
    if blocks is None or not hasattr(vit, "patch_embed") or not all(
            hasattr(b, "attn") and isinstance(getattr(b.attn, "qkv", None), nn.Linear)
            and hasattr(b.attn, "q_norm") and hasattr(b.attn, "k_norm") for b in blocks):
        raise TypeError("attention_selection: expected a timm VisionTransformer (model.blocks[i].attn with qkv, "
                        f"q_norm, k_norm) or a selagg_fast Backbone, got {type(model).__name__}")
    return vit


def model_tokens(model: nn.Module) -> tuple:
    """``(num_prefix_tokens, has_cls, (grid rows, grid cols))`` of a timm ViT or Backbone."""
    vit = _vit(model)
    has_cls = getattr(vit, "cls_token", None) is not None
    P = int(getattr(vit, "num_prefix_tokens", 1 if has_cls else 0))
    return P, has_cls, tuple(int(g) for g in vit.patch_embed.grid_size)


def center_query(grid: Sequence[int], num_prefix_tokens: int) -> int:
    """Token index of the central patch: row and column ``floor(g / 2) - 1`` of each side (the
    reference's k = 1 block ``[c - ceil(k/2), c + floor(k/2))``, ``c = floor(g / 2)``)."""
    rows, cols = grid
    r, c = max(rows // 2 - 1, 0), max(cols // 2 - 1, 0)
    return num_prefix_tokens + r * cols + c


def method_query(method: str, grid: Sequence[int], num_prefix_tokens: int, has_cls: bool) -> int:
    """The query token whose attention row ``method`` reads; clear errors for unknown or impossible methods."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}: choose one of {', '.join(METHODS)}")
    if method in CLS_METHODS:
        if not has_cls:
            raise ValueError(f"selection method {method!r} needs a [cls] token; the model has none "
                             f"(use center_mean)")
        return 0
    return center_query(grid, num_prefix_tokens)


def attention_rows_from_input(attn: nn.Module, x: torch.Tensor, queries: Sequence[int]) -> torch.Tensor:
    """Softmax attention rows of the ``queries`` tokens over all keys: float32 ``[B, H, Q, T]``.

    ``attn`` is a timm ``Attention`` and ``x`` its input ``[B, T, C]``. Only the query rows' q
    and every key's k are projected (q/k norms applied as the layer does); logits and softmax in
    float32. The layer itself is not called.
    """
    B, T, _ = x.shape
    H = attn.num_heads
    dim = attn.qkv.out_features // 3
    w, b = attn.qkv.weight, attn.qkv.bias
    # basic indexing per query: an index tensor would be a host-to-device copy (a sync) per batch
    q_in = torch.stack([x[:, int(i)] for i in queries], 1)  # [B, Q, C]
    q = F.linear(q_in, w[:dim], None if b is None else b[:dim])
    k = F.linear(x, w[dim:2 * dim], None if b is None else b[dim:2 * dim])
    q = attn.q_norm(q.reshape(B, q_in.shape[1], H, -1).transpose(1, 2))
    k = attn.k_norm(k.reshape(B, T, H, -1).transpose(1, 2))
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
    return logits.softmax(-1)


class capture_attention_rows:
    """Context manager: during the forwards inside it, block ``block``'s attention input gives the
    rows of the ``queries`` tokens (``[B, H, Q, T]`` float32, in ``.rows`` after each forward)
    while the model runs as usual (its own fused attention everywhere). ``stop=True`` ends the
    forward there with an internal exception (the chosen block's attention and the later blocks
    do not run); :func:`attention_rows` catches it. A forward pre-hook is the only change to the
    model, removed on exit, also after an exception.

    Usage (the probe's tokens and the rows from one pass)::

        with capture_attention_rows(backbone, [0, center_query(grid, P)]) as cap:
            tokens = backbone(images)
        w = weights_from_rows(cap.rows, "cls_mean", P, query=0)
    """

    def __init__(self, model: nn.Module, queries: Sequence[int], block: int = -1, stop: bool = False):
        vit = _vit(model)
        n = len(vit.blocks)
        if not -n <= int(block) < n:
            raise ValueError(f"block {block} out of range: the model has {n} blocks (-{n} .. {n - 1})")
        self.attn = vit.blocks[int(block)].attn
        self.queries = [int(q) for q in queries]
        self.stop = stop
        self.rows = None
        self._handle = None

    def _hook(self, attn, args, kwargs):
        x = args[0] if args else kwargs["x"]
        if max(self.queries) >= x.shape[1]:
            raise ValueError(f"query token {max(self.queries)} out of range: the block sees {x.shape[1]} tokens")
        self.rows = attention_rows_from_input(attn, x, self.queries)
        if self.stop:
            raise _Stop

    def __enter__(self) -> "capture_attention_rows":
        self._handle = self.attn.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


def run_tokens(model: nn.Module, images: torch.Tensor):
    """The forward the selection rides on: a Backbone's own, else ``forward_features``."""
    return model.forward_features(images) if hasattr(model, "blocks") else model(images)


@torch.no_grad()
def attention_rows(model: nn.Module, images: torch.Tensor, queries: Sequence[int], block: int = -1) -> torch.Tensor:
    """Block ``block``'s attention rows of the ``queries`` tokens, ``[B, H, Q, T]`` float32; the
    forward stops at that block's attention (later blocks are not run)."""
    capture = capture_attention_rows(model, queries, block, stop=True)
    with capture:
        try:
            run_tokens(model, images)
        except _Stop:
            pass
    if capture.rows is None:
        raise RuntimeError("attention_rows: the forward never reached the chosen block's attention")
    return capture.rows


def _entropy(a: torch.Tensor) -> torch.Tensor:
    return -(a * a.clamp_min(1e-30).log()).sum(-1)


def weights_from_rows(rows: torch.Tensor, method: str, num_prefix_tokens: int, query: int = 0,
                      renormalize: bool = True) -> torch.Tensor:
    """One method's ``[B, N]`` float32 weights from attention rows ``[B, H, Q, T]``; ``query``: the
    index in Q of the row the method reads (see :func:`method_query`)."""
    P = num_prefix_tokens
    row = rows[:, :, query, P:].float()  # [B, H, N]
    if method == "cls_min_entropy":
        per_head = row / row.sum(-1, keepdim=True)
        best = _entropy(per_head).argmin(1)  # [B]
        picked = row.gather(1, best[:, None, None].expand(-1, 1, row.shape[-1]))[:, 0]
    elif method in ("cls_mean", "center_mean"):
        picked = row.mean(1)
    else:
        raise ValueError(f"unknown selection method {method!r}: choose one of {', '.join(METHODS)}")
    return picked / picked.sum(-1, keepdim=True) if renormalize else picked


def attention_selection(model: nn.Module, images: torch.Tensor, method: str, *, block: int = -1,
                        renormalize: bool = True) -> torch.Tensor:
    """Weights over the patch tokens from a ViT's attention, without training: float32 ``[B, N]``.

    Args:
        model: a timm VisionTransformer (registers and ``qk_norm`` included) or a selagg_fast
            ``Backbone`` (whose ``blocks`` end at its ``return_block``).
        images: ``[B, 3, H, W]``, normalised as the model expects (moved to its device).
        method: ``"cls_mean"``, ``"cls_min_entropy"`` (both need a [cls] token) or ``"center_mean"``.
        block: which block's attention (Python index; default the last one).
        renormalize: False returns the patch part of the (head-averaged) row as it is.

    Each row sums to 1 (``renormalize=True``). Cost: the forward up to that block (fused
    attention) plus its attention rows for one query token; later blocks are not run and the
    model is left as it was.
    """
    P, has_cls, grid = model_tokens(model)
    query = method_query(method, grid, P, has_cls)
    device = next(_vit(model).parameters()).device
    rows = attention_rows(model, images.to(device), [query], block)
    if rows.shape[-1] != P + grid[0] * grid[1]:
        raise ValueError(f"attention_selection: {rows.shape[-1]} tokens, expected {P} prefix + {grid[0]}x{grid[1]} "
                         "patches (an input of another size than the model's img_size?)")
    return weights_from_rows(rows, method, P, 0, renormalize)
