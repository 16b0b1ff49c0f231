import math

import pytest
import timm
import torch

from conftest import DEVICE, FILLS, AtenOps, rel_err, requires_kernels
from selagg_fast import attention_with_stats, record_attention_stats
from selagg_fast.reference import attention_with_stats_reference

# Absolute tolerances from the issue: probabilities 1e-5 (fp32) / 5e-3 (bf16),
# entropy 1e-4 / 1e-2 nats. fp16 sits between the two.
PROB_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 2e-3}
ENT_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 4e-3}
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}

# (B, H, T, d, P): every T, d and P value the issue names appears at least once.
SHAPES = [
    (2, 2, 1, 32, 0),
    (1, 3, 2, 64, 1),
    (2, 2, 17, 80, 5),
    (1, 2, 197, 64, 1),
    (1, 2, 257, 128, 0),
    (1, 2, 261, 64, 5),
    (2, 1, 17, 32, 1),
]


def max_abs(actual, expected) -> float:
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item()


def _ids(s):
    return "B{}-H{}-T{}-d{}-P{}".format(*s)


def make_qkv(B, H, T, d, dtype, spread=2.0):
    # spread > 1 makes the softmax peaky enough that the statistics are non-trivial
    q = (torch.randn(B, H, T, d, device=DEVICE) * spread).to(dtype)
    k = torch.randn(B, H, T, d, device=DEVICE).to(dtype)
    v = torch.randn(B, H, T, d, device=DEVICE).to(dtype)
    return q, k, v


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_output_and_statistics(shape, dtype, poisoned):
    B, H, T, d, P = shape
    q, k, v = make_qkv(B, H, T, d, dtype)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=P)
    ref_out, ref = attention_with_stats_reference(q.double(), k.double(), v.double(), num_prefix_tokens=P,
                                                  compute_dtype=torch.float64)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref_out) < OUT_TOL[dtype]
    for name in ("self_attn", "prefix_attn", "cls_attn"):
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == (B, H, T)
        assert max_abs(got, getattr(ref, name)) < PROB_TOL[dtype], name
    ent_err = max_abs(stats.patch_entropy, ref.patch_entropy)
    assert ent_err < ENT_TOL[dtype]


@requires_kernels
@pytest.mark.parametrize("BN", [32, 64])
@pytest.mark.parametrize("d", [64, 80])  # head-dim mask off / on
@pytest.mark.parametrize("T", [1, 32, 33, 64, 65, 96, 197])
def test_peeled_tail_matches_reference(T, d, BN, monkeypatch, poisoned):
    # PEEL_TAIL (in the GPU autotune list): full key blocks unmasked, the tail block masked
    from selagg_fast.ops import attention as attention_ops
    base = attention_ops._launch_config
    monkeypatch.setenv("SELAGG_AUTOTUNE", "0")
    monkeypatch.setattr(attention_ops, "_launch_config",
                        lambda d, fp32=False: dict(base(d, fp32), BM=32, BN=BN, PEEL_TAIL=True))
    q, k, v = make_qkv(2, 2, T, d, torch.float32)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=1)
    ref_out, ref = attention_with_stats_reference(q.double(), k.double(), v.double(), num_prefix_tokens=1,
                                                  compute_dtype=torch.float64)
    assert rel_err(out, ref_out) < OUT_TOL[torch.float32]
    for got, exp in zip(stats, ref):
        assert max_abs(got, exp) < ENT_TOL[torch.float32]


