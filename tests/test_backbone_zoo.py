"""Backbone presets (selagg_fast/zoo.py): each family's official file layout, written here from a
tiny random model as the family's own save code lays it out (nesting, prefixes, decoders,
optimizer state, pickled config objects, renamed keys), loads with no extra flag into the preset's
architecture with every parameter equal; files of another family, mostly-random loads and missing
nesting keys are refused with one line; DINOv2's 518-px grid is interpolated as its own code does."""
import argparse
import math
import sys
import types

import pytest
import timm
import torch
import torch.nn.functional as F

from selagg_fast import zoo
from selagg_fast.backbone import CheckpointError, create_backbone
from selagg_fast.cli import main

TINY16 = dict(img_size=64, embed_dim=32, depth=2, num_heads=2)
TINY14 = dict(img_size=56, embed_dim=32, depth=2, num_heads=2)


def tiny(name):
    return TINY14 if "patch14" in name else TINY16


def source_state(name, **kwargs):
    """A random state dict of the preset's architecture with non-trivial norms and layer scales."""
    preset = zoo.PRESETS[name]
    kwargs = {**preset.kwargs, **tiny(name), **kwargs}
    if preset.arch is None:
        model = preset.builder(**kwargs)
    else:
        model = timm.create_model(preset.arch, pretrained=False, num_classes=0, **kwargs)
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g) * 0.1 + (1.0 if k.endswith("weight") and v.dim() == 1 else 0.0)
            for k, v in model.state_dict().items() if "relative_position_index" not in k}


def rnd(*shape):
    return torch.randn(*shape)


