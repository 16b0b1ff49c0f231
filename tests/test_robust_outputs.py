"""Nothing lost and nothing silently wrong: one run per output folder, no output written over
another or over an input, no result of 0.0 from no data, resume that names what changed, and
SIGINT / SIGTERM that end in one line with everything saved."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from selagg_fast.cli import main
from selagg_fast.files import LOCK_NAME, output_lock

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
SMALL = ["--heads", "avg,selective", "--lrs", "0.5,2.0", "--warmup-epochs", "1", "--batch-size", "16"]


def _probe(out, data="synthetic", *extra):
    return ["probe", "--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY),
            "--data", data, "--workers", "0", "--no-progress", "--device", "cpu", "--output-dir", str(out),
            "--synthetic-train-size", "32", "--synthetic-val-size", "16", "--synthetic-classes", "4", *SMALL,
            *extra]


def _analyze(out, *extra):
    return ["analyze", "--model", "vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY),
            "--data", "synthetic", "--limit", "8", "--workers", "0", "--no-progress", "--device", "cpu",
            "--output-dir", str(out), *extra]


def _one_line_error(capsys, code, expected):
    """``code`` is 2 and stderr's one line contains every text of ``expected``."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def _image_folder(root, classes=("c0", "c1"), train=3, val=2, readable=True):
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                path = root / split / c / f"{c}_{i}.png"
                if readable:
                    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
                else:
                    path.write_bytes(b"\x89PNG cut short")
    return root


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch):
    monkeypatch.delenv("SELAGG_TRACEBACK", raising=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished one-epoch probe run on a small image folder (classes c0, c1)."""
    root = tmp_path_factory.mktemp("robust")
    data = _image_folder(root / "data")
    assert main(_probe(root / "run", str(data), "--epochs", "1", "--batch-size", "2")) == 0
    (root / "boxes.json").write_text("")  # an input an --output could name (refused before it is read)
    return root


# 1. one run per output folder ------------------------------------------------------------------
LOCKED = [
    ("probe", lambda out: _probe(out)),
    ("analyze", lambda out: _analyze(out)),
    ("compare", lambda out: ["compare", "--probe", str(out), "--data", "synthetic", "--output-dir", str(out),
                             "--device", "cpu"]),
]


@pytest.mark.parametrize("name,argv", LOCKED, ids=[c[0] for c in LOCKED])
def test_a_folder_in_use_is_refused_at_once(tmp_path, capsys, monkeypatch, name, argv):
    if name == "compare":  # a probe folder to read: its checkpoint is never loaded by a refused run
        (tmp_path / "checkpoint.pt").write_bytes(b"never read")
    monkeypatch.setattr("selagg_fast.backbone.Backbone.__init__", _no_work)
    with output_lock(str(tmp_path)):  # another run holds the folder
        code = main(argv(tmp_path))
    _one_line_error(capsys, code, ["another selagg-fast run", f"(process {os.getpid()})", str(tmp_path)])


def test_a_folder_in_use_is_refused_under_torchrun(tmp_path):
    # rank 0 holds the lock: refused there, the other rank must not wait for it in a collective
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SELAGG_TRACEBACK", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "selagg_fast.cli", *_probe(tmp_path / "out")]
    with output_lock(str(tmp_path / "out")):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "another selagg-fast run" in proc.stderr and f"(process {os.getpid()})" in proc.stderr
    assert sorted(os.listdir(tmp_path / "out")) == [LOCK_NAME]  # nothing written by the refused run


def _no_work(*args, **kwargs):
    raise RuntimeError("work started in a folder another run holds")


def _lock_held(folder) -> bool:
    path = os.path.join(folder, LOCK_NAME)
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _wait_for(condition, proc, timeout=240):
    start = time.time()
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.05)


def _start_probe(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SELAGG_TRACEBACK", None)
    return subprocess.Popen([sys.executable, "-m", "selagg_fast.cli", *_probe(out, "synthetic", *extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _epochs_saved(out) -> int:
    try:
        return json.loads((out / "results.json").read_text())["epochs_done"]
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_second_run_refused_then_signal_then_resume_equals_uninterrupted(tmp_path, capsys, sig, code):
    out = tmp_path / "run"
    proc = _start_probe(out, "--epochs", "3")
    try:
        _wait_for(lambda: _lock_held(out), proc)
        # a second run on the folder while the first trains: refused at once, nothing of the first touched
        _one_line_error(capsys, main(_probe(out, "synthetic", "--epochs", "3")), ["another selagg-fast run"])
        _one_line_error(capsys, main(_probe(out, "synthetic", "--epochs", "3", "--resume")),
                        ["another selagg-fast run"])
        _wait_for(lambda: _epochs_saved(out) >= 1, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    done = _epochs_saved(out)
    assert last == f"selagg-fast probe: interrupted after epoch {done} of 3; continue with --resume", err
    assert 1 <= done <= 3 and not [p for p in os.listdir(out) if p.endswith(".tmp")]
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == done  # checkpoint and results.json of the same epoch: nothing half written
    assert main(_probe(out, "synthetic", "--epochs", "3", "--resume")) == 0
    assert main(_probe(tmp_path / "whole", "synthetic", "--epochs", "3")) == 0
    resumed = json.loads((out / "results.json").read_text())
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert resumed["pairs"] == whole["pairs"] and resumed["epochs_done"] == 3
    a = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["heads"]
    b = torch.load(tmp_path / "whole" / "checkpoint.pt", map_location="cpu", weights_only=True)["heads"]
    for k in a:  # the interrupted process ran on one thread, this one on several: float rounding only
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    lines = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1] * 4 + [2] * 4 + [3] * 4


# 1. (cont.) run files, colliding outputs -------------------------------------------------------
def _run_files(tmp_path, *names):
    out = tmp_path / "old"
    out.mkdir()
    for name in names:
        (out / name).write_text("{}")
    return out


COLLIDING = [
    # a run whose checkpoint.pt was deleted keeps results / metrics / config: a new run must not overwrite them
    ("probe-results-left", lambda t, r: _probe(_run_files(t, "results.json", "metrics.jsonl")),
     ["already holds a run (results.json", "--resume"]),
    ("probe-config-left", lambda t, r: _probe(_run_files(t, "config.json")), ["already holds a run (config.json)"]),
    ("probe-resume-without-checkpoint", lambda t, r: _probe(_run_files(t, "results.json"), "synthetic", "--resume"),
     ["holds results.json but no checkpoint.pt"]),
    ("analyze-partial-left", lambda t, r: _analyze(_run_files(t, "partial.rank0.pt")),
     ["already holds a run (partial.rank0.pt)"]),
    ("localize-output-png", lambda t, r: _localize(r, "--output", str(t / "result.png")),
     ["--output", "result.png", "figure would be written over it"]),
    ("localize-output-results", lambda t, r: _localize(r, "--output", str(r / "run" / "results.json")),
     ["would overwrite the input", "results.json"]),
    ("localize-output-boxes", lambda t, r: _localize(r, "--output", str(r / "boxes.json")),
     ["would overwrite the input --boxes"]),
    ("localize-figure-over-curves", lambda t, r: _localize(r, "--output", str(r / "run" / "curves.json")),
     ["--output's figure", "would overwrite the input", "curves.png"]),
    ("plot-over-stats", lambda t, r: ["plot", str(_run_files(t, "stats.json")), "--output",
                                      str(t / "old" / "stats.json")], ["would overwrite the input run"]),
]


def _localize(root, *extra):
    return ["localize", "--probe", str(root / "run"), "--data", str(root / "data"), "--boxes",
            str(root / "boxes.json"), "--device", "cpu", *extra]


@pytest.mark.parametrize("name,argv,expected", COLLIDING, ids=[c[0] for c in COLLIDING])
def test_no_output_over_another_run_or_an_input(tmp_path, capsys, monkeypatch, run_dir, name, argv, expected):
    before = {p: os.path.getmtime(p) for p in map(str, run_dir.rglob("*")) if os.path.isfile(p)}
    monkeypatch.setattr("selagg_fast.backbone.Backbone.__init__", _no_work)
    _one_line_error(capsys, main(argv(tmp_path, run_dir)), expected)
    assert {p: os.path.getmtime(p) for p in before} == before


def test_maps_of_one_name_in_two_folders_are_two_files(tmp_path, capsys, run_dir):
    images = []
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        shutil.copy(next((run_dir / "data" / "val" / "c0").iterdir()), tmp_path / folder / "img.png")
        images.append(str(tmp_path / folder / "img.png"))
    argv = ["maps", "--probe", str(run_dir / "run"), "--images", *images, images[0], "--output-dir",
            str(tmp_path / "maps"), "--device", "cpu"]
    assert main(argv) == 0
    wrote = [line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    assert sorted(os.listdir(tmp_path / "maps")) == ["x_img_maps.png", "y_img_maps.png"]
    assert sorted(map(os.path.basename, wrote)) == ["x_img_maps.png", "y_img_maps.png"]


# 3. no readable data, no step, diverged pairs ------------------------------------------------------
def _diverged_run(root, out):
    """The fixture's run with selective@2 marked diverged and its parameters NaN, as the trainer leaves it."""
    shutil.copytree(root / "run", out)
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    for p in state["results"]["pairs"]:
        if p["head"] == "selective" and p["base_lr"] == 2.0:
            p.update(top1=None, top5=None, diverged=True)
    torch.save(state, out / "checkpoint.pt")
    return out


def _boxes(root, tmp_path):
    lines = ["image,x0,y0,x1,y1"] + [f"{p.stem},2,2,30,30" for p in (root / "data" / "val").rglob("*.png")]
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "boxes.csv")


