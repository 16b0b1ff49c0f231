"""`selagg-fast demo`: the main job on built-in defaults, small enough for a 2-core CPU.

A small random-init ViT, the synthetic "object among clutter" data, and cls / avg /
selective / efficient (ep8) probes trained from cached tokens, accuracies printed side by side, with the
non-trainable attention aggregations of the paper's Table 5 (cls_attn, cls_attn_min_entropy,
center_attn) and one compact table of their weights' entropies and divergences from the
trained selective head (``selagg-fast compare``). On a GPU the same command runs the fused kernels.
"""
from __future__ import annotations

import os
import time

import torch

from .attention_methods import ATTENTION_METHODS
from .ops._dispatch import interpreter_active
from .probe.outputs import format_results
from .probe.trainer import ProbeConfig, run_probe

# the non-trainable aggregations the demo trains beside cls / avg / selective (paper Table 5; the
# external selector's needs a second pretrained model, so it is left out here)
ATTENTION_HEADS = tuple(m.head for m in ATTENTION_METHODS if not m.selector)

# A 4-block ViT-Tiny on 64 x 64 images with 8 x 8 patches: 64 patch tokens + [cls].
DEMO_MODEL_KWARGS = dict(img_size=64, patch_size=8, depth=4)


def demo_config(out: str) -> ProbeConfig:
    return ProbeConfig(
        model="vit_tiny_patch16_224", random_init=True, model_kwargs=DEMO_MODEL_KWARGS, data="synthetic",
        synthetic_train_size=4000, synthetic_val_size=1000,
        heads=",".join(("cls", "avg", "selective", "ep8", *ATTENTION_HEADS)), lrs="0.1,1.0",
        epochs=30, warmup_epochs=3, batch_size=256, augment=False, workers=min(2, os.cpu_count() or 1),
        cache_features=os.path.join(out, "cache"), output_dir=os.path.join(out, "probe"), progress=False,
        knn=True)  # DINO's weighted k-NN of [cls] from the same cached tokens: 21 (k, T) settings, one pass


