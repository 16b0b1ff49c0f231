"""Frozen ViT backbones (timm names and the paper's presets) from local weights, and their token outputs.

Shared by the probing trainer and the analysis tools. Nothing here downloads: weights
come from a local file, or the model is randomly initialised when the caller says so.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Mapping

import torch
from torch import nn

from . import zoo
from .attention_adapters import token_layout
from .files import CheckpointError, load_torch_file

log = logging.getLogger("selagg_fast")

# Keys a checkpoint of a timm name may nest its weights under, most specific first (MAE: model,
# I-JEPA: target_encoder / encoder, Lightning / DeiT: state_dict). Presets name their own (zoo.py).
_NESTING_KEYS = ("target_encoder", "encoder", "model", "state_dict", "module")
# Prefixes wrappers add (DDP, I-JEPA, Lightning modules), removed when every key carries one.
_STRIPPED_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# Keys of pretraining or classification parts that a frozen-token probe never uses.
_UNUSED_PREFIXES = ("decoder", "mask_token", "head.", "fc_norm.", "head_drop")


def read_checkpoint(path: str, trust: bool = False) -> dict:
    """The dict a ``.safetensors`` / ``.pth`` file holds, loaded on the CPU without running code
    from the file (:func:`~selagg_fast.files.load_torch_file`; ``trust=True``: full unpickling)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file (checkpoint not found)")
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors.torch import load_file
        try:
            raw = load_file(path, device="cpu")
        except Exception as err:  # safetensors' own error type: a header that does not parse
            raise CheckpointError(f"--checkpoint {path}: not a readable .safetensors file "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    else:
        raw = load_torch_file(path, trust=trust)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    return raw


def _generic_state(raw: dict, path: str, key: str | None) -> dict:
    """Tensor dict of a checkpoint for a timm name: un-nested (``key``, else the first of
    ``target_encoder, encoder, model, state_dict, module`` present) and prefix-stripped where every
    key carries the prefix. Presets read their family's layout instead (:mod:`selagg_fast.zoo`)."""
    state = zoo.unnest(raw, _NESTING_KEYS, key, path)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(state)[:10]})"
                              + ("" if key is not None else zoo.nesting_hint(state)))
    for prefix in _STRIPPED_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _timm_converter(model: nn.Module):
    """timm's own checkpoint converter for ``model``'s class (DINOv2 registers and [cls] row, patch
    and relative-position-table resizing), or None for a module of this package."""
    from timm.models import beit, vision_transformer
    if isinstance(model, beit.Beit):
        return beit.checkpoint_filter_fn
    if isinstance(model, vision_transformer.VisionTransformer):
        return vision_transformer.checkpoint_filter_fn
    return None


def file_state(raw: dict, path: str, preset: zoo.Preset | None, key: str | None, model_name: str,
               beit_model: bool) -> tuple:
    """``(state, family)``: the tensors of a read checkpoint under the model's key names (a preset's
    family layout, else the generic one for a timm name) and the family its keys identify.
    Refused (:class:`CheckpointError`, one line): ``key`` absent, a file of another family (with
    the preset it fits), a file without tensors where they were looked for."""
    if key is not None:
        zoo.unnest(raw, (), key, path)  # refused first: the key names what the user meant to load
    family = zoo.detect_family(raw)
    if not zoo.fits(preset, family, beit_model=beit_model):
        exclude = (preset.name,) if preset else ()
        raise CheckpointError(f"--checkpoint {path}: this file holds a {family} checkpoint: "
                              f"{zoo.suggest(family, raw, exclude)} (not --model {model_name})")
    if preset is None:
        state = _generic_state(raw, path, key)
        state = {k: v for k, v in state.items() if k == "mask_token" or not k.startswith(_UNUSED_PREFIXES)}
    else:
        layout = preset.layout
        state = zoo.map_state(zoo.unnest(raw, layout.nesting, key, path), layout)
        if not state:
            raise CheckpointError(f"{path}: no tensors found for {preset.name} (top-level keys: {sorted(raw)[:10]})"
                                  + ("" if key is not None else zoo.nesting_hint(raw)))
    return state, family


