"""`selagg-fast demo`: checks the fused AbMILP op against the float64 reference and benchmarks it.

The probing trainer's demo replaces this once it lands; until then the main job is the
op everyone calls.
"""
from __future__ import annotations

import torch

from .ops import abmilp_pool
from .ops._dispatch import interpreter_active
from .reference import abmilp_pool_reference


def run_demo(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = "Triton kernels" if device == "cuda" or interpreter_active() else "PyTorch reference (no GPU)"
    print(f"selagg-fast demo on {device}: abmilp_pool runs the {path}")
    torch.manual_seed(0)
    x = torch.randn(8, 197, 384, device=device)
    w = torch.randn(4, 384, device=device) * 384 ** -0.5
    b = torch.zeros(4, device=device)
    pooled, weights = abmilp_pool(x, w, b, num_prefix_tokens=1, return_weights=True)
    ref, ref_w = abmilp_pool_reference(x.double(), w.double(), b.double(), num_prefix_tokens=1,
                                       return_weights=True, compute_dtype=torch.float64)
    err = ((pooled.double() - ref).norm() / ref.norm()).item()
    print(f"pooled {tuple(pooled.shape)}, weights {tuple(weights.shape)}: relative error vs float64 {err:.2e}")
    from .bench import abmilp
    abmilp.run(quick=True, with_compile=False, csv_path=f"{args.out}/abmilp.csv")
