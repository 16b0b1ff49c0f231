"""Attention-analysis tools: analyze vs an unfused pipeline, sharding, resume, plots, maps, MaxBoxAccV2."""
import csv
import json
import logging
import os

import numpy as np
import pytest
import timm
import torch
from conftest import DEVICE, requires_kernels, run_cli
from PIL import Image
from test_attention import unfused_reference_columns

from selagg_fast.analysis.analyze import AnalyzeConfig, run_analyze
from selagg_fast.analysis.localize import (
    best_ious, box_iou, crop_boxes, largest_component_box, localize, max_box_acc_v2, plot_localization, read_boxes)
from selagg_fast.analysis.maps import write_maps
from selagg_fast.analysis.plot import plot_runs
from selagg_fast.backbone import Backbone
from selagg_fast.data import SyntheticObjects, analysis_images
from selagg_fast.probe.trainer import run_probe

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path), model.eval()


def analyze_config(out, ckpt, **kw):
    cfg = dict(model="vit_tiny_patch16_224", checkpoint=ckpt, model_kwargs=TINY, data="synthetic", limit=20,
               batch_size=8, workers=0, output_dir=str(out), progress=False, device=DEVICE)
    cfg.update(kw)
    return AnalyzeConfig(**cfg)


@requires_kernels
def test_analyze_equals_unfused_reference_pipeline(tmp_path, tiny_checkpoint):
    path, model = tiny_checkpoint
    stats = run_analyze(analyze_config(tmp_path / "run", path, precision="fp32"))  # vs float64 maps
    images = torch.stack([analysis_images("synthetic", 32, 20)[i][0] for i in range(20)])
    _, ref = unfused_reference_columns(model.to(DEVICE), images.to(DEVICE))  # one batch, float64 maps
    assert stats["images"] == 20 and stats["blocks"] == [1, 2] and stats["heads"] == 3
    assert stats["num_patches"] == 16 and stats["max_entropy"] == pytest.approx(np.log(16))
    for name, table in ref.items():
        assert np.abs(np.asarray(stats["metrics"][name]) - table.numpy()).max() < 1e-4, name
    assert {"cls_magnitude_ratio", "pos_magnitude_ratio"} <= set(stats["metrics"])
    assert stats["omitted_columns"] == []
    rows = list(csv.DictReader(open(tmp_path / "run" / "stats.csv")))
    assert len(rows) == 8 * 2 * 3 + 2 * 2  # 8 columns x blocks x heads + 2 magnitude ratios x blocks
    assert rows[0]["run"] == "run" and {r["metric"] for r in rows} == set(stats["metrics"])
    with pytest.raises(FileExistsError, match="--resume"):
        run_analyze(analyze_config(tmp_path / "run", path))


@requires_kernels
def test_models_without_cls_omit_cls_columns(tmp_path, capsys):
    stats = run_analyze(analyze_config(
        tmp_path / "reg", None, random_init=True, model="vit_base_patch16_reg4_gap_256",
        model_kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3)))
    assert "pos_pos_entropy" in stats["metrics"] and "cls_cls_attention" not in stats["metrics"]
    assert "pos_cls_attention" in stats["omitted_columns"] and stats["num_prefix_tokens"] == 4
    assert "no [cls] token" in capsys.readouterr().out


