import logging

import pytest
import torch

from conftest import DEVICE, FILLS, AtenOps, rel_err, requires_kernels
from selagg_fast import SelectiveAggregation, abmilp_pool
from selagg_fast.ops import _dispatch
from selagg_fast.ops import abmilp as abmilp_ops
from selagg_fast.reference import abmilp_pool_reference

# Relative-norm tolerances against float64: fp32 is accumulation error only; bf16/fp16
# are dominated by rounding the pooled output (and, on the GPU, the tensor-core operands).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

# (B, T, D, K, P): every T, D, K, B and P value of the target shapes appears at least once.
SHAPES = [
    (1, 2, 1, 1, 0),
    (5, 17, 64, 1, 1),
    (5, 17, 100, 3, 5),
    (1, 197, 768, 1, 1),
    (5, 197, 768, 16, 1),
    (1, 257, 1280, 1, 5),
    (5, 257, 64, 3, 0),
    (1, 577, 100, 16, 1),
    (5, 2, 100, 16, 1),
    (2, 33, 1280, 4, 1),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ids(shape):
    return "B{}-T{}-D{}-K{}-P{}".format(*shape)


def make_inputs(B, T, D, K, dtype, bias=True):
    x = torch.randn(B, T, D, device=DEVICE).to(dtype)
    w_shape = (D,) if K == 1 else (K, D)
    w = (torch.randn(w_shape, device=DEVICE) * D ** -0.5 * 2)
    b = (torch.randn(() if K == 1 else (K,), device=DEVICE)) if bias else None
    return x, w, b


def reference64(x, w, b, P):
    return abmilp_pool_reference(x.double(), w.double(), None if b is None else b.double(),
                                 num_prefix_tokens=P, return_weights=True, compute_dtype=torch.float64)


@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_forward_and_weights(shape, dtype, poisoned):
    B, T, D, K, P = shape
    x, w, b = make_inputs(B, T, D, K, dtype)
    pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=P, return_weights=True, backend="auto")
    ref_pooled, ref_weights = reference64(x, w, b, P)
    assert pooled.dtype == dtype and weights.dtype == torch.float32
    assert rel_err(pooled, ref_pooled) < TOL[dtype]
    assert rel_err(weights, ref_weights) < max(TOL[dtype], 1e-5) * 2
    assert torch.allclose(weights.sum(-1).double().cpu(), torch.ones(1, dtype=torch.float64), atol=1e-5)


