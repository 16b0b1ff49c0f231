"""The trainer's three parts, each built alone: the data plan without a backbone, the token source
and its feature cache without heads, the probe model's checkpoint round trip without data."""
import contextlib
import logging

import pytest
import torch

from selagg_fast.distributed import DistInfo
from selagg_fast.probe.data_plan import DataPlan
from selagg_fast.probe.heads import parse_heads, probe_loss
from selagg_fast.probe.probe_model import ProbeModel
from selagg_fast.probe.tokens import TokenSource
from selagg_fast.probe.trainer import ProbeConfig, _resolved

CPU = DistInfo(device=torch.device("cpu"))
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def _config(**overrides) -> ProbeConfig:
    cfg = dict(model="vit_tiny_patch16_224", random_init=True, model_kwargs=TINY, data="synthetic",
               synthetic_train_size=10, synthetic_val_size=6, synthetic_classes=3, batch_size=4, workers=0,
               augment=False, progress=False, device="cpu", precision="fp32")
    cfg.update(overrides)
    return _resolved(ProbeConfig(**cfg), None)


def _pixel_means(images):
    """A stand-in for the backbone: one token per image, its mean per channel."""
    return images.mean((2, 3))[:, None]


def test_data_plan_shards_and_counts_synthetic_data_without_a_backbone():
    plan = DataPlan(_config(), CPU, drop_last=True, img_size=16, tokens=_pixel_means)
    assert plan.num_classes == 3 and len(plan.train_set) == 10 and len(plan.val_set) == 6
    assert plan.num_batches("train") == 2 and plan.num_batches("val") == 2  # 10 // 4 kept; 6 in 4 + 2
    for epoch in (0, 1):
        batches = plan.my_batches("train", epoch, range(10))
        flat = [i for b in batches for i in b]
        assert [len(b) for b in batches] == [4, 4] and len(set(flat)) == 8
        seen = list(plan.batches("train", epoch))
        assert len(seen) == 2
        for (tokens, labels, skipped), indices in zip(seen, batches):
            assert skipped == [] and tokens.shape == (4, 1, 3)
            assert labels.tolist() == [plan.train_set[i][1] for i in indices]
            expected = torch.stack([plan.train_set[i][0] for i in indices])
            torch.testing.assert_close(tokens, _pixel_means(expected))
    assert plan.my_batches("train", 0, range(10)) != plan.my_batches("train", 1, range(10))  # reshuffled
    assert [i for b in plan.my_batches("val", 0, range(6)) for i in b] == list(range(6))  # every image, in order
    # two processes: disjoint training shares of the padded order, validation every other image
    shares = [DataPlan(_config(), DistInfo(rank=r, world_size=2), drop_last=True, img_size=16)
              .my_batches("train", 0, range(10)) for r in (0, 1)]
    mine = [{i for b in share for i in b} for share in shares]
    assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == 8
    assert [len(s) for s in shares] == [1, 1]  # 5 images each: one batch of 4 kept


def test_data_plan_drops_a_last_batch_of_one_and_refuses_no_step(caplog):
    plan = DataPlan(_config(synthetic_train_size=9), CPU, drop_last=False, img_size=16)
    with caplog.at_level(logging.WARNING, logger="selagg_fast"):
        batches = plan.my_batches("train", 0, range(9))
    assert [len(b) for b in batches] == [4, 4] and plan.num_batches("train") == 2
    assert "BatchNorm needs 2" in caplog.text
    with pytest.raises(ValueError, match="--batch-size 16: more than the 10 training images"):
        DataPlan(_config(batch_size=16), CPU, drop_last=True, img_size=16)


def test_token_source_fills_a_cache_that_reads_back_its_live_tokens(tmp_path):
    cfg = _config(heads="avg", cache_features=str(tmp_path / "cache"), cache_dtype="fp32")
    source = TokenSource(cfg, torch.device("cpu"))
    assert source.compact and source.head_prefix == 1 and source.token_dtype == torch.float32
    images = torch.randn(3, 3, 32, 32)
    full = source.backbone(images)
    compact = source.tokens(images)  # [cls] and the patch mean: all an avg head reads
    assert compact.shape == (3, 2, 48)
    torch.testing.assert_close(compact, torch.stack([full[:, 0], full[:, 1:].mean(1)], 1))
    plan = DataPlan(cfg, CPU, drop_last=True, img_size=source.info.img_size, tokens=source.tokens)
    stores = source.open_stores(plan.datasets, plan.loader, CPU)
    assert set(stores) == {"train", "val"} and stores["val"].complete()
    live = list(plan.live_batches("val", 0))
    plan.use_stores(stores)
    cached = list(plan.batches("val", 0))
    assert plan.unreadable == {"train": 0, "val": 0} and len(cached) == len(live) == 2
    for (c, cl, _), (l, ll, _) in zip(cached, live):
        assert torch.equal(cl, ll) and torch.equal(c, l)