@requires_kernels
def test_interrupted_analysis_resumes_to_the_same_sums(tmp_path, tiny_checkpoint, monkeypatch):
    path, _ = tiny_checkpoint
    full = run_analyze(analyze_config(tmp_path / "full", path))
    calls = {"n": 0}
    forward = Backbone.forward

    def dying_forward(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, images)

    monkeypatch.setattr(Backbone, "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        run_analyze(analyze_config(tmp_path / "split", path, save_every=1))
    monkeypatch.setattr(Backbone, "forward", forward)
    assert not (tmp_path / "split" / "stats.json").exists()
    resumed = run_analyze(analyze_config(tmp_path / "split", path, resume=True))
    assert resumed["images"] == 20
    for name, table in full["metrics"].items():
        np.testing.assert_allclose(resumed["metrics"][name], table, rtol=1e-12, err_msg=name)
    # the throughput is the whole pass's, both invocations; resuming the finished run keeps it
    assert resumed["images_per_s"] > 0
    again = run_analyze(analyze_config(tmp_path / "split", path, resume=True))
    assert again["images_per_s"] == pytest.approx(resumed["images_per_s"], rel=0.2)
    with pytest.raises(ValueError, match="other settings: batch_size 8 then, 4 now$"):  # only what changed
        os.remove(tmp_path / "split" / "stats.json")
        run_analyze(analyze_config(tmp_path / "split", path, resume=True, batch_size=4))


def test_resume_compares_the_data_folder_resolved(tmp_path, tiny_checkpoint, monkeypatch):
    # `DIR/` resumes `DIR`; a relative --data resumed from another directory names other images: refused
    path, _ = tiny_checkpoint
    for where in ("a", "b"):
        os.makedirs(tmp_path / where / "imgs")
        for i in range(4):
            Image.fromarray(np.random.randint(0, 255, (40, 40, 3), np.uint8)).save(tmp_path / where / "imgs" / f"{i}.png")
    monkeypatch.chdir(tmp_path / "a")
    first = run_analyze(analyze_config(tmp_path / "run", os.path.relpath(path), data="imgs", limit=None, batch_size=2))
    assert first["checkpoint"] == os.path.abspath(path)  # stats.json's paths name the files from anywhere
    os.remove(tmp_path / "run" / "stats.json")  # the saved sums stay: resume re-reads them
    assert run_analyze(analyze_config(tmp_path / "run", path, data="imgs/", limit=None, batch_size=2,
                                      resume=True))["images"] == 4
    os.remove(tmp_path / "run" / "stats.json")
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError, match=f"other settings: data '{tmp_path / 'a' / 'imgs'}' then, "
                                         f"'{tmp_path / 'b' / 'imgs'}' now$"):
        run_analyze(analyze_config(tmp_path / "run", path, data="imgs", limit=None, batch_size=2, resume=True))


@requires_kernels
def test_resume_refuses_another_checkpoint_key(tmp_path, tiny_checkpoint):
    # the same file under another nesting key is another encoder (I-JEPA: encoder / target_encoder)
    path, _ = tiny_checkpoint
    stats = run_analyze(analyze_config(tmp_path / "run", path, checkpoint_key="model", limit=8))
    assert stats["checkpoint_key"] == "model" and stats["settings"]["checkpoint_key"] == "model"
    os.remove(tmp_path / "run" / "stats.json")
    with pytest.raises(ValueError, match="other settings"):
        run_analyze(analyze_config(tmp_path / "run", path, resume=True, limit=8))


def test_corrupt_image_is_skipped_and_counted(tmp_path, tiny_checkpoint):
    path, _ = tiny_checkpoint
    folder = tmp_path / "imgs" / "val" / "n01"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.random.randint(0, 255, (40, 50, 3), np.uint8)).save(folder / f"{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    stats = run_analyze(analyze_config(tmp_path / "run", path, data=str(tmp_path / "imgs"), limit=None,
                                       batch_size=4))
    assert stats["images"] == 5 and stats["unreadable_images"] == 1


def test_two_process_sharding_equals_one_process(tmp_path, tiny_checkpoint):
    path, _ = tiny_checkpoint
    args = ["analyze", "--model", "vit_tiny_patch16_224", "--checkpoint", path, "--model-kwargs", json.dumps(TINY),
            "--data", "synthetic", "--limit", "20", "--batch-size", "4", "--workers", "0", "--no-progress",
            "--device", "cpu"]
    for nproc, out in ((None, "one"), (2, "two")):
        run_cli(args + ["--output-dir", str(tmp_path / out)], nproc=nproc)
    one = json.loads((tmp_path / "one" / "stats.json").read_text())
    two = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert one["images"] == two["images"] == 20
    for name, table in one["metrics"].items():
        np.testing.assert_allclose(two["metrics"][name], table, rtol=1e-9, err_msg=name)


