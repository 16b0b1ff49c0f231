import importlib

import pytest
import torch

from conftest import DEVICE, rel_err, requires_kernels
from selagg_fast import mlp_scores, softmax_pool
from selagg_fast.reference import mlp_scores_reference

ms_ops = importlib.import_module("selagg_fast.ops.mlp_scores")  # the module (ops exports the function)

# Relative-norm tolerances against float64. Scores: the GEMM's operands are rounded to bf16/fp16
# on the GPU (and tanh.approx there); gradients: dpre is stored in the tokens' dtype for the dW1 GEMM.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
NAMES = ("x", "w1", "b1", "w2", "b2")

# (B, T, D, Dh, K, P): T 1 / 17 / 197, K 1 and > 1, P 0 / 1 / 5, Dh != D, one D=768 case.
SHAPES = [
    (2, 1, 32, 16, 1, 0),
    (3, 17, 32, 48, 1, 1),
    (2, 17, 64, 64, 3, 5),
    (2, 197, 32, 32, 1, 1),
    (1, 3, 768, 64, 1, 1),
    (2, 9, 40, 24, 17, 0),
]


def _ids(shape):
    return "B{}-T{}-D{}-Dh{}-K{}-P{}".format(*shape)


def make_inputs(B, T, D, DH, K, dtype, bias=True):
    x = torch.randn(B, T, D, device=DEVICE).to(dtype)
    w1 = torch.randn(DH, D, device=DEVICE) * D ** -0.5 * 1.5
    b1 = torch.randn(DH, device=DEVICE) * 0.5 if bias else None
    w2 = torch.randn((DH,) if K == 1 else (K, DH), device=DEVICE) * DH ** -0.5 * 2
    b2 = torch.randn(() if K == 1 else (K,), device=DEVICE) if bias else None
    return x, w1, b1, w2, b2


def reference64(params, P, activation, g=None):
    p64 = [None if t is None else t.detach().double().requires_grad_(True) for t in params]
    s = mlp_scores_reference(*p64, activation=activation, num_prefix_tokens=P, compute_dtype=torch.float64)
    if g is None:
        return s
    live = [t for t in p64 if t is not None]
    grads = iter(torch.autograd.grad(s, live, g.double()))
    return s, [None if t is None else next(grads) for t in p64]


def eager_grads(params, P, activation, g, dtype):
    """Eager PyTorch's gradients computed in ``dtype`` (the yardstick for 16-bit kernels)."""
    p16 = [None if t is None else t.detach().requires_grad_(True) for t in params]
    s = mlp_scores_reference(*p16, activation=activation, num_prefix_tokens=P, compute_dtype=dtype)
    live = [t for t in p16 if t is not None]
    grads = iter(torch.autograd.grad(s, live, g))
    return [None if t is None else next(grads) for t in p16]


def check_grads(got, exp, params, dtype, P, eager=None):
    # 16-bit: within GRAD_TOL, or within twice eager PyTorch's own error in that dtype (ReLU's
    # derivative flips where a bf16 pre-activation rounds across zero, in eager code too)
    eager = eager or [None] * len(NAMES)
    for name, a, e, p, ea in zip(NAMES, got, exp, params, eager):
        if p is None:
            continue
        assert a.dtype == p.dtype and a.shape == p.shape, name
        tol = GRAD_TOL[dtype] if ea is None else max(GRAD_TOL[dtype], 2 * rel_err(ea, e))
        assert rel_err(a, e) < tol, name
    if P:
        assert torch.equal(got[0][:, :P], torch.zeros_like(got[0][:, :P]))


@requires_kernels
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_scores_and_every_gradient(shape, dtype, activation, poisoned):
    B, T, D, DH, K, P = shape
    params = make_inputs(B, T, D, DH, K, dtype)
    for p in params:
        p.requires_grad_(True)
    s = mlp_scores(*params, activation=activation, num_prefix_tokens=P)
    assert s.dtype == torch.float32 and s.shape == ((B, T - P) if K == 1 else (B, K, T - P))
    g = torch.randn(s.shape, device=DEVICE)
    ref, ref_grads = reference64(params, P, activation, g)
    assert rel_err(s, ref) < TOL[dtype]
    eager = eager_grads(params, P, activation, g, dtype) if dtype != torch.float32 else None
    check_grads(torch.autograd.grad(s, params, g), ref_grads, params, dtype, P, eager)


@requires_kernels
def test_float16_tokens(poisoned):
    params = make_inputs(2, 17, 48, 32, 2, torch.float16)
    for p in params:
        p.requires_grad_(True)
    s = mlp_scores(*params, activation="tanh", num_prefix_tokens=1)
    g = torch.randn(s.shape, device=DEVICE)
    ref, ref_grads = reference64(params, 1, "tanh", g)
    assert rel_err(s, ref) < TOL[torch.float16]
    check_grads(torch.autograd.grad(s, params, g), ref_grads, params, torch.float16, 1)


