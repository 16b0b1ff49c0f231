"""NVTX ranges for Nsight Systems, a no-op where neither ``nvtx`` nor CUDA is present."""
from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:  # optional dependency (extra "nvtx"); torch's own NVTX binding is used instead
    _nvtx = None


def nvtx_range(name: str):
    if _nvtx is not None:
        return _nvtx.annotate(name)
    import torch
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()
