"""Weights for the probe's non-trainable attention heads (paper Table 5).

``cls_attn``, ``cls_attn_min_entropy`` and ``center_attn`` read their weight vector off the probed
block's attention (the block whose tokens are probed: ``--return-block`` or the last), from the
same backbone pass that gives the tokens: a forward pre-hook on that block's attention projects
the one or two query rows it needs (:class:`~selagg_fast.selection.capture_attention_rows`),
the model's own fused attention runs as usual. ``external_cls_attn`` reads a second frozen
backbone's (``--selector-model``) last-block [cls] attention, ``mean_h A'_h[0, P:]``, NOT
renormalised (its patch mass scales each image's pooled feature, as the reference's ``dino``).

Weights travel beside the tokens as one float32 ``[B, M, N]`` tensor, methods in
:attr:`AttentionWeights.methods` order (ProbeHeads' ``attention_methods``); the feature cache
stores them so a cached run runs neither backbone nor selector. Definitions:
docs/statistics.md, "Attention selections".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbone import BackboneSettings
from ..attention_adapters import token_layout
from ..selection import attention_rows, capture_attention_rows, center_query, weights_from_rows
from .cache import file_stamp
from ..attention_methods import ATTENTION_METHODS, BY_WEIGHTS
from .heads import attention_methods

# the weights' name of the selector's [cls] row
EXTERNAL = next(m.weights for m in ATTENTION_METHODS if m.selector)


def selector_settings(cfg) -> BackboneSettings | None:
    """The selector backbone of a probe config (``selector_*`` fields), or None without one."""
    if getattr(cfg, "selector_model", None) is None:
        return None
    return BackboneSettings(model=cfg.selector_model, checkpoint=cfg.selector_checkpoint,
                            checkpoint_key=getattr(cfg, "selector_checkpoint_key", None),
                            random_init=cfg.selector_random_init, model_kwargs=dict(cfg.selector_model_kwargs or {}),
                            allow_key_mismatch=getattr(cfg, "allow_key_mismatch", False),
                            trust_checkpoint=getattr(cfg, "trust_checkpoint", False))


def check_selector_backbone(cfg) -> bool:
    """The ``--selector-*`` flags of a probe or compare config, checked before anything is built:
    the others need ``--selector-model``, whose backbone flags must be valid. True with a selector."""
    settings = selector_settings(cfg)
    if settings is None:
        if (cfg.selector_checkpoint is not None or cfg.selector_random_init or cfg.selector_model_kwargs
                or getattr(cfg, "selector_checkpoint_key", None) is not None):
            raise ValueError("--selector-checkpoint / --selector-checkpoint-key / --selector-random-init / "
                             "--selector-model-kwargs need --selector-model")
        return False
    try:
        settings.check_backbone()
    except (ValueError, OSError) as err:  # name the selector flags, not the backbone's
        raise type(err)(str(err).replace("--model", "--selector-model").replace("--checkpoint", "--selector-checkpoint")
                        .replace("--random-init", "--selector-random-init")) from None
    return True


def check_selector_flags(cfg, specs) -> None:
    """Flag consistency, before anything is built: the selector flags and the external head go together."""
    external = any(s.kind == "external_cls_attn" for s in specs)
    if selector_settings(cfg) is None:
        check_selector_backbone(cfg)
        if external:
            raise ValueError("head 'external_cls_attn' needs a selector: pass --selector-model NAME and "
                             "--selector-checkpoint FILE (a second frozen ViT with the same patch grid)")
        return
    if not external:
        raise ValueError(f"--selector-model {cfg.selector_model}: only the external_cls_attn head uses it; "
                         "add external_cls_attn to --heads or drop the --selector-* flags")
    check_selector_backbone(cfg)


def build_selector(cfg, info, device):
    """The frozen selector backbone, refused unless it has a [cls] token and ``info``'s patch grid."""
    settings = selector_settings(cfg)
    model = settings.create_backbone().to(device)
    _, has_cls, grid = token_layout(model)
    if not has_cls:
        raise ValueError(f"--selector-model {cfg.selector_model}: has no [cls] token to select with")
    if tuple(grid) != tuple(info.patch_grid):
        raise ValueError(f"--selector-model {cfg.selector_model}: patch grid {grid[0]}x{grid[1]} differs from the "
                         f"probed model's {info.patch_grid[0]}x{info.patch_grid[1]}; the weights must cover the "
                         "same patches")
    return model


