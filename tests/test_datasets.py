"""--dataset NAME --data DIR: tiny folders written in each released layout (split files written
here) load with the right classes, split sizes and labels; other folders are refused in one line."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from selagg_fast.data import collate_skipping
from selagg_fast.datasets import (DATASETS, analysis_dataset, check_data_flags, check_layout, probe_datasets,
                                  read_splits)

CLASSES = ["alpha", "beta", "gamma"]
TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 1  # 6 training and 3 evaluation images, so a swap of the splits shows


def _jpg(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, np.uint8)).save(path)
    return str(path)


def _per_split():
    """``(split, class index, i)`` of every image: training first."""
    return [(split, c, i) for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS))
            for c in range(len(CLASSES)) for i in range(n)]


# writers: each lays out the 3 classes in its dataset's released format under `root` and returns
# (the --data folder, {path: label} of the training split, of the evaluation split)
def write_imagefolder(root):
    expected = {"train": {}, "test": {}}
    for split, c, i in _per_split():
        folder = "train" if split == "train" else "val"
        expected[split][_jpg(root / folder / CLASSES[c] / f"{i}.jpg")] = c
    return str(root), expected["train"], expected["test"]


def write_cub200(root):
    root = root / "CUB_200_2011"
    names = [f"{k + 1:03d}.{c}" for k, c in enumerate(CLASSES)]
    expected, images, labels, split_lines = {"train": {}, "test": {}}, [], [], []
    # the test images first, so the split comes from train_test_split.txt and not from the order
    for image_id, (split, c, i) in enumerate(sorted(_per_split(), key=lambda s: s[0] != "test"), 1):
        rel = f"{names[c]}/{names[c]}_{i}_{split}.jpg"
        expected[split][_jpg(root / "images" / rel)] = c
        images.append(f"{image_id} {rel}")
        labels.append(f"{image_id} {c + 1}")
        split_lines.append(f"{image_id} {int(split == 'train')}")
    for name, lines in (("classes.txt", [f"{k + 1} {n}" for k, n in enumerate(names)]), ("images.txt", images),
                        ("image_class_labels.txt", labels), ("train_test_split.txt", split_lines)):
        (root / name).write_text("\n".join(lines) + "\n")
    return str(root), expected["train"], expected["test"]


def write_food101(root):
    base, expected, meta = root / "food-101", {"train": {}, "test": {}}, {"train": {}, "test": {}}
    for split, c, i in _per_split():
        rel = f"{CLASSES[c]}/{split}{i}"
        expected[split][_jpg(base / "images" / f"{rel}.jpg")] = c
        meta[split].setdefault(CLASSES[c], []).append(rel)
    (base / "meta").mkdir()
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    return str(root), expected["train"], expected["test"]


def write_stanford_cars(root):
    import scipy.io as sio
    base, expected = root / "stanford_cars", {"train": {}, "test": {}}
    annotations = {"train": [], "test": []}
    for split, c, i in _per_split():
        name = f"{c}{i}.jpg"
        expected[split][_jpg(base / f"cars_{split}" / name)] = c
        annotations[split].append((name, c + 1))
    (base / "devkit").mkdir()
    for split, path in (("train", base / "devkit" / "cars_train_annos.mat"),
                        ("test", base / "cars_test_annos_withlabels.mat")):
        table = np.zeros(len(annotations[split]), dtype=[("fname", "O"), ("class", "O")])
        table[:] = annotations[split]
        sio.savemat(str(path), {"annotations": table})
    sio.savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": np.array(CLASSES, dtype=object)})
    return str(root), expected["train"], expected["test"]


def write_fgvc_aircraft(root):
    data, expected, lines = root / "fgvc-aircraft-2013b" / "data", {"train": {}, "test": {}}, {"train": [], "test": []}
    variants = [f"Boeing 7{k}7-200" for k in range(len(CLASSES))]  # names with spaces, as the released ones
    for split, c, i in _per_split():
        name = f"{split}{c}{i}"
        expected[split][_jpg(data / "images" / f"{name}.jpg")] = c
        lines[split].append(f"{name} {variants[c]}")
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, file in (("train", "trainval"), ("test", "test")):
        (data / f"images_variant_{file}.txt").write_text("\n".join(lines[split]) + "\n")
    return str(root), expected["train"], expected["test"]


def write_dtd(root):
    base, expected, lines = root / "dtd" / "dtd", {"train": {}, "test": {}}, {"train": [], "val": [], "test": []}
    for split, c, i in _per_split():
        file = split if split == "test" else ("train", "val")[i % 2]  # training = train1 + val1
        name = f"{CLASSES[c]}_{split}{i}.jpg"
        expected[split][_jpg(base / "images" / CLASSES[c] / name)] = c
        lines[file].append(f"{CLASSES[c]}/{name}")
    (base / "labels").mkdir()
    for file, rows in lines.items():
        (base / "labels" / f"{file}1.txt").write_text("\n".join(rows) + "\n")
    return str(root), expected["train"], expected["test"]


def write_oxford_pets(root):
    base, expected, lines = root / "oxford-iiit-pet", {"train": {}, "test": {}}, {"train": [], "test": []}
    breeds = ["Abyssinian", "great_pyrenees", "Sphynx"]
    for split, c, i in _per_split():
        image_id = f"{breeds[c]}_{split}{i}"
        expected[split][_jpg(base / "images" / f"{image_id}.jpg")] = c
        lines[split].append(f"{image_id} {c + 1} {1 + c % 2} {i + 1}")
    (base / "annotations").mkdir()
    for split, file in (("train", "trainval"), ("test", "test")):
        (base / "annotations" / f"{file}.txt").write_text("\n".join(lines[split]) + "\n")
    return str(root), expected["train"], expected["test"]


def write_flowers102(root):
    import scipy.io as sio
    base, expected, ids, labels = root / "flowers-102", {"train": {}, "test": {}}, {"trnid": [], "valid": [],
                                                                                     "tstid": []}, []
    for image_id, (split, c, i) in enumerate(_per_split(), 1):
        expected[split][_jpg(base / "jpg" / f"image_{image_id:05d}.jpg")] = c
        ids["tstid" if split == "test" else ("trnid", "valid")[i % 2]].append(image_id)
        labels.append(c + 1)
    sio.savemat(str(base / "imagelabels.mat"), {"labels": np.array([labels])})
    sio.savemat(str(base / "setid.mat"), {k: np.array([v]) for k, v in ids.items()})
    return str(root), expected["train"], expected["test"]


def write_sun397(root):
    base, expected, lines = root / "SUN397", {"train": {}, "test": {}}, {"train": [], "test": []}
    names = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bar"]  # a two-level class name, as released
    for split, c, i in _per_split():
        rel = f"{names[c]}/sun_{split}{i}.jpg"
        expected[split][_jpg(base / rel.lstrip("/"))] = c
        lines[split].append(rel)
    _jpg(base / "b" / "bar" / "sun_not_in_any_split.jpg")  # the partition files choose, not the folder
    (base / "ClassName.txt").write_text("\n".join(names) + "\n")
    for split, file in (("train", "Training_01"), ("test", "Testing_01")):
        (base / f"{file}.txt").write_text("\n".join(lines[split]) + "\n")
    return str(root), expected["train"], expected["test"]


def write_places365(root):
    expected, lines = {"train": {}, "test": {}}, {"train": [], "test": []}
    names = ["/a/airfield", "/b/bar", "/c/cafe/indoor"]
    order = [2, 0, 1]  # the file's label column, not the line order, gives the index
    for split, c, i in _per_split():
        if split == "train":
            rel = f"{names[c]}/{i:08d}.jpg"
            expected[split][_jpg(root / "data_256_standard" / rel.lstrip("/"))] = order[c]
        else:
            rel = f"Places365_val_{c}{i:07d}.jpg"
            expected[split][_jpg(root / "val_256" / rel)] = order[c]
        lines[split].append(f"{rel} {order[c]}")
    (root / "categories_places365.txt").write_text("".join(f"{n} {k}\n" for n, k in zip(names, order)))
    (root / "places365_train_standard.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "places365_val.txt").write_text("\n".join(lines["test"]) + "\n")
    return str(root), expected["train"], expected["test"]


WRITERS = {name[len("write_"):]: f for name, f in globals().items() if name.startswith("write_")}
EXPECTED_CLASSES = {"cub200": [f"{k + 1:03d}.{c}" for k, c in enumerate(CLASSES)],
                    "fgvc_aircraft": ["Boeing 707-200", "Boeing 717-200", "Boeing 727-200"],
                    "oxford_pets": ["Abyssinian", "Great Pyrenees", "Sphynx"],
                    "sun397": ["abbey", "apartment_building/outdoor", "bar"],
                    "places365": ["bar", "cafe/indoor", "airfield"]}


def test_every_layout_is_tested():
    assert set(WRITERS) | {"cifar100", "stl10"} == set(DATASETS)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_file_layouts_load_classes_splits_and_labels(name, tmp_path):
    data, train_expected, test_expected = WRITERS[name](tmp_path / name)
    train, test = read_splits(name, data)
    if name == "flowers102":  # the 102 flower names torchvision knows (or their numbers)
        assert len(train.classes) == 102 and test.classes == train.classes
    else:
        assert train.classes == test.classes == EXPECTED_CLASSES.get(name, CLASSES)
    assert len(train) == 6 and len(test) == 3
    norm = lambda samples: {os.path.normpath(p): y for p, y in samples}  # noqa: E731
    assert norm(train.samples) == norm(train_expected.items())
    assert norm(test.samples) == norm(test_expected.items())
    assert train.labels() == [y for _, y in train.samples]
    image, label = test[0]
    assert image.size == (10, 12) and label == test.samples[0][1]


def _torchvision_reference(name, data, monkeypatch):
    """``{path: label}`` of each split as torchvision's class reads the same files (checksums
    switched off: these classes insist on the released files' MD5 sums)."""
    import torchvision.datasets as tv
    import torchvision.datasets.flowers102 as tv_flowers
    import torchvision.datasets.places365 as tv_places
    for module in (tv_flowers, tv_places):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)
    as_dict = lambda paths, labels: {os.path.normpath(str(p)): int(y) for p, y in zip(paths, labels)}  # noqa: E731
    if name == "flowers102":
        splits = [tv.Flowers102(data, split=s) for s in ("train", "val", "test")]
        train, val, test = (as_dict(d._image_files, d._labels) for d in splits)
        return {**train, **val}, test
    if name == "places365":
        splits = [tv.Places365(data, split=s, small=True) for s in ("train-standard", "val")]
        return tuple(as_dict(*zip(*d.imgs)) for d in splits)
    everything = tv.SUN397(data)  # every image, no split: our splits must agree with its labels
    return as_dict(everything._image_files, everything._labels)