@requires_kernels
@pytest.mark.parametrize("T", [1, 5, 17, 63, 64, 65, 96, 97, 129, 197])
def test_query_tail_rows_in_a_second_launch(T, monkeypatch, poisoned):
    # 16-bit inputs: when the last 64-row block would be at most half full, full blocks and the
    # remaining rows go to two launches (q_start); every row and statistic must still be written
    from selagg_fast.ops import attention as attention_ops
    tail_launches = []
    launch_tail = attention_ops._launch_tail_rows

    def spy(grid, device, cfg, **kwargs):
        tail_launches.append((cfg["BM"], kwargs["q_start"]))
        launch_tail(grid, device, cfg, **kwargs)

    monkeypatch.setattr(attention_ops, "_launch_tail_rows", spy)
    q, k, v = make_qkv(2, 3, T, 64, torch.bfloat16)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=1)
    ref_out, ref = attention_with_stats_reference(q.double(), k.double(), v.double(), num_prefix_tokens=1,
                                                  compute_dtype=torch.float64)
    rows = T % 64
    expected = [(max(16, 1 << (rows - 1).bit_length()), T - rows)] if 0 < rows <= 32 else []
    assert tail_launches == expected
    assert rel_err(out, ref_out) < OUT_TOL[torch.bfloat16]
    for name in ("self_attn", "prefix_attn", "cls_attn"):
        assert max_abs(getattr(stats, name), getattr(ref, name)) < PROB_TOL[torch.bfloat16], name
    assert max_abs(stats.patch_entropy, ref.patch_entropy) < ENT_TOL[torch.bfloat16]


@requires_kernels
def test_matches_sdpa_and_entropy_bounds():
    q, k, v = make_qkv(2, 4, 50, 64, torch.float32, spread=0.1)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel_err(out, sdpa) < 1e-5
    # near-uniform attention: entropy close to (and never above) log N
    assert (stats.patch_entropy <= math.log(49) + 1e-5).all()
    assert (stats.patch_entropy > math.log(49) - 0.1).all()


@requires_kernels
def test_strided_qkv_like_timm_and_custom_scale(poisoned):
    B, T, H, d = 2, 33, 3, 32
    qkv = torch.randn(B, T, 3, H, d, device=DEVICE).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    out, stats = attention_with_stats(q, k, v, scale=0.3, num_prefix_tokens=2)
    ref_out, ref = attention_with_stats_reference(q.double(), k.double(), v.double(), scale=0.3,
                                                  num_prefix_tokens=2, compute_dtype=torch.float64)
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(stats.patch_entropy, ref.patch_entropy) < 1e-5


