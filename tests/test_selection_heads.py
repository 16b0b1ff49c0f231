"""The probe's non-trainable attention heads (issue 13 item 2) and the demo's selection table (item 5).

cls_attn / cls_attn_min_entropy / center_attn / external_cls_attn: weights from the probed block's
(or a selector's) attention, pooled by softmax_pool, then BatchNorm + Linear. Checked against the
maps of an unfused float64 forward (docs/statistics.md, "Attention selections", written out
here), cached against live, and their refusals through the CLI.
"""
import copy
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE, rel_err

from selagg_fast.backbone import create_backbone
from selagg_fast.cli import main
from selagg_fast.demo import format_selections
from selagg_fast.distributed import init_distributed
from selagg_fast.probe.heads import ProbeHeads, parse_heads
from selagg_fast.probe.heads import pool_attention
from selagg_fast.probe.selector import AttentionWeights, build_selector, methods_of
from selagg_fast.probe.trainer import ProbeConfig, _resolved, _Run, run_probe

# 32 x 32 images, 8 x 8 patches: a 4 x 4 grid (N = 16); the central patch is row 1, column 1
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
SELECTOR = dict(img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=2)
HEADS = "cls_attn,cls_attn_min_entropy,center_attn,external_cls_attn"


def tiny_config(out, **overrides) -> ProbeConfig:
    cfg = dict(model="vit_tiny_patch16_224", random_init=True, model_kwargs=TINY, data="synthetic",
               synthetic_train_size=64, synthetic_val_size=32, synthetic_classes=4, heads=HEADS, lrs="0.5,2.0",
               epochs=2, warmup_epochs=1, batch_size=16, workers=0, augment=False, output_dir=str(out),
               progress=False, device=DEVICE, selector_model="vit_tiny_patch16_224", selector_random_init=True,
               selector_model_kwargs=SELECTOR)
    cfg.update(overrides)
    return ProbeConfig(**cfg)


