"""Probe heads, LARS, the lr schedule, backbone loading and data handling against their definitions."""
import math

import numpy as np
import pytest
import timm
import torch
from conftest import DEVICE, rel_err
from PIL import Image

from selagg_fast.backbone import CheckpointError, create_backbone, read_checkpoint
from selagg_fast.data import SyntheticObjects, collate_skipping, epoch_shard, split_batches
from selagg_fast.datasets import probe_datasets
from selagg_fast.probe.heads import GlobalBatchNorm1d, LinearProbe, ProbeHeads, parse_heads
from selagg_fast.probe.optim import LARS, build_optimizer, cosine_lr
from selagg_fast.probe.trainer import ProbeConfig, _resolved
from selagg_fast.reference import abmilp_pool_reference
from test_efficient import PeerEfficientProbing

D, C = 48, 5


def _bn_linear(probe, features):
    """Training-mode BatchNorm1d(affine=False, eps=1e-6) then Linear, in float64."""
    f = features.double()
    f = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-6)
    return f @ probe.fc.weight.double().T + probe.fc.bias.double()


@pytest.mark.parametrize("P", [1, 0, 5], ids=["cls", "no_cls", "registers"])
def test_heads_match_reference_semantics(P):
    heads_text = "avg,selective,selective_all,selective_k3,ep4,ep2_all" + (",cls" if P else "")
    specs = parse_heads(heads_text, has_cls=P > 0)
    heads = ProbeHeads(specs, [0.1, 0.3], D, C, P).to(DEVICE).train()
    tokens = torch.randn(16, 17 + P, D, device=DEVICE)
    logits = heads(tokens)
    assert len(logits) == len(specs) * 2
    for spec, lr in heads.pairs:
        key = heads._key(spec, lr)
        t = tokens.double()
        if spec.kind == "cls":
            feat = t[:, 0]
        elif spec.kind == "avg":
            feat = t[:, P:].mean(1)
        elif spec.efficient:
            agg = heads.aggregators[key]
            prefix = 0 if spec.pools_prefix else P
            assert agg.num_prefix_tokens == prefix and agg.out_features == D
            peer = PeerEfficientProbing(D, spec.num_queries).double()
            peer.load_state_dict(agg.state_dict())
            feat = peer(t[:, prefix:])
        else:
            agg = heads.aggregators[key]
            prefix = 0 if spec.kind == "selective_all" else P
            assert agg.num_prefix_tokens == prefix
            feat = abmilp_pool_reference(t, agg.weight.double(), agg.bias.double(), num_prefix_tokens=prefix,
                                         compute_dtype=torch.float64).reshape(len(t), -1)  # K branches concatenated
        expected = _bn_linear(heads.classifiers[key], feat)
        assert rel_err(logits[f"{spec.name}@{lr:g}"], expected) < 1e-4, (spec, lr)


def test_every_pair_gets_only_its_own_gradient():
    heads = ProbeHeads(parse_heads("avg,selective"), [0.1, 1.0], D, C, 1).to(DEVICE)
    tokens = torch.randn(8, 10, D, device=DEVICE)
    logits = heads(tokens)
    logits["selective@1"].sum().backward()
    for spec, lr in heads.pairs:
        grads = [p.grad for p in heads.pair_parameters(spec, lr)]
        if (spec.name, lr) == ("selective", 1.0):
            assert all(g is not None and g.abs().sum() > 0 for g in grads[:1])
            assert heads.aggregators[heads._key(spec, lr)].weight.grad.abs().sum() > 0
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), (spec, lr)


def test_bad_head_names():
    with pytest.raises(ValueError, match="unknown head 'attn'"):
        parse_heads("cls,attn")
    with pytest.raises(ValueError, match="needs a \\[cls\\] token"):
        parse_heads("cls,avg", has_cls=False)
    with pytest.raises(ValueError, match="twice"):
        parse_heads("avg,avg")
    with pytest.raises(ValueError, match="no heads"):
        parse_heads(" , ")


