"""What a probing run writes: atomic files, metrics truncation on resume, the results summary."""
from __future__ import annotations

import json
import math
import os

from ..files import atomic_json, atomic_save, atomic_write, json_safe
from .heads import pair_name

__all__ = ["atomic_json", "atomic_save", "append_metrics", "truncate_metrics", "summarize", "summarize_seeds",
           "format_results"]


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
        gone = pair_name(h, lr) in diverged
        pairs.append(dict(head=h, base_lr=lr, top1=None if gone else m["top1"], top5=None if gone else m["top5"],
                          diverged=gone))
    return _with_best(pairs, info)


def _with_best(pairs: list, info: dict) -> dict:
    best = {}
    for p in pairs:
        held = best.get(p["head"])
        if held is None or (p["top1"] is not None and (held["top1"] is None or p["top1"] > held["top1"])):
            best[p["head"]] = p
    classes = info.pop("classes", None)  # last: a long list would push the accuracies down the file
    return json_safe(dict(info, pairs=pairs, best_per_head=best, **({} if classes is None else {"classes": classes})))


def _mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize_seeds(seeds: list, pairs_metrics: list, diverged: dict, **info) -> dict:
    """``results.json`` of a ``--seeds`` run: per (head, base lr) pair, each seed's top-1/top-5
    (``seeds``), their mean (``top1``/``top5``) and sample standard deviation (``top1_std``/
    ``top5_std``); each head's best lr is the one of the best mean top-1.

    ``pairs_metrics``: ``[(head name, base lr, {seed: {"top1", "top5"}}), ...]``; ``diverged``:
    ``{seed: pair names}``. A pair that diverged under any seed has a null mean and std and
    ``diverged: true`` (its other seeds' accuracies are still listed)."""
    pairs = []
    for h, lr, by_seed in pairs_metrics:
        runs = []
        for seed in seeds:
            gone = pair_name(h, lr) in diverged.get(seed, ())
            m = by_seed[seed]
            runs.append(dict(seed=seed, top1=None if gone else m["top1"], top5=None if gone else m["top5"],
                             diverged=gone))
        gone = any(r["diverged"] for r in runs)
        stats = {}
        for key in ("top1", "top5"):
            mean, std = (None, None) if gone else _mean_std([r[key] for r in runs])
            stats[key], stats[f"{key}_std"] = mean, std
        pairs.append(dict(head=h, base_lr=lr, top1=stats["top1"], top5=stats["top5"], top1_std=stats["top1_std"],
                          top5_std=stats["top5_std"], diverged=gone, seeds=runs))
    return _with_best(pairs, dict(info, seeds=list(seeds)))


def _cell(value, width: int, std=None) -> str:
    if value is None:
        return f"{'diverged':>{width}}"
    return f"{value:>{width}.2f}" if std is None else f"{format(value, '.2f') + '±' + format(std, '.2f'):>{width}}"


def format_results(results: dict) -> str:
    """Side-by-side table: one row per head, one column per base lr, best marked; a ``--seeds``
    run's cells are mean ± standard deviation over its seeds."""
    lrs = sorted({p["base_lr"] for p in results["pairs"]})
    heads = list(dict.fromkeys(p["head"] for p in results["pairs"]))
    by = {(p["head"], p["base_lr"]): p for p in results["pairs"]}
    seeded = "seeds" in results
    c, c5 = (15, 14) if seeded else (12, 9)
    w = max([16] + [len(h) + 1 for h in heads])  # long head names (cls_attn_min_entropy, selective_..._all)
    lines = [f"{'head':<{w}}" + "".join(f"{'lr ' + format(lr, 'g'):>{c}}" for lr in lrs)
             + f"{'best top-1':>{c}}{'top-5':>{c5}}"]
    for h in heads:
        best = results["best_per_head"][h]
        cells = "".join(_cell(by[(h, lr)]["top1"], c, by[(h, lr)].get("top1_std")) if (h, lr) in by
                        else f"{'':>{c}}" for lr in lrs)
        lines.append(f"{h:<{w}}{cells}{_cell(best['top1'], c, best.get('top1_std'))}"
                     f"{_cell(best['top5'], c5, best.get('top5_std'))}")
    if seeded:
        lines.append(f"mean ± standard deviation over seeds {', '.join(map(str, results['seeds']))}")
    return "\n".join(lines)