@requires_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_gradients(shape, dtype, poisoned):
    B, T, D, K, P = shape
    x, w, b = make_inputs(B, T, D, K, dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    out = abmilp_pool(x, w, b, num_prefix_tokens=P)
    g = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad(out.float(), (x, w, b), g)

    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = abmilp_pool_reference(x64, w64, b64, num_prefix_tokens=P, compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (x64, w64, b64), g.double())
    for name, got, exp in zip(("x", "weight", "bias"), grads, ref_grads):
        assert got.dtype == {"x": x, "weight": w, "bias": b}[name].dtype
        if name == "weight" and T - P == 1:
            # one pooled token: the weight gradient is zero, the kernel's is fp32 rounding noise
            assert got.double().abs().max().item() < 1e-4
        elif name == "bias":
            # dL/db = sum_t dL/ds_t is zero analytically (softmax is shift invariant per branch):
            # the kernels return exact zeros, and the float64 reference agrees to rounding
            assert torch.equal(got, torch.zeros_like(got)), got
            assert exp.abs().max().item() < 1e-9
        else:
            assert rel_err(got, exp) < GRAD_TOL[dtype], name


@requires_kernels
@pytest.mark.parametrize("K", [1, 4])
def test_frozen_tokens_get_no_grad_and_weight_grad_is_right(K, poisoned, monkeypatch):
    # the probe's case: frozen tokens, trained scorer. The backward must not compute (or allocate) dx.
    calls, bwd = [], abmilp_ops.abmilp_bwd

    def spy(*args, **kwargs):
        calls.append(kwargs["need_dx"])
        return bwd(*args, **kwargs)

    monkeypatch.setattr(abmilp_ops, "abmilp_bwd", spy)
    x, w, b = make_inputs(3, 33, 64, K, torch.bfloat16)
    w.requires_grad_(True)
    out = abmilp_pool(x, w, b, num_prefix_tokens=1)
    out.float().pow(2).sum().backward()
    assert calls == [False] and x.grad is None
    w64 = w.detach().double().requires_grad_(True)
    ref = abmilp_pool_reference(x.double(), w64, b.double(), num_prefix_tokens=1, compute_dtype=torch.float64)
    (gw_ref,) = torch.autograd.grad(ref.pow(2).sum(), (w64,))
    assert rel_err(w.grad, gw_ref) < GRAD_TOL[torch.bfloat16]



@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_head_backward_is_one_kernel_and_one_reduction(K):
    # A probe step's pooling backward: the kernel plus one reduction of the programs' dw/db
    # partials. No zero-filled tensors (autograd materialising gradients for lse/scores, or
    # indexing the K = 1 output/parameters), which cost a GPU launch each.
    head = SelectiveAggregation(64, branches=K, num_prefix_tokens=1).to(DEVICE)
    x = torch.randn(3, 12, 64, device=DEVICE, dtype=torch.bfloat16)
    grad = torch.randn(3, 64, device=DEVICE) if K == 1 else torch.randn(3, K, 64, device=DEVICE)
    head(x).backward(grad.bfloat16())  # on a GPU, the first calls tune
    head.zero_grad(set_to_none=True)
    out = head(x)
    with AtenOps() as ops:
        out.backward(grad.bfloat16())
    assert not FILLS & set(ops.names), ops.names
    assert ops.names.count("sum") == 1, ops.names
    w64, b64 = (p.detach().double().requires_grad_(True) for p in (head.weight, head.bias))
    ref = abmilp_pool_reference(x.double(), w64 if K > 1 else w64[0], b64 if K > 1 else b64[0],
                                num_prefix_tokens=1, compute_dtype=torch.float64)
    ref.backward(grad.bfloat16().double())
    assert head.weight.grad.shape == head.weight.shape and head.weight.grad.is_contiguous()
    assert rel_err(head.weight.grad, w64.grad) < GRAD_TOL[torch.bfloat16]
    assert torch.equal(head.bias.grad, torch.zeros_like(head.bias.grad))  # zero analytically


@requires_kernels
@pytest.mark.parametrize("programs_per_sm", [4, 8])
def test_single_branch_backward_partials_of_every_walker(programs_per_sm, poisoned, monkeypatch):
    # The K = 1 backward's image walkers (a launcher setting) each write one row of NaN-poisoned
    # partials (dw, and zeros for db): every row must be written, whatever the grid.
    monkeypatch.setattr(abmilp_ops, "SINGLE_BWD_PROGRAMS_PER_SM", programs_per_sm)
    x, w, b = make_inputs(11, 20, 48, 1, torch.float32)
    w.requires_grad_(True), b.requires_grad_(True)
    gw, gb = torch.autograd.grad(abmilp_pool(x, w, b, num_prefix_tokens=1).pow(2).sum(), (w, b))
    w64, b64 = (t.detach().double().requires_grad_(True) for t in (w, b))
    ref = abmilp_pool_reference(x.double(), w64, b64, num_prefix_tokens=1, compute_dtype=torch.float64)
    ref_gw, ref_gb = torch.autograd.grad(ref.pow(2).sum(), (w64, b64))
    assert rel_err(gw, ref_gw) < GRAD_TOL[torch.float32]
    assert gb.item() == 0.0 and abs(ref_gb.item()) < 1e-9


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_strided_tokens_read_in_place(K, poisoned):
    base = torch.randn(4, 40, 2, 96, device=DEVICE)
    x = base[:, 1:35, 0, :]  # batch and token strides differ from a contiguous tensor
    assert not x.is_contiguous() and x.stride(-1) == 1
    _, w, b = make_inputs(4, 34, 96, K, torch.float32)
    pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=2, return_weights=True)
    ref_pooled, ref_weights = reference64(x, w, b, 2)
    assert rel_err(pooled, ref_pooled) < 1e-5
    assert rel_err(weights, ref_weights) < 1e-5


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_no_grad_calls_skip_autograd_and_agree_with_grad_calls(K, poisoned):
    x, w, b = make_inputs(3, 33, 64, K, torch.bfloat16)
    w.requires_grad_(True)
    with torch.no_grad():  # takes the launcher directly, without the autograd Function
        pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=1, return_weights=True)
    assert pooled.grad_fn is None and not pooled.requires_grad
    pooled_g, weights_g = abmilp_pool(x, w, b, num_prefix_tokens=1, return_weights=True)
    assert pooled_g.requires_grad
    # the same kernel either way (the grad call also stores float32 copies): at most a bf16 rounding apart
    assert torch.allclose(pooled.float(), pooled_g.detach().float(), rtol=8e-3, atol=1e-6)
    assert rel_err(weights, weights_g) < 1e-6
    exp, exp_weights = reference64(x, w.detach(), b, 1)
    assert rel_err(pooled, exp) < TOL[torch.bfloat16] and rel_err(weights, exp_weights) < 2 * TOL[torch.bfloat16]


