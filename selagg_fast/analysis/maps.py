"""`selagg-fast maps`: where a trained Selective Aggregation probe looks vs the [cls] token (paper Fig. 9)."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ..data import IMAGENET_MEAN, IMAGENET_STD, val_transform
from ..distributed import check_device
from ..files import atomic_write, check_distinct_outputs, check_writable
from .probe_maps import ProbeMaps, upsample


def read_images(paths, flag: str = "--images") -> list:
    """Every image decoded (RGB) up front: an unreadable one is one clear error before any work."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            raise IsADirectoryError(f"{flag} {path}: is a folder, not an image file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except Exception as err:  # PIL's errors for a corrupt, truncated or non-image file
            raise ValueError(f"{flag} {path}: not a readable image ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return images


def map_file_names(images, output_dir: str) -> list:
    """``OUT/NAME_maps.png`` per image; images of one name in different folders get their folder's
    name in front (``x_img_maps.png``, ``y_img_maps.png``), so no figure is written over another."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    names = []
    for path, stem in zip(images, stems):
        if stems.count(stem) > 1:
            stem = f"{os.path.basename(os.path.dirname(path))}_{stem}"
        names.append(stem)
    for i, stem in enumerate(names):  # still equal (same folder name, or a.jpg and a.png): numbered
        if names.count(stem) > 1:
            names[i] = f"{stem}_{i + 1}"
    return [os.path.join(output_dir, f"{stem}_maps.png") for stem in names]


def write_maps(probe_dir: str, images, output_dir: str, head: str | None = None, device: str = "auto",
               trust_checkpoint: bool = False) -> list:
    """One PNG per image: the image, the selection weights and the [cls] attention, overlaid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not images:
        raise ValueError("maps: no --images given")
    check_device(device)
    first = {}
    for path in images:  # an image given twice is drawn once
        first.setdefault(os.path.realpath(path), path)
    images = list(first.values())
    decoded = read_images(images)
    names = map_file_names(images, output_dir)
    check_distinct_outputs({n: "--output-dir figure" for n in names}, {p: "--images" for p in images})
    check_writable(output_dir)
    probe = ProbeMaps(probe_dir, head=head, device=device, trust_checkpoint=trust_checkpoint)
    size = probe.info.img_size
    transform = val_transform(size)
    written = []
    for (path, img), out in zip(zip(images, decoded), names):
        x = transform(img)[None]
        selection, cls = probe.maps(x)
        shown = (x[0].permute(1, 2, 0) * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)).clamp(0, 1).numpy()
        panels = [("image", None), (f"Selective Aggregation ({probe.head})", upsample(selection, size)[0])]
        if cls is not None:
            panels.append(("[cls] attention, last block", upsample(cls, size)[0]))
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), constrained_layout=True)
        for ax, (title, heat) in zip(np.atleast_1d(axes), panels):
            ax.imshow(shown)
            if heat is not None:
                ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        if cls is None:
            fig.text(0.99, 0.01, "model has no [cls] token", ha="right", fontsize=8, color="grey")
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        written.append(out)
    return written
