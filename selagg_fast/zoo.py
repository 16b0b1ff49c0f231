"""The paper's backbones by name: one entry per preset, and how each family's official file maps
onto the model that preset builds.

A preset names a family (MAE, SimMIM, ..., DINOv2), the architecture that runs its weights (a timm
model, or a module of this package), and the layout of the family's released checkpoint: the key
its weights nest under, the prefixes its keys carry, the parts a frozen-token probe never uses
(decoders, predictors, momentum encoders, pretraining heads) and how its position embeddings are
interpolated to another grid. :func:`map_state` turns an official file into the model's state dict;
:func:`detect_family` recognises a family from its key signature, so a file of another family is
refused with the preset it fits. The table: ``selagg-fast models``; details: docs/backbones.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .files import CheckpointError


@dataclass(frozen=True)
class Layout:
    """How one family's released file maps onto its model.

    ``nesting``: keys the weights may sit under, tried in order (the first one present wins; none
    present: the file is the state dict). ``prefixes``: removed from the front of every key that
    carries them (DDP's ``module.``, SimMIM's ``encoder.``), whichever keys they are on.
    ``dropped``: key prefixes of parts a probe never uses. ``optional``: model keys a release may
    lack (left at their init: harmless unless they are used, see :func:`check_optional`).
    ``convert``: the family's own mapping of an un-nested state dict, where it has one.
    ``paper_file_has_norm``: the file the paper probed holds the final norm, so a file of the
    family without it (MAE's fine-tuned release: fc_norm, no norm) is not the paper's checkpoint.
    ``pos_offset`` / ``pos_antialias``: how a position grid is resized to another input size, as
    the family's forward does it: ``0.1`` is DINO's and DINOv2's
    ``interpolate(scale_factor=(g + 0.1) / g0)``, ``None`` ``interpolate(size=g)`` (MAE; DINOv2
    with registers, antialiased); bicubic, in float32.
    """
    nesting: tuple = ()
    prefixes: tuple = ("module.",)
    dropped: tuple = ("head.", "fc_norm.", "head_drop.")
    optional: tuple = ()
    pos_offset: float | None = None
    pos_antialias: bool = False
    text: str = ""
    convert: Callable | None = None  # a family's own key mapping, used instead of prefixes / dropped
    paper_file_has_norm: bool = True


# Family -> layout of its official release (read from each project's own save code).
LAYOUTS = {
    "MAE": Layout(
        nesting=("model",), dropped=("decoder", "mask_token", "head.", "fc_norm."), optional=("norm.",),
        text="{'model': ...}; visualize files add decoder_*, mask_token; fine-tuned files fc_norm, head, no norm"),
    # SimMIM's and BEiT-v2's fine-tuned files pool the mean (fc_norm, no norm) and keep a relative
    # position bias per block: they load too (the model follows the file's bias layout)
    "SimMIM": Layout(
        nesting=("model",), prefixes=("module.", "encoder."), dropped=("decoder.", "mask_token", "head.", "fc_norm."),
        optional=("norm.",),
        text="{'model': {encoder.*, encoder.mask_token, decoder.0.*}, optimizer, lr_scheduler, config (yacs)}"),
    "MaskFeat": Layout(
        nesting=("model_state",), dropped=("pred_head.", "hogs.", "mask_token", "head."), optional=("norm.",),
        paper_file_has_norm=False,
        text="{'model_state': ..., 'optimizer_state', 'cfg'}; pred_head.*, hogs.*, mask_token; no norm"),
    "BEiT-v2": Layout(
        nesting=("model", "module"), dropped=("lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.",
                                              "mask_token", "head.", "fc_norm."),
        optional=("norm.",),
        text="{'model': ..., 'args' (Namespace)}; lm_head.*, cls_pt_layers.*, mask_token; shared rel_pos_bias"),
    "I-JEPA": Layout(
        nesting=("target_encoder", "encoder"), dropped=("predictor.", "mask_token"),
        text="{'encoder', 'target_encoder', 'predictor', 'opt', ...}; module.*; target_encoder probed"),
    "CAPI": Layout(
        convert=lambda state: _capi().capi_state_dict(state),
        text="flat: backbone.encoder.blocks.N.residual1.fn.q_proj ..., backbone.registers; decoder.*, mask_token"),
    "iBOT": Layout(  # its ViT is DINO's: the same forward-time interpolation
        nesting=("state_dict", "teacher"), prefixes=("module.", "backbone."), dropped=("head.", "masked_embed"),
        pos_offset=0.1,
        text="{'state_dict': backbone keys} (checkpoint_teacher.pth)"),
    "DINO": Layout(
        nesting=("teacher",), prefixes=("module.", "backbone."), dropped=("head.",), pos_offset=0.1,
        text="flat teacher backbone (or {'teacher': backbone.*, head.*})"),
    "MoCo-v3": Layout(
        nesting=("state_dict",), prefixes=("module.", "base_encoder."),
        dropped=("momentum_encoder.", "predictor.", "head."),
        text="{'state_dict': module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}"),
    # mask_token stays: timm's DINOv2 converter recognises the family by it (and drops it)
    "DINOv2": Layout(
        pos_offset=0.1,
        text="flat: cls_token, pos_embed (row 0: [cls]; 37x37 grid at 518 px), mask_token, blocks.N.ls1.gamma"),
    # the register releases interpolate to the size, antialiased (dinov2 hub: interpolate_offset=0.0,
    # interpolate_antialias=True)
    "DINOv2-reg": Layout(
        pos_antialias=True,
        text="flat: as DINOv2 plus register_tokens (4, no position embedding)"),
}


@dataclass(frozen=True)
class Preset:
    """One name of ``--model``: the family, the architecture, the official file and the paper's numbers.

    ``arch``: a timm model name built with ``kwargs`` (``--model-kwargs`` override them), or
    ``None`` with ``builder(**kwargs)`` a module of this package. ``block``: the block whose output
    the paper probes (1-based; ``None``: the last). ``paper``: Table 1's ImageNet-1k linear-probe
    top-1 (avg of patches, [cls], Selective, Selective with [cls]; ``None`` where it prints "–").
    """
    name: str
    family: str
    arch: str | None
    kwargs: dict = field(default_factory=dict)
    files: str = ""
    block: int | None = None
    paper: tuple | None = None
    builder: Callable | None = None

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.family]

    @property
    def size(self) -> str:
        return self.name.split("_")[2]


def _capi():
    from . import capi
    return capi


def _capi_large(**kwargs):
    return _capi().capi_vit_large_patch14(**kwargs)


def _p(name, family, arch, files, paper=None, block=None, **kwargs) -> Preset:
    return Preset(name=name, family=family, arch=arch, kwargs={"img_size": 224, **kwargs}, files=files,
                  block=block, paper=paper)


# SimMIM's ViT-B and BEiT-v2's pretraining encoder: one relative position bias shared by all
# blocks, no absolute position embedding, layer scale; the final norm kept ("token" pooling: timm
# makes it the per-token norm rather than a norm of the mean).
_BEIT_SHARED = dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                    global_pool="token")

PRESETS = {p.name: p for p in [
    _p("mae_vit_small_patch16", "MAE", "vit_small_patch16_224", "not released (the paper trained it)",
       (47.1, 47.4, 54.4, 54.6)),
    _p("mae_vit_base_patch16", "MAE", "vit_base_patch16_224",
       "mae_pretrain_vit_base.pth / mae_visualize_vit_base.pth / mae_finetuned_vit_base.pth",
       (65.8, 67.8, 71.6, 71.5)),
    _p("mae_vit_large_patch16", "MAE", "vit_large_patch16_224",
       "mae_pretrain_vit_large.pth / mae_visualize_vit_large.pth / mae_finetuned_vit_large.pth",
       (73.0, 75.8, 77.4, 77.4)),
    _p("mae_vit_huge_patch14", "MAE", "vit_huge_patch14_224",
       "mae_pretrain_vit_huge.pth / mae_finetuned_vit_huge.pth", (73.8, 77.0, 78.1, 78.0)),
    _p("simmim_vit_base_patch16", "SimMIM", "beit_base_patch16_224",
       "simmim_pretrain__vit_base__img224__800ep.pth", (54.3, 51.5, 62.8, 62.0), block=8,
       init_values=0.1, **_BEIT_SHARED),
    _p("maskfeat_vit_base_patch16", "MaskFeat", "vit_base_patch16_224",
       "SlowFast MaskFeat ViT-B IN-1k pretrain (.pyth)", (56.9, 62.9, 66.6, 65.8)),
    _p("beitv2_vit_base_patch16", "BEiT-v2", "beit_base_patch16_224",
       "beitv2_base_patch16_224_pt1k.pth (no 21k step)", (78.5, 78.9, 80.9, 81.0), init_values=0.1,
       **_BEIT_SHARED),
    _p("beitv2_vit_large_patch16", "BEiT-v2", "beit_large_patch16_224",
       "beitv2_large_patch16_224_pt1k.pth (no 21k step)", init_values=1e-5, **_BEIT_SHARED),
    _p("ijepa_vit_huge_patch14", "I-JEPA", "vit_huge_patch14_gap_224", "IN1K-vit.h.14-300e.pth.tar",
       (77.7, None, 79.2, None)),
    Preset(name="capi_vit_large_patch14", family="CAPI", arch=None, builder=_capi_large, kwargs={"img_size": 224},
           files="capi_vitl14_in1k.pth (backbone.* keys)", paper=(76.2, None, 82.4, None)),
    _p("ibot_vit_small_patch16", "iBOT", "vit_small_patch16_224", "checkpoint_teacher.pth (ViT-S/16)"),
    _p("ibot_vit_base_patch16", "iBOT", "vit_base_patch16_224", "checkpoint_teacher.pth (ViT-B/16)",
       (75.0, 77.8, 77.9, 78.2)),
    _p("ibot_vit_large_patch16", "iBOT", "vit_large_patch16_224", "checkpoint_teacher.pth (ViT-L/16)"),
    _p("dino_vit_small_patch16", "DINO", "vit_small_patch16_224", "dino_deitsmall16_pretrain.pth"),
    _p("dino_vit_small_patch8", "DINO", "vit_small_patch8_224", "dino_deitsmall8_pretrain.pth"),
    _p("dino_vit_base_patch16", "DINO", "vit_base_patch16_224", "dino_vitbase16_pretrain.pth",
       (71.1, 76.6, 75.2, 76.2)),
    _p("dino_vit_base_patch8", "DINO", "vit_base_patch8_224", "dino_vitbase8_pretrain.pth"),
    # MoCo-v3's ViT-S has 12 heads (timm's ViT-S: 6)
    _p("mocov3_vit_small_patch16", "MoCo-v3", "vit_small_patch16_224", "vit-s-300ep.pth.tar", num_heads=12),
    _p("mocov3_vit_base_patch16", "MoCo-v3", "vit_base_patch16_224", "vit-b-300ep.pth.tar",
       (71.1, 75.1, 75.1, 75.2)),
    _p("dinov2_vit_small_patch14", "DINOv2", "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth"),
    _p("dinov2_vit_base_patch14", "DINOv2", "vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth",
       (81.9, 83.2, 83.5, 83.5)),
    _p("dinov2_vit_large_patch14", "DINOv2", "vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth"),
    _p("dinov2_vit_small_patch14_reg4", "DINOv2-reg", "vit_small_patch14_reg4_dinov2",
       "dinov2_vits14_reg4_pretrain.pth"),
    _p("dinov2_vit_base_patch14_reg4", "DINOv2-reg", "vit_base_patch14_reg4_dinov2",
       "dinov2_vitb14_reg4_pretrain.pth"),
    _p("dinov2_vit_large_patch14_reg4", "DINOv2-reg", "vit_large_patch14_reg4_dinov2",
       "dinov2_vitl14_reg4_pretrain.pth"),
]}
# MAE's fine-tuned files load too (the final norm left at init), but the paper's "MAE (+FT)" row
# is its own fine-tuning on [cls] while the released files pool globally (fc_norm): not its checkpoint,
# and no paper numbers are shown for them.


def get_preset(name: str) -> Preset | None:
    return PRESETS.get(name)


# --- reading an official file -------------------------------------------------------------------

def unnest(raw: dict, nesting: tuple, key: str | None, path: str) -> dict:
    """The dict the weights sit under: ``raw[key]`` when ``key`` (``--checkpoint-key``) is given,
    else the first of ``nesting`` present, else ``raw`` itself."""
    if key is not None:
        if not isinstance(raw.get(key), dict):
            raise CheckpointError(f"--checkpoint-key {key}: {path} has no such dict of weights "
                                  f"(top-level keys: {_top_keys(raw)})")
        return raw[key]
    for name in nesting:
        if isinstance(raw.get(name), dict):
            return raw[name]
    return raw


def _top_keys(raw: dict) -> str:
    return ", ".join(sorted(str(k) for k in raw)[:12])


def nesting_hint(raw: dict) -> str:
    """``"; --checkpoint-key K"`` for each top-level key of ``raw`` that holds a dict of tensors
    (where the weights of a file no layout expected may sit), else ``""``."""
    keys = [str(k) for k, v in raw.items()
            if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())]
    return f"; the weights may sit under --checkpoint-key {' or --checkpoint-key '.join(keys[:3])}" if keys else ""


def map_state(state: dict, layout: Layout) -> dict:
    """The tensors of an un-nested official state dict with ``layout``'s prefixes removed from each
    key and its unused parts dropped (or mapped by the family's own ``convert``)."""
    if layout.convert is not None:
        return {k: v for k, v in layout.convert(state).items() if isinstance(v, torch.Tensor)}
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in layout.prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if not key.startswith(layout.dropped):
            out[key] = value
    return out


def interpolate_pos_grid(pos: torch.Tensor, grid: tuple, offset: float | None,
                         antialias: bool = False) -> torch.Tensor:
    """A position table ``[1, g0*g0, D]`` resized to ``grid`` ``(rows, cols)``, as the family's own
    code does at that input size: bicubic in float32, with DINO / DINOv2's
    ``scale_factor = (g + offset) / g0`` when ``offset`` is set, else ``size = grid``."""
    n, dim = pos.shape[1], pos.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embedding of {n} patch rows is not a square grid")
    table = pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset is None:
        table = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False, antialias=antialias)
    else:
        table = F.interpolate(table, mode="bicubic", align_corners=False, antialias=antialias,
                              scale_factor=((grid[0] + offset) / side, (grid[1] + offset) / side))
    if tuple(table.shape[-2:]) != tuple(grid):
        raise ValueError(f"position grid {side}x{side} resized to {tuple(table.shape[-2:])}, expected {grid}")
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos.dtype)


