"""`selagg-fast report`: tiny runs -> one Markdown table and the same rows as CSV; the paper's numbers
only beside runs they describe; every head's ± std for a --seeds run."""
import csv
import json
import os
import re
import shutil

import pytest
from conftest import DEVICE, run_cli

from selagg_fast.cli import main
from selagg_fast.probe.report import run_row

TINY = '{"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}'


def _args(out, model, heads, *extra):
    return ["probe", "--model", model, "--random-init", "--model-kwargs", TINY, "--data", "synthetic",
            "--synthetic-train-size", "64", "--synthetic-val-size", "32", "--synthetic-classes", "4", "--heads",
            heads, "--lrs", "0.5,2", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "32", "--workers", "0",
            "--no-progress", "--device", DEVICE, "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    # a preset with the paper's numbers (MAE ViT-B, Table 1 and 6) and a plain timm name without them
    a, b = root / "runs" / "mae", root / "runs" / "plain"
    assert main(_args(a, "mae_vit_base_patch16", "cls,avg,selective,ap2", "--knn", "--knn-k", "5,10")) == 0
    assert main(_args(b, "vit_tiny_patch16_224", "avg,selective")) == 0
    return root, a, b


def _variant(src, dst, config=None, results=None):
    """A copy of run ``src`` whose config.json / results.json have the given keys replaced."""
    shutil.copytree(src, dst)
    for name, edits in (("config.json", config), ("results.json", results)):
        data = json.loads((dst / name).read_text())
        data.update(edits or {})
        (dst / name).write_text(json.dumps(data))
    return dst


def _as_paper_run(src, dst, **config):
    """Run ``src`` as the paper's would record it: the preset's own architecture from its file,
    trained with the table's protocol (Table 1: LARS, global batch 16384, 90 epochs for a ViT-B;
    Table 2: SGD, batch 1024, 3 seeds)."""
    original = json.loads((src / "config.json").read_text())
    backbone = {**original["backbone"], "img_size": 224}
    table2 = config.get("dataset") == "cub200" or config.get("train_list")
    training = dict(augment=True, weight_decay=0.0, warmup_epochs=10.0)
    protocol = dict(optimizer="sgd", effective_batch=1024, seeds=[0, 1, 2], epochs=1, **training) if table2 else \
        dict(optimizer="lars", effective_batch=16384, epochs=90, momentum=0.9, **training)
    return _variant(src, dst, {**dict(checkpoint="/ckpt/mae_pretrain_vit_base.pth", random_init=False, model_kwargs={},
                                      data="/data/imagenet", backbone=backbone), **protocol, **config},
                    results=dict(epochs_done=protocol["epochs"]))


def _md_row(out, run):
    header, _, *rows = [line for line in out.read_text().splitlines() if line.startswith("|")]
    names = [c.strip() for c in header.strip("|").split("|")]
    for line in rows:
        cells = dict(zip(names, (c.strip() for c in line.strip("|").split("|"))))
        if cells["run"].split(" (")[0] == run:
            return cells
    raise AssertionError(f"no row of {run} in {out}")


def _csv_rows(out):
    with open(out.with_suffix(".csv"), newline="") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


PAPER_COL = "paper linear / Selective / AP-12 (ImageNet-1k unless named)"


def test_report_rows_link_results_and_commands(runs):
    root, a, b = runs
    out = root / "tables" / "report.md"
    assert main(["report", str(a), str(b), "--output", str(out)]) == 0
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) == 4 and "k-NN" in lines[0] and "Selective" in lines[0] and "EP" in lines[0]
    results_a = json.loads((a / "results.json").read_text())
    best = results_a["best_per_head"]
    mae_row, plain_row = lines[2], lines[3]
    link_a = os.path.relpath(a / "results.json", out.parent)
    assert f"[{best['cls']['top1']:.1f}]({link_a}) ([cls])" in mae_row
    assert f"[{best['selective']['top1']:.1f}]({link_a})" in mae_row
    assert f"[{best['ap2']['top1']:.1f}]({link_a}) (ap2)" in mae_row
    assert f"[{results_a['knn']['best']['top1']:.1f}]({link_a}) (cls " in mae_row
    # a random-init run of a shrunk preset: not what the paper's numbers describe
    assert "67.8" not in mae_row and "| – | no paper numbers: random init; architecture changed" in mae_row
    config_a = json.loads((a / "config.json").read_text())
    assert config_a["command"].startswith("selagg-fast probe --model mae_vit_base_patch16")
    assert "`" + config_a["command"] + "`" in mae_row
    # the second run: no [cls] head trained (linear = avg is missing: cls was not trained), no k-NN, AP, EP
    cells = [c.strip() for c in plain_row.strip("|").split("|")]
    assert cells[0] == "plain" and cells[1] == "synthetic" and cells[2] == "1 epoch"
    assert cells[4] == "–" and cells[7] == "–" and cells[8] == "–"
    assert cells[9] == "–" and cells[10] == "no paper numbers: not a preset of the paper"
    for cell in (cells[5], cells[6]):
        assert cell == "–" or re.match(r"\[\d+\.\d\]\(", cell)
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["mae", "plain"]
    assert float(rows[0]["linear_top1"]) == pytest.approx(best["cls"]["top1"])
    assert float(rows[0]["knn_top1"]) == pytest.approx(results_a["knn"]["best"]["top1"])
    assert rows[0]["paper_selective"] == "" and rows[1]["paper_linear"] == ""
    assert rows[0]["dataset"] == "synthetic" and rows[0]["epochs_done"] == rows[0]["epochs"] == "1"
    assert rows[0]["command"] == config_a["command"] and rows[1]["knn_top1"] == ""
    assert rows[0]["results_json"] == str(a / "results.json")