def _fake_yacs(monkeypatch):
    """A stand-in ``yacs.config.CfgNode`` to pickle SimMIM's config with (yacs is not installed);
    removed before loading, so that the load proves nothing is imported."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, items=None):
            super().__init__(items or {})
            self.__dict__["__immutable__"] = True

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode, yacs.config = CfgNode, config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    return CfgNode


def official_file(name, path, monkeypatch, variant=""):
    """``(file, expected)``: the preset's official layout of a random model, and the state dict the
    loaded model must hold (its own key names)."""
    state = source_state(name)
    family = zoo.PRESETS[name].family
    D = 32
    if family == "MAE":
        if variant == "finetuned":  # global_pool: fc_norm and head, no norm
            body = {k: v for k, v in state.items() if not k.startswith("norm.")}
            obj = {"model": {**body, "fc_norm.weight": rnd(D), "fc_norm.bias": rnd(D), "head.weight": rnd(10, D),
                             "head.bias": rnd(10)}}
            state = body
        else:
            extra = {"mask_token": rnd(1, 1, D), "decoder_embed.weight": rnd(16, D), "decoder_pos_embed": rnd(1, 17, 16),
                     "decoder_blocks.0.norm1.weight": rnd(16), "decoder_norm.weight": rnd(16),
                     "decoder_pred.weight": rnd(768, 16)} if variant == "visualize" else {}
            obj = {"model": {**state, **extra}}
    elif family == "SimMIM":
        CfgNode = _fake_yacs(monkeypatch)
        n = 4 * 4 + 1
        obj = {"model": {**{f"encoder.{k}": v for k, v in state.items()}, "encoder.mask_token": rnd(1, 1, D),
                         "encoder.rel_pos_bias.relative_position_index": torch.zeros(n, n, dtype=torch.long),
                         "decoder.0.weight": rnd(768, D, 1, 1), "decoder.0.bias": rnd(768)},
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "lr_scheduler": {"last_epoch": 3},
               "max_accuracy": 0.0, "epoch": 799,
               "config": CfgNode({"MODEL": CfgNode({"TYPE": "vit"}), "TAG": "simmim_pretrain"})}
    elif family == "MaskFeat":  # MaskMViT deletes norm and head
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        obj = {"epoch": 1600, "model_state": {**state, "mask_token": rnd(1, 1, D), "pred_head.transforms.0.0.weight":
                                              rnd(108, D), "hogs.0.weight_x": rnd(1, 1, 5, 5)},
               "optimizer_state": {"state": {}}, "cfg": "MODEL:\n  ARCH: maskmvit\n"}
    elif family == "BEiT-v2":
        n = 4 * 4 + 1
        obj = {"model": {**state, "mask_token": rnd(1, 1, D), "lm_head.weight": rnd(64, D), "lm_head.bias": rnd(64),
                         "cls_pt_layers.0.norm1.weight": rnd(D), "cls_pt_layers.0.gamma_1": rnd(D),
                         "rel_pos_bias.relative_position_index": torch.zeros(n, n, dtype=torch.long)},
               "optimizer": {"state": {}}, "epoch": 299, "scaler": {"scale": 1.0},
               "args": argparse.Namespace(model="beit_base_patch16_224_8k_vocab_cls_pt", shared_rel_pos_bias=True)}
    elif family == "I-JEPA":
        other = {f"module.{k}": torch.randn_like(v) for k, v in state.items()}
        obj = {"encoder": other, "target_encoder": {f"module.{k}": v for k, v in state.items()},
               "predictor": {"module.predictor_embed.weight": rnd(16, D)}, "opt": {"state": {}}, "scaler": None,
               "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}
        if variant == "encoder":
            state = {k[len("module."):]: v for k, v in other.items()}
    elif family == "CAPI":
        obj = {**{f"backbone.encoder.{k}": v for k, v in state.items() if k.startswith("blocks.")},
               **{f"backbone.{k}": v for k, v in state.items() if not k.startswith("blocks.")},
               "backbone.mask_token": rnd(1, D), "backbone.decoder.blocks.0.residual1.fn.q_proj.weight": rnd(D, D),
               "head.last_layer.weight": rnd(8, D)}
    elif family == "iBOT":
        obj = {"state_dict": state}
    elif family == "DINO":
        obj = dict(state)
    elif family == "MoCo-v3":
        obj = {"epoch": 300, "arch": "vit_base",
               "state_dict": {**{f"module.base_encoder.{k}": v for k, v in state.items()},
                              "module.base_encoder.head.0.weight": rnd(64, D),
                              **{f"module.momentum_encoder.{k}": torch.randn_like(v) for k, v in state.items()},
                              "module.predictor.0.weight": rnd(64, 64)},
               "optimizer": {"state": {}}, "scaler": {"scale": 1.0}}
    elif family == "DINOv2":
        obj = {**state, "mask_token": rnd(1, D)}
    elif family == "DINOv2-reg":  # official: register_tokens, pos_embed with the [cls] row, [cls] without it
        cls, pos0 = rnd(1, 1, D), rnd(1, 1, D)
        obj = {**{k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")},
               "cls_token": cls, "pos_embed": torch.cat([pos0, state["pos_embed"]], 1),
               "register_tokens": state["reg_token"], "mask_token": rnd(1, D)}
        state = {**state, "cls_token": cls + pos0[:, 0]}
    else:
        raise AssertionError(family)
    torch.save(obj, path)
    return str(path), state


def assert_loaded(backbone, expected, left_at_init=()):
    """Every parameter equals the file's, except those a release lacks (``left_at_init``)."""
    loaded = backbone.model.state_dict()
    params = dict(backbone.model.named_parameters())
    assert params, "no parameters"
    for key in params:
        if key not in expected and key.startswith(tuple(left_at_init)):
            continue
        assert key in expected, f"{key} not in the file's expected state"
        assert torch.equal(loaded[key], expected[key]), key


