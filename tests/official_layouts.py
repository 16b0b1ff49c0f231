"""Tiny random checkpoints saved exactly as each family's official code saves its release files.

``make_official_checkpoint(family, path, ...)`` writes the file (nesting keys, DDP ``module.``
prefixes, SimMIM's partial ``encoder.`` prefix, CAPI's ``backbone.`` prefix, and the extras the
official files carry: decoders, predictors, momentum / target encoders, heads, optimizer states,
epochs, pickled config objects) and returns the backbone's state dict under the official model's
own parameter names: what ``tests/official_vit.py`` consumes. Layouts follow each project's
model and save code; the values are random, with non-trivial biases,
layer scales and relative-position tables so that a wrong key mapping changes the tokens.
"""
from __future__ import annotations

import argparse
import math
import sys
import types

import torch

# preset name -> (family, patch size, image size of the saved file, image size the tests run at)
PRESETS = {
    "mae_vit_base_patch16": ("mae", 16, 64, 64),
    "simmim_vit_base_patch16": ("simmim", 16, 64, 64),
    "maskfeat_vit_base_patch16": ("maskfeat", 16, 64, 64),
    "beitv2_vit_base_patch16": ("beitv2", 16, 64, 64),
    "ijepa_vit_huge_patch14": ("ijepa", 14, 56, 56),
    "capi_vit_large_patch14": ("capi", 14, 56, 56),
    "ibot_vit_base_patch16": ("ibot", 16, 80, 64),     # file grid 5, run at grid 4: forward-time interpolation
    "dino_vit_base_patch16": ("dino", 16, 80, 64),
    "mocov3_vit_base_patch16": ("mocov3", 16, 64, 64),
    "dinov2_vit_base_patch14": ("dinov2", 14, 98, 56),  # file grid 7 (the release's 37 at 518 px), run at 4
    "dinov2_vit_base_patch14_reg4": ("dinov2_reg4", 14, 98, 56),
}
# MAE's other release layouts, loaded by the same preset
MAE_VARIANTS = ("mae_visualize", "mae_finetuned")

FAMILIES = tuple(sorted({f for f, *_ in PRESETS.values()} | set(MAE_VARIANTS)))
CAPI_REGISTERS = 16


class _Rand:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=self.g)

    def uniform(self, *shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=self.g)

    def linear(self, out_f, in_f):
        return self.normal(out_f, in_f, std=1.0 / math.sqrt(in_f))

    def bias(self, n):
        return self.normal(n, std=0.1)

    def norm_weight(self, n):
        return self.normal(n, std=0.1, mean=1.0)


def _vit_block(r: _Rand, D: int, *, beit=False, layer_scale=False) -> dict:
    """One timm-style block's parameters (norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2)."""
    s = {"norm1.weight": r.norm_weight(D), "norm1.bias": r.bias(D),
         "attn.qkv.weight": r.linear(3 * D, D),
         "attn.proj.weight": r.linear(D, D), "attn.proj.bias": r.bias(D),
         "norm2.weight": r.norm_weight(D), "norm2.bias": r.bias(D),
         "mlp.fc1.weight": r.linear(4 * D, D), "mlp.fc1.bias": r.bias(4 * D),
         "mlp.fc2.weight": r.linear(D, 4 * D), "mlp.fc2.bias": r.bias(D)}
    if beit:  # BEiT / SimMIM: qkv without bias, separate q and v biases (k has none), gamma layer scales
        s["attn.q_bias"] = r.normal(D, std=0.3)
        s["attn.v_bias"] = r.normal(D, std=0.3)
        s["gamma_1"] = r.uniform(D, low=0.2, high=0.8)
        s["gamma_2"] = r.uniform(D, low=0.2, high=0.8)
    else:
        s["attn.qkv.bias"] = r.normal(3 * D, std=0.3)
    if layer_scale:  # DINOv2's LayerScale modules
        s["ls1.gamma"] = r.uniform(D, low=0.2, high=0.8)
        s["ls2.gamma"] = r.uniform(D, low=0.2, high=0.8)
    return s


def _blocks(r: _Rand, depth: int, D: int, prefix="blocks", **kw) -> dict:
    return {f"{prefix}.{i}.{k}": v for i in range(depth) for k, v in _vit_block(r, D, **kw).items()}


def _patch_embed(r: _Rand, D: int, p: int, name="patch_embed.proj") -> dict:
    return {f"{name}.weight": r.normal(D, 3, p, p, std=1.0 / math.sqrt(3 * p * p)), f"{name}.bias": r.bias(D)}


def _final_norm(r: _Rand, D: int, name="norm") -> dict:
    return {f"{name}.weight": r.norm_weight(D), f"{name}.bias": r.bias(D)}


