"""The launcher: its autotuning path with stand-ins for Triton's kernel and autotuner (runs anywhere),
and tuned-then-cached launches of the real ops against the reference (CUDA; the default path elsewhere)."""
import types

import torch

from conftest import DEVICE, rel_err, requires_kernels
from selagg_fast import abmilp_pool, attention_with_stats
from selagg_fast.ops import _dispatch
from selagg_fast.reference import abmilp_pool_reference, attention_with_stats_reference


class _Config:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def all_kwargs(self):
        return dict(self.kwargs)


class _FakeKernel:
    """Records launches: kernel[grid](**kwargs) as ("kernel", kwargs)."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda **kwargs: self.log.append(("kernel", kwargs))


class _FakeAutotuner:
    """Tunes on first sight of a key (names + tensor dtypes), as Triton's autotuner does."""

    def __init__(self, kernel, log, key):
        self.kernel, self.log, self.key = kernel, log, key
        self.best_config = None

    def __getitem__(self, grid):
        def run(**kwargs):
            BT = 8 if kwargs["x"].dtype == torch.float32 else 16
            self.best_config = _Config(BT=BT, num_warps=4)
            self.log.append(("autotuner", kwargs))
        return run


def _launcher(monkeypatch, log):
    import triton

    kernel = _FakeKernel(log)
    monkeypatch.setattr(triton, "autotune", lambda configs, key: lambda fn: _FakeAutotuner(fn, log, key))
    return _dispatch.launcher(kernel, [dict(BT=8, num_warps=4), dict(BT=16, num_warps=4)], key=["D"])


def test_tuned_launches_skip_the_autotuner_once_a_key_is_tuned(monkeypatch):
    monkeypatch.setenv("SELAGG_AUTOTUNE", "1")
    log = []
    launch = _launcher(monkeypatch, log)
    cuda = types.SimpleNamespace(type="cuda")  # the tuned path runs only for CUDA devices
    x32, x16 = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    ran = [launch((1,), cuda, dict(BT=8, num_warps=4), x=x32, D=768),
           launch((1,), cuda, dict(BT=8, num_warps=4), x=x32, D=768),
           launch((1,), cuda, dict(BT=8, num_warps=4), x=x16, D=768),  # another dtype: tuned again
           launch((1,), cuda, dict(BT=8, num_warps=4), x=x32, D=1024),  # another D: tuned again
           launch((1,), cuda, dict(BT=8, num_warps=4), x=x16, D=768)]
    # every launch reports the config it ran: the tuner's pick for its key
    assert [r["BT"] for r in ran] == [8, 8, 16, 8, 16]
    assert [who for who, _ in log] == ["autotuner", "kernel", "autotuner", "autotuner", "kernel"]
    # the direct launches carry the config the autotuner picked for their key
    assert log[1][1]["BT"] == 8 and log[1][1]["num_warps"] == 4 and log[1][1]["D"] == 768
    assert log[4][1]["BT"] == 16 and log[4][1]["x"] is x16


def test_untuned_launches_use_the_default_config(monkeypatch):
    log = []
    launch = _launcher(monkeypatch, log)
    ran = launch((1,), torch.device("cpu"), dict(BT=4, num_warps=2), x=torch.zeros(2), D=768)
    monkeypatch.setenv("SELAGG_AUTOTUNE", "0")
    launch((1,), types.SimpleNamespace(type="cuda"), dict(BT=4, num_warps=2), x=torch.zeros(2), D=768)
    assert ran == dict(BT=4, num_warps=2)
    assert [who for who, _ in log] == ["kernel", "kernel"]
    assert all(kw["BT"] == 4 and kw["num_warps"] == 2 for _, kw in log)


@requires_kernels
def test_tuned_then_cached_launches_give_the_reference(monkeypatch):
    # On CUDA the first call autotunes and later calls reuse the pick without the autotuner; on
    # the CPU both run the default config. Either way every call must give the reference values.
    monkeypatch.setenv("SELAGG_AUTOTUNE", "1")
    x = torch.randn(3, 197, 96, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(96, device=DEVICE) * 0.2
    q, k, v = (torch.randn(2, 2, 197, 64, device=DEVICE).to(torch.bfloat16) for _ in range(3))
    ref_pool = abmilp_pool_reference(x.double(), w.double(), num_prefix_tokens=1, compute_dtype=torch.float64)
    ref_out, ref_stats = attention_with_stats_reference(q.double(), k.double(), v.double(),
                                                        compute_dtype=torch.float64)
    # the K = 1 backward with more images than image walkers (4 an SM: B > 528 on an H200), so that
    # programs reduce several images each
    xb = torch.randn(600 if DEVICE == "cuda" else 9, 33, 96, device=DEVICE).to(torch.bfloat16)
    wb = w.detach().clone().requires_grad_(True)
    wb64 = w.detach().double().requires_grad_(True)
    abmilp_pool_reference(xb.double(), wb64, num_prefix_tokens=1, compute_dtype=torch.float64).sum().backward()
    for _ in range(2):
        assert rel_err(abmilp_pool(x, w, num_prefix_tokens=1), ref_pool) < 1.5e-2
        (grad,) = torch.autograd.grad(abmilp_pool(xb, wb, num_prefix_tokens=1).float().sum(), (wb,))
        assert rel_err(grad, wb64.grad) < 3e-2
        out, stats = attention_with_stats(q, k, v)
        assert rel_err(out, ref_out) < 1.5e-2
        assert (stats.self_attn.double().cpu() - ref_stats.self_attn.cpu()).abs().max() < 5e-3
