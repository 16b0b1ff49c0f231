"""Training curves of a probe run: top-1 and train loss per epoch, every (head, lr) pair."""
from __future__ import annotations

import json
import os

from ..files import atomic_write


def plot_curves(run_dir: str, output: str | None = None) -> str:
    """``curves.png`` from ``metrics.jsonl``: one colour per head, one line style per base lr (a
    ``--seeds`` run's lines: the mean over its seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (a `selagg-fast probe` output folder?)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    heads = list(dict.fromkeys(r["head"] for r in rows))
    lrs = sorted({r["base_lr"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for hi, head in enumerate(heads):
        for li, lr in enumerate(lrs):
            # a diverged pair's null top-1 / loss: a gap in its line (NaN), not a point
            pts = _mean_over_seeds([r for r in rows if r["head"] == head and r["base_lr"] == lr])
            if not pts:
                continue
            epochs, top1, loss = zip(*pts)
            style = dict(color=colors[hi % len(colors)], ls=styles[li % len(styles)], marker="." if len(pts) < 30 else None)
            acc_ax.plot(epochs, top1, label=f"{head} @ {lr:g}", **style)
            loss_ax.plot(epochs, loss, **style)
    acc_ax.set(title="validation top-1 (%)", xlabel="epoch")
    loss_ax.set(title="train loss", xlabel="epoch", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.legend(fontsize=8, ncol=max(1, len(lrs)))
    output = output or os.path.join(run_dir, "curves.png")
    try:
        atomic_write(output, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return output


def _mean_over_seeds(rows: list) -> list:
    """``[(epoch, top-1, train loss)]`` of one pair, each the mean of the epoch's seeds (NaN when one is null)."""
    by_epoch: dict = {}
    for r in rows:
        by_epoch.setdefault(r["epoch"], []).append((_num(r["top1"]), _num(r["train_loss"])))
    return [(epoch, sum(t for t, _ in v) / len(v), sum(loss for _, loss in v) / len(v))
            for epoch, v in sorted(by_epoch.items())]


def _num(value) -> float:
    return float("nan") if value is None else value
