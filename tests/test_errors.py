"""Every failure a user can cause is one line on stderr and exit status 2, found before any work;
nothing saved is lost when a write fails; checkpoints never run code unless trusted."""
import errno
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from selagg_fast import backbone as backbone_module
from selagg_fast.cli import build_parser, main
from selagg_fast.files import CheckpointError, load_torch_file

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def no_work(monkeypatch):
    """A bad value must be refused before a model is built or an image decoded."""
    def refuse(*args, **kwargs):
        raise RuntimeError("work started before the bad value was refused")
    monkeypatch.setattr(backbone_module.Backbone, "__init__", refuse)
    monkeypatch.setattr("selagg_fast.data.ImageFiles.__getitem__", refuse)
    monkeypatch.delenv("SELAGG_TRACEBACK", raising=False)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "a_file").write_text("not a folder")
    (root / "garbage.pth").write_bytes(b"this is not a checkpoint")
    (root / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    (root / "stats_garbage.json").write_text("{not json")
    (root / "broken.png").write_bytes(b"\x89PNG truncated")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "good.png")
    (root / "boxes.txt").write_text("img 1 2 3 4\n")
    (root / "boxes_words.csv").write_text("image,x0,y0,x1,y1\nimg,a,b,c,d\n")
    (root / "boxes_bad.xml").write_text("<annotation><object>")
    (root / "folder").mkdir()
    probe = root / "probe_run"  # looks like a probe run; never loaded by a refused command
    probe.mkdir()
    (probe / "checkpoint.pt").write_bytes(b"garbage")
    (root / "images" / "val").mkdir(parents=True)
    return {k: str(v) for k, v in dict(
        root=root, file=root / "a_file", garbage=root / "garbage.pth", garbage_st=root / "garbage.safetensors", stats_garbage=root / "stats_garbage.json",
        broken=root / "broken.png", good=root / "good.png", boxes_txt=root / "boxes.txt",
        boxes_words=root / "boxes_words.csv", boxes_xml=root / "boxes_bad.xml", folder=root / "folder",
        probe=probe, images=root / "images", missing=root / "missing").items()}


def _probe(out, *extra):
    return ["probe", "--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY),
            "--data", "synthetic", "--workers", "0", "--no-progress", "--output-dir", out, *extra]


def _analyze(out, *extra):
    return ["analyze", "--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY),
            "--data", "synthetic", "--workers", "0", "--no-progress", "--output-dir", out, *extra]


