"""Probe heads for the reference head's variants, attentive and efficient probing: names, one shared
pooling call per token-normalisation setting (at most the kernels' K branches a call), features against independent references, selection maps,
and a tiny end-to-end run."""
import json
import os

import pytest
import torch
from conftest import DEVICE, rel_err
from torch import nn

import selagg_fast.branches as branches_module
from selagg_fast.analysis.probe_maps import ProbeMaps, refuse_diverged
from selagg_fast.probe.heads import HeadSpec, ProbeHeads, parse_heads
from selagg_fast.reference import abmilp_pool_reference
from test_efficient import PeerEfficientProbing

timm_pool = pytest.importorskip("timm.layers.attention_pool")

D, C, P, G = 32, 3, 1, 3  # width, classes, prefix tokens, patch grid G x G


def _bn_linear(probe, features):
    """Training-mode BatchNorm1d(affine=False, eps=1e-6) then Linear, in float64."""
    f = features.double()
    f = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-6)
    return f @ probe.fc.weight.double().T + probe.fc.bias.double()


def test_parse_variant_names():
    specs = {s.name: s for s in parse_heads(
        "selective_mlp_tanh,selective_mlp_relu,selective_mlp_tanh_sa_all,selective_samap_pe_k2,ap12,ap1_ln_all,"
        "ep32,ep1_all")}
    assert specs["selective_mlp_tanh"] == HeadSpec("selective_mlp_tanh", "selective", depth=2, activation="tanh")
    assert specs["selective_mlp_relu"].activation == "relu"
    sa = specs["selective_mlp_tanh_sa_all"]
    assert (sa.kind, sa.depth, sa.self_attention, sa.pools_prefix) == ("selective_all", 2, "both", True)
    pe = specs["selective_samap_pe_k2"]
    assert (pe.depth, pe.self_attention, pe.positional, pe.branches) == (1, "map", True, 2)
    assert (specs["ap12"].kind, specs["ap12"].num_heads, specs["ap12"].token_norm) == ("ap", 12, False)
    assert (specs["ap1_ln_all"].kind, specs["ap1_ln_all"].token_norm) == ("ap_all", True)
    assert specs["ep32"] == HeadSpec("ep32", "ep", num_queries=32) and specs["ep32"].efficient
    assert (specs["ep1_all"].kind, specs["ep1_all"].num_queries, specs["ep1_all"].pools_prefix) == ("ep_all", 1, True)
    assert all(s.selective for s in specs.values())  # every one needs all tokens (feature cache)
    assert not any(s.selective for s in parse_heads("cls,avg"))


@pytest.mark.parametrize("name", ["selective_mlp_gelu", "selective_sa_mlp_tanh", "ap", "apx", "ap2_ln_ln",
                                  "ap2_k2", "selective_pe_sa", "attn", "ep", "ep4_ln", "ep_all"])
def test_unknown_head_names(name):
    with pytest.raises(ValueError, match=f"unknown head {name!r}"):
        parse_heads(f"avg,{name}")


def test_impossible_heads():
    with pytest.raises(ValueError, match="H must be >= 1"):
        parse_heads("ap0")
    with pytest.raises(ValueError, match="Q must be >= 1"):
        parse_heads("ep0_all")
    with pytest.raises(ValueError, match=r"--heads ep5: 5 queries do not divide the backbone's width 32 "
                                         r"\(counts that do, up to 64: 1, 2, 4, 8, 16, 32\)"):
        ProbeHeads(parse_heads("ep5"), [0.1], D, C, P)
    with pytest.raises(ValueError, match="K must be >= 1"):
        parse_heads("selective_mlp_relu_k0")
    with pytest.raises(ValueError, match="twice"):
        parse_heads("ap2,ap2")
    with pytest.raises(ValueError, match="'selective_pe' .* needs the patch grid"):
        ProbeHeads(parse_heads("selective_pe"), [0.1], D, C, P)
    with pytest.raises(ValueError, match="--heads ap5: 5 attention heads do not divide the backbone's width 32"):
        ProbeHeads(parse_heads("ap5"), [0.1], D, C, P)


def _timm_ap(agg):
    """timm's AttentionPoolLatent (float64) with ``agg``'s parameters, and its token LayerNorm."""
    ref = timm_pool.AttentionPoolLatent(D, num_heads=agg.num_heads, mlp_ratio=4.0, qkv_bias=True, latent_len=1,
                                        norm_layer=nn.LayerNorm).double()
    state = agg.state_dict()
    ref.load_state_dict({k: v for k, v in state.items() if not k.startswith("token_norm.")})
    ln = None
    if agg.token_norm is not None:
        ln = nn.LayerNorm(D, eps=1e-6).double()
        ln.load_state_dict({k[len("token_norm."):]: v for k, v in state.items() if k.startswith("token_norm.")})
    return ref, ln


HEADS = "selective,selective_k2,ap2,ap4_ln,ap1_ln,selective_all,ap2_all,selective_mlp_relu,selective_pe,ep4,ep2_all"


