"""The paper's presets against float64 transcriptions of each family's official code.

For every preset a tiny random checkpoint is written in the family's official release layout
(tests/official_layouts.py); ``create_backbone(preset, file)`` must give the tokens, the attention
statistics, the magnitudes and the attention selections that the transcription of the official
encoder (tests/official_vit.py) gives from the same weights. The CLI (probe, analyze, compare)
then runs once on each tiny preset.
"""
from __future__ import annotations

import json
import pickletools
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, KERNELS_RUN, requires_kernels, run_cli
from official_layouts import PRESETS, make_official_checkpoint
from official_vit import official_forward

TINY = dict(embed_dim=32, depth=2, num_heads=2)
# (preset, family of the file): every preset with its own release file, and MAE's other two layouts
CASES = [(preset, family) for preset, (family, *_) in PRESETS.items()] + [
    ("mae_vit_base_patch16", "mae_visualize"), ("mae_vit_base_patch16", "mae_finetuned")]
CASE_IDS = [f"{p}-{f}" for p, f in CASES]
TOKEN_TOL = 1e-6     # float64 model against the float64 transcription (relative, max-norm)
STATS_TOL = 5e-5     # statistics of a float32 model (the kernel's dtypes) against float64, absolute
SELECT_TOL = 1e-5    # selection weights: float32 rows


def _size(preset):
    _family, patch, file_img, run_img = PRESETS[preset]
    return patch, file_img, run_img


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """case -> (checkpoint path, backbone state in official names, images at the run size); built once."""
    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(case):
        if case not in cache:
            preset, family = case
            patch, file_img, run_img = _size(preset)
            path = str(root / f"{family}.pth")
            state = make_official_checkpoint(family, path, img_size=file_img, patch_size=patch, **TINY)
            g = torch.Generator().manual_seed(1)
            images = torch.randn(3, 3, run_img, run_img, generator=g, dtype=torch.float64)
            cache[case] = (path, state, images)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def built32(official):
    """case -> float32 Backbone from the preset on the kernels' device (the statistics kernel takes
    float32 / bf16 / fp16); everything else runs in float64 on the CPU."""
    from selagg_fast.backbone import create_backbone

    cache = {}

    def get(case):
        if case not in cache:
            preset, _family = case
            cache[case] = create_backbone(preset, official(case)[0], img_size=_size(preset)[2], **TINY).to(DEVICE)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def recorded(official, built32):
    """case -> ``record_attention_stats(...).summary()`` of the float32 preset on the case's images."""
    from selagg_fast import record_attention_stats

    cache = {}

    def get(case):
        if case not in cache:
            backbone = built32(case)
            with torch.no_grad(), record_attention_stats(backbone.model) as rec:
                backbone(official(case)[2].float().to(DEVICE))
            cache[case] = rec.summary()
        return cache[case]

    return get


@pytest.fixture(scope="module")
def built(official):
    """case -> (float64 Backbone from the preset, official Forward of the transcription)."""
    from selagg_fast.backbone import create_backbone

    cache = {}

    def get(case):
        if case not in cache:
            preset, family = case
            path, state, images = official(case)
            backbone = create_backbone(preset, path, img_size=_size(preset)[2], **TINY).double()
            cache[case] = (backbone, official_forward(family, state, images, num_heads=TINY["num_heads"]))
        return cache[case]

    return get


def _rel(actual, expected) -> float:
    actual, expected = actual.detach().double(), expected.double()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------- the statistics, from full maps

def official_statistics(fwd) -> dict:
    """docs/statistics.md's columns from the transcription's ``[B, H, T, T]`` maps: ``[L, H]`` each."""
    P = fwd.num_prefix_tokens
    cols = {}
    for a in fwd.attn:
        T = a.shape[-1]
        N = T - P
        diag = a.diagonal(dim1=-2, dim2=-1)                      # [B, H, T]
        den = a[..., P:].sum(-1)                                 # mass on patch keys
        renorm = a[..., P:] / den[..., None]
        ent = -(renorm * renorm.clamp_min(1e-300).log()).sum(-1)  # [B, H, T]
        c = {"pos_self_attention": diag[..., P:].mean(-1),
             "pos_self_attention_adj_for_cls": (diag / den)[..., P:].mean(-1),
             "pos_pos_entropy": ent[..., P:].mean(-1)}
        if fwd.has_cls:
            c.update(cls_cls_attention=a[..., 0, 0], cls_cls_attention_adj_for_cls=a[..., 0, 0] / den[..., 0],
                     cls_pos_attention=a[..., 0, P:].sum(-1) / N, pos_cls_attention=a[..., P:, 0].mean(-1),
                     cls_pos_entropy=ent[..., 0])
        for name, v in c.items():
            cols.setdefault(name, []).append(v.mean(0))
    return {k: torch.stack(v) for k, v in cols.items()}