def test_global_batchnorm_equals_batchnorm_on_one_process():
    x = torch.randn(32, 7) * 3 + 1
    ours, ref = GlobalBatchNorm1d(7), torch.nn.BatchNorm1d(7, affine=False, eps=1e-6)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_lars_step_matches_formula():
    torch.manual_seed(1)
    w, b = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(4))
    gw, gb = torch.randn(4, 6), torch.randn(4)
    w0, b0 = w.detach().double().clone(), b.detach().double().clone()
    opt = LARS([w, b], lr=0.5, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001)
    mu_w, mu_b = torch.zeros_like(w0), torch.zeros_like(b0)
    for _ in range(3):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        u = gw.double() + 0.01 * w0
        u = u * (0.001 * w0.norm() / u.norm())  # trust ratio for ndim > 1
        mu_w = 0.9 * mu_w + u
        w0 = w0 - 0.5 * mu_w
        mu_b = 0.9 * mu_b + gb.double()        # biases: plain momentum SGD
        b0 = b0 - 0.5 * mu_b
    assert rel_err(w, w0) < 1e-6 and rel_err(b, b0) < 1e-6


def test_lars_zero_norms_use_ratio_one():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    w.grad = torch.ones(3, 3)
    LARS([w], lr=1.0, momentum=0.0).step()
    assert torch.equal(w.detach(), -torch.ones(3, 3))


def _lars_one_tensor_at_a_time(groups, steps):
    """MAE's LARS loop, parameter by parameter, in float64: the reference for the foreach step."""
    state = {}
    for grads in steps:
        for group, group_grads in zip(groups, grads):
            for p, g in zip(group["params"], group_grads):
                if g is None:
                    continue
                u = g.double()
                if p.ndim > 1:
                    u = u + group["weight_decay"] * p
                    pn, un = p.norm(), u.norm()
                    u = u * (group["trust_coefficient"] * pn / un if pn > 0 and un > 0 else 1.0)
                mu = state.setdefault(id(p), torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(u)
                p.sub_(group["lr"] * mu)


def test_lars_groups_with_their_own_hyper_parameters_match_the_per_tensor_loop():
    torch.manual_seed(2)
    shapes = [[(5, 7), (5,), (1, 7), (1,)], [(3, 4, 2), (3,)], [(6, 6), (6,)]]
    hyper = [dict(lr=0.3, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001),
             dict(lr=1.5, weight_decay=0.05, momentum=0.5, trust_coefficient=0.02),
             dict(lr=0.7, weight_decay=0.01, momentum=0.0, trust_coefficient=0.001)]
    params = [[torch.nn.Parameter(torch.randn(s)) for s in group] for group in shapes]
    params[2][0].data.zero_()  # a zero matrix: trust ratio 1
    opt = LARS([dict(params=ps, **h) for ps, h in zip(params, hyper)])
    steps = [[[torch.randn(s) for s in group] for group in shapes] for _ in range(3)]
    for grads in steps:
        grads[1][1] = None  # a parameter without a gradient this step is left alone
    ref_groups = [dict(params=[p.detach().double().clone() for p in ps], **h) for ps, h in zip(params, hyper)]
    for grads in steps:
        for ps, gs in zip(params, grads):
            for p, g in zip(ps, gs):
                p.grad = None if g is None else g.clone()
        opt.step()
    _lars_one_tensor_at_a_time(ref_groups, steps)
    for ps, ref in zip(params, ref_groups):
        for p, r in zip(ps, ref["params"]):
            assert rel_err(p, r) < 1e-6

def test_lars_per_group_trust_coefficients_keep_the_parameters_dtype():
    # float64 parameters, two trust coefficients: a float32 copy of 0.001 would be off by ~5e-8 relative
    torch.manual_seed(3)
    hyper = [dict(lr=0.9, weight_decay=0.01, momentum=0.9, trust_coefficient=0.001),
             dict(lr=0.9, weight_decay=0.01, momentum=0.9, trust_coefficient=0.003)]
    params = [[torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))] for _ in hyper]
    ref_groups = [dict(params=[p.detach().clone() for p in ps], **h) for ps, h in zip(params, hyper)]
    opt = LARS([dict(params=ps, **h) for ps, h in zip(params, hyper)])
    steps = [[[torch.randn(4, 5, dtype=torch.float64)] for _ in hyper] for _ in range(2)]
    for grads in steps:
        for ps, gs in zip(params, grads):
            ps[0].grad = gs[0].clone()
        opt.step()
    _lars_one_tensor_at_a_time(ref_groups, steps)
    for ps, ref in zip(params, ref_groups):
        assert rel_err(ps[0], ref["params"][0]) < 1e-13