def _reference_weights(backbone, images):
    """``(tokens, {method: a [B, N]})`` in float64 from an unfused forward's full attention maps of
    the probed (last kept) block; written out from the definitions, independent of selection.py."""
    model = copy.deepcopy(backbone).double()
    for block in model.model.blocks:
        block.attn.fused_attn = False
    seen = {}
    hook = model.model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("A", o))
    tokens = model(images.double())
    hook.remove()
    A = seen["A"]  # [B, H, T, T]
    P = model.info.num_prefix_tokens
    rows, cols = model.info.patch_grid
    out = {}
    if model.info.has_cls:
        cls = A[:, :, 0, P:]
        out["cls_mean"] = cls.mean(1) / cls.mean(1).sum(-1, keepdim=True)
        per_head = cls / cls.sum(-1, keepdim=True)
        entropy = -(per_head * per_head.log()).sum(-1)  # [B, H]
        out["cls_min_entropy"] = per_head[torch.arange(len(A)), entropy.argmin(1)]
    c = P + (rows // 2 - 1) * cols + (cols // 2 - 1)  # k = 1 block [c - 1, c) of each side, c = g // 2
    center = A[:, :, c, P:].mean(1)
    out["center_mean"] = center / center.sum(-1, keepdim=True)
    return tokens, out


def _reference_pooled(tokens, a, P, method):
    """The reference's pooled feature: sum_t a_t z_t ([cls] methods), (1/N) sum_t a_t z_t (central
    patch, external selector with its un-renormalised weights)."""
    z = tokens[:, P:]
    pooled = (a[..., None] * z).sum(1)
    return pooled / z.shape[1] if method in ("center_mean", "external_cls_mean") else pooled


@pytest.mark.parametrize("kwargs, return_block", [
    (dict(TINY), None),                                             # [cls], the last block
    (dict(TINY, depth=3, reg_tokens=2, qk_norm=True), 2),           # registers, qk_norm, an inner block
], ids=["cls-last-block", "registers-qk_norm-block-2-of-3"])
def test_pooled_features_match_float64_unfused_maps(kwargs, return_block):
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16_224", random_init=True, return_block=return_block, **kwargs)
    backbone = backbone.to(DEVICE)
    cfg = tiny_config("unused")
    selector = build_selector(cfg, backbone.info, DEVICE)
    specs = parse_heads(HEADS)
    methods = methods_of(specs)
    assert methods == ["cls_mean", "cls_min_entropy", "center_mean", "external_cls_mean"]
    images = torch.randn(5, 3, 32, 32, device=DEVICE)
    weights_fn = AttentionWeights(backbone, methods, selector)
    with torch.no_grad():
        tokens, weights = weights_fn(backbone, images)
    assert weights.dtype == torch.float32 and weights.shape == (5, 4, 16)
    ref_tokens, ref = _reference_weights(backbone.cpu(), images.cpu())
    backbone.to(DEVICE)
    sel_model = copy.deepcopy(selector).cpu().double()  # its last block's [cls] row, heads averaged
    for block in sel_model.model.blocks:
        block.attn.fused_attn = False
    seen = {}
    sel_model.model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("A", o))
    sel_model(images.cpu().double())
    ref["external_cls_mean"] = seen["A"][:, :, 0, 1:].mean(1)  # NOT renormalised
    assert float(ref["external_cls_mean"].sum(-1).max()) < 1  # some mass on [cls]: the scale matters
    P = backbone.info.num_prefix_tokens
    assert rel_err(tokens, ref_tokens) < 1e-5
    for i, m in enumerate(methods):
        assert rel_err(weights[:, i], ref[m]) < 1e-5, m
        if m != "external_cls_mean":
            torch.testing.assert_close(weights[:, i].sum(-1).double().cpu(), torch.ones(5, dtype=torch.float64))
    pooled = pool_attention(tokens, weights, methods, P)
    assert pooled.shape == (5, 4, 48)
    for i, m in enumerate(methods):
        assert rel_err(pooled[:, i], _reference_pooled(ref_tokens, ref[m], P, m)) < 1e-5, m
    # the heads' features are those pooled vectors: one per method, shared by every lr
    heads = ProbeHeads(specs, [0.1, 1.0], 48, 4, P).to(DEVICE)
    features = {}
    heads._attention_features(tokens, weights, features)
    for spec, lr in heads.pairs:
        i = methods.index({"cls_attn": "cls_mean", "cls_attn_min_entropy": "cls_min_entropy",
                           "center_attn": "center_mean", "external_cls_attn": "external_cls_mean"}[spec.kind])
        assert torch.equal(features[heads._key(spec, lr)], pooled[:, i])
    assert not list(heads.aggregators.parameters())  # nothing to train but BatchNorm + Linear
    logits = heads((tokens, weights))
    assert set(logits) == set(heads.pair_names()) and all(torch.isfinite(v).all() for v in logits.values())
    with pytest.raises(ValueError, match="need their weights"):
        heads(tokens)


