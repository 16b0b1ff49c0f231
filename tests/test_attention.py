import math

import pytest
import timm
import torch

from conftest import DEVICE, FILLS, AtenOps, rel_err, requires_kernels
from selagg_fast import attention_with_stats, record_attention_stats
from selagg_fast.reference import attention_with_stats_reference

# Absolute tolerances: probabilities 1e-5 (fp32) / 5e-3 (bf16),
# entropy 1e-4 / 1e-2 nats. fp16 sits between the two.
PROB_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 2e-3}
ENT_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 4e-3}
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}

# (B, H, T, d, P): every T, d and P value of the target shapes appears at least once.
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
    # the set-up itself: the sink leads by about `gap` (16-bit k rounds its logit by tenths of a nat)
    assert lead[..., rows].min() > 0.99 * gap and lead[..., ~rows].max() < 30
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
        (lambda: (*make_qkv(2, 3, 5, 8, torch.float32), {"bias": torch.randn(3, 5, 6)}), ValueError,
         r"bias must be \[H, T, T\] = \[3, 5, 5\].*\(3, 5, 6\)"),
        (lambda: (*make_qkv(2, 3, 5, 8, torch.float32), {"bias": torch.randn(2, 3, 5, 5)}), ValueError,
         "one per head"),
        (lambda: (*make_qkv(2, 3, 5, 8, torch.float32), {"bias": torch.zeros(3, 5, 5, dtype=torch.int64)}),
         TypeError, "bias must be float32"),
        (lambda: (*make_qkv(2, 3, 5, 8, torch.float32), {"bias": torch.zeros(3, 5, 5, device="meta")}),
         ValueError, "one device"),
    ],
    ids=["rank", "shapes", "dtypes", "int", "P>T", "devices", "bias-shape", "bias-per-image", "bias-int",
         "bias-device"],
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


# ---- logit bias (BEiT's relative position bias) ------------------------------------------


def biased_attention_float64(q, k, v, bias, scale, P):
    """out and the four statistics of softmax(q k^T * scale + bias[h]), written out in float64."""
    s = torch.einsum("bhid,bhjd->bhij", q.double().cpu(), k.double().cpu()) * scale + bias.double().cpu()
    a = torch.softmax(s, dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", a, v.double().cpu())
    log_p = torch.log_softmax(s[..., P:], dim=-1)  # the patch keys renormalised (all keys when P = 0)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return out, dict(self_attn=torch.diagonal(a, dim1=-2, dim2=-1), prefix_attn=a[..., :P].sum(-1),
                     patch_entropy=entropy, cls_attn=a[..., 0])


def make_bias(H, T, dtype, spread=2.0):
    # per head and asymmetric (bias[h, i, j] != bias[h, j, i]): a transposed or per-image read fails
    return (torch.randn(H, T, T, device=DEVICE) * spread).to(dtype)


def assert_matches_biased(out, stats, ref_out, ref, dtype):
    assert rel_err(out, ref_out) < OUT_TOL[dtype]
    for name in ("self_attn", "prefix_attn", "cls_attn"):
        got = getattr(stats, name)
        assert got.dtype == torch.float32
        assert max_abs(got, ref[name]) < PROB_TOL[dtype], name
    assert max_abs(stats.patch_entropy, ref["patch_entropy"]) < ENT_TOL[dtype]


# (T, d, P, q/k/v dtype, bias dtype): T = 1, 17, 65 (one key past a block), 197 (ViT-B: 16-bit
# inputs take the query-tail launch), P in {0, 1, 5}, float32 inputs on their own tile config
BIAS_CASES = [
    (1, 32, 0, torch.float32, torch.float32),
    (17, 32, 1, torch.bfloat16, torch.bfloat16),
    (65, 64, 5, torch.float32, torch.bfloat16),
    (65, 64, 0, torch.bfloat16, torch.float16),
    (197, 64, 1, torch.bfloat16, torch.float32),
    (33, 32, 5, torch.float32, torch.float32),
]


@requires_kernels
@pytest.mark.parametrize("T,d,P,dtype,bias_dtype", BIAS_CASES,
                         ids=[f"T{c[0]}-d{c[1]}-P{c[2]}-{str(c[3])[6:]}-bias_{str(c[4])[6:]}" for c in BIAS_CASES])