def _counting_pool(monkeypatch):
    """Record (weight shape, bias shape, prefix, standardize) of every fused pooling call."""
    calls = []
    real = branches_module.abmilp_pool

    def counting(x, weight, bias=None, **kw):
        calls.append((tuple(weight.shape), None if bias is None else tuple(bias.shape), kw.get("num_prefix_tokens"),
                      kw.get("standardize", False)))
        return real(x, weight, bias, **kw)

    monkeypatch.setattr(branches_module, "abmilp_pool", counting)
    return calls


def _peer_ep(agg):
    ref = PeerEfficientProbing(agg.dim, agg.num_queries, agg.d_out).double()
    ref.load_state_dict(agg.state_dict())
    return ref


def test_one_pooling_call_per_setting_and_features_match(monkeypatch):
    calls = _counting_pool(monkeypatch)
    lrs = [0.1, 0.3]
    heads = ProbeHeads(parse_heads(HEADS), lrs, D, C, P, grid_size=G).to(DEVICE).train()
    with torch.no_grad():  # attentive parameters off their initial values (zero biases, unit LayerNorms)
        for agg in heads.aggregators.values():
            for p in agg.parameters():
                p.add_(0.2 * torch.randn_like(p))
    tokens = torch.randn(6, P + G * G, D, device=DEVICE)
    logits = heads(tokens)
    # (prefix 1, plain): selective 1 + selective_k2 2 + ap2 2 + ep4 4 branches, x 2 lrs; zero biases for
    # ap2's and ep4's; (prefix 1, standardised): ap4_ln 4 + ap1_ln 1, x 2 lrs, no bias;
    # (prefix 0, plain): selective_all 1 + ap2_all 2 + ep2_all 2
    assert sorted(calls, key=str) == sorted([((18, D), (18,), 1, False), ((10, D), None, 1, True),
                                             ((10, D), (10,), 0, False)], key=str)
    x64 = tokens.double().cpu()
    for spec, lr in heads.pairs:
        key = heads._key(spec, lr)
        agg = heads.aggregators[key]
        if spec.attentive:
            ref, ln = _timm_ap(agg.cpu())
            z = x64[:, agg.num_prefix_tokens:]
            feat = ref(ln(z) if ln is not None else z)
        elif spec.efficient:
            feat = _peer_ep(agg.cpu())(x64[:, agg.num_prefix_tokens:])
        elif agg.linear:
            feat = abmilp_pool_reference(x64, agg.weight.double().cpu(), agg.bias.double().cpu(),
                                         num_prefix_tokens=agg.num_prefix_tokens,
                                         compute_dtype=torch.float64).reshape(len(x64), -1)
        else:  # the variants run their own head (tested against the paper's head in test_variants.py)
            feat = agg(tokens).reshape(len(x64), -1).cpu()
        agg.to(DEVICE)
        expected = _bn_linear(heads.classifiers[key].cpu(), feat)
        heads.classifiers[key].to(DEVICE)
        assert rel_err(logits[f"{spec.name}@{lr:g}"], expected) < 1e-4, (spec.name, lr)


def test_every_pair_gets_only_its_own_gradient():
    heads = ProbeHeads(parse_heads("selective,ap2,ap3_ln,selective_mlp_tanh_sa,ep4"), [0.1, 1.0], 48, C, P).to(DEVICE)
    tokens = torch.randn(5, 10, 48, device=DEVICE)
    for target in ("ap2@1", "ap3_ln@0.1", "selective_mlp_tanh_sa@1", "ep4@0.1"):
        heads.zero_grad(set_to_none=True)
        heads(tokens)[target].sum().backward()
        for spec, lr in heads.pairs:
            named = list(heads.aggregators[heads._key(spec, lr)].named_parameters())
            if f"{spec.name}@{lr:g}" == target:
                for name, p in named:
                    if name == "kv.bias":  # the key bias cancels in the softmax: exactly zero gradient
                        assert p.grad[:48].abs().max() < 1e-6 and p.grad[48:].abs().sum() > 0
                    elif name not in ("attention_predictor.2.bias",):  # shift-invariant softmax: ~0
                        assert p.grad is not None and p.grad.abs().sum() > 0, (target, name)
            else:
                assert all(p.grad is None or p.grad.abs().sum() == 0 for _, p in named), (target, spec.name, lr)


