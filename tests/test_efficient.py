"""EfficientProbing against an eager float64 transcription of the efficient-probing code's module:
outputs, weights, every gradient, initialisation, state dicts both ways, and the fold's contract."""
import pytest
import torch
from conftest import DEVICE, AtenOutputs, rel_err
from torch import nn

from selagg_fast import EfficientProbing

TOL, GRAD_TOL = 1e-5, 1e-4  # float32 module against the float64 transcription


class PeerEfficientProbing(nn.Module):
    """The efficient-probing code's ``EfficientProbing`` (one head, no value bias), written out:
    per query m, ``softmax_t(q_m · x_t / √D)`` over the given tokens applied to slice m of the
    value projection of every token, the Q slices concatenated."""

    def __init__(self, dim, num_queries=32, d_out=1):
        super().__init__()
        self.num_queries, self.d_out = num_queries, d_out
        self.v = nn.Linear(dim, dim // d_out, bias=False)
        self.cls_token = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)

    def attention(self, x):
        B, N, D = x.shape
        q = self.cls_token.expand(B, -1, -1) * D ** -0.5  # [B, Q, D]
        return torch.softmax(q @ x.transpose(1, 2), dim=-1)  # [B, Q, N]

    def forward(self, x):
        B, N, D = x.shape
        Q = self.num_queries
        values = self.v(x).reshape(B, N, Q, D // (self.d_out * Q)).permute(0, 2, 1, 3)  # [B, Q, N, c]
        out = (self.attention(x).unsqueeze(2) @ values).squeeze(2)  # [B, Q, c]
        return out.reshape(B, D // self.d_out)


def make_pair(Q, D, d_out, P):
    """Our module (float32, DEVICE) and the transcription (float64), same parameters, moved off
    their initial scale so no gradient hides behind a tiny query."""
    ours = EfficientProbing(D, Q, d_out=d_out, num_prefix_tokens=P)
    with torch.no_grad():
        ours.cls_token.mul_(20.0)
    ref = PeerEfficientProbing(D, Q, d_out).double()
    ref.load_state_dict(ours.state_dict())
    return ours.to(DEVICE), ref


# (Q, D, d_out, P, B, T): the default Q = 32, one query (the single-branch op), d_out > 1,
# [cls] (P=1), registers (P=5) and no [cls] (P=0)
CASES = [(32, 64, 1, 1, 3, 18), (1, 48, 1, 5, 2, 12), (4, 64, 2, 0, 2, 9), (8, 96, 3, 1, 2, 7)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "Q{}-D{}-dout{}-P{}-B{}-T{}".format(*c))
def test_matches_peer(case, poisoned):
    Q, D, d_out, P, B, T = case
    ours, ref = make_pair(Q, D, d_out, P)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    x32 = x.detach().float().to(DEVICE).requires_grad_()
    with torch.no_grad():
        x32[:, :P] = 1e3  # prefix tokens must not leak into the pool
    g = torch.randn(B, D // d_out, dtype=torch.float64)

    out, weights = ours(x32, return_weights=True)
    (out.double() * g.to(DEVICE)).sum().backward()
    ref_out = ref(x[:, P:])
    (ref_out * g).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (B, D // d_out)
    assert weights.dtype == torch.float32 and weights.shape == (B, Q, T - P)
    assert rel_err(out, ref_out) < TOL
    assert rel_err(weights, ref.attention(x[:, P:].detach())) < TOL
    grads = {k: p.grad for k, p in ours.named_parameters()}
    refs = dict(ref.named_parameters())
    assert set(grads) == set(refs) == {"cls_token", "v.weight"}
    for k, p in refs.items():
        assert grads[k] is not None and rel_err(grads[k], p.grad) < GRAD_TOL, k
    assert rel_err(x32.grad[:, P:], x.grad[:, P:]) < GRAD_TOL
    assert torch.equal(x32.grad[:, :P], torch.zeros_like(x32.grad[:, :P]))


def test_initialisation_and_state_dicts_are_the_peers():
    D, Q = 64, 8
    torch.manual_seed(3)
    ref = PeerEfficientProbing(D, Q, d_out=2)
    torch.manual_seed(3)
    ours = EfficientProbing(D, Q, d_out=2)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["cls_token", "v.weight"]
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert ours.v.bias is None and 0.015 < ours.cls_token.std().item() < 0.025
    x = torch.randn(2, 9, D)
    other = PeerEfficientProbing(D, Q, d_out=2)
    ours.load_state_dict(other.state_dict())  # peer -> ours, strict
    torch.testing.assert_close(ours.to(DEVICE)(x.to(DEVICE)).cpu(), other(x[:, 1:]), rtol=1e-5, atol=1e-6)
    fresh = PeerEfficientProbing(D, Q, d_out=2)
    fresh.load_state_dict(EfficientProbing(D, Q, d_out=2).state_dict())  # ours -> peer, strict
    with pytest.raises(RuntimeError, match="size mismatch"):
        EfficientProbing(D, 4, d_out=2).load_state_dict(other.state_dict())



def test_values_are_never_computed():
    """The fold's contract: no value projection of any token ([B, N, D] GEMM), forward or backward."""
    B, T, D, Q, P = 3, 12, 80, 5, 1  # sizes that no other dimension of the computation shares
    ours = EfficientProbing(D, Q, num_prefix_tokens=P).to(DEVICE)
    x = torch.randn(B, T, D, device=DEVICE)
    with AtenOutputs() as rec:
        ours(x).sum().backward()
    matmuls = {"mm", "bmm", "addmm", "matmul", "linear", "baddbmm", "einsum"}
    token_dims = {T - P, T, B * (T - P), B * T}
    bad = [(name, shape) for name, shape in rec.seen if name in matmuls and token_dims & set(shape)]
    assert not bad, bad
    assert any(name in matmuls for name, _ in rec.seen)  # the recorder saw the per-query value maps


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"num_queries \* d_out = 5 \* 1 does not divide dim=64"):
        EfficientProbing(64, 5)
    with pytest.raises(ValueError, match=r"num_queries \* d_out = 32 \* 4 does not divide dim=64"):
        EfficientProbing(64, 32, d_out=4)
    for kwargs, message in ((dict(dim=0), "dim must be a positive int"), (dict(num_queries=0), "num_queries"),
                            (dict(d_out=True), "d_out"), (dict(num_prefix_tokens=-1), "num_prefix_tokens")):
        with pytest.raises(ValueError, match=message):
            EfficientProbing(**dict(dict(dim=64, num_queries=4), **kwargs))
    m = EfficientProbing(64, 4).to(DEVICE)
    with pytest.raises(ValueError, match=r"D=64\], got shape \(2, 5, 32\)"):
        m(torch.randn(2, 5, 32, device=DEVICE))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([[0.0]])
    with pytest.raises(ValueError, match=r"pooled must be \[B, K=4, D=64\], got shape \(2, 3, 64\)"):
        m.finish(torch.randn(2, 3, 64, device=DEVICE))
    with pytest.raises(ValueError, match="no tokens left"):
        m.check_num_tokens(1)