def test_heads_train_on_the_synthetic_task(tmp_path):
    results = run_probe(tiny_config(tmp_path / "run", heads="avg," + HEADS))
    assert set(results["best_per_head"]) == {"avg", *HEADS.split(",")}
    assert len(results["pairs"]) == 10 and not any(p["diverged"] for p in results["pairs"])
    assert all(0 <= p["top1"] <= 100 for p in results["pairs"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["config"]["selector_model"] == "vit_tiny_patch16_224"
    trained = [k for k in state["heads"] if k.startswith("classifiers.cls_attn@")]
    assert trained and not [k for k in state["heads"] if k.startswith("aggregators.cls_attn")]


def test_cached_and_live_give_the_same_features(tmp_path):
    cfg = tiny_config(tmp_path / "run", heads="center_attn,external_cls_attn,cls_attn",
                      cache_features=str(tmp_path / "c"), cache_dtype="fp32", device="cpu", precision="fp32")
    run = _Run(_resolved(cfg, None), init_distributed("cpu"))
    run.build_cache()
    cached = list(run.cached_batches("val", 0))
    live = list(run.live_batches("val", 0))
    assert len(cached) == len(live) == 2
    for (c, cl, _), (l, ll, _) in zip(cached, live):
        assert torch.equal(cl, ll)
        assert torch.equal(c[0], l[0]) and torch.equal(c[1], l[1])  # tokens and float32 weights, bit for bit
        fc, fl = {}, {}
        run.heads._attention_features(*c, fc)
        run.heads._attention_features(*l, fl)
        assert fc.keys() == fl.keys() and all(torch.equal(fc[k], fl[k]) for k in fc)
    # the cache's key names the methods and the selector: other heads or selector, another store
    folders = sorted(p.name for p in (tmp_path / "c").iterdir())
    run2 = _Run(_resolved(tiny_config(tmp_path / "run2", heads="center_attn", cache_features=str(tmp_path / "c"),
                                      cache_dtype="fp32", device="cpu", precision="fp32", selector_model=None,
                                      selector_random_init=False, selector_model_kwargs={}), None),
                init_distributed("cpu"))
    run2.build_cache()
    assert len(sorted(p.name for p in (tmp_path / "c").iterdir())) == len(folders) + 2


def _probe_args(tmp_path, heads, model_kwargs, extra):
    return ["probe", "--data", "synthetic", "--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs",
            model_kwargs or '{"img_size": 32, "patch_size": 8, "depth": 1}', "--heads", heads, "--epochs", "1",
            "--batch-size", "8", "--synthetic-train-size", "16",
            "--synthetic-val-size", "8", "--workers", "0", "--no-progress", "--device", "cpu",
            "--output-dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("heads, model_kwargs, extra, match", [
    ("external_cls_attn", None, ["--selector-model", "vit_tiny_patch16_224", "--selector-random-init",
                                 "--selector-model-kwargs", '{"img_size": 32, "patch_size": 16, "depth": 1}'],
     "patch grid 2x2 differs from the probed model's 4x4"),
    ("cls_attn", '{"img_size": 32, "patch_size": 8, "depth": 1, "class_token": false, "global_pool": "avg"}', [],
     "head 'cls_attn' needs a [cls] token"),
    ("cls_attn_min_entropy", '{"img_size": 32, "patch_size": 8, "depth": 1, "class_token": false, '
                             '"global_pool": "avg"}', [], "needs a [cls] token"),
    ("external_cls_attn", None, [], "needs a selector: pass --selector-model"),
    ("cls_attn", None, ["--selector-model", "vit_tiny_patch16_224", "--selector-random-init"],
     "only the external_cls_attn head uses it"),
    ("avg", None, ["--selector-checkpoint", "x.pth"], "need --selector-model"),
    ("external_cls_attn", None, ["--selector-model", "vit_no_such_model", "--selector-random-init"],
     "--selector-model: unknown timm model"),
], ids=["selector-grid", "cls_attn-no-cls", "min_entropy-no-cls", "external-no-selector", "selector-without-head",
        "selector-checkpoint-alone", "unknown-selector"])
def test_refusals_are_one_error_line(tmp_path, capsys, heads, model_kwargs, extra, match):
    args = _probe_args(tmp_path, heads, model_kwargs, extra)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING")]
    assert len(err) == 1 and err[0].startswith("selagg-fast probe: error: ") and match in err[0], err


def test_demo_selection_table_formatting():
    methods = ["selective@1", "cls_attn", "cls_attn_min_entropy", "center_attn"]
    labels = {"selective@1": "selective@1", "cls_attn": "mean [cls] attn",
              "cls_attn_min_entropy": "min-entropy [cls] attn", "center_attn": "central patch attn"}
    kl = np.arange(16, dtype=float).reshape(4, 4) / 7
    np.fill_diagonal(kl, 0)
    result = dict(methods=methods, kl=kl.tolist(), N=64, max_entropy=math.log(64), per_method={
        m: dict(label=labels[m], entropy_mean=1.5 + i, entropy_std=0.1,
                top1=None if m == "cls_attn_min_entropy" else 90.0 + i)
        for i, m in enumerate(methods)})
    text = format_selections(result)
    lines = text.splitlines()
    assert len(lines) == 1 + 4 + 1
    assert "KL(selective@1||.)" in lines[0] and "entropy" in lines[0] and "top-1" in lines[0]
    assert lines[1].split()[:2] == ["selective@1", "(trained)"] and lines[1].split()[-3:] == ["90.0", "1.50", "0.00"]
    assert lines[2].split()[-3:] == ["91.0", "2.50", f"{kl[0, 1]:.2f}"]
    assert lines[3].split()[-3:] == ["-", "3.50", f"{kl[0, 2]:.2f}"]  # no head trained on it
    assert lines[4].startswith("central patch attn") and lines[4].split()[-1] == f"{kl[0, 3]:.2f}"
    assert "log N = 4.16" in lines[5]
    with pytest.raises(ValueError, match="no trained 'selective' head"):
        format_selections(dict(result, methods=methods[1:]))


def test_demo_refuses_an_older_demo_folder(tmp_path, capsys):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "config.json").write_text('{"heads": "cls,avg,selective"}')
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds the run of an older demo" in err[0], err


