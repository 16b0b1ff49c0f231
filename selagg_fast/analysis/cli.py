"""Arguments of `selagg-fast analyze | plot | maps | localize | compare`."""
from __future__ import annotations

import os


def add_analysis_commands(sub) -> None:
    from ..probe.cli import add_backbone_arguments, add_dataset_argument

    p = sub.add_parser("analyze", help="per-block, per-head attention statistics over an image folder")
    add_backbone_arguments(p)
    p.add_argument("--return-block", type=int, help="analyse blocks 1..N only (counted from 1); default: all blocks")
    p.add_argument("--data", help="image folder (DIR/val when present; class folders or flat), a --dataset "
                                  "folder (its evaluation split), or 'synthetic' (required; no default)")
    add_dataset_argument(p)
    p.add_argument("--limit", type=int, help="analyse a seeded random subset of N images; default: all")
    p.add_argument("--batch-size", type=int, default=512, help="images per batch and process")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    p.add_argument("--no-magnitudes", dest="magnitudes", action="store_false",
                   help="skip the ||attention branch|| / ||residual|| ratios")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    p.add_argument("--output-dir", default="analyze_out", help="folder for stats.json, stats.csv and running sums")
    p.add_argument("--name", help="run name in stats.csv and plot legends (default: the output folder's name)")
    p.add_argument("--resume", action="store_true", help="continue from the partial sums in --output-dir")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint the running sums every N batches")
    p.add_argument("--seed", type=int, default=0, help="seed of a --random-init model (same as probe --seed)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when present")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_analyze)

    p = sub.add_parser("plot", help="Figures 3-6 layout from analyze runs")
    p.add_argument("runs", nargs="+", help="analyze output folders (or their stats.json)")
    p.add_argument("--output", default="attention_stats.png",
                   help="figure file, written exactly there (.png, .pdf, .svg, ...; no suffix: PNG)")
    p.set_defaults(func=_plot)

    p = sub.add_parser("maps", help="Selective Aggregation weights vs [cls] attention, overlaid on images")
    p.add_argument("--probe", required=True, help="a selagg-fast probe output folder")
    p.add_argument("--images", nargs="+", required=True, help="image files to show")
    p.add_argument("--head", help="selective pair to show, e.g. selective@0.1; default: the best one")
    p.add_argument("--output-dir", default="maps", help="folder for the PNGs")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load the probe's backbone checkpoint with full unpickling (runs any code it holds)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when present")
    p.set_defaults(func=_maps)

    p = sub.add_parser("localize", help="MaxBoxAccV2 of Selective Aggregation weights and [cls] attention")
    p.add_argument("--probe", required=True, help="a selagg-fast probe output folder")
    p.add_argument("--data", required=True, help="image folder (DIR/val when present)")
    p.add_argument("--boxes", required=True, help="CSV image,x0,y0,x1,y1, or ImageNet XML file / folder")
    p.add_argument("--head", help="selective pair to evaluate; default: the best one")
    p.add_argument("--limit", type=int, help="evaluate the first N images that have boxes; default: all")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="DataLoader workers and processes for the threshold sweep")
    p.add_argument("--output", help="JSON file (beside it: the same name with .png); default: PROBE/localization.json")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load the probe's backbone checkpoint with full unpickling (runs any code it holds)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when present")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_localize)

    add_compare_command(sub)


