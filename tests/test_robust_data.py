"""Nothing lost and nothing silently wrong: damaged or stale feature caches, symlinked data folders,
quantised or non-finite backbone weights, 16-bit images, a one-image last batch, data errors before
the backbone, head sizes refused up front."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from selagg_fast.backbone import create_backbone
from selagg_fast.data import ImageFiles, SeededTransform, _image_folder, walk_files
from selagg_fast.files import CheckpointError
from selagg_fast.probe import probe_model, sizes
from selagg_fast.probe.cache import CacheError, extract, open_store
from selagg_fast.probe.heads import ProbeHeads, parse_heads
from selagg_fast.probe.trainer import ProbeConfig, run_probe

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def _images(folder, names, size=8):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((size, size, 3), 20 * i + 10, np.uint8)).save(os.path.join(folder, name))


# feature cache ------------------------------------------------------------------------------------
def _dataset(folder):
    from torchvision import transforms as T
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    return SeededTransform(ImageFiles([(f, i % 2) for i, f in enumerate(files)], ["a", "b"]), T.ToTensor())


def _tokens(images):  # deterministic, nonzero tokens of each image: [B, 3, 4]
    return torch.stack([images.mean((2, 3)) + 1, images.std((2, 3)) + 2, images.amax((2, 3)) + 3, -images.mean((2, 3)) - 4], 2)


def _store(root, dataset, refresh=False):
    store = open_store(str(root), dict(split="train", model="m"), dataset, (3, 4), "fp32", 2, refresh=refresh)
    extract(store, dataset, _tokens, lambda d, **kw: DataLoader(d, **kw), "cpu", progress=False)
    store.seal()
    return store


def _read_all(store):
    batches = store.batches([store.valid_indices().tolist()])
    return batches[0][0]


def _truncate(path, n):
    with open(path, "r+b") as f:
        f.truncate(n)


def _zero_rows(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))


def _rewrite_image(images):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(images, "2.png"))


DAMAGE = {  # what is done to a sealed store (or its images), the error expected on opening it again
    "truncated tokens.bin": (lambda d, img: _truncate(d / "tokens.bin", 40), r"tokens\.bin is 40 bytes, 240 expected"),
    "zero-filled tokens.bin": (lambda d, img: _zero_rows(d / "tokens.bin"), r"tokens\.bin row \d+ does not match"),
    "truncated meta.json": (lambda d, img: _truncate(d / "meta.json", 30), r"meta\.json: not valid JSON"),
    "zeroed valid.bin": (lambda d, img: (d / "valid.bin").write_bytes(bytes(5)), r"valid\.bin does not match"),
    "missing sums.bin": (lambda d, img: (d / "sums.bin").unlink(), r"sums\.bin is missing"),
    "image rewritten": (lambda d, img: _rewrite_image(img), r"2\.png changed since the tokens were extracted"),
    "image renamed": (lambda d, img: os.rename(os.path.join(img, "4.png"), os.path.join(img, "5.png")),
                      r"entry 4 of the image list was \S+4\.png, is now \S+5\.png"),
    "older store": (lambda d, img: (d / "meta.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "format"})), r"older version"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_or_stale_cache_is_refused_then_refreshed(tmp_path, damage):
    images = tmp_path / "images"
    _images(images, [f"{i}.png" for i in range(5)])
    store = _store(tmp_path / "cache", _dataset(images))
    reference = _read_all(store).clone()
    (folder,) = (tmp_path / "cache").iterdir()
    apply, message = DAMAGE[damage]
    apply(folder, str(images))
    dataset = _dataset(images)
    with pytest.raises(CacheError, match=message) as err:
        _store(tmp_path / "cache", dataset)
    assert str(folder) in str(err.value) and "--refresh-cache" in str(err.value) and "\n" not in str(err.value)
    fresh = _store(tmp_path / "cache", dataset, refresh=True)  # re-extracted, whole again
    tokens = _read_all(fresh)
    assert torch.count_nonzero(tokens.flatten(1), 1).min() > 0
    if damage not in ("image rewritten", "image renamed"):
        torch.testing.assert_close(tokens, reference, rtol=0, atol=0)
    _store(tmp_path / "cache", dataset)  # and opens without complaint


def test_every_read_checks_its_rows(tmp_path):
    """Damage after the store was opened (the sampled check passed) is caught by the read itself."""
    images = tmp_path / "images"
    _images(images, [f"{i}.png" for i in range(5)])
    store = _store(tmp_path / "cache", _dataset(images))
    (folder,) = (tmp_path / "cache").iterdir()
    with open(folder / "tokens.bin", "r+b") as f:
        f.seek(48 * 3)  # row 3 of [5, 3, 4] float32
        f.write(bytes(48))
    batches = store.batches([[0, 1], [2, 3]])
    batches[0]
    with pytest.raises(CacheError, match=r"tokens\.bin row 3 does not match"):
        batches[1]


# data as laid out -----------------------------------------------------------------------------
def _class_tree(root):
    for split in ("train", "val"):
        for c in ("a", "b"):
            _images(root / split / c, ["0.png", "1.png"])
    _images(root.parent / "extra", ["x.png"])


LINKS = {  # link (under the data root) -> target; the training samples expected (path under train/, label)
    "loop to the split": ({"train/a/loop": ".."}, None),
    "loop to the data root": ({"train/a/up": "../.."}, None),
    "loop to itself": ({"train/a/self": "."}, None),
    "sibling class": ({"train/a/tob": "../b"}, None),
    "folder outside": ({"train/b/more": "../../../extra"}, [("b/more/x.png", 1)]),
    "file of another class": ({"train/a/2.png": "../b/0.png"}, None),
    "class folder outside": ({"train/c": "../../extra"}, [("c/x.png", 2)]),
}


def _alarm(signum, frame):
    raise TimeoutError("the walk did not finish in 10 s (a symlink loop followed)")


@pytest.mark.parametrize("layout", list(LINKS))
def test_symlinks_are_followed_once(tmp_path, layout):
    root = tmp_path / "data"
    _class_tree(root)
    links, extra = LINKS[layout]
    for link, target in links.items():
        os.symlink(target, root / link)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        samples, classes = _image_folder(str(root), "train")
        every = walk_files(str(root), (".png",))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    plain = [("a/0.png", 0), ("a/1.png", 0), ("b/0.png", 1), ("b/1.png", 1)]
    assert classes == sorted({"a", "b"} | {path.split("/")[0] for path, _ in extra or []})
    assert sorted((os.path.relpath(p, root / "train"), y) for p, y in samples) == sorted(plain + (extra or []))
    assert len(every) == 8 + len(extra or [])  # train and val, nothing counted twice


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image, _ = ImageFiles([(str(tmp_path / "deep.png"), 0)], ["x"])[0]
    rgb = np.asarray(image)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(values / 257.0).astype(np.uint8))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


# backbone weights ------------------------------------------------------------------------------
def _weights_file(tmp_path, edit):
    from safetensors.torch import save_file
    model = create_backbone("vit_tiny_patch16_224", random_init=True, **TINY).model
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    edit(state)
    path = str(tmp_path / "weights.safetensors")
    save_file(state, path)
    return path


def _set(name, make):
    return lambda state: state.__setitem__(name, make(state[name]))


WEIGHTS = {  # how the file differs from a float one, the refusal expected (None: it loads)
    "int8 (quantised)": (_set("blocks.0.attn.qkv.weight", lambda t: (t * 100).to(torch.int8)),
                         r"tensor blocks\.0\.attn\.qkv\.weight is int8"),
    "int32 position table": (_set("pos_embed", lambda t: t.to(torch.int32)), r"tensor pos_embed is int32"),
    "NaN": (_set("blocks.1.mlp.fc2.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
            r"tensor blocks\.1\.mlp\.fc2\.weight holds 192 non-finite"),
    "inf": (_set("norm.bias", lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))),
            r"tensor norm\.bias holds 1 non-finite"),
    "fp16": (lambda state: state.update({k: v.half() for k, v in state.items()}), None),
    "integer buffer (BEiT-style index)": (
        lambda state: state.__setitem__("blocks.0.attn.relative_position_index", torch.arange(4)), None),
}


@pytest.mark.parametrize("kind", list(WEIGHTS))
def test_integer_or_non_finite_weights_are_refused(tmp_path, kind):
    edit, message = WEIGHTS[kind]
    path = _weights_file(tmp_path, edit)
    if message is None:
        create_backbone("vit_tiny_patch16_224", path, allow_key_mismatch=True, **TINY)
        return
    with pytest.raises(CheckpointError, match=message):
        create_backbone("vit_tiny_patch16_224", path, **TINY)


def test_tensors_the_converter_creates_are_checked(tmp_path, monkeypatch):
    # the file's tensors are checked before timm's converter; what it changes or creates, after it
    from selagg_fast import backbone as backbone_module
    path = _weights_file(tmp_path, lambda state: None)

    def convert(state, model):
        return {**state, "pos_embed": torch.full_like(state["pos_embed"], float("nan"))}

    monkeypatch.setattr(backbone_module, "_timm_converter", lambda model: convert)
    with pytest.raises(CheckpointError, match=r"tensor pos_embed holds \d+ non-finite"):
        create_backbone("vit_tiny_patch16_224", path, **TINY)


# probe runs: order of checks, last batch, sizes ---------------------------------------------------
def _config(tmp_path, **overrides):
    cfg = dict(model="vit_tiny_patch16_224", random_init=True, model_kwargs=TINY, data="synthetic",
               synthetic_train_size=9, synthetic_val_size=8, synthetic_classes=2, heads="avg", lrs="0.5",
               epochs=1, warmup_epochs=0, batch_size=4, workers=0, output_dir=str(tmp_path / "out"),
               progress=False, device="cpu")
    cfg.update(overrides)
    return ProbeConfig(**cfg)


def _empty_class(root):
    _class_tree(root)
    for f in (root / "train" / "b").iterdir():
        f.unlink()


def _bad_list(root):
    _class_tree(root)
    (root.parent / "list.txt").write_text("a/0.png\nb/nope.png\n")
    return dict(train_list=str(root.parent / "list.txt"))


DATA_ERRORS = {"empty class folder": (_empty_class, r"1 class folder\(s\) hold no images: b"),
               "--train-list entry missing": (_bad_list, r"--train-list .*1 of 2 entries not found")}


@pytest.mark.parametrize("case", list(DATA_ERRORS))
def test_data_errors_come_before_the_backbone(tmp_path, monkeypatch, case):
    make, message = DATA_ERRORS[case]
    extra = make(tmp_path / "data") or {}

    def no_backbone(self):
        raise AssertionError("the backbone was built before the data were checked")
    monkeypatch.setattr(ProbeConfig, "create_backbone", no_backbone)
    with pytest.raises(ValueError, match=message):
        run_probe(_config(tmp_path, data=str(tmp_path / "data"), **extra))


def test_one_image_last_batch_is_dropped_under_mae(tmp_path, caplog):
    results = run_probe(_config(tmp_path, protocol="mae", heads="avg,selective"))  # 9 images, batch 4: 4+4+1
    assert results["epochs_done"] == 1 and all(p["top1"] is not None for p in results["pairs"])
    assert "holds 1 image" in caplog.text


@pytest.mark.parametrize("heads, lrs, patch, match", [
    ("selective_k64", "0.1,0.2", "free_memory", r"GiB free on cpu"),
    ("avg,selective_k8", "0.1", "free_disk", r"GiB free for --output-dir"),
])
def test_heads_that_cannot_fit_are_refused_with_the_estimate(tmp_path, monkeypatch, heads, lrs, patch, match):
    specs = parse_heads(heads)
    estimate = sizes.head_sizes(specs, lrs.split(","), 48, 2, 1, grid_size=(4, 4))
    real = ProbeHeads(specs, lrs.split(","), 48, 2, 1, grid_size=(4, 4))
    assert estimate.parameters == sum(p.numel() for p in real.parameters())
    assert estimate.buffers == sum(b.numel() for b in real.buffers())
    monkeypatch.setattr(sizes, patch, lambda *_: 1 << 10)  # 1 KiB left
    monkeypatch.setattr(probe_model, "build_optimizer", lambda *a: pytest.fail("the heads were built"))
    with pytest.raises(sizes.RunTooLargeError, match=rf"{heads}: {estimate.parameters:,} parameters.*{match}"):
        run_probe(_config(tmp_path, heads=heads, lrs=lrs))


def test_probe_refuses_a_stale_cache_and_refreshes_it(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            _images(root / split / c, ["0.png", "1.png", "2.png"], size=32)
    common = dict(data=str(root), augment=False, cache_features=str(tmp_path / "cache"), heads="avg,selective")
    first = run_probe(_config(tmp_path, output_dir=str(tmp_path / "r1"), **common))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "val" / "b" / "1.png")
    with pytest.raises(CacheError, match=r"stale: \S+val/b/1\.png changed since the tokens were extracted"):
        run_probe(_config(tmp_path, output_dir=str(tmp_path / "r2"), **common))
    assert not (tmp_path / "r2" / "config.json").exists()  # no run file: the advice works as given
    again = run_probe(_config(tmp_path, output_dir=str(tmp_path / "r2"), refresh_cache=True, **common))
    assert again["epochs_done"] == first["epochs_done"] == 1
    with pytest.raises(ValueError, match="--refresh-cache: only with --cache-features"):
        run_probe(_config(tmp_path, output_dir=str(tmp_path / "r4"), refresh_cache=True))