def test_center_attn_on_a_model_without_cls_and_a_non_square_grid():
    # no [cls] (P = 0), a 4 x 6 grid: the central patch is row 1, column 2 (each side's own c)
    torch.manual_seed(1)
    backbone = create_backbone("vit_tiny_patch16_224", random_init=True, **dict(
        TINY, img_size=(32, 48), class_token=False, global_pool="avg")).to(DEVICE)
    assert backbone.info.patch_grid == (4, 6) and backbone.info.num_prefix_tokens == 0
    specs = parse_heads("center_attn,avg", has_cls=False)
    heads = ProbeHeads(specs, [0.1], 48, 3, 0).to(DEVICE)
    assert heads.attention_methods == heads.selection_methods == ["center_mean"]
    images = torch.randn(3, 3, 32, 48, device=DEVICE)
    with torch.no_grad():
        tokens, weights = AttentionWeights(backbone, heads.selection_methods)(backbone, images)
    ref_tokens, ref = _reference_weights(backbone.cpu(), images.cpu())
    assert rel_err(weights[:, 0], ref["center_mean"]) < 1e-5
    features = {}
    heads._attention_features(tokens, weights, features)
    expected = _reference_pooled(ref_tokens, ref["center_mean"], 0, "center_mean")
    assert rel_err(features["center_attn@0_1"], expected) < 1e-5


def test_one_registry_names_every_attention_method():
    """Each attention method declared once (attention_methods): the probe's heads, the weights'
    names, compare's --methods (any of its names gives the head's) and the README's head table."""
    from pathlib import Path

    from selagg_fast.analysis.compare import choose_methods, method_label
    from selagg_fast.attention_methods import ATTENTION_METHODS, attention_method
    from selagg_fast.probe.heads import ATTENTION_HEADS
    from selagg_fast.selection import CLS_METHODS, METHODS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for m in ATTENTION_METHODS:
        spec = parse_heads(m.head)[0]
        assert spec.attention_weighted and not spec.learns_weights and ATTENTION_HEADS[m.head] == m.weights
        assert f"| `{m.head}` |" in readme, m.head
        assert (m.weights in METHODS) != m.selector and (m.weights in CLS_METHODS) == (m.needs_cls and not m.selector)
        assert method_label(m.head) == m.label
        for name in (m.head, m.weights, *m.aliases):
            assert attention_method(name) is m
            assert choose_methods(name, True, True, {}, []) == ([m.head], [])
        if m.needs_cls:
            with pytest.raises(ValueError, match="needs a \\[cls\\] token"):
                parse_heads(m.head, has_cls=False)
    assert attention_method("selective") is None and method_label("selective@1") == "selective@1"
    with pytest.raises(ValueError, match="no \\[cls\\] token"):
        choose_methods("cls_mean", False, False, {}, [])
    assert choose_methods(None, False, False, {}, []) == (["center_attn"], ["cls_attn", "cls_attn_min_entropy"])


def test_forward_takes_the_attention_weights_under_either_keyword():
    P, grid, D = 1, (4, 4), 24
    heads = ProbeHeads(parse_heads("center_attn,selective"), [0.1], D, 3, P, grid_size=grid).to(DEVICE).eval()
    tokens = torch.randn(2, P + 16, D, device=DEVICE)
    weights = torch.rand(2, 1, 16, device=DEVICE)
    with torch.no_grad():
        positional = heads(tokens, weights)
        for got in (heads(tokens, attention_weights=weights), heads(tokens, selection=weights),
                    heads((tokens, weights))):
            for name in positional:
                torch.testing.assert_close(got[name], positional[name], rtol=0, atol=0)
    assert torch.equal(heads.trained_weights(tokens, "selective@0.1"), heads.selection_weights(tokens, "selective@0.1"))