def _model(seeds, **kw):
    return ProbeModel(parse_heads("avg,selective"), [0.1, 0.2], seeds, 16, 3, 1, classifier_init="paper",
                      optimizer="lars", effective_batch=8, momentum=0.9, weight_decay=0.0,
                      device=torch.device("cpu"), **kw)


def test_probe_model_checkpoint_round_trip(tmp_path):
    trained = _model([0, 1])
    tokens, labels = torch.randn(8, 5, 16), torch.randint(0, 3, (8,))
    for member in trained.seed_heads:  # one step: optimizer state (momentum) to save
        loss, _ = probe_loss(member.model(tokens), labels)
        loss.backward()
        member.optimizer.step()
    one = trained.state(with_seeds=False)
    assert set(one) == {"heads", "optimizer"}
    state = trained.state(with_seeds=True)
    assert set(state) == {"heads", "optimizer", "seed_heads"} and [s["seed"] for s in state["seed_heads"]] == [0, 1]
    torch.save(state, tmp_path / "ckpt.pt")
    fresh = _model([0, 1])
    assert torch.equal(fresh.first.heads.state_dict()["classifiers.avg@0_1.fc.weight"],
                       _model([0]).first.heads.state_dict()["classifiers.avg@0_1.fc.weight"])  # seeded alone
    fresh.load(torch.load(tmp_path / "ckpt.pt", weights_only=True), "out")
    for a, b in zip(trained.seed_heads, fresh.seed_heads):
        assert all(torch.equal(v, b.heads.state_dict()[k]) for k, v in a.heads.state_dict().items())
        assert a.optimizer.state_dict()["state"].keys() == b.optimizer.state_dict()["state"].keys()
        a.heads.eval(), b.heads.eval()
        assert all(torch.equal(v, b.heads(tokens)[k]) for k, v in a.heads(tokens).items())
    with pytest.raises(ValueError, match=r"holds seeds \[0, 1\], this run trains \[0\]"):
        _model([0]).load(state, "out")
    single = _model([0])
    single.load(one, "out")  # a one-seed checkpoint: heads and optimizer keys only
    assert torch.equal(single.first.heads.state_dict()["classifiers.avg@0_1.fc.weight"],
                       trained.first.heads.state_dict()["classifiers.avg@0_1.fc.weight"])


