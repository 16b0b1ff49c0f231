import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from selagg_fast.ops import _dispatch

# Kernels run on CUDA when present, else on the CPU through TRITON_INTERPRET=1.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUN = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned(monkeypatch):
    """Allocate every kernel output NaN-filled, so an element a kernel forgets to write fails."""

    def empty(shape, device, dtype):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    monkeypatch.setattr(_dispatch, "empty", empty)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values in the result"
    # an absolute floor so that an exactly-zero expectation (e.g. one pooled token) still compares
    floor = 1e-6 * expected.numel() ** 0.5
    return ((actual - expected).norm() / (expected.norm() + floor)).item()


requires_kernels = pytest.mark.skipif(
    not KERNELS_RUN, reason="kernels need CUDA or TRITON_INTERPRET=1 (the README's test command sets it)")


class AtenOps(TorchDispatchMode):
    """Records the name of every aten op dispatched inside the ``with`` block (Triton launches
    are not aten ops; under the interpreter they show up as copy_/set_/new_empty of arguments)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class AtenOutputs(TorchDispatchMode):
    """(op name, output shape) of every aten op dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.seen.append((func.overloadpacket.__name__, tuple(t.shape)))
        return out


def expected_selection_weights(A, method, P, grid):
    """docs/statistics.md's "Attention selections" from float64 attention maps ``A [B, H, T, T]``:
    the [cls] row averaged over heads, the lowest-entropy head's, or the central patch's row
    (row and column ``floor(g / 2) - 1`` of each side), renormalised over the patch keys."""
    def renorm(r):
        return r[..., P:] / r[..., P:].sum(-1, keepdim=True)
    if method == "cls_mean":
        return renorm(A[:, :, 0].mean(1))
    if method == "cls_min_entropy":
        per_head = renorm(A[:, :, 0])  # [B, H, N]
        ent = -(per_head * per_head.log()).sum(-1)
        return per_head[torch.arange(len(A)), ent.argmin(1)]
    rows, cols = grid
    q = P + max(rows // 2 - 1, 0) * cols + max(cols // 2 - 1, 0)
    return renorm(A[:, :, q].mean(1))


# ops that mean a zero-filled tensor was made: a kernel launch each on the GPU
FILLS = {"zeros", "zero_", "fill_", "new_zeros", "zeros_like", "select_backward", "select_scatter"}


def run_cli(args, nproc=None, env_extra=None, timeout=600) -> str:
    """``selagg-fast ARGS`` in a subprocess (under torchrun with ``nproc`` processes); its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc else [sys.executable]
    proc = subprocess.run(prefix + ["-m", "selagg_fast.cli"] + args, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