@requires_kernels
def test_non_unit_last_stride_is_copied_and_correct():
    x = torch.randn(2, 9, 32, device=DEVICE).transpose(1, 2)  # [2, 32, 9], last stride 32
    _, w, b = make_inputs(2, 32, 9, 1, torch.float32)
    assert rel_err(abmilp_pool(x, w, b), reference64(x, w, b, 0)[0]) < 1e-5


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_huge_scores_do_not_overflow_and_nan_stays_in_its_image(K):
    x, w, b = make_inputs(3, 20, 16, K, torch.float32)
    x = x * 1e3  # scores of magnitude ~1e4
    w = w * 10
    x[1, 5, 3] = float("nan")
    pooled, weights = abmilp_pool(x, w, b, return_weights=True)
    assert torch.isnan(pooled[1]).all()
    clean = [0, 2]
    assert torch.isfinite(pooled[clean]).all() and torch.isfinite(weights[clean]).all()
    ref_pooled, ref_weights = reference64(x[clean], w, b, 0)
    assert rel_err(pooled[clean], ref_pooled) < 1e-5
    assert rel_err(weights[clean], ref_weights) < 1e-5


@requires_kernels
def test_multi_branch_equals_single_branches():
    x, w, b = make_inputs(2, 30, 48, 3, torch.float32)
    together = abmilp_pool(x, w, b, num_prefix_tokens=1)
    for k in range(3):
        alone = abmilp_pool(x, w[k], b[k], num_prefix_tokens=1)
        assert rel_err(together[:, k], alone) < 1e-5


@requires_kernels
def test_scalar_bias_serves_every_branch():
    # a scalar bias is each branch's (the Triton launch took it as [K] and crashed). A bias shifts
    # every token's score of a branch alike, so the softmax over tokens hides it: the output equals
    # the float64 pooling, and the bias's gradient, summed over the branches, is zero
    x, w, _ = make_inputs(2, 12, 20, 3, torch.float32)
    b = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    w.requires_grad_(True)
    out = abmilp_pool(x, w, b, num_prefix_tokens=1)
    ref, _ = reference64(x, w.detach(), b.detach().double().expand(3), 1)
    assert rel_err(out, ref) < 1e-5
    gw, gb = torch.autograd.grad(out.square().sum(), (w, b))
    assert gb.shape == () and abs(float(gb)) < 1e-4  # softmax over tokens: a constant shift has no gradient
    w64 = w.detach().double().requires_grad_(True)
    ref_gw, = torch.autograd.grad(reference64(x, w64, None, 1)[0].square().sum(), w64)
    assert rel_err(gw, ref_gw) < 1e-4


