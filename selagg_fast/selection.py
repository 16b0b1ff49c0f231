"""Non-trainable token selections: weight vectors over the patch tokens read off a ViT's attention.

The paper's question (App. C.2, Table 5): can patches be selected without training a scorer?
Each method gives, per image, a weight vector over the N patch tokens of the probed block,
computed from that block's attention rows (the family's own logits, relative position bias and
RoPE included: ``attention_adapters``) for the one or two query tokens it needs
(``[B, H, Q, T]``, softmax over all T keys); never a ``T x T`` map. Definitions:
docs/statistics.md, "Attention selections".

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
from torch import nn

from .attention_adapters import attention_adapter, token_layout, vit_of
from .attention_methods import ATTENTION_METHODS

# the probed model's own weight vectors (attention_methods: the registry; the selector's row is another model's)
METHODS = tuple(m.weights for m in ATTENTION_METHODS if not m.selector)
CLS_METHODS = tuple(m.weights for m in ATTENTION_METHODS if not m.selector and m.query == "cls")


class _Stop(Exception):
    """Raised by the capture hook once the chosen block's rows exist: later blocks never run."""


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


def attention_rows_from_input(attn: nn.Module, x: torch.Tensor, queries: Sequence[int], *forward_args,
                              **forward_kwargs) -> torch.Tensor:
    """Softmax attention rows of the ``queries`` tokens over all keys: float32 ``[B, H, Q, T]``.

    ``attn`` is an attention layer of a supported family (``attention_adapters``), ``x`` its
    input ``[B, T, C]``, ``forward_args`` / ``forward_kwargs`` the other arguments of its call
    (BEiT's ``shared_rel_pos_bias``). The rows are ``softmax(q k^T * scale + bias)`` with the family's
    q, k and logit bias (q/k norms, q biases, RoPE, relative position bias), logits and softmax
    in float32; timm layers project only the query rows' q. The layer itself is not called.
    """
    qk = attention_adapter(attn).query_keys(attn, x, queries, *forward_args, **forward_kwargs)
    logits = (qk.q.float() * qk.scale) @ qk.k.float().transpose(-2, -1)
    if qk.bias is not None:
        logits = logits + qk.bias.float()
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
        vit = vit_of(model)
        n = len(vit.blocks)
        if not -n <= int(block) < n:
            raise ValueError(f"block {block} out of range: the model has {n} blocks (-{n} .. {n - 1})")
        self.attn = vit.blocks[int(block)].attn
        attention_adapter(self.attn)  # TypeError for an unsupported family, before any forward
        self.queries = [int(q) for q in queries]
        self.stop = stop
        self.rows = None
        self._handle = None

    def _hook(self, attn, args, kwargs):
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("x")
        if max(self.queries) >= x.shape[1]:
            raise ValueError(f"query token {max(self.queries)} out of range: the block sees {x.shape[1]} tokens")
        self.rows = attention_rows_from_input(attn, x, self.queries, *args[1:], **kwargs)
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
        model: a ViT whose attention family has an adapter (``attention_adapters``: timm
            VisionTransformer with registers / ``qk_norm``, timm Beit with its relative position
            bias, CAPIViT) or a selagg_fast ``Backbone`` (whose ``blocks`` end at its ``return_block``).
        images: ``[B, 3, H, W]``, normalised as the model expects (moved to its device).
        method: ``"cls_mean"``, ``"cls_min_entropy"`` (both need a [cls] token) or ``"center_mean"``.
        block: which block's attention (Python index; default the last one).
        renormalize: False returns the patch part of the (head-averaged) row as it is.

    Each row sums to 1 (``renormalize=True``). Cost: the forward up to that block (fused
    attention) plus its attention rows for one query token; later blocks are not run and the
    model is left as it was.
    """
    P, has_cls, grid = token_layout(model)
    query = method_query(method, grid, P, has_cls)
    device = next(vit_of(model).parameters()).device
    rows = attention_rows(model, images.to(device), [query], block)
    if rows.shape[-1] != P + grid[0] * grid[1]:
        raise ValueError(f"attention_selection: {rows.shape[-1]} tokens, expected {P} prefix + {grid[0]}x{grid[1]} "
                         "patches (an input of another size than the model's img_size?)")
    return weights_from_rows(rows, method, P, 0, renormalize)