# (id, argv built from the paths, text the one-line error must contain)
CASES = [
    # probe: every numeric flag at 0 / negative / NaN / inf where that is wrong
    *[(f"probe{flag}={v}", lambda p, f=flag, v=v: _probe(p["out"], f, v), flag) for flag, v in [
        ("--epochs", "0"), ("--epochs", "-2"), ("--batch-size", "0"), ("--accum-iter", "0"),
        ("--lrs", "nan"), ("--lrs", "inf"), ("--lrs", "-0.1"), ("--lrs", "0"), ("--lrs", "0.1,0.1"), ("--lrs", "0.1,0.1000001"),
        ("--warmup-epochs", "-1"), ("--warmup-epochs", "nan"), ("--momentum", "1.5"), ("--momentum", "nan"),
        ("--momentum", "-0.1"), ("--weight-decay", "-1"), ("--weight-decay", "inf"), ("--stop-after-epochs", "0"),
        ("--workers", "-1"), ("--seed", "-1"), ("--synthetic-train-size", "0"), ("--synthetic-val-size", "-5"),
        ("--synthetic-classes", "1"), ("--synthetic-classes", "17"), ("--return-block", "0"),
        ("--model-kwargs", "[1]"), ("--model-kwargs", "{bad"), ("--protocol", "simclr"), ("--epochs", "x")]],
    ("probe--model", lambda p: _probe(p["out"], "--model", "vit_nonexistent"), "--model"),
    ("probe--heads", lambda p: _probe(p["out"], "--heads", "cls,foo"), "unknown head 'foo'"),
    ("probe--data-missing", lambda p: _probe(p["out"], "--data", p["missing"]), "--data"),
    ("probe--data-file", lambda p: _probe(p["out"], "--data", p["file"]), "--data"),
    ("probe--train-list-missing", lambda p: _probe(p["out"], "--data", p["root"], "--train-list", p["missing"]),
     "--train-list"),
    ("probe--train-list-folder", lambda p: _probe(p["out"], "--data", p["root"], "--train-list", p["folder"]),
     "--train-list"),
    ("probe--checkpoint-missing", lambda p: _probe(p["out"], "--checkpoint", p["missing"]), "--checkpoint"),
    ("probe--checkpoint-folder", lambda p: _probe(p["out"], "--checkpoint", p["folder"]), "--checkpoint"),
    ("probe--output-dir-file", lambda p: _probe(p["file"]), "--output-dir"),
    ("probe--cache-features-file", lambda p: _probe(p["out"], "--no-augment", "--cache-features", p["file"]),
     "--cache-features"),
    ("probe--resume-garbage", lambda p: _probe(p["probe"], "--resume"), "--resume"),
    ("probe-existing-run", lambda p: _probe(p["probe"]), "--resume"),
    # analyze
    *[(f"analyze{flag}={v}", lambda p, f=flag, v=v: _analyze(p["out"], f, v), flag) for flag, v in [
        ("--limit", "0"), ("--limit", "-3"), ("--batch-size", "0"), ("--save-every", "0"), ("--save-every", "-1"),
        ("--workers", "-1"), ("--seed", "-1"), ("--return-block", "0")]],
    ("analyze--data-missing", lambda p: _analyze(p["out"], "--data", p["missing"]), "--data"),
    ("analyze--data-file", lambda p: _analyze(p["out"], "--data", p["file"]), "--data"),
    ("analyze--output-dir-file", lambda p: _analyze(p["file"]), "--output-dir"),
    ("analyze--checkpoint-garbage", lambda p: _analyze(p["out"], "--checkpoint", p["garbage"]), "--checkpoint"),
    ("probe--checkpoint-garbage-safetensors", lambda p: _probe(p["out"], "--checkpoint", p["garbage_st"]),
     "not a readable .safetensors"),
    # plot
    ("plot-run-missing", lambda p: ["plot", p["missing"], "--output", p["out"] + "/a.png"], "no stats.json"),
    ("plot-run-garbage", lambda p: ["plot", p["stats_garbage"], "--output", p["out"] + "/a.png"], "not a stats.json"),
    ("plot--output-folder", lambda p: ["plot", p["stats_garbage"], "--output", p["folder"]], "--output"),
    ("plot--output-format", lambda p: ["plot", p["stats_garbage"], "--output", p["out"] + "/a.bogus"], "--output"),
    # maps
    ("maps--images-missing", lambda p: ["maps", "--probe", p["probe"], "--images", p["missing"]], "--images"),
    ("maps--images-folder", lambda p: ["maps", "--probe", p["probe"], "--images", p["folder"]], "--images"),
    ("maps--images-unreadable", lambda p: ["maps", "--probe", p["probe"], "--images", p["broken"]], "--images"),
    ("maps--output-dir-file", lambda p: ["maps", "--probe", p["probe"], "--images", p["good"], "--output-dir",
                                         p["file"]], "--output-dir"),
    ("maps--probe-missing", lambda p: ["maps", "--probe", p["missing"], "--images", p["good"], "--output-dir",
                                       p["out"]], "--probe"),
    ("maps--probe-garbage", lambda p: ["maps", "--probe", p["probe"], "--images", p["good"], "--output-dir",
                                       p["out"]], "--probe"),
    # localize
    *[(f"localize{flag}={v}", lambda p, f=flag, v=v: ["localize", "--probe", p["probe"], "--data", p["images"],
                                                       "--boxes", p["boxes_txt"], f, v], flag)
      for flag, v in [("--limit", "0"), ("--limit", "-1"), ("--batch-size", "0"), ("--workers", "-1")]],
    ("localize--boxes-missing", lambda p: ["localize", "--probe", p["probe"], "--data", p["images"], "--boxes",
                                           p["missing"], "--output", p["out"] + "/l.json"], "--boxes"),
    ("localize--boxes-txt", lambda p: ["localize", "--probe", p["probe"], "--data", p["images"], "--boxes",
                                       p["boxes_txt"], "--output", p["out"] + "/l.json"], "neither a .csv"),
    ("localize--boxes-words", lambda p: ["localize", "--probe", p["probe"], "--data", p["images"], "--boxes",
                                         p["boxes_words"], "--output", p["out"] + "/l.json"], "--boxes"),
    ("localize--boxes-xml", lambda p: ["localize", "--probe", p["probe"], "--data", p["images"], "--boxes",
                                       p["boxes_xml"], "--output", p["out"] + "/l.json"], "--boxes"),
    ("localize--data-missing", lambda p: ["localize", "--probe", p["probe"], "--data", p["missing"], "--boxes",
                                          p["boxes_txt"]], "--data"),
    ("localize--probe-missing", lambda p: ["localize", "--probe", p["missing"], "--data", p["images"], "--boxes",
                                           p["boxes_txt"]], "--probe"),
    ("localize--output-folder", lambda p: ["localize", "--probe", p["probe"], "--data", p["images"], "--boxes",
                                           p["boxes_txt"], "--output", p["folder"]], "--output"),
    ("demo--out-file", lambda p: ["demo", "--out", p["file"]], "--out"),
    # compare (its own tests cover it in depth; here: the same rules hold)
    *[(f"compare{flag}={v}", lambda p, f=flag, v=v: ["compare", "--probe", p["probe"], "--data", "synthetic",
                                                      "--output-dir", p["out"], f, v], flag)
      for flag, v in [("--limit", "0"), ("--batch-size", "-1"), ("--save-every", "0"), ("--workers", "-2")]],
    ("compare--output-dir-file", lambda p: ["compare", "--probe", p["probe"], "--data", "synthetic", "--output-dir",
                                            p["file"]], "--output-dir"),
    ("compare--probe-garbage", lambda p: ["compare", "--probe", p["probe"], "--data", "synthetic", "--output-dir",
                                          p["out"]], "--probe"),
]
if not HAS_CUDA:
    CASES += [(f"{cmd}--device-cuda", lambda p, c=cmd: {
        "probe": _probe(p["out"], "--device", "cuda"), "analyze": _analyze(p["out"], "--device", "cuda"),
        "maps": ["maps", "--probe", p["probe"], "--images", p["good"], "--output-dir", p["out"], "--device", "cuda"],
        "localize": ["localize", "--probe", p["probe"], "--data", p["images"], "--boxes", p["boxes_txt"],
                     "--device", "cuda"]}[c], "--device cuda") for cmd in ("probe", "analyze", "maps", "localize")]


