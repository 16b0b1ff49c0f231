"""`selagg-fast report`: one row per probing run, as a Markdown table and the same as CSV.

A row: the run's dataset and epochs (``epoch k of N (unfinished)`` for a run stopped early), the
backbone, the best top-1 of k-NN, the linear probe ([cls], or the patch mean without [cls]),
Selective, AP and EP (each the best lr of that head in the run, linked to its results.json; a
``--seeds`` run's mean over its seeds, results.json's ``top1``, with its standard deviation), the
paper's numbers where they describe the run, notes (why they are not shown, or what differs from
the paper's setting) and the command line that produced the run (config.json).

The paper's numbers: ImageNet-1k for ImageFolder data (Table 1: linear and Selective, from
:mod:`selagg_fast.zoo`; Table 6: AP with 12 heads), Table 2 for ImageNet-1% and CUB-200; shown only
for a preset at its own architecture and probed block, loaded from the paper's checkpoint, run to
its last epoch (see ``_paper``). The paper reports no k-NN or EP numbers.
"""
from __future__ import annotations

import csv
import json
import os
import re

from ..files import atomic_write, check_writable
from ..zoo import SIZES, get_preset

# The paper's Table 6 (AP, 12 heads; ImageNet-1k top-1) per preset; Table 1 comes from the zoo.
PAPER_AP12 = {
    "mae_vit_small_patch16": 63.9, "mae_vit_base_patch16": 75.4, "mae_vit_large_patch16": 79.7,
    "mae_vit_huge_patch14": 80.0, "beitv2_vit_base_patch16": 81.8, "ijepa_vit_huge_patch14": 79.7,
    "capi_vit_large_patch14": 82.7,
}
# The paper's Table 2 (SGD at batch 1024, mean of 3 seeds): (standard, Selective) per preset, standard
# being [cls], or the patch average for I-JEPA and CAPI (no [cls]).
PAPER_IN1PCT = {
    "mae_vit_base_patch16": (39.1, 48.3), "simmim_vit_base_patch16": (17.3, 34.5),
    "beitv2_vit_base_patch16": (66.8, 69.0), "ijepa_vit_huge_patch14": (66.4, 70.9),
    "capi_vit_large_patch14": (52.7, 74.2),
}
PAPER_CUB = {
    "mae_vit_base_patch16": (45.8, 65.9), "simmim_vit_base_patch16": (17.9, 61.8),
    "beitv2_vit_base_patch16": (79.2, 80.4), "ijepa_vit_huge_patch14": (51.7, 59.9),
    "capi_vit_large_patch14": (25.9, 79.7),
}
IN1PCT_TRAIN_IMAGES = 12811  # the standard ImageNet-1% split file's length
# --model-kwargs keys that leave the architecture (hence the paper's numbers) as it is.
_SAME_ARCH_KEYS = {"img_size"}

COLUMNS = ["run", "dataset", "progress", "epochs_done", "epochs", "backbone", "checkpoint", "knn_top1",
           "knn_setting", "linear_head", "linear_top1", "linear_top1_std", "selective_top1", "selective_top1_std",
           "ap_head", "ap_top1", "ap_top1_std", "ep_head", "ep_top1", "ep_top1_std", "paper_dataset",
           "paper_linear", "paper_selective", "paper_ap12", "notes", "seeds", "results_json", "command"]


