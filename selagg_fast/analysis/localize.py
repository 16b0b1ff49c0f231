"""`selagg-fast localize`: MaxBoxAccV2 of Selective Aggregation weights vs [cls] attention (paper Table 7).

For each image the map is upsampled to the crop, min-max normalised, and thresholded at every
tau in ``THRESHOLDS``; the box of the largest connected component is compared with the
ground-truth boxes (best IoU). BoxAcc(tau, delta) is the fraction of images whose IoU >= delta;
MaxBoxAcc(delta) takes the best tau per delta, and MaxBoxAccV2 averages delta in {0.3, 0.5, 0.7}
(Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right", 2020).
"""
from __future__ import annotations

import csv
import logging
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data import ImageFiles, check_data_folder, image_files, val_transform, walk_files
from ..distributed import check_device
from ..files import OutputError, atomic_json, atomic_write, check_distinct_outputs, check_number, check_output_file
from .probe_maps import ProbeMaps, upsample

log = logging.getLogger("selagg_fast")

THRESHOLDS = np.arange(0.0, 1.0, 0.01)
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=int)
IOU_LEVELS = (0.3, 0.5, 0.7)


def largest_component_box(mask: np.ndarray):
    """``(x0, y0, x1, y1)`` (pixel edges) of the largest 8-connected component, or None if empty."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(sizes.argmax())
    rows, cols = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    return cols.start, rows.start, cols.stop, rows.stop


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_ious(heatmap: np.ndarray, gt_boxes, thresholds=THRESHOLDS) -> np.ndarray:
    """Best IoU with any ground-truth box, per threshold: ``[len(thresholds)]``."""
    out = np.zeros(len(thresholds))
    for i, tau in enumerate(thresholds):
        box = largest_component_box(heatmap >= tau)
        if box is not None:
            out[i] = max(box_iou(box, gt) for gt in gt_boxes)
    return out


def max_box_acc_v2(ious: np.ndarray, thresholds=THRESHOLDS, levels=IOU_LEVELS) -> dict:
    """From per-image, per-threshold best IoUs ``[N, T]``: MaxBoxAcc per IoU level (percent), the
    threshold that reached it, and their mean, MaxBoxAccV2."""
    ious = np.asarray(ious)
    per_level = {}
    for delta in levels:
        acc = (ious >= delta).mean(0) * 100  # [T]
        best = int(acc.argmax())
        per_level[f"iou{int(round(delta * 100))}"] = dict(
            max_box_acc=float(acc[best]), threshold=float(thresholds[best]),
            box_acc=[round(float(a), 4) for a in acc])  # the curve over thresholds, for the figure
    return dict(max_box_acc_v2=float(np.mean([v["max_box_acc"] for v in per_level.values()])),
                images=int(ious.shape[0]), **per_level)


def read_boxes(path: str) -> dict:
    """Image key (file name without extension) -> list of boxes ``(x0, y0, x1, y1)`` in original pixels.

    ``path``: a CSV with rows ``image,x0,y0,x1,y1`` (one row per box, header optional), an
    ImageNet/PASCAL-style XML file, or a folder of such XML files.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--boxes {path}: no such file or folder")
    boxes: dict = {}
    if os.path.isfile(path) and path.lower().endswith(".csv"):
        try:
            with open(path, newline="") as f:
                for line, row in enumerate(csv.reader(f), 1):
                    if not row or row[0].strip().lower() in ("image", "file", "filename"):
                        continue
                    if len(row) < 5:
                        raise ValueError(f"--boxes {path} line {line}: expected image,x0,y0,x1,y1, got {row}")
                    key = os.path.splitext(os.path.basename(row[0].strip()))[0]
                    try:
                        boxes.setdefault(key, []).append(tuple(float(v) for v in row[1:5]))
                    except ValueError:
                        raise ValueError(f"--boxes {path} line {line}: box coordinates are not numbers: {row[1:5]}") from None
        except UnicodeDecodeError:
            raise ValueError(f"--boxes {path}: not a text CSV file") from None
    elif os.path.isfile(path) and not path.lower().endswith(".xml"):
        raise ValueError(f"--boxes {path}: neither a .csv (image,x0,y0,x1,y1) nor an ImageNet .xml file, "
                         "nor a folder of .xml files")
    else:
        files = [path] if os.path.isfile(path) else walk_files(path, (".xml",))
        for xml in files:
            try:
                root = ET.parse(xml).getroot()
                name = root.findtext("filename") or os.path.basename(xml)
                key = os.path.splitext(os.path.basename(name))[0]
                for obj in root.iter("object"):
                    bb = obj.find("bndbox")
                    boxes.setdefault(key, []).append(
                        tuple(float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")))
            except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
                raise ValueError(f"--boxes {xml}: not an ImageNet/PASCAL box annotation "
                                 f"({type(err).__name__}: {err})") from None
    if not boxes:
        raise ValueError(f"--boxes {path}: no boxes found")
    return boxes


def crop_boxes(boxes, width: int, height: int, size: int):
    """Boxes in the validation crop's pixels: resize the short side to size*256/224, center-crop size."""
    short = int(round(size * 256 / 224))
    new_w, new_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    sx, sy = new_w / width, new_h / height
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    out = []
    for x0, y0, x1, y1 in boxes:
        b = (np.clip(x0 * sx - left, 0, size), np.clip(y0 * sy - top, 0, size),
             np.clip(x1 * sx - left, 0, size), np.clip(y1 * sy - top, 0, size))
        if b[2] > b[0] and b[3] > b[1]:
            out.append(b)
    return out


class _BoxedImages(Dataset):
    """Validation-cropped images with their original size (boxes are given in original pixels)."""

    def __init__(self, files, size):
        self.images, self.transform = ImageFiles([(f, 0) for f in files], ["image"]), val_transform(size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, _ = self.images[i]
        if img is None:
            return None, 0, 0, i
        return self.transform(img), img.size[0], img.size[1], i


def _collate(batch):
    good = [b for b in batch if b[0] is not None]
    return (torch.stack([b[0] for b in good]) if good else None, [b[1:] for b in good], len(batch) - len(good))


def _image_ious(item):
    heatmaps, gt = item
    return {kind: best_ious(m, gt) for kind, m in heatmaps.items()}


def localize_outputs(output: str | None, probe_dir: str, boxes: str) -> tuple:
    """``(json path, figure path)``: ``--output`` (default ``PROBE/localization.json``) and the same
    name with ``.png``, checked writable before any work; refused when the two would be one file or
    either would overwrite an input (the --boxes file, the probe run's own files)."""
    out = output or os.path.join(probe_dir, "localization.json")
    figure = os.path.splitext(out)[0] + ".png"
    if os.path.realpath(figure) == os.path.realpath(out):
        raise OutputError(f"--output {out}: its figure would be written over it (the figure is the JSON's name "
                          "with .png); give a .json name")
    inputs = {boxes: "--boxes", **{os.path.join(probe_dir, name): "--probe file" for name in
                                  ("checkpoint.pt", "config.json", "results.json", "metrics.jsonl", "curves.png")}}
    check_distinct_outputs({out: "--output", figure: "--output's figure"}, inputs)
    check_output_file(out, flag="--output")
    return out, figure


def check_localize_arguments(probe_dir: str, data: str, limit, batch_size, workers, device) -> None:
    """localize's flags, checked before a model is built or an image read."""
    if not os.path.isfile(os.path.join(probe_dir, "checkpoint.pt")):
        raise FileNotFoundError(f"--probe {probe_dir}: no checkpoint.pt (a `selagg-fast probe` output folder?)")
    check_data_folder(data)
    check_number("--limit", limit, minimum=1, integer=True, optional=True)
    check_number("--batch-size", batch_size, minimum=1, integer=True)
    check_number("--workers", workers, minimum=0, integer=True)
    check_device(device)


def localize(probe_dir: str, data: str, boxes_path: str, head: str | None = None, limit: int | None = None,
             batch_size: int = 64, workers: int = 4, device: str = "auto", progress: bool = True,
             trust_checkpoint: bool = False) -> dict:
    check_localize_arguments(probe_dir, data, limit, batch_size, workers, device)
    boxes = read_boxes(boxes_path)
    root = os.path.join(data, "val") if os.path.isdir(os.path.join(data, "val")) else data
    all_files = image_files(root)
    files = [f for f in all_files if os.path.splitext(os.path.basename(f))[0] in boxes]
    if not files:
        raise ValueError(f"no image under {root} has a box in {boxes_path} (matched by file name without extension)")
    if len(files) < len(all_files):
        log.warning("%d of %d images under %s have no box in %s: they are left out", len(all_files) - len(files),
                    len(all_files), root, boxes_path)
    without_box = len(all_files) - len(files)
    files = files[:limit] if limit else files
    probe = ProbeMaps(probe_dir, head=head, device=device, trust_checkpoint=trust_checkpoint)
    size = probe.info.img_size
    loader = DataLoader(_BoxedImages(files, size), batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    ious = {"selective": [], "cls": []}
    unreadable, no_box = 0, 0
    # the threshold sweep (100 connected-component labellings per map) is CPU work: a process pool
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 0 else None
    try:
        for images, metas, skipped in tqdm(loader, desc="localize", unit="batch", disable=not progress):
            unreadable += skipped
            if images is None:
                continue
            selection, cls = probe.maps(images)
            kinds = {"selective": upsample(selection, size).numpy()}
            if cls is not None:
                kinds["cls"] = upsample(cls, size).numpy()
            items = []
            for j, (w, h, i) in enumerate(metas):
                gt = crop_boxes(boxes[os.path.splitext(os.path.basename(files[i]))[0]], w, h, size)
                if gt:
                    items.append(({kind: maps[j] for kind, maps in kinds.items()}, gt))
                else:
                    no_box += 1
            for per_kind in (pool.map(_image_ious, items, chunksize=4) if pool else map(_image_ious, items)):
                for kind, v in per_kind.items():
                    ious[kind].append(v)
    finally:
        if pool is not None:
            pool.shutdown()
    if no_box:
        log.warning("%d of %d images have no box left inside the validation crop: they are left out of the "
                    "accuracies", no_box, len(files))
    if unreadable:
        log.warning("%d of %d images were unreadable and are left out", unreadable, len(files))
    if not any(ious.values()):
        raise ValueError(f"no image of {root} could be scored (unreadable, or no box inside the center crop)")
    results = {kind: max_box_acc_v2(np.stack(v)) for kind, v in ious.items() if v}
    # images: those with a box; images_scored: those the accuracies are over (readable, a box in the crop)
    return dict(probe=probe_dir, head=probe.head, images=len(files), unreadable_images=unreadable,
                images_without_box=without_box, images_without_box_in_crop=no_box,
                images_scored=max(len(v) for v in ious.values()), maps=results)


def format_localization(result: dict) -> str:
    lines = [f"{'map':<28}{'IoU30':>8}{'IoU50':>8}{'IoU70':>8}{'MaxBoxAccV2':>13}"]
    names = {"selective": f"Selective ({result['head']})", "cls": "[cls] attention (last block)"}
    for kind, r in result["maps"].items():
        lines.append(f"{names[kind]:<28}{r['iou30']['max_box_acc']:>8.1f}{r['iou50']['max_box_acc']:>8.1f}"
                     f"{r['iou70']['max_box_acc']:>8.1f}{r['max_box_acc_v2']:>13.1f}")
    return "\n".join(lines)


def write_localization(result: dict, path: str) -> None:
    atomic_json(path, result)


def plot_localization(result: dict, path: str, thresholds=THRESHOLDS) -> str:
    """Box accuracy against the threshold, one panel per IoU level, both maps overlaid; the
    maximum of each curve (its MaxBoxAcc) marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"selective": f"Selective ({result['head']})", "cls": "[cls] attention"}
    levels = [k for k in next(iter(result["maps"].values())) if k.startswith("iou")]
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.6), sharey=True)
    for ax, level in zip(np.atleast_1d(axes), levels):
        for kind, r in result["maps"].items():
            curve = r[level]["box_acc"]
            line, = ax.plot(thresholds, curve, label=f"{names[kind]}: {r[level]['max_box_acc']:.1f}")
            ax.plot([r[level]["threshold"]], [r[level]["max_box_acc"]], "o", color=line.get_color())
        ax.set_title(f"IoU >= {int(level[3:]) / 100:.1f}")
        ax.set_xlabel("threshold on the min-max normalised map")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    np.atleast_1d(axes)[0].set_ylabel("box accuracy (%)")
    v2 = ", ".join(f"{names[k]} {r['max_box_acc_v2']:.1f}" for k, r in result["maps"].items())
    fig.suptitle(f"MaxBoxAccV2 over {result.get('images_scored', result['images'])} images: {v2}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
