"""`selagg-fast bench sweep`: time the kernels over a wide grid of launch configs (GPU only).

The library launches a short autotune list; this sweep shows what the current kernels can reach
at the target shapes (AbMILP K=1 and K=16 forward, attention+stats, and the probe step's K=1 and
K=4 backward, all at ViT-B) and which tile /
warp / stage choice gets there, so a GPU session spends its minutes on the right change. Each
config's output is checked against the first one's before it is timed.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import torch

from selagg_fast import abmilp_pool, attention_with_stats
from selagg_fast.ops import abmilp as abmilp_ops
from selagg_fast.ops import attention as attention_ops

from .common import bench_ms, environment, print_banner, print_table, write_csv


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _run_grid(label, configs, patch, call, check):
    rows, first = [], None
    for cfg in configs:
        try:
            with patch(cfg):
                got = call()
                if first is None:
                    first = got
                err = check(got, first)
                ms = bench_ms(call)[0]
        except Exception as e:  # e.g. a tile that needs more shared memory than an SM has
            rows.append(dict(kernel=label, config=str(cfg), ms=float("nan"), max_err=float("nan"),
                             note=f"{type(e).__name__}: {str(e)[:80]}"))
            continue
        rows.append(dict(kernel=label, config=str(cfg), ms=ms, max_err=err, note=""))
    return rows


def _pool_call(x, w, b):
    def call():
        with torch.no_grad():
            return abmilp_pool(x, w, b, num_prefix_tokens=1, backend="triton")
    return call


def _max_abs_diff(got, ref) -> float:
    return (got.float() - ref.float()).abs().max().item()


def _whole_configs(BD: int, K: int) -> list:
    """The split kernels' one-program-an-image (WHOLE) configs, where the accumulator fits."""
    if BD * abmilp_ops.dot_dim(K) > abmilp_ops.MAX_ACC_ELEMENTS:
        return []
    return [dict(BC=BD, BT=bt, num_warps=8, num_stages=ns, WHOLE=True)
            for bt, ns in itertools.product((16, 32), (2, 3))]


@contextlib.contextmanager
def _pooling_config(cfg):
    """Launch every pooling kernel with its default config updated by ``cfg`` (PROGRAMS_PER_SM:
    the K = 1 backward's launcher setting)."""
    cfg = dict(cfg)
    programs = cfg.pop("PROGRAMS_PER_SM", abmilp_ops.SINGLE_BWD_PROGRAMS_PER_SM)
    single, split = abmilp_ops.single_config, abmilp_ops.split_config
    with _patched(abmilp_ops, SINGLE_BWD_PROGRAMS_PER_SM=programs,
                  single_config=lambda D_: dict(single(D_), **cfg),
                  split_config=lambda D_, K_, *, fp32: dict(split(D_, K_, fp32=fp32), **cfg)):
        yield


def sweep_abmilp(device, dtype, B, T, D) -> list:
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    w = torch.randn(D, device=device) * D ** -0.5
    b = torch.zeros((), device=device)
    configs = [dict(BT=bt, num_warps=nw, num_stages=ns, PREFETCH=pf)
               for pf, bt, nw, ns in itertools.product((False, True), (2, 4, 8, 16), (1, 2, 4, 8), (1,))
               if bt * abmilp_ops.next_pow2(D) <= abmilp_ops.MAX_TILE_ELEMENTS]
    return _run_grid(f"abmilp K=1 fwd {B}x{T}x{D}", configs, _pooling_config, _pool_call(x, w, b), _max_abs_diff)


def sweep_abmilp_multi(device, dtype, B, T, D, K) -> list:
    """K>1 forward: the split kernels over chunk width x tokens x warps x stages, and whole-image programs."""
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    w = torch.randn(K, D, device=device) * D ** -0.5
    b = torch.zeros(K, device=device)
    BD = abmilp_ops.dot_dim(D)
    configs = [dict(BC=bc, BT=bt, num_warps=nw, num_stages=ns)
               for bc, bt, nw, ns in itertools.product((64, 128, 256, 512, 1024), (16, 32), (4, 8), (2, 3))
                if bc <= BD and (bc >= 128 or BD < 128)]  # 2+ stages: async token copies
    configs += _whole_configs(BD, K)  # one program an image, each tile read once
    return _run_grid(f"abmilp K={K} fwd {B}x{T}x{D}", configs, _pooling_config, _pool_call(x, w, b), _max_abs_diff)


