"""`selagg-fast report`: one row per probing run, as a Markdown table and the same as CSV.

A row: the backbone, the best top-1 of k-NN, the linear probe ([cls], or the patch mean without
[cls]), Selective, AP and EP (each the best lr of that head in the run, linked to its
results.json), the command line that produced the run (config.json), and the paper's ImageNet-1k
numbers for the run's preset where the paper prints them (Table 1: linear and Selective, from
:mod:`selagg_fast.zoo`; Table 6: AP with 12 heads). The paper reports no k-NN or EP numbers.
A ``--seeds`` run's top-1 is the mean over its seeds (results.json's ``top1``), shown with its
standard deviation.
"""
from __future__ import annotations

import csv
import json
import os
import re

from ..files import atomic_write, check_writable
from ..zoo import get_preset

# The paper's Table 6 (AP, 12 heads; ImageNet-1k top-1) per preset; Table 1 comes from the zoo.
PAPER_AP12 = {
    "mae_vit_small_patch16": 63.9, "mae_vit_base_patch16": 75.4, "mae_vit_large_patch16": 79.7,
    "mae_vit_huge_patch14": 80.0, "beitv2_vit_base_patch16": 81.8, "ijepa_vit_huge_patch14": 79.7,
    "capi_vit_large_patch14": 82.7,
}

COLUMNS = ["run", "backbone", "checkpoint", "knn_top1", "knn_setting", "linear_head", "linear_top1",
           "selective_top1", "ap_head", "ap_top1", "ep_head", "ep_top1", "paper_linear", "paper_selective",
           "paper_ap12", "seeds", "linear_top1_std", "selective_top1_std", "results_json", "command"]