def resize_pos_embed(state: dict, grid: tuple, layout: Layout) -> dict:
    """``state`` with its ``pos_embed`` patch rows resized to ``grid`` when the file was trained at
    another one; its prefix rows (0 or 1: [cls]) are kept as they are."""
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3:
        return state
    n = pos.shape[1]
    prefix = 0 if math.isqrt(n) ** 2 == n else 1
    if n - prefix == grid[0] * grid[1]:
        return state
    patches = interpolate_pos_grid(pos[:, prefix:], grid, layout.pos_offset, layout.pos_antialias)
    return {**state, "pos_embed": torch.cat([pos[:, :prefix], patches], 1)}


# --- recognising a family -----------------------------------------------------------------------

def _all_keys(raw: dict) -> tuple:
    """Top-level keys, and the keys of every dict one level down (where released files nest)."""
    top = set(str(k) for k in raw)
    inner = set()
    for value in raw.values():
        if isinstance(value, dict):
            inner.update(str(k) for k in value)
    return top, inner | {k for k in top if isinstance(raw.get(k), torch.Tensor)}


def detect_family(raw: dict) -> str | None:
    """The family a checkpoint's key signature identifies (a :data:`LAYOUTS` key), ``"BEiT-style"``
    when only its BEiT architecture is evident, or None when the keys fit a plain ViT of any family."""
    top, keys = _all_keys(raw)

    def has(fragment):
        return any(fragment in k for k in keys)

    if has("residual1.fn.q_proj") or has("enc_norm"):
        return "CAPI"
    if "model_state" in top or has("hogs.") or has("pred_head."):
        return "MaskFeat"
    if has("base_encoder.") or has("momentum_encoder."):
        return "MoCo-v3"
    if "target_encoder" in top:
        return "I-JEPA"
    if has("register_tokens"):
        return "DINOv2-reg"
    if has("ls1.gamma") and has("mask_token"):
        return "DINOv2"
    if has("lm_head.") or has("cls_pt_layers."):
        return "BEiT-v2"
    if any(k.startswith(("encoder.", "module.encoder.")) for k in keys) and has("decoder.0."):
        return "SimMIM"
    if has("rel_pos_bias") or has("gamma_1"):
        return "BEiT-style"
    if has("decoder_embed") or has("decoder_blocks"):
        return "MAE"
    return None