def test_linear_probe_initialisation_per_protocol():
    torch.manual_seed(0)
    paper, mae = LinearProbe(256, 100), LinearProbe(256, 100, init="mae")
    bound = 1 / 256 ** 0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
    assert paper.fc.weight.abs().max() <= bound and paper.fc.weight.std() > 0.8 * bound / 3 ** 0.5
    assert paper.fc.bias.abs().max() <= bound and paper.fc.bias.abs().sum() > 0
    # trunc_normal_(std=0.01) truncates at +-2 absolute (MAE's call): in effect N(0, 0.01^2)
    assert abs(mae.fc.weight.std().item() - 0.01) < 0.0005 and mae.fc.weight.abs().max() < 0.07
    assert torch.equal(mae.fc.bias, torch.zeros(100))
    with pytest.raises(ValueError, match="paper or mae"):
        paper.reset_classifier("xavier")


def test_protocol_and_momentum_resolution():
    def resolved(saved=None, **kw):
        cfg = _resolved(ProbeConfig(**kw), saved)
        return cfg.protocol, cfg.momentum
    assert resolved() == ("paper", 0.9)  # LARS
    assert resolved(optimizer="sgd") == ("paper", 0.0)
    assert resolved(optimizer="sgd", protocol="mae") == ("mae", 0.9)
    assert resolved(optimizer="sgd", momentum=0.5) == ("paper", 0.5)
    assert resolved(dict(momentum=0.9), optimizer="sgd") == ("mae", 0.9)  # saved before protocols: MAE's
    assert resolved(dict(protocol="paper", momentum=0.0), optimizer="sgd") == ("paper", 0.0)


def test_epoch_shards_split_global_batches_like_one_process():
    one = split_batches(epoch_shard(range(50), seed=3, epoch=2).tolist(), 8, drop_last=True)
    ranks = [split_batches(epoch_shard(range(50), seed=3, epoch=2, rank=r, world=2).tolist(), 4, drop_last=True)
             for r in range(2)]
    assert len(one) == 6 and all(len(r) == 6 for r in ranks)
    for b, batch in enumerate(one):  # same images per global step (the order inside a step is free)
        assert sorted(batch) == sorted(ranks[0][b] + ranks[1][b])
    assert sorted(epoch_shard(range(50), 3, 2).tolist()) == list(range(50))
    assert epoch_shard(range(50), 3, 2).tolist() != epoch_shard(range(50), 3, 3).tolist()  # reshuffled per epoch
    assert [len(b) for b in split_batches(list(range(10)), 4, drop_last=False)] == [4, 4, 2]