def _fake_run(folder, name, n_patches=196, cls=True, blocks=12, heads=12):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    metrics = {"pos_pos_entropy": rng.uniform(3, 5, (blocks, heads)).tolist(),
               "pos_self_attention_adj_for_cls": rng.uniform(0, 0.2, (blocks, heads)).tolist()}
    if cls:
        metrics.update(cls_cls_attention=rng.uniform(0, 0.5, (blocks, heads)).tolist(),
                       cls_pos_entropy=rng.uniform(4, 5.2, (blocks, heads)).tolist())
    (folder / "stats.json").write_text(json.dumps(dict(run=name, model="m", images=50000, blocks=list(range(1, blocks + 1)),
                                                       heads=heads, num_patches=n_patches, metrics=metrics)))
    return str(folder)


def test_plot_overlays_runs_and_decodes(tmp_path, capsys):
    runs = [_fake_run(tmp_path / "mae", "mae"), _fake_run(tmp_path / "ijepa", "ijepa", n_patches=256, cls=False)]
    from selagg_fast.cli import main
    assert main(["plot", *runs, "--output", str(tmp_path / "no_suffix")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'no_suffix'}"  # written exactly where it says
    assert open(tmp_path / "no_suffix", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", *runs, "--output", str(tmp_path / "fig.pdf")]) == 0
    assert open(tmp_path / "fig.pdf", "rb").read(4) == b"%PDF"
    out = plot_runs(runs, str(tmp_path / "fig" / "stats.png"))
    with Image.open(out) as img:
        assert img.size[0] >= 1000 and img.size[1] >= 700
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # not a blank canvas
    with pytest.raises(FileNotFoundError, match="stats.json"):
        plot_runs([str(tmp_path / "nothing")], str(tmp_path / "x.png"))


def test_undefined_values_are_warned_plotted_as_gaps_and_tabled_as_nan(tmp_path, caplog):
    # a row whose prefix keys take all its attention in float32 has no patch mass: its adjusted
    # ratio is NaN, null in stats.json; analyze says so, plot and the table leave it out
    from selagg_fast.analysis.analyze import _warn_undefined, format_stats
    folder = _fake_run(tmp_path / "sink", "sink", blocks=3, heads=2)
    stats = json.loads(open(os.path.join(folder, "stats.json")).read())
    table = stats["metrics"]["pos_self_attention_adj_for_cls"]
    table[0][1], table[2] = None, [None, None]  # one head of block 1, every head of block 3
    (tmp_path / "sink" / "stats.json").write_text(json.dumps(stats))
    with Image.open(plot_runs([folder], str(tmp_path / "sink.png"))) as img:
        assert img.size[0] >= 1000
    header, *rows = format_stats(stats).splitlines()
    assert header.split()[1:] == list(stats["metrics"])  # whole metric names
    column = list(stats["metrics"]).index("pos_self_attention_adj_for_cls") + 1
    assert [r.split()[column] for r in rows] == [f"{table[0][0]:.4f}", f"{sum(table[1]) / 2:.4f}", "nan"]
    with caplog.at_level(logging.WARNING, logger="selagg_fast"):
        _warn_undefined({"pos_self_attention_adj_for_cls": [[0.1, float("nan")], [0.2, 0.3]]})
    assert "1 of 4 block/head values undefined" in caplog.text and "patch mass is 0" in caplog.text


# ---- MaxBoxAccV2 on hand-made maps ------------------------------------------------------------
def test_largest_component_and_iou():
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:4] = True          # 4 pixels
    mask[10:15, 5:12] = True       # 35 pixels: the largest
    assert largest_component_box(mask) == (5, 10, 12, 15)
    assert largest_component_box(np.zeros((4, 4), bool)) is None
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_max_box_acc_v2_known_answers():
    size = 32
    exact = np.zeros((size, size))
    exact[8:16, 8:24] = 1.0  # the map is exactly the box
    gt = [(8, 8, 24, 16)]
    assert max_box_acc_v2(best_ious(exact, gt)[None])["max_box_acc_v2"] == pytest.approx(100)
    # IoU 0.4 at every threshold: a map box of area 40 fully inside a GT box of area 100
    partial = np.zeros((size, size))
    partial[0:4, 0:10] = 1.0
    res = max_box_acc_v2(best_ious(partial, [(0, 0, 10, 10)])[None])
    assert (res["iou30"]["max_box_acc"], res["iou50"]["max_box_acc"], res["iou70"]["max_box_acc"]) == (100, 0, 0)
    assert res["max_box_acc_v2"] == pytest.approx(100 / 3)
    # a graded blob: only a high threshold isolates the box; the best threshold is reported per IoU
    graded = np.full((size, size), 0.5)
    graded[20:30, 20:30] = 1.0
    res = max_box_acc_v2(np.stack([best_ious(graded, [(20, 20, 30, 30)]), best_ious(exact, gt)]))
    assert res["iou70"]["max_box_acc"] == 100 and res["iou70"]["threshold"] > 0.5
    assert res["images"] == 2


def test_boxes_from_csv_and_xml_and_crop(tmp_path):
    (tmp_path / "b.csv").write_text("image,x0,y0,x1,y1\nimg_1.JPEG,10,20,30,40\nimg_1,0,0,5,5\n")
    assert read_boxes(str(tmp_path / "b.csv")) == {"img_1": [(10, 20, 30, 40), (0, 0, 5, 5)]}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.xml").write_text(
        "<annotation><filename>ILSVRC2012_val_00000001</filename><size><width>500</width><height>375</height></size>"
        "<object><name>n01</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>300</xmax><ymax>200</ymax></bndbox></object>"
        "</annotation>")
    assert read_boxes(str(tmp_path / "x")) == {"ILSVRC2012_val_00000001": [(1, 2, 300, 200)]}
    # 500x375 -> resize short side to 256: 341x256, then center crop 224 (left 58, top 16)
    (box,) = crop_boxes([(100, 100, 400, 300)], 500, 375, 224)
    sx, sy = 341 / 500, 256 / 375
    np.testing.assert_allclose(box, (100 * sx - 58, 100 * sy - 16, 400 * sx - 58, 300 * sy - 16))
    (clipped,) = crop_boxes([(0, 0, 500, 375)], 500, 375, 224)
    assert clipped == (0, 0, 224, 224)
    assert crop_boxes([(0, 0, 10, 10)], 500, 375, 224) == []  # cropped away
    with pytest.raises(ValueError, match="no boxes"):
        (tmp_path / "empty.csv").write_text("image,x0,y0,x1,y1\n")
        read_boxes(str(tmp_path / "empty.csv"))


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    from test_probe_run import tiny_config
    run_probe(tiny_config(root / "run", heads="cls,selective", lrs="2.0", epochs=1))
    csv_path = SyntheticObjects(12, num_classes=4, img_size=32, seed=0, split="val").export(str(root / "val"))
    return root / "run", root / "val", csv_path


