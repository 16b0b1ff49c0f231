"""The probe's token source: images in, the tokens (and attention weights) the heads read out.

:class:`TokenSource` owns the frozen backbone (compiled with ``--compile-backbone``), the
attention-weight hook of ``cls_attn`` & co. (and its ``--selector-model``), the mixed-precision
dtype, the compact ``[cls]``-and-mean layout of a cache without token-reading heads, and the
extraction of those tokens into a feature cache. It knows nothing of heads' parameters or of
batching: the data plan (data_plan.py) feeds it images and shards.
"""
from __future__ import annotations

import logging

import torch

from ..datasets import layout_files
from ..distributed import barrier
from ..precision import uses_bf16
from ..profiling import nvtx_range
from .cache import extract, file_stamp, open_store, source_files
from .heads import parse_heads
from .selector import attention_weights_for, cache_settings

log = logging.getLogger("selagg_fast")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; disabled when ``dtype`` is None (fp32)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


class TokenSource:
    """The frozen backbone's tokens of a batch of images, with the heads' attention weights."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.autocast_dtype = torch.bfloat16 if uses_bf16(cfg.precision, device) else None
        self.backbone = cfg.create_backbone().to(device)
        self.info = self.backbone.info
        # torch.compile of the frozen forward: compiled on the first batch (and again for the
        # last, smaller one), the same tokens up to float rounding afterwards
        self.forward_backbone = torch.compile(self.backbone) if cfg.compile_backbone else self.backbone
        self.specs = parse_heads(cfg.heads, has_cls=self.info.has_cls)
        # Without selective heads the cache keeps only [cls] and the patch mean per image.
        self.compact = cfg.cache_features is not None and not any(s.needs_tokens for s in self.specs)
        # cls_attn & co.: their weights from this backbone's pass (and the selector's), beside the tokens
        self.selection = attention_weights_for(cfg, self.backbone, self.specs, device)
        if self.selection is not None and cfg.compile_backbone:
            log.warning("--compile-backbone: not with attention-weighted heads (their hook reads the probed "
                        "block's attention input); the backbone runs uncompiled")
            self.forward_backbone = self.backbone
        # the prefix tokens the heads skip: [cls] alone in a compact cache, else the backbone's
        self.head_prefix = int(self.info.has_cls) if self.compact else self.info.num_prefix_tokens

    @property
    def token_dtype(self) -> torch.dtype:
        """The dtype of the tokens handed to the heads."""
        return self.autocast_dtype or torch.float32

    def autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def tokens(self, images: torch.Tensor):
        """The backbone's tokens; ``(tokens, weights [B, M, N] float32)`` with attention-weighted heads."""
        weights = None
        with torch.no_grad(), self.autocast(), nvtx_range("backbone"):
            if self.selection is not None:
                tokens, weights = self.selection(self.forward_backbone, images)
            else:
                tokens = self.forward_backbone(images)
        if self.compact:
            parts = ([tokens[:, :1]] if self.info.has_cls else []) + \
                    [tokens[:, self.info.num_prefix_tokens:].mean(1, keepdim=True, dtype=torch.float32)]
            tokens = torch.cat([p.to(tokens.dtype) for p in parts], 1)
        tokens = tokens.to(self.token_dtype)
        return tokens if weights is None else (tokens, weights)

    def open_stores(self, datasets: dict, loader, dist) -> dict:
        """``{split: TokenStore}`` of ``--cache-features``: each opened, what is missing extracted
        (``loader(dataset, **kw)`` builds the DataLoaders), and sealed."""
        cfg = self.cfg
        with torch.no_grad():
            probe = self.tokens(torch.zeros(1, 3, self.info.img_size, self.info.img_size, device=self.device))
        probe, weight_shape = (probe[0], tuple(probe[1].shape[1:])) if isinstance(probe, tuple) else (probe, None)
        stores = {}
        for split, dataset in datasets.items():
            settings = dict(
                split=split, model=cfg.model, model_kwargs=cfg.model_kwargs, return_block=cfg.return_block,
                final_norm=cfg.final_norm, compact=self.compact, precision=str(self.autocast_dtype),
                checkpoint=cfg.checkpoint, checkpoint_stat=file_stamp(cfg.checkpoint), data=cfg.data,
                **({"checkpoint_key": cfg.checkpoint_key} if cfg.checkpoint_key is not None else {}),
                train_list=cfg.train_list, num_samples=len(dataset),
                synthetic=[cfg.synthetic_train_size, cfg.synthetic_val_size, cfg.synthetic_classes, cfg.seed]
                if cfg.data == "synthetic" else None)
            if cfg.dataset != "imagefolder":  # imagefolder stores keep the key they were extracted under
                settings["dataset"] = cfg.dataset
            if cfg.random_init:  # a random backbone is the seed's: another seed's tokens are other tokens
                settings["random_init_seed"] = cfg.seed
            inferred = self.backbone.inferred_kwargs
            if inferred:  # read from the checkpoint (a BEiT file's position layout): part of the model
                settings["inferred_kwargs"] = inferred
            if self.selection is not None:  # the cached weights' methods and selector
                settings["attention_weights"] = cache_settings(cfg, self.selection.methods)
            store = open_store(cfg.cache_features, settings, dataset, tuple(probe.shape[1:]), cfg.cache_dtype,
                               cfg.batch_size, is_main=dist.is_main, barrier=barrier, weight_shape=weight_shape,
                               sources=source_files(dataset, layout_files(cfg.dataset, cfg.data)),
                               refresh=cfg.refresh_cache)
            extract(store, dataset, self.tokens, loader, self.device, dist.rank, dist.world_size,
                    desc=f"extract {split} tokens", progress=cfg.progress and dist.is_main)
            barrier()
            if not store.complete():
                raise RuntimeError(f"feature cache {store.path}: extraction incomplete after all ranks finished")
            if dist.is_main:
                store.seal()
            stores[split] = store
        return stores