@requires_kernels
def test_matches_the_written_out_definition(poisoned):
    x, w1, b1, w2, b2 = make_inputs(2, 6, 20, 12, 1, torch.float32)
    s = mlp_scores(x, w1, b1, w2, b2, activation="tanh", num_prefix_tokens=1)
    for b in range(2):
        for t in range(5):
            z = x[b, 1 + t].double()
            h = [torch.tanh((w1[j].double() * z).sum() + b1[j].double()) for j in range(12)]
            exp = sum(w2[j].double() * h[j] for j in range(12)) + b2.double()
            assert abs(s[b, t].item() - exp.item()) < 1e-5 * (1 + abs(exp.item()))


@requires_kernels
@pytest.mark.parametrize("P", [0, 1, 5])
def test_backward_in_image_chunks(P, monkeypatch, poisoned):
    # the pre-activation gradient is written a chunk of images at a time (a memory bound):
    # several chunks (and a last, partial one) must give the same gradients, prefix rows zero
    monkeypatch.setattr(ms_ops, "DPRE_CHUNK_BYTES", 2 * 17 * 24 * 4)  # two images a chunk
    x, w1, b1, w2, b2 = params = make_inputs(5, 17, 32, 24, 1, torch.float32)
    for p in params:
        p.requires_grad_(True)
    s = mlp_scores(*params, activation="tanh", num_prefix_tokens=P)
    g = torch.randn(s.shape, device=DEVICE)
    _, ref_grads = reference64(params, P, "tanh", g)
    check_grads(torch.autograd.grad(s, params, g), ref_grads, params, torch.float32, P)


@requires_kernels
@pytest.mark.parametrize("K", [1, 3])
def test_every_autotune_config_is_correct(K, monkeypatch, poisoned):
    # the GPU tunes over these tiles; here each is launched as the default (partials are sized for
    # the smallest BM, and only the rows of the programs that ran may be reduced: NaN-poisoned)
    monkeypatch.setenv("SELAGG_AUTOTUNE", "0")  # on a GPU too: launch the patched default, no tuning
    B, T, D, DH, P = 3, 50, 48, 40, 1  # 147 token rows: programs of 64 and of 128 rows differ in count
    params = make_inputs(B, T, D, DH, K, torch.float32)
    for p in params:
        p.requires_grad_(True)
    g = torch.randn((B, T - P) if K == 1 else (B, K, T - P), device=DEVICE)
    ref, ref_grads = reference64(params, P, "relu", g)
    base = ms_ops._launch_config
    for backward in (False, True):
        for cfg in ms_ops._configs(D, DH, K, backward):
            monkeypatch.setattr(ms_ops, "_launch_config", lambda *a, c=cfg, **kw: dict(base(*a, **kw), **c))
            s = mlp_scores(*params, activation="relu", num_prefix_tokens=P)
            assert rel_err(s, ref) < 1e-5, cfg
            check_grads(torch.autograd.grad(s, params, g), ref_grads, params, torch.float32, P)


@requires_kernels
def test_frozen_tokens_no_biases_and_no_grad_path(poisoned):
    x, w1, _, w2, _ = make_inputs(3, 17, 32, 32, 2, torch.bfloat16, bias=False)
    w1.requires_grad_(True), w2.requires_grad_(True)
    s = mlp_scores(x, w1, None, w2, None, activation="relu", num_prefix_tokens=1)
    g = torch.randn(s.shape, device=DEVICE)
    ref, ref_grads = reference64((x, w1, None, w2, None), 1, "relu", g)
    assert rel_err(s, ref) < TOL[torch.bfloat16]
    gw1, gw2 = torch.autograd.grad(s, (w1, w2), g)
    assert rel_err(gw1, ref_grads[1]) < GRAD_TOL[torch.bfloat16]
    assert rel_err(gw2, ref_grads[3]) < GRAD_TOL[torch.bfloat16]
    with torch.no_grad():
        s0 = mlp_scores(x, w1, None, w2, None, activation="relu", num_prefix_tokens=1)
    assert s0.grad_fn is None and rel_err(s0, ref) < TOL[torch.bfloat16]


@requires_kernels
def test_scalar_b2_serves_every_branch(poisoned):
    # a scalar b2 is every branch's: the scores of that value repeated, its gradient their sum
    x, w1, b1, w2, _ = make_inputs(3, 17, 32, 32, 3, torch.float32)
    b2 = torch.tensor(-0.4, device=DEVICE, requires_grad=True)
    s = mlp_scores(x, w1, b1, w2, b2, activation="tanh", num_prefix_tokens=1)
    ref = reference64((x, w1, b1, w2, b2.detach().expand(3)), 1, "tanh")
    assert rel_err(s, ref) < TOL[torch.float32]
    g = torch.randn(s.shape, device=DEVICE)
    gb2, = torch.autograd.grad(s, b2, g)
    assert gb2.shape == () and torch.allclose(gb2, g.sum(), rtol=1e-5, atol=1e-4)


