"""The non-trainable aggregation methods, each declared once with every name it goes by.

Such a method pools the probed tokens with a weight vector read off attention (no trained scorer:
only the probe's BatchNorm + Linear train). Its one name is the probe head's (``--heads``,
``compare --methods``, ``results.json``, ``compare.json``); ``weights`` names the attention-derived
weight vector (:func:`selagg_fast.selection.attention_selection`'s ``method``, the feature
cache's key). Definitions: docs/statistics.md, "Attention selections".
"""
from __future__ import annotations

from dataclasses import dataclass

# how a method's pooled feature is scaled (heads.pool_attention), as the paper's reference code:
SUM = "sum"    # sum_t a_t z_t
MEAN = "mean"  # (1/N) sum_t a_t z_t
MASS = "mass"  # (1/N) sum_t abar_t z_t with abar not renormalised: the per-image patch mass stays


@dataclass(frozen=True)
class AttentionMethod:
    """``head``: the method's name; ``weights``: its weight vector's name; ``label``: its title in
    tables and figures; ``query``: whose attention row gives the weights (``"cls"`` or the central
    patch, ``"center"``); ``needs_cls``: the probed model must have a [cls] token; ``scale``: SUM,
    MEAN or MASS; ``selector``: the row is a second model's (``--selector-model``), not the probed
    block's; ``aliases``: other names read from saved runs and accepted on the command line."""
    head: str
    weights: str
    label: str
    query: str
    needs_cls: bool
    scale: str
    selector: bool = False
    aliases: tuple = ()


ATTENTION_METHODS = (
    AttentionMethod("cls_attn", "cls_mean", "mean [cls] attn", "cls", True, SUM, aliases=("cls_mean",)),
    AttentionMethod("cls_attn_min_entropy", "cls_min_entropy", "min-entropy [cls] attn", "cls", True, SUM,
                    aliases=("cls_min_entropy",)),
    AttentionMethod("center_attn", "center_mean", "central patch attn", "center", False, MEAN,
                    aliases=("center_mean",)),
    AttentionMethod("external_cls_attn", "external_cls_mean", "selector [cls] attn", "cls", False, MASS,
                    selector=True, aliases=("external_cls_mean", "selector_cls")),
)
BY_HEAD = {m.head: m for m in ATTENTION_METHODS}
BY_WEIGHTS = {m.weights: m for m in ATTENTION_METHODS}
_BY_ANY_NAME = {name: m for m in ATTENTION_METHODS for name in (m.head, m.weights, *m.aliases)}


def attention_method(name: str) -> AttentionMethod | None:
    """The method of any of its names (head, weights or an alias), or None for another name."""
    return _BY_ANY_NAME.get(name)