@requires_kernels
def test_extreme_logits_stay_finite():
    # logits in the hundreds: fp32 rounding of the logits alone is ~1e-5 relative there
    q, k, v = make_qkv(1, 2, 40, 32, torch.float32, spread=30.0)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=1)
    ref_out, ref = attention_with_stats_reference(q.double(), k.double(), v.double(), num_prefix_tokens=1,
                                                  compute_dtype=torch.float64)
    for t in (out, *stats):
        assert torch.isfinite(t).all()
    assert max_abs(stats.self_attn, ref.self_attn) < 1e-4
    assert max_abs(stats.patch_entropy, ref.patch_entropy) < 1e-3


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gap", [100.0, 1000.0])
@pytest.mark.parametrize("T,P,sink", [(70, 1, 0), (97, 5, 3)], ids=["cls-sink", "register-sink"])
def test_attention_sink_keeps_the_patch_entropy_exact(T, P, sink, gap, dtype, poisoned):
    # a prefix key outscoring every patch key by `gap` nats for every other query row: the patch
    # terms underflow against the shared running max (1000 nats: all of them, l_p = 0), so those
    # tiles recompute the patch sums with the patch keys' own max; the other rows stay one-pass
    B, H, d = 2, 2, 32
    q, k, v = make_qkv(B, H, T, d, torch.float32, spread=1.0)
    scale = d ** -0.5
    rows = torch.arange(T) % 2 == 0
    q[..., 0] = rows.float()
    k[..., 0] = 0.0
    base = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale  # before the sink feature
    k[..., sink, 0] = (gap + base.amax().item() - base.amin().item()) / scale
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=P)
    ref_out, ref = attention_with_stats_reference(q.double(), k.double(), v.double(), num_prefix_tokens=P,
                                                  compute_dtype=torch.float64)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    lead = s[..., sink] - s[..., P:].amax(-1)  # [B, H, T]: the sink's lead over the best patch key
    assert lead[..., rows].min() > gap and lead[..., ~rows].max() < 30
    for t in (out, *stats):
        assert torch.isfinite(t).all()
    tol = 1e-4 if dtype == torch.float32 else 2e-3  # logits rounded alike on both sides: fp32 arithmetic only
    assert max_abs(stats.patch_entropy, ref.patch_entropy) < tol
    assert max_abs(stats.patch_entropy[..., rows], ref.patch_entropy[..., rows]) < tol
    assert (ref.patch_entropy[..., rows] > 0.5).all()  # a non-trivial entropy that a zero would miss
    for name in ("self_attn", "prefix_attn", "cls_attn"):  # fp32 rounding of logits ~gap: ~1e-7 * gap
        assert max_abs(getattr(stats, name), getattr(ref, name)) < 1e-6 * gap, name
    assert rel_err(out, ref_out) < OUT_TOL[dtype]


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,d,P", [(17, 32, 1), (70, 64, 0), (33, 80, 5)])
def test_gradients_of_out(T, d, P, dtype):
    q, k, v = (t.requires_grad_(True) for t in make_qkv(2, 2, T, d, dtype, spread=1.0))
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=P)
    assert not stats.self_attn.requires_grad
    g = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad(out.float(), (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_out, _ = attention_with_stats_reference(q64, k64, v64, num_prefix_tokens=P, compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), g.double())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, exp in zip(grads, ref_grads):
        assert got.dtype == dtype
        assert rel_err(got, exp) < tol



@requires_kernels
def test_backward_fills_no_gradients_for_the_statistics():
    # the statistics are non-differentiable: autograd must not zero-fill [B, H, T] gradients for them
    q, k, v = (t.requires_grad_(True) for t in make_qkv(2, 2, 17, 32, torch.float32, spread=1.0))
    out, _ = attention_with_stats(q, k, v)
    with AtenOps() as ops:
        out.sum().backward()
    assert not FILLS & set(ops.names), ops.names
    assert q.grad is not None and k.grad is not None and v.grad is not None

@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), {}), ValueError, "B, H, T, d"),
        (lambda: (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 5, 8), {}), ValueError, "differ"),
        (lambda: (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8).half(), torch.randn(1, 2, 5, 8), {}), TypeError,
         "dtypes"),
        (lambda: (torch.ones(1, 2, 5, 8, dtype=torch.int32),) * 3 + ({},), TypeError, "float32"),
        (lambda: (torch.randn(1, 2, 5, 8),) * 3 + ({"num_prefix_tokens": 6},), ValueError, "exceeds"),
        (lambda: (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8, device="meta"), torch.randn(1, 2, 5, 8), {}),
         ValueError, "one device"),
    ],
    ids=["rank", "shapes", "dtypes", "int", "P>T", "devices"],
)
def test_bad_input(make, exc, match):
    q, k, v, kw = make()
    with pytest.raises(exc, match=match):
        attention_with_stats(q, k, v, **kw)


def test_unsupported_head_dim_falls_back():
    q, k, v = make_qkv(1, 1, 5, 300, torch.float32)
    out, stats = attention_with_stats(q, k, v)
    ref_out, _ = attention_with_stats_reference(q, k, v)
    assert rel_err(out, ref_out) < 1e-5
    with pytest.raises(ValueError, match="do not support"):
        attention_with_stats(q, k, v, backend="triton")


def test_non_positive_scale_falls_back_to_the_reference():
    q, k, v = make_qkv(1, 2, 9, 16, torch.float32)
    for scale in (0.0, -0.5):
        out, stats = attention_with_stats(q, k, v, scale=scale)
        ref_out, ref = attention_with_stats_reference(q, k, v, scale=scale)
        assert rel_err(out, ref_out) < 1e-6 and max_abs(stats.patch_entropy, ref.patch_entropy) < 1e-6
        with pytest.raises(ValueError, match="scale"):
            attention_with_stats(q, k, v, scale=scale, backend="triton")


# ---- timm integration --------------------------------------------------------------------

MODELS = {
    "cls": dict(),
    "no-cls": dict(class_token=False, global_pool="avg"),
    "registers": dict(reg_tokens=4),
    "qk-norm": dict(qk_norm=True),
}


