"""The mixed-precision decision shared by every command that runs a backbone (``--precision``)."""
from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether the backbone runs under bfloat16 autocast: ``bf16``, or ``auto`` on a CUDA device
    (a CPU's bf16 matmuls are slower than its fp32 ones, and no faster kernel runs there)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")