def test_cosine_schedule_formula():
    peak, E, W = 0.4, 90, 10
    assert cosine_lr(peak, 0, E, W) == 0
    assert cosine_lr(peak, 5, E, W) == pytest.approx(0.2)
    assert cosine_lr(peak, 10, E, W) == pytest.approx(peak)
    assert cosine_lr(peak, 50, E, W) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_lr(peak, 90, E, W) == pytest.approx(0, abs=1e-12)
    lrs = [cosine_lr(peak, e / 10, E, W) for e in range(101, 900)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "decays monotonically after warm-up"


def test_optimizer_groups_scale_lr_by_effective_batch():
    heads = ProbeHeads(parse_heads("avg,selective"), [0.1, 0.3], D, C, 1)
    opt = build_optimizer(heads, "lars", effective_batch=4096)
    assert [g["peak_lr"] for g in opt.param_groups] == pytest.approx([1.6, 4.8, 1.6, 4.8])
    assert len(opt.param_groups[2]["params"]) == 4  # fc w, fc b, score w, score b
    assert isinstance(build_optimizer(heads, "sgd", 1024), torch.optim.SGD)


# --- backbone loading --------------------------------------------------------------------------
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def _timm_state():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["timm_pth", "timm_safetensors", "mae", "ijepa", "ddp_prefix", "mae_pickled_args"])
def test_checkpoint_layouts_load_exactly(tmp_path, layout):
    model, state = _timm_state()
    path = tmp_path / ("w.safetensors" if layout == "timm_safetensors" else "w.pth")
    if layout == "timm_safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    elif layout == "timm_pth":
        torch.save(state, path)
    elif layout == "mae":  # encoder + decoder of MAE pretraining under "model"
        torch.save({"model": {**state, "decoder_embed.weight": torch.randn(4, 48), "mask_token": torch.zeros(1, 1, 48)}}, path)
    elif layout == "ijepa":  # I-JEPA: DDP-prefixed encoder and target encoder (the target is probed)
        other = {f"module.{k}": torch.randn_like(v) for k, v in state.items()}
        torch.save({"encoder": other, "target_encoder": {f"module.{k}": v for k, v in state.items()},
                    "predictor": {}, "epoch": 3}, path)
    elif layout == "ddp_prefix":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        import argparse
        torch.save({"model": state, "args": argparse.Namespace(lr=1.0)}, path)
    bb = create_backbone("vit_tiny_patch16_224", str(path), **TINY)
    loaded = bb.model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert bb.info.num_prefix_tokens == 1 and bb.info.has_cls and bb.info.embed_dim == 48


def test_checkpoint_mismatches_are_refused(tmp_path):
    _, state = _timm_state()
    missing = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing keys.*blocks.1"):
        create_backbone("vit_tiny_patch16_224", str(tmp_path / "missing.pth"), **TINY)
    bb = create_backbone("vit_tiny_patch16_224", str(tmp_path / "missing.pth"), allow_key_mismatch=True, **TINY)
    assert len(bb.model.blocks) == 2
    torch.save({**state, "blocks.0.extra": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected keys.*blocks.0.extra"):
        create_backbone("vit_tiny_patch16_224", str(tmp_path / "extra.pth"), **TINY)
    with pytest.raises(CheckpointError, match="shapes do not match"):  # a ViT-S checkpoint into a narrower model
        create_backbone("vit_tiny_patch16_224", str(tmp_path / "extra.pth"), **{**TINY, "embed_dim": 96})
    with pytest.raises(FileNotFoundError):
        read_checkpoint(str(tmp_path / "nope.pth"))


def test_no_download_and_unknown_names():
    with pytest.raises(ValueError, match="--checkpoint"):
        create_backbone("vit_base_patch16_224")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("vit_bsae_patch16_224", random_init=True)


def test_backbone_tokens_return_block_and_final_norm():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY, "depth": 3}).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_features(images)  # timm applies the final norm
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.blocks[:2](x)
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", random_init=True, final_norm=True, **{**TINY, "depth": 3})
    bb.model.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bb(images), full)
    bb2 = create_backbone("vit_tiny_patch16_224", random_init=True, return_block=2, **{**TINY, "depth": 3})
    bb2.model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.2")},
                              strict=False)
    with torch.no_grad():
        torch.testing.assert_close(bb2(images), x)
    assert bb2.info.num_blocks == 2 and not any(p.requires_grad for p in bb2.parameters())
    with pytest.raises(ValueError, match="out of range"):
        create_backbone("vit_tiny_patch16_224", random_init=True, return_block=4, **{**TINY, "depth": 3})


