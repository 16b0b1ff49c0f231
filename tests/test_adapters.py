"""Attention adapters per family: statistics and selection rows against float64 unfused attention.

Each family's attention map is written out here from the module's parameters (explicit
``softmax(q k^T * scale + bias)``), in float64 on a copy of the model, and compared with what
``record_attention_stats`` (the streaming kernel through the adapter) and ``attention_selection``
/ ``capture_attention_rows`` (the adapter's query rows) report.
"""
import copy
import math

import pytest
import timm
import torch
from torch import nn

from conftest import DEVICE, expected_selection_weights, requires_kernels
from selagg_fast import attention_selection, record_attention_stats
from selagg_fast.attention_adapters import (HeadsAttention, TimmBeitAttention, TimmVitAttention, attention_adapter,
                                            token_layout)
from selagg_fast.backbone import Backbone
from selagg_fast.capi import CAPIViT
from selagg_fast.selection import capture_attention_rows

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
VITS = {
    "vit-registers": dict(reg_tokens=4),  # [cls] + 4 registers: P = 5
    "vit-qk-norm": dict(qk_norm=True),
    "vit-no-cls": dict(class_token=False, global_pool="avg", reg_tokens=2),
}
BEIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=64, use_abs_pos_emb=False, init_values=0.1)
BEITS = {
    "beit-shared": dict(use_shared_rel_pos_bias=True),  # SimMIM / BEiT-v2 pretraining layout
    "beit-per-block": dict(use_rel_pos_bias=True),  # BEiT fine-tuned layout
}
FAMILIES = list(VITS) + list(BEITS) + ["capi"]


def make_model(kind):
    torch.manual_seed(0)
    if kind in VITS:
        return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **VIT,
                                 **VITS[kind]).to(DEVICE).eval()
    if kind in BEITS:
        model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **BEIT, **BEITS[kind])
        with torch.no_grad():  # timm starts q/v biases at zero and the tables near zero: make them matter
            for name, p in model.named_parameters():
                if name.endswith(("q_bias", "v_bias")):
                    p.normal_(0, 0.5)
                elif name.endswith("relative_position_bias_table"):
                    p.normal_(0, 1.0)
        return model.to(DEVICE).eval()
    return CAPIViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_registers=4).to(DEVICE).eval()


def images_for(model, batch=3):
    return torch.randn(batch, 3, *model.patch_embed.img_size, device=DEVICE)


def _table_bias(table, index, T, H):
    return table[index.view(-1)].view(T, T, H).permute(2, 0, 1)


def explicit_map(model, attn, x):
    """``softmax(q k^T * d^-1/2 + bias)`` [B, H, T, T] of ``attn`` on ``x``, from its parameters."""
    B, T, C = x.shape
    H = attn.num_heads
    if hasattr(attn, "q_proj"):  # CAPI: separate projections, RoPE on q and k
        q, k = (p(x).reshape(B, T, H, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj))
        coords = attn.coordinates(x.device).to(x.dtype)
        q, k = attn.rope(q, coords), attn.rope(k, coords)
        bias = 0
    else:
        qkv_bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:  # BEiT: [q_bias, 0, v_bias]
            qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        qkv = x @ attn.qkv.weight.T + (0 if qkv_bias is None else qkv_bias)
        q, k, _ = qkv.reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        bias = 0
        if getattr(attn, "relative_position_bias_table", None) is not None:
            bias = bias + _table_bias(attn.relative_position_bias_table, attn.relative_position_index, T, H)
        shared = getattr(model, "rel_pos_bias", None)
        if shared is not None:
            bias = bias + _table_bias(shared.relative_position_bias_table, shared.relative_position_index, T, H)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias, -1)


def float64_pass(model, images):
    """Per block: the explicit float64 map, the block input and the attention layer's output."""
    ref = copy.deepcopy(model).double()
    seen, hooks = {}, []
    for i, block in enumerate(ref.blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, {}).update(res=a[0])))
        hooks.append(block.attn.register_forward_hook(
            lambda m, a, o, i=i: seen[i].update(A=explicit_map(ref, m, a[0]), y=o)))
    with torch.no_grad():
        ref.forward_features(images.double())
    for h in hooks:
        h.remove()
    return [seen[i] for i in range(len(ref.blocks))]