NO_RESULT = [
    ("val-unreadable", lambda t, r: _probe(t / "o", str(_unreadable_split(t, "val")), "--epochs", "1",
                                           "--batch-size", "2"), ["no validation image could be read"]),
    ("train-unreadable", lambda t, r: _probe(t / "o", str(_unreadable_split(t, "train")), "--epochs", "1",
                                             "--batch-size", "2"), ["no training step ran in epoch 1"]),
    ("maps-diverged", lambda t, r: ["maps", "--probe", str(_diverged_run(r, t / "d")), "--head", "selective@2",
                                    "--images", str(next((r / "data" / "val" / "c0").iterdir())),
                                    "--output-dir", str(t / "m"), "--device", "cpu"],
     ["--head selective@2: diverged in training", "choose one of selective@0.5"]),
    ("localize-diverged", lambda t, r: ["localize", "--probe", str(_diverged_run(r, t / "d")), "--head",
                                        "selective@2", "--data", str(r / "data"), "--boxes", _boxes(r, t),
                                        "--workers", "0", "--device", "cpu", "--output", str(t / "l.json")],
     ["--head selective@2: diverged in training"]),
]


def _unreadable_split(tmp_path, split):
    data = _image_folder(tmp_path / "data")
    for path in (data / split).rglob("*.png"):
        path.write_bytes(b"\x89PNG cut short")
    return data