def load_checkpoint(model: nn.Module, path: str, allow_mismatch: bool = False, trust: bool = False,
                    preset: zoo.Preset | None = None, key: str | None = None, raw: dict | None = None,
                    read: tuple | None = None) -> list:
    """Load local weights into ``model``: a preset reads its family's official layout, a timm name
    the generic one. Refused (:class:`CheckpointError`, one line): a file of another family (with
    the preset it fits), mismatched shapes, missing or unexpected keys (unless ``allow_mismatch``),
    and, always, a file that would leave more than half of the backbone's parameters at their
    random init. ``raw``: the file's dict when already read (else it is read from ``path``);
    ``read``: its :func:`file_state` when already found (else found here). Returns the model keys this file lacks (left at init): the release's optional ones, and with
    ``allow_mismatch`` any other."""
    if raw is None:
        raw = read_checkpoint(path, trust)
    if read is None:
        from timm.models.beit import Beit
        name = preset.name if preset else getattr(model, "pretrained_cfg", {}).get("architecture", "a timm ViT")
        read = file_state(raw, path, preset, key, name, beit_model=isinstance(model, Beit))
    state, family = read
    hint = ""
    if family:  # a preset in use is never suggested; one whose family fits only for a file of another width
        names = zoo.suggest(family, raw, exclude=(preset.name,) if preset else (),
                            model_width=getattr(model, "embed_dim", None) if preset else None)
        hint = f"this file holds a {family} checkpoint: {names}" if names else ""
    optional = ()
    if preset is not None:
        if getattr(model, "pos_embed", None) is not None:
            state = zoo.resize_pos_embed(state, tuple(model.patch_embed.grid_size), preset.layout)
        optional = preset.layout.optional
    model_state = model.state_dict()
    check_weight_values(state, model_state, path)  # before timm's converter would turn an int8 table into floats
    convert = _timm_converter(model)
    if convert is not None:
        checked = state
        try:  # DINOv2's registers and [cls] row, other grids' position tables (MAE-style layouts)
            state = convert(state, model)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot convert to {type(model).__name__}: {err}") from err
        # the tensors the converter changed or created (the file's own were checked above)
        check_weight_values({k: v for k, v in state.items() if checked.get(k) is not v}, model_state, path)
    state.pop("mask_token", None)
    wrong_shape = [f"{k} {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
                   for k, v in state.items() if k in model_state and v.shape != model_state[k].shape]
    if wrong_shape:
        raise CheckpointError(f"{path}: shapes do not match the model: " + "; ".join(wrong_shape[:8])
                              + (f"; {hint}" if hint else ""))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_UNUSED_PREFIXES)]
    at_init = [k for k in missing if k.startswith(optional)] if optional else []
    missing = [k for k in missing if k not in at_init]
    unexpected = list(result.unexpected_keys)
    _refuse_mostly_random(model, result.missing_keys, path, hint)
    if missing or unexpected:
        msg = (f"{path} does not match the model: {len(missing)} missing keys {missing[:8]}, "
               f"{len(unexpected)} unexpected keys {unexpected[:8]}")
        if not allow_mismatch:
            raise CheckpointError(msg + (f"; {hint}" if hint else " (pass --allow-key-mismatch to load anyway)"))
        log.warning("%s; loading anyway", msg)
    return at_init + missing


def check_weight_values(state: dict, model_state: dict, path: str) -> None:
    """Refuse (:class:`CheckpointError`, naming the tensor) a checkpoint tensor loaded into a floating
    tensor of the model that is integer-typed (a quantised file: converting it would load its raw
    codes as weights) or holds NaN / inf. The model's integer buffers (BEiT's relative_position_index)
    take integers; keys the model lacks are reported as unexpected elsewhere."""
    for name, value in state.items():
        target = model_state.get(name)
        if not isinstance(value, torch.Tensor) or target is None or not target.is_floating_point():
            continue
        if not (value.is_floating_point() or value.is_complex()):
            raise CheckpointError(f"--checkpoint {path}: tensor {name} is {str(value.dtype).replace('torch.', '')}, "
                                  f"the model's is {str(target.dtype).replace('torch.', '')}: a quantised or "
                                  "integer checkpoint is not loaded as weights (dequantise it to float first)")
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise CheckpointError(f"--checkpoint {path}: tensor {name} holds {bad} non-finite value(s) (NaN or inf) "
                                  f"of {value.numel()}: a damaged or diverged checkpoint")