@requires_kernels
def test_no_bias():
    x, w, _ = make_inputs(2, 12, 20, 2, torch.float32)
    assert rel_err(abmilp_pool(x, w, None), reference64(x, w, None, 0)[0]) < 1e-5


def test_empty_batch():
    x, w, b = make_inputs(0, 12, 20, 3, torch.float32)
    pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=2, return_weights=True)
    assert pooled.shape == (0, 3, 20) and weights.shape == (0, 3, 10)


def test_reference_backend_matches_definition():
    x, w, b = make_inputs(2, 12, 20, 1, torch.float32)
    pooled = abmilp_pool(x, w, b, num_prefix_tokens=1, backend="reference")
    a = torch.softmax(x[:, 1:].double() @ w.double() + b.double(), dim=1)
    assert rel_err(pooled, (a.unsqueeze(-1) * x[:, 1:].double()).sum(1)) < 1e-6


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: (torch.randn(2, 5), torch.randn(5), None, {}), ValueError, "B, T, D"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(3), None, {}), ValueError, "D=3"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(2, 2, 4), None, {}), ValueError, "weight must be"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(0, 4), None, {}), ValueError, "K=0"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(4), None, {"num_prefix_tokens": 5}), ValueError, "no tokens"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(4), None, {"num_prefix_tokens": -1}), ValueError, "non-negative"),
        (lambda: (torch.ones(2, 5, 4, dtype=torch.int64), torch.randn(4), None, {}), TypeError, "float32"),
        (lambda: (torch.randn(2, 5, 4), torch.ones(4, dtype=torch.int32), None, {}), TypeError, "weight"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(3, 4), torch.randn(2), {}), ValueError, "bias"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(4), None, {"backend": "cuda"}), ValueError, "backend"),
        (lambda: (torch.randn(2, 5, 4, device="meta"), torch.randn(4), None, {}), ValueError, "one device"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(4), None, {"standardize": 1}), TypeError, "standardize"),
        (lambda: (torch.randn(2, 5, 4), torch.randn(4), None, {"standardize": True, "eps": -1.0}), ValueError, "eps"),
    ],
    ids=["rank", "mismatched-D", "weight-rank", "K0", "no-tokens", "negative-P", "int-x", "int-weight",
         "bias-shape", "bad-backend", "devices", "standardize-int", "negative-eps"],
)
def test_bad_input(make, exc, match):
    x, w, b, kw = make()
    with pytest.raises(exc, match=match):
        abmilp_pool(x, w, b, **kw)


def test_forced_triton_on_unsupported_case_raises():
    x = torch.randn(1, 4, 20000)
    with pytest.raises(ValueError, match="do not support"):
        abmilp_pool(x, torch.randn(20000), backend="triton")
    with pytest.raises(ValueError, match="exceed 64"):
        abmilp_pool(torch.randn(1, 4, 256), torch.randn(65, 256), backend="triton")


def test_unsupported_case_falls_back_and_says_why_once(caplog):
    x = torch.randn(1, 4, 20000)
    w = torch.randn(20000) * 0.01
    _dispatch._warn_once.cache_clear()  # once per reason for the whole process: start from none
    with caplog.at_level(logging.WARNING, logger="selagg_fast"):
        first = abmilp_pool(x, w)
        abmilp_pool(x, w)
    reasons = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(reasons) == 1 and "D=20000 exceeds 8192" in reasons[0], reasons
    assert rel_err(first, reference64(x, w, None, 0)[0]) < 1e-5


# ---- the module ---------------------------------------------------------------------------

def test_module_init_repr_and_forward():
    head = SelectiveAggregation(64, branches=1, num_prefix_tokens=1).to(DEVICE)
    ref = torch.nn.Linear(64, 1)
    assert head.weight.shape == ref.weight.shape and head.bias.shape == ref.bias.shape
    assert head.weight.abs().max() <= 64 ** -0.5 + 1e-6  # nn.Linear's uniform bound
    assert "dim=64, branches=1, num_prefix_tokens=1" in repr(head)
    x = torch.randn(3, 10, 64, device=DEVICE)
    out = head(x)
    assert out.shape == (3, 64)
    exp = reference64(x, head.weight.detach()[0], head.bias.detach()[0], 1)[0]
    assert rel_err(out, exp) < 1e-5
    assert SelectiveAggregation(64, branches=4).to(DEVICE)(x).shape == (3, 4, 64)