def test_every_bad_value_and_path_is_one_line_exit_2_before_any_work(paths, tmp_path, capsys, no_work):
    failures = []
    for case_id, argv, expected in CASES:
        p = dict(paths, out=str(tmp_path / case_id))
        code = main(argv(p))
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1] if err else ""
        one_line = err.count("\n") == 0 or err.startswith("usage:")  # argparse prints its usage first
        if code != 2 or expected not in last or "Traceback" in err or not one_line or "error:" not in last:
            failures.append(f"{case_id}: exit {code}, stderr {err[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_unwritable_output_folder_is_found_before_any_work(paths, tmp_path, capsys, no_work, monkeypatch):
    # as root, permissions are not enforced: the folder refuses the write test instead
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "stats.json").write_text(json.dumps(dict(metrics={}, blocks=[1], num_patches=4, images=1)))
    commands = {
        "probe": _probe(str(tmp_path / "p")), "analyze": _analyze(str(tmp_path / "a")),
        "plot": ["plot", str(tmp_path / "stats"), "--output", str(tmp_path / "ro" / "fig.png")],
        "maps": ["maps", "--probe", paths["probe"], "--images", paths["good"], "--output-dir", str(tmp_path / "m")],
        "localize": ["localize", "--probe", paths["probe"], "--data", paths["images"], "--boxes", paths["boxes_txt"],
                     "--output", str(tmp_path / "ro" / "loc.json")],
        "demo": ["demo", "--out", str(tmp_path / "d")],
        "compare": ["compare", "--probe", paths["probe"], "--data", "synthetic", "--output-dir", str(tmp_path / "c")]}
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert "cannot write there (Permission denied)" in err and err.count("\n") == 0, (name, err)