def expected_columns(A, P, has_cls):
    """The paper's columns (docs/statistics.md) per head, mean over images, from one block's map."""
    N = A.shape[-1] - P
    diag = A.diagonal(dim1=-2, dim2=-1)  # [B, H, T]
    den = A[..., P:].sum(-1)  # [B, H, T]
    renorm = A[..., P:] / den[..., None]
    entropy = -(renorm * renorm.log()).sum(-1)
    cols = {"pos_self_attention": diag[..., P:].mean(-1),
            "pos_self_attention_adj_for_cls": (diag / den)[..., P:].mean(-1),
            "pos_pos_entropy": entropy[..., P:].mean(-1)}
    if has_cls:
        cols.update(cls_cls_attention=A[..., 0, 0], cls_cls_attention_adj_for_cls=A[..., 0, 0] / den[..., 0],
                    cls_pos_attention=den[..., 0] / N, pos_cls_attention=A[..., P:, 0].mean(-1),
                    cls_pos_entropy=entropy[..., 0])
    return {name: value.mean(0) for name, value in cols.items()}


def test_each_family_has_its_adapter_and_layout():
    vit, beit = TimmVitAttention, TimmBeitAttention
    expect = {"vit-registers": (vit, (5, True, (4, 4))), "vit-qk-norm": (vit, (1, True, (4, 4))),
              "vit-no-cls": (vit, (2, False, (4, 4))), "beit-shared": (beit, (1, True, (4, 4))),
              "beit-per-block": (beit, (1, True, (4, 4))), "capi": (HeadsAttention, (4, False, (4, 4)))}
    for kind, (adapter, layout) in expect.items():
        model = make_model(kind)
        assert isinstance(attention_adapter(model.blocks[0].attn), adapter), kind
        assert tuple(token_layout(model)) == layout, kind
    backbone = Backbone(make_model("vit-registers"), "tiny")
    assert tuple(token_layout(backbone)) == (5, True, (4, 4))  # through Backbone.model


def test_unknown_attention_is_a_type_error_naming_it():
    class OwnAttention(nn.Module):
        def forward(self, x):
            return x

    model = make_model("vit-qk-norm")
    model.blocks[1].attn = OwnAttention()
    images = images_for(model)
    for call in (lambda: record_attention_stats(model), lambda: capture_attention_rows(model, [0], block=1),
                 lambda: attention_selection(model, images, "cls_mean")):
        with pytest.raises(TypeError, match="OwnAttention"):
            call()
    # a subclass that changes timm's forward is not timm's maths: refused too
    vit_attention = type(make_model("vit-qk-norm").blocks[0].attn)
    Changed = type("ChangedAttention", (vit_attention,), {"forward": lambda self, x, **kw: x})
    assert not TimmVitAttention().matches(Changed.__new__(Changed))
    with pytest.raises(TypeError, match="not a ViT|expected a ViT"):
        token_layout(nn.Linear(2, 2))


