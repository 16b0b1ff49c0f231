"""SelectiveAggregation's reference-head variants (depth, activation, self-attention, positional
conditioning, content) against an eager transcription of the paper code's ABMILPHead in float64,
with state dicts swapped both ways; every parameter's gradient; bad inputs."""
import itertools

import numpy as np
import pytest
import torch
from conftest import DEVICE, rel_err
from reference_head import ABMILPHead, get_2d_sincos_pos_embed

from selagg_fast import SelectiveAggregation
from selagg_fast.modules import sincos_pos_embed_2d

D, G, B = 32, 3, 3  # token width, patch grid G x G, batch
TOL = 2e-5  # float32 module vs float64 reference: accumulation error only

SCORERS = [(1, "tanh"), (2, "tanh"), (2, "relu")]
CASES = [(d, a, sa, pe, content) for (d, a), sa, pe, content
         in itertools.product(SCORERS, ("none", "map", "both"), (False, True), ("patch", "all"))]


def _ids(case):
    d, a, sa, pe, content = case
    return f"d{d}{'-' + a if d == 2 else ''}-sa_{sa}{'-pe' if pe else ''}-{content}"


def _pair(depth, activation, sa, pe, content, K=1, heads=1):
    ref = ABMILPHead(D, sa, activation, depth, "pe" if pe else "none", content, num_patches=G * G,
                     attention_branches=K, num_heads=heads).double().to(DEVICE)
    ours = SelectiveAggregation(D, K, 1 if content == "patch" else 0, depth=depth, activation=activation,
                                self_attention=sa, positional=pe, grid_size=G,
                                self_attention_heads=heads).to(DEVICE)
    return ref, ours


def _ref_outputs(ref, x, K):
    out, attn = ref.forward_with_attn_map(x.double())
    out = out if K == 1 else out.transpose(1, 2)  # reference [B, D, K] -> [B, K, D]
    attn = attn[..., 0] if K == 1 else attn.transpose(1, 2)  # [B, N', K] -> [B, N'] / [B, K, N']
    return out, attn


def _grad_err(actual, expected):
    """rel_err, with an absolute floor for the last layer's bias, whose gradient is zero analytically
    (softmax is shift-invariant): float32 leaves ~1e-7 there."""
    if expected.abs().max() < 1e-12:
        return actual.abs().max().item() * TOL / 1e-5  # passes below 1e-5
    return rel_err(actual, expected)


def _grads_by_reference_key(ours):
    """Our parameters' gradients under the reference's state-dict keys."""
    names = {"weight": "attention_predictor.0.weight", "bias": "attention_predictor.0.bias"} if ours.linear else {}
    return {names.get(n, n): p.grad for n, p in ours.named_parameters()}


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_variant_matches_reference_head(case):
    depth, activation, sa, pe, content = case
    ref, ours = _pair(*case)
    for p in ref.parameters():  # scores far from uniform, so a wrong scorer cannot hide
        if p.requires_grad:
            p.data.mul_(2.0)
    x = torch.randn(B, 1 + G * G, D, device=DEVICE)

    # reference -> ours (a head trained by the paper's code)
    ours.load_state_dict(ref.state_dict())
    x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    pooled, weights = ours(x_ours, return_weights=True)
    exp_pooled, exp_weights = _ref_outputs(ref, x_ref, 1)
    assert pooled.dtype == torch.float32 and weights.dtype == torch.float32
    assert rel_err(pooled, exp_pooled) < TOL
    assert rel_err(weights, exp_weights) < TOL
    dout = torch.randn_like(exp_pooled)
    (pooled * dout.float()).sum().backward()
    (exp_pooled * dout).sum().backward()
    grads = _grads_by_reference_key(ours)
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(ref_grads)
    for name, g in ref_grads.items():
        assert grads[name] is not None, name
        assert _grad_err(grads[name], g) < TOL, name
    assert rel_err(x_ours.grad, x_ref.grad) < TOL

    # ours -> reference
    torch.manual_seed(1)
    fresh = SelectiveAggregation(D, 1, ours.num_prefix_tokens, depth=depth, activation=activation,
                                 self_attention=sa, positional=pe, grid_size=G).to(DEVICE)
    state = fresh.reference_state_dict()
    if not fresh.linear:
        assert state.keys() == fresh.state_dict().keys()  # the reference's keys natively
    ref.load_state_dict({k: v.double() for k, v in state.items()})
    with torch.no_grad():
        assert rel_err(fresh(x), ref(x.double())) < TOL


