"""Timing, memory and reporting helpers shared by the microbenchmarks."""
from __future__ import annotations

import csv
import datetime
import os
import subprocess
import time

import torch


def environment() -> dict:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    # SELAGG_COMMIT first: gpu_check.sh sets it from the checkout, and an installed copy of the
    # package is no git checkout (or sits in an unrelated one)
    commit = os.environ.get("SELAGG_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            commit = ""
    import triton
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "commit": commit or "?"}



def abmilp_pool_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      num_prefix_tokens: int = 0) -> torch.Tensor:
    """The paper code's formulation (Linear -> softmax over tokens -> (x * a).sum(1)), the "eager" peer
    the benchmarks time: it runs under autocast like the paper's head and materialises the [B, N, D]
    product."""
    z = x[:, num_prefix_tokens:, :]
    w = weight.reshape(-1, weight.shape[-1])
    scores = torch.nn.functional.linear(z, w, None if bias is None else bias.reshape(-1))  # [B, N, K]
    attn = torch.softmax(scores.float(), dim=1)
    pooled = (z.unsqueeze(2) * attn.unsqueeze(-1)).sum(1)  # [B, K, D]
    return pooled[:, 0] if weight.dim() == 1 else pooled


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> tuple:
    """Median, 20% and 80% quantile milliseconds (CUDA events via do_bench; host clock on CPU)."""
    if torch.cuda.is_available():
        import triton.testing
        fn()
        torch.cuda.synchronize()
        med, lo, hi = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return med, lo, hi
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000 * 5
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return q(0.5), q(0.2), q(0.8)


def bench_graph_ms(fn) -> tuple:
    """Like bench_ms, but for one CUDA-graph replay of ``fn``: GPU time without Python launch gaps.

    The probe step launches ~30 small kernels; eagerly its time is the CPU's, not the GPU's.
    A trainer that captures its step (or a busy GPU queue) sees the graph figure.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # autotuning and lazy init happen outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def peak_extra_mib(fn) -> float:
    """Memory allocated during one call beyond what was allocated before it (CUDA only)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written): the ceiling."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _, _ = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def print_banner(what: str, env: dict) -> None:
    """First line of every benchmark: what runs where, with which versions, at which commit."""
    print(f"{what} on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
          f"{env['date']})")


def print_table(rows: list, columns: list, title: str = "") -> None:
    if title:
        print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_csv(path: str, rows: list) -> None:
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