CASES = [(name, "") for name in zoo.PRESETS] + [
    ("mae_vit_base_patch16", "visualize"), ("mae_vit_base_patch16", "finetuned")]


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" if v else n for n, v in CASES])
def test_official_layout_loads_exactly(tmp_path, monkeypatch, name, variant):
    path, expected = official_file(name, tmp_path / "official.pth", monkeypatch, variant)
    monkeypatch.delitem(sys.modules, "yacs", raising=False)
    monkeypatch.delitem(sys.modules, "yacs.config", raising=False)
    backbone = create_backbone(name, path, **tiny(name))
    assert_loaded(backbone, expected, zoo.PRESETS[name].layout.optional)
    P = backbone.info.num_prefix_tokens
    assert P == {"CAPI": 16, "I-JEPA": 0, "DINOv2-reg": 5}.get(zoo.PRESETS[name].family, 1)
    img = tiny(name)["img_size"]
    tokens = backbone(torch.randn(2, 3, img, img))
    grid = backbone.info.patch_grid
    assert tokens.shape == (2, P + grid[0] * grid[1], 32) and torch.isfinite(tokens).all()


def test_ijepa_checkpoint_key_picks_the_online_encoder(tmp_path, monkeypatch):
    path, expected = official_file("ijepa_vit_huge_patch14", tmp_path / "ijepa.pth", monkeypatch, "encoder")
    assert_loaded(create_backbone("ijepa_vit_huge_patch14", path, checkpoint_key="encoder", **TINY14), expected)
    with pytest.raises(CheckpointError, match=r"--checkpoint-key predictr: .*no such dict.*target_encoder"):
        create_backbone("ijepa_vit_huge_patch14", path, checkpoint_key="predictr", **TINY14)


@pytest.mark.parametrize("final_norm", [False, True])
def test_beit_style_forward_is_timms(final_norm):
    """The Backbone's own loop over timm's Beit (shared relative bias) = timm's forward_features."""
    backbone = create_backbone("simmim_vit_base_patch16", random_init=True, final_norm=final_norm, **TINY16)
    with torch.no_grad():
        for p in backbone.model.parameters():  # non-trivial relative bias and layer scales
            p.add_(torch.randn_like(p) * 0.1)
        images = torch.randn(2, 3, 64, 64)
        expected = backbone.model.forward_features(images)
        if not final_norm:
            m = backbone.model
            x = torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(images)], 1)
            for block in m.blocks:
                x = block(x, shared_rel_pos_bias=m.rel_pos_bias())
            expected = x
        torch.testing.assert_close(backbone(images), expected)
    short = create_backbone("beitv2_vit_base_patch16", random_init=True, return_block=1, **TINY16)
    assert len(short.model.blocks) == 1


def _official_dinov2_pos(pos, img, patch, interpolate_offset, interpolate_antialias):
    """DINOv2's interpolate_pos_encoding (facebookresearch/dinov2 models/vision_transformer.py) for
    a square ``img``: the [cls] row kept, the patch grid resized bicubically with the scale factor
    ``(w0 + offset) / M`` when ``interpolate_offset`` is set, else to the size ``(w0, h0)``."""
    N = pos.shape[1] - 1
    M = int(math.sqrt(N))
    w0 = h0 = img // patch
    kwargs = {}
    if interpolate_offset:
        kwargs["scale_factor"] = (float(w0 + interpolate_offset) / M, float(h0 + interpolate_offset) / M)
    else:
        kwargs["size"] = (w0, h0)
    grid = pos[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", antialias=interpolate_antialias, **kwargs)
    assert (w0, h0) == grid.shape[-2:]
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], 1)