def _refuse_mostly_random(model: nn.Module, missing_keys, path: str, hint: str) -> None:
    """A file that leaves more than half of the backbone's parameter elements at their init is no
    checkpoint of this model: refused even with --allow-key-mismatch."""
    params = {k: p.numel() for k, p in model.named_parameters() if not k.startswith(_UNUSED_PREFIXES)}
    total = sum(params.values())
    left = sum(params.get(k, 0) for k in missing_keys)
    if total and 2 * left > total:
        raise CheckpointError(f"{path}: leaves {left} of {total} backbone parameters ({100 * left / total:.0f}%) at "
                              "their random init; refused even with --allow-key-mismatch"
                              + (f"; {hint}" if hint else " (is it a checkpoint of this model?)"))


@dataclass
class BackboneInfo:
    name: str
    embed_dim: int
    num_prefix_tokens: int   # [cls] + registers
    has_cls: bool
    num_blocks: int          # blocks actually run (return_block or all)
    img_size: int
    patch_grid: tuple        # (rows, cols) of patch tokens
    final_norm_loaded: bool = True  # False: the checkpoint left the final norm at init (MAE fine-tuned, MaskFeat)


class Backbone(nn.Module):
    """A frozen ViT that returns the tokens of one block: ``[B, T, D]``, prefix tokens first.

    ``model``: a timm ``VisionTransformer`` (registers included), a timm ``Beit`` (one shared or
    per-block relative position bias) or a module of this package with ``prepare_tokens`` (CAPI).
    ``return_block`` N stops after block N counted from 1 (the paper's reference code counts from
    0: its ``--return_block N`` is ``return_block=N + 1``); later blocks are dropped.
    ``final_norm`` applies the ViT's last norm (the paper's reference code does not);
    ``final_norm_loaded`` False says the checkpoint left that norm at its init (k-NN then skips
    its final-norm variant rather than compute it with an untrained norm).
    """

    def __init__(self, model: nn.Module, name: str, return_block: int | None = None, final_norm: bool = False,
                 final_norm_loaded: bool = True):
        super().__init__()
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise TypeError(f"{name}: not a ViT (no .blocks / .patch_embed)")
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
        self.inferred_kwargs = {}  # create_backbone: architecture arguments read from the checkpoint
        layout = token_layout(model)
        img = model.patch_embed.img_size
        self.info = BackboneInfo(
            name=name, embed_dim=model.embed_dim, num_prefix_tokens=layout.num_prefix_tokens,
            has_cls=layout.has_cls, num_blocks=len(model.blocks),
            img_size=int(img[0] if isinstance(img, (tuple, list)) else img), patch_grid=layout.grid,
            final_norm_loaded=final_norm_loaded)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout / drop-path stay off

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        block_kwargs = {}
        if hasattr(m, "prepare_tokens"):  # CAPI: registers, RoPE inside its blocks
            x = m.prepare_tokens(images)
        elif hasattr(m, "_pos_embed"):  # timm VisionTransformer
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        else:  # timm Beit: [cls], optional absolute positions, one relative bias shared by all blocks
            x = m.patch_embed(images)
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if m.pos_embed is not None:
                x = x + m.pos_embed
            block_kwargs["shared_rel_pos_bias"] = m.rel_pos_bias() if m.rel_pos_bias is not None else None
        for block in m.blocks:
            x = block(x, **block_kwargs)
        if self.final_norm:
            x = m.norm(x)
        return x