@pytest.mark.parametrize("name,argv,expected", NO_RESULT, ids=[c[0] for c in NO_RESULT])
def test_no_data_or_a_diverged_pair_is_an_error_not_a_zero(tmp_path, capsys, run_dir, name, argv, expected):
    _one_line_error(capsys, main(argv(tmp_path, run_dir)), expected)
    assert not (tmp_path / "o" / "results.json").exists() and not (tmp_path / "l.json").exists()
    assert not (tmp_path / "m").exists() or not os.listdir(tmp_path / "m")


# 4. resume and checkpoints -----------------------------------------------------------------------
def _copy_run(root, tmp_path, add_class=False):
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copytree(root / "run", tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    state["config"]["data"] = str(tmp_path / "data")  # the copy's data, as if the run had been started on it
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    if add_class:
        _image_folder(tmp_path / "data", classes=("c2",))
    return tmp_path


def _truncated(t, r):
    _copy_run(r, t)
    ckpt = t / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return _probe(t / "run", str(t / "data"), "--epochs", "1", "--batch-size", "2", "--resume")


def _foreign(t, r):
    _copy_run(r, t)
    torch.save({"model": {"w": torch.zeros(2)}}, t / "run" / "checkpoint.pt")
    return _probe(t / "run", str(t / "data"), "--epochs", "1", "--batch-size", "2", "--resume")


def _other_cwd(t, r, monkeypatch):
    _copy_run(r, t)
    _image_folder(t / "elsewhere" / "data")
    monkeypatch.chdir(t / "elsewhere")  # a relative --data from another folder: other images
    return _probe(t / "run", "data", "--epochs", "1", "--batch-size", "2", "--resume")


RESUME = [
    ("class-added", lambda t, r, m: _probe(_copy_run(r, t, add_class=True) / "run", str(t / "data"), "--epochs", "1",
                                           "--batch-size", "2", "--resume"),
     ["classes of --data", "changed", "added: c2; removed: none"]),
    ("other-settings", lambda t, r, m: _probe(_copy_run(r, t) / "run", str(t / "data"), "--epochs", "1",
                                              "--batch-size", "2", "--resume", "--seed", "3"),
     ["different settings: --seed 0 then, 3 now"]),
    ("relative-data-other-cwd", _other_cwd, ["different settings: --data", "elsewhere"]),
    ("not-a-run-checkpoint", lambda t, r, m: _foreign(t, r), ["checkpoint.pt: not a checkpoint of a `selagg-fast"]),
    ("truncated-checkpoint", lambda t, r, m: _truncated(t, r), ["--resume", "checkpoint.pt", "truncated"]),
    ("train-list-not-utf8", lambda t, r, m: _probe(t / "o", str(r / "data"), "--train-list", str(_latin1(t))),
     ["--train-list", "not a UTF-8 text file"]),
]


def _latin1(tmp_path):
    (tmp_path / "list.txt").write_bytes("c0/c0_0.png caf\xe9\n".encode("latin-1"))
    return tmp_path / "list.txt"


@pytest.mark.parametrize("name,argv,expected", RESUME, ids=[c[0] for c in RESUME])
def test_resume_names_what_changed(tmp_path, capsys, monkeypatch, run_dir, name, argv, expected):
    _one_line_error(capsys, main(argv(tmp_path, run_dir, monkeypatch)), expected)


def test_resume_compares_resolved_paths(tmp_path, capsys, run_dir, monkeypatch):
    _copy_run(run_dir, tmp_path)
    monkeypatch.chdir(tmp_path)  # relative and with a trailing slash: the same folder as the saved absolute one
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert os.path.isabs(config["data"]) and os.path.isabs(config["output_dir"])
    assert main(_probe("run", "data/", "--epochs", "1", "--batch-size", "2", "--resume")) == 0, capsys.readouterr().err


@pytest.mark.parametrize("value,shows", [("1", True), ("yes", True), ("true", True), ("0", False),
                                         ("false", False), ("no", False), ("", False)])
def test_selagg_traceback_values(tmp_path, capsys, monkeypatch, value, shows):
    monkeypatch.setenv("SELAGG_TRACEBACK", value)
    argv = _probe(tmp_path, "synthetic", "--epochs", "0")
    if shows:
        with pytest.raises(ValueError, match="--epochs"):
            main(argv)
    else:
        _one_line_error(capsys, main(argv), ["--epochs 0"])


def test_resume_with_only_the_folder_continues_the_run_as_started(tmp_path, capsys):
    # flags not given take the run's own values (config.json); one given anew is still checked
    out = tmp_path / "run"
    assert main(_probe(out, "synthetic", "--epochs", "2", "--stop-after-epochs", "1")) == 0
    first = json.loads((out / "config.json").read_text())
    assert main(["probe", "--resume", "--output-dir", str(out), "--device", "cpu", "--workers", "0"]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["epochs_done"] == 2
    config = json.loads((out / "config.json").read_text())
    for key in ("model", "model_kwargs", "random_init", "data", "heads", "lrs", "batch_size", "epochs", "seed"):
        assert config[key] == first[key], key
    for changed, expected in ((["--lrs", "0.5"], "--lrs '0.5,2.0' then, '0.5' now"),
                              (["--seed", "5"], "--seed 0 then, 5 now"),
                              (["--synthetic-train-size", "64"], "--synthetic-train-size 32 then, 64 now")):
        capsys.readouterr()
        code = main(["probe", "--resume", "--output-dir", str(out), *changed, "--device", "cpu"])
        _one_line_error(capsys, code, ["different settings: " + expected])


def test_a_run_stopped_in_its_first_epoch_keeps_its_first_command(tmp_path, capsys, monkeypatch):
    # interrupted before any epoch finished, then resumed with the folder alone: both commands recorded
    import selagg_fast.probe.trainer as trainer
    out = tmp_path / "run"
    epoch = trainer._epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "_epoch", interrupted)
    assert main(_probe(out, "synthetic", "--epochs", "1")) == 130
    started = json.loads((out / "config.json").read_text())["command"]
    monkeypatch.setattr(trainer, "_epoch", epoch)
    assert main(["probe", "--resume", "--output-dir", str(out), "--device", "cpu", "--workers", "0"]) == 0, \
        capsys.readouterr().err
    commands = json.loads((out / "config.json").read_text())["commands"]
    assert len(commands) == 2 and commands[0] == started and "--resume" in commands[1]