@pytest.mark.parametrize("name", ["dinov2_vit_base_patch14", "dinov2_vit_base_patch14_reg4"])
def test_dinov2_518_file_runs_at_224_as_the_official_interpolation(tmp_path, name):
    """A file saved at DINOv2's 518 px (37x37 position grid) probed at 224 px (16x16), with the hub
    models' settings: offset 0.1 without antialiasing; registers: offset 0 (the size), antialiased."""
    file_model = timm.create_model(zoo.PRESETS[name].arch, pretrained=False, num_classes=0,
                                   **{**TINY14, "img_size": 518})
    state = {k: torch.randn_like(v) for k, v in file_model.state_dict().items()}
    cls, pos0 = rnd(1, 1, 32), rnd(1, 1, 32)
    pos = torch.cat([pos0, state["pos_embed"]], 1) if "reg4" in name else state["pos_embed"]
    assert pos.shape[1] == 1 + 37 * 37
    official = {**state, "cls_token": cls, "pos_embed": pos, "mask_token": rnd(1, 32)}
    if "reg4" in name:
        official["register_tokens"] = official.pop("reg_token")
    torch.save(official, tmp_path / "dinov2_518.pth")
    backbone = create_backbone(name, str(tmp_path / "dinov2_518.pth"), **{**TINY14, "img_size": 224})
    expected = _official_dinov2_pos(pos, 224, 14, *((0.0, True) if "reg4" in name else (0.1, False)))
    m = backbone.model
    assert backbone.info.patch_grid == (16, 16)
    if "reg4" in name:  # timm's layout: the [cls] row folded into cls_token, registers without positions
        torch.testing.assert_close(m.pos_embed, expected[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(m.cls_token, cls + pos0, rtol=0, atol=0)
        assert backbone.info.num_prefix_tokens == 5
    else:
        torch.testing.assert_close(m.pos_embed, expected, rtol=0, atol=0)
    # the official forward's first tokens at 224 px: [cls] + its position row, then patches + positions
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        patches = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
        x = torch.cat([cls, patches.flatten(2).transpose(1, 2)], 1) + expected
        if "reg4" in name:
            x = torch.cat([x[:, :1], official["register_tokens"], x[:, 1:]], 1)
        torch.testing.assert_close(m._pos_embed(m.patch_embed(images)), x, rtol=1e-5, atol=1e-5)


def test_mae_file_at_another_grid_interpolates_by_size(tmp_path, monkeypatch):
    path, state = official_file("mae_vit_base_patch16", tmp_path / "mae.pth", monkeypatch)
    backbone = create_backbone("mae_vit_base_patch16", path, **{**TINY16, "img_size": 96})
    grid = state["pos_embed"][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected = torch.cat([state["pos_embed"][:, :1], expected.permute(0, 2, 3, 1).reshape(1, 36, 32)], 1)
    torch.testing.assert_close(backbone.model.pos_embed, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("file_of,model,hint", [
    ("simmim_vit_base_patch16", "mae_vit_base_patch16", "SimMIM checkpoint: --model simmim_vit_base_patch16"),
    ("simmim_vit_base_patch16", "vit_base_patch16_224", "SimMIM checkpoint: --model simmim_vit_base_patch16"),
    ("beitv2_vit_base_patch16", "simmim_vit_base_patch16", "BEiT-v2 checkpoint: --model beitv2_vit_base_patch16"),
    ("mocov3_vit_base_patch16", "vit_base_patch16_224", r"MoCo-v3 checkpoint: --model mocov3_vit_\w+_patch16"),
    ("maskfeat_vit_base_patch16", "dino_vit_base_patch16", "MaskFeat checkpoint: --model maskfeat_vit_base_patch16"),
    ("dinov2_vit_base_patch14_reg4", "dinov2_vit_base_patch14", r"DINOv2-reg checkpoint: --model dinov2_vit_\w+_reg4"),
    ("capi_vit_large_patch14", "ijepa_vit_huge_patch14", "CAPI checkpoint: --model capi_vit_large_patch14"),
    ("ijepa_vit_huge_patch14", "capi_vit_large_patch14", "I-JEPA checkpoint: --model ijepa_vit_huge_patch14"),
])
def test_a_file_of_another_family_is_refused_with_its_preset(tmp_path, monkeypatch, file_of, model, hint):
    path, _ = official_file(file_of, tmp_path / "other.pth", monkeypatch)
    kwargs = tiny(model) if model in zoo.PRESETS else dict(TINY16)
    for allow in (False, True):
        with pytest.raises(CheckpointError, match=hint):
            create_backbone(model, path, allow_key_mismatch=allow, **kwargs)


def test_the_hint_names_the_size_of_the_file():
    """Real files: the preset of the file's embedding width."""
    moco_b = {"state_dict": {"module.base_encoder.cls_token": torch.zeros(1, 1, 768)}}
    assert zoo.suggest(zoo.detect_family(moco_b), moco_b) == "--model mocov3_vit_base_patch16"
    reg_l = {"cls_token": torch.zeros(1, 1, 1024), "register_tokens": torch.zeros(1, 4, 1024)}
    assert zoo.suggest(zoo.detect_family(reg_l), reg_l) == "--model dinov2_vit_large_patch14_reg4"
    beit = {"model": {"cls_token": torch.zeros(1, 1, 768), "blocks.0.gamma_1": torch.zeros(768)}}
    assert zoo.suggest(zoo.detect_family(beit), beit) == ("--model simmim_vit_base_patch16 or "
                                                          "--model beitv2_vit_base_patch16")


def test_mostly_random_load_is_refused_even_with_allow_key_mismatch(tmp_path):
    state = source_state("dino_vit_base_patch16")
    only_norms = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    torch.save(only_norms, tmp_path / "stub.pth")
    for allow in (False, True):
        with pytest.raises(CheckpointError, match=r"at their random init; refused even with --allow-key-mismatch"):
            create_backbone("dino_vit_base_patch16", str(tmp_path / "stub.pth"), allow_key_mismatch=allow, **TINY16)
    # a few keys missing: refused without the flag, loaded with it
    most = {k: v for k, v in state.items() if not k.startswith("blocks.1.mlp")}
    torch.save(most, tmp_path / "most.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        create_backbone("dino_vit_base_patch16", str(tmp_path / "most.pth"), **TINY16)
    create_backbone("dino_vit_base_patch16", str(tmp_path / "most.pth"), allow_key_mismatch=True, **TINY16)


def test_final_norm_needs_a_file_with_the_norm(tmp_path, monkeypatch):
    path, _ = official_file("mae_vit_base_patch16", tmp_path / "ft.pth", monkeypatch, "finetuned")
    with pytest.raises(CheckpointError, match="--final-norm: .*no final norm"):
        create_backbone("mae_vit_base_patch16", path, final_norm=True, **TINY16)


def test_final_norm_of_a_timm_name_needs_the_norm_in_the_file(tmp_path):
    # --allow-key-mismatch loads a file without norm.*: --final-norm would run a fresh LayerNorm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY16)
    path = str(tmp_path / "no_norm.pth")
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("norm.")}, path)
    with pytest.raises(CheckpointError, match="--final-norm: .*no final norm"):
        create_backbone("vit_tiny_patch16_224", path, allow_key_mismatch=True, final_norm=True, **TINY16)
    assert not create_backbone("vit_tiny_patch16_224", path, allow_key_mismatch=True, **TINY16).info.final_norm_loaded
    torch.save(model.state_dict(), path)
    assert create_backbone("vit_tiny_patch16_224", path, final_norm=True, **TINY16).info.final_norm_loaded


def test_cli_refusals_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    path, _ = official_file("simmim_vit_base_patch16", tmp_path / "simmim.pth", monkeypatch)
    monkeypatch.delitem(sys.modules, "yacs", raising=False)
    monkeypatch.delitem(sys.modules, "yacs.config", raising=False)
    args = ["analyze", "--model", "mae_vit_base_patch16", "--checkpoint", path, "--allow-key-mismatch",
            "--model-kwargs", '{"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2}', "--data", "synthetic",
            "--limit", "2", "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--model simmim_vit_base_patch16" in err and err.count("\n") == 1, err
    args[2] = "simmim_vit_base_patch16"
    assert main(args + ["--checkpoint-key", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint-key nope" in err and "config, epoch" in err and err.count("\n") == 1, err


def test_models_table_lists_every_preset(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, preset in zoo.PRESETS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert preset.family in line and (preset.arch or "CAPIViT") in line
    assert "simmim_pretrain__vit_base__img224__800ep.pth" in out and "67.8 / 71.6" in out
    simmim = next(line for line in out.splitlines() if line.startswith("simmim_vit_base_patch16"))
    assert "  8  " in simmim
    for family in zoo.LAYOUTS:
        assert f"  {family}: " in out


def test_presets_are_accepted_wherever_a_model_is():
    from selagg_fast.backbone import BackboneSettings
    BackboneSettings(model="dinov2_vit_base_patch14_reg4", random_init=True).check_backbone()
    with pytest.raises(ValueError, match="unknown timm model or preset 'mae_vit_bsae_patch16'.*mae_vit_base_patch16"):
        BackboneSettings(model="mae_vit_bsae_patch16", random_init=True).check_backbone()
    with pytest.raises(ValueError, match="--checkpoint-key encoder: needs --checkpoint"):
        BackboneSettings(model="ijepa_vit_huge_patch14", random_init=True, checkpoint_key="encoder").check_backbone()


# ---------------------------------------------------------------- BEiT: the file's position layout is followed

BEIT_LAYOUTS = {  # timm Beit arguments of the model that saved the file
    "per-block": dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_abs_pos_emb=False),  # timm's beit_*
    "shared": dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=False),  # pretraining
    "per-block-abs": dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_abs_pos_emb=True),
}


def beit_source(layout):
    """A random timm Beit of ``layout`` (non-trivial tables, layer scales, norms)."""
    model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **TINY16,
                              **BEIT_LAYOUTS[layout]).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def beit_tokens(model, images):
    """The source model's block outputs: its own blocks, fed as timm's forward_features feeds them."""
    x = torch.cat([model.cls_token.expand(images.shape[0], -1, -1), model.patch_embed(images)], 1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    for block in model.blocks:
        x = block(x, shared_rel_pos_bias=shared)
    return x


@pytest.mark.parametrize("name,layout,nesting", [
    ("beitv2_vit_base_patch16", "per-block", "model"),   # BEiT-v2's fine-tuned release layout
    ("simmim_vit_base_patch16", "per-block-abs", None),
    ("beit_base_patch16_224", "shared", None),          # timm's name defaults to per-block tables
])
def test_beit_models_follow_the_files_bias_layout(tmp_path, caplog, name, layout, nesting):
    source = beit_source(layout)
    state = source.state_dict()
    torch.save({nesting: state} if nesting else state, tmp_path / "beit.pth")
    with caplog.at_level("INFO", logger="selagg_fast"):
        backbone = create_backbone(name, str(tmp_path / "beit.pth"), **TINY16)
    words = zoo.describe_beit_positions(BEIT_LAYOUTS[layout])
    assert any(words in r.getMessage() for r in caplog.records), caplog.text
    m = backbone.model
    assert (m.rel_pos_bias is not None) == BEIT_LAYOUTS[layout]["use_shared_rel_pos_bias"]
    assert (m.blocks[0].attn.relative_position_bias_table is not None) == BEIT_LAYOUTS[layout]["use_rel_pos_bias"]
    assert (m.pos_embed is not None) == BEIT_LAYOUTS[layout]["use_abs_pos_emb"]
    # the source pools the mean: fc_norm (never used by a token probe: left out), no norm
    assert_loaded(backbone, {k: v for k, v in state.items() if not k.startswith("fc_norm.")}, ("norm.", "fc_norm."))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), beit_tokens(source, images), rtol=1e-6, atol=1e-6)
    # what was read from the file, not given: a feature cache of this backbone is keyed by it
    inferred = backbone.inferred_kwargs
    assert {k: inferred[k] for k in BEIT_LAYOUTS[layout]} == BEIT_LAYOUTS[layout]
    given = create_backbone(name, str(tmp_path / "beit.pth"), **{**TINY16, **BEIT_LAYOUTS[layout]})
    assert not set(given.inferred_kwargs) & set(BEIT_LAYOUTS[layout])


def test_an_explicit_position_kwarg_against_the_file_is_one_clear_line(tmp_path):
    torch.save(beit_source("per-block").state_dict(), tmp_path / "beit.pth")
    with pytest.raises(CheckpointError) as err:
        create_backbone("beitv2_vit_base_patch16", str(tmp_path / "beit.pth"), use_shared_rel_pos_bias=True,
                        use_rel_pos_bias=False, **TINY16)
    msg = str(err.value)
    assert "\n" not in msg
    assert "holds a relative position bias per block, no absolute pos_embed" in msg, msg
    assert "ask for one relative position bias shared by all blocks" in msg, msg
    assert '{"use_rel_pos_bias": true, "use_shared_rel_pos_bias": false}' in msg, msg
    # an explicit value the file agrees with is kept
    create_backbone("beitv2_vit_base_patch16", str(tmp_path / "beit.pth"), use_rel_pos_bias=True, **TINY16)


def test_a_fitting_file_with_a_real_mismatch_names_it_not_the_preset_in_use(tmp_path, monkeypatch):
    state = beit_source("per-block").state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("blocks.1.mlp")}},
               tmp_path / "partial.pth")
    for name in ("beitv2_vit_base_patch16", "simmim_vit_base_patch16"):
        with pytest.raises(CheckpointError, match="missing keys") as err:
            create_backbone(name, str(tmp_path / "partial.pth"), **TINY16)
        assert "--model beitv2" not in str(err.value) and "--model simmim" not in str(err.value), str(err.value)
    # the size of a fitting file still points at the preset of its width, never at the one in use
    beit_l = {"model": {"cls_token": torch.zeros(1, 1, 1024), "blocks.0.gamma_1": torch.zeros(1024)}}
    family = zoo.detect_family(beit_l)
    assert zoo.suggest(family, beit_l, exclude=("beitv2_vit_base_patch16",), model_width=768) == \
        "--model beitv2_vit_large_patch16"
    assert zoo.suggest(family, beit_l, exclude=("beitv2_vit_large_patch16",), model_width=1024) == ""
    assert "beitv2_vit_base" not in zoo.suggest(family, beit_l, exclude=("beitv2_vit_base_patch16",))