def beit_relative_position_index(grid: tuple) -> torch.Tensor:
    """BEiT's index ``[N + 1, N + 1]`` into the table of ``(2h-1)(2w-1) + 3`` rows (the last three rows:
    [cls] to patch, patch to [cls], [cls] to [cls])."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dr = rows[:, None] - rows[None, :] + (h - 1)
    dc = cols[:, None] - cols[None, :] + (w - 1)
    n_rel = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = dr * (2 * w - 1) + dc
    index[0, :] = n_rel - 3
    index[:, 0] = n_rel - 2
    index[0, 0] = n_rel - 1
    return index


def _std_vit(r, D, depth, p, grid, *, cls=True, norm=True, layer_scale=False) -> dict:
    n = grid[0] * grid[1]
    s = {}
    if cls:
        s["cls_token"] = r.normal(1, 1, D, std=0.5)
    s["pos_embed"] = r.normal(1, n + int(cls), D, std=0.5)
    s.update(_patch_embed(r, D, p))
    s.update(_blocks(r, depth, D, layer_scale=layer_scale))
    if norm:
        s.update(_final_norm(r, D))
    return s


def _beit_vit(r, D, depth, p, grid, H) -> dict:
    n_rel = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    s = {"cls_token": r.normal(1, 1, D, std=0.5)}
    s.update(_patch_embed(r, D, p))
    s.update(_blocks(r, depth, D, beit=True))
    s["rel_pos_bias.relative_position_bias_table"] = r.normal(n_rel, H, std=1.0)
    s["rel_pos_bias.relative_position_index"] = beit_relative_position_index(grid)
    s.update(_final_norm(r, D))
    return s


def _capi_rope_freqs(r: _Rand, head_dim: int) -> torch.Tensor:
    """CAPI's initial angular frequencies (x on the first half of the channels, y on the second),
    each perturbed a little so that a loader recomputing them instead of reading them shows."""
    max_f, min_f = 7.0, 7e-4
    f1 = max_f * (max_f / min_f) ** torch.linspace(0, -1, head_dim // 4)
    f1 = torch.cat([f1, f1])
    f = torch.zeros(2, head_dim)
    f[0, :head_dim // 2] = f1
    f[1, -head_dim // 2:] = f1
    return f * 2 * math.pi * r.uniform(2, head_dim, low=0.8, high=1.2)


def _capi_blocks(r, depth, D, H, prefix) -> dict:
    s = {}
    for i in range(depth):
        b = f"{prefix}.blocks.{i}"
        s.update({f"{b}.residual1.norm.weight": r.norm_weight(D),
                  f"{b}.residual1.fn.q_proj.weight": r.linear(D, D),
                  f"{b}.residual1.fn.k_proj.weight": r.linear(D, D),
                  f"{b}.residual1.fn.v_proj.weight": r.linear(D, D),
                  f"{b}.residual1.fn.proj.weight": r.linear(D, D),
                  f"{b}.residual1.fn.rope.freqs": _capi_rope_freqs(r, D // H),
                  f"{b}.residual2.norm.weight": r.norm_weight(D),
                  f"{b}.residual2.fn.fc1.weight": r.linear(4 * D, D),
                  f"{b}.residual2.fn.fc2.weight": r.linear(D, 4 * D)})
    return s


def _adam_state(params: dict) -> dict:
    """An optimizer ``state_dict()`` as torch writes it (state per parameter index, param groups)."""
    state = {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(v, dtype=torch.float32),
                 "exp_avg_sq": torch.zeros_like(v, dtype=torch.float32)}
             for i, v in enumerate(t for t in params.values() if t.is_floating_point())}
    return {"state": state, "param_groups": [{"lr": 1e-4, "weight_decay": 0.05, "betas": (0.9, 0.95),
                                              "params": list(state)}]}


class _YacsCfgNode(dict):
    """Stands in for ``yacs.config.CfgNode`` (a dict subclass) while SimMIM's file is pickled."""