def test_no_cls_and_register_models():
    bb = create_backbone("vit_base_patch16_reg4_gap_256", random_init=True, img_size=32, depth=1, embed_dim=48,
                         num_heads=3)
    assert bb.info.num_prefix_tokens == 4 and not bb.info.has_cls
    assert bb(torch.randn(1, 3, 32, 32)).shape == (1, 4 + 4, 48)


# --- data --------------------------------------------------------------------------------------
def _folder(root, classes=("a", "b"), per_class=3, corrupt=None):
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((40, 40, 3), i * 40, np.uint8)).save(d / f"{c}_{i}.png")
    if corrupt:
        (root / "train" / classes[0] / "broken.png").write_bytes(b"not a png at all")


def test_image_folder_skips_and_counts_corrupt_images(tmp_path):
    _folder(tmp_path, corrupt=True)
    train, val = probe_datasets("imagefolder", str(tmp_path), 32, augment=True)
    assert len(train) == 7 and train.classes == ["a", "b"]
    images, labels, indices, skipped = collate_skipping([train[i] for i in range(len(train))])
    assert images.shape == (6, 3, 32, 32) and len(skipped) == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        probe_datasets("imagefolder", str(tmp_path / "nope"), 32)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders|no 'val/' folder"):
        probe_datasets("imagefolder", str(tmp_path), 32)
    _folder(tmp_path / "x")
    (tmp_path / "x" / "train" / "empty").mkdir()
    (tmp_path / "x" / "val" / "empty").mkdir()
    with pytest.raises(ValueError, match="hold no images: empty"):
        probe_datasets("imagefolder", str(tmp_path / "x"), 32)
    _folder(tmp_path / "y", classes=("a", "b"))
    (tmp_path / "y" / "val" / "b").rename(tmp_path / "y" / "val" / "c")
    with pytest.raises(ValueError, match="only in train/: b; only in val/: c"):
        probe_datasets("imagefolder", str(tmp_path / "y"), 32)


def test_train_list_subsets(tmp_path):
    _folder(tmp_path)
    (tmp_path / "list.txt").write_text("a/a_0.png\nb_2.png\n")
    train, _ = probe_datasets("imagefolder", str(tmp_path), 32, train_list=str(tmp_path / "list.txt"))
    assert [(p.split("/")[-1], y) for p, y in train.base.samples] == [("a_0.png", 0), ("b_2.png", 1)]
    (tmp_path / "bad.txt").write_text("a/zzz.png\n")
    with pytest.raises(ValueError, match="1 of 1 entries not found"):
        probe_datasets("imagefolder", str(tmp_path), 32, train_list=str(tmp_path / "bad.txt"))


def test_synthetic_images_are_deterministic_and_labelled():
    ds = SyntheticObjects(20, num_classes=4, img_size=32, seed=3)
    a, la = ds[7]
    b, lb = ds[7]
    assert la == lb and np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (32, 32)
    assert {ds[i][1] for i in range(20)} == {0, 1, 2, 3}
    val = SyntheticObjects(20, num_classes=4, img_size=32, seed=3, split="val")
    assert not np.array_equal(np.asarray(val[7][0]), np.asarray(a))


def test_unreadable_count_spans_every_epoch():
    # the paper protocol drops a different last partial batch each epoch: an epoch that did not meet
    # an unreadable image must not reset the count, and a resumed run's count is a floor
    from types import SimpleNamespace
    from selagg_fast.probe.data_plan import DataPlan
    run = SimpleNamespace(unreadable={"train": 0, "val": 2}, unreadable_indices={"train": set(), "val": set()},
                          distinct_count=lambda indices: len(set(indices)))
    for epoch_indices, expected in (([5], 1), ([], 1), ([7, 5], 2)):
        DataPlan.note_unreadable(run, "train", epoch_indices)
        assert run.unreadable["train"] == expected
    DataPlan.note_unreadable(run, "val", [1])
    assert run.unreadable["val"] == 2