def test_report_refuses_a_folder_without_a_run(runs, tmp_path, capsys):
    root, a, _ = runs
    assert main(["report", str(a), str(tmp_path), "--output", str(tmp_path / "r.md")]) == 2
    assert "no config.json (not a `selagg-fast probe` output folder)" in capsys.readouterr().err
    assert main(["report", str(a), "--output", str(tmp_path / "r.txt")]) == 2
    assert "ending in .md" in capsys.readouterr().err


def test_no_paper_numbers_for_a_file_that_is_not_the_papers(runs, tmp_path):
    # MAE's fine-tuned release loads with its final norm at init: not the paper's pretrained file
    _, a, _ = runs
    paper_run = _as_paper_run(a, tmp_path / "mae")
    assert run_row(str(paper_run))["paper_selective"] == 71.6
    config = json.loads((paper_run / "config.json").read_text())
    assert config["backbone"]["final_norm_loaded"] is True
    run = _variant(paper_run, tmp_path / "mae_ft", config=dict(backbone={**config["backbone"],
                                                                         "final_norm_loaded": False}))
    row = run_row(str(run))
    assert (row["paper_linear"], row["paper_selective"], row["paper_ap12"]) == (None, None, None)
    assert "not the paper's file" in row["notes"]


def test_paper_numbers_beside_the_runs_they_describe(runs, tmp_path):
    _, a, _ = runs
    out = tmp_path / "report.md"
    paper = _as_paper_run(a, tmp_path / "paper_run")
    cub = _as_paper_run(a, tmp_path / "paper_cub", dataset="cub200", data="/data/CUB_200_2011")
    big = _as_paper_run(a, tmp_path / "paper_448", model_kwargs={"img_size": 448})
    in1pct = _variant(_as_paper_run(a, tmp_path / "paper_in1pct_c", train_list="/data/1percent.txt"),
                      tmp_path / "paper_in1pct", results=dict(train_images=12811))
    config = json.loads((paper.joinpath("config.json")).read_text())
    big_config = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**big_config, "backbone": {**config["backbone"], "img_size": 448}}))
    assert main(["report", str(paper), str(cub), str(big), str(in1pct), "--output", str(out)]) == 0
    row, csv_rows = _md_row(out, "paper_run"), _csv_rows(out)
    # MAE ViT-B: Table 1 [cls] and Selective, Table 6 AP-12 (ImageNet-1k)
    # (the run's AP has 2 heads: the paper's AP-12 is not set beside it)
    assert row["dataset"] == "imagefolder" and row[PAPER_COL] == "67.8 / 71.6 / –"
    assert row["notes"] == "paper AP-12 not shown beside ap2"
    assert (csv_rows["paper_run"]["paper_dataset"], csv_rows["paper_run"]["paper_linear"]) == ("ImageNet-1k", "67.8")
    # CUB-200: Table 2 (standard [cls], Selective); the paper has no CUB AP
    assert _md_row(out, "paper_cub")[PAPER_COL] == "45.8 / 65.9 / – (CUB-200)"
    assert (csv_rows["paper_cub"]["dataset"], csv_rows["paper_cub"]["paper_selective"]) == ("cub200", "65.9")
    # ImageNet-1% (the standard split's 12,811 training images): Table 2
    assert _md_row(out, "paper_in1pct")[PAPER_COL] == "39.1 / 48.3 / – (ImageNet-1%)"
    # another resolution keeps them, and says so
    assert _md_row(out, "paper_448")[PAPER_COL] == "67.8 / 71.6 / –"
    assert _md_row(out, "paper_448")["notes"] == "img_size 448 (the paper's: 224); paper AP-12 not shown beside ap2"


