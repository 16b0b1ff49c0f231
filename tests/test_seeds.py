"""--seeds: every (head, lr) pair once per seed in one run; a cache run equals one run per seed."""
import json
import os
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from selagg_fast.probe.outputs import format_results
from selagg_fast.probe.trainer import ProbeConfig, run_probe

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
SEEDS = [0, 1, 2]


def _write_images(root, classes=4, train=12, val=4):
    """An ImageFolder whose classes differ in colour (so the heads learn something) plus noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.array([60 * c, 255 - 60 * c, 128])
                pixels = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)


_BACKBONE = {}


def _backbone_file() -> str:
    """A saved tiny ViT: a backbone that is the same whatever the run's seed (a --random-init one
    is drawn from the seed, so runs of other seeds would probe other backbones)."""
    if "path" not in _BACKBONE:
        import tempfile
        import timm
        torch.manual_seed(1234)
        path = os.path.join(tempfile.mkdtemp(prefix="selagg_seeds_"), "tiny_vit.pth")
        torch.save(timm.create_model("vit_tiny_patch16_224", **TINY).state_dict(), path)
        _BACKBONE["path"] = path
    return _BACKBONE["path"]


def _config(data, out, cache=None, **overrides) -> ProbeConfig:
    # an imagefolder, not --data synthetic: generated images follow the run's (first) seed, so
    # runs of different seeds would read different images and caches
    cfg = dict(model="vit_tiny_patch16_224", checkpoint=_backbone_file(), model_kwargs=TINY, data=data,
               heads="avg,selective",
               lrs="0.5,2.0", optimizer="sgd", epochs=2, warmup_epochs=1, batch_size=16, workers=0,
               output_dir=str(out), progress=False, device="cpu", augment=False, cache_features=cache,
               cache_dtype="fp32")
    cfg.update(overrides)
    return ProbeConfig(**cfg)


def _checkpoint(out):
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    """(data folder, cache folder, run folder, results) of a 3-seed run from a feature cache."""
    root = tmp_path_factory.mktemp("seeds")
    data, cache = _write_images(root / "data"), str(root / "cache")
    results = run_probe(_config(data, root / "multi", cache, seeds=SEEDS))
    return data, cache, root / "multi", results


def test_cache_run_equals_one_run_per_seed(seeded_run, tmp_path):
    data, cache, multi, results = seeded_run
    multi_state = _checkpoint(multi)
    assert [s["seed"] for s in multi_state["seed_heads"]] == SEEDS
    for k, seed in enumerate(SEEDS):
        single = run_probe(_config(data, tmp_path / f"seed{seed}", cache, seed=seed))
        assert "seeds" not in single and "seed_heads" not in _checkpoint(tmp_path / f"seed{seed}")
        for pair, one in zip(results["pairs"], single["pairs"]):
            assert (pair["head"], pair["base_lr"]) == (one["head"], one["base_lr"])
            run = pair["seeds"][k]
            assert run["seed"] == seed and (run["top1"], run["top5"]) == (one["top1"], one["top5"])
        _assert_equal_states(multi_state["seed_heads"][k]["heads"], _checkpoint(tmp_path / f"seed{seed}")["heads"])
    # the seeds differ: in the heads' initialisation and in the order each read the cache
    first, second = (s["heads"] for s in multi_state["seed_heads"][:2])
    assert any(not torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())
    _assert_equal_states(multi_state["heads"], multi_state["seed_heads"][0]["heads"])  # what maps read


def test_results_report_each_seed_mean_std_and_best_by_mean(seeded_run):
    _, _, multi, results = seeded_run
    assert json.loads((multi / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["seeds"] == SEEDS and len(results["pairs"]) == 4
    for pair in results["pairs"]:
        assert [r["seed"] for r in pair["seeds"]] == SEEDS and not pair["diverged"]
        for key in ("top1", "top5"):
            values = [r[key] for r in pair["seeds"]]
            assert pair[key] == pytest.approx(statistics.mean(values), abs=1e-9)
            assert pair[f"{key}_std"] == pytest.approx(statistics.stdev(values), abs=1e-9)
    for head, best in results["best_per_head"].items():
        assert best["top1"] == max(p["top1"] for p in results["pairs"] if p["head"] == head)
    config = json.loads((multi / "config.json").read_text())
    assert config["seeds"] == SEEDS and config["seed"] == SEEDS[0]
    lines = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 4 * 3 and sorted({m["seed"] for m in lines}) == SEEDS
    table = format_results(results)
    assert "±" in table and "seeds 0, 1, 2" in table


def test_one_seed_std_is_zero_and_best_follows_the_mean():
    from selagg_fast.probe.outputs import summarize_seeds
    metrics = {0: dict(top1=50.0, top5=90.0), 1: dict(top1=70.0, top5=95.0)}
    worse = {0: dict(top1=65.0, top5=90.0), 1: dict(top1=55.0, top5=90.0)}  # best single seed, worse mean
    out = summarize_seeds([0, 1], [("avg", 0.1, metrics), ("avg", 0.3, worse)], diverged={1: {"avg@0.3"}})
    assert out["best_per_head"]["avg"]["base_lr"] == 0.1 and out["pairs"][1]["top1"] is None
    assert out["pairs"][1]["diverged"] and out["pairs"][1]["seeds"][0]["top1"] == 65.0
    one = summarize_seeds([3], [("avg", 0.1, {3: dict(top1=40.0, top5=80.0)})], diverged={})
    assert one["pairs"][0]["top1_std"] == 0.0 and one["pairs"][0]["top1"] == 40.0


def test_resume_with_seeds_equals_uninterrupted(seeded_run, tmp_path):
    data, cache, multi, results = seeded_run
    split = tmp_path / "split"
    first = run_probe(_config(data, split, cache, seeds=SEEDS, stop_after_epochs=1))
    assert first["epochs_done"] == 1
    resumed = run_probe(_config(data, split, cache, seeds=SEEDS, resume=True))
    assert resumed["pairs"] == results["pairs"]
    for a, b in zip(_checkpoint(split)["seed_heads"], _checkpoint(multi)["seed_heads"]):
        _assert_equal_states(a["heads"], b["heads"])
    with pytest.raises(ValueError, match="different settings: --seeds 0,1,2 then, 0,1 now$"):
        run_probe(_config(data, split, cache, seeds=[0, 1], resume=True))


def test_live_run_shares_batches_and_differs_in_head_init(tmp_path):
    common = dict(synthetic_train_size=48, synthetic_val_size=16, synthetic_classes=3,
                  augment=True, heads="avg,selective", lrs="1.0", epochs=1, warmup_epochs=0)
    results = run_probe(_config("synthetic", tmp_path / "live", **dict(common, seeds=[0, 5])))
    assert results["seeds"] == [0, 5] and all(len(p["seeds"]) == 2 for p in results["pairs"])
    # the first seed's batches and augmentation: its heads are those of a --seed 0 run
    single = run_probe(_config("synthetic", tmp_path / "one", **dict(common, seed=0)))
    states = _checkpoint(tmp_path / "live")["seed_heads"]
    _assert_equal_states(states[0]["heads"], _checkpoint(tmp_path / "one")["heads"])
    assert [p["seeds"][0]["top1"] for p in results["pairs"]] == [p["top1"] for p in single["pairs"]]
    assert any(not torch.equal(states[0]["heads"][k], states[1]["heads"][k]) for k in states[0]["heads"]
               if states[0]["heads"][k].is_floating_point())


def test_seed_flags_are_checked(tmp_path, capsys):
    from selagg_fast.cli import main
    base = ["probe", "--model", "vit_tiny_patch16_224", "--random-init", "--data", "synthetic",
            "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    for extra in (["--seeds", "0,0"], ["--seeds", "a"], ["--seed", "1", "--seeds", "0,1"]):
        assert main(base + extra) == 2
        assert "--seeds" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="--seed 1 with --seeds"):
        run_probe(_config("synthetic", tmp_path / "api", seed=1, seeds=[0, 1]))


def test_report_uses_the_mean_over_seeds(seeded_run, tmp_path):
    import csv

    from selagg_fast.probe.report import write_report
    _, _, multi, results = seeded_run
    md, csv_path = write_report([str(multi)], str(tmp_path / "report.md"))
    with open(csv_path, newline="") as f:
        (row,) = list(csv.DictReader(f))
    best = results["best_per_head"]["selective"]
    assert float(row["selective_top1"]) == pytest.approx(best["top1"]) and row["seeds"] == "0,1,2"
    assert float(row["selective_top1_std"]) == pytest.approx(best["top1_std"])
    text = open(md).read()
    assert f"{best['top1']:.1f} ± {best['top1_std']:.1f}" in text and "mean of seeds 0,1,2" in text


def test_two_process_seeds_from_a_cache_equal_one_process(seeded_run, tmp_path):
    # under torchrun each seed's cache order is sharded over the processes: 2 x batch 8 = 1 x batch 16
    from conftest import run_cli
    data, cache, multi, results = seeded_run
    run_cli(["probe", "--model", "vit_tiny_patch16_224", "--checkpoint", _backbone_file(), "--model-kwargs", json.dumps(TINY),
             "--data", data, "--heads", "avg,selective", "--lrs", "0.5,2.0", "--optimizer", "sgd", "--epochs", "2",
             "--warmup-epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--device", "cpu",
             "--no-augment", "--cache-features", cache, "--cache-dtype", "fp32", "--seeds", "0,1,2",
             "--output-dir", str(tmp_path / "two")], nproc=2)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert json.loads((tmp_path / "two" / "config.json").read_text())["effective_batch"] == 16
    assert two["seeds"] == SEEDS
    for a, b in zip(two["pairs"], results["pairs"]):
        assert [(r["seed"], r["top1"], r["top5"]) for r in a["seeds"]] == \
            [(r["seed"], r["top1"], r["top5"]) for r in b["seeds"]]
    for a, b in zip(_checkpoint(tmp_path / "two")["seed_heads"], _checkpoint(multi)["seed_heads"]):
        assert a["seed"] == b["seed"] and a["heads"].keys() == b["heads"].keys()
        for k in a["heads"]:
            torch.testing.assert_close(a["heads"][k], b["heads"][k], atol=1e-5, rtol=1e-4, msg=k)


def test_a_random_init_backbone_of_another_seed_extracts_its_own_cache(tmp_path):
    # --random-init builds the seed's backbone: another seed's tokens are never reused for it
    data, cache = _write_images(tmp_path / "data", classes=2, train=4, val=2), str(tmp_path / "cache")
    for seed in (0, 1):
        run_probe(_config(data, tmp_path / f"s{seed}", cache, seed=seed, epochs=1, warmup_epochs=0, heads="avg",
                          checkpoint=None, random_init=True,
                          batch_size=4, lrs="1.0"))
    stores = sorted(d.name.split("-")[0] for d in (tmp_path / "cache").iterdir())
    assert stores == ["train", "train", "val", "val"]