def fits(preset: Preset | None, family: str | None, beit_model: bool = False) -> bool:
    """Whether a file of ``family`` (from :func:`detect_family`) may load into ``preset``, or, for a
    timm name (``preset`` None), into a timm ViT (``beit_model``: a timm BEiT)."""
    if family is None:
        return True
    if preset is None:
        if beit_model:
            return family in ("SimMIM", "BEiT-v2", "BEiT-style")
        return family in ("MAE", "MaskFeat", "I-JEPA", "iBOT", "DINO", "MoCo-v3", "DINOv2", "DINOv2-reg")
    if family == "BEiT-style":
        return preset.family in ("SimMIM", "BEiT-v2")
    return preset.family == family


def suggest(family: str, raw: dict, exclude: tuple = (), model_width: int | None = None) -> str:
    """The preset(s) a file of ``family`` fits, the size picked from its embedding width; never one
    of ``exclude`` (the preset in use). ``model_width``: the width of the model in use, given when
    the file fits its family: then only a preset of the file's other width is named (none when the
    widths agree: the mismatch is no matter of which preset)."""
    families = ("SimMIM", "BEiT-v2") if family == "BEiT-style" else (family,)
    width = _width(raw)
    if model_width is not None and (width is None or width == model_width):
        return ""
    names = []
    for fam in families:
        candidates = [p for p in PRESETS.values() if p.family == fam and p.name not in exclude]
        sized = [p for p in candidates if width is not None and _preset_width(p) == width]
        names += [p.name for p in (sized if model_width is not None else sized or candidates)[:1]]
    return " or ".join(f"--model {n}" for n in names) if names else ""