@pytest.mark.parametrize("change, reason", [
    (dict(config=dict(random_init=True, checkpoint=None)), "random init"),
    (dict(config=dict(model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 3})),
     "architecture changed (--model-kwargs depth=2, embed_dim=48, num_heads=3)"),
    (dict(config=dict(dataset="cifar100")), "dataset cifar100"),
    (dict(config=dict(data="synthetic")), "dataset synthetic"),
    (dict(config=dict(return_block=8)), "--return-block 8 (paper: block 12)"),
    (dict(config=dict(train_list="/data/10percent.txt")),
     "--train-list subset (not ImageNet-1k, nor the 12,811-image ImageNet-1%)"),
    (dict(config=dict(final_norm=True)), "--final-norm (the paper probes without it)"),
    (dict(results=dict(epochs_done=1)), "unfinished (epoch 1 of 90)"),
])
def test_no_paper_numbers_for_a_run_they_do_not_describe(runs, tmp_path, change, reason):
    _, a, _ = runs
    paper = _as_paper_run(a, tmp_path / "paper_run")
    run = _variant(paper, tmp_path / "changed", **change)
    out = tmp_path / "report.md"
    assert main(["report", str(run), "--output", str(out)]) == 0
    row, csv_row = _md_row(out, "changed"), _csv_rows(out)["changed"]
    assert row[PAPER_COL] == "–" and row["notes"] == f"no paper numbers: {reason}"
    assert [csv_row[k] for k in ("paper_dataset", "paper_linear", "paper_selective", "paper_ap12")] == [""] * 4
    assert csv_row["notes"] == row["notes"]
    if "unfinished" in reason:
        assert row["epochs"] == csv_row["progress"] == "epoch 1 of 90 (unfinished)"
        assert (csv_row["epochs_done"], csv_row["epochs"]) == ("1", "90")


def test_every_head_carries_its_std_over_seeds(tmp_path):
    run = tmp_path / "seeded"
    assert main(_args(run, "vit_tiny_patch16_224", "cls,selective,ap2,ep2", "--seeds", "0,1")) == 0
    out = tmp_path / "report.md"
    assert main(["report", str(run), "--output", str(out)]) == 0
    best = json.loads((run / "results.json").read_text())["best_per_head"]
    row, csv_row = _md_row(out, "seeded"), _csv_rows(out)["seeded"]
    assert row["run"] == "seeded (mean of seeds 0,1)"
    for column, head, csv_name in (("linear", "cls", "linear"), ("Selective", "selective", "selective"),
                                   ("AP", "ap2", "ap"), ("EP", "ep2", "ep")):
        mean, std = best[head]["top1"], best[head]["top1_std"]
        assert std is not None
        assert row[column].startswith(f"[{mean:.1f} ± {std:.1f}](")
        assert float(csv_row[f"{csv_name}_top1"]) == pytest.approx(mean)
        assert float(csv_row[f"{csv_name}_top1_std"]) == pytest.approx(std)