def _tree(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def test_disk_full_during_a_checkpoint_loses_nothing(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    small = ["--heads", "avg", "--lrs", "1.0", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "16",
             "--synthetic-train-size", "32", "--synthetic-val-size", "16", "--synthetic-classes", "4"]
    assert main(_probe(out, *small, "--stop-after-epochs", "1")) == 0
    printed = capsys.readouterr().out  # an unfinished run says so, and how to go on
    assert "stopped after epoch 1 of 2 (--stop-after-epochs)" in printed and "--resume" in printed
    before = _tree(out)
    save = torch.save
    if os.path.exists("/dev/full"):  # a real full disk: every write there fails with ENOSPC
        os.symlink("/dev/full", os.path.join(out, "checkpoint.pt.tmp"))
    else:
        def disk_fills(obj, f, *args, **kwargs):
            with open(f, "wb") as half:
                half.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(torch, "save", disk_fills)
    capsys.readouterr()
    assert main(_probe(out, *small, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "checkpoint.pt" in err and err.count("\n") == 0, err
    after = _tree(out)
    assert not [p for p in after if p.endswith(".tmp")], after.keys()
    for name in ("checkpoint.pt", "results.json", "curves.png"):
        assert after[name] == before[name], name  # the previous epoch's files, byte for byte
    monkeypatch.setattr(torch, "save", save)
    assert main(_probe(out, *small, "--resume")) == 0  # the run continues from the intact checkpoint
    resumed = json.loads(open(os.path.join(out, "results.json")).read())
    assert main(_probe(str(tmp_path / "whole"), *small)) == 0
    whole = json.loads(open(tmp_path / "whole" / "results.json").read())
    assert resumed["pairs"] == whole["pairs"] and resumed["epochs_done"] == 2
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    os.remove(os.path.join(out, "results.json"))  # lost after the last checkpoint: --resume writes it again
    assert main(_probe(out, *small, "--resume")) == 0
    assert json.loads(open(os.path.join(out, "results.json")).read()) == resumed


def test_failed_save_of_running_sums_keeps_the_previous_ones(tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    save, calls = torch.save, []

    def third_save_fails(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:
            f.write(b"half")  # the temporary file, open for writing
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", third_save_fails)
    argv = _analyze(str(out), "--limit", "12", "--batch-size", "4", "--save-every", "1", "--device", "cpu",
                    "--no-magnitudes")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write" in err and "partial.rank0.pt" in err and err.count("\n") == 0, err
    assert sorted(os.listdir(out)) == [".selagg.lock", "partial.rank0.pt"]  # no .tmp, no stats.json
    assert load_torch_file(str(out / "partial.rank0.pt"))["done"] == [0, 1]


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoints_never_run_code_unless_trusted(tmp_path, capsys, monkeypatch):
    import argparse
    evil = _RunsCode()
    evil.marker = str(tmp_path / "pwned")
    torch.save({"model": {"w": torch.zeros(2)}, "payload": evil}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"posix\.mkdir.*--trust-checkpoint"):
        load_torch_file(str(tmp_path / "evil.pth"))
    assert not os.path.exists(evil.marker)
    monkeypatch.delenv("SELAGG_TRACEBACK", raising=False)
    assert main(_analyze(str(tmp_path / "a"), "--checkpoint", str(tmp_path / "evil.pth"))) == 2
    err = capsys.readouterr().err.strip()
    assert "--trust-checkpoint" in err and "mkdir" in err and err.count("\n") == 0 and not os.path.exists(evil.marker)
    load_torch_file(str(tmp_path / "evil.pth"), trust=True)  # the flag's documented effect: the code runs
    assert os.path.exists(evil.marker)
    # harmless extras load without the flag: MAE's argparse Namespace, numbers, strings
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.5, name="x"), "epoch": 3},
               tmp_path / "mae.pth")
    assert load_torch_file(str(tmp_path / "mae.pth"))["args"].lr == 1.5
    good = open(tmp_path / "mae.pth", "rb").read()
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 2])
    for name in ("cut.pth", "mae.pth.gz"):
        (tmp_path / "mae.pth.gz").write_bytes(b"\x1f\x8b not a checkpoint")
        with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
            load_torch_file(str(tmp_path / name))


def test_help_shows_every_default():
    import argparse
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("demo", "probe", "analyze", "plot", "maps", "localize"):
        sub = commands[name]
        formatter = sub.formatter_class(prog=name)
        for action in sub._actions:
            switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.option_strings and action.dest != "help" and not action.required and not switch:
                assert "default" in formatter._get_help_string(action).lower(), (name, action.dest)
        assert "(default: " in sub.format_help()
