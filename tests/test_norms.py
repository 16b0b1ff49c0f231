"""Per-token norm ratios (the analysis' attention-branch magnitude) against float64."""
import pytest
import torch

from conftest import DEVICE, rel_err, requires_kernels
from selagg_fast.ops.norms import token_norm_ratio


def _ratio64(a, b):
    return a.double().norm(dim=-1) / b.double().norm(dim=-1)


@requires_kernels
@pytest.mark.parametrize("B,T,D", [(2, 197, 768), (3, 5, 100), (1, 1, 16), (2, 33, 1280)])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                    (torch.float16, torch.bfloat16)], ids=str)
def test_matches_float64(B, T, D, dtypes, poisoned):
    # timm under autocast: a bf16 attention branch over a float32 residual stream
    a = torch.randn(B, T, D, device=DEVICE).to(dtypes[0])
    b = (torch.randn(B, T, D, device=DEVICE) * 3).to(dtypes[1])
    got = token_norm_ratio(a, b, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (B, T)
    assert rel_err(got, _ratio64(a, b)) < 1e-5


@requires_kernels
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's numpy, on purpose
def test_strided_inputs_are_read_in_place_and_zero_denominators_give_inf(poisoned):
    qkv = torch.randn(2, 40, 3, 64, device=DEVICE)
    a, b = qkv[:, :, 0], qkv[:, :, 1]  # token stride 192, unit last stride
    b[1, 7] = 0.0
    got = token_norm_ratio(a, b, backend="triton")
    exp = _ratio64(a, b)
    assert torch.isinf(got[1, 7]) and torch.isinf(exp[1, 7])
    finite = torch.isfinite(exp)
    assert rel_err(got[finite], exp[finite]) < 1e-6


def test_reference_backend_and_bad_input():
    a, b = torch.randn(2, 9, 24), torch.randn(2, 9, 24)
    assert rel_err(token_norm_ratio(a, b, backend="reference"), _ratio64(a, b)) < 1e-6
    with pytest.raises(ValueError, match="shapes differ"):
        token_norm_ratio(a, b[:, :8])
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        token_norm_ratio(a[0], b[0])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        token_norm_ratio(a.long(), b)