def _width(raw: dict) -> int | None:
    for value in [raw] + [v for v in raw.values() if isinstance(v, dict)]:
        for key, tensor in value.items():
            if isinstance(tensor, torch.Tensor) and str(key).endswith(("cls_token", "pos_embed", "registers")):
                return int(tensor.shape[-1])
    return None


# The ViT architecture of each preset size (a preset's own kwargs take precedence: MoCo-v3's ViT-S).
SIZES = {"small": dict(embed_dim=384, depth=12, num_heads=6), "base": dict(embed_dim=768, depth=12, num_heads=12),
         "large": dict(embed_dim=1024, depth=24, num_heads=16), "huge": dict(embed_dim=1280, depth=32, num_heads=16)}


def _preset_width(preset: Preset) -> int:
    return int(preset.kwargs.get("embed_dim", SIZES.get(preset.size, {}).get("embed_dim", 0)))


# --- a BEiT file's position layout ---------------------------------------------------------------

# The timm ``Beit`` arguments that decide which position tensors the model holds.
BEIT_POSITION_KWARGS = ("use_shared_rel_pos_bias", "use_rel_pos_bias", "use_abs_pos_emb")


def beit_positions(state: dict) -> dict:
    """The timm ``Beit`` position arguments (:data:`BEIT_POSITION_KWARGS`) of the model a mapped
    state dict was saved from: one relative position bias table shared by all blocks
    (``rel_pos_bias.relative_position_bias_table``: SimMIM's and BEiT-v2's pretraining files), one
    table per block (``blocks.N.attn.relative_position_bias_table``: BEiT's fine-tuned files and
    timm's ``beit_*``), both or neither; an absolute ``pos_embed`` or none."""
    per_block = any(k.startswith("blocks.") and k.endswith(".attn.relative_position_bias_table") for k in state)
    return {"use_shared_rel_pos_bias": "rel_pos_bias.relative_position_bias_table" in state,
            "use_rel_pos_bias": per_block, "use_abs_pos_emb": "pos_embed" in state}


