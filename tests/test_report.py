"""`selagg-fast report`: two tiny runs -> one Markdown table and the same rows as CSV."""
import csv
import json
import os
import re
import shutil

import pytest
from conftest import DEVICE, run_cli

from selagg_fast.cli import main

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
    assert "67.8 / 71.6 / 75.4" in mae_row  # the paper's MAE ViT-B: Table 1 [cls], Selective; Table 6 AP-12
    config_a = json.loads((a / "config.json").read_text())
    assert config_a["command"].startswith("selagg-fast probe --model mae_vit_base_patch16")
    assert "`" + config_a["command"] + "`" in mae_row
    # the second run: no [cls] head trained (linear = avg is missing: cls was not trained), no k-NN, AP, EP
    cells = [c.strip() for c in plain_row.strip("|").split("|")]
    assert cells[0] == "plain" and cells[2] == "–" and cells[5] == "–" and cells[6] == "–"
    assert cells[7] == "– / – / –"
    for cell in (cells[3], cells[4]):
        assert cell == "–" or re.match(r"\[\d+\.\d\]\(", cell)
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["mae", "plain"]
    assert float(rows[0]["linear_top1"]) == pytest.approx(best["cls"]["top1"])
    assert float(rows[0]["knn_top1"]) == pytest.approx(results_a["knn"]["best"]["top1"])
    assert rows[0]["paper_selective"] == "71.6" and rows[1]["paper_linear"] == ""
    assert rows[0]["command"] == config_a["command"] and rows[1]["knn_top1"] == ""
    assert rows[0]["results_json"] == str(a / "results.json")


def test_report_refuses_a_folder_without_a_run(runs, tmp_path, capsys):
    root, a, _ = runs
    assert main(["report", str(a), str(tmp_path), "--output", str(tmp_path / "r.md")]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["report", str(a), "--output", str(tmp_path / "r.txt")]) == 2
    assert "ending in .md" in capsys.readouterr().err


def test_no_paper_numbers_for_a_file_that_is_not_the_papers(runs, tmp_path):
    # MAE's fine-tuned release loads with its final norm at init: not the paper's pretrained file
    from selagg_fast.probe.report import run_row
    _, a, _ = runs
    assert run_row(str(a))["paper_selective"] == 71.6
    run = tmp_path / "mae_ft"
    shutil.copytree(a, run)
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"]["final_norm_loaded"] is True
    config["backbone"]["final_norm_loaded"] = False
    (run / "config.json").write_text(json.dumps(config))
    row = run_row(str(run))
    assert (row["paper_linear"], row["paper_selective"], row["paper_ap12"]) == (None, None, None)