def test_weights_under_an_unexpected_key_hint_checkpoint_key(tmp_path, capsys):
    torch.save({"model": source_state("dino_vit_base_patch16"), "epoch": 3}, tmp_path / "nested.pth")
    path = str(tmp_path / "nested.pth")
    with pytest.raises(CheckpointError, match=r"no tensors found for dino_vit_base_patch16 .*--checkpoint-key model"):
        create_backbone("dino_vit_base_patch16", path, **TINY16)
    backbone = create_backbone("dino_vit_base_patch16", path, checkpoint_key="model", **TINY16)
    assert_loaded(backbone, source_state("dino_vit_base_patch16"))
    torch.save({"teacher_ema": source_state("dino_vit_base_patch16")}, tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match=r"no tensors found .*--checkpoint-key teacher_ema"):
        create_backbone("vit_base_patch16_224", str(tmp_path / "timm.pth"), **TINY16)


def test_final_norm_of_a_model_without_a_token_norm_is_refused(tmp_path):
    # timm's beit_base_patch16_224 pools the mean through fc_norm: --final-norm would be a no-op named "final_norm"
    torch.save(beit_source("per-block").state_dict(), tmp_path / "beit.pth")
    with pytest.raises(ValueError, match="--final-norm: beit_base_patch16_224 as built has no final per-token norm"):
        create_backbone("beit_base_patch16_224", str(tmp_path / "beit.pth"), final_norm=True, **TINY16)