def test_selection_weights_of_every_kind():
    heads = ProbeHeads(parse_heads("selective_k2,ap3,ap2_ln_all,selective_mlp_relu_sa,selective_samap_pe,ep4_all"),
                       [0.1], 48, C, P, grid_size=G).to(DEVICE).eval()
    tokens = torch.randn(4, P + G * G, 48, device=DEVICE)
    ep = heads.aggregators["ep4_all@0_1"]
    torch.testing.assert_close(heads.selection_weights(tokens, "ep4_all@0.1").double().cpu(),
                               _peer_ep(ep.cpu()).attention(tokens.double().cpu()), rtol=1e-5, atol=1e-6)
    ep.to(DEVICE)
    for name, k, n in (("selective_k2@0.1", 2, 9), ("ap3@0.1", 3, 9), ("ap2_ln_all@0.1", 2, 10), ("ep4_all@0.1", 4, 10),
                       ("selective_mlp_relu_sa@0.1", 1, 9), ("selective_samap_pe@0.1", 1, 9)):
        w = heads.selection_weights(tokens, name)
        assert w.shape == (4, k, n) and w.dtype == torch.float32, name
        torch.testing.assert_close(w.sum(-1).cpu(), torch.ones(4, k))
        agg = heads.aggregators[name.replace(".", "_")]
        if not (hasattr(agg, "linear") and agg.linear):
            torch.testing.assert_close(w, agg(tokens, return_weights=True)[1].reshape(4, k, n))
    with pytest.raises(ValueError, match="not a selective or attentive head"):
        ProbeHeads(parse_heads("avg"), [0.1], 48, C, P).selection_weights(tokens, "avg@0.1")


def test_shared_calls_stay_within_the_kernels_K(monkeypatch):
    """Three ep32 pairs and three selective ones: 99 branches in calls of at most 64, whole pairs each."""
    calls = _counting_pool(monkeypatch)
    heads = ProbeHeads(parse_heads("selective,ep32"), [0.1, 0.3, 1.0], D, C, P).to(DEVICE).train()
    tokens = torch.randn(4, P + 7, D, device=DEVICE)
    logits = heads(tokens)
    assert calls == [((35, D), (35,), 1, False), ((64, D), None, 1, False)]
    x64 = tokens.double().cpu()
    for lr in heads.lrs:
        key = heads._key(parse_heads("ep32")[0], lr)
        expected = _bn_linear(heads.classifiers[key].cpu(), _peer_ep(heads.aggregators[key].cpu())(x64[:, P:]))
        assert rel_err(logits[f"ep32@{lr:g}"], expected) < 1e-4, lr


def test_maps_pick_attentive_heads():
    state = {"results": {"pairs": [{"head": "avg", "base_lr": 0.1, "top1": 90.0},
                                   {"head": "selective", "base_lr": 0.1, "top1": 50.0},
                                   {"head": "ap12_ln", "base_lr": 0.3, "top1": 60.0}]}}
    assert ProbeMaps._best_selective(state) == "ap12_ln@0.3"
    state["results"]["pairs"].append({"head": "ep8", "base_lr": 1.0, "top1": 70.0})
    assert ProbeMaps._best_selective(state) == "ep8@1"
    # a diverged pair is refused with every map head that trained as the choice, ep ones included
    state["results"]["pairs"].append({"head": "selective", "base_lr": 1.0, "top1": None, "diverged": True})
    with pytest.raises(ValueError, match=r"selective@1: diverged .*choose one of selective@0\.1, ap12_ln@0\.3, ep8@1$"):
        refuse_diverged(state, ["selective@1"], "--head")


def test_new_heads_train_end_to_end(tmp_path):
    """A tiny SGD run of every new kind from a feature cache: finite results, the cache keeps every
    token (no head here is cls/avg-only), the checkpoint holds the reference's keys, maps work."""
    from test_probe_run import tiny_config

    from selagg_fast.probe.trainer import run_probe

    out = tmp_path / "run"
    heads = "avg,ap2,ap2_ln,selective_mlp_relu,selective_mlp_tanh_sa,selective_pe"
    results = run_probe(tiny_config(out, heads=heads, lrs="0.5", epochs=1, warmup_epochs=0, optimizer="sgd",
                                    synthetic_train_size=32, synthetic_val_size=32, augment=False,
                                    cache_features=str(tmp_path / "cache"), cache_dtype="fp32"))
    assert [p["head"] for p in results["pairs"]] == heads.split(",")
    assert all(not p["diverged"] and 0 <= p["top1"] <= 100 for p in results["pairs"])
    metas = [json.loads((tmp_path / "cache" / d / "meta.json").read_text()) for d in os.listdir(tmp_path / "cache")]
    assert metas and all(m["token_shape"][0] == 1 + 16 for m in metas)  # 32 px / 8 px patches: 16 + [cls]
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["heads"]
    for key in ("aggregators.selective_mlp_relu@0_5.attention_predictor.2.weight",
                "aggregators.selective_mlp_tanh_sa@0_5.self_attn.qkv.weight",
                "aggregators.selective_pe@0_5.pos_embed", "aggregators.ap2_ln@0_5.token_norm.weight"):
        assert key in state, key
    images = torch.rand(2, 3, 32, 32)
    for head in ("ap2_ln@0.5", "selective_pe@0.5"):
        selection, _ = ProbeMaps(str(out), head=head, device=DEVICE).maps(images)
        assert selection.shape == (2, 4, 4) and torch.isfinite(selection).all()