@requires_kernels
@pytest.mark.parametrize("kind", FAMILIES)
def test_statistics_match_float64_unfused_attention(kind):
    model = make_model(kind)
    images = images_for(model)
    P, has_cls, _ = token_layout(model)
    ref = float64_pass(model, images)
    with torch.no_grad():
        before = model.forward_features(images)
        with record_attention_stats(model) as rec:
            inside = model.forward_features(images[:2])
            inside = torch.cat([inside, model.forward_features(images[2:])])
        after = model.forward_features(images)
    torch.testing.assert_close(inside, before, rtol=1e-4, atol=1e-4)  # the layers' outputs are unchanged
    torch.testing.assert_close(after, before, rtol=0, atol=0)  # and the model restored
    assert not any("forward" in b.attn.__dict__ or b.attn._forward_hooks or b._forward_pre_hooks
                   for b in model.blocks)
    summary = rec.summary()
    for name in expected_columns(ref[0]["A"], P, has_cls):
        expected = torch.stack([expected_columns(r["A"], P, has_cls)[name] for r in ref]).cpu()
        assert summary[name].shape == expected.shape
        torch.testing.assert_close(summary[name], expected, rtol=1e-4, atol=1e-4, msg=f"{kind} {name}")
    if not has_cls:
        assert "cls_cls_attention" not in summary and "cls_magnitude_ratio" not in summary
    # magnitudes: ||attention layer output|| / ||block input|| (BEiT's gamma_1 is the block's, not the branch's)
    ratio = torch.stack([r["y"].norm(dim=-1) / r["res"].norm(dim=-1) for r in ref])  # [L, B, T]
    torch.testing.assert_close(summary["pos_magnitude_ratio"][:, 0], ratio[..., P:].mean((1, 2)).cpu(),
                               rtol=1e-4, atol=1e-6)
    if has_cls:
        torch.testing.assert_close(summary["cls_magnitude_ratio"][:, 0], ratio[..., 0].mean(1).cpu(),
                                   rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("kind", FAMILIES)
def test_selection_rows_match_float64_unfused_attention(kind):
    model = make_model(kind)
    images = images_for(model)
    P, has_cls, grid = token_layout(model)
    ref = float64_pass(model, images)
    with torch.no_grad():
        before = model.forward_features(images)
    for block in (0, -1):
        A = ref[block]["A"]
        for method in ["center_mean"] + (["cls_mean", "cls_min_entropy"] if has_cls else []):
            got = attention_selection(model, images, method, block=block)
            torch.testing.assert_close(got.double().cpu(), expected_selection_weights(A, method, P, grid).cpu(),
                                       rtol=1e-4, atol=1e-6, msg=f"{kind} {method} block {block}")
    # rows of several queries beside a full forward (the probe's and compare's path)
    queries = [0, P + 3, A.shape[-1] - 1]
    with torch.no_grad(), capture_attention_rows(model, queries, block=-1) as cap:
        tokens = model.forward_features(images)
    torch.testing.assert_close(tokens, before, rtol=0, atol=0)
    torch.testing.assert_close(cap.rows.double().cpu(), ref[-1]["A"][:, :, queries].cpu(), rtol=1e-4, atol=1e-6)
    assert not any(b.attn._forward_pre_hooks for b in model.blocks)


def test_heads_adapter_takes_the_module_bias_and_merge():
    # a module exposing its maths (heads / merge_heads) with a logit bias: the generic adapter
    class Biased(nn.Module):
        def __init__(self, dim=8, heads=2, tokens=5):
            super().__init__()
            self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.bias, self.num_heads = nn.Parameter(torch.randn(heads, tokens, tokens)), heads

        def heads(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            return q, k, v, self.bias, 0.3

        def merge_heads(self, out):
            return self.out(out.transpose(1, 2).flatten(2))

    attn = Biased()
    adapter = attention_adapter(attn)
    assert isinstance(adapter, HeadsAttention)
    x = torch.randn(2, 5, 8)
    h = adapter.heads(attn, x)
    A = torch.softmax(h.q @ h.k.transpose(-2, -1) * 0.3 + attn.bias, -1)
    qk = adapter.query_keys(attn, x, [4, 1])
    rows = torch.softmax(qk.q @ qk.k.transpose(-2, -1) * qk.scale + qk.bias, -1)
    torch.testing.assert_close(rows, A[:, :, [4, 1]])
    torch.testing.assert_close(adapter.finish(attn, A @ h.v, x), attn.merge_heads(A @ h.v))


def test_statistics_inputs_take_the_dtype_the_layer_would_use():
    # on CUDA under autocast timm's q/k LayerNorms give float32 beside a bf16 v: SDPA runs them in bf16
    from selagg_fast.modules import _attention_dtype
    q = torch.randn(1, 1, 3, 4)
    assert {t.dtype for t in _attention_dtype(q, q, q.bfloat16())} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in _attention_dtype(q, q, q.bfloat16())} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["beit-per-block", "capi"])
def test_probe_attention_weights_on_a_backbone_of_each_family(kind):
    # the probe's cls_attn / center_attn heads and compare read weights through AttentionWeights
    from selagg_fast.probe.selector import AttentionWeights
    model = make_model(kind)
    images = images_for(model, 2)
    P, has_cls, grid = token_layout(model)
    A = float64_pass(model, images)[-1]["A"]
    backbone = Backbone(model, kind)
    methods = ["center_mean"] + (["cls_mean", "cls_min_entropy"] if has_cls else [])
    with torch.no_grad():
        plain = backbone(images)
        tokens, weights = AttentionWeights(backbone, methods)(backbone, images)
    torch.testing.assert_close(tokens, plain, rtol=0, atol=0)
    for i, method in enumerate(methods):
        torch.testing.assert_close(weights[:, i].double().cpu(), expected_selection_weights(A, method, P, grid).cpu(),
                                   rtol=1e-4, atol=1e-6, msg=method)


@requires_kernels
@pytest.mark.parametrize("kind", ["vit-qk-norm", "beit-per-block"])
def test_statistics_under_bf16_autocast(kind):
    # analyze's GPU precision: bf16 q, k, v beside a float32 relative position bias
    model = make_model(kind)
    images = images_for(model, 2)
    with torch.no_grad(), record_attention_stats(model) as full:
        model.forward_features(images)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16), record_attention_stats(model) as half:
        model.forward_features(images)
    for name, value in full.summary().items():
        torch.testing.assert_close(half.summary()[name], value, rtol=0.05, atol=0.02, msg=name)
