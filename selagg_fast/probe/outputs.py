"""What a probing run writes: atomic files, metrics truncation on resume, the results summary."""
from __future__ import annotations

import json
import os

from ..files import atomic_json, atomic_save, atomic_write, json_safe

__all__ = ["atomic_json", "atomic_save", "append_metrics", "truncate_metrics", "summarize", "format_results"]


def _read_metrics(path: str, epochs_kept: int) -> list:
    if not os.path.exists(path):
        return []
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a failed write: never part of a finished epoch
                continue
            if row.get("epoch", epochs_kept + 1) <= epochs_kept:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def truncate_metrics(path: str, epochs_kept: int) -> None:
    """Drop metric lines of epochs after the checkpoint (a run killed between the two writes)."""
    if os.path.exists(path):
        _write_lines(path, _read_metrics(path, epochs_kept))


def append_metrics(path: str, epoch: int, rows: list) -> None:
    """Add one epoch's rows (strict JSON) to ``metrics.jsonl``, rewritten atomically: a failed
    write leaves the previous epochs' lines intact and no half line."""
    lines = _read_metrics(path, epoch - 1)
    _write_lines(path, lines + [json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows])


def _write_lines(path: str, lines: list) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def summarize(pairs_metrics: list, diverged=(), **info) -> dict:
    """``results.json``: every (head, base lr) pair's top-1/top-5 and the best lr per head.

    ``pairs_metrics``: ``[(head name, base lr, {"top1", "top5"}), ...]``. A pair whose name
    (``head@lr``) is in ``diverged`` is reported with ``top1``/``top5`` ``None`` and
    ``diverged: true``, and is best for its head only when every lr of the head diverged.
    """
    pairs = []
    for h, lr, m in pairs_metrics:
        gone = f"{h}@{lr:g}" in diverged
        pairs.append(dict(head=h, base_lr=lr, top1=None if gone else m["top1"], top5=None if gone else m["top5"],
                          diverged=gone))
    best = {}
    for p in pairs:
        held = best.get(p["head"])
        if held is None or (p["top1"] is not None and (held["top1"] is None or p["top1"] > held["top1"])):
            best[p["head"]] = p
    classes = info.pop("classes", None)  # last: a long list would push the accuracies down the file
    return json_safe(dict(info, pairs=pairs, best_per_head=best, **({} if classes is None else {"classes": classes})))


def _cell(value, width: int) -> str:
    return f"{'diverged':>{width}}" if value is None else f"{value:>{width}.2f}"


def format_results(results: dict) -> str:
    """Side-by-side table: one row per head, one column per base lr, best marked."""
    lrs = sorted({p["base_lr"] for p in results["pairs"]})
    heads = list(dict.fromkeys(p["head"] for p in results["pairs"]))
    by = {(p["head"], p["base_lr"]): p for p in results["pairs"]}
    w = max([16] + [len(h) + 1 for h in heads])  # long head names (cls_attn_min_entropy, selective_..._all)
    lines = [f"{'head':<{w}}" + "".join(f"{'lr ' + format(lr, 'g'):>12}" for lr in lrs)
             + f"{'best top-1':>12}{'top-5':>9}"]
    for h in heads:
        best = results["best_per_head"][h]
        cells = "".join(_cell(by[(h, lr)]["top1"], 12) if (h, lr) in by else f"{'':>12}" for lr in lrs)
        lines.append(f"{h:<{w}}{cells}{_cell(best['top1'], 12)}{_cell(best['top5'], 9)}")
    return "\n".join(lines)
