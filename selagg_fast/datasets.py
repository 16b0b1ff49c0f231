"""Datasets in their released layouts: ``--dataset NAME --data DIR`` for probe, analyze and compare.

Each name maps to a :class:`Layout`: the files it needs under ``--data`` and a reader returning
the training and evaluation splits as ImageFiles / ImageArrays (labels and class names
included). Nothing is downloaded. The needed files are checked in order before anything is
read, so a folder of another layout is refused in one line naming the first missing file.
torchvision's dataset classes read the layouts they read without checksums (Food-101, Stanford
Cars, FGVC-Aircraft, DTD, Oxford-IIIT Pets); the layouts whose torchvision class insists on the
released files' MD5 sums (CIFAR-100, STL-10, Flowers-102, Places365) or has no split (SUN397),
and CUB-200-2011, are read here. docs/datasets.md lists every layout and its splits.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .data import (ImageArrays, ImageFiles, ImageSubset, SeededTransform, SUBSET, analysis_images,
                   check_data_folder, image_folder_splits, rng_for, train_transform, val_transform)


@dataclass(frozen=True)
class Layout:
    data: str            # what --data names
    required: tuple      # paths under --data, checked in this order; a trailing "/" marks a folder
    read: Callable       # --data -> (training split, evaluation split)


def _table(root: str, name: str) -> dict:
    """``{id: rest of the line}`` of a CUB-style ``<id> <value>`` file."""
    path = os.path.join(root, name)
    rows = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split(maxsplit=1)
            if not parts:
                continue
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{path} line {n}: expected '<id> <value>', got {line.strip()!r}")
            rows[int(parts[0])] = parts[1].strip()
    return rows


def _cub200(root: str):
    names = _table(root, "classes.txt")
    class_ids = sorted(names)
    classes = [names[c] for c in class_ids]
    label_of = {c: i for i, c in enumerate(class_ids)}
    images, labels, is_train = (_table(root, f) for f in ("images.txt", "image_class_labels.txt",
                                                          "train_test_split.txt"))
    splits = {"1": [], "0": []}
    for image_id in sorted(images):
        for table, name in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise ValueError(f"--data {root}: image {image_id} of images.txt has no line in {name}")
        if not labels[image_id].isdigit() or int(labels[image_id]) not in label_of:
            raise ValueError(f"--data {root}: image {image_id}: class {labels[image_id]!r} of "
                             "image_class_labels.txt is not in classes.txt")
        if is_train[image_id] not in splits:
            raise ValueError(f"--data {root}: image {image_id}: train_test_split.txt says "
                             f"{is_train[image_id]!r}, expected 1 (train) or 0 (test)")
        splits[is_train[image_id]].append((os.path.join(root, "images", images[image_id]),
                                           label_of[int(labels[image_id])]))
    return ImageFiles(splits["1"], classes), ImageFiles(splits["0"], classes)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a data file never runs code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch file")
        return super().find_class(module, name)


def _load_batch(path: str) -> dict:
    with open(path, "rb") as f:
        try:
            return _ArraysOnly(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"{path}: not a CIFAR python batch file ({err})") from None


def _cifar100(root: str):
    folder = os.path.join(root, "cifar-100-python")
    classes = list(_load_batch(os.path.join(folder, "meta"))["fine_label_names"])
    out = []
    for split in ("train", "test"):
        batch = _load_batch(os.path.join(folder, split))
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out.append(ImageArrays(images, batch["fine_labels"], classes))
    return tuple(out)


def _stl10(root: str):
    folder = os.path.join(root, "stl10_binary")
    with open(os.path.join(folder, "class_names.txt")) as f:
        classes = [line.strip() for line in f if line.strip()]
    out = []
    for split in ("train", "test"):
        path = os.path.join(folder, f"{split}_X.bin")
        size = os.path.getsize(path)
        if size % (3 * 96 * 96):
            raise ValueError(f"{path}: {size} bytes is not a whole number of 96x96 RGB images")
        # stored channel-first and column-major: [N, C, W, H] -> [N, H, W, C]
        images = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
        labels = np.fromfile(os.path.join(folder, f"{split}_y.bin"), dtype=np.uint8).astype(np.int64) - 1
        out.append(ImageArrays(images, labels, classes))
    return tuple(out)


def _flowers102(root: str):
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102

    folder = os.path.join(root, "flowers-102")
    labels = loadmat(os.path.join(folder, "imagelabels.mat"), squeeze_me=True)["labels"].reshape(-1) - 1
    split_ids = loadmat(os.path.join(folder, "setid.mat"), squeeze_me=True)
    classes = list(getattr(Flowers102, "classes", None) or [str(c) for c in range(1, 103)])  # names, else numbers

    def files(keys):
        ids = [int(i) for k in keys for i in np.asarray(split_ids[k]).reshape(-1)]
        return ImageFiles([(os.path.join(folder, "jpg", f"image_{i:05d}.jpg"), int(labels[i - 1])) for i in ids],
                          classes)
    return files(("trnid", "valid")), files(("tstid",))


def _path_label_lines(path: str) -> list:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.rsplit(maxsplit=1)
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path} line {n}: expected '<image> <label>', got {line.strip()!r}")
            rows.append((parts[0], int(parts[1])))
    return rows


def _places365(root: str):
    # the 256x256 ("small") images of Places365-Standard, as the peer benchmark reads them
    by_index = {label: name for name, label in _path_label_lines(os.path.join(root, "categories_places365.txt"))}
    classes = [by_index[i][3:] if by_index[i][2:3] == "/" else by_index[i] for i in sorted(by_index)]

    def files(list_name, folder):
        return ImageFiles([(os.path.join(root, folder, *image.strip("/").split("/")), label)
                           for image, label in _path_label_lines(os.path.join(root, list_name))], classes)
    return files("places365_train_standard.txt", "data_256_standard"), files("places365_val.txt", "val_256")


def _sun397(root: str):
    # torchvision's SUN397 has no split; the first of the official ten partitions (Training_01 /
    # Testing_01, 50 + 50 images per class), as the peer benchmark uses
    folder = os.path.join(root, "SUN397")
    with open(os.path.join(folder, "ClassName.txt")) as f:
        classes = [line.strip()[3:] for line in f if line.strip()]  # "/a/abbey" -> "abbey"
    label_of = {c: i for i, c in enumerate(classes)}

    def files(list_name):
        path, samples = os.path.join(folder, list_name), []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                parts = line.strip().strip("/").split("/")
                if parts == [""]:
                    continue
                name = "/".join(parts[1:-1])
                if name not in label_of:
                    raise ValueError(f"{path} line {n}: class {name!r} is not in ClassName.txt")
                samples.append((os.path.join(folder, *parts), label_of[name]))
        return ImageFiles(samples, classes)
    return files("Training_01.txt"), files("Testing_01.txt")


# torchvision's classes keep a split's files and labels in private attributes (the same names from
# torchvision 0.13 on); taking them over lets the package's ImageFiles read, skip and count the images
def _torchvision(class_name: str, root: str, split: str, **kwargs):
    from torchvision import datasets
    try:
        return getattr(datasets, class_name)(root, split=split, download=False, **kwargs)
    except RuntimeError as err:  # "Dataset not found": a file the layout check does not name
        raise FileNotFoundError(f"--data {root}: torchvision.datasets.{class_name}: {err}") from None
    except KeyError as err:  # a label the class list lacks
        raise ValueError(f"--data {root}: torchvision.datasets.{class_name}({split!r}): unknown class {err}") \
            from None


def _files(dataset, paths, labels, classes=None) -> ImageFiles:
    return ImageFiles([(str(p), int(y)) for p, y in zip(paths, labels)], classes or dataset.classes)


def _food101(root: str):
    return tuple(_files(d, d._image_files, d._labels) for d in (_torchvision("Food101", root, s)
                                                                for s in ("train", "test")))


def _stanford_cars(root: str):
    train, test = (_torchvision("StanfordCars", root, s) for s in ("train", "test"))
    return tuple(_files(d, [p for p, _ in d._samples], [y for _, y in d._samples]) for d in (train, test))


def _fgvc_aircraft(root: str):
    return tuple(_files(d, d._image_files, d._labels) for d in (_torchvision("FGVCAircraft", root, s)
                                                                for s in ("trainval", "test")))


def _oxford_pets(root: str):
    train, test = (_torchvision("OxfordIIITPet", root, s) for s in ("trainval", "test"))
    # torchvision names the classes of each split from its own files: the training split's are the names
    return _files(train, train._images, train._labels), _files(test, test._images, test._labels, train.classes)


def _dtd(root: str):
    train, val, test = (_torchvision("DTD", root, s, partition=1) for s in ("train", "val", "test"))
    for d in (val, test):  # DTD labels index the classes present in the split's own file
        if d.classes != train.classes:
            raise ValueError(f"--data {root}: DTD's split files list different classes (train1.txt: "
                             f"{len(train.classes)}, {d._split}1.txt: {len(d.classes)})")
    return (_files(train, [*train._image_files, *val._image_files], [*train._labels, *val._labels]),
            _files(test, test._image_files, test._labels))


DATASETS = {
    "imagefolder": Layout("a folder with train/ and val/ holding one folder per class", (), image_folder_splits),
    "cub200": Layout("the released CUB_200_2011/ folder", (
        "images/", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"), _cub200),
    "cifar100": Layout("the folder holding cifar-100-python/", (
        "cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"), _cifar100),
    "food101": Layout("the folder holding food-101/", (
        "food-101/images/", "food-101/meta/train.json", "food-101/meta/test.json"), _food101),
    "stanford_cars": Layout("the folder holding stanford_cars/ (with devkit/)", (
        "stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
        "stanford_cars/cars_train/", "stanford_cars/cars_test_annos_withlabels.mat", "stanford_cars/cars_test/"),
        _stanford_cars),
    "fgvc_aircraft": Layout("the folder holding fgvc-aircraft-2013b/", (
        "fgvc-aircraft-2013b/data/images/", "fgvc-aircraft-2013b/data/variants.txt",
        "fgvc-aircraft-2013b/data/images_variant_trainval.txt", "fgvc-aircraft-2013b/data/images_variant_test.txt"),
        _fgvc_aircraft),
    "dtd": Layout("the folder holding dtd/dtd/", (
        "dtd/dtd/images/", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/val1.txt", "dtd/dtd/labels/test1.txt"),
        _dtd),
    "oxford_pets": Layout("the folder holding oxford-iiit-pet/", (
        "oxford-iiit-pet/images/", "oxford-iiit-pet/annotations/trainval.txt",
        "oxford-iiit-pet/annotations/test.txt"), _oxford_pets),
    "flowers102": Layout("the folder holding flowers-102/", (
        "flowers-102/jpg/", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"), _flowers102),
    "sun397": Layout("the folder holding SUN397/ with the official partition files", (
        "SUN397/ClassName.txt", "SUN397/Training_01.txt", "SUN397/Testing_01.txt"), _sun397),
    "places365": Layout("the Places365-Standard root (256x256 images and file lists)", (
        "categories_places365.txt", "places365_train_standard.txt", "places365_val.txt", "data_256_standard/",
        "val_256/"), _places365),
    "stl10": Layout("the folder holding stl10_binary/", (
        "stl10_binary/train_X.bin", "stl10_binary/train_y.bin", "stl10_binary/test_X.bin",
        "stl10_binary/test_y.bin", "stl10_binary/class_names.txt"), _stl10),
}


def check_layout(name: str, root: str) -> None:
    """``root`` holds every file of layout ``name`` (one error naming the first missing one)."""
    if name not in DATASETS:
        raise ValueError(f"--dataset {name!r}: choose one of {', '.join(DATASETS)}")
    check_data_folder(root)
    layout = DATASETS[name]
    for rel in layout.required:
        path = os.path.join(root, rel)
        if not (os.path.isdir(path) if rel.endswith("/") else os.path.isfile(path)):
            raise FileNotFoundError(f"--data {root}: no {rel} (--dataset {name} reads {layout.data}: "
                                    f"{', '.join(layout.required)})")


def layout_files(name: str, root: str) -> list:
    """The files (not folders) layout ``name`` requires under ``root``: what an array dataset's
    images are read from (a feature cache records their sizes and mtimes)."""
    if root == "synthetic" or name not in DATASETS:
        return []
    return [os.path.join(root, rel) for rel in DATASETS[name].required if not rel.endswith("/")]


def read_splits(name: str, root: str) -> tuple:
    """``(training split, evaluation split)`` of ``root`` in layout ``name``: ImageFiles or
    ImageArrays yielding ``(PIL image or None, label)``, with ``classes`` and ``labels()``."""
    check_layout(name, root)
    splits = DATASETS[name].read(root)
    for split, dataset in zip(("training", "evaluation"), splits):
        if len(dataset) == 0:
            raise ValueError(f"--data {root}: the {name} {split} split holds no image")
        labels = np.asarray(dataset.labels())
        bad = labels[(labels < 0) | (labels >= len(dataset.classes))]
        if len(bad):
            raise ValueError(f"--data {root}: {name} {split} label {int(bad[0])} outside the "
                             f"{len(dataset.classes)} classes")
    return splits


def check_data_flags(name: str, data: str, train_list: str | None = None) -> None:
    """``--dataset`` / ``--data`` / ``--train-list`` of probe, analyze and compare, before anything
    is read: ``synthetic`` data has no dataset; a folder holds the layout's files; a training list
    subsets an image folder only."""
    if data == "synthetic":
        if name != "imagefolder":
            raise ValueError(f"--data synthetic: generated images, not --dataset {name}")
        return
    check_layout(name, data)
    if train_list is not None and name != "imagefolder":
        raise ValueError(f"--train-list: only with --dataset imagefolder, not {name}")


def probe_splits(name: str, root: str, train_list: str | None = None) -> tuple:
    """``(training split, evaluation split)`` of a probing run, untransformed: every layout,
    class-folder and ``--train-list`` file error is raised here, before a model is built (the
    flags' combination: :func:`check_data_flags`)."""
    if name == "imagefolder":
        return image_folder_splits(root, train_list)
    return read_splits(name, root)


def probe_datasets(name: str, root: str, img_size: int, train_list: str | None = None, augment: bool = True,
                   seed: int = 0, splits: tuple | None = None):
    """Train and evaluation datasets of a probing run, with the protocol's transforms (``splits``:
    already read by :func:`probe_splits`)."""
    train, evaluation = splits or probe_splits(name, root, train_list)
    return (SeededTransform(train, train_transform(img_size) if augment else val_transform(img_size), seed),
            SeededTransform(evaluation, val_transform(img_size), seed))


def analysis_dataset(name: str, data: str, img_size: int, limit: int | None = None, seed: int = 0):
    """The validation-transformed images analyze and compare read: for ``imagefolder`` those of
    :func:`analysis_images` (``DIR/val``, a flat folder, or ``synthetic``), else the evaluation
    split; with ``limit``, a seeded random subset."""
    if name == "imagefolder" or data == "synthetic":
        return analysis_images(data, img_size, limit, seed)
    images = read_splits(name, data)[1]
    if limit is not None and limit < len(images):
        images = ImageSubset(images, sorted(rng_for(seed, SUBSET).permutation(len(images))[:limit]))
    return SeededTransform(images, val_transform(img_size), seed)