def _save_with_fake_yacs(obj: dict, path: str) -> None:
    """Pickle ``obj`` so its config object is named ``yacs.config.CfgNode``, as SimMIM's files are,
    without yacs installed: the stand-in module exists only while saving."""
    yacs = types.ModuleType("yacs")
    config = types.ModuleType("yacs.config")
    _YacsCfgNode.__module__, _YacsCfgNode.__qualname__, _YacsCfgNode.__name__ = "yacs.config", "CfgNode", "CfgNode"
    config.CfgNode = _YacsCfgNode
    yacs.config = config
    saved = {k: sys.modules.get(k) for k in ("yacs", "yacs.config")}
    sys.modules["yacs"], sys.modules["yacs.config"] = yacs, config
    try:
        torch.save(obj, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _simmim_config(img_size, patch_size, D, depth, H) -> "_YacsCfgNode":
    node = lambda **kw: _YacsCfgNode(kw)  # noqa: E731
    return node(MODEL=node(TYPE="vit", NAME="simmim_pretrain", DROP_PATH_RATE=0.1,
                           VIT=node(PATCH_SIZE=patch_size, EMBED_DIM=D, DEPTH=depth, NUM_HEADS=H, INIT_VALUES=0.1,
                                    USE_APE=False, USE_RPB=False, USE_SHARED_RPB=True, USE_MEAN_POOLING=False)),
                DATA=node(IMG_SIZE=img_size, MASK_PATCH_SIZE=32, MASK_RATIO=0.6), TRAIN=node(EPOCHS=800))


def make_official_checkpoint(family: str, path: str, *, embed_dim: int = 32, depth: int = 2, num_heads: int = 2,
                             img_size: int | None = None, patch_size: int | None = None, seed: int = 0) -> dict:
    """Write a tiny random checkpoint of ``family`` in its official release layout to ``path``.

    Returns the backbone's state dict (official parameter names, no prefixes): for I-JEPA the target
    encoder, for MoCo-v3 the base encoder, for CAPI the ``EncoderDecoder`` without ``backbone.``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
    default_patch = {"ijepa": 14, "capi": 14, "dinov2": 14, "dinov2_reg4": 14}.get(family, 16)
    p = patch_size or default_patch
    img = img_size or 4 * p
    grid = (img // p, img // p)
    n = grid[0] * grid[1]
    D, H = embed_dim, num_heads
    r = _Rand(seed)

    if family in ("mae", "mae_visualize", "mae_finetuned"):
        backbone = _std_vit(r, D, depth, p, grid, norm=family != "mae_finetuned")
        model = dict(backbone)
        if family == "mae_visualize":  # the decoder MAE's visualisation demo needs
            Dd = 2 * D  # a decoder width of its own
            model.update({"mask_token": r.normal(1, 1, Dd, std=0.02),
                          "decoder_embed.weight": r.linear(Dd, D), "decoder_embed.bias": r.bias(Dd),
                          "decoder_pos_embed": r.normal(1, n + 1, Dd)})
            model.update(_blocks(r, 1, Dd, prefix="decoder_blocks"))
            model.update(_final_norm(r, Dd, "decoder_norm"))
            model.update({"decoder_pred.weight": r.linear(p * p * 3, Dd), "decoder_pred.bias": r.bias(p * p * 3)})
        if family == "mae_finetuned":  # global_pool=True: fc_norm replaces norm, plus the classifier
            model.update(_final_norm(r, D, "fc_norm"))
            model.update({"head.weight": r.linear(10, D), "head.bias": r.bias(10)})
        torch.save({"model": model}, path)

    elif family == "simmim":
        backbone = _beit_vit(r, D, depth, p, grid, H)
        backbone["mask_token"] = r.normal(1, 1, D, std=0.02)
        model = {f"encoder.{k}": v for k, v in backbone.items()}
        out = p * p * 3  # the 1x1 conv before PixelShuffle(encoder_stride)
        model.update({"decoder.0.weight": r.normal(out, D, 1, 1, std=0.1), "decoder.0.bias": r.bias(out)})
        _save_with_fake_yacs({"model": model, "optimizer": _adam_state(model),
                              "lr_scheduler": {"t_initial": 800, "decay_rate": 0.1}, "max_accuracy": 0.0,
                              "epoch": 799, "config": _simmim_config(img, p, D, depth, H)}, path)

    elif family == "maskfeat":
        backbone = _std_vit(r, D, depth, p, grid, norm=False)  # MaskMViT deletes norm and head
        model = dict(backbone)
        model["mask_token"] = r.normal(1, 1, D, std=0.02)
        hog_out = 9 * (p // 8) ** 2 * 3
        model.update({"pred_head.transforms.0.0.weight": r.norm_weight(D), "pred_head.transforms.0.0.bias": r.bias(D),
                      "pred_head.projections.0.weight": r.linear(hog_out, D),
                      "pred_head.projections.0.bias": r.bias(hog_out),
                      "hogs.0.weight_x": r.normal(3, 1, 3, 3), "hogs.0.weight_y": r.normal(3, 1, 3, 3),
                      "hogs.0.gkern": r.uniform(16, 16)})
        cfg = ("MODEL:\n  ARCH: maskmvit\n  MODEL_NAME: MaskMViT\n"
               "MVIT:\n  EMBED_DIM: %d\n  DEPTH: %d\n  NUM_HEADS: %d\n"
               "  PATCH_2D: true\nMASK:\n  PRED_HOG: true\n" % (D, depth, H))
        torch.save({"epoch": 300, "model_state": model, "optimizer_state": _adam_state(model), "cfg": cfg}, path)

    elif family == "beitv2":
        backbone = _beit_vit(r, D, depth, p, grid, H)
        model = dict(backbone)
        model["mask_token"] = r.normal(1, 1, D, std=0.02)
        model.update({"lm_head.weight": r.linear(64, D), "lm_head.bias": r.bias(64)})
        model.update(_blocks(r, 2, D, prefix="cls_pt_layers", beit=True))  # the pretraining [cls] condenser head
        args = argparse.Namespace(model="beit_base_patch16_224_8k_vocab_cls_pt", input_size=img, rel_pos_bias=True,
                                  abs_pos_emb=False, layer_scale_init_value=0.1, early_layers=1, head_layers=2,
                                  shared_lm_head=True, epochs=300, lr=1.5e-3)
        torch.save({"model": model, "optimizer": _adam_state(model), "epoch": 299,
                    "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)

    elif family == "ijepa":
        encoder = _std_vit(r, D, depth, p, grid, cls=False)
        backbone = _std_vit(r, D, depth, p, grid, cls=False)  # the target (EMA) encoder differs
        Dp = 2 * D
        predictor = {"predictor_embed.weight": r.linear(Dp, D), "predictor_embed.bias": r.bias(Dp),
                     "mask_token": r.normal(1, 1, Dp, std=0.02), "predictor_pos_embed": r.normal(1, n, Dp)}
        predictor.update(_blocks(r, 1, Dp, prefix="predictor_blocks"))
        predictor.update(_final_norm(r, Dp, "predictor_norm"))
        predictor.update({"predictor_proj.weight": r.linear(D, Dp), "predictor_proj.bias": r.bias(D)})
        ddp = lambda s: {f"module.{k}": v for k, v in s.items()}  # noqa: E731
        torch.save({"encoder": ddp(encoder), "predictor": ddp(predictor), "target_encoder": ddp(backbone),
                    "opt": _adam_state({**encoder, **predictor}), "scaler": None, "epoch": 300, "loss": 0.1,
                    "batch_size": 2048, "world_size": 16, "lr": 1e-3}, path)

    elif family == "capi":
        backbone = {"registers": r.normal(1, CAPI_REGISTERS, D, std=0.5),
                    "patch_embed.weight": r.normal(D, 3, p, p, std=1.0 / math.sqrt(3 * p * p)),
                    "patch_embed.bias": r.bias(D)}
        backbone.update(_capi_blocks(r, depth, D, H, "encoder"))
        full = dict(backbone)
        full.update(_capi_blocks(r, 1, D, H, "decoder"))
        full["mask_token"] = r.normal(1, D, std=0.02)
        state = {f"backbone.{k}": v for k, v in full.items()}
        state.update({"head.layer.weight": r.normal(64, D), "head.layer.bias": r.bias(64)})  # the online clustering
        torch.save(state, path)

    elif family == "ibot":
        backbone = _std_vit(r, D, depth, p, grid)
        torch.save({"state_dict": backbone}, path)  # extract_backbone_weights.py's output

    elif family == "dino":
        backbone = _std_vit(r, D, depth, p, grid)
        torch.save(backbone, path)  # the teacher backbone, flat

    elif family == "mocov3":
        backbone = _std_vit(r, D, depth, p, grid)
        momentum = _std_vit(r, D, depth, p, grid)  # the momentum encoder differs
        proj = lambda: {"head.0.weight": r.linear(64, D), "head.1.weight": r.norm_weight(64),  # noqa: E731
                        "head.1.bias": r.bias(64), "head.1.running_mean": r.bias(64),
                        "head.1.running_var": r.uniform(64, low=0.5, high=1.5),
                        "head.1.num_batches_tracked": torch.tensor(100), "head.3.weight": r.linear(16, 64)}
        state = {f"module.base_encoder.{k}": v for k, v in {**backbone, **proj()}.items()}
        state.update({f"module.momentum_encoder.{k}": v for k, v in {**momentum, **proj()}.items()})
        state.update({"module.predictor.0.weight": r.linear(64, 16), "module.predictor.3.weight": r.linear(16, 64)})
        torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": _adam_state(state),
                    "scaler": {"scale": 65536.0}}, path)

    elif family in ("dinov2", "dinov2_reg4"):
        backbone = _std_vit(r, D, depth, p, grid, layer_scale=True)
        backbone["mask_token"] = r.normal(1, D, std=0.02)
        if family == "dinov2_reg4":
            backbone["register_tokens"] = r.normal(1, 4, D, std=0.5)
        torch.save(backbone, path)  # the released backbone file, flat
        backbone = {k: v for k, v in backbone.items() if k != "mask_token"}

    if family == "simmim":
        backbone = {k: v for k, v in backbone.items() if k != "mask_token"}
    return backbone
