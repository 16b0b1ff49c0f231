import csv

from selagg_fast.bench.targets import format_targets, targets

GPU = dict(device="NVIDIA H200", torch="2.11", triton="3.6", date="2026-11-26", commit="abc")


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def test_targets_read_the_gpu_rows_and_judge_them(tmp_path):
    pool = dict(shape="ViT-B", provider="fused", dtype="bfloat16", **GPU)
    _write(tmp_path / "abmilp.csv", [
        dict(pool, K=1, mode="fwd", ms=0.085, peak_MiB=1.5),
        dict(pool, K=16, mode="fwd", ms=0.20, peak_MiB=3.0),
        dict(pool, K=1, mode="probe_graph", ms=0.30, peak_MiB=9.0),
        dict(pool, shape="tiny", K=1, mode="fwd", ms=9.0, peak_MiB="nan", device="cpu"),  # a CPU row: ignored
    ])
    vit = "vit_base_patch16_224"
    _write(tmp_path / "attention.csv", [
        dict(shape="ViT-B", provider="fused", ms=0.19, peak_MiB=83, **GPU),
        dict(model=vit, pipeline="plain (fused SDPA, no stats)", img_per_s=9000, peak_MiB=1346, **GPU),
        dict(model=vit, pipeline="record_attention_stats (all blocks)", img_per_s=7900, peak_MiB=1300, **GPU),
    ])
    _write(tmp_path / "analyze.csv", [dict(model="vit_tiny_patch16_224", pipeline="analyze forward + running sums "
                                           "(generated tensors)", ratio_to_plain=0.5, device="cpu")])
    got = {what: (value, op, goal) for _issue, what, value, op, goal in targets(str(tmp_path))}
    assert got["pool fwd K=1, ViT-B bf16 (ms)"][0] == 0.085
    assert abs(got["pool fwd K=16 / K=1"][0] - 0.20 / 0.085) < 1e-9
    assert abs(got["pool fwd peak extra memory / output"][0] - 1.0) < 1e-9
    assert got["analyze kernel-bound / plain forward"][0] is None  # only a CPU row
    table = format_targets(str(tmp_path))
    lines = {what: next(line for line in table.splitlines() if what in line) for what in got}
    assert lines["pool fwd K=1, ViT-B bf16 (ms)"].endswith("met")
    assert lines["pool fwd K=16 / K=1"].endswith("MISSED")
    assert lines["probe step as a graph, K=1 (ms)"].endswith("MISSED")
    assert lines["whole ViT-B with stats, all blocks (img/s)"].endswith("MISSED")
    assert lines["whole ViT-B peak / plain"].endswith("met")
    assert lines["12 fused heads, ViT-B batch 1024 (% over the forward)"].endswith("not measured")