def add_compare_command(sub) -> None:
    from ..probe.cli import add_dataset_argument, json_object

    p = sub.add_parser("compare", help="trained vs attention-derived token selections: entropy, KL, maps")
    p.add_argument("--probe", required=True, help="a selagg-fast probe output folder")
    p.add_argument("--data", required=True, help="image folder (DIR/val when present; class folders or flat), "
                                                 "a --dataset folder (its evaluation split), or 'synthetic'")
    add_dataset_argument(p)
    p.add_argument("--methods", help="comma list: trained heads or pairs (selective, selective@0.1, ap4), "
                                     "cls_attn, cls_attn_min_entropy, center_attn, external_cls_attn; default: every "
                                     "trained selective/attentive head (best lr) and every attention method the model "
                                     "allows")
    p.add_argument("--limit", type=int, help="a seeded random subset of N images; default: all")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch and process")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per process")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    p.add_argument("--output-dir", default="compare_out",
                   help="folder for compare.json, kld.png, entropy.png, maps.png and running sums")
    p.add_argument("--examples", type=int, default=4, help="images shown in maps.png")
    p.add_argument("--resume", action="store_true", help="continue from the partial sums in --output-dir")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint the running sums every N batches")
    p.add_argument("--selector-model", help="another ViT (a preset or a timm name) whose last-block [cls] attention "
                                            "selects the probed model's patches (same patch grid), e.g. "
                                            "dino_vit_base_patch16 for MAE")
    p.add_argument("--selector-checkpoint", help="local weights of --selector-model")
    p.add_argument("--selector-checkpoint-key", help="the dict of --selector-checkpoint the weights sit under "
                                                     "(default: the preset's layout)")
    p.add_argument("--selector-random-init", action="store_true", help="random --selector-model (testing only)")
    p.add_argument("--selector-model-kwargs", type=json_object, default={},
                   help="JSON object overriding --selector-model's architecture arguments")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load backbone checkpoints with full unpickling (runs any code they hold)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when present")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_compare)


def _compare(args) -> None:
    from .compare import CompareConfig, compare_config_fields, format_compare, run_compare
    result = run_compare(CompareConfig(**{k: v for k, v in vars(args).items() if k in compare_config_fields()}))
    if result is not None:
        print(format_compare(result))
        print(f"{result['images']} images ({result['unreadable_images']} unreadable skipped), "
              f"{result['images_per_s']:.3g} img/s; wrote {args.output_dir}/compare.json, kld.png, entropy.png"
              + (", maps.png" if args.examples else ""))


def _analyze(args) -> None:
    from .analyze import AnalyzeConfig, analyze_config_fields, format_stats, run_analyze
    stats = run_analyze(AnalyzeConfig(**{k: v for k, v in vars(args).items() if k in analyze_config_fields()}))
    if stats is not None:
        print(format_stats(stats))
        print(f"{stats['images']} images ({stats['unreadable_images']} unreadable skipped), "
              f"{stats['images_per_s']:.3g} img/s; wrote {args.output_dir}/stats.json and stats.csv")


def _plot(args) -> None:
    from ..files import check_distinct_outputs
    from .plot import plot_runs
    inputs = {run if os.path.isfile(run) else os.path.join(run, "stats.json"): "run" for run in args.runs}
    check_distinct_outputs({args.output: "--output"}, inputs)  # a figure never replaces a run's stats.json
    print(f"wrote {plot_runs(args.runs, args.output)}")


def _maps(args) -> None:
    from .maps import write_maps
    for path in write_maps(args.probe, args.images, args.output_dir, head=args.head, device=args.device,
                           trust_checkpoint=args.trust_checkpoint):
        print(f"wrote {path}")


def _localize(args) -> None:
    from .localize import (check_localize_arguments, format_localization, localize, localize_outputs,
                           plot_localization, write_localization)
    check_localize_arguments(args.probe, args.data, args.limit, args.batch_size, args.workers, args.device)
    out, figure = localize_outputs(args.output, args.probe, args.boxes)  # before any map is computed
    result = localize(args.probe, args.data, args.boxes, head=args.head, limit=args.limit,
                      batch_size=args.batch_size, workers=args.workers, device=args.device, progress=args.progress,
                      trust_checkpoint=args.trust_checkpoint)
    write_localization(result, out)
    plot_localization(result, figure)
    print(format_localization(result))
    print(f"{result['images']} images; wrote {out} and {figure}")



