"""Host (CPU) time per call of the fused ops against their GPU time.

Usage (CUDA only): python -m selagg_fast.bench.host_overhead
An eager timing is the larger of the two: a call whose Python and launch path costs more than
its kernels leaves the GPU idle, and do_bench's figure grows with the host time. Prints, per
case, microseconds of host time per call (back-to-back calls, no sync), the do_bench median
and the CUDA-graph replay (GPU time alone), then a cProfile of the K=1 forward's host path.
"""
from __future__ import annotations

import cProfile
import pstats
import time

import torch

from selagg_fast import abmilp_pool, attention_with_stats
from selagg_fast.kernels.abmilp import abmilp_fwd_single_kernel
from selagg_fast.ops import abmilp as abmilp_ops

from .common import bench_graph_ms, bench_ms, print_table


def host_us(fn, calls: int = 300) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _probe_train_step(tokens):
    """One step of the probe trainer's heads (cls, avg, selective x 4 lrs) on given tokens: cached-feature training."""
    from selagg_fast.probe.heads import ProbeHeads, parse_heads, probe_loss
    from selagg_fast.probe.optim import build_optimizer, set_lr

    from .probe import HEADS, LRS, NUM_CLASSES  # the heads `bench probe` times behind a backbone

    heads = ProbeHeads(parse_heads(HEADS), LRS, tokens.shape[-1], NUM_CLASSES, 1).to(tokens.device)
    optimizer = build_optimizer(heads, "lars", tokens.shape[0])
    set_lr(optimizer, 5.0, 90, 10)
    labels = torch.randint(0, NUM_CLASSES, (tokens.shape[0],), device=tokens.device)

    def step():
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=tokens.is_cuda):
            loss, _ = probe_loss(heads(tokens), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main() -> None:
    if not torch.cuda.is_available():
        print("host_overhead: needs a CUDA device (it compares host time with GPU time); nothing to do.")
        return
    B, T, D = 1024, 197, 768
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(D, device="cuda") * D ** -0.5
    w16 = torch.randn(16, D, device="cuda") * D ** -0.5
    b = torch.zeros((), device="cuda")
    wg = w1.clone().requires_grad_(True)
    grad_out = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (torch.randn(256, 12, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    out = torch.empty(B, 1, D, device="cuda", dtype=torch.bfloat16)
    lse = torch.empty(B, 1, device="cuda")
    raw_args = dict(x_ptr=x, w_ptr=w1, bias_ptr=w1, out_ptr=out, out32_ptr=out, lse_ptr=lse, s_ptr=lse,
                    stats_ptr=lse, stride_xb=x.stride(0), stride_xt=x.stride(1), P=1, N=T - 1, D=D, eps=1e-6,
                    HAS_BIAS=False,
                    STORE_F32=False, STORE_SCORES=False, BD=1024, BT=8, num_warps=4, PREFETCH=False)

    def pool_step():
        abmilp_pool(x, wg, num_prefix_tokens=1).backward(grad_out)

    cases = {
        "pool fwd K=1 (public op)": lambda: abmilp_pool(x, w1, b, num_prefix_tokens=1),
        "pool fwd K=1 (abmilp_fwd launcher)": lambda: abmilp_ops.abmilp_fwd(x, w1.view(1, D), None, 1, store_f32=False, store_scores=False),
        "pool fwd K=1 (bare kernel launch)": lambda: abmilp_fwd_single_kernel[(B,)](**raw_args),
        "pool fwd K=16 (public op)": lambda: abmilp_pool(x, w16, num_prefix_tokens=1),
        "pool fwd+bwd K=1 (public op)": pool_step,
        "attention_with_stats ViT-B": lambda: attention_with_stats(q, k, v),
        # head-only training from cached tokens: the trainer's default 12 pairs, LARS
        "probe train step, 12 heads (cached tokens)": _probe_train_step(x),
    }
    rows = []
    for name, fn in cases.items():
        host = host_us(fn, calls=300 if "train step" not in name else 50)
        med = bench_ms(fn)[0]
        # the train step is not captured (autograd and the optimizer's state as they run in the trainer)
        graph = bench_graph_ms(fn)[0] if "train step" not in name else float("nan")
        rows.append(dict(case=name, host_us=host, do_bench_ms=med, graph_ms=graph))
    print_table(rows, ["case", "host_us", "do_bench_ms", "graph_ms"],
                title=f"Host time per call vs GPU time ({torch.cuda.get_device_name()})")

    profile = cProfile.Profile()
    fn = cases["pool fwd K=1 (public op)"]
    profile.enable()
    for _ in range(300):
        fn()
    profile.disable()
    torch.cuda.synchronize()
    print("\ncProfile, 300 calls of the K=1 forward (public op), by own time:")
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