def describe_beit_positions(kwargs: dict) -> str:
    """``kwargs`` of :func:`beit_positions` in words."""
    tables = [words for flag, words in (("use_shared_rel_pos_bias", "one relative position bias shared by all blocks"),
                                        ("use_rel_pos_bias", "a relative position bias per block"))
              if kwargs.get(flag)]
    return (" and ".join(tables) or "no relative position bias") + (
        ", an absolute pos_embed" if kwargs.get("use_abs_pos_emb") else ", no absolute pos_embed")


# --- the table of `selagg-fast models` -----------------------------------------------------------

def _score(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def preset_table() -> str:
    """One line per preset: name, family, architecture, the official file it reads, its layout,
    the block the paper probes and the paper's Table 1 top-1 ([cls] / Selective)."""
    rows = [("preset", "family", "architecture", "official file", "probed block", "[cls] / Selective")]
    for p in PRESETS.values():
        paper = f"{_score(p.paper[1])} / {_score(p.paper[2])}" if p.paper else ""
        rows.append((p.name, p.family, p.arch or "selagg_fast.capi.CAPIViT", p.files,
                     str(p.block) if p.block else "last", paper))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.append("")
    lines.append("Layouts read (key nesting; prefixes removed per key; unused parts dropped by name):")
    lines += [f"  {family}: {layout.text}" for family, layout in LAYOUTS.items()]
    lines.append("Blocks count from 1: --return-block N is the output of block N (the paper's reference "
                 "code's --return_block N-1). Top-1: the paper's Table 1 (ImageNet-1k linear probe) "
                 "of the pretrained file (MAE's mae_finetuned_* files are not the paper's checkpoints).")
    return "\n".join(lines)