def official_magnitudes(fwd) -> dict:
    """``||attention branch after proj|| / ||block input||``: [cls] and the patch mean, ``[L, 1]``."""
    P = fwd.num_prefix_tokens
    out = {"pos_magnitude_ratio": torch.stack([r[:, P:].mean(-1).mean(0) for r in fwd.branch_ratio])[:, None]}
    if fwd.has_cls:
        out["cls_magnitude_ratio"] = torch.stack([r[:, 0].mean(0) for r in fwd.branch_ratio])[:, None]
    return out


def official_selection(fwd, method: str) -> torch.Tensor:
    """Last block's weights over the patches: [cls] row (``cls_*``) or the central patch's row."""
    a = fwd.attn[-1]
    P = fwd.num_prefix_tokens
    rows, cols = fwd.grid
    query = 0 if method.startswith("cls") else P + max(rows // 2 - 1, 0) * cols + max(cols // 2 - 1, 0)
    row = a[:, :, query, P:]                                      # [B, H, N]
    if method == "cls_min_entropy":
        per_head = row / row.sum(-1, keepdim=True)
        ent = -(per_head * per_head.log()).sum(-1)
        row = per_head[torch.arange(row.shape[0]), ent.argmin(1)]
    else:
        row = row.mean(1)
    return row / row.sum(-1, keepdim=True)


# ---------------------------------------------------------------- the files and the transcription themselves

def test_layouts_are_the_official_ones(official):
    """The files look as the official ones do: nesting, prefixes, pickled config objects."""
    def load(case):
        return torch.load(official(case)[0], map_location="cpu", weights_only=False)

    simmim_path = official(("simmim_vit_base_patch16", "simmim"))[0]
    with zipfile.ZipFile(simmim_path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    strings = {str(arg) for _op, arg, _pos in pickletools.genops(pkl)}
    assert "yacs.config CfgNode" in strings  # pickled by name, as yacs' own class
    assert {"model", "optimizer", "lr_scheduler", "epoch", "config", "encoder.rel_pos_bias.relative_position_index",
            "decoder.0.weight"} <= strings
    assert "yacs" not in sys.modules  # the stand-in module is gone again
    ijepa = load(("ijepa_vit_huge_patch14", "ijepa"))
    assert {"encoder", "target_encoder", "predictor", "opt", "epoch"} <= set(ijepa)
    assert all(k.startswith("module.") for k in ijepa["target_encoder"])
    assert not torch.equal(ijepa["encoder"]["module.norm.weight"], ijepa["target_encoder"]["module.norm.weight"])
    capi = load(("capi_vit_large_patch14", "capi"))
    assert {"backbone.registers", "backbone.encoder.blocks.0.residual1.fn.rope.freqs",
            "backbone.decoder.blocks.0.residual1.fn.q_proj.weight", "backbone.mask_token"} <= set(capi)
    moco = load(("mocov3_vit_base_patch16", "mocov3"))
    assert {"epoch", "arch", "state_dict", "optimizer", "scaler"} == set(moco)
    beit = load(("beitv2_vit_base_patch16", "beitv2"))
    assert type(beit["args"]).__name__ == "Namespace" and "cls_pt_layers.0.gamma_1" in beit["model"]
    finetuned = load(("mae_vit_base_patch16", "mae_finetuned"))["model"]
    assert "fc_norm.weight" in finetuned and "norm.weight" not in finetuned
    maskfeat = load(("maskfeat_vit_base_patch16", "maskfeat"))
    assert set(maskfeat) == {"epoch", "model_state", "optimizer_state", "cfg"}
    assert "norm.weight" not in maskfeat["model_state"] and "pred_head.projections.0.weight" in maskfeat["model_state"]


def test_transcription_matches_timm(official):
    """The transcription itself, where timm has the same architecture: MAE's ViT, BEiT (shared table
    copied to each block), DINOv2 with registers (its [cls] position row folded into the token)."""
    import timm

    def run(model, x):
        with torch.no_grad():
            return model.blocks(model._pos_embed(model.patch_embed(x)))

    path, state, images = official(("mae_vit_base_patch16", "mae"))
    vit = timm.create_model("vit_base_patch16_224", num_classes=0, img_size=64, **TINY).double().eval()
    vit.load_state_dict(state)
    assert _rel(official_forward("mae", state, images, num_heads=2).tokens, run(vit, images)) < 1e-12

    path, state, images = official(("beitv2_vit_base_patch16", "beitv2"))
    beit = timm.create_model("beitv2_base_patch16_224", num_classes=0, img_size=64, **TINY).double().eval()
    sd = {k: v for k, v in state.items() if not k.startswith("rel_pos_bias")}
    for i in range(2):
        sd[f"blocks.{i}.attn.relative_position_bias_table"] = state["rel_pos_bias.relative_position_bias_table"]
    beit.load_state_dict(sd, strict=False)
    assert torch.equal(beit.blocks[0].attn.relative_position_index, state["rel_pos_bias.relative_position_index"])
    with torch.no_grad():
        x = torch.cat([beit.cls_token.expand(3, -1, -1), beit.patch_embed(images)], 1)
        for blk in beit.blocks:
            x = blk(x)
    assert _rel(official_forward("beitv2", state, images, num_heads=2).tokens, x) < 1e-12

    reg = make_official_checkpoint("dinov2_reg4", str(Path(path).parent / "d2_56.pth"), img_size=56, **TINY)
    d2 = timm.create_model("vit_base_patch14_reg4_dinov2", num_classes=0, img_size=56, **TINY).double().eval()
    sd = {k: v.double() for k, v in reg.items()}
    sd["reg_token"] = sd.pop("register_tokens")
    sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
    sd["pos_embed"] = sd["pos_embed"][:, 1:]
    d2.load_state_dict(sd)
    img56 = images[:, :, :56, :56]
    assert _rel(official_forward("dinov2_reg4", reg, img56, num_heads=2).tokens, run(d2, img56)) < 1e-12


# ---------------------------------------------------------------- the presets against the transcription

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tokens_equal_official(case, official, built):
    backbone, fwd = built(case)
    images = official(case)[2]
    assert backbone.info.num_prefix_tokens == fwd.num_prefix_tokens
    assert backbone.info.has_cls == fwd.has_cls
    assert tuple(backbone.info.patch_grid) == tuple(fwd.grid)
    with torch.no_grad():
        tokens = backbone(images)
    err = _rel(tokens, fwd.tokens)
    assert err < TOKEN_TOL, f"{case}: tokens differ from the official forward by {err:.3g} (relative max)"


RESIZED = [c for c in CASES if _size(c[0])[1] != _size(c[0])[2]]


@pytest.mark.parametrize("case", RESIZED, ids=[f"{p}-{f}" for p, f in RESIZED])
def test_tokens_equal_official_at_the_file_grid(case, official):
    """The families run above at another grid than their file's (forward-time interpolation), here at
    the file's own grid: no interpolation, so a failure above and a pass here locate the difference."""
    from selagg_fast.backbone import create_backbone

    preset, family = case
    path, state, _images = official(case)
    img = _size(preset)[1]
    images = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    backbone = create_backbone(preset, path, img_size=img, **TINY).double()
    with torch.no_grad():
        err = _rel(backbone(images), official_forward(family, state, images, num_heads=2).tokens)
    assert err < TOKEN_TOL, f"{case}: tokens at the file's grid differ by {err:.3g}"


@pytest.mark.parametrize("case", [c for c in CASES if c[1] not in ("mae_finetuned", "maskfeat")],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[1] not in ("mae_finetuned", "maskfeat")])
def test_return_block_and_final_norm_equal_official(case, official):
    """Block 1's output, and the full model with the final norm (families whose file has one)."""
    from selagg_fast.backbone import create_backbone

    preset, family = case
    path, state, images = official(case)
    img = _size(preset)[2]
    first = create_backbone(preset, path, img_size=img, return_block=1, **TINY).double()
    normed = create_backbone(preset, path, img_size=img, final_norm=True, **TINY).double()
    with torch.no_grad():
        err1 = _rel(first(images), official_forward(family, state, images, num_heads=2, return_block=1).tokens)
        err2 = _rel(normed(images), official_forward(family, state, images, num_heads=2, final_norm=True).tokens)
    assert err1 < TOKEN_TOL and err2 < TOKEN_TOL, f"{case}: return_block=1 off by {err1:.3g}, final norm by {err2:.3g}"


@requires_kernels
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_attention_statistics_equal_official(case, built, recorded):
    fwd = built(case)[1]
    summary = recorded(case)
    expected = official_statistics(fwd)
    assert set(expected) <= set(summary), f"{case}: columns missing: {sorted(set(expected) - set(summary))}"
    if not fwd.has_cls:
        assert "cls_cls_attention" not in summary
    bad = {name: (summary[name].double() - ref).abs().max().item() for name, ref in expected.items()
           if summary[name].shape != ref.shape or (summary[name].double() - ref).abs().max().item() > STATS_TOL}
    assert not bad, f"{case}: statistics off (max abs difference per column): {bad}"


@requires_kernels
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_magnitudes_equal_official(case, built, recorded):
    fwd = built(case)[1]
    summary = recorded(case)
    bad = {name: (summary[name].double() - ref).abs().max().item() for name, ref in official_magnitudes(fwd).items()
           if name not in summary or (summary[name].double() - ref).abs().max().item() > 1e-4 * ref.abs().max()}
    assert not bad, f"{case}: magnitude ratios off: {bad}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_attention_selection_equals_official(case, official, built):
    from selagg_fast import attention_selection

    backbone, fwd = built(case)
    images = official(case)[2]
    methods = ["center_mean"] + (["cls_mean", "cls_min_entropy"] if fwd.has_cls else [])
    errors = {}
    for method in methods:
        w = attention_selection(backbone, images, method)
        ref = official_selection(fwd, method)
        errors[method] = float("inf") if w.shape != ref.shape else (w.double() - ref).abs().max().item()
    bad = {m: e for m, e in errors.items() if e > SELECT_TOL}
    assert not bad, f"{case}: selection weights off (max abs): {bad}"
    if not fwd.has_cls:
        with pytest.raises(ValueError, match="cls"):
            attention_selection(backbone, images, "cls_mean")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_probe_attention_heads_equal_official(case, official, built):
    """The probe's cls_attn / cls_attn_min_entropy / center_attn weights (read off the probing pass
    itself) and that pass's tokens."""
    from selagg_fast.probe.heads import ATTENTION_HEADS
    from selagg_fast.probe.selector import AttentionWeights

    backbone, fwd = built(case)
    images = official(case)[2]
    heads = ["center_attn"] + (["cls_attn", "cls_attn_min_entropy"] if fwd.has_cls else [])
    methods = [ATTENTION_HEADS[h] for h in heads]
    with torch.no_grad():
        tokens, weights = AttentionWeights(backbone, methods)(backbone, images)
    err = _rel(tokens, fwd.tokens)
    assert err < TOKEN_TOL, f"{case}: the probing pass's tokens differ from the official forward by {err:.3g}"
    errors = {h: (weights[:, i].double() - official_selection(fwd, m)).abs().max().item()
              for i, (h, m) in enumerate(zip(heads, methods))}
    bad = {h: e for h, e in errors.items() if not e <= SELECT_TOL}
    assert not bad, f"{case}: probe head weights off (max abs): {bad}"


# BEiT files of the other layouts: a relative position bias per block (BEiT-v2's / SimMIM's fine-tuned
# releases, timm's beit_*), with or without an absolute pos_embed, and a shared table read by a timm name
# whose default is per-block tables: the model follows the file.
BEIT_FILES = [("beitv2_vit_base_patch16", "per-block"), ("simmim_vit_base_patch16", "per-block-abs"),
              ("beit_base_patch16_224", "shared")]


@pytest.mark.parametrize("name,layout", BEIT_FILES, ids=[f"{n}-{lay}" for n, lay in BEIT_FILES])
def test_beit_file_of_another_bias_layout_equals_official(name, layout, official, tmp_path):
    from official_layouts import beit_relative_position_index

    from selagg_fast import record_attention_stats
    from selagg_fast.backbone import create_backbone

    _path, pretrain, images = official(("beitv2_vit_base_patch16", "beitv2"))
    state = {k: v for k, v in pretrain.items() if not k.startswith("rel_pos_bias.")}
    table = pretrain["rel_pos_bias.relative_position_bias_table"]
    g = torch.Generator().manual_seed(4)
    if layout == "shared":
        state.update({k: v for k, v in pretrain.items() if k.startswith("rel_pos_bias.")})
    else:  # each block its own table (the fine-tuning code copies the shared one, then trains each)
        for i in range(TINY["depth"]):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = torch.randn(table.shape, generator=g)
            state[f"blocks.{i}.attn.relative_position_index"] = beit_relative_position_index((4, 4))
    if layout.endswith("abs"):
        state["pos_embed"] = torch.randn(1, 17, TINY["embed_dim"], generator=g) * 0.5
    path = str(tmp_path / "beit.pth")
    torch.save({"model": state} if name in PRESETS else state, path)
    fwd = official_forward("beitv2", state, images, num_heads=TINY["num_heads"])
    backbone = create_backbone(name, path, img_size=64, **TINY)
    with torch.no_grad():
        err = _rel(backbone.double()(images), fwd.tokens)
    assert err < TOKEN_TOL, f"{name} from a {layout} file: tokens differ from the official forward by {err:.3g}"
    if not KERNELS_RUN:
        return
    with torch.no_grad(), record_attention_stats(backbone.model.float().to(DEVICE)) as rec:
        backbone(images.float().to(DEVICE))
    summary = rec.summary()
    bad = {k: (summary[k].double().cpu() - ref).abs().max().item() for k, ref in official_statistics(fwd).items()
           if (summary[k].double().cpu() - ref).abs().max().item() > STATS_TOL}
    assert not bad, f"{name} from a {layout} file: statistics off (max abs difference per column): {bad}"


# ---------------------------------------------------------------- the CLI on each tiny preset

# Four presets that between them take every distinct path (a timm Beit with a shared relative
# position bias read from a file that pickles a yacs config; selagg_fast's CAPI module, registers
# first and no [cls]; DINOv2 registers with forward-time position interpolation; a timm ViT without
# [cls] from a nested DDP file): a CLI run costs three interpreter starts, so the other presets are
# checked through the API above only.
CLI_PRESETS = ["simmim_vit_base_patch16", "capi_vit_large_patch14", "dinov2_vit_base_patch14_reg4",
               "ijepa_vit_huge_patch14"]


@pytest.mark.parametrize("preset", CLI_PRESETS)
def test_cli_probe_analyze_compare(preset, official, tmp_path):
    family, _patch, _file_img, run_img = PRESETS[preset]
    path = official((preset, family))[0]
    has_cls = family not in ("ijepa", "capi")
    kwargs = json.dumps({**TINY, "img_size": run_img})
    heads = "cls,avg,selective,ap4,cls_attn" if has_cls else "avg,selective,ap4,center_attn"
    backbone = ["--model", preset, "--checkpoint", path, "--model-kwargs", kwargs]
    common = ["--workers", "0", "--no-progress", "--device", "cpu"]
    run_cli(["probe", *backbone, "--data", "synthetic", "--synthetic-train-size", "16", "--synthetic-val-size", "8",
             "--synthetic-classes", "2", "--heads", heads, "--lrs", "0.5", "--epochs", "1", "--warmup-epochs", "0",
             "--batch-size", "8", "--no-augment", "--output-dir", str(tmp_path / "probe"), *common])
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert set(results["best_per_head"]) == set(heads.split(",")), results["best_per_head"]

    run_cli(["analyze", *backbone, "--data", "synthetic", "--limit", "4", "--batch-size", "4",
             "--output-dir", str(tmp_path / "analyze"), *common])
    stats = json.loads((tmp_path / "analyze" / "stats.json").read_text())
    assert stats["images"] == 4
    assert ("cls_cls_attention" in stats["metrics"]) == has_cls and "pos_pos_entropy" in stats["metrics"]

    run_cli(["compare", "--probe", str(tmp_path / "probe"), "--data", "synthetic", "--limit", "4", "--batch-size", "4",
             "--examples", "0", "--output-dir", str(tmp_path / "compare"), *common])
    compare = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert "center_attn" in compare["methods"] and ("cls_attn" in compare["methods"]) == has_cls, compare["methods"]
