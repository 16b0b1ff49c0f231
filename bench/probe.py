"""`selagg-fast bench probe`: what training many probe heads costs on top of the frozen backbone.

Training-step throughput on synthetic image tensors: the backbone forward alone, then the
forward plus 12 heads (cls, avg, selective x 4 base lrs; BatchNorm + Linear(D, 1000), LARS
step) with the fused abmilp_pool and with the eager reference. Target: the fused heads cost
at most 5% of the backbone-only throughput.
"""
from __future__ import annotations

import statistics

import torch

from selagg_fast.backbone import create_backbone
from selagg_fast.probe.heads import ProbeHeads, parse_heads, probe_loss
from selagg_fast.probe.optim import build_optimizer, set_lr

from .common import bench_ms, environment, print_banner, print_table, write_csv

MODELS = [("ViT-B", "vit_base_patch16_224", {}, 1024), ("ViT-L", "vit_large_patch16_224", {}, 1024)]
CPU_MODELS = [("tiny-CPU", "vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=4), 64)]
HEADS, LRS, NUM_CLASSES = "cls,avg,selective", (0.05, 0.1, 0.2, 0.4), 1000
ROUNDS, REP_MS = 3, 1500  # on a GPU: each variant timed for ~1.5 s in each of 3 interleaved rounds


def _step_fn(backbone, heads, optimizer, images, labels, autocast):
    def step():
        with torch.no_grad(), autocast():
            tokens = backbone(images)
        tokens = tokens.to(torch.bfloat16 if images.is_cuda else torch.float32)
        if heads is None:
            return
        with autocast():
            loss, _ = probe_loss(heads(tokens), labels)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run(quick: bool = False, csv_path: str = "bench/out/probe.csv") -> list:
    env = environment()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print_banner("Probe-step benchmark", env)
    if not cuda:
        print("No CUDA device: a tiny ViT at a small batch on the CPU, reference heads only (GPU figures need CUDA).")
    models = (MODELS[:1] if quick else MODELS) if cuda else CPU_MODELS

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)

    rows = []
    for label, name, kwargs, B in models:
        torch.manual_seed(0)
        backbone = create_backbone(name, random_init=True, **kwargs).to(device)
        size = backbone.info.img_size
        images = torch.randn(B, 3, size, size, device=device)
        labels = torch.randint(0, NUM_CLASSES, (B,), device=device)
        steps = {"none (backbone forward)": _step_fn(backbone, None, None, images, labels, autocast)}
        for backend in (["triton", "reference"] if cuda else ["reference"]):
            heads = ProbeHeads(parse_heads(HEADS), LRS, backbone.info.embed_dim, NUM_CLASSES,
                               backbone.info.num_prefix_tokens, backend=backend).to(device)
            opt = build_optimizer(heads, "lars", B)
            set_lr(opt, 5.0, 90, 10)
            steps[f"12 ({'fused' if backend == 'triton' else 'eager'})"] = _step_fn(
                backbone, heads, opt, images, labels, autocast)
        # A step takes 0.1-0.4 s, so one do_bench call times only a few steps, and the backbone's own
        # time drifts by several percent between calls (H200: 117-127 ms at ViT-B): the overhead
        # is a difference of two such figures. Time the variants in turn, ROUNDS times, and compare
        # medians; spread_pct shows how far a variant's rounds lay apart.
        times = {name: [] for name in steps}
        for _ in range(ROUNDS if cuda else 1):
            for name, step in steps.items():
                times[name].append(bench_ms(step, warmup_ms=REP_MS / 10, rep_ms=REP_MS)[0] if cuda
                                   else bench_ms(step)[0])
        base = statistics.median(times["none (backbone forward)"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append(dict(model=label, batch=B, heads=name, ms=ms, img_s=B / ms * 1e3,
                             overhead_pct=100 * (ms / base - 1), spread_pct=100 * (max(ts) - min(ts)) / ms))
        del backbone, steps  # the step closures hold the model too
        if cuda:
            torch.cuda.empty_cache()
        # each model's table as soon as it is measured (a run cut short keeps what it has)
        print_table([r for r in rows if r["model"] == label],
                    ["model", "batch", "heads", "ms", "img_s", "overhead_pct", "spread_pct"],
                    title=f"Probe training step, {label}: backbone forward + 12 heads (cls/avg/selective x 4 lrs), "
                          f"bf16, medians of {ROUNDS if cuda else 1} interleaved rounds (target: fused overhead <= 5%)")
        write_csv(csv_path, [dict(r, **env) for r in rows])
    return [dict(r, **env) for r in rows]