def test_module_loads_reference_head_state_dict():
    d = 32
    state = {
        "attention_predictor.0.weight": torch.randn(1, d),
        "attention_predictor.0.bias": torch.randn(1),
        "pos_embed": torch.zeros(1, 197, d),
    }
    head = SelectiveAggregation(d)
    head.load_state_dict(state)
    assert torch.equal(head.weight, state["attention_predictor.0.weight"])
    assert torch.equal(head.bias, state["attention_predictor.0.bias"])


@pytest.fixture
def launch_with(monkeypatch):
    """Make every untuned launch of the K = 1 or split kernels use the default config updated
    with ``single`` / ``split`` (a function of the default returning the update)."""
    def patch(single=None, split=None):
        monkeypatch.setenv("SELAGG_AUTOTUNE", "0")
        if single is not None:
            base_single = abmilp_ops.single_config
            monkeypatch.setattr(abmilp_ops, "single_config", lambda D: dict(base_single(D), **single(base_single(D))))
        if split is not None:
            base_split = abmilp_ops.split_config
            monkeypatch.setattr(abmilp_ops, "split_config",
                                lambda D, K, *, fp32: dict(base_split(D, K, fp32=fp32),
                                                           **split(base_split(D, K, fp32=fp32), D)))
    return patch


def _whole(cfg, D):  # the whole-image split config: one program an image, BC >= D
    return dict(BC=max(16, abmilp_ops.next_pow2(D)), num_warps=8, WHOLE=True)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 1, 1, 0), (3, 17, 100, 1, 1), (2, 197, 768, 1, 1), (1, 257, 1280, 1, 5)],
                         ids=_ids)
def test_prefetching_single_branch_forward(shape, dtype, launch_with, poisoned):
    # PREFETCH (next tile loaded before this one's math) is one of the GPU autotune configs
    launch_with(single=lambda cfg: dict(PREFETCH=True))
    B, T, D, K, P = shape
    x, w, b = make_inputs(B, T, D, K, dtype)
    pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=P, return_weights=True)
    ref_pooled, ref_weights = reference64(x, w, b, P)
    assert rel_err(pooled, ref_pooled) < TOL[dtype]
    assert rel_err(weights, ref_weights) < max(TOL[dtype], 1e-5) * 2


@requires_kernels
@pytest.mark.parametrize("shape,dtype", [((5, 17, 100, 3, 5), torch.float32), ((3, 33, 64, 4, 0), torch.float16),
                                         ((1, 3, 16, 2, 1), torch.float32), ((2, 197, 768, 16, 1), torch.bfloat16)],
                         ids=lambda v: _ids(v) if isinstance(v, tuple) else str(v))