def sweep_abmilp_backward(device, dtype, B, T, D, K) -> list:
    """Backward without dx (the probe step: frozen tokens): K=1 (tiles x warps x image walkers per
    SM), or K>1 (split and whole-image configs)."""
    x = torch.randn(B, T, D, device=device, dtype=dtype)
    w = torch.randn(K, D, device=device) * D ** -0.5
    b = torch.zeros(K, device=device)
    out, out32, lse, scores, _ = abmilp_ops.abmilp_fwd(x, w, b, 1, store_f32=True, store_scores=K == 1)
    dout = torch.randn_like(out)
    BD = abmilp_ops.dot_dim(D)
    if K == 1:
        # also the grid: image walkers per SM (4: ~2 images a program at ViT-B; 8: one, as the forward)
        configs = [dict(BT=bt, num_warps=nw, PROGRAMS_PER_SM=n)
                   for bt, nw, n in itertools.product((2, 4, 8, 16), (1, 2, 4, 8), (4, 8))
                   if bt * BD <= abmilp_ops.MAX_TILE_ELEMENTS]
    else:
        configs = [dict(BC=bc, BT=bt, num_warps=nw, num_stages=2)
                    for bc, bt, nw in itertools.product((256, 1024), (16, 32), (4, 8)) if bc <= BD]
        configs += _whole_configs(BD, K)

    def call():  # the weight gradient
        return abmilp_ops.abmilp_bwd(x, w, b, 1, lse, out32, dout, need_dx=False, scores=scores)[1]

    return _run_grid(f"abmilp K={K} bwd (no dx) {B}x{T}x{D}", configs, _pooling_config, call, _max_abs_diff)


def sweep_attention(device, dtype, B, H, T, d) -> list:
    q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype) for _ in range(3))
    BD = attention_ops.dot_dim(d)
    # kernel variants: one masked key loop; the tail key block peeled (full blocks unmasked). (The
    # head-dim mask is dropped whenever d is a power of two.)
    variants = [dict(PEEL_TAIL=False), dict(PEEL_TAIL=True)]
    configs = [dict(BM=bm, BN=bn, num_warps=nw, num_stages=ns, **var)
               for var in variants
               for bm, bn, nw, ns in itertools.product((64, 128), (32, 64), (4, 8), (1, 2, 3))]

    def patch(cfg):
        return _patched(attention_ops, _launch_config=lambda d_, fp32=False: dict(cfg, BD=BD))

    def call():
        return attention_with_stats(q, k, v, num_prefix_tokens=1, backend="triton")

    def check(got, ref):
        return max((a.float() - b.float()).abs().max().item() for a, b in zip((got[0], *got[1]), (ref[0], *ref[1])))

    return _run_grid(f"attention+stats {B}x{H}x{T}x{d}", configs, patch, call, check)


def run(quick: bool = False, csv_path: str = "bench/out/sweep.csv") -> list:
    env = environment()
    cuda = torch.cuda.is_available()
    print_banner("Launch-config sweep", env)
    if not cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("No CUDA device and no TRITON_INTERPRET=1: the sweep needs the kernels; nothing to do.")
        return []
    os.environ["SELAGG_AUTOTUNE"] = "0"  # every call launches the patched config
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    groups = [lambda: sweep_abmilp(device, dtype, *((1024, 197, 768) if cuda else (2, 9, 16))),
              lambda: sweep_abmilp_multi(device, dtype, *((1024, 197, 768, 16) if cuda else (2, 9, 40, 3)))]
    if not quick:
        groups.append(lambda: sweep_attention(device, dtype, *((256, 12, 197, 64) if cuda else (1, 1, 40, 16))))
        # the probe step's backward: one branch, and the trainer's four selective lrs
        groups += [lambda K=K: sweep_abmilp_backward(device, dtype, *((1024, 197, 768) if cuda else (2, 9, 40)), K)
                   for K in (1, 4)]
    rows = []
    for group in groups:  # each group's tables and the CSV as soon as it is measured (a run cut short keeps them)
        measured = group()
        for kernel in dict.fromkeys(r["kernel"] for r in measured):
            mine = sorted((r for r in measured if r["kernel"] == kernel),
                          key=lambda r: (r["ms"] != r["ms"], r["ms"]))
            print_table(mine[:12], ["config", "ms", "max_err", "note"], title=f"Sweep: {kernel} (fastest first)")
        rows += [dict(r, **env) for r in measured]
        write_csv(csv_path, rows)
    return rows