class AttentionWeights:
    """``(tokens, weights)`` of one backbone pass (plus one selector pass): weights float32
    ``[B, M, N]`` for ``methods`` (weights names of ``attention_methods.ATTENTION_METHODS``).

    ``backbone``: the probe's frozen :class:`~selagg_fast.backbone.Backbone` (its last block is the
    probed one); ``selector``: a Backbone for :data:`EXTERNAL`, or None. The selector sees the
    images as given (same preprocessing: ImageNet mean / std, as MAE and DINO both use), resized
    when its input size differs (the patch grid is the same, checked by :func:`build_selector`).
    """

    def __init__(self, backbone, methods, selector=None):
        self.backbone, self.methods, self.selector = backbone, list(methods), selector
        if EXTERNAL in self.methods and selector is None:
            raise ValueError("external_cls_attn needs a selector backbone")
        P, has_cls, grid = token_layout(backbone)
        self.P, self.grid = P, grid
        own = [m for m in self.methods if m != EXTERNAL]
        if not has_cls and any(BY_WEIGHTS[m].needs_cls for m in own):
            raise ValueError("the [cls] attention heads need a [cls] token; the model has none (use center_attn)")
        self.center = center_query(grid, P)
        self.queries = sorted({self._query(m) for m in own})

    def _query(self, method: str) -> int:
        return self.center if BY_WEIGHTS[method].query == "center" else 0

    def __call__(self, forward, images: torch.Tensor):
        """``forward``: the backbone's forward to run (the Backbone itself or a wrapper of it)."""
        rows = None
        if self.queries:
            with capture_attention_rows(self.backbone, self.queries, block=-1) as capture:
                tokens = forward(images)
            rows = capture.rows
        else:
            tokens = forward(images)
        out = []
        for m in self.methods:
            if m == EXTERNAL:
                out.append(self._external(images))
            else:
                q = self.queries.index(self._query(m))
                out.append(weights_from_rows(rows, m, self.P, q))
        return tokens, torch.stack(out, 1).float()

    def _external(self, images: torch.Tensor) -> torch.Tensor:
        size = self.selector.info.img_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
        rows = attention_rows(self.selector, images, [0], block=-1)  # stops at the selector's last attention
        return weights_from_rows(rows, "cls_mean", self.selector.info.num_prefix_tokens, 0, renormalize=False)


def cache_settings(cfg, methods) -> dict:
    """What the cached weights depend on beyond the backbone: the methods and the selector."""
    return dict(methods=list(methods), selector=None if getattr(cfg, "selector_model", None) is None else dict(
        model=cfg.selector_model, checkpoint=cfg.selector_checkpoint,
        checkpoint_stat=file_stamp(cfg.selector_checkpoint),
        **({"checkpoint_key": cfg.selector_checkpoint_key} if getattr(cfg, "selector_checkpoint_key", None) else {}),
        model_kwargs=cfg.selector_model_kwargs, random_init=cfg.selector_random_init,
        **({"random_init_seed": cfg.seed} if cfg.selector_random_init else {})))


def methods_of(specs) -> list:
    """The weights' methods of a run's heads, in ProbeHeads' ``attention_methods`` order."""
    return attention_methods(specs)


def attention_weights_for(cfg, backbone, specs, device) -> AttentionWeights | None:
    """The run's :class:`AttentionWeights` (building and checking the selector), or None when no
    head pools with attention weights."""
    methods = methods_of(specs)
    if not methods:
        return None
    selector = build_selector(cfg, backbone.info, device) if EXTERNAL in methods else None
    return AttentionWeights(backbone, methods, selector)


def batch_to(batch, device, dtype):
    """Tokens (or ``(tokens, weights)``) moved to ``device``; the tokens cast to ``dtype``, weights float32."""
    if isinstance(batch, (tuple, list)):
        tokens, weights = batch
        return (tokens.to(device, non_blocking=True).to(dtype), weights.to(device, non_blocking=True).float())
    return batch.to(device, non_blocking=True).to(dtype)
