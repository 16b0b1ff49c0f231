"""Image datasets shared by the trainer and the analysis tools: ImageFolder train/val (optionally a
listed subset), flat image folders, and generated images.

Every sample is ``(image tensor or None, label, index)``; ``None`` marks an unreadable image,
which :func:`collate_skipping` drops and counts. Every random stream (augmentation per
(seed, epoch, index), the training order per (seed, epoch), generated images, the analysis
subset) is seeded by :func:`seed_for`, so a run is reproducible whatever the worker count, the
number of processes, or where it was resumed.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger("selagg_fast")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Purpose tags of seed_for: one independent random stream per use of the run's --seed.
AUGMENT, TRAIN_ORDER, SUBSET, SYNTHETIC_TRAIN, SYNTHETIC_VAL, HEAD_INIT = range(1, 7)


def seed_for(seed: int, purpose: int, *keys: int) -> int:
    """The one seeding scheme of the package: a 63-bit seed from numpy's ``SeedSequence`` of
    (``seed``, ``purpose`` tag, ``keys`` such as epoch and sample index). Streams of different
    purposes or keys are independent; ``seed`` must be >= 0."""
    state = np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def rng_for(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(seed_for(seed, purpose, *keys))


def epoch_shard(indices, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This process's share of the epoch's shuffled ``indices``: the seeded order, padded by
    repeating its start to a multiple of ``world``, then every ``world``-th from ``rank``
    (DistributedSampler's split: W processes at batch B see the global batches of one at W*B)."""
    indices = np.asarray(indices, dtype=np.int64)
    order = indices[rng_for(seed, TRAIN_ORDER, epoch).permutation(len(indices))]
    per_rank = -(-len(order) // world)
    return np.resize(order, per_rank * world)[rank::world]


def split_batches(items, batch_size: int, drop_last: bool) -> list:
    """Consecutive batches of ``items``; ``drop_last`` drops a final partial batch."""
    end = len(items) - len(items) % batch_size if drop_last else len(items)
    return [items[i:i + batch_size] for i in range(0, end, batch_size)]


def walk_files(root: str, extensions, reserved=()) -> list:
    """Every file under ``root`` (recursively) whose name ends with one of ``extensions``
    (case-insensitive), sorted: the package's one directory walk.

    Symbolic links are followed once, by real path: a linked folder that leads back to a folder
    already walked (a loop, never followed twice), contains one, or lies inside ``root`` or one of
    ``reserved`` (folders whose files are listed at their own place, e.g. the class folders) is
    skipped with a warning; a file reached by two paths is listed once, under its unlinked path."""
    extensions = tuple(e.lower() for e in extensions)
    root_real = os.path.realpath(root)
    listed_at = {os.path.realpath(r): os.path.normpath(r) for r in reserved}
    guarded = {root_real, *listed_at}  # real folders no link may lead into
    walked = {root_real}
    found = {}        # real path -> (listed path, reached through a link)
    stack = [(root, root_real, False)]
    twice = 0
    while stack:
        folder, real, linked = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as err:
            log.warning("cannot list %s (%s): skipped", folder, err)
            continue
        for entry in entries:
            try:
                is_link = entry.is_symlink()
                if entry.is_dir():  # follows a link
                    target = os.path.realpath(entry.path) if is_link else os.path.join(real, entry.name)
                    if is_link and _leads_back(target, entry.path, walked, guarded, listed_at):
                        log.warning("skipping the link %s -> %s: it leads to a folder listed elsewhere or to "
                                    "itself (a loop)", entry.path, target)
                        continue
                    walked.add(target)
                    stack.append((entry.path, target, linked or is_link))
                elif entry.name.lower().endswith(extensions):
                    target = os.path.realpath(entry.path) if is_link else os.path.join(real, entry.name)
                    via_link = linked or is_link
                    previous = found.get(target)
                    if previous is not None:
                        twice += 1
                        if not previous[1] or via_link:
                            continue
                    found[target] = (entry.path, via_link)
            except OSError as err:
                log.warning("skipping %s (%s)", entry.path, err)
    if twice:
        log.warning("%s: %d file(s) reached by more than one path (links): each is listed once", root, twice)
    return sorted(path for path, _ in found.values())


def _leads_back(target: str, path: str, walked: set, guarded: set, listed_at: dict) -> bool:
    """Whether a linked folder's real path ``target`` is, holds or lies inside a folder already walked
    or a guarded one (the walk's root, the reserved folders), unless ``path`` is its own listed place."""
    if listed_at.get(target) == os.path.normpath(path):
        return False
    inside = os.path.join(target, "")
    return any(target == folder or folder.startswith(inside) or target.startswith(os.path.join(folder, ""))
               for folder in walked | guarded)


def train_transform(img_size: int):
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def val_transform(img_size: int):
    from torchvision import transforms as T
    # 256/224 of the crop size: resize 256 + center crop 224 at the standard size
    return T.Compose([T.Resize(int(round(img_size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class SeededTransform(Dataset):
    """Applies ``transform`` to ``base[i]`` with the random state seeded by (seed, epoch, i)."""

    def __init__(self, base, transform, seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0
        self.classes = base.classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        if image is None:
            return None, label, index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(self.seed, AUGMENT, self.epoch, index))
            return self.transform(image), label, index


def collate_skipping(batch):
    """Stack the readable samples; returns ``(images, labels, indices, indices of unreadable ones)``."""
    good = [s for s in batch if s[0] is not None]
    skipped = [s[2] for s in batch if s[0] is None]
    if not good:
        return None, None, None, skipped
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([s[1] for s in good], dtype=torch.long)
    indices = torch.tensor([s[2] for s in good], dtype=torch.long)
    return images, labels, indices, skipped


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL image; 16-bit greyscale (mode ``I;16*``, or ``I`` with values above 255) is
    scaled to 8 bits (``/257``: 65535 -> 255), where PIL's own conversion would clip it to white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or values.max(initial=0) > 255:
            values = values / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


class ImageFiles(Dataset):
    """(path, label) list read with PIL; an unreadable file yields ``(None, label)`` and a warning."""

    def __init__(self, samples, classes):
        self.samples, self.classes = list(samples), list(classes)

    def __len__(self):
        return len(self.samples)

    def labels(self) -> list:
        return [y for _, y in self.samples]

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                return to_rgb(img), label
        except Exception as err:  # corrupt / truncated / not an image: skipped and counted
            log.warning("skipping unreadable image %s (%s)", path, err)
            return None, label


class ImageArrays(Dataset):
    """Images held as one uint8 array ``[N, H, W, 3]`` (e.g. CIFAR, STL-10; a memory map is read
    lazily) with their labels: the same ``(PIL image, label)`` items and ``labels()`` as ImageFiles."""

    def __init__(self, images, labels, classes):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.targets, self.classes = images, [int(y) for y in labels], list(classes)

    def __len__(self):
        return len(self.targets)

    def labels(self) -> list:
        return list(self.targets)

    def __getitem__(self, index):
        return Image.fromarray(np.ascontiguousarray(self.images[index])), self.targets[index]


class ImageSubset(Dataset):
    """The items ``indices`` of an ImageFiles / ImageArrays ``base``, with its classes."""

    def __init__(self, base, indices):
        self.base, self.indices, self.classes = base, [int(i) for i in indices], base.classes

    def __len__(self):
        return len(self.indices)

    def labels(self) -> list:
        labels = self.base.labels()
        return [labels[i] for i in self.indices]

    def __getitem__(self, index):
        return self.base[self.indices[index]]


def _image_folder(root: str, split: str):
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data {root}: no '{split}/' folder (expected ImageFolder {root}/train/<class>/... "
                                f"and {root}/val/<class>/...)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"--data {root}: no class folders in {folder}")
    by_class = {c: [] for c in classes}
    for f in walk_files(folder, IMG_EXTENSIONS, reserved=[os.path.join(folder, c) for c in classes]):
        top = os.path.relpath(f, folder).split(os.sep)[0]
        if top in by_class:  # files directly in train/ or val/ belong to no class
            by_class[top].append(f)
    samples = [(f, label) for label, c in enumerate(classes) for f in by_class[c]]
    empty = [c for c in classes if not by_class[c]]
    if empty:
        raise ValueError(f"{folder}: {len(empty)} class folder(s) hold no images: {', '.join(empty[:10])}")
    return samples, classes


def _apply_train_list(samples, list_file: str, train_dir: str):
    """Keep the listed images: lines are paths relative to train/ or bare file names (ImageNet-1% split)."""
    if os.path.isdir(list_file):
        raise ValueError(f"--train-list {list_file}: is a folder, not a list file")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"--train-list {list_file}: no such file")
    try:
        with open(list_file, encoding="utf-8") as f:
            wanted = [line.split()[0] for line in f if line.strip() and not line.startswith("#")]
    except UnicodeDecodeError as err:
        raise ValueError(f"--train-list {list_file}: not a UTF-8 text file (byte {err.start}: "
                         f"{err.object[err.start:err.start + 1]!r}); expected one image path per line") from None
    by_rel = {os.path.relpath(p, train_dir): (p, y) for p, y in samples}
    by_name = {os.path.basename(p): (p, y) for p, y in samples}
    chosen, missing = [], []
    for entry in wanted:
        hit = by_rel.get(entry) or by_name.get(os.path.basename(entry))
        (chosen if hit else missing).append(hit or entry)
    if missing:
        raise ValueError(f"--train-list {list_file}: {len(missing)} of {len(wanted)} entries not found under "
                         f"{train_dir}, e.g. {missing[:3]}")
    return chosen


def check_data_folder(data: str, flag: str = "--data") -> None:
    if os.path.isfile(data):
        raise NotADirectoryError(f"{flag} {data}: is a file, not a folder")
    if not os.path.isdir(data):
        raise FileNotFoundError(f"{flag} {data}: no such directory")


def image_folder_splits(root: str, train_list: str | None = None) -> tuple:
    """``(train, val)`` ImageFiles of an ImageFolder root (``train_list``: the listed training
    images only), every class-folder and list error raised here, before any transform or model."""
    check_data_folder(root)
    train_samples, classes = _image_folder(root, "train")
    val_samples, val_classes = _image_folder(root, "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise ValueError(f"--data {root}: train/ and val/ must hold the same class folders; only in train/: "
                         f"{', '.join(only_train[:10]) or 'none'}; only in val/: {', '.join(only_val[:10]) or 'none'}")
    if train_list:
        train_samples = _apply_train_list(train_samples, train_list, os.path.join(root, "train"))
    return ImageFiles(train_samples, classes), ImageFiles(val_samples, classes)


class SyntheticObjects(Dataset):
    """Generated images whose label is a small object at a random place among clutter.

    The object is a bright, outlined square in one of ``num_classes`` colours; the clutter is
    darker squares of the same colours, so the global colour statistics say little about the
    label and a probe has to find the object: exactly where aggregation matters.
    """

    def __init__(self, size: int, num_classes: int = 10, img_size: int = 64, seed: int = 0, split: str = "train"):
        if num_classes < 2 or num_classes > 16:
            raise ValueError("synthetic data: num_classes must be in [2, 16]")
        self.size, self.num_classes, self.img_size = size, num_classes, img_size
        self.seed, self.purpose = seed, SYNTHETIC_TRAIN if split == "train" else SYNTHETIC_VAL
        self.classes = [f"object_{c}" for c in range(num_classes)]
        hues = np.linspace(0, 1, num_classes, endpoint=False)
        self.palette = np.stack([_hsv_to_rgb(h, 0.9, 1.0) for h in hues])  # [C, 3] in [0, 1]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        image, label, _box = self.render(index)
        return image, label

    def labels(self) -> list:
        # the label is the first draw of an image's generator: no need to render the image
        return [int(rng_for(self.seed, self.purpose, i).integers(self.num_classes)) for i in range(self.size)]

    def render(self, index):
        """``(PIL image, label, object box (x0, y0, x1, y1) in pixels, outline included)``."""
        rng = rng_for(self.seed, self.purpose, index)
        n = self.img_size
        label = int(rng.integers(self.num_classes))
        img = rng.uniform(0.0, 0.15, size=(n, n, 3))
        obj = max(4, n // 8)
        for _ in range(int(rng.integers(8, 14))):  # clutter: darker squares of any class colour
            s = int(rng.integers(obj // 2, obj + 1))
            y, x = rng.integers(0, n - s, size=2)
            img[y:y + s, x:x + s] = self.palette[rng.integers(self.num_classes)] * rng.uniform(0.25, 0.45)
        y, x = rng.integers(1, n - obj - 1, size=2)
        img[y - 1:y + obj + 1, x - 1:x + obj + 1] = 1.0  # white outline
        img[y:y + obj, x:x + obj] = self.palette[label]
        box = (int(x) - 1, int(y) - 1, int(x) + obj + 1, int(y) + obj + 1)
        return Image.fromarray((img * 255).astype(np.uint8)), label, box

    def export(self, folder: str, count: int | None = None) -> str:
        """Write the first ``count`` images as PNGs under ``folder/<class>/`` and their object boxes
        to ``folder/boxes.csv`` (``image,x0,y0,x1,y1``); returns the CSV path."""
        os.makedirs(folder, exist_ok=True)
        rows = ["image,x0,y0,x1,y1"]
        for i in range(min(count or self.size, self.size)):
            image, label, box = self.render(i)
            os.makedirs(os.path.join(folder, self.classes[label]), exist_ok=True)
            name = f"synthetic_{i:06d}"
            image.save(os.path.join(folder, self.classes[label], name + ".png"))
            rows.append(",".join([name, *map(str, box)]))
        path = os.path.join(folder, "boxes.csv")
        with open(path, "w") as f:
            f.write("\n".join(rows) + "\n")
        return path


def _hsv_to_rgb(h, s, v):
    import colorsys
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def synthetic_datasets(img_size: int, train_size: int, val_size: int, num_classes: int, seed: int = 0,
                       augment: bool = True):
    """Generated train/val sets. Augmentation is a horizontal flip only: a random crop would
    often cut the object (and so the label) out of the image."""
    from torchvision import transforms as T
    base = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = T.Compose(([T.RandomHorizontalFlip()] if augment else []) + base)
    train = SeededTransform(SyntheticObjects(train_size, num_classes, img_size, seed, "train"), train_tf, seed)
    val = SeededTransform(SyntheticObjects(val_size, num_classes, img_size, seed, "val"), T.Compose(base), seed)
    return train, val


def image_files(root: str) -> list:
    """Every image file under ``root`` (recursively), sorted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return walk_files(root, IMG_EXTENSIONS)


def analysis_images(data: str, img_size: int, limit: int | None = None, seed: int = 0):
    """Validation-transformed images of ``data`` for the analysis tools: ``DIR/val`` when it exists,
    else every image under ``DIR`` (class folders or flat), or ``"synthetic"``. With ``limit``, a
    seeded random subset (the first N files of ImageNet val would be a few classes only)."""
    if data == "synthetic":
        return synthetic_datasets(img_size, 1, limit or 1000, 10, seed=seed, augment=False)[1]
    check_data_folder(data)
    root = os.path.join(data, "val") if os.path.isdir(os.path.join(data, "val")) else data
    files = image_files(root)
    if not files:
        raise ValueError(f"--data {data}: no image files under {root}")
    if limit is not None and limit < len(files):
        keep = rng_for(seed, SUBSET).permutation(len(files))[:limit]
        files = [files[i] for i in sorted(keep)]
    return SeededTransform(ImageFiles([(f, 0) for f in files], ["image"]), val_transform(img_size), seed)