@requires_kernels
def test_strided_tokens(poisoned):
    base = torch.randn(3, 30, 2, 32, device=DEVICE)
    x = base[:, 2:25, 1, :]
    assert not x.is_contiguous() and x.stride(-1) == 1
    _, w1, b1, w2, b2 = make_inputs(3, 23, 32, 16, 1, torch.float32)
    w1.requires_grad_(True)
    s = mlp_scores(x, w1, b1, w2, b2, num_prefix_tokens=1)  # read in place; dW1's GEMM copies the chunk
    g = torch.randn(s.shape, device=DEVICE)
    ref, ref_grads = reference64((x, w1, b1, w2, b2), 1, "tanh", g)
    assert rel_err(s, ref) < 1e-5
    (gw1,) = torch.autograd.grad(s, (w1,), g)
    assert rel_err(gw1, ref_grads[1]) < 1e-4


@requires_kernels
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_depth2_head_composes_with_softmax_pool(activation, poisoned):
    # the reference head at depth 2 (attention_predictor = Linear(D, D), act, Linear(D, 1)), content
    # "patch": pooled output and every parameter's gradient, against an eager float64 transcription
    D, P = 32, 1
    fc0, fc2 = torch.nn.Linear(D, D).to(DEVICE), torch.nn.Linear(D, 1).to(DEVICE)
    x = torch.randn(3, 17, D, device=DEVICE, dtype=torch.bfloat16)
    s = mlp_scores(x, fc0.weight, fc0.bias, fc2.weight[0], fc2.bias[0], activation=activation, num_prefix_tokens=P)
    pooled = softmax_pool(s, x, num_prefix_tokens=P)
    g = torch.randn(pooled.shape, device=DEVICE)
    got = torch.autograd.grad(pooled.float(), (fc0.weight, fc0.bias, fc2.weight, fc2.bias), g)

    params = [p.detach().double().requires_grad_(True) for p in (fc0.weight, fc0.bias, fc2.weight, fc2.bias)]
    z = x[:, P:].double()
    act = torch.tanh if activation == "tanh" else torch.relu
    a = torch.softmax(torch.nn.functional.linear(act(torch.nn.functional.linear(z, *params[:2])), *params[2:]), dim=1)
    ref = (a * z).sum(1)
    assert rel_err(pooled, ref) < TOL[torch.bfloat16]
    ref_grads = torch.autograd.grad(ref, params, g.double())
    for name, gg, e in zip(("fc0.weight", "fc0.bias", "fc2.weight"), got, ref_grads):
        assert rel_err(gg, e) < GRAD_TOL[torch.bfloat16], name
    assert got[3].abs().item() < 1e-4  # the score bias: zero analytically (softmax is shift invariant)


def test_empty_batch_reference_backend_and_unsupported_k():
    x, w1, b1, w2, b2 = make_inputs(0, 5, 8, 4, 3, torch.float32)
    assert mlp_scores(x, w1, b1, w2, b2, num_prefix_tokens=1).shape == (0, 3, 4)
    x, w1, b1, w2, b2 = make_inputs(2, 5, 8, 4, 1, torch.float32)
    s = mlp_scores(x, w1, b1, w2, b2, activation="relu", backend="reference")
    exp = torch.relu(x.double() @ w1.double().T + b1.double()) @ w2.double() + b2.double()
    assert rel_err(s, exp) < 1e-6
    x, w1, b1, w2, b2 = make_inputs(1, 5, 8, 4, 65, torch.float32)
    with pytest.raises(ValueError, match="K=65"):
        mlp_scores(x, w1, b1, w2, b2, backend="triton")


def _bad(**over):
    args = dict(x=torch.randn(2, 5, 8), w1=torch.randn(6, 8), b1=torch.randn(6), w2=torch.randn(6), b2=torch.randn(()))
    kw = {k: over.pop(k) for k in ("activation", "num_prefix_tokens", "backend") if k in over}
    args.update(over)
    return lambda: mlp_scores(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], **kw)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (_bad(x=torch.randn(2, 8)), ValueError, "B, T, D"),
        (_bad(w1=torch.randn(6, 7)), ValueError, "w1 must be"),
        (_bad(w1=torch.randn(0, 8), b1=None, w2=torch.randn(0)), ValueError, "Dh=0"),
        (_bad(b1=torch.randn(5)), ValueError, "b1 must be"),
        (_bad(w2=torch.randn(5)), ValueError, "w2 must be"),
        (_bad(w2=torch.randn(0, 6)), ValueError, "K=0"),
        (_bad(w2=torch.randn(3, 6), b2=torch.randn(2)), ValueError, "b2 must be"),
        (_bad(activation="gelu"), ValueError, "activation"),
        (_bad(num_prefix_tokens=5), ValueError, "no tokens"),
        (_bad(num_prefix_tokens=-1), ValueError, "non-negative"),
        (_bad(x=torch.ones(2, 5, 8, dtype=torch.int64)), TypeError, "x must be"),
        (_bad(w1=torch.ones(6, 8, dtype=torch.int32)), TypeError, "w1 must be"),
        (_bad(backend="cuda"), ValueError, "backend"),
        (_bad(w1=torch.randn(6, 8, device="meta")), ValueError, "one device"),
    ],
    ids=["x-rank", "w1-shape", "Dh0", "b1-shape", "w2-shape", "K0", "b2-shape", "activation", "no-tokens",
         "negative-P", "int-x", "int-w1", "bad-backend", "devices"],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