def test_a_resumed_run_shows_the_command_that_started_it(runs, tmp_path):
    # `probe --resume --output-dir DIR` alone takes its settings from the first command: that one is shown
    _, a, _ = runs
    run = tmp_path / "resumed"
    shutil.copytree(a, run)
    config = json.loads((run / "config.json").read_text())
    first = config["command"]
    config.update(command=f"selagg-fast probe --resume --output-dir {run}",
                  commands=[first, f"selagg-fast probe --resume --output-dir {run}"])
    (run / "config.json").write_text(json.dumps(config))
    assert main(["report", str(run), "--output", str(tmp_path / "r.md")]) == 0
    assert _csv_rows(tmp_path / "r.md")["resumed"]["command"] == first + "  (then 1 x --resume)"


def test_paper_numbers_say_where_the_protocol_differs(runs, tmp_path):
    # the numbers describe the backbone; a run trained otherwise than the table says how
    _, a, _ = runs
    run = _as_paper_run(a, tmp_path / "short", epochs=1, effective_batch=32)
    row = run_row(str(run))
    assert row["paper_selective"] == 71.6
    assert row["notes"] == ("protocol differs from the paper's: global batch 32 (paper: 16384), --epochs 1 (paper: 90); "
                            "paper AP-12 not shown beside ap2")
    cub = run_row(str(_as_paper_run(a, tmp_path / "cub", dataset="cub200", seeds=None, optimizer="lars")))
    assert cub["paper_selective"] == 65.9
    assert cub["notes"] == "protocol differs from the paper's: --optimizer lars (paper: sgd), seeds 1 (paper: 3)"


def test_paper_numbers_note_every_difference_of_training_and_block(runs, tmp_path):
    _, a, _ = runs
    run = _as_paper_run(a, tmp_path / "recipe", augment=False, weight_decay=0.05, warmup_epochs=0.0, momentum=0.5)
    assert run_row(str(run))["notes"] == ("protocol differs from the paper's: --momentum 0.5 (paper: 0.9), "
                                          "--weight-decay 0.05 (paper: 0), --warmup-epochs 0 (paper: 10), "
                                          "no augmentation (paper: random crops); paper AP-12 not shown beside ap2")
    # SimMIM: the paper probes block 8; the last block probed is not what its numbers describe
    simmim = _as_paper_run(a, tmp_path / "simmim", model="simmim_vit_base_patch16", return_block=None)
    row = run_row(str(simmim))
    assert row["paper_selective"] is None
    assert row["notes"] == "no paper numbers: the last block probed (paper: block 8, --return-block 8)"
    assert run_row(str(_variant(simmim, tmp_path / "simmim8", config=dict(return_block=8))))["paper_selective"] == 62.8


def test_a_run_without_results_yet_is_a_row_of_no_numbers(runs, tmp_path):
    _, a, _ = runs
    run = tmp_path / "started"
    shutil.copytree(a, run)
    (run / "results.json").unlink()
    row = run_row(str(run))
    assert row["progress"] == "epoch 0 of 1 (unfinished)" and row["selective_top1"] is None


def test_the_papers_ap12_only_beside_an_ap12_head(runs, tmp_path):
    _, a, _ = runs  # run a trained ap2
    row = run_row(str(_as_paper_run(a, tmp_path / "ap2")))
    assert row["ap_head"] == "ap2" and row["paper_ap12"] is None and row["paper_selective"] == 71.6
    assert row["notes"] == "paper AP-12 not shown beside ap2"
