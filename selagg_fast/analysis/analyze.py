"""`selagg-fast analyze`: per-block, per-head attention statistics over a whole image set.

One frozen backbone pass with ``record_attention_stats``: every attention layer runs the
streaming kernel, per-image columns are summed on the device (memory does not grow with the
number of images), and the sums are checkpointed so an interrupted run resumes. Under
torchrun every process takes every W-th batch and rank 0 adds the sums up.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..backbone import BackboneSettings
from ..datasets import analysis_dataset, check_data_flags
from ..distributed import barrier, check_device, init_distributed
from ..files import (absolute_path, atomic_json, atomic_write, check_number, check_writable, refuse_existing_run,
                     run_holding_output)
from ..modules import record_attention_stats
from ..precision import PRECISIONS, uses_bf16
from ..reference import CLS_COLUMNS
from .image_pass import INTERRUPTED, ImagePass

log = logging.getLogger("selagg_fast")


@dataclass
class AnalyzeConfig(BackboneSettings):
    data: str | None = None
    dataset: str = "imagefolder"
    limit: int | None = None
    batch_size: int = 512
    workers: int = 8
    magnitudes: bool = True
    precision: str = "auto"
    output_dir: str = "analyze_out"
    name: str | None = None
    resume: bool = False
    save_every: int = 20
    device: str = "auto"
    progress: bool = True
    seed: int = 0  # seeds a --random-init model exactly as `probe --seed` does


def forward_batch(backbone, images: torch.Tensor, use_bf16: bool) -> None:
    """One analysed batch: the frozen forward; the patched attention layers add to the running sums."""
    device = next(backbone.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        backbone(images.to(device, non_blocking=True))


def _gathered_state(recorder, unreadable: int) -> dict:
    """Sum of every process's running sums (float64) and unreadable count, on rank 0's CPU."""
    state = dict(recorder.state_dict(), unreadable=unreadable)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return state
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    total = {"images": sum(s["images"] for s in states), "unreadable": sum(s["unreadable"] for s in states),
             "sums": {}}
    for s in states:
        for column, by_block in s["sums"].items():
            into = total["sums"].setdefault(column, {})
            for block, t in by_block.items():
                into[block] = into[block] + t if block in into else t.clone()
    return total


def write_outputs(out: str, run_name: str, meta: dict, summary: dict) -> dict:
    """``stats.json`` (metric -> [L][H]; strict JSON: a non-finite value is ``null``) and
    ``stats.csv`` (run, block, head, metric, value), each written atomically."""
    stats = dict(meta, metrics={k: v.tolist() for k, v in summary.items()})
    _warn_undefined(stats["metrics"])
    atomic_json(os.path.join(out, "stats.json"), stats)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "block", "head", "metric", "value"])
            for metric, table in summary.items():
                for li, block in enumerate(meta["blocks"]):
                    for h in range(table.shape[1]):
                        # magnitude ratios are per block (one value): head "all"
                        w.writerow([run_name, block, h if table.shape[1] > 1 else "all", metric,
                                    repr(float(table[li, h]))])
    atomic_write(os.path.join(out, "stats.csv"), write_csv)
    return stats


def validate_analyze(cfg: "AnalyzeConfig") -> None:
    """Every flag's value checked before a model is built or an image read."""
    check_image_pass(cfg)
    check_number("--seed", cfg.seed, minimum=0, integer=True)
    cfg.check_backbone()


def check_image_pass(cfg) -> None:
    """The flags every pass over validation images has (analyze, compare): data, batching,
    checkpoints of the running sums, precision, device."""
    if cfg.data is None:
        raise ValueError("--data is required: a folder of images (ImageNet val layout or flat, or see --dataset), "
                         "or 'synthetic'")
    check_data_flags(cfg.dataset, cfg.data)
    check_number("--batch-size", cfg.batch_size, minimum=1, integer=True)
    check_number("--limit", cfg.limit, minimum=1, integer=True, optional=True)
    check_number("--workers", cfg.workers, minimum=0, integer=True)
    check_number("--save-every", cfg.save_every, minimum=1, integer=True)
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision {cfg.precision!r}: choose auto, bf16 or fp32")
    check_device(cfg.device)


def check_fresh_output(out: str, resume: bool, flag: str = "--output-dir") -> None:
    """The output folder is writable (checked before any work) and holds no finished run unless resuming."""
    check_writable(out, flag=flag)
    refuse_existing_run(out, ANALYZE_FILES, resume, flag=flag)


# What an analyze run writes: any of them in --output-dir means a run, refused without --resume.
ANALYZE_FILES = ("stats.json", "stats.csv", "partial.rank*.pt")


def run_analyze(cfg: AnalyzeConfig) -> dict:
    """Rank 0 holds ``--output-dir``'s lock for the whole run: a second run on it is refused."""
    validate_analyze(cfg)
    return run_holding_output(cfg.output_dir, lambda is_main: _run_analyze(cfg, is_main), INTERRUPTED)


