"""`selagg-fast compare`: running entropy / KL sums against float64, end to end on a tiny probe run."""
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import DEVICE, requires_kernels, run_cli
from PIL import Image

from selagg_fast.analysis.compare import CompareConfig, DivergenceSums, run_compare
from selagg_fast.cli import main
from selagg_fast.data import SyntheticObjects
from selagg_fast.probe.trainer import run_probe


def test_running_sums_match_a_direct_float64_computation():
    torch.manual_seed(0)
    M, N = 4, 49
    batches = []
    for B in (128, 1, 100, 71):  # 300 images in uneven batches
        logits = torch.randn(B, M, N, device=DEVICE) * torch.tensor([0.1, 1.0, 3.0, 8.0], device=DEVICE)[:, None]
        w = logits.softmax(-1)
        w[:3, 3] = 0.0  # exact zeros (an underflowed softmax weight)
        w[:3, 3, 0] = 1.0
        batches.append(w)
    sums = DivergenceSums(M, DEVICE)
    for w in batches:
        sums.update(w)
    got = sums.summary()
    a = torch.cat(batches).double().cpu()
    ent = torch.zeros(len(a), M, dtype=torch.float64)
    kl = torch.zeros(M, M, dtype=torch.float64)
    for i in range(len(a)):  # per image, per pair: the definitions (0 log 0 = 0, log clamped at 1e-12)
        for m in range(M):
            p = a[i, m]
            ent[i, m] = -sum(float(x) * np.log(float(x)) for x in p if x > 0)
            for n in range(M):
                q = a[i, n].clamp_min(1e-12)
                kl[m, n] += float((p[p > 0] * (p[p > 0].log() - q[p > 0].log())).sum())
    kl /= len(a)
    kl.fill_diagonal_(0)
    assert sums.images == 300
    np.testing.assert_allclose(got["entropy_mean"], ent.mean(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(got["entropy_std"], ent.std(0, unbiased=False).numpy(), rtol=1e-8)
    np.testing.assert_allclose(got["kl"], kl.numpy(), rtol=1e-10, atol=1e-12)
    assert all(v == 0 for v in np.diag(got["kl"])) and (np.asarray(got["kl"]) >= -1e-12).all()
    assert max(got["entropy_mean"]) <= np.log(N)
    # a resumed half plus the other half: the same sums
    half = DivergenceSums(M, DEVICE)
    half.update(batches[0])
    again = DivergenceSums(M, DEVICE)
    again.load_state_dict(half.state_dict())
    for w in batches[1:]:
        again.update(w)
    np.testing.assert_allclose(again.summary()["kl"], got["kl"], rtol=1e-12, atol=1e-15)


@requires_kernels
def test_one_pass_gives_every_methods_weights():
    # compare's per-batch weights against independent float64 computations: the selective head's
    # softmax of linear scores over the patch tokens (K = 2 branches averaged), the attention
    # methods from an unfused float64 forward's maps (tests/test_selection.py)
    from conftest import expected_selection_weights
    from test_selection import float64_maps, small_vit

    from selagg_fast.analysis.compare import _Methods
    from selagg_fast.attention_methods import BY_HEAD
    from selagg_fast.backbone import Backbone
    from selagg_fast.probe.heads import ProbeHeads, parse_heads
    model = small_vit("registers")
    backbone = Backbone(model, "small")
    P, grid = model.num_prefix_tokens, tuple(model.patch_embed.grid_size)
    heads = ProbeHeads(parse_heads("selective_k2,selective_all"), [1.0], 48, 4, P, grid_size=grid).to(DEVICE).eval()
    methods = ["selective_k2@1", "selective_all@1", "cls_attn", "cls_attn_min_entropy", "center_attn"]
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        got = _Methods(backbone, heads, methods)(images)
        tokens = backbone(images).double()
    assert got.shape == (3, 5, 16) and got.dtype == torch.float32
    agg = heads.aggregators["selective_k2@1"]
    scores = tokens[:, P:] @ agg.weight.double().T + agg.bias.double()  # [B, N, K]
    torch.testing.assert_close(got[:, 0].double(), scores.softmax(1).mean(-1), rtol=1e-4, atol=1e-7)
    agg = heads.aggregators["selective_all@1"]  # pools the prefix tokens too: the patch part, renormalised
    every = (tokens @ agg.weight.double().T + agg.bias.double())[..., 0].softmax(1)[:, P:]
    torch.testing.assert_close(got[:, 1].double(), every / every.sum(-1, keepdim=True), rtol=1e-4, atol=1e-7)
    A = float64_maps(model, images, -1)
    for i, m in enumerate(methods[2:], 2):
        expected = expected_selection_weights(A, BY_HEAD[m].weights, P, grid)
        torch.testing.assert_close(got[:, i].double().cpu(), expected.cpu(), rtol=1e-4, atol=1e-7, msg=m)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    from test_probe_run import tiny_config
    run_probe(tiny_config(root / "run", heads="cls,selective,ap2", lrs="2.0", epochs=1))
    SyntheticObjects(10, num_classes=4, img_size=32, seed=0, split="val").export(str(root / "val"))
    return root


def _config(root, out, **kw):
    cfg = dict(probe=str(root / "run"), data=str(root / "val"), batch_size=4, workers=0, output_dir=str(out),
               progress=False, device=DEVICE, precision="fp32")
    cfg.update(kw)
    return CompareConfig(**cfg)


@requires_kernels
def test_compare_end_to_end(probe_run, tmp_path, monkeypatch):
    root = probe_run
    data = tmp_path / "val"
    shutil.copytree(root / "val", data)
    (data / "broken.png").write_bytes(b"not an image")
    result = run_compare(_config(root, tmp_path / "out", data=str(data)))
    out = tmp_path / "out"
    for name in ("compare.json", "kld.png", "entropy.png", "maps.png"):
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            with Image.open(out / name) as im:
                assert len(np.unique(np.asarray(im.convert("L")))) > 10  # drawn, not blank
    on_disk = json.loads((out / "compare.json").read_text())
    assert on_disk["methods"] == ["selective@2", "ap2@2", "cls_attn", "cls_attn_min_entropy", "center_attn"]
    assert on_disk["images"] == 10 and on_disk["unreadable_images"] == 1 and on_disk["N"] == 16
    kl = np.asarray(on_disk["kl"])
    assert kl.shape == (5, 5) and (np.diag(kl) == 0).all() and (kl >= -1e-9).all()
    assert kl[0, 1:].max() > 0  # the methods differ
    assert all(0 <= e <= np.log(16) + 1e-9 for e in on_disk["entropy_mean"])
    for trained in ("selective@2", "ap2@2"):  # trained: its top-1 beside the entropy
        assert on_disk["per_method"][trained]["top1"] is not None
    assert on_disk["per_method"]["cls_attn"]["top1"] is None and on_disk["omitted_methods"] == []
    assert result["kl"] == on_disk["kl"]
    # maps.png's 4 examples: the first image of each of the 3 batches, the last batch's second too
    saved = torch.load(out / "partial.rank0.pt", map_location="cpu", weights_only=True)["examples"]
    assert saved["images"].shape == (4, 3, 32, 32) and saved["weights"].shape == (4, 5, 16)
    with pytest.raises(FileExistsError, match="--resume"):
        run_compare(_config(root, out, data=str(data)))
    # interrupted after two batches (saved every batch), then resumed: the same sums
    from selagg_fast.analysis import compare
    calls = {"n": 0}
    call = compare._Methods.__call__

    def dying(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return call(self, images)

    monkeypatch.setattr(compare._Methods, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run_compare(_config(root, tmp_path / "split", data=str(data), save_every=1))
    monkeypatch.setattr(compare._Methods, "__call__", call)
    resumed = run_compare(_config(root, tmp_path / "split", data=str(data), resume=True))
    assert resumed["images"] == 10 and resumed["unreadable_images"] == 1
    np.testing.assert_allclose(resumed["kl"], result["kl"], rtol=1e-12)
    np.testing.assert_allclose(resumed["entropy_mean"], result["entropy_mean"], rtol=1e-12)


@requires_kernels
def test_selector_model_and_methods_flag(probe_run, tmp_path):
    root = probe_run
    tiny = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3)
    # the methods' other names (weights names, compare's selector_cls) are read as their head names
    result = run_compare(_config(root, tmp_path / "sel", methods="selective,center_mean,selector_cls",
                                 selector_model="vit_tiny_patch16_224", selector_random_init=True,
                                 selector_model_kwargs=tiny, examples=0))
    assert result["methods"] == ["selective@2", "center_attn", "external_cls_attn"]
    assert not (tmp_path / "sel" / "maps.png").exists()
    assert all(0 <= e <= np.log(16) + 1e-9 for e in result["entropy_mean"])


def test_model_without_cls_leaves_the_cls_methods_out(tmp_path, capsys):
    from test_probe_run import tiny_config
    reg = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3)
    run_probe(tiny_config(tmp_path / "run", model="vit_base_patch16_reg4_gap_256", model_kwargs=reg,
                          heads="avg", lrs="1.0", epochs=1, synthetic_train_size=32, synthetic_val_size=8))
    result = run_compare(CompareConfig(probe=str(tmp_path / "run"), data="synthetic", limit=6, batch_size=3,
                                       workers=0, output_dir=str(tmp_path / "out"), progress=False, device=DEVICE,
                                       precision="fp32"))
    assert result["methods"] == ["center_attn"] and result["omitted_methods"] == ["cls_attn", "cls_attn_min_entropy"]
    assert "no [cls] token" in capsys.readouterr().out
    assert result["kl"] == [[0.0]]


@pytest.mark.parametrize("extra, match", [
    (["--methods", "cls_max"], "unknown"),
    (["--selector-model", "vit_tiny_patch16_224", "--selector-random-init", "--selector-model-kwargs",
      '{"img_size": 32, "patch_size": 16, "depth": 1}'], "patch grid"),
    (["--probe", "NOCKPT"], "no checkpoint.pt"),
    (["--selector-model-kwargs", '{"depth": 1}'], "need --selector-model"),
], ids=["unknown-method", "selector-grid", "no-checkpoint", "selector-kwargs-alone"])
def test_bad_input_is_one_error_line(probe_run, tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.delenv("SELAGG_TRACEBACK", raising=False)
    root = probe_run
    if "NOCKPT" in extra:
        empty = tmp_path / "empty_run"
        empty.mkdir()
        shutil.copy(root / "run" / "config.json", empty / "config.json")
        extra = ["--probe", str(empty)]
    args = ["compare", "--probe", str(root / "run"), "--data", str(root / "val"), "--workers", "0",
            "--no-progress", "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    code = main(args + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err


def test_two_process_sharding_equals_one_process(probe_run, tmp_path):
    root = probe_run
    args = ["compare", "--probe", str(root / "run"), "--data", str(root / "val"), "--batch-size", "3",
            "--workers", "0", "--no-progress", "--device", "cpu", "--examples", "0"]
    for nproc, out in ((None, "one"), (2, "two")):
        run_cli(args + ["--output-dir", str(tmp_path / out)], nproc=nproc)
    one = json.loads((tmp_path / "one" / "compare.json").read_text())
    two = json.loads((tmp_path / "two" / "compare.json").read_text())
    assert one["images"] == two["images"] == 10
    np.testing.assert_allclose(two["kl"], one["kl"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(two["entropy_mean"], one["entropy_mean"], rtol=1e-9)


def test_a_selector_head_left_out_for_want_of_its_selector_is_said(tmp_path, caplog):
    from test_probe_run import tiny_config
    tiny = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3)
    run_probe(tiny_config(tmp_path / "run", heads="avg,external_cls_attn", lrs="1.0", epochs=1,
                          synthetic_train_size=32, synthetic_val_size=8, selector_model="vit_tiny_patch16_224",
                          selector_random_init=True, selector_model_kwargs=tiny))
    with caplog.at_level(logging.WARNING, logger="selagg_fast"):
        result = run_compare(CompareConfig(probe=str(tmp_path / "run"), data="synthetic", limit=4, batch_size=2,
                                           workers=0, output_dir=str(tmp_path / "out"), progress=False,
                                           device=DEVICE, precision="fp32", examples=0))
    assert "external_cls_attn" not in result["methods"]
    assert "external_cls_attn (trained by the probe) is left out" in caplog.text and "--selector-model" in caplog.text


def test_examples_are_spread_over_the_pass():
    from selagg_fast.analysis.compare import _spread
    assert _spread(10, 4) == {0: 1, 2: 1, 5: 1, 7: 1}  # one image each from batches across the pass
    assert _spread(3, 4) == {0: 1, 1: 1, 2: 2} and _spread(1, 4) == {0: 4}
    assert _spread(0, 4) == {} and _spread(5, 0) == {}
