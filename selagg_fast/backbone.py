"""Frozen timm ViT backbones from local weights, and their token outputs.

Shared by the probing trainer and the analysis tools. Nothing here downloads: weights
come from a local file, or the model is randomly initialised when the caller says so.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from typing import Mapping

import torch
from torch import nn

from .files import CheckpointError, load_torch_file

log = logging.getLogger("selagg_fast")

# Keys a checkpoint may nest its weights under, most specific first (MAE: model,
# I-JEPA: target_encoder / encoder, Lightning / DeiT: state_dict).
_NESTING_KEYS = ("target_encoder", "encoder", "model", "state_dict", "module")
# Prefixes wrappers add (DDP, I-JEPA, SimMIM, Lightning modules).
_STRIPPED_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Keys of pretraining or classification parts that a frozen-token probe never uses.
_UNUSED_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.", "head_drop")


def read_state_dict(path: str, trust: bool = False) -> dict:
    """Tensor dict from a ``.safetensors`` / ``.pth`` file, un-nested and prefix-stripped.

    ``.pth`` files load without running code from the file (:func:`~selagg_fast.files.load_torch_file`);
    ``trust=True`` (``--trust-checkpoint``) allows full unpickling."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file (checkpoint not found)")
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors.torch import load_file
        try:
            state = load_file(path, device="cpu")
        except Exception as err:  # safetensors' own error type: a header that does not parse
            raise CheckpointError(f"--checkpoint {path}: not a readable .safetensors file "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    else:
        state = load_torch_file(path, trust=trust)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    for key in _NESTING_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(state)[:10]})")
    for prefix in _STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_checkpoint(model: nn.Module, path: str, allow_mismatch: bool = False, trust: bool = False) -> None:
    """Load local weights into a timm ViT; mismatched keys are listed and refused unless allowed."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = read_state_dict(path, trust=trust)
    state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_PREFIXES)}
    try:  # timm's converter: resamples pos_embed to the model's grid, maps other ViT layouts
        state = checkpoint_filter_fn(state, model)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot convert to {type(model).__name__}: {err}") from err
    model_state = model.state_dict()
    wrong_shape = [f"{k} {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                   for k, v in state.items() if k in model_state and v.shape != model_state[k].shape]
    if wrong_shape:
        raise CheckpointError(f"{path}: shapes do not match the model: " + "; ".join(wrong_shape[:8]))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_UNUSED_PREFIXES)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        msg = (f"{path} does not match the model: {len(missing)} missing keys {missing[:8]}, "
               f"{len(unexpected)} unexpected keys {unexpected[:8]}")
        if not allow_mismatch:
            raise CheckpointError(msg + " (pass --allow-key-mismatch to load anyway)")
        log.warning("%s; loading anyway", msg)


@dataclass
class BackboneInfo:
    name: str
    embed_dim: int
    num_prefix_tokens: int   # [cls] + registers
    has_cls: bool
    num_blocks: int          # blocks actually run (return_block or all)
    img_size: int
    patch_grid: tuple        # (rows, cols) of patch tokens


class Backbone(nn.Module):
    """A frozen timm ViT that returns the tokens of one block: ``[B, T, D]``, prefix tokens first.

    ``return_block`` (1-based, as the paper's reference code) stops after that many blocks;
    later blocks are dropped. ``final_norm`` applies the ViT's last LayerNorm (the paper's
    reference code does not).
    """

    def __init__(self, model: nn.Module, name: str, return_block: int | None = None, final_norm: bool = False):
        super().__init__()
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise TypeError(f"{name}: not a timm VisionTransformer (no .blocks / .patch_embed)")
        depth = len(model.blocks)
        if return_block is not None:
            if not 1 <= return_block <= depth:
                raise ValueError(f"--return-block {return_block} out of range: {name} has {depth} blocks")
            model.blocks = model.blocks[:return_block]
        for block in model.blocks:
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = True  # SDPA / flash attention for the frozen forward
        self.model = model.eval().requires_grad_(False)
        self.final_norm = final_norm
        grid = tuple(model.patch_embed.grid_size)
        img = model.patch_embed.img_size
        self.info = BackboneInfo(
            name=name, embed_dim=model.embed_dim,
            num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
            has_cls=getattr(model, "cls_token", None) is not None,
            num_blocks=len(model.blocks), img_size=int(img[0] if isinstance(img, (tuple, list)) else img),
            patch_grid=grid)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout / drop-path stay off

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        x = m.blocks(x)
        if self.final_norm:
            x = m.norm(x)
        return x


def create_backbone(name: str, checkpoint: str | None = None, *, random_init: bool = False,
                    allow_key_mismatch: bool = False, return_block: int | None = None,
                    final_norm: bool = False, trust_checkpoint: bool = False, **model_kwargs) -> Backbone:
    """A frozen :class:`Backbone` for a timm ViT name with weights from a local file.

    Nothing is downloaded. Without ``checkpoint`` the model is random unless ``random_init``
    is False, in which case this raises (the weights would need the network).
    """
    import timm

    check_backbone_settings(name, checkpoint, random_init, return_block, model_kwargs)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    except TypeError as err:  # an argument the model does not take
        raise ValueError(f"--model-kwargs {model_kwargs}: {name} does not take them ({err})") from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, allow_mismatch=allow_key_mismatch, trust=trust_checkpoint)
    else:
        log.warning("!!! %s is RANDOMLY INITIALISED (no --checkpoint): its accuracies say nothing "
                    "about any pretrained model !!!", name)
    return Backbone(model, name, return_block=return_block, final_norm=final_norm)


def check_backbone_settings(name: str, checkpoint: str | None, random_init: bool, return_block: int | None,
                            model_kwargs) -> None:
    """The backbone flags' values, checked before anything is built or read."""
    import timm

    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"--model: unknown timm model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if checkpoint is None and not random_init:
        raise ValueError(f"{name}: no weights given. Pass --checkpoint FILE (a local .pth/.safetensors; "
                         "nothing is downloaded), or --random-init for a randomly initialised model")
    if checkpoint is not None and not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file (checkpoint not found)")
    if checkpoint is not None and os.path.isdir(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint}: is a folder, not a checkpoint file")
    if return_block is not None and return_block < 1:
        raise ValueError(f"--return-block {return_block}: must be >= 1 (blocks are numbered from 1)")
    if not isinstance(model_kwargs, dict):
        raise ValueError(f"--model-kwargs {model_kwargs!r}: expected a JSON object such as {{\"img_size\": 448}}")


