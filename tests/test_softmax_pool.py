import importlib
import math

import pytest
import torch

from conftest import DEVICE, FILLS, AtenOps, rel_err, requires_kernels
from selagg_fast import softmax_pool
from selagg_fast.reference import softmax_pool_reference

sp_ops = importlib.import_module("selagg_fast.ops.softmax_pool")  # the module (ops exports the function)

# Relative-norm tolerances against float64 (as tests/test_abmilp.py): fp32 is accumulation error;
# bf16/fp16 are dominated by rounding the output (and, on the GPU, the tensor-core operands).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

# (B, T, D, K, P): T 1 / 17 / 197, K 1 and > 1, P 0 / 1 / 5, one ViT-B-wide case at a tiny B.
SHAPES = [
    (2, 1, 16, 1, 0),
    (3, 17, 64, 1, 1),
    (2, 17, 48, 3, 5),
    (2, 197, 32, 4, 1),
    (1, 197, 768, 1, 1),
    (2, 6, 40, 17, 0),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(shape):
    return "B{}-T{}-D{}-K{}-P{}".format(*shape)


def make_inputs(B, T, D, K, P, dtype, scores_dtype=torch.float32):
    x = torch.randn(B, T, D, device=DEVICE).to(dtype)
    shape = (B, T - P) if K == 1 else (B, K, T - P)
    scores = (torch.randn(shape, device=DEVICE) * 2).to(scores_dtype)
    return scores, x


def reference64(scores, x, P):
    return softmax_pool_reference(scores.double(), x.double(), num_prefix_tokens=P, return_weights=True,
                                  compute_dtype=torch.float64)


def grads64(scores, x, P, g):
    s64, x64 = (t.detach().double().requires_grad_(True) for t in (scores, x))
    out = softmax_pool_reference(s64, x64, num_prefix_tokens=P, compute_dtype=torch.float64)
    return torch.autograd.grad(out, (s64, x64), g.double())


@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_outputs_weights_and_gradients(shape, dtype, poisoned):
    B, T, D, K, P = shape
    scores, x = make_inputs(B, T, D, K, P, dtype)
    scores.requires_grad_(True)
    x.requires_grad_(True)
    pooled, weights = softmax_pool(scores, x, num_prefix_tokens=P, return_weights=True)
    ref_pooled, ref_weights = reference64(scores, x, P)
    assert pooled.dtype == dtype and weights.dtype == torch.float32
    assert pooled.shape == ref_pooled.shape and weights.shape == scores.shape
    assert rel_err(pooled, ref_pooled) < TOL[dtype]
    assert rel_err(weights, ref_weights) < 1e-5  # exact weights from the given scores in any x dtype
    g = torch.randn(pooled.shape, device=DEVICE)
    got = torch.autograd.grad(pooled.float(), (scores, x), g)
    for name, a, e in zip(("scores", "x"), got, grads64(scores, x, P, g)):
        assert a.dtype == {"scores": scores, "x": x}[name].dtype, name
        if name == "scores" and T - P == 1:
            assert a.abs().max().item() < 1e-5  # one token: weight 1 whatever its score
        else:
            assert rel_err(a, e) < GRAD_TOL[dtype], name
    if P:
        assert torch.equal(got[1][:, :P], torch.zeros_like(got[1][:, :P]))  # prefix tokens: no gradient


@requires_kernels
def test_matches_the_written_out_definition(poisoned):
    # independent of the reference module: a_t = exp(s_t) / sum exp(s), out = sum a_t x_t
    scores, x = make_inputs(2, 11, 24, 2, 1, torch.float32)
    out = softmax_pool(scores, x, num_prefix_tokens=1)
    s, z = scores.double().cpu(), x[:, 1:].double().cpu()
    for b in range(2):
        for k in range(2):
            e = [math.exp(v) for v in s[b, k].tolist()]
            exp = sum(ei / sum(e) * z[b, t] for t, ei in enumerate(e))
            assert rel_err(out[b, k], exp) < 1e-5


@requires_kernels
@pytest.mark.parametrize("scores_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_scores_of_any_float_dtype_and_their_gradient_dtype(scores_dtype, poisoned):
    scores, x = make_inputs(2, 17, 32, 3, 1, torch.bfloat16, scores_dtype)
    scores.requires_grad_(True)
    pooled, weights = softmax_pool(scores, x, num_prefix_tokens=1, return_weights=True)
    ref_pooled, ref_weights = reference64(scores, x, 1)
    assert rel_err(pooled, ref_pooled) < TOL[torch.bfloat16] and rel_err(weights, ref_weights) < 1e-5
    g = torch.randn(pooled.shape, device=DEVICE)
    (gs,) = torch.autograd.grad(pooled.float(), (scores,), g)
    assert gs.dtype == scores_dtype
    assert rel_err(gs, grads64(scores, x, 1, g)[0]) < 3e-2


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_minus_inf_scores_mask_tokens(K, poisoned):
    # -inf = masked token: weight 0, zero score gradient, the same pool as without the token;
    # a whole leading tile of masked tokens (the online max starting at -inf) is no problem
    scores, x = make_inputs(3, 40, 32, K, 1, torch.float32)
    s = scores.view(3, K, 39).clone()
    s[:, :, :20] = float("-inf")
    s[1, :, 25] = float("-inf")
    s = s.view(scores.shape).requires_grad_(True)
    x.requires_grad_(True)
    pooled, weights = softmax_pool(s, x, num_prefix_tokens=1, return_weights=True)
    w = weights.view(3, K, 39)
    assert torch.equal(w[:, :, :20], torch.zeros_like(w[:, :, :20])) and (w[1, :, 25] == 0).all()
    ref_pooled, ref_weights = reference64(s.detach(), x.detach(), 1)
    assert rel_err(pooled, ref_pooled) < 1e-5 and rel_err(weights, ref_weights) < 1e-5
    # dropping the masked tokens of image 0 gives the same pool
    kept = softmax_pool(s.detach().view(3, K, 39)[:1, :, 20:].reshape(1, *s.shape[1:-1], 19), x.detach()[:1, 21:])
    assert rel_err(pooled[:1], kept) < 1e-5
    g = torch.randn(pooled.shape, device=DEVICE)
    gs, gx = torch.autograd.grad(pooled, (s, x), g)
    rs, rx = grads64(s, x, 1, g)
    assert torch.isfinite(gs).all() and (gs.view(3, K, 39)[:, :, :20] == 0).all()
    assert rel_err(gs, rs) < 1e-4 and rel_err(gx, rx) < 1e-4


@requires_kernels
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's numpy: log(0), inf - inf
def test_a_row_of_only_minus_inf_is_nan_in_that_row_only(poisoned):
    # documented choice: no error (checking would need a device sync), NaN as torch.softmax gives
    scores, x = make_inputs(3, 12, 16, 2, 0, torch.float32)
    scores[1, 0] = float("-inf")
    scores.requires_grad_(True)
    pooled, weights = softmax_pool(scores, x, return_weights=True)
    assert torch.isnan(pooled[1, 0]).all() and torch.isnan(weights[1, 0]).all()
    assert torch.isnan(softmax_pool_reference(scores.detach(), x)[1, 0]).all()  # the reference agrees
    finite = [(0, 0), (0, 1), (1, 1), (2, 0), (2, 1)]
    ref_pooled, _ = reference64(scores.detach(), x, 0)
    for b, k in finite:
        assert rel_err(pooled[b, k], ref_pooled[b, k]) < 1e-5
    (gs,) = torch.autograd.grad(pooled[[0, 2]].sum(), (scores,))
    assert torch.isfinite(gs[[0, 2]]).all()


@requires_kernels
def test_nan_stays_in_its_image_and_huge_scores_do_not_overflow(poisoned):
    scores, x = make_inputs(3, 20, 16, 2, 0, torch.float32)
    scores = scores * 1e4
    x[1, 5, 3] = float("nan")
    scores[2, 1, 7] = float("nan")
    pooled = softmax_pool(scores, x)
    assert torch.isnan(pooled[1]).any() and torch.isnan(pooled[2, 1]).all()
    ref = reference64(scores, x, 0)[0]
    assert rel_err(pooled[0], ref[0]) < 1e-5 and rel_err(pooled[2, 0], ref[2, 0]) < 1e-5


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_frozen_tokens_and_frozen_scores(K, poisoned):
    scores, x = make_inputs(2, 30, 32, K, 1, torch.bfloat16)
    g = torch.randn((2, 32) if K == 1 else (2, K, 32), device=DEVICE)
    rs, rx = grads64(scores, x, 1, g)
    s1 = scores.clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(softmax_pool(s1, x, num_prefix_tokens=1).float(), (s1,), g)
    assert rel_err(gs, rs) < GRAD_TOL[torch.bfloat16]
    x1 = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(softmax_pool(scores, x1, num_prefix_tokens=1).float(), (x1,), g)
    assert rel_err(gx, rx) < GRAD_TOL[torch.bfloat16]


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_strided_tokens_read_in_place_and_no_grad_path(K, poisoned):
    base = torch.randn(4, 40, 2, 48, device=DEVICE)
    x = base[:, 1:35, 0, :]
    assert not x.is_contiguous() and x.stride(-1) == 1
    scores, _ = make_inputs(4, 34, 48, K, 2, torch.float32)
    with torch.no_grad():
        pooled, weights = softmax_pool(scores, x, num_prefix_tokens=2, return_weights=True)
    ref_pooled, ref_weights = reference64(scores, x, 2)
    assert rel_err(pooled, ref_pooled) < 1e-5 and rel_err(weights, ref_weights) < 1e-5
    xt = torch.randn(2, 48, 9, device=DEVICE).transpose(1, 2)  # last stride 9: copied
    st, _ = make_inputs(2, 9, 48, K, 0, torch.float32)
    assert rel_err(softmax_pool(st, xt), reference64(st, xt, 0)[0]) < 1e-5


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_backward_is_one_kernel_without_fills(K):
    scores, x = make_inputs(2, 12, 32, K, 1, torch.bfloat16)
    scores.requires_grad_(True)
    softmax_pool(scores, x, num_prefix_tokens=1).sum().backward()  # on a GPU, the first calls tune
    out = softmax_pool(scores, x, num_prefix_tokens=1)
    with AtenOps() as ops:
        out.backward(torch.ones_like(out))
    assert not FILLS & set(ops.names), ops.names


def test_empty_batch_and_reference_backend():
    scores, x = make_inputs(0, 12, 20, 3, 2, torch.float32)
    pooled, weights = softmax_pool(scores, x, num_prefix_tokens=2, return_weights=True)
    assert pooled.shape == (0, 3, 20) and weights.shape == (0, 3, 10)
    scores, x = make_inputs(2, 12, 20, 1, 1, torch.float32)
    pooled = softmax_pool(scores, x, num_prefix_tokens=1, backend="reference")
    a = torch.softmax(scores.double(), dim=1)
    assert rel_err(pooled, (a.unsqueeze(-1) * x[:, 1:].double()).sum(1)) < 1e-6


def test_unsupported_k_falls_back_or_raises():
    scores, x = make_inputs(1, 5, 8, 65, 0, torch.float32)
    with pytest.raises(ValueError, match="K=65"):
        softmax_pool(scores, x, backend="triton")
    assert rel_err(softmax_pool(scores, x), reference64(scores, x, 0)[0]) < 1e-5


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(2, 4), torch.randn(2, 5), {}), ValueError, "B, T, D"),
        (lambda: (torch.randn(2, 1, 1, 4), torch.randn(2, 4, 3), {}), ValueError, r"\[B, N\] or \[B, K, N\]"),
        (lambda: (torch.randn(3, 4), torch.randn(2, 4, 3), {}), ValueError, "B=3"),
        (lambda: (torch.randn(2, 4), torch.randn(2, 4, 3), {"num_prefix_tokens": 1}), ValueError, "N=4"),
        (lambda: (torch.randn(2, 0, 4), torch.randn(2, 4, 3), {}), ValueError, "K=0"),
        (lambda: (torch.randn(2, 4), torch.randn(2, 4, 3), {"num_prefix_tokens": 4}), ValueError, "no tokens"),
        (lambda: (torch.randn(2, 4), torch.randn(2, 4, 3), {"num_prefix_tokens": -1}), ValueError, "non-negative"),
        (lambda: (torch.ones(2, 4, dtype=torch.int64), torch.randn(2, 4, 3), {}), TypeError, "scores"),
        (lambda: (torch.randn(2, 4), torch.ones(2, 4, 3, dtype=torch.int32), {}), TypeError, "x must be"),
        (lambda: (torch.randn(2, 4), torch.randn(2, 4, 3), {"backend": "cuda"}), ValueError, "backend"),
        (lambda: (torch.randn(2, 4, device="meta"), torch.randn(2, 4, 3), {}), ValueError, "one device"),
    ],
    ids=["x-rank", "scores-rank", "batch", "tokens", "K0", "no-tokens", "negative-P", "int-scores", "int-x",
         "bad-backend", "devices"],
)
def test_bad_input(make, exc, match):
    scores, x, kw = make()
    with pytest.raises(exc, match=match):
        softmax_pool(scores, x, **kw)


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_every_autotune_config_is_correct(K, monkeypatch, poisoned):
    # the GPU tunes over these configs; here each one is launched as the default, in both passes
    monkeypatch.setenv("SELAGG_AUTOTUNE", "0")  # on a GPU too: launch the patched default, no tuning
    B, T, D, P = 2, 21, 40, 1
    scores, x = make_inputs(B, T, D, K, P, torch.float32)
    scores.requires_grad_(True), x.requires_grad_(True)
    g = torch.randn((B, D) if K == 1 else (B, K, D), device=DEVICE)
    ref_pooled, _ = reference64(scores.detach(), x.detach(), P)
    rs, rx = grads64(scores, x, P, g)
    base = sp_ops._launch_config
    for cfg in sp_ops._fwd_configs(D, K, False) + sp_ops._bwd_configs(D, K, False):
        monkeypatch.setattr(sp_ops, "_launch_config", lambda D_, K_, fp32=False, c=cfg: dict(base(D_, K_, fp32), **c))
        pooled = softmax_pool(scores, x, num_prefix_tokens=P)
        assert rel_err(pooled, ref_pooled) < 1e-5, cfg
        gs, gx = torch.autograd.grad(pooled, (scores, x), g)
        assert rel_err(gs, rs) < 1e-4 and rel_err(gx, rx) < 1e-4, cfg
