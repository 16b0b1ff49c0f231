"""What a probing run writes: atomic files, metrics truncation on resume, the results summary."""
from __future__ import annotations

import json
import os

import torch


def atomic_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def atomic_save(path: str, obj) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def truncate_metrics(path: str, epochs_kept: int) -> None:
    """Drop metric lines of epochs after the checkpoint (a run killed between the two writes)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epochs_kept]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)



def summarize(pairs_metrics: list, **info) -> dict:
    """``results.json``: every (head, base lr) pair's top-1/top-5 and the best lr per head.

    ``pairs_metrics``: ``[(head name, base lr, {"top1", "top5"}), ...]``.
    """
    pairs = [dict(head=h, base_lr=lr, top1=m["top1"], top5=m["top5"]) for h, lr, m in pairs_metrics]
    best = {}
    for p in pairs:
        if p["head"] not in best or p["top1"] > best[p["head"]]["top1"]:
            best[p["head"]] = p
    return dict(info, pairs=pairs, best_per_head=best)


def format_results(results: dict) -> str:
    """Side-by-side table: one row per head, one column per base lr, best marked."""
    lrs = sorted({p["base_lr"] for p in results["pairs"]})
    heads = list(dict.fromkeys(p["head"] for p in results["pairs"]))
    by = {(p["head"], p["base_lr"]): p for p in results["pairs"]}
    lines = [f"{'head':<16}" + "".join(f"{'lr ' + format(lr, 'g'):>12}" for lr in lrs) + f"{'best top-1':>12}{'top-5':>8}"]
    for h in heads:
        best = results["best_per_head"][h]
        cells = "".join(f"{by[(h, lr)]['top1']:>12.2f}" if (h, lr) in by else f"{'':>12}" for lr in lrs)
        lines.append(f"{h:<16}{cells}{best['top1']:>12.2f}{best['top5']:>8.2f}")
    return "\n".join(lines)