def test_whole_image_split_forward_and_backward(shape, dtype, launch_with, poisoned):
    # WHOLE (one split program an image, weights on chip, each token tile read once) is one of
    # the GPU autotune configs of both passes
    launch_with(split=_whole)
    B, T, D, K, P = shape
    x, w, b = make_inputs(B, T, D, K, dtype)
    x.requires_grad_(True), w.requires_grad_(True)
    pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=P, return_weights=True)
    ref_pooled, ref_weights = reference64(x, w, b, P)
    assert rel_err(pooled, ref_pooled) < TOL[dtype]
    assert rel_err(weights, ref_weights) < max(TOL[dtype], 1e-5) * 2
    grad_out = torch.randn_like(pooled, dtype=torch.float32)
    got = torch.autograd.grad(pooled.float(), (x, w), grad_out)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    ref = abmilp_pool_reference(x64, w64, b.double(), num_prefix_tokens=P, compute_dtype=torch.float64)
    for g, e in zip(got, torch.autograd.grad(ref, (x64, w64), grad_out.double())):
        assert rel_err(g, e) < GRAD_TOL[dtype]


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("store_scores", [False, True])
def test_function_apply_returns_out_lse_and_scores(K, store_scores, poisoned):
    # AbmilpPoolFunction.apply's documented contract: (out [B, K, D] in x.dtype, lse [B, K] float32,
    # scores [B, K, N] float32 or an empty tensor); only out is differentiable
    B, T, D, P = 2, 13, 24, 1
    x, w, b = make_inputs(B, T, D, K, torch.bfloat16)
    w2, b1 = w.reshape(K, D).clone().requires_grad_(True), b.reshape(K).clone().requires_grad_(True)
    out, lse, scores = abmilp_ops.AbmilpPoolFunction.apply(x, w2, b1, P, store_scores, False, 1e-6)
    z = x[:, P:].double()
    s64 = torch.einsum("btd,kd->bkt", z, w2.detach().double()) + b1.detach().double()[:, None]
    assert out.shape == (B, K, D) and out.dtype == torch.bfloat16 and out.requires_grad
    assert lse.shape == (B, K) and lse.dtype == torch.float32 and not lse.requires_grad
    # K > 1 scores are one GEMM: on a GPU bf16 tokens meet the weights rounded to bf16 on the tensor
    # cores (as eager autocast's Linear); K = 1 and the interpreter compute them in float32
    score_tol = 1e-6 if K == 1 or DEVICE == "cpu" else 4e-3
    assert rel_err(lse, torch.logsumexp(s64, -1)) < score_tol
    assert rel_err(out, torch.einsum("bkt,btd->bkd", torch.softmax(s64, -1), z)) < TOL[torch.bfloat16]
    if store_scores:
        assert scores.shape == (B, K, T - P) and scores.dtype == torch.float32 and not scores.requires_grad
        assert rel_err(scores, s64) < score_tol
    else:
        assert scores.numel() == 0
    out.float().sum().backward()
    assert w2.grad.shape == (K, D) and torch.equal(b1.grad, torch.zeros(K, device=DEVICE))


# ---- standardize: every pooled token standardised over D (LayerNorm without affine) -----------

def _standardized64(x, w, b, P, eps=1e-6):
    """float64 standardize-then-pool, written out here (not the package reference)."""
    z = x[:, P:].double()
    zh = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
    w2 = w.double().reshape(-1, w.shape[-1])
    s = torch.einsum("btd,kd->bkt", zh, w2) + (0 if b is None else b.double().reshape(-1, 1))
    a = torch.softmax(s, -1)
    out = torch.einsum("bkt,btd->bkd", a, zh)
    return (out[:, 0], a[:, 0]) if w.dim() == 1 else (out, a)


def _check_standardized(x, w, b, P, dtype, eps=1e-6):
    """Forward (pooled, weights) and gradients of x, weight, bias against float64."""
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=P, return_weights=True, standardize=True, eps=eps)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref_pooled, ref_weights = _standardized64(x64, w64, b64, P, eps)
    assert pooled.dtype == dtype and weights.dtype == torch.float32
    assert rel_err(pooled, ref_pooled) < TOL[dtype]
    assert rel_err(weights, ref_weights) < max(TOL[dtype], 1e-5) * 2
    g = torch.randn_like(pooled, dtype=torch.float32)
    grads = torch.autograd.grad(pooled.float(), (x, w, b), g)
    ref_grads = torch.autograd.grad(ref_pooled, (x64, w64, b64), g.double())
    if x.shape[1] - P == 1:  # one pooled token: the weight gradient is zero, the kernel's is rounding noise
        # (of g . z - g . pooled, each of size |g| |z| ~ sqrt(D), in the tokens' precision on a GPU)
        noise = 1e-4 if dtype == torch.float32 else GRAD_TOL[dtype] * x.shape[-1] ** 0.5
        assert grads[1].double().abs().max().item() < noise
    else:
        assert rel_err(grads[1], ref_grads[1]) < GRAD_TOL[dtype], "weight"
    assert rel_err(grads[0], ref_grads[0]) < GRAD_TOL[dtype], "x"
    if P:
        assert torch.equal(grads[0][:, :P], torch.zeros_like(grads[0][:, :P]))  # prefix tokens: no gradient
    assert torch.equal(grads[2], torch.zeros_like(grads[2])) and ref_grads[2].abs().max().item() < 1e-9