def _read_json(path: str, run_dir: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no {os.path.basename(path)} (not a finished `selagg-fast probe` run)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _best_of(results: dict, pattern: str) -> tuple:
    """(head, top-1) of the best head whose name matches ``pattern`` (its best lr); (None, None)
    when the run has none; top-1 None when every lr of it diverged."""
    found = [(h, p["top1"]) for h, p in results.get("best_per_head", {}).items() if re.fullmatch(pattern, h)]
    if not found:
        return None, None
    return max(found, key=lambda hp: -1.0 if hp[1] is None else hp[1])


def _paper(config: dict) -> tuple:
    """(linear, Selective, AP-12) of the paper for the run's preset, None where it prints none; all
    None when the run's file of the preset is not the paper's (its final norm left at init where
    the paper's file has one: MAE's fine-tuned release)."""
    model = config.get("model", "")
    preset = get_preset(model)
    loaded = config.get("backbone", {}).get("final_norm_loaded", True)
    if preset is not None and not loaded and preset.layout.paper_file_has_norm:
        return None, None, None
    linear = selective = None
    if preset is not None and preset.paper is not None:
        avg, cls, selective, _ = preset.paper
        linear = cls if cls is not None else avg
    return linear, selective, PAPER_AP12.get(model)


def run_row(run_dir: str) -> dict:
    """One report row (plain values) of a run folder."""
    results = _read_json(os.path.join(run_dir, "results.json"), run_dir)
    config = _read_json(os.path.join(run_dir, "config.json"), run_dir)
    has_cls = config.get("backbone", {}).get("has_cls", True)
    linear_head = "cls" if has_cls else "avg"
    best = results.get("best_per_head", {})
    knn = results.get("knn")
    ap_head, ap_top1 = _best_of(results, r"ap\d+.*")
    ep_head, ep_top1 = _best_of(results, r"ep\d+.*")
    paper_linear, paper_selective, paper_ap = _paper(config)
    k = knn["best"] if knn else None
    seeds = results.get("seeds")
    return dict(
        run=os.path.basename(os.path.normpath(run_dir)), backbone=config.get("model"),
        checkpoint=os.path.basename(config["checkpoint"]) if config.get("checkpoint") else "random init",
        knn_top1=k["top1"] if k else None,
        knn_setting=f"{knn['representation']} {k['variant']}, k={k['k']}, T={k['T']:g}" if k else None,
        linear_head=linear_head if linear_head in best else None,
        linear_top1=best[linear_head]["top1"] if linear_head in best else None,
        selective_top1=best["selective"]["top1"] if "selective" in best else None,
        ap_head=ap_head, ap_top1=ap_top1, ep_head=ep_head, ep_top1=ep_top1,
        paper_linear=paper_linear, paper_selective=paper_selective, paper_ap12=paper_ap,
        seeds=",".join(map(str, seeds)) if seeds else None,
        linear_top1_std=best[linear_head].get("top1_std") if linear_head in best else None,
        selective_top1_std=best["selective"].get("top1_std") if "selective" in best else None,
        results_json=os.path.abspath(os.path.join(run_dir, "results.json")), command=config.get("command"),
        _present=dict(linear=linear_head in best, selective="selective" in best, ap=ap_head is not None,
                      ep=ep_head is not None, knn=k is not None))


def _num(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _cell(value, present: bool, link: str, note: str | None = None, std: float | None = None) -> str:
    """A linked top-1 (``diverged`` when every lr diverged; ``± std`` over a --seeds run's seeds),
    or ``–`` for a head the run lacks."""
    if not present:
        return "–"
    text = "diverged" if value is None else f"{value:.1f}" + ("" if std is None else f" ± {std:.1f}")
    return f"[{text}]({link})" + (f" ({note})" if note else "")


def _code(text: str | None) -> str:
    if not text:
        return "not recorded"
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def markdown(rows: list, output_dir: str) -> str:
    """The Markdown table; links are relative to ``output_dir`` (where the file is written)."""
    head = ["run", "backbone", "k-NN", "linear", "Selective", "AP", "EP", "paper linear / Selective / AP-12",
            "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        link = os.path.relpath(r["results_json"], output_dir).replace(os.sep, "/")
        present = r["_present"]
        cells = [
            r["run"] + (f" (mean of seeds {r['seeds']})" if r["seeds"] else ""), f"{r['backbone']} ({r['checkpoint']})",
            _cell(r["knn_top1"], present["knn"], link, r["knn_setting"]),
            _cell(r["linear_top1"], present["linear"], link, f"[{r['linear_head']}]" if r["linear_head"] == "cls"
                  else r["linear_head"], r["linear_top1_std"]),
            _cell(r["selective_top1"], present["selective"], link, std=r["selective_top1_std"]),
            _cell(r["ap_top1"], present["ap"], link, r["ap_head"]),
            _cell(r["ep_top1"], present["ep"], link, r["ep_head"]),
            " / ".join(_num(r[k]) for k in ("paper_linear", "paper_selective", "paper_ap12")),
            _code(r["command"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Top-1 (%) on the run's validation set at each head's best learning rate (k-NN: its best "
                 "(k, T) and feature variant); each number links to its run's results.json. Paper: ImageNet-1k "
                 "top-1 of the run's preset, Table 1 (linear: [cls], or the patch average without [cls]; "
                 "Selective) and Table 6 (AP, 12 heads); – where the paper prints none (it reports no k-NN or "
                 "EP), and for a file of the preset that is not the paper's (MAE's fine-tuned release). A run "
                 "of another dataset or checkpoint is not comparable to those.")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list, output: str) -> tuple:
    """Write ``output`` (Markdown) and the same rows as CSV beside it; returns both paths."""
    if not run_dirs:
        raise ValueError("report: name at least one run folder")
    if not output.endswith(".md"):
        raise ValueError(f"--output {output}: expected a Markdown file name ending in .md")
    out_dir = os.path.dirname(os.path.abspath(output))
    check_writable(out_dir, flag="--output")
    rows = [run_row(d) for d in run_dirs]
    csv_path = output[:-3] + ".csv"

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(markdown(rows, out_dir))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: "" if r[k] is None else r[k] for k in COLUMNS})

    atomic_write(output, write_md)
    atomic_write(csv_path, write_csv)
    return output, csv_path