class _DictHead(torch.nn.Module):
    """One (head, lr) pair: a linear classifier on the first token, logits under its pair name."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, tokens):
        return {"p": self.fc(tokens[:, 0])}


@pytest.mark.parametrize("skipped", [1, 3], ids=["window-end", "epoch-end"])
def test_a_skipped_batch_ends_its_accumulation_window(skipped):
    # --accum-iter 2 over 4 batches, batch `skipped` unreadable everywhere: each window steps once
    # on the gradients of the batches it read (a window never doubles, none carries on)
    from types import SimpleNamespace
    from selagg_fast.probe.optim import cosine_lr
    from selagg_fast.probe.trainer import _train_epoch
    torch.manual_seed(0)
    data = [(torch.randn(5, 1, 4, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(4)]
    batches = [(None, None, [it]) if it == skipped else (*data[it], []) for it in range(4)]
    head = _DictHead().double()
    w0 = {k: v.clone() for k, v in head.state_dict().items()}
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    optimizer.param_groups[0]["peak_lr"] = 0.5
    member = SimpleNamespace(seed=0, model=head, optimizer=optimizer)
    cfg = SimpleNamespace(accum_iter=2, epochs=2, warmup_epochs=0, progress=False, cache_features=None, data="x")
    run = SimpleNamespace(cfg=cfg, seed_heads=[member], num_batches=lambda split: 4,
                          heads=SimpleNamespace(pair_names=lambda: ["p"]),
                          dist=SimpleNamespace(active=False, is_main=True, world_size=1), device=torch.device("cpu"),
                          batches=lambda split, epoch, seed: iter(batches), autocast=contextlib.nullcontext,
                          note_unreadable=lambda split, idx: None, unreadable={"train": 0})
    _train_epoch(run, 0)
    # the reference: plain SGD steps in float64, one per window, each window's mean loss gradient
    ref = _DictHead().double()
    ref.load_state_dict(w0)
    for window in ((0, 1), (2, 3)):
        ref.zero_grad()
        for it in window:
            if it != skipped:
                x, y = data[it]
                (torch.nn.functional.cross_entropy(ref(x)["p"], y) / 2).backward()
        lr = cosine_lr(0.5, window[0] / 4, 2, 0)
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(head.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)  # the loss is float32
    assert all(p.grad is None for p in head.parameters())  # nothing left for the next epoch


def _step_worker(rank, init_file, out_file):
    from types import SimpleNamespace
    from selagg_fast.probe.trainer import _step
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    head = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2).double())
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    with head.no_sync():  # the window's earlier batch; its last one was skipped by every process
        head(torch.full((1, 3), float(rank + 1), dtype=torch.float64)).sum().backward()
    _step(SimpleNamespace(model=head, optimizer=optimizer), synced=False,
          dist=SimpleNamespace(active=True, world_size=2))
    torch.save({k: v.clone() for k, v in head.module.state_dict().items()}, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


def test_a_skipped_last_batch_still_averages_the_window_over_processes(tmp_path):
    # under no_sync DDP never all-reduced the window: the step averages the gradients itself
    torch.multiprocessing.spawn(_step_worker, args=(str(tmp_path / "init"), str(tmp_path / "w")), nprocs=2)
    torch.manual_seed(0)
    ref = torch.nn.Linear(3, 2).double()
    expected = {"weight": ref.weight - 1.5, "bias": ref.bias - 1.0}  # mean over ranks of x = 1, 2
    for rank in (0, 1):
        got = torch.load(tmp_path / f"w.{rank}", weights_only=True)
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v.detach(), msg=k)


def test_resume_refuses_another_process_count():
    # the global batch, each pair's peak lr and the batches follow the process count
    import dataclasses
    from types import SimpleNamespace
    from selagg_fast.probe.trainer import _resume
    cfg = _config(output_dir="/tmp/run", accum_iter=2)
    saved = dict(config=dataclasses.asdict(cfg), world_size=2, epoch=1)
    run = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(world_size=1))
    with pytest.raises(ValueError, match=r"ran on 2 process\(es\) \(global batch 16\), this run has 1 "
                                         r"\(global batch 8\); resume it with 2"):
        _resume(run, saved)


def test_a_store_batch_writes_exactly_its_own_bytes(tmp_path):
    # positional writes of the batch's rows, sums and flags only: another process's (or machine's)
    # neighbouring batches, here sentinel bytes, are never rewritten
    import numpy as np
    from selagg_fast.probe.cache import TokenStore, row_sum
    store = TokenStore(str(tmp_path / "s"), {"k": 1}, num_samples=7, token_shape=(2, 3), dtype="fp32",
                       batch_size=3, labels=np.zeros(7))
    files = {n: tmp_path / "s" / n for n in ("tokens.bin", "sums.bin", "valid.bin", "done.bin")}
    for path in files.values():
        path.write_bytes(b"\xab" * path.stat().st_size)
    rows = torch.randn(2, 2, 3)
    store.write_batch(1, torch.tensor([5, 3]), rows, skipped_indices=[4])  # batch 1: samples 3..5
    tokens = np.fromfile(files["tokens.bin"], dtype=np.uint8).reshape(7, 24)
    assert (tokens[[0, 1, 2, 6]] == 0xAB).all() and (tokens[4] == 0xAB).all()  # unread row 4 left alone
    np.testing.assert_array_equal(tokens[[3, 5]].view(np.float32).reshape(2, 2, 3), rows[[1, 0]].numpy())
    assert list(np.fromfile(files["valid.bin"], dtype=np.uint8)) == [0xAB] * 3 + [1, 2, 1] + [0xAB]
    assert list(np.fromfile(files["done.bin"], dtype=np.uint8)) == [0xAB, 1, 0xAB]
    sums = np.fromfile(files["sums.bin"], dtype=np.uint32)
    assert list(sums[[3, 5]]) == [row_sum(rows[1].numpy()), row_sum(rows[0].numpy())]
    assert (np.fromfile(files["sums.bin"], dtype=np.uint8).reshape(7, 4)[[0, 1, 2, 4, 6]] == 0xAB).all()
