"""End-to-end probing runs on a tiny random-init ViT: outputs, resume, feature cache, torchrun, demo."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DEVICE, run_cli

from selagg_fast.probe.outputs import format_results
from selagg_fast.probe.trainer import ProbeConfig, run_probe

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def tiny_config(out, **overrides) -> ProbeConfig:
    cfg = dict(model="vit_tiny_patch16_224", random_init=True, model_kwargs=TINY, data="synthetic",
               synthetic_train_size=128, synthetic_val_size=64, synthetic_classes=4, heads="avg,selective",
               lrs="0.5,2.0", epochs=2, warmup_epochs=1, batch_size=32, workers=0, output_dir=str(out),
               progress=False, device=DEVICE)  # CUDA: bf16 autocast and the fused kernels
    cfg.update(overrides)
    return ProbeConfig(**cfg)


def _heads_state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)["heads"]


def _strict_json(path):
    """json.load that refuses NaN / Infinity, as strict parsers do."""
    def refuse(name):
        raise ValueError(f"{path}: bare {name}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f] if str(path).endswith(".jsonl") \
            else json.load(f, parse_constant=refuse)


def _assert_same_heads(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def test_outputs_and_result_structure(tmp_path):
    results = run_probe(tiny_config(tmp_path / "run"))
    out = tmp_path / "run"
    config = json.loads((out / "config.json").read_text())
    assert config["effective_batch"] == 32 and config["pairs"] == ["avg@0.5", "avg@2", "selective@0.5", "selective@2"]
    assert config["final_norm"] is False  # the paper's reference code probes without the final LayerNorm
    assert ProbeConfig().optimizer == "lars" and ProbeConfig().epochs == 90 and ProbeConfig().warmup_epochs == 10
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["head"], m["base_lr"]) for m in lines][:4] == [
        (1, "avg", 0.5), (1, "avg", 2.0), (1, "selective", 0.5), (1, "selective", 2.0)]
    assert len(lines) == 8 and all(0 <= m["top1"] <= m["top5"] <= 100 for m in lines)
    assert lines[-1]["lr"] == pytest.approx(2.0 * 32 / 256 * 0.5 * (1 + np.cos(np.pi * 0.75)))  # last step: epoch 1 + 3/4
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(results["best_per_head"]) == {"avg", "selective"} and len(results["pairs"]) == 4
    for head, best in results["best_per_head"].items():
        assert best["top1"] == max(p["top1"] for p in results["pairs"] if p["head"] == head)
    assert "selective" in format_results(results)
    from PIL import Image
    with Image.open(out / "curves.png") as img:  # top-1 and loss per epoch, every pair
        assert img.size[0] > 1000 and np.asarray(img.convert("L")).std() > 10
    with pytest.raises(FileExistsError, match="--resume"):
        run_probe(tiny_config(out))


def test_resume_equals_uninterrupted(tmp_path):
    full = run_probe(tiny_config(tmp_path / "full"))
    first = run_probe(tiny_config(tmp_path / "split", stop_after_epochs=1))
    assert first["epochs_done"] == 1
    resumed = run_probe(tiny_config(tmp_path / "split", resume=True))
    assert resumed["pairs"] == full["pairs"]
    _assert_same_heads(_heads_state(tmp_path / "split"), _heads_state(tmp_path / "full"), atol=0)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8
    with pytest.raises(ValueError, match="different settings.*lrs"):
        run_probe(tiny_config(tmp_path / "split", resume=True, lrs="0.1"))


def test_cached_features_equal_live_features(tmp_path):
    live = run_probe(tiny_config(tmp_path / "live", augment=False))
    cached = run_probe(tiny_config(tmp_path / "cached", augment=False, cache_features=str(tmp_path / "cache"),
                                   cache_dtype="fp32"))
    _assert_same_heads(_heads_state(tmp_path / "cached"), _heads_state(tmp_path / "live"), atol=1e-5)
    assert [p["top1"] for p in cached["pairs"]] == [p["top1"] for p in live["pairs"]]
    bf16 = run_probe(tiny_config(tmp_path / "bf16", augment=False, cache_features=str(tmp_path / "cache")))
    for a, b in zip(bf16["pairs"], live["pairs"]):
        assert abs(a["top1"] - b["top1"]) <= 6.25  # 4 of 64 images: bf16 rounding of the tokens only


def test_interrupted_extraction_resumes(tmp_path):
    cache = tmp_path / "cache"
    run_probe(tiny_config(tmp_path / "a", augment=False, cache_features=str(cache), cache_dtype="fp32", epochs=1))
    (train_dir,) = [d for d in cache.iterdir() if d.name.startswith("train-")]
    meta = json.loads((train_dir / "meta.json").read_text())
    shape = (meta["num_samples"], *meta["token_shape"])
    tokens = np.memmap(train_dir / "tokens.bin", dtype=np.float32, mode="r+", shape=shape)
    reference = np.array(tokens)
    done = np.memmap(train_dir / "done.bin", dtype=np.uint8, mode="r+", shape=(meta["num_samples"] // 32,))
    done[2:] = 0  # as if killed after two batches, the rest half-written
    tokens[64:] = 0
    done.flush(), tokens.flush()
    run_probe(tiny_config(tmp_path / "b", augment=False, cache_features=str(cache), cache_dtype="fp32", epochs=1))
    assert np.array_equal(np.array(np.memmap(train_dir / "tokens.bin", dtype=np.float32, mode="r", shape=shape)),
                          reference)


def test_compact_cache_without_selective_heads(tmp_path):
    results = run_probe(tiny_config(tmp_path / "r", heads="cls,avg", augment=False, epochs=1,
                                    cache_features=str(tmp_path / "cache")))
    (train_dir,) = [d for d in (tmp_path / "cache").iterdir() if d.name.startswith("train-")]
    assert json.loads((train_dir / "meta.json").read_text())["token_shape"] == [2, 48]  # [cls] + patch mean
    assert {p["head"] for p in results["pairs"]} == {"cls", "avg"}
    assert results["unreadable_images"] == {"train": 0, "val": 0}  # the same keys as a live run


def _noise_image_folder(root, per_class: int, corrupt: str) -> str:
    """ImageFolder train/ and val/ with classes a, b of random 36 px PNGs, plus one corrupt file."""
    from PIL import Image
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.random.randint(0, 255, (36, 36, 3), np.uint8)).save(d / f"{i}.png")
    (root / corrupt).write_bytes(b"\x89PNG truncated")
    return str(root)


def test_corrupt_image_is_counted_not_fatal(tmp_path):
    data = _noise_image_folder(tmp_path / "data", 4, "val/a/bad.png")
    results = run_probe(tiny_config(tmp_path / "r", data=data, epochs=1, heads="cls,avg", batch_size=4))
    assert results["unreadable_images"] == {"train": 0, "val": 1} and results["val_images"] == 9


@pytest.mark.parametrize("bad, match", [
    (dict(data=None), "--data is required"),
    (dict(data="/nonexistent/dir"), "no such directory"),
    (dict(heads="cls,foo"), "unknown head 'foo'"),
    (dict(lrs="0.1,x"), "comma-separated numbers"),
    (dict(cache_features="/tmp/c"), "--no-augment"),
    (dict(optimizer="adam"), "lars or sgd"),
    (dict(model_kwargs=dict(TINY, class_token=False, global_pool="avg"), heads="cls"), "needs a \\[cls\\] token"),
])
def test_bad_input_gets_clear_errors(tmp_path, bad, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_probe(tiny_config(tmp_path / "r", **bad))


def test_mismatched_checkpoint_is_refused(tmp_path):
    # one tensor of the backbone: nearly every parameter would stay at its random init
    torch.save({"model": {"pos_embed": torch.zeros(1, 17, 48)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="at their random init"):
        run_probe(tiny_config(tmp_path / "r", random_init=False, checkpoint=str(tmp_path / "bad.pth")))


def _cli_args(out):
    return ["probe", "--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY),
            "--data", "synthetic", "--synthetic-train-size", "128", "--synthetic-val-size", "64",
            "--synthetic-classes", "4", "--heads", "avg,selective", "--lrs", "0.5,2.0", "--epochs", "2",
            "--warmup-epochs", "1", "--workers", "0", "--no-progress", "--device", "cpu", "--output-dir", str(out)]


def test_two_process_torchrun_equals_one_process(tmp_path):
    one = run_cli(_cli_args(tmp_path / "one") + ["--batch-size", "32"])
    two = run_cli(_cli_args(tmp_path / "two") + ["--batch-size", "16"], nproc=2)
    assert "selective" in one and "selective" in two
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert json.loads((tmp_path / "two" / "config.json").read_text())["effective_batch"] == 32
    assert [p["top1"] for p in r2["pairs"]] == [p["top1"] for p in r1["pairs"]]
    _assert_same_heads(_heads_state(tmp_path / "two"), _heads_state(tmp_path / "one"), atol=1e-5)


def test_demo_finishes_and_selective_beats_avg(tmp_path):
    # The README's main command, as a user runs it (no TRITON_INTERPRET: reference ops on a CPU).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "selagg_fast.cli", "demo", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = json.loads((tmp_path / "probe" / "results.json").read_text())["best_per_head"]
    assert best["selective"]["top1"] > best["avg"]["top1"] + 20, best
    assert "selective beats avg" in proc.stdout
    # the token-selection table: the trained head's weights are more concentrated than [cls] attention's
    compare = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert "token selections" in proc.stdout and (tmp_path / "compare" / "kld.png").exists()
    entropy = dict(zip(compare["methods"], compare["entropy_mean"]))
    assert entropy["selective@1"] < entropy["cls_attn"] - 0.3 <= compare["max_entropy"], entropy
    assert compare["kl"][0][0] == 0 and min(compare["kl"][0][1:]) > 0.1, compare["kl"]


def test_accum_iter_steps_every_n_batches_and_sgd(tmp_path, monkeypatch):
    from selagg_fast.probe.optim import LARS
    steps = []
    step = LARS.step
    monkeypatch.setattr(LARS, "step", lambda self, closure=None: steps.append(1) or step(self, closure))
    run_probe(tiny_config(tmp_path / "acc", batch_size=16, accum_iter=2, epochs=1, heads="avg"))
    assert len(steps) == 4  # 128 images / 16 = 8 batches, one step per 2
    config = json.loads((tmp_path / "acc" / "config.json").read_text())
    assert config["effective_batch"] == 32 and config["momentum"] == 0.9  # LARS: 0.9 in both protocols
    for protocol, momentum in (("paper", 0.0), ("mae", 0.9)):
        run_probe(tiny_config(tmp_path / protocol, optimizer="sgd", epochs=1, heads="avg", protocol=protocol))
        saved = torch.load(tmp_path / protocol / "checkpoint.pt", weights_only=True)
        assert saved["config"]["momentum"] == momentum
        assert all(g["momentum"] == momentum for g in saved["optimizer"]["param_groups"])
        buffers = [s.get("momentum_buffer") for s in saved["optimizer"]["state"].values()]
        assert all(b is not None for b in buffers) if momentum else not any(b is not None for b in buffers)


def test_protocols_drop_or_keep_the_last_batch_and_are_recorded(tmp_path, monkeypatch):
    from selagg_fast.probe.optim import LARS
    steps = []
    step = LARS.step
    monkeypatch.setattr(LARS, "step", lambda self, closure=None: steps.append(1) or step(self, closure))
    small = dict(heads="avg", lrs="1.0", epochs=1, synthetic_train_size=40, batch_size=16)
    paper = run_probe(tiny_config(tmp_path / "paper", **small))
    assert len(steps) == 2  # 40 images at 16: the paper's loader drops the last 8
    mae = run_probe(tiny_config(tmp_path / "mae", protocol="mae", **small))
    assert len(steps) == 2 + 3  # MAE keeps them
    assert paper["protocol"] == "paper" and mae["protocol"] == "mae"
    assert json.loads((tmp_path / "paper" / "config.json").read_text())["protocol"] == "paper"
    with pytest.raises(ValueError, match="no step would run"):
        run_probe(tiny_config(tmp_path / "big", **dict(small, batch_size=64)))


def test_a_run_saved_before_protocols_resumes_as_it_ran(tmp_path):
    out = tmp_path / "old"
    run_probe(tiny_config(out, heads="avg", lrs="1.0", protocol="mae", stop_after_epochs=1))
    path = out / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    del saved["config"]["protocol"]  # as written before the protocol was recorded
    torch.save(saved, path)
    with pytest.raises(ValueError, match="different settings.*protocol"):
        run_probe(tiny_config(out, heads="avg", lrs="1.0", protocol="paper", resume=True))
    resumed = run_probe(tiny_config(out, heads="avg", lrs="1.0", resume=True))
    assert resumed["protocol"] == "mae" and resumed["epochs_done"] == 2
    assert json.loads((out / "config.json").read_text())["protocol"] == "mae"


def test_a_diverged_pair_is_reported_as_such_and_the_others_train_on(tmp_path, caplog):
    healthy = run_probe(tiny_config(tmp_path / "ok", heads="avg", lrs="0.5,2.0", epochs=1))
    with caplog.at_level("WARNING", logger="selagg_fast"):
        run_probe(tiny_config(tmp_path / "nan", heads="avg", lrs="0.5,1e30", epochs=1))
    assert "avg@1e+30 diverged" in caplog.text
    on_disk = _strict_json(tmp_path / "nan" / "results.json")
    rows = _strict_json(tmp_path / "nan" / "metrics.jsonl")
    assert on_disk["pairs"][1] == dict(head="avg", base_lr=1e30, top1=None, top5=None, diverged=True)
    assert rows[1]["train_loss"] is None and rows[1]["diverged"] is True
    assert on_disk["pairs"][0] == healthy["pairs"][0] and not on_disk["pairs"][0]["diverged"]  # untouched by it
    assert on_disk["best_per_head"]["avg"]["base_lr"] == 0.5
    assert "diverged" in format_results(on_disk)
    a, b = _heads_state(tmp_path / "nan"), _heads_state(tmp_path / "ok")
    for k in a:
        if k.startswith("classifiers.avg@0_5"):
            assert torch.equal(a[k], b[k]), k


def test_two_process_cache_extraction_equals_one_process(tmp_path):
    cached = ["--no-augment", "--cache-features", str(tmp_path / "cache"), "--cache-dtype", "fp32"]
    run_cli(_cli_args(tmp_path / "one") + ["--batch-size", "32"] + cached)
    # 2 processes fill disjoint batches of a fresh store (batch 16 gives a separate cache folder)
    run_cli(_cli_args(tmp_path / "two") + ["--batch-size", "16"] + cached, nproc=2)
    stores = sorted(d.name.split("-")[0] for d in (tmp_path / "cache").iterdir())
    assert stores == ["train", "train", "val", "val"]
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [p["top1"] for p in r2["pairs"]] == [p["top1"] for p in r1["pairs"]]
    _assert_same_heads(_heads_state(tmp_path / "two"), _heads_state(tmp_path / "one"), atol=1e-5)


def test_two_process_run_survives_an_all_unreadable_batch(tmp_path):
    # batch 1 per process and one corrupt image: some process meets an empty batch; all must skip it
    data = _noise_image_folder(tmp_path / "data", 3, "train/a/bad.png")
    args = _cli_args(tmp_path / "out")
    args[args.index("synthetic")] = data
    run_cli(args + ["--batch-size", "1", "--epochs", "1", "--augment"], nproc=2, timeout=180)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["epochs_done"] == 1
    assert results["unreadable_images"] == {"train": 1, "val": 0}  # counted once over both processes


def test_feature_cache_refuses_a_disk_too_small(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 0, 10**4))
    with pytest.raises(OSError, match="needs .* GiB, only"):
        run_probe(tiny_config(tmp_path / "r", augment=False, epochs=1, cache_features=str(tmp_path / "cache")))


def test_compiled_backbone_trains_like_the_eager_one(tmp_path):
    eager = run_probe(tiny_config(tmp_path / "eager", epochs=1))
    compiled = run_probe(tiny_config(tmp_path / "compiled", epochs=1, compile_backbone=True))
    for a, b in zip(eager["pairs"], compiled["pairs"]):
        assert abs(a["top1"] - b["top1"]) <= 1.6  # at most one of 64 images flips on float rounding
    for (name, a), b in zip(_heads_state(tmp_path / "eager").items(), _heads_state(tmp_path / "compiled").values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name
