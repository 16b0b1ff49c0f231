import pytest
import torch
from torch import nn


from conftest import DEVICE, AtenOutputs, rel_err
from selagg_fast import AttentivePooling, EfficientProbing, SelectiveAggregation
from selagg_fast.branches import pool_branches

timm_pool = pytest.importorskip("timm.layers.attention_pool")

TOL, GRAD_TOL = 1e-5, 1e-4  # float32 module against timm's module in float64

# (H, D, token_norm, P, B, T): H in 1, 3, 12 and D in 64, 192, 768, with and without token_norm,
# [cls] (P=1), registers (P=5) and no [cls] (P=0); tiny B and T at the big D (interpreter cost).
CASES = [
    (1, 64, False, 1, 3, 18),
    (3, 192, True, 5, 2, 18),
    (12, 192, False, 0, 2, 9),
    (12, 768, True, 1, 1, 6),
    (1, 768, False, 0, 2, 3),
]


def _ids(case):
    return "H{}-D{}-{}-P{}-B{}-T{}".format(case[0], case[1], "ln" if case[2] else "noln", *case[3:])


def timm_module(D, H, **kw):
    kw = dict(dict(mlp_ratio=4.0, qkv_bias=True, latent_len=1, norm_layer=nn.LayerNorm), **kw)
    return timm_pool.AttentionPoolLatent(D, num_heads=H, **kw)


def make_pair(H, D, token_norm, P):
    """Our module (float32, DEVICE) and timm's (float64, with a separate token LayerNorm), same
    parameters; every parameter moved off its initial value so no gradient hides behind a 0 or 1."""
    ours = AttentivePooling(D, H, token_norm=token_norm, num_prefix_tokens=P)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref = timm_module(D, H).double()
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("token_norm.")})
    ln = nn.LayerNorm(D, eps=1e-6).double()
    if token_norm:
        ln.load_state_dict({k[len("token_norm."):]: v for k, v in ours.state_dict().items()
                            if k.startswith("token_norm.")})
    return ours.to(DEVICE), ref, ln if token_norm else None


def timm_forward(ref, ln, x, P):
    """timm's module on the patch tokens (after the token LayerNorm), and its attention weights
    computed the unfolded way: keys of every token, softmax(q kᵀ / √d)."""
    z = x[:, P:]
    if ln is not None:
        z = ln(z)
    out = ref(z)
    B, N, D = z.shape
    H, d = ref.num_heads, ref.head_dim
    q = ref.q(ref.latent).reshape(1, H, d)
    k = ref.kv(z)[..., :D].reshape(B, N, H, d)
    weights = torch.softmax(torch.einsum("hd,bnhd->bhn", q[0], k) * d ** -0.5, dim=-1)
    return out, weights


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_timm(case, poisoned):
    H, D, token_norm, P, B, T = case
    ours, ref, ln = make_pair(H, D, token_norm, P)
    x = torch.randn(B, T, D, dtype=torch.float64)
    x[:, :P] = 1e3  # prefix tokens must not leak into the pool
    g = torch.randn(B, D, dtype=torch.float64)

    out, weights = ours(x.float().to(DEVICE), return_weights=True)
    (out.double() * g.to(DEVICE)).sum().backward()
    ref_out, ref_weights = timm_forward(ref, ln, x, P)
    (ref_out * g).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (B, D)
    assert weights.dtype == torch.float32 and weights.shape == (B, H, T - P)
    assert rel_err(out, ref_out) < TOL
    assert rel_err(weights, ref_weights) < TOL
    refs = dict(ref.named_parameters())
    if ln is not None:
        refs.update({"token_norm." + k: v for k, v in ln.named_parameters()})
    grads = {k: p.grad for k, p in ours.named_parameters()}
    assert set(grads) == set(refs)
    for k, p in refs.items():
        assert grads[k] is not None, k
        assert rel_err(grads[k], p.grad) < GRAD_TOL, k
    # the key bias cancels in the softmax: its gradient is exactly zero (timm's is rounding noise)
    assert torch.equal(grads["kv.bias"][:D], torch.zeros_like(grads["kv.bias"][:D]))
    assert refs["kv.bias"].grad[:D].abs().max() < 1e-10


def test_token_gradient_matches_timm():
    H, D, P = 3, 192, 1
    for token_norm in (False, True):
        ours, ref, ln = make_pair(H, D, token_norm, P)
        x = torch.randn(2, 11, D, dtype=torch.float64, requires_grad=True)
        x32 = x.detach().float().to(DEVICE).requires_grad_()
        g = torch.randn(2, D, dtype=torch.float64)
        (ours(x32).double() * g.to(DEVICE)).sum().backward()
        (timm_forward(ref, ln, x, P)[0] * g).sum().backward()
        assert rel_err(x32.grad, x.grad) < GRAD_TOL, token_norm
        assert torch.equal(x32.grad[:, :P], torch.zeros_like(x32.grad[:, :P]))



