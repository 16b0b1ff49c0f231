"""Per-token norm ratios ``||a_t|| / ||b_t||``: the attention-branch magnitude of the analysis."""
from __future__ import annotations

import torch
import triton

from ..kernels.norms import token_norm_ratio_kernel
from . import _dispatch
from ._dispatch import MAX_TILE_ELEMENTS, check_float, check_same_device, choose_backend, next_pow2, token_tile

OP = "token_norm_ratio"
MAX_D = MAX_TILE_ELEMENTS  # a whole token in one tile row (at widest a 1-token tile per tensor per program)


def token_norm_ratio_reference(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return (torch.linalg.vector_norm(numerator, dim=-1, dtype=torch.float32)
            / torch.linalg.vector_norm(denominator, dim=-1, dtype=torch.float32))


def token_norm_ratio(numerator: torch.Tensor, denominator: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``||numerator[b, t]|| / ||denominator[b, t]||`` over the last dim, float32 ``[B, T]``.

    Both ``[B, T, D]`` (any float dtypes, each its own; strides with a unit last stride are read
    in place). The kernel reads each tensor once; the reference takes two norm reductions and a
    division. The exact ratio: a zero denominator gives inf (or NaN over a zero numerator).
    """
    for name, t in (("numerator", numerator), ("denominator", denominator)):
        check_float(OP, name, t)
        if t.dim() != 3:
            raise ValueError(f"{OP}: {name} must be [B, T, D], got shape {tuple(t.shape)}")
    if numerator.shape != denominator.shape:
        raise ValueError(f"{OP}: shapes differ: {tuple(numerator.shape)} and {tuple(denominator.shape)}")
    device = check_same_device(OP, numerator=numerator, denominator=denominator)
    B, T, D = numerator.shape
    unsupported = f"D={D} exceeds {MAX_D}" if next_pow2(D) > MAX_D else None
    if choose_backend(OP, backend, device, unsupported) == "reference" or numerator.numel() == 0:
        return token_norm_ratio_reference(numerator, denominator)
    num, den = (t if t.stride(-1) == 1 else t.contiguous() for t in (numerator, denominator))
    out = _dispatch.empty((B, T), device, torch.float32)
    tile = token_tile(D)  # one tile of each tensor per program (the shared whole-token rule)
    token_norm_ratio_kernel[(triton.cdiv(T, tile["BT"]), B)](
        num_ptr=num, den_ptr=den, out_ptr=out, stride_nb=num.stride(0), stride_nt=num.stride(1),
        stride_db=den.stride(0), stride_dt=den.stride(1), T=T, D=D, **tile)
    return out
