"""selagg_fast.knn_eval against a brute-force float64 weighted vote, and `probe --knn` end to end."""
import json

import numpy as np
import pytest
import torch
from conftest import DEVICE, run_cli

from selagg_fast import knn_eval


def brute_force_vote(train, train_labels, test, test_labels, k, t, num_classes):
    """DINO's vote written out in float64, one test image at a time (full sort, no chunks)."""
    train = torch.nn.functional.normalize(train.double().cpu(), dim=1).numpy()
    test = torch.nn.functional.normalize(test.double().cpu(), dim=1).numpy()
    train_labels, test_labels = train_labels.cpu().numpy(), test_labels.cpu().numpy()
    top1 = top5 = 0
    for q, y in zip(test, test_labels):
        sim = train @ q
        nearest = np.argsort(-sim)[:k]
        votes = np.zeros(num_classes)
        for i in nearest:
            votes[train_labels[i]] += np.exp(sim[i] / t)
        ranked = [c for c in np.argsort(-votes)[:min(5, k)] if votes[c] > 0]
        top1 += ranked[0] == y
        top5 += y in ranked
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


def _data(n_train=300, n_test=70, dim=24, classes=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    train_labels = torch.randint(classes, (n_train,), generator=g)
    test_labels = torch.randint(classes, (n_test,), generator=g)
    # clustered features, so accuracies are far from both chance and 100 %
    train = centres[train_labels] * 0.6 + torch.randn(n_train, dim, generator=g)
    test = centres[test_labels] * 0.6 + torch.randn(n_test, dim, generator=g)
    return (train.to(DEVICE, dtype), train_labels.to(DEVICE), test.to(DEVICE, dtype), test_labels.to(DEVICE))


@pytest.mark.parametrize("dtype,rows", [(torch.float32, None), (torch.float32, (16, 37)), (torch.bfloat16, (9, 50))])
def test_every_k_and_temperature_equals_a_float64_vote(dtype, rows):
    train, ytr, test, yte = _data(dtype=dtype)
    ks, temperatures = (1, 3, 5, 20, 64), (0.05, 0.1, 0.5)
    chunks = dict(test_rows=rows[0], train_rows=rows[1]) if rows else {}
    got = knn_eval(train, ytr, test, yte, ks=ks, temperatures=temperatures, num_classes=7, **chunks)
    assert set(got) == {(k, t) for k in ks for t in temperatures}
    accuracies = set()
    for (k, t), (top1, top5) in got.items():
        want = brute_force_vote(train, ytr, test, yte, k, t, 7)  # the bf16 values, voted in float64
        assert (top1, top5) == pytest.approx(want, abs=1e-9), (k, t)
        accuracies.add(top1)
    assert len(accuracies) > 3 and 20 < max(accuracies) < 100  # the settings differ, the data is not trivial


def test_top5_counts_only_classes_that_got_votes_and_k_below_five():
    # one training image per class far apart; k = 1: top-5 is top-1 (DINO's min(5, k))
    train = torch.eye(6, device=DEVICE)
    ytr = torch.arange(6, device=DEVICE)
    test = torch.eye(6, device=DEVICE)[[0, 1, 2]] + 0.01
    yte = torch.tensor([0, 1, 5], device=DEVICE)
    got = knn_eval(train, ytr, test, yte, ks=[1, 2], temperatures=[0.1], num_classes=6)
    assert got[(1, 0.1)] == pytest.approx((200 / 3, 200 / 3))
    assert got[(2, 0.1)][0] == pytest.approx(200 / 3)


def test_memory_budget_splits_both_sides():
    from selagg_fast.knn import chunk_sizes
    test_rows, train_rows = chunk_sizes(50_000, 1_281_167, 768, 200, 1 << 30)
    assert train_rows < 1_281_167 and test_rows < 50_000
    # one block's similarities and the train chunk's fp32 copy stay within the budget
    assert 8 * test_rows * train_rows + 4 * 768 * train_rows <= 1 << 30
    train, ytr, test, yte = _data()
    small = knn_eval(train, ytr, test, yte, ks=[5, 50], temperatures=[0.07], num_classes=7, memory_bytes=20_000)
    assert small == knn_eval(train, ytr, test, yte, ks=[5, 50], temperatures=[0.07], num_classes=7)


@pytest.mark.parametrize("change,error,match", [
    (dict(ks=[301]), ValueError, "k 301: more than the 300 training"),
    (dict(ks=[0]), ValueError, "ks"),
    (dict(temperatures=[0.0]), ValueError, "temperatures"),
    (dict(num_classes=5), ValueError, "outside 0..4"),
    (dict(test_labels=torch.zeros(3, dtype=torch.long)), ValueError, "3 labels for 70"),
    (dict(train_labels=torch.zeros(300)), TypeError, "integer"),
    (dict(test_features=torch.zeros(70, 5)), ValueError, "widths differ"),
    (dict(test_rows=-4), ValueError, "test_rows -4: expected a positive integer"),
    (dict(train_rows=0), ValueError, "train_rows 0: expected a positive integer"),
    (dict(memory_bytes=float("nan")), ValueError, "memory_bytes nan"),
])
def test_bad_input_is_refused(change, error, match):
    train, ytr, test, yte = _data()
    kw = dict(train_features=train, train_labels=ytr, test_features=test, test_labels=yte, ks=[5],
              temperatures=[0.1], num_classes=7)
    kw.update(change)
    with pytest.raises(error, match=match):
        knn_eval(**kw)


TINY = '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}'


def _probe_args(out, *extra):
    return ["probe", "--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs", TINY, "--data", "synthetic",
            "--synthetic-train-size", "96", "--synthetic-val-size", "40", "--synthetic-classes", "4", "--heads", "cls",
            "--lrs", "0.5", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--device",
            DEVICE, "--knn", "--knn-k", "3,10,40", "--knn-temperatures", "0.07,0.5", "--output-dir", str(out), *extra]


def _knn_of(out):
    return json.loads((out / "results.json").read_text())["knn"]


def _pairs(knn):
    return {name: [(p["k"], p["T"], round(p["top1"], 6), round(p["top5"], 6)) for p in v["pairs"]]
            for name, v in knn["variants"].items()}


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """One process, augmented training epochs: k-NN runs its own validation-transform pass."""
    out = tmp_path_factory.mktemp("knn") / "live"
    return out, run_cli(_probe_args(out, "--batch-size", "32"))


def test_probe_knn_from_cache_equals_the_live_pass_and_votes_on_cls(tmp_path, live_run):
    out = run_cli(_probe_args(tmp_path / "cached", "--batch-size", "32", "--no-augment", "--cache-features",
                              str(tmp_path / "cache"), "--cache-dtype", "fp32"))
    live, cached = _knn_of(live_run[0]), _knn_of(tmp_path / "cached")
    assert "k-NN cls raw" in live_run[1] and "k-NN cls final_norm" in out
    assert live["representation"] == "cls" and live["source"] == "validation-transform pass"
    assert cached["source"] == "feature cache" and (live["train_images"], live["val_images"]) == (96, 40)
    assert set(live["variants"]) == {"raw", "final_norm"} and len(live["variants"]["raw"]["pairs"]) == 6
    for name in live["variants"]:  # the same features either way, so the same votes
        for a, b in zip(_pairs(live)[name], _pairs(cached)[name]):
            assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], abs=1e-6)
    best = max((p for v in live["variants"].values() for p in v["pairs"]), key=lambda p: p["top1"])
    assert live["best"]["top1"] == best["top1"]
    # independently: [cls] of the cached tokens through knn_eval gives the 'raw' numbers
    stores = {p.name.split("-")[0]: p for p in (tmp_path / "cache").iterdir()}
    feats = {}
    for split, path in stores.items():
        meta = json.loads((path / "meta.json").read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=np.float32, mode="r",
                           shape=(meta["num_samples"], *meta["token_shape"]))
        feats[split] = (torch.from_numpy(np.array(tokens[:, 0])), torch.from_numpy(np.load(path / "labels.npy")))
    want = knn_eval(*feats["train"], *feats["val"], ks=[3, 10, 40], temperatures=[0.07, 0.5], num_classes=4)
    for k, t, top1, top5 in _pairs(cached)["raw"]:
        assert (top1, top5) == pytest.approx(want[(k, t)], abs=1e-6)
    # 'final_norm': the ViT's final LayerNorm (at init: weight 1, bias 0, timm's eps 1e-6) on [cls]
    normed = {s: (torch.nn.functional.layer_norm(f, f.shape[1:], eps=1e-6), y) for s, (f, y) in feats.items()}
    want = knn_eval(*normed["train"], *normed["val"], ks=[3, 10, 40], temperatures=[0.07, 0.5], num_classes=4)
    for k, t, top1, top5 in _pairs(cached)["final_norm"]:
        assert (top1, top5) == pytest.approx(want[(k, t)], abs=1e-6)
    config = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert config["command"].startswith("selagg-fast probe --model") and "--knn" in config["command"]