def _run_analyze(cfg: AnalyzeConfig, is_main: bool) -> dict:
    out = cfg.output_dir
    if is_main:
        check_fresh_output(out, cfg.resume)
    dist_info = init_distributed(cfg.device)
    device = dist_info.device
    use_bf16 = uses_bf16(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    backbone = cfg.create_backbone().to(device)
    info = backbone.info
    dataset = analysis_dataset(cfg.dataset, cfg.data, info.img_size, cfg.limit)
    os.makedirs(out, exist_ok=True)
    run_name = cfg.name or os.path.basename(os.path.normpath(out))

    settings = dict(model=cfg.model, checkpoint=absolute_path(cfg.checkpoint, keep=()),
                    checkpoint_key=cfg.checkpoint_key, model_kwargs=cfg.model_kwargs, return_block=cfg.return_block,
                    data=absolute_path(cfg.data), dataset=cfg.dataset, limit=cfg.limit, images=len(dataset),
                    batch_size=cfg.batch_size, world_size=dist_info.world_size,
                    magnitudes=cfg.magnitudes, precision="bf16" if use_bf16 else "fp32",
                    **({"random_init_seed": cfg.seed} if cfg.random_init else {}))
    ctx = record_attention_stats(backbone.model, magnitudes=cfg.magnitudes)
    pass_ = ImagePass(dataset, batch_size=cfg.batch_size, dist_info=dist_info, out=out, settings=settings,
                      resume=cfg.resume, state=lambda: dict(recorder=ctx.recorder.state_dict()),
                      load=lambda saved: ctx.recorder.load_state_dict(saved["recorder"], device=device),
                      workers=cfg.workers, save_every=cfg.save_every, desc=f"analyze {cfg.model}",
                      progress=cfg.progress)
    with ctx as recorder:
        for images in pass_.batches():
            forward_batch(backbone, images, use_bf16)
    state = _gathered_state(recorder, pass_.unreadable)
    stats = None
    if dist_info.is_main:
        recorder.load_state_dict(state)
        if recorder.images == 0:  # statistics of no image would be NaN or 0 columns read as results
            raise ValueError(f"--data {cfg.data}: no readable image ({state['unreadable']} unreadable); nothing "
                             "to analyse")
        summary = recorder.summary()
        omitted = [] if info.has_cls else list(CLS_COLUMNS) + (["cls_magnitude_ratio"] if cfg.magnitudes else [])
        num_patches = info.patch_grid[0] * info.patch_grid[1]
        meta = dict(run=run_name, model=cfg.model, checkpoint=absolute_path(cfg.checkpoint, keep=()),
                    checkpoint_key=cfg.checkpoint_key, images=recorder.images,
                    unreadable_images=state["unreadable"], blocks=list(range(1, info.num_blocks + 1)),
                    heads=int(backbone.model.blocks[0].attn.num_heads), num_prefix_tokens=info.num_prefix_tokens,
                    has_cls=info.has_cls, num_patches=num_patches, max_entropy=math.log(num_patches),
                    omitted_columns=omitted, images_per_s=pass_.images_per_s(),
                    settings=settings)
        stats = write_outputs(out, run_name, meta, summary)
        if omitted:
            print(f"{cfg.model} has no [cls] token: columns {', '.join(omitted)} are omitted")
    barrier()
    return stats


def _warn_undefined(metrics: dict) -> None:
    """Say which (block, head) values are undefined: NaN / inf, written as null. The prefix-adjusted
    ratios divide by a row's patch mass ``1 - prefix``, which is 0 in float32 when prefix keys (an
    attention sink: registers, [cls]) take all but < 6e-8 of a row's attention in some image."""
    for name, table in metrics.items():
        bad = [(b, h) for b, row in enumerate(table) for h, v in enumerate(row) if not math.isfinite(v)]
        if bad:
            log.warning("%s: %d of %d block/head values undefined (null in stats.json; first: block index %d, "
                        "head %d)%s", name, len(bad), sum(len(r) for r in table), *bad[0],
                        ": a row's patch mass is 0 in float32 (prefix keys take all its attention)"
                        if "adj_for_cls" in name else "")


def format_stats(stats: dict) -> str:
    """Mean over heads of every metric per block, as a small table: over the heads whose value is
    defined (null in stats.json is left out, as in the plot), ``nan`` when none is."""
    metrics = list(stats["metrics"])
    widths = [max(10, len(m)) for m in metrics]  # whole names: cls_cls_attention_adj_for_cls is 29
    lines = ["block " + " ".join(f"{m:>{w}}" for m, w in zip(metrics, widths))]
    for li, block in enumerate(stats["blocks"]):
        vals = [_mean([math.nan if v is None else v for v in stats["metrics"][m][li]]) for m in metrics]
        lines.append(f"{block:>5} " + " ".join(f"{v:>{w}.4f}" for v, w in zip(vals, widths)))
    return "\n".join(lines)


def _mean(values: list) -> float:
    """The mean of the defined values (as the plot's line), NaN when none is."""
    defined = [v for v in values if math.isfinite(v)]
    return sum(defined) / len(defined) if defined else math.nan


def analyze_config_fields() -> set:
    return {f.name for f in dataclasses.fields(AnalyzeConfig)}
