"""`selagg-fast plot`: the paper's Figures 3-6 layout from one or more `analyze` runs."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np

from ..files import atomic_write, check_output_file

# (metric, title, y label, entropy?) in the order of the paper's Figures 3, 4, 5, 6
PANELS = [
    ("cls_cls_attention", "[cls] -> [cls] attention (Fig. 3)", "attention", False),
    ("cls_pos_entropy", "[cls] attention entropy over patches (Fig. 4)", "entropy (nats)", True),
    ("pos_self_attention_adj_for_cls", "patch self-attention, [cls]-adjusted (Fig. 5)", "attention", False),
    ("pos_pos_entropy", "patch attention entropy over patches (Fig. 6)", "entropy (nats)", True),
]


def load_run(run_dir: str) -> dict:
    path = os.path.join(run_dir, "stats.json") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no stats.json (run `selagg-fast analyze` first)")
    try:
        with open(path) as f:
            run = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a stats.json of `selagg-fast analyze` ({type(err).__name__}: {err})") from None
    missing = [k for k in ("metrics", "blocks", "num_patches", "images") if not isinstance(run, dict) or k not in run]
    if missing:
        raise ValueError(f"{path}: not a stats.json of `selagg-fast analyze` (no {', '.join(missing)})")
    return run


def figure_format(output: str, flag: str = "--output") -> str:
    """The figure format of ``output``'s suffix (``png`` when it has none); an unknown one is refused."""
    import matplotlib.figure
    suffix = os.path.splitext(output)[1][1:].lower()
    if not suffix:
        return "png"
    supported = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if suffix not in supported:
        raise ValueError(f"{flag} {output}: unknown figure format .{suffix} (use one of {', '.join(sorted(supported))})")
    return suffix


def plot_runs(run_dirs, output: str) -> str:
    """Four panels, metric vs block: mean over heads as a line, min-max over heads shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fmt = figure_format(output)
    check_output_file(output, flag="--output")
    runs = [load_run(d) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, title, ylabel, entropy) in zip(axes.flat, PANELS):
        absent = []
        for i, run in enumerate(runs):
            label = run.get("run") or run["model"]
            if metric not in run["metrics"]:
                absent.append(label)
                continue
            # [L, H]; null (an undefined value, see analyze's warning) is NaN: left out of the mean and
            # the band, a gap where every head of a block is undefined
            table = np.array([[np.nan if v is None else v for v in row] for row in run["metrics"][metric]], dtype=float)
            blocks = np.asarray(run["blocks"])
            color = colors[i % len(colors)]
            with warnings.catch_warnings():  # an all-NaN block: NaN, drawn as a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(table, 1), np.nanmin(table, 1), np.nanmax(table, 1)
            ax.plot(blocks, mean, marker="o", ms=3, color=color, label=f"{label} ({run['images']} img)")
            ax.fill_between(blocks, low, high, color=color, alpha=0.18, lw=0)
        if entropy:
            for n in sorted({r["num_patches"] for r in runs}):
                ax.axhline(np.log(n), color="grey", ls="--", lw=1)
                ax.annotate(f"max log N = {np.log(n):.2f} (N={n})", (0.01, np.log(n)), xycoords=("axes fraction", "data"),
                            va="bottom", fontsize=8, color="grey")
        if absent:
            ax.text(0.99, 0.02, "no [cls]: " + ", ".join(absent), transform=ax.transAxes, ha="right", va="bottom",
                    fontsize=8, color="grey")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("attention statistics per block (line: mean over heads; band: min-max over heads)")
    atomic_write(output, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))  # exactly `output`, suffix or not
    plt.close(fig)
    return output
