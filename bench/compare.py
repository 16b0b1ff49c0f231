"""`selagg-fast bench compare`: images/s and peak memory of `compare`'s per-batch work.

Over device-resident generated batches: the probe backbone's forward with the probed block's
[cls] and central-patch attention rows captured, a selective and an attentive head's weights,
the three attention selections and the float64 entropy / KL running sums, against a plain
fused-attention forward over the same batches (targets: >= 0.85x its images/s, <= 1.1x its
peak memory). ViT-B at batch 256 on a GPU; a small ViT-Tiny shape on a CPU (labelled CPU).
"""
from __future__ import annotations

import torch

from selagg_fast.analysis.analyze import forward_batch
from selagg_fast.analysis.compare import DivergenceSums, _Methods
from selagg_fast.backbone import create_backbone
from selagg_fast.probe.heads import ProbeHeads, parse_heads

from .analyze import _timed
from .common import environment, peak_extra_mib, print_banner, print_table, write_csv

HEADS = "selective,ap12"
METHODS = ["selective@0.1", "ap12@0.1", "cls_mean", "cls_min_entropy", "center_mean"]


def run(quick: bool = False, csv_path: str = "bench/out/compare.csv") -> list:
    env = environment()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print_banner("Compare benchmark", env)
    name, kwargs, batch, n_batches = ("vit_base_patch16_224", {}, 256, 8) if cuda else \
        ("vit_tiny_patch16_224", dict(depth=4), 8, 2)
    where = "GPU" if cuda else "CPU"
    if not cuda:
        print("No CUDA device: a 4-block ViT-Tiny at batch 8 on the CPU (GPU figures need CUDA).")
    backbone = create_backbone(name, random_init=True, **kwargs).to(device)
    info = backbone.info
    heads = ProbeHeads(parse_heads(HEADS), [0.1], info.embed_dim, 1000, info.num_prefix_tokens,
                       grid_size=info.patch_grid).to(device).eval()
    batches = [torch.randn(batch, 3, info.img_size, info.img_size, device=device) for _ in range(n_batches)]

    def plain():
        for images in batches:
            forward_batch(backbone, images, cuda)

    def compared(methods):
        compute = _Methods(backbone, heads, methods)

        def fn():
            sums = DivergenceSums(len(methods), device)
            for images in batches:
                with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                    sums.update(compute(images))
            sums.summary()  # the device -> host copy of the sums, as compare does at the end
        return fn

    images = batch * n_batches
    t_plain = _timed(plain, 3)
    peak_plain = peak_extra_mib(plain)
    rows = [dict(model=name, batch=batch, device=where, pipeline="plain fused-attention forward (generated tensors)",
                 img_s=images / t_plain, ratio_to_plain=1.0, peak_MiB=peak_plain, peak_ratio=1.0)]
    for label, methods in ((f"compare: rows + {HEADS} heads + 3 attention methods + sums", METHODS),
                           ("compare: rows + 3 attention methods + sums (no trained heads)", METHODS[2:])):
        fn = compared(methods)
        t = _timed(fn, 3)
        peak = peak_extra_mib(fn)
        rows.append(dict(model=name, batch=batch, device=where, pipeline=label, img_s=images / t,
                         ratio_to_plain=t_plain / t, peak_MiB=peak,
                         peak_ratio=peak / peak_plain if cuda else float("nan")))
    cols = ["model", "batch", "device", "pipeline", "img_s", "ratio_to_plain", "peak_MiB", "peak_ratio"]
    print_table(rows, cols, title="Compare throughput (targets: >= 0.85x plain images/s, peak memory <= 1.1x "
                                  "plain)")
    rows = [dict(r, **env) for r in rows]
    write_csv(csv_path, rows)
    return rows