@pytest.mark.parametrize("token_norm", [False, True], ids=["noln", "ln"])
def test_keys_and_values_are_never_computed(token_norm):
    """The fold's contract: no [B, N, 2D] / [B·N, D] projection of the tokens, forward or backward."""
    B, T, D, H, P = 3, 12, 80, 5, 1  # sizes that no other dimension of the computation shares
    ours = AttentivePooling(D, H, token_norm=token_norm, num_prefix_tokens=P).to(DEVICE)
    x = torch.randn(B, T, D, device=DEVICE)
    with AtenOutputs() as rec:
        ours(x).sum().backward()
    matmuls = {"mm", "bmm", "addmm", "matmul", "linear", "baddbmm", "einsum"}
    token_dims = {T - P, T, B * (T - P), B * T}
    bad = [(name, shape) for name, shape in rec.seen if token_dims & set(shape)
           and ((name in matmuls and {D, 2 * D, D // H} & set(shape)) or 2 * D in shape)]
    assert not bad, bad
    assert any(name in matmuls for name, _ in rec.seen)  # the recorder saw the head's own GEMMs


def test_initialisation_is_timms():
    for H, D in [(1, 64), (12, 192)]:
        torch.manual_seed(3)
        ref = timm_module(D, H)
        torch.manual_seed(3)
        ours = AttentivePooling(D, H)
        ref_sd, sd = ref.state_dict(), ours.state_dict()
        assert list(sd) == list(ref_sd)
        for k, v in ref_sd.items():
            assert torch.equal(sd[k], v), k
    ln = AttentivePooling(64, 1, token_norm=True).token_norm
    assert ln.eps == 1e-6 and torch.equal(ln.weight, torch.ones(64)) and torch.equal(ln.bias, torch.zeros(64))


def test_state_dicts_swap_both_ways():
    D, H = 64, 1
    x = torch.randn(2, 9, D)
    ours = AttentivePooling(D, H, num_prefix_tokens=1)
    ref = timm_module(D, H)
    ref.load_state_dict(ours.state_dict())  # ours -> timm, strict
    torch.testing.assert_close(ref(x[:, 1:]), ours(x), rtol=1e-5, atol=1e-6)
    ref2 = timm_module(D, H)
    ours.load_state_dict(ref2.state_dict())  # timm -> ours, strict
    torch.testing.assert_close(ref2(x[:, 1:]), ours(x), rtol=1e-5, atol=1e-6)
    from_timm = AttentivePooling.from_timm(ref2, num_prefix_tokens=1)
    torch.testing.assert_close(from_timm(x), ours(x), rtol=0, atol=0)
    # token_norm's keys are its own: a timm state dict loads into the rest with strict=False
    ln = AttentivePooling(D, H, token_norm=True)
    missing, unexpected = ln.load_state_dict(ref2.state_dict(), strict=False)
    assert sorted(missing) == ["token_norm.bias", "token_norm.weight"] and not unexpected


def test_grouped_pool_call_matches_forward():
    """Several modules' branch weights as branches of ONE pooling call (the probe heads' grouping),
    through the pooling protocol: attentive heads beside a linear selective head and efficient probes."""
    D, P = 192, 1
    mods = [AttentivePooling(D, H, num_prefix_tokens=P) for H in (1, 3, 12)]
    mods += [SelectiveAggregation(D, 2, P), EfficientProbing(D, 4, num_prefix_tokens=P), EfficientProbing(D, 1)]
    mods = [m.to(DEVICE) for m in mods]
    x = torch.randn(2, 10, D, device=DEVICE)
    weights, biases = zip(*[m.branch_weights() for m in mods])
    bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])
    pooled = pool_branches(x, torch.cat(weights), bias, num_prefix_tokens=P)
    for m, p in zip(mods, pooled.split([w.shape[0] for w in weights], dim=1)):
        assert not m.standardize and m.eps is None
        out = m.finish(p)
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-6)
        assert out.reshape(2, -1).shape[1] == m.out_features
    assert SelectiveAggregation(D, 1, P, depth=2).branch_weights() is None  # pools by itself


@pytest.mark.parametrize("kwargs, message", [
    (dict(qk_norm=True), "q/k normalisation"),
    (dict(latent_len=2), "several latents"),
    (dict(pos_embed="abs", feat_size=16), "position embeddings"),
], ids=["qk_norm", "latent_len2", "pos_embed"])
def test_refuses_what_breaks_the_fold(kwargs, message):
    ref = timm_module(64, 4, **kwargs)
    with pytest.raises(ValueError, match=message):
        AttentivePooling.from_timm(ref)
    state = ref.state_dict()
    for strict in (True, False):
        with pytest.raises(ValueError, match="the state dict holds"):
            AttentivePooling(64, 4).load_state_dict(state, strict=strict)


def test_from_timm_refuses_other_layouts():
    with pytest.raises(ValueError, match="nn.LayerNorm"):
        AttentivePooling.from_timm(timm_pool.AttentionPoolLatent(64, num_heads=4))  # timm's default: no norm
    with pytest.raises(ValueError, match="qkv_bias=False"):
        AttentivePooling.from_timm(timm_module(64, 4, qkv_bias=False))
    with pytest.raises(TypeError, match="AttentionPoolLatent"):
        AttentivePooling.from_timm(nn.Linear(4, 4))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_heads=5 does not divide dim=64"):
        AttentivePooling(64, 5)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        AttentivePooling(64, 0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        AttentivePooling(0, 1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        AttentivePooling(64, 1, num_prefix_tokens=-1)
    m = AttentivePooling(64, 4).to(DEVICE)
    with pytest.raises(ValueError, match=r"D=64\], got shape \(2, 5, 32\)"):
        m(torch.randn(2, 5, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"tokens must be \[B, T, D=64\]"):
        m(torch.randn(5, 64, device=DEVICE))
    with pytest.raises(ValueError, match=r"pooled must be \[B, H=4, D=64\]"):
        m.finish(torch.randn(2, 3, 64, device=DEVICE))
    with pytest.raises(ValueError, match="no tokens left"):
        m(torch.randn(2, 1, 64, device=DEVICE))