@requires_kernels
def test_maps_write_decodable_figures(tmp_path, tiny_probe):
    run, val, _ = tiny_probe
    files = sorted(str(p) for p in val.rglob("*.png"))[:2]
    written = write_maps(str(run), files, str(tmp_path / "maps"), device=DEVICE)
    assert len(written) == 2
    for path in written:
        with Image.open(path) as img:
            assert img.size[0] > 2.5 * img.size[1] > 500  # three panels side by side
    with pytest.raises(ValueError, match="--head"):
        write_maps(str(run), files, str(tmp_path / "maps"), head="avg@2", device="cpu")
    # the lr may be spelled as the user typed it (--lrs 2.0): the pair selective@2
    assert len(write_maps(str(run), files, str(tmp_path / "maps2"), head="selective@2.0", device=DEVICE)) == 2
    from selagg_fast.probe.heads import canonical_pair_name
    assert [canonical_pair_name(t) for t in ("ap4@1e30", "selective@0.10", "cls_attn", "x@y")] == \
        ["ap4@1e+30", "selective@0.1", "cls_attn", "x@y"]


def test_cls_map_is_the_last_blocks_cls_row(tiny_probe):
    # ProbeMaps' [cls] map against the attention maps of an unfused float64 copy of the backbone
    import copy
    from selagg_fast.analysis.probe_maps import ProbeMaps
    run, _, _ = tiny_probe
    pm = ProbeMaps(str(run), device="cpu")
    images = torch.randn(3, 3, pm.info.img_size, pm.info.img_size)
    _, cls_map = pm.maps(images)
    vit = copy.deepcopy(pm.backbone.model).double()
    captured = {}
    last = vit.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop.register_forward_hook(lambda m, i, out: captured.setdefault("A", out))
    with torch.no_grad():
        vit.forward_features(images.double())
    P = pm.info.num_prefix_tokens
    expected = captured["A"][:, :, 0, P:].mean(1).reshape(cls_map.shape)  # mean over heads, not renormalised
    torch.testing.assert_close(cls_map.double(), expected, rtol=1e-4, atol=1e-6)