def build_model(name: str, **model_kwargs) -> nn.Module:
    """The random-init architecture of a preset (its kwargs, overridden by ``model_kwargs``) or of a
    timm name, without a classifier."""
    import timm

    preset = zoo.get_preset(name)
    kwargs = {**(preset.kwargs if preset else {}), **model_kwargs}
    try:
        if preset is not None and preset.arch is None:
            return preset.builder(**kwargs)
        return timm.create_model(preset.arch if preset else name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as err:  # an argument the model does not take
        raise ValueError(f"--model-kwargs {model_kwargs}: {name} does not take them ({err})") from None


def is_beit(name: str) -> bool:
    """Whether a preset or timm name builds a timm ``Beit`` (SimMIM, BEiT-v2, timm's ``beit*``)."""
    import timm

    preset = zoo.get_preset(name)
    arch = preset.arch if preset is not None else name
    if arch is None or not timm.is_model(arch):
        return False
    return timm.models.model_entrypoint(arch).__module__ == "timm.models.beit"


def beit_layout_of_file(state: dict, path: str, model_kwargs: dict) -> dict:
    """The timm ``Beit`` arguments the checkpoint's tensors need: its position layout
    (:data:`~selagg_fast.zoo.BEIT_POSITION_KWARGS`: a shared relative position bias, one per
    block, an absolute ``pos_embed``; BEiT's pretraining files share one table, its fine-tuned
    files have one per block) and, where the file has a final per-token norm, ``use_fc_norm=False``.
    ``state``: the file's tensors under the model's key names (:func:`file_state`). A position
    argument the user set in ``model_kwargs`` that disagrees with the file is refused
    (:class:`CheckpointError`, one line naming both layouts)."""
    found = zoo.beit_positions(state)
    asked = {k: model_kwargs[k] for k in zoo.BEIT_POSITION_KWARGS if k in model_kwargs}
    clash = sorted(k for k, v in asked.items() if bool(v) != found[k])
    if clash:
        wanted = json.dumps({k: found[k] for k in clash})
        raise CheckpointError(f"--checkpoint {path} holds {zoo.describe_beit_positions(found)}; --model-kwargs ask "
                              f"for {zoo.describe_beit_positions({**found, **asked})}: set {wanted} in "
                              f"--model-kwargs (or leave {', '.join(clash)} out: the file's layout is followed)")
    log.info("%s holds %s: the model is built so", path, zoo.describe_beit_positions(found))
    if "norm.weight" in state and not {"use_fc_norm", "global_pool"} & set(model_kwargs):
        # the file's final norm is the per-token one (timm's mean pooling would make it an fc_norm)
        return {**found, "use_fc_norm": False}
    return found


def create_backbone(name: str, checkpoint: str | None = None, *, random_init: bool = False,
                    allow_key_mismatch: bool = False, return_block: int | None = None,
                    final_norm: bool = False, trust_checkpoint: bool = False, checkpoint_key: str | None = None,
                    **model_kwargs) -> Backbone:
    """A frozen :class:`Backbone` for a preset (``selagg-fast models``) or a timm ViT name, with
    weights from a local file.

    A preset reads its family's official file as released (``checkpoint_key`` picks the nesting
    key, e.g. I-JEPA's ``encoder``); a timm ``Beit`` (SimMIM, BEiT-v2, ``beit*``) is built with the
    file's position layout (:func:`beit_layout_of_file`). Nothing is downloaded. Without ``checkpoint`` the model is
    random when ``random_init``, else this raises (the weights would need the network).
    """
    check_backbone_settings(name, checkpoint, random_init, return_block, model_kwargs, checkpoint_key)
    preset = zoo.get_preset(name)
    raw = read_checkpoint(checkpoint, trust_checkpoint) if checkpoint is not None else None
    build_kwargs, read = dict(model_kwargs), None
    if raw is not None and is_beit(name):  # the file's tensors found once: its layout, then its load
        read = file_state(raw, checkpoint, preset, checkpoint_key, name, beit_model=True)
        build_kwargs = {**beit_layout_of_file(read[0], checkpoint, model_kwargs), **model_kwargs}
    model = build_model(name, **build_kwargs)
    if final_norm and isinstance(getattr(model, "norm", None), (nn.Identity, type(None))):
        # timm puts a mean-pooling model's last norm on the pooled feature (fc_norm), none on the tokens
        raise ValueError(f"--final-norm: {name} as built has no final per-token norm (its last norm, if any, "
                         "is fc_norm on the pooled feature); probe without --final-norm")
    at_init = None
    if checkpoint is not None:
        at_init = load_checkpoint(model, checkpoint, allow_mismatch=allow_key_mismatch, trust=trust_checkpoint,
                                  preset=preset, key=checkpoint_key, raw=raw, read=read)
        norm_at_init = [k for k in at_init if k.startswith("norm.")]
        if final_norm and norm_at_init:
            raise CheckpointError(f"--final-norm: {checkpoint} has no final norm ({', '.join(norm_at_init[:4])} "
                                  "missing: MAE's fine-tuned files keep fc_norm for pooled features, MaskFeat drops "
                                  "it); probe without --final-norm")
        if norm_at_init:
            log.info("%s: %s not in the file (unused without --final-norm)", checkpoint, ", ".join(norm_at_init))
    else:
        log.warning("!!! %s is RANDOMLY INITIALISED (no --checkpoint): its accuracies say nothing "
                    "about any pretrained model !!!", name)
    if preset is not None and preset.block is not None and return_block is None:
        log.info("%s: the paper probes block %d (--return-block %d); probing the last block",
                 name, preset.block, preset.block)
    final_norm_loaded = checkpoint is None or not any(k.startswith("norm.") for k in at_init or ())
    backbone = Backbone(model, name, return_block=return_block, final_norm=final_norm,
                        final_norm_loaded=final_norm_loaded)
    # a BEiT file's position layout, read rather than given: a feature cache is keyed by it too
    backbone.inferred_kwargs = {k: v for k, v in build_kwargs.items() if model_kwargs.get(k, object()) != v}
    return backbone


def check_backbone_settings(name: str, checkpoint: str | None, random_init: bool, return_block: int | None,
                            model_kwargs, checkpoint_key: str | None = None) -> None:
    """The backbone flags' values, checked before anything is built or read."""
    import timm

    if zoo.get_preset(name) is None and name not in timm.list_models():
        stem = name.split("_")[0]
        close = [n for n in zoo.PRESETS if n.startswith(stem)][:6] + timm.list_models(f"*{stem}*")[:6]
        raise ValueError(f"--model: unknown timm model or preset {name!r} (presets: selagg-fast models)"
                         + (f"; similar: {', '.join(close)}" if close else ""))
    if checkpoint is None and not random_init:
        raise ValueError(f"{name}: no weights given. Pass --checkpoint FILE (a local .pth/.safetensors; "
                         "nothing is downloaded), or --random-init for a randomly initialised model")
    if checkpoint is not None and not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file (checkpoint not found)")
    if checkpoint is not None and os.path.isdir(checkpoint):
        raise CheckpointError(f"--checkpoint {checkpoint}: is a folder, not a checkpoint file")
    if checkpoint_key is not None and (not isinstance(checkpoint_key, str) or not checkpoint_key):
        raise ValueError(f"--checkpoint-key {checkpoint_key!r}: expected a key name such as target_encoder")
    if checkpoint_key is not None and checkpoint is None:
        raise ValueError(f"--checkpoint-key {checkpoint_key}: needs --checkpoint")
    if return_block is not None and return_block < 1:
        raise ValueError(f"--return-block {return_block}: must be >= 1 (blocks are numbered from 1)")
    if not isinstance(model_kwargs, dict):
        raise ValueError(f"--model-kwargs {model_kwargs!r}: expected a JSON object such as {{\"img_size\": 448}} "
                         "(in Python: a dict, model_kwargs={\"img_size\": 448})")


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
    checkpoint_key: str | None = None  # the dict of --checkpoint the weights sit under (default: the layout's)

    def check_backbone(self) -> None:
        check_backbone_settings(self.model, self.checkpoint, self.random_init, self.return_block, self.model_kwargs,
                                self.checkpoint_key)

    def create_backbone(self) -> Backbone:
        return create_backbone(self.model, self.checkpoint, random_init=self.random_init,
                               allow_key_mismatch=self.allow_key_mismatch, return_block=self.return_block,
                               final_norm=self.final_norm, trust_checkpoint=self.trust_checkpoint,
                               checkpoint_key=self.checkpoint_key, **self.model_kwargs)

    @classmethod
    def from_config(cls, config: Mapping, **overrides) -> "BackboneSettings":
        """The backbone fields of a saved run config (a dict of a config that extends this class).
        ``trust_checkpoint`` is never inherited from a saved config: pass it in ``overrides``."""
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config and f.name != "trust_checkpoint"}
        return cls(**{**values, **overrides})