def tiny_vit(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=0,
                             **kw).to(DEVICE).eval()


def unfused_reference_columns(model, images):
    """The paper code's way: unfused attention, maps hooked per block, columns in float64."""
    maps = []
    hooks = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.double())))
    with torch.no_grad():
        out = model.forward_features(images)
    for h in hooks:
        h.remove()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    P = model.num_prefix_tokens
    cols = {}
    for A in maps:  # [B, H, T, T]
        diag = torch.diagonal(A, dim1=-2, dim2=-1)
        den = A[..., P:].sum(-1)
        Ahat = A[..., P:] / den[..., None]
        ent = -(Ahat * Ahat.clamp_min(1e-300).log()).sum(-1)
        c = {
            "pos_self_attention": diag[..., P:].mean(-1),
            "pos_self_attention_adj_for_cls": (diag / den)[..., P:].mean(-1),
            "pos_pos_entropy": ent[..., P:].mean(-1),
        }
        if P > 0:
            c.update(cls_cls_attention=A[..., 0, 0], cls_cls_attention_adj_for_cls=A[..., 0, 0] / den[..., 0],
                     cls_pos_attention=A[..., 0, P:].mean(-1), pos_cls_attention=A[..., P:, 0].mean(-1),
                     cls_pos_entropy=ent[..., 0])
        for name, v in c.items():
            cols.setdefault(name, []).append(v.mean(0))  # mean over images -> [H]
    return out, {k: torch.stack(v).cpu() for k, v in cols.items()}


@requires_kernels
@pytest.mark.parametrize("kind", list(MODELS))
def test_record_attention_stats_matches_unfused_pipeline(kind):
    model = tiny_vit(**MODELS[kind])
    images = torch.randn(3, 3, 64, 64, device=DEVICE)
    ref_out, ref_cols = unfused_reference_columns(model, images)
    with torch.no_grad(), record_attention_stats(model) as rec:
        out = model.forward_features(images[:2])
        out = torch.cat([out, model.forward_features(images[2:])])  # two batches accumulate
    assert rec.images == 3
    assert rel_err(out, ref_out) < 1e-4  # outputs unchanged
    summary = rec.summary()
    expected = set(ref_cols) | {"pos_magnitude_ratio"} | ({"cls_magnitude_ratio"} if model.num_prefix_tokens else set())
    assert set(summary) == expected
    if model.num_prefix_tokens == 0:
        assert "cls_cls_attention" not in summary
    for name, ref in ref_cols.items():
        assert summary[name].dtype == torch.float64 and summary[name].shape == (3, 3)
        assert (summary[name] - ref).abs().max().item() < 1e-4, name
    assert len(rec.last) == 3 and rec.last[0].self_attn.shape == (1, 3, out.shape[1])
    # the model is restored on exit
    assert "forward" not in model.blocks[0].attn.__dict__


def test_magnitude_ratio_and_restore_after_exception():
    model = tiny_vit()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    residual, branch = {}, {}
    h1 = model.blocks[1].register_forward_pre_hook(lambda m, a: residual.setdefault("x", a[0]))
    h2 = model.blocks[1].attn.register_forward_hook(lambda m, a, o: branch.setdefault("y", o))
    with torch.no_grad():
        model.forward_features(images)
    h1.remove()
    h2.remove()
    ratio = (branch["y"].double().norm(dim=-1) / residual["x"].double().norm(dim=-1))
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), record_attention_stats(model, blocks=[1]) as rec:
            model.forward_features(images)
            raise RuntimeError("boom")
    assert "forward" not in model.blocks[1].attn.__dict__ and not model.blocks[1]._forward_pre_hooks
    s = rec.summary()
    assert s["cls_cls_attention"].shape == (1, 3)
    assert abs(s["cls_magnitude_ratio"][0, 0].item() - ratio[:, 0].mean().item()) < 1e-4
    assert abs(s["pos_magnitude_ratio"][0, 0].item() - ratio[:, 1:].mean().item()) < 1e-4