@dataclass
class BackboneSettings:
    """Which frozen ViT to build and from which weights: the fields that `probe`, `analyze` and
    `maps` share (their configs extend this class; a probe run's saved config rebuilds it)."""
    model: str = "vit_base_patch16_224"
    checkpoint: str | None = None
    random_init: bool = False
    allow_key_mismatch: bool = False
    return_block: int | None = None
    final_norm: bool = False
    model_kwargs: dict = field(default_factory=dict)
    trust_checkpoint: bool = False  # full unpickling of --checkpoint: runs any code the file holds

    def check_backbone(self) -> None:
        check_backbone_settings(self.model, self.checkpoint, self.random_init, self.return_block, self.model_kwargs)

    def create_backbone(self) -> Backbone:
        return create_backbone(self.model, self.checkpoint, random_init=self.random_init,
                               allow_key_mismatch=self.allow_key_mismatch, return_block=self.return_block,
                               final_norm=self.final_norm, trust_checkpoint=self.trust_checkpoint,
                               **self.model_kwargs)

    @classmethod
    def from_config(cls, config: Mapping, **overrides) -> "BackboneSettings":
        """The backbone fields of a saved run config (a dict of a config that extends this class).
        ``trust_checkpoint`` is never inherited from a saved config: pass it in ``overrides``."""
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config and f.name != "trust_checkpoint"}
        return cls(**{**values, **overrides})