def test_logit_bias_output_and_statistics(T, d, P, dtype, bias_dtype, poisoned):
    B, H = 2, 3
    q, k, v = make_qkv(B, H, T, d, dtype, spread=1.0)
    bias = make_bias(H, T, bias_dtype)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=P, bias=bias, backend="triton")
    ref_out, ref = biased_attention_float64(q, k, v, bias, d ** -0.5, P)
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches_biased(out, stats, ref_out, ref, dtype)
    # the bias matters here: the unbiased statistics are far from the biased ones
    _, plain = biased_attention_float64(q, k, v, torch.zeros(H, T, T), d ** -0.5, P)
    if T > 1:
        assert max_abs(plain["patch_entropy"], ref["patch_entropy"]) > 10 * ENT_TOL[dtype]


@requires_kernels
@pytest.mark.parametrize("T", [64, 65])
def test_logit_bias_with_the_peeled_tail(T, monkeypatch, poisoned):
    # PEEL_TAIL: unmasked full key blocks read unmasked bias tiles, the tail block a masked one
    from selagg_fast.ops import attention as attention_ops
    base = attention_ops._launch_config
    monkeypatch.setenv("SELAGG_AUTOTUNE", "0")
    monkeypatch.setattr(attention_ops, "_launch_config",
                        lambda d, fp32=False: dict(base(d, fp32), BM=32, BN=32, PEEL_TAIL=True))
    q, k, v = make_qkv(1, 2, T, 64, torch.float32, spread=1.0)
    bias = make_bias(2, T, torch.float32)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=1, bias=bias)
    ref_out, ref = biased_attention_float64(q, k, v, bias, 64 ** -0.5, 1)
    assert_matches_biased(out, stats, ref_out, ref, torch.float32)


@requires_kernels
@pytest.mark.parametrize("dtype,gap", [(torch.float32, 1000.0), (torch.bfloat16, 150.0)], ids=["fp32", "bf16"])
def test_logit_bias_sink_keeps_the_patch_entropy_exact(dtype, gap, poisoned):
    # the bias makes a prefix key (a register, P = 5) outscore every patch key by `gap` nats for
    # every other query row: those tiles take the sink pass, which must add the bias too
    B, H, T, d, P, sink = 2, 2, 70, 32, 5, 3
    q, k, v = make_qkv(B, H, T, d, dtype, spread=1.0)
    bias = make_bias(H, T + 3, torch.float32)[:, 2:T + 2, 1:T + 1]  # a strided view is read in place
    assert bias.shape == (H, T, T) and not bias.is_contiguous()
    rows = torch.arange(T, device=DEVICE) % 2 == 0
    bias[:, rows, sink] += gap
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=P, bias=bias, backend="triton")
    ref_out, ref = biased_attention_float64(q, k, v, bias, d ** -0.5, P)
    for t in (out, *stats):
        assert torch.isfinite(t).all()
    rows = rows.cpu()
    assert (ref["patch_entropy"][..., rows] > 0.5).all()  # a non-trivial entropy that a zero would miss
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert max_abs(stats.patch_entropy, ref["patch_entropy"]) < tol
    for name in ("self_attn", "prefix_attn", "cls_attn"):  # fp32 rounding of logits ~gap
        assert max_abs(getattr(stats, name), ref[name]) < 1e-6 * gap, name
    assert rel_err(out, ref_out) < OUT_TOL[dtype]


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logit_bias_gradients(dtype):
    # out's gradients w.r.t. q, k, v and the bias (which requires one here) against float64 autograd
    B, H, T, d, P = 2, 3, 17, 32, 1
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, T, d, dtype, spread=1.0))
    bias = make_bias(H, T, torch.float32).requires_grad_(True)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=P, bias=bias)
    assert not stats.patch_entropy.requires_grad
    g = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad(out.float(), (q, k, v, bias), g)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
    ref_out, _ = biased_attention_float64(*leaves, d ** -0.5, P)
    ref_grads = torch.autograd.grad(ref_out, leaves, g.double().cpu())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, exp, like in zip(grads, ref_grads, (q, k, v, bias)):
        assert got.dtype == like.dtype and got.shape == like.shape
        assert rel_err(got, exp) < tol
    # a bias that requires no gradient gets none, and q, k, v still do
    out, _ = attention_with_stats(q, k, v, num_prefix_tokens=P, bias=bias.detach())
    assert rel_err(torch.autograd.grad(out.float(), q, g)[0], ref_grads[0]) < tol


def test_logit_bias_reference_matches_the_explicit_softmax():
    q, k, v = make_qkv(2, 3, 11, 16, torch.float32)
    bias = make_bias(3, 11, torch.bfloat16)
    out, stats = attention_with_stats(q, k, v, num_prefix_tokens=2, bias=bias, backend="reference")
    ref_out, ref = biased_attention_float64(q, k, v, bias, 0.25, 2)
    assert_matches_biased(out, stats, ref_out, ref, torch.float32)


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