@pytest.mark.parametrize("sa,heads", [("none", 1), ("both", 1), ("map", 4)])
def test_branches_and_heads_match_reference(sa, heads):
    """K score branches (the reference's attention_branches) and a several-head self-attention."""
    K = 3
    ref, ours = _pair(2, "relu", sa, True, "patch", K=K, heads=heads)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, 1 + G * G, D, device=DEVICE)
    pooled, weights = ours(x, return_weights=True)
    exp_pooled, exp_weights = _ref_outputs(ref, x, K)
    assert pooled.shape == (B, K, D) and weights.shape == (B, K, G * G)
    assert rel_err(pooled, exp_pooled) < TOL
    assert rel_err(weights, exp_weights) < TOL


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("g", [3, 14])
def test_pos_table_is_maes(g, cls_token):
    ours = sincos_pos_embed_2d(64, g, cls_token=cls_token)
    expected = torch.from_numpy(get_2d_sincos_pos_embed(64, g, cls_token=cls_token)).float()
    assert torch.equal(ours, expected)


def test_pos_table_non_square_grid():
    h, w, dim = 2, 3, 8
    table = sincos_pos_embed_2d(dim, (h, w)).double()
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    for r, c in itertools.product(range(h), range(w)):
        col, row = c * omega, r * omega
        expected = np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)])
        np.testing.assert_allclose(table[r * w + c].numpy(), expected, atol=1e-7)


def test_default_configuration_keeps_its_parameters():
    head = SelectiveAggregation(D)
    assert head.linear and sorted(head.state_dict()) == ["bias", "weight"]
    ref = ABMILPHead(D, depth=1, content="patch", num_patches=G * G)
    head.load_state_dict(ref.state_dict())  # the reference's unused pos_embed is dropped
    assert torch.equal(head.weight, ref.attention_predictor[0].weight)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="positional=True needs the patch grid"):
        SelectiveAggregation(D, positional=True)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        SelectiveAggregation(D, depth=2, activation="gelu")
    with pytest.raises(ValueError, match="unknown self_attention 'all'"):
        SelectiveAggregation(D, self_attention="all")
    with pytest.raises(ValueError, match="self_attention_heads=5 does not divide dim=32"):
        SelectiveAggregation(D, self_attention="both", self_attention_heads=5)
    with pytest.raises(ValueError, match="depth must be 1 or 2"):
        SelectiveAggregation(D, depth=3)
    with pytest.raises(ValueError, match="grid_size"):
        SelectiveAggregation(D, positional=True, grid_size=(3, 0))
    with pytest.raises(ValueError, match="divisible by 4"):
        SelectiveAggregation(30, positional=True, grid_size=3)
    head = SelectiveAggregation(D, positional=True, grid_size=G).to(DEVICE)
    with pytest.raises(ValueError, match=r"grid 3x3 \(9 patches\) does not match the 15 pooled tokens"):
        head(torch.randn(2, 16, D, device=DEVICE))
    for variant in (head, SelectiveAggregation(D), SelectiveAggregation(D, depth=2, self_attention="map")):
        with pytest.raises(ValueError, match=rf"expected tokens \[B, T, {D}\]"):
            variant(torch.randn(2, 10, D + 1, device=DEVICE))
    with pytest.raises(ValueError, match="no tokens left"):
        SelectiveAggregation(D, 1, 2, depth=2)(torch.randn(2, 2, D, device=DEVICE))
    for bad in (dict(branches=2.5), dict(depth=True), dict(num_prefix_tokens=1.0)):
        with pytest.raises(ValueError, match="must be an int"):
            SelectiveAggregation(D, **bad)
    SelectiveAggregation(30, grid_size=3)  # a grid without positional conditioning does not need D % 4


def test_probe_heads_refuse_a_grid_that_cannot_fit_before_any_batch():
    from selagg_fast.probe.heads import ProbeHeads, parse_heads
    # a model with 5 prefix tokens (cls + 4 registers) and a 3x3 grid: content "all" pools 14 tokens
    with pytest.raises(ValueError, match=r"grid 3x3 \(9 patches\) does not match the 14 pooled tokens"):
        ProbeHeads(parse_heads("selective_pe_all"), [0.1], D, 4, num_prefix_tokens=5, grid_size=(3, 3))
    ProbeHeads(parse_heads("selective_pe,selective_pe_all"), [0.1], D, 4, num_prefix_tokens=1, grid_size=(3, 3))