def test_probe_knn_two_processes_equal_one(tmp_path, live_run):
    run_cli(_probe_args(tmp_path / "two", "--batch-size", "16"), nproc=2)
    one, two = _knn_of(live_run[0]), _knn_of(tmp_path / "two")
    assert two["train_images"] == 96 and two["val_images"] == 40
    for name in one["variants"]:
        for a, b in zip(_pairs(one)[name], _pairs(two)[name]):
            assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], abs=1e-6)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["command"].startswith("torchrun --nproc_per_node=2 -m selagg_fast.cli probe")


def test_probe_knn_refuses_bad_k_lists(tmp_path, capsys, monkeypatch):
    from selagg_fast.backbone import BackboneSettings
    from selagg_fast.cli import main

    def no_build(self):
        raise AssertionError("the backbone was built before k was checked")

    with monkeypatch.context() as m:  # k is checked against the data before the backbone is built
        m.setattr(BackboneSettings, "create_backbone", no_build)
        assert main(_probe_args(tmp_path / "bad", "--batch-size", "32", "--knn-k", "5,97")) == 2
    assert "k 97 is more than the 96 training images" in capsys.readouterr().err
    assert main(_probe_args(tmp_path / "bad", "--knn-k", "5,x")) == 2
    assert "--knn-k '5,x'" in capsys.readouterr().err


def test_resume_with_no_knn_keeps_the_saved_result(tmp_path):
    # a run resumed with --no-knn computes none; the k-NN saved by its first epoch stays to the end
    from selagg_fast.cli import main
    run = tmp_path / "run"
    args = _probe_args(run, "--batch-size", "32", "--epochs", "2", "--stop-after-epochs", "1")
    assert main(args) == 0
    saved = _knn_of(run)
    assert main(["probe", "--resume", "--output-dir", str(run), "--no-knn", "--device", DEVICE, "--workers", "0",
                 "--no-progress"]) == 0
    assert json.loads((run / "results.json").read_text())["epochs_done"] == 2 and _knn_of(run) == saved