def run_demo(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = device == "cuda" or interpreter_active()
    print(f"selagg-fast demo on {device} ({'Triton kernels' if fused else 'PyTorch reference ops'}): "
          "random-init ViT-Tiny/8 on 64x64 synthetic images (label = a small object among clutter), "
          "cls / avg / selective / efficient (ep8) probes and the [cls] / central-patch attention aggregations, "
          "2 base lrs each, 30 epochs on cached tokens, and k-NN of [cls]")
    cfg = demo_config(args.out)
    cfg.resume = True  # rerunning the demo continues (or just reports) the previous one
    _check_previous(cfg, args.out)
    start = time.perf_counter()
    results_path = os.path.join(cfg.output_dir, "results.json")
    if os.path.exists(results_path) and _finished(cfg):
        import json
        with open(results_path) as f:
            results = json.load(f)
    else:
        results = run_probe(cfg)
    print(format_results(results))
    best = results["best_per_head"]
    print(f"selective beats avg by {best['selective']['top1'] - best['avg']['top1']:+.1f} and cls by "
          f"{best['selective']['top1'] - best['cls']['top1']:+.1f} top-1 points "
          f"({time.perf_counter() - start:.0f} s; outputs in {cfg.output_dir})")
    if results.get("knn"):  # a demo folder from before k-NN has none
        from .probe.knn_run import format_knn
        print(format_knn(results["knn"]) + f"  (linear [cls]: {best['cls']['top1']:.2f})")
    _analysis(cfg, args.out)
    print(f"demo done in {time.perf_counter() - start:.0f} s")
    return results


def _analysis(cfg: ProbeConfig, out: str) -> None:
    """The analysis tools on the same backbone and probe: statistics + plot, localisation, maps."""
    from .analysis.analyze import AnalyzeConfig, run_analyze
    from .analysis.localize import format_localization, localize, plot_localization, write_localization
    from .analysis.maps import write_maps
    from .analysis.plot import plot_runs
    from .data import SyntheticObjects, walk_files

    stats_dir = os.path.join(out, "analyze")
    run_analyze(AnalyzeConfig(model=cfg.model, random_init=True, model_kwargs=cfg.model_kwargs, data="synthetic",
                              limit=500, batch_size=250, workers=0, output_dir=stats_dir, resume=True,
                              progress=False, seed=cfg.seed))
    figure = plot_runs([stats_dir], os.path.join(out, "attention_stats.png"))
    val_dir = os.path.join(out, "val_images")
    boxes = SyntheticObjects(300, cfg.synthetic_classes, DEMO_MODEL_KWARGS["img_size"], seed=cfg.seed + 1,
                             split="val").export(val_dir)
    result = localize(cfg.output_dir, val_dir, boxes, workers=0, progress=False)
    write_localization(result, os.path.join(cfg.output_dir, "localization.json"))
    box_figure = plot_localization(result, os.path.join(cfg.output_dir, "localization.png"))
    print("\nobject localisation on 300 images (MaxBoxAccV2, paper Table 7 protocol):")
    print(format_localization(result))
    first = walk_files(val_dir, (".png",))[:3]
    maps = write_maps(cfg.output_dir, first, os.path.join(out, "maps"))
    print(f"attention statistics: {stats_dir}/stats.json, plot {figure}; box accuracy per threshold: "
          f"{box_figure}; selection maps: {os.path.dirname(maps[0])}/")
    _selections(cfg, out, val_dir)


def _selections(cfg: ProbeConfig, out: str, val_dir: str) -> None:
    """`selagg-fast compare` on the same 300 images: entropies and KL from the trained selective head."""
    from .analysis.compare import CompareConfig, run_compare

    compare_dir = os.path.join(out, "compare")
    result = run_compare(CompareConfig(probe=cfg.output_dir, data=val_dir, batch_size=300, workers=0,
                                       output_dir=compare_dir, resume=True, progress=False, examples=3))
    print(f"\ntoken selections on {result['images']} images (paper Table 5 and Fig. 7's selective row):")
    print(format_selections(result))
    print(f"KL matrix, entropy bars and maps per method: {compare_dir}/ (kld.png, entropy.png, maps.png)")


def format_selections(result: dict, trained_head: str = "selective") -> str:
    """One compact table from a `compare` result: per weight vector its probe's top-1 (when a head
    trained on it), mean entropy and ``KL(trained selective head || method)`` (nats)."""
    methods = result["methods"]
    ref = next((m for m in methods if m.split("@")[0] == trained_head), None)
    if ref is None:
        raise ValueError(f"no trained {trained_head!r} head among the compared methods {methods}")
    row = result["kl"][methods.index(ref)]
    kl_title = f"KL({ref}||.)"
    lines = [f"{'weights':<26}{'top-1':>7}{'entropy':>9}{kl_title:>{max(len(kl_title) + 2, 12)}}"]
    for m, kl in zip(methods, row):
        r = result["per_method"][m]
        label = f"{m} (trained)" if m == ref else r["label"]
        top1 = "-" if r["top1"] is None else f"{r['top1']:.1f}"
        lines.append(f"{label[:25]:<26}{top1:>7}{r['entropy_mean']:>9.2f}{kl:>{max(len(kl_title) + 2, 12)}.2f}")
    lines.append(f"entropy in nats; uniform weights over the N = {result['N']} patches: log N = "
                 f"{result['max_entropy']:.2f}")
    return "\n".join(lines)


def _check_previous(cfg: ProbeConfig, out: str) -> None:
    """A folder holding an older demo's run (other heads) cannot be continued: say so in one line."""
    import json
    path = os.path.join(cfg.output_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        heads = json.load(f).get("heads")
    if heads != cfg.heads:
        raise ValueError(f"--out {out} holds the run of an older demo (heads {heads}; this demo trains {cfg.heads}): "
                         "delete it or choose another --out")


def _finished(cfg: ProbeConfig) -> bool:
    import json
    with open(os.path.join(cfg.output_dir, "results.json")) as f:
        return json.load(f).get("epochs_done") == cfg.epochs