@pytest.mark.parametrize("name", ["flowers102", "places365", "sun397"])
def test_own_readers_agree_with_torchvision(name, tmp_path, monkeypatch):
    data, _, _ = WRITERS[name](tmp_path / name)
    train, test = read_splits(name, data)
    ours = [{os.path.normpath(p): y for p, y in d.samples} for d in (train, test)]
    reference = _torchvision_reference(name, data, monkeypatch)
    if name == "sun397":
        assert {**ours[0], **ours[1]}.items() < reference.items()  # one image is in neither partition
    else:
        assert ours == list(reference)


def _cifar_images(n, labels):
    """CIFAR's row layout (1024 red, 1024 green, 1024 blue bytes per image); the label in red,
    the image index in green, a marker at row 0 column 5 of the blue plane."""
    planes = np.zeros((n, 3, 32, 32), np.uint8)
    planes[:, 0] = np.asarray(labels)[:, None, None]
    planes[:, 1] = np.arange(n)[:, None, None]
    planes[:, 2, 0, 5] = 255
    return planes.reshape(n, 3072)


def test_cifar100(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    labels = {"train": [2, 0, 1, 1, 0, 2], "test": [1, 2, 0]}
    for split, y in labels.items():
        with open(folder / split, "wb") as f:
            pickle.dump({"data": _cifar_images(len(y), y), "fine_labels": y, "coarse_labels": [0] * len(y)}, f,
                        protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": CLASSES, "coarse_label_names": ["all"]}, f, protocol=2)
    train, test = read_splits("cifar100", str(tmp_path))
    assert train.classes == CLASSES and len(train) == 6 and len(test) == 3
    assert train.labels() == labels["train"] and test.labels() == labels["test"]
    for dataset, y in ((train, labels["train"]), (test, labels["test"])):
        for i in range(len(dataset)):
            image, label = dataset[i]
            pixels = np.asarray(image)
            assert image.size == (32, 32) and label == y[i] and pixels[3, 7, 0] == y[i] and pixels[3, 7, 1] == i
            assert pixels[0, 5, 2] == 255 and pixels[5, 0, 2] == 0  # rows are rows
    # torchvision's own reading of the same files, its checksum test switched off
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = tv_cifar.CIFAR100(str(tmp_path), train=False, download=False)
    assert reference.classes == test.classes and reference.targets == test.labels()
    assert all(np.array_equal(np.asarray(reference[i][0]), np.asarray(test[i][0])) for i in range(3))


def test_cifar_file_that_pickles_code_is_refused(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    for name in ("train", "test", "meta"):
        (tmp_path / "cifar-100-python" / name).write_bytes(pickle.dumps(os.system))
    with pytest.raises(ValueError, match="not a CIFAR python batch file"):
        read_splits("cifar100", str(tmp_path))


def test_stl10(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    labels = {"train": [2, 0, 1, 1, 0, 2], "test": [1, 2, 0]}
    for split, y in labels.items():
        # released layout: per image 3 planes of 96x96 stored column-major; marker at row 0, column 5
        images = np.zeros((len(y), 3, 96, 96), np.uint8)  # [N, C, H, W]
        images[:, 0] = np.asarray(y)[:, None, None]
        images[:, 2, 0, 5] = 255
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        (np.asarray(y, np.uint8) + 1).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    train, test = read_splits("stl10", str(tmp_path))
    assert train.classes == test.classes == CLASSES and len(train) == 6 and len(test) == 3
    assert train.labels() == labels["train"] and test.labels() == labels["test"]
    image, label = test[1]
    pixels = np.asarray(image)
    assert image.size == (96, 96) and label == 2 and pixels[50, 50, 0] == 2
    assert pixels[0, 5, 2] == 255 and pixels[5, 0, 2] == 0
    # torchvision's own decoding of the same files (its class checks the released MD5 sums, so the
    # reading method is called directly)
    from torchvision.datasets import STL10
    reference = STL10.__new__(STL10)
    reference.root, reference.base_folder = str(tmp_path), "stl10_binary"
    arrays, targets = reference._STL10__loadfile("test_X.bin", "test_y.bin")
    for i in range(3):
        expected = Image.fromarray(np.transpose(arrays[i], (1, 2, 0)))
        assert np.array_equal(np.asarray(test[i][0]), np.asarray(expected)) and test.labels()[i] == targets[i]


@pytest.mark.parametrize("name", sorted(n for n in DATASETS if n != "imagefolder"))
def test_wrong_folder_is_refused_naming_the_first_missing_file(name, tmp_path):
    first = DATASETS[name].required[0]
    with pytest.raises(FileNotFoundError, match=f"no {first} ") as err:
        check_layout(name, str(tmp_path))
    assert "\n" not in str(err.value) and f"--dataset {name}" in str(err.value)


def test_a_later_missing_file_is_the_one_named(tmp_path):
    data, _, _ = write_cub200(tmp_path)
    os.remove(os.path.join(data, "train_test_split.txt"))
    with pytest.raises(FileNotFoundError, match="no train_test_split.txt "):
        read_splits("cub200", data)
    with pytest.raises(ValueError, match="--dataset 'cub'"):
        check_layout("cub", data)


def test_probe_and_analysis_datasets_transform_skip_and_subset(tmp_path):
    data, train_expected, _ = write_cub200(tmp_path)
    with open(next(iter(train_expected)), "wb") as f:
        f.write(b"not a jpeg")
    train, val = probe_datasets("cub200", data, 16, augment=False, seed=3)
    images, labels, _, skipped = collate_skipping([train[i] for i in range(len(train))])
    assert images.shape == (5, 3, 16, 16) and skipped == [0] and labels.tolist() == train.base.labels()[1:]
    assert val.classes == train.classes and len(val) == 3
    with pytest.raises(ValueError, match="--train-list: only with --dataset imagefolder"):
        check_data_flags("cub200", data, train_list=str(tmp_path / "list.txt"))
    with pytest.raises(ValueError, match="--data synthetic: generated images, not --dataset cub200"):
        check_data_flags("cub200", "synthetic")
    subset = analysis_dataset("cub200", data, 16, limit=2, seed=0)
    assert len(subset) == 2 and subset[0][0].shape == (3, 16, 16)
    assert set(subset.base.indices) <= {0, 1, 2} and analysis_dataset("cub200", data, 16, seed=0).base is not None


def test_probe_run_records_dataset_and_classes(tmp_path):
    from selagg_fast.probe.trainer import _RESUME_KEYS, ProbeConfig, run_probe
    data, _, _ = write_dtd(tmp_path / "data")
    cfg = dict(model="vit_tiny_patch16_224", random_init=True,
               model_kwargs=dict(img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=2),
               data=data, dataset="dtd", heads="avg", lrs="0.1", epochs=1, warmup_epochs=0, batch_size=3,
               workers=0, progress=False, device="cpu", output_dir=str(tmp_path / "run"),
               cache_features=str(tmp_path / "cache"), augment=False)
    results = run_probe(ProbeConfig(**cfg))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["classes"] == results["classes"] == CLASSES and list(on_disk)[-1] == "classes"
    assert on_disk["dataset"] == "dtd" and on_disk["train_images"] == 6 and on_disk["val_images"] == 3
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["dataset"] == "dtd" and "dataset" in _RESUME_KEYS  # --resume refuses another dataset
    for split in ("train", "val"):  # the cache key holds the dataset
        (store,) = (tmp_path / "cache").glob(f"{split}-*")
        assert json.loads((store / "meta.json").read_text())["fingerprint"]["dataset"] == "dtd"
    with pytest.raises(FileNotFoundError, match="no images/ "):
        run_probe(ProbeConfig(**dict(cfg, dataset="cub200", output_dir=str(tmp_path / "other"))))
    # the analysis tools read the evaluation split (3 images; --limit 2 of them)
    from selagg_fast.analysis.analyze import AnalyzeConfig, run_analyze
    from selagg_fast.analysis.compare import CompareConfig, run_compare
    common = dict(data=data, dataset="dtd", workers=0, progress=False, device="cpu", batch_size=2)
    stats = run_analyze(AnalyzeConfig(model=cfg["model"], random_init=True, model_kwargs=cfg["model_kwargs"],
                                      output_dir=str(tmp_path / "analyze"), **common))
    assert stats["images"] == 3 and stats["settings"]["dataset"] == "dtd"
    compared = run_compare(CompareConfig(probe=str(tmp_path / "run"), limit=2, examples=0,
                                         output_dir=str(tmp_path / "compare"), **common))
    assert compared["images"] == 2


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    from selagg_fast.cli import main
    (tmp_path / "empty").mkdir()
    code = main(["analyze", "--model", "vit_tiny_patch16_224", "--random-init", "--dataset", "food101",
                 "--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no food-101/images/" in err