@requires_kernels
def test_localize_end_to_end(tiny_probe):
    run, val, csv_path = tiny_probe
    result = localize(str(run), str(val), csv_path, workers=0, device=DEVICE, progress=False)
    assert result["images"] == result["images_scored"] == 12 and set(result["maps"]) == {"selective", "cls"}
    for r in result["maps"].values():
        assert 0 <= r["max_box_acc_v2"] <= 100 and r["images"] == 12
    assert result["head"] == "selective@2"
    for level in ("iou30", "iou50", "iou70"):  # the curve behind each MaxBoxAcc, for the figure
        curve = result["maps"]["selective"][level]["box_acc"]
        assert len(curve) == 100 and abs(max(curve) - result["maps"]["selective"][level]["max_box_acc"]) < 1e-3
    figure = plot_localization(result, str(run / "localization.png"))
    with Image.open(figure) as im:
        assert im.size[0] > 800 and len(np.unique(np.asarray(im.convert("L")))) > 10  # drawn, not blank
    pooled = localize(str(run), str(val), csv_path, workers=2, device=DEVICE, progress=False)
    assert pooled["maps"] == result["maps"]  # the process pool changes nothing


@requires_kernels
def test_localize_warns_with_a_count_of_images_without_boxes(tiny_probe, tmp_path, caplog):
    run, val, csv_path = tiny_probe
    rows = open(csv_path).read().splitlines()
    (tmp_path / "some.csv").write_text("\n".join(rows[:4]) + "\n")  # header + 3 of the 12 images
    with caplog.at_level("WARNING", logger="selagg_fast"):
        result = localize(str(run), str(val), str(tmp_path / "some.csv"), limit=2, workers=0, device=DEVICE,
                          progress=False)
    assert "9 of 12 images under" in caplog.text and "have no box" in caplog.text
    assert result["images_without_box"] == 9 and result["images"] == 2


@requires_kernels
def test_analyze_cli_on_a_beit_model_equals_its_float64_attention(tmp_path):
    # BEiT's attention (q/v biases, shared relative position bias, layer scale) through the CLI
    from test_adapters import BEIT, BEITS, expected_columns, float64_pass, make_model
    model = make_model("beit-shared").cpu()
    ckpt = tmp_path / "beit.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    run_cli(["analyze", "--model", "beit_base_patch16_224", "--checkpoint", str(ckpt),
             "--model-kwargs", json.dumps({**BEIT, **BEITS["beit-shared"]}), "--data", "synthetic", "--limit", "6",
             "--batch-size", "4", "--workers", "0", "--precision", "fp32", "--device", DEVICE,
             "--output-dir", str(tmp_path / "run"), "--no-progress"])
    stats = json.load(open(tmp_path / "run" / "stats.json"))
    assert stats["images"] == 6 and stats["num_prefix_tokens"] == 1 and stats["heads"] == 2
    images = torch.stack([analysis_images("synthetic", 64, 6)[i][0] for i in range(6)])
    ref = float64_pass(model.to(DEVICE), images.to(DEVICE))
    for name in expected_columns(ref[0]["A"], 1, True):
        expected = torch.stack([expected_columns(r["A"], 1, True)[name] for r in ref]).cpu().numpy()
        assert np.abs(np.asarray(stats["metrics"][name]) - expected).max() < 1e-4, name
    ratio = torch.stack([r["y"].norm(dim=-1) / r["res"].norm(dim=-1) for r in ref])  # [L, B, T]
    assert np.abs(np.asarray(stats["metrics"]["pos_magnitude_ratio"])[:, 0]
                  - ratio[..., 1:].mean((1, 2)).cpu().numpy()).max() < 1e-4
