"""`selagg-fast bench analyze`: end-to-end images/s of `analyze`, kernel-bound and I/O-bound.

Kernel-bound: the analysis forward (every attention layer on the streaming-statistics kernel,
running sums, magnitudes) over device-resident generated batches, against a plain fused-
attention forward over the same batches (target: >= 0.9x). I/O-bound: the whole `analyze`
command over JPEG files through the DataLoader, so a user knows which one limits a 50k run.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from selagg_fast.analysis.analyze import AnalyzeConfig, forward_batch, run_analyze
from selagg_fast.backbone import create_backbone
from selagg_fast.data import analysis_images, collate_skipping
from selagg_fast.modules import record_attention_stats

from .common import environment, peak_extra_mib, print_banner, print_table, write_csv


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, autotuning, cuDNN plans
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _write_jpegs(folder: str, count: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
    for i in range(count):  # ImageNet-sized JPEGs (500 x 375), a cheap variation each
        Image.fromarray(np.roll(base, i, axis=1)).save(os.path.join(folder, f"img_{i:05d}.jpg"), quality=90)


def run(quick: bool = False, csv_path: str = "bench/out/analyze.csv") -> list:
    env = environment()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print_banner("Analyze benchmark", env)
    name, kwargs, batch, n_batches, n_jpegs = ("vit_base_patch16_224", {}, 256, 8, 4096 if not quick else 2048) \
        if cuda else ("vit_tiny_patch16_224", dict(depth=4), 8, 2, 64)
    if not cuda:
        print("No CUDA device: a 4-block ViT-Tiny at batch 8 on the CPU (GPU figures need CUDA).")
    backbone = create_backbone(name, random_init=True, **kwargs).to(device)
    batches = [torch.randn(batch, 3, 224, 224, device=device) for _ in range(n_batches)]

    def plain():
        for images in batches:
            forward_batch(backbone, images, cuda)

    def analysed():
        with record_attention_stats(backbone.model) as rec:
            for images in batches:
                forward_batch(backbone, images, cuda)
            rec.summary()  # the device -> host copy of the sums, as analyze does at the end

    images = batch * n_batches
    rows = []
    t_plain = _timed(plain, 3)
    rows.append(dict(model=name, batch=batch, pipeline="plain fused-attention forward (generated tensors)",
                     img_s=images / t_plain, ratio_to_plain=1.0, peak_MiB=peak_extra_mib(plain)))
    t_an = _timed(analysed, 3)
    rows.append(dict(model=name, batch=batch, pipeline="analyze forward + running sums (generated tensors)",
                     img_s=images / t_an, ratio_to_plain=t_plain / t_an, peak_MiB=peak_extra_mib(analysed)))
    cols = ["model", "batch", "pipeline", "img_s", "ratio_to_plain", "peak_MiB"]
    # the kernel-bound figures first: the JPEG run below is the slow part
    print_table(rows, cols, title="Analyze throughput, kernel-bound (targets: >= 0.9x plain, peak memory <= 1.1x "
                                  "plain)")
    write_csv(csv_path, [dict(r, **env) for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        _write_jpegs(tmp, n_jpegs)
        workers = min(16, os.cpu_count() or 1)

        # 64-image batches for the JPEG rows: with 256 a few thousand images are fewer batches than
        # workers (each worker decodes whole batches), and the timing would be one worker's batch
        jpeg_batch = 64

        def analyze(limit, out):
            return run_analyze(AnalyzeConfig(model=name, random_init=True, model_kwargs=kwargs, data=tmp, limit=limit,
                                             batch_size=jpeg_batch, workers=workers,
                                             output_dir=os.path.join(tmp, out), progress=False))
        analyze(jpeg_batch, "warm-up")  # first calls at this batch (compiling, tuning) outside the timing
        stats = analyze(None, "out")
        rows.append(dict(model=name, batch=jpeg_batch, pipeline=f"analyze command, {n_jpegs} JPEGs 500x375, "
                         f"{workers} workers", img_s=stats["images_per_s"],
                         ratio_to_plain=stats["images_per_s"] / rows[0]["img_s"]))
        loader = DataLoader(analysis_images(tmp, 224), batch_size=jpeg_batch, num_workers=workers,
                            collate_fn=collate_skipping)
        rate = n_jpegs / _timed(lambda: sum(len(b[0]) for b in loader), 1)  # workers started per pass, as in analyze
        rows.append(dict(model=name, batch=jpeg_batch, pipeline=f"DataLoader alone (decode + transforms), "
                         f"{workers} workers", img_s=rate, ratio_to_plain=rate / rows[0]["img_s"]))
    print_table(rows[2:], cols, title="Analyze throughput, I/O-bound (the analyze command over JPEGs)")
    rows = [dict(r, **env) for r in rows]
    write_csv(csv_path, rows)
    return rows