# (B, T, D, K, P): K 1 and > 1, P 0 / 1 / 5, awkward T and D (one token, a partial tile, D not a power of two)
STD_SHAPES = [(2, 9, 48, 1, 0), (3, 17, 100, 1, 5), (1, 2, 16, 1, 1), (3, 17, 100, 3, 1), (2, 23, 40, 4, 5),
              (1, 2, 16, 2, 1), (2, 66, 24, 5, 0)]


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", STD_SHAPES, ids=_ids)
def test_standardize_matches_float64(shape, dtype, poisoned):
    B, T, D, K, P = shape
    x, w, b = make_inputs(B, T, D, K, torch.float32)
    x = (x * 3 + 5 + torch.randn(B, T, 1, device=DEVICE)).to(dtype)  # a mean and a scale per token to remove
    _check_standardized(x, w, b, P, dtype)


@requires_kernels
@pytest.mark.parametrize("layout", ["whole", "chunks-of-16", "prefetch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_standardize_in_every_tile_layout(layout, dtype, launch_with, poisoned):
    # the statistics come from whole-token tiles (K = 1, WHOLE) or merge over feature chunks
    # (split: 16-wide chunks of D = 40 make two full chunks and a partial one)
    K = 1 if layout == "prefetch" else 3
    launch_with(single=lambda cfg: dict(PREFETCH=True),
                split=_whole if layout == "whole" else lambda cfg, D: dict(BC=16))
    x, w, b = make_inputs(3, 21, 40, K, torch.float32)
    x = (x * 0.5 - 20 + torch.randn(3, 21, 1, device=DEVICE) * 4).to(dtype)  # |mean| >> std
    _check_standardized(x, w, b, 1, dtype)


@requires_kernels
def test_standardize_without_grad_and_eps(poisoned):
    x, w, b = make_inputs(2, 12, 32, 2, torch.float32)
    x[0, 3] = 0.7  # a constant token: variance 0, eps alone sets its scale
    with torch.no_grad():
        pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=1, return_weights=True, standardize=True, eps=1e-2)
    ref_pooled, ref_weights = _standardized64(x, w, b, 1, eps=1e-2)
    assert rel_err(pooled, ref_pooled) < 1e-5 and rel_err(weights, ref_weights) < 1e-5
    ref_plain = abmilp_pool_reference(x, w, b, num_prefix_tokens=1, standardize=True, eps=1e-2)
    assert rel_err(ref_plain, ref_pooled) < 1e-5  # the package reference agrees with the written-out one


@requires_kernels
def test_standardize_as_attentive_probing_calls_it(poisoned):
    # the folded attentive-probing head: 12 heads' vectors u [H, D], no bias, frozen bf16 tokens
    x = (torch.randn(3, 20, 48, device=DEVICE) * 2 + 1).to(torch.bfloat16)
    u = (torch.randn(12, 48, device=DEVICE) * 0.3).requires_grad_(True)
    pooled = abmilp_pool(x, u, None, num_prefix_tokens=1, standardize=True, eps=1e-6)
    g = torch.randn(3, 12, 48, device=DEVICE)
    (gu,) = torch.autograd.grad(pooled.float(), (u,), g)
    u64 = u.detach().double().requires_grad_(True)
    ref, _ = _standardized64(x.double(), u64, None, 1)
    (gu_ref,) = torch.autograd.grad(ref, (u64,), g.double())
    assert pooled.shape == (3, 12, 48) and pooled.dtype == torch.bfloat16
    assert rel_err(pooled, ref) < TOL[torch.bfloat16] and rel_err(gu, gu_ref) < GRAD_TOL[torch.bfloat16]