def _read_json(path: str, run_dir: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no {os.path.basename(path)} (not a `selagg-fast probe` output folder)")
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


def _dataset(config: dict) -> str:
    return "synthetic" if config.get("data") == "synthetic" else config.get("dataset") or "imagefolder"


def _progress(results: dict, config: dict) -> tuple:
    """(epochs done, epochs asked for, text): ``epoch k of N (unfinished)`` for a run stopped early."""
    done, total = results.get("epochs_done"), config.get("epochs")
    if done is None or total is None:
        return done, total, "epochs not recorded"
    if done < total:
        return done, total, f"epoch {done} of {total} (unfinished)"
    return done, total, f"{total} epoch" + ("" if total == 1 else "s")


def _differences(config: dict, preset) -> tuple:
    """(reasons the paper's numbers do not describe the run's backbone, notes that leave them standing)."""
    reasons, notes = [], []
    if config.get("random_init") or not config.get("checkpoint"):
        reasons.append("random init")
    elif not config.get("backbone", {}).get("final_norm_loaded", True) and preset.layout.paper_file_has_norm:
        reasons.append("not the paper's file of the preset (no final norm: MAE's fine-tuned release)")
    kwargs = config.get("model_kwargs") or {}
    patch = re.search(r"patch(\d+)", preset.name)
    own = {**SIZES.get(preset.size, {}), **({"patch_size": int(patch.group(1))} if patch else {}), **preset.kwargs}
    changed = {k: v for k, v in kwargs.items() if k not in _SAME_ARCH_KEYS and own.get(k, object()) != v}
    if changed:
        reasons.append("architecture changed (--model-kwargs " + ", ".join(f"{k}={v}" for k, v in changed.items())
                       + ")")
    probed = config.get("return_block")
    paper_block = preset.block or own.get("depth")  # a preset naming no block probes the last
    if probed is not None and probed != paper_block:
        reasons.append(f"--return-block {probed} (paper: block {paper_block or 'the last'})")
    elif probed is None and preset.block is not None:  # the last block probed, the paper's is another
        reasons.append(f"the last block probed (paper: block {preset.block}, --return-block {preset.block})")
    if config.get("final_norm"):
        reasons.append("--final-norm (the paper probes without it)")
    img_size = config.get("backbone", {}).get("img_size", kwargs.get("img_size"))
    if img_size is not None and img_size != preset.kwargs.get("img_size", img_size):
        notes.append(f"img_size {img_size} (the paper's: {preset.kwargs['img_size']})")
    if config.get("protocol", "paper") != "paper":
        notes.append(f"--protocol {config['protocol']} (the paper's: paper)")
    return reasons, notes


# The training protocol behind each table (paper App. B.2): Table 1 / 6 MAE's linear probing, LARS
# at a global batch of 16,384 for 90 epochs (50 for ViT-L and ViT-H); Table 2 SGD at batch 1024, the
# mean of 3 seeds.
_TRAINING = dict(augment=True, weight_decay=0.0, warmup_epochs=10.0)  # every table: random crops, no decay
_TABLE_PROTOCOL = {
    "ImageNet-1k": dict(optimizer="lars", effective_batch=16384, epochs=90, momentum=0.9, **_TRAINING),
    "ImageNet-1%": dict(optimizer="sgd", effective_batch=1024, seeds=3, **_TRAINING),
    "CUB-200": dict(optimizer="sgd", effective_batch=1024, seeds=3, **_TRAINING),
}
_SHORT_SCHEDULE = {"large": 50, "huge": 50}  # ImageNet-1k epochs of the larger ViTs


def _protocol_notes(config: dict, table: str, preset) -> list:
    """Where the run's training differs from the protocol of the paper's table: said beside its numbers."""
    ran = {k: config.get(k) for k in ("optimizer", "effective_batch", "epochs", "momentum", *_TRAINING)}
    ran["seeds"] = len(config.get("seeds") or [config.get("seed")])
    paper = dict(_TABLE_PROTOCOL[table])
    if "epochs" in paper:
        paper["epochs"] = _SHORT_SCHEDULE.get(preset.size, paper["epochs"])
    names = dict(optimizer="--optimizer", effective_batch="global batch", epochs="--epochs", seeds="seeds",
                 momentum="--momentum", weight_decay="--weight-decay", warmup_epochs="--warmup-epochs")
    differs = [f"{names[k]} {ran[k]:g} (paper: {v:g})" if isinstance(v, float) else f"{names[k]} {ran[k]} (paper: {v})"
               for k, v in paper.items() if k != "augment" and ran[k] is not None and ran[k] != v]
    if ran["augment"] is False:
        differs.append("no augmentation (paper: random crops)")
    return ["protocol differs from the paper's: " + ", ".join(differs)] if differs else []


def _paper(results: dict, config: dict) -> tuple:
    """The paper's numbers that describe the run: (dataset, linear, Selective, AP-12, notes).

    ``dataset`` is None (and the numbers too) unless the run probes a preset the paper reports, at
    its own architecture and probed block, from a checkpoint (not --random-init; MAE's fine-tuned
    file is not the paper's), to the end of its epochs, on the data the numbers are for: Table 1 / 6
    for ImageFolder data (ImageNet-1k; a folder cannot be proven to be it), Table 2 for ImageNet-1%
    (--train-list of the split's 12,811 images) and CUB-200. ``notes`` says why, or what differs
    from the paper's setting without voiding its numbers (the resolution, the protocol)."""
    model = config.get("model", "")
    preset = get_preset(model)
    if preset is None:
        return None, None, None, None, ["no paper numbers: not a preset of the paper"]
    reasons, notes = _differences(config, preset)
    dataset = _dataset(config)
    table = None
    if dataset == "imagefolder" and not config.get("train_list"):
        avg, cls, selective = preset.paper[:3] if preset.paper else (None, None, None)
        table = ("ImageNet-1k", cls if cls is not None else avg, selective, PAPER_AP12.get(model))
    elif dataset == "imagefolder" and results.get("train_images") == IN1PCT_TRAIN_IMAGES:
        table = ("ImageNet-1%", *PAPER_IN1PCT.get(model, (None, None)), None)
    elif dataset == "imagefolder":
        reasons.append("--train-list subset (not ImageNet-1k, nor the 12,811-image ImageNet-1%)")
    elif dataset == "cub200":
        table = ("CUB-200", *PAPER_CUB.get(model, (None, None)), None)
    else:
        reasons.append(f"dataset {dataset}")
    done, total, _ = _progress(results, config)
    if done is not None and total is not None and done < total:
        reasons.append(f"unfinished (epoch {done} of {total})")
    if table is not None and all(v is None for v in table[1:]) and not reasons:
        reasons.append(f"the paper prints none for {model} on {table[0]}")
    if reasons or table is None:
        return None, None, None, None, ["no paper numbers: " + "; ".join(reasons)]
    return (*table, notes + _protocol_notes(config, table[0], preset))


def _started_by(config: dict) -> str | None:
    """The command that started the run (a ``--resume`` alone takes its settings from it), with
    the number of resumed invocations after it."""
    commands = config.get("commands") or ([config["command"]] if config.get("command") else [])
    if not commands:
        return None
    more = len(commands) - 1
    return commands[0] + (f"  (then {more} x --resume)" if more else "")


def run_row(run_dir: str) -> dict:
    """One report row (plain values) of a run folder."""
    config = _read_json(os.path.join(run_dir, "config.json"), run_dir)
    # a run started but not past its first epoch has no results.json yet: a row of no numbers
    results = _read_json(os.path.join(run_dir, "results.json"), run_dir) \
        if os.path.isfile(os.path.join(run_dir, "results.json")) else dict(epochs_done=0, pairs=[])
    has_cls = config.get("backbone", {}).get("has_cls", True)
    linear_head = "cls" if has_cls else "avg"
    best = results.get("best_per_head", {})
    knn = results.get("knn")
    ap_head, ap_top1 = _best_of(results, r"ap\d+.*")
    ep_head, ep_top1 = _best_of(results, r"ep\d+.*")
    paper_dataset, paper_linear, paper_selective, paper_ap, notes = _paper(results, config)
    if paper_ap is not None and ap_head is not None and re.fullmatch(r"ap12(_.*)?", ap_head) is None:
        paper_ap = None  # the paper's AP has 12 heads: another head count is another probe
        notes = notes + [f"paper AP-12 not shown beside {ap_head}"]
    epochs_done, epochs, progress = _progress(results, config)
    k = knn["best"] if knn else None
    seeds = results.get("seeds")

    def std(head):
        return best[head].get("top1_std") if head in best else None

    return dict(
        run=os.path.basename(os.path.normpath(run_dir)), dataset=_dataset(config), progress=progress,
        epochs_done=epochs_done, epochs=epochs, backbone=config.get("model"),
        checkpoint=os.path.basename(config["checkpoint"]) if config.get("checkpoint") else "random init",
        knn_top1=k["top1"] if k else None,
        knn_setting=f"{knn['representation']} {k['variant']}, k={k['k']}, T={k['T']:g}" if k else None,
        linear_head=linear_head if linear_head in best else None,
        linear_top1=best[linear_head]["top1"] if linear_head in best else None, linear_top1_std=std(linear_head),
        selective_top1=best["selective"]["top1"] if "selective" in best else None,
        selective_top1_std=std("selective"),
        ap_head=ap_head, ap_top1=ap_top1, ap_top1_std=std(ap_head),
        ep_head=ep_head, ep_top1=ep_top1, ep_top1_std=std(ep_head),
        paper_dataset=paper_dataset, paper_linear=paper_linear, paper_selective=paper_selective,
        paper_ap12=paper_ap, notes="; ".join(notes) or None,
        seeds=",".join(map(str, seeds)) if seeds else None,
        results_json=os.path.abspath(os.path.join(run_dir, "results.json")), command=_started_by(config),
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


def _paper_cell(r: dict) -> str:
    if r["paper_dataset"] is None:
        return "–"
    return " / ".join(_num(r[k]) for k in ("paper_linear", "paper_selective", "paper_ap12")) \
        + ("" if r["paper_dataset"] == "ImageNet-1k" else f" ({r['paper_dataset']})")


def markdown(rows: list, output_dir: str) -> str:
    """The Markdown table; links are relative to ``output_dir`` (where the file is written)."""
    head = ["run", "dataset", "epochs", "backbone", "k-NN", "linear", "Selective", "AP", "EP",
            "paper linear / Selective / AP-12 (ImageNet-1k unless named)", "notes", "command"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        link = os.path.relpath(r["results_json"], output_dir).replace(os.sep, "/")
        present = r["_present"]
        cells = [
            r["run"] + (f" (mean of seeds {r['seeds']})" if r["seeds"] else ""), r["dataset"], r["progress"],
            f"{r['backbone']} ({r['checkpoint']})",
            _cell(r["knn_top1"], present["knn"], link, r["knn_setting"]),
            _cell(r["linear_top1"], present["linear"], link, f"[{r['linear_head']}]" if r["linear_head"] == "cls"
                  else r["linear_head"], r["linear_top1_std"]),
            _cell(r["selective_top1"], present["selective"], link, std=r["selective_top1_std"]),
            _cell(r["ap_top1"], present["ap"], link, r["ap_head"], r["ap_top1_std"]),
            _cell(r["ep_top1"], present["ep"], link, r["ep_head"], r["ep_top1_std"]),
            _paper_cell(r), (r["notes"] or "").replace("|", "\\|"),
            _code(r["command"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Top-1 (%) on the run's validation set at each head's best learning rate (k-NN: its best "
                 "(k, T) and feature variant); each number links to its run's results.json; a --seeds run shows "
                 "the mean ± standard deviation over its seeds (k-NN does not depend on the seed). Paper: the "
                 "top-1 of the run's preset on ImageNet-1k, Table 1 (linear: [cls], or the patch average without "
                 "[cls]; Selective) and Table 6 (AP, 12 heads), shown for ImageFolder data (a folder is not "
                 "checked to be ImageNet-1k); Table 2 (standard, Selective) for ImageNet-1% (--train-list of "
                 "12,811 images) and CUB-200. Shown only where they describe the run: the preset at its own "
                 "architecture and probed block, from a checkpoint (the paper's file, not --random-init), "
                 "without --final-norm, run to its last epoch; otherwise – and notes says why. – inside a "
                 "paper cell: the paper prints none (it reports no k-NN or EP).")
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
