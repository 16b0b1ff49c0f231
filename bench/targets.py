"""The issues' GPU targets against what the benchmark CSVs in a folder measured.

Usage: python -m selagg_fast.bench.targets OUTDIR   (bench/gpu_check.sh runs it after the
benchmarks). One line a target: the measured value, the target, and "met", "MISSED" or "not
measured" (no GPU row for it in the CSVs, e.g. a benchmark that timed out or ran on a CPU).
"""
from __future__ import annotations

import csv
import math
import os
import sys
import operator
from typing import Optional

_OPS = {"<=": operator.le, ">=": operator.ge}


def read_rows(out: str, name: str) -> list:
    path = os.path.join(out, f"{name}.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _value(rows: list, column: str, **match) -> Optional[float]:
    """``column`` of the first GPU row whose fields equal ``match`` (as text), or None."""
    for r in rows:
        if r.get("device", "cpu") != "cpu" and all(r.get(k) == str(v) for k, v in match.items()):
            try:
                v = float(r.get(column, ""))
            except ValueError:
                return None
            return None if math.isnan(v) else v
    return None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def targets(out: str) -> list:
    """(issue, what, measured or None, comparison, goal) for every target."""
    ab, at, pr, an = (read_rows(out, n) for n in ("abmilp", "attention", "probe", "analyze"))
    vit_b = dict(shape="ViT-B", provider="fused", dtype="bfloat16")
    k1_fwd = _value(ab, "ms", K=1, mode="fwd", **vit_b)
    output_mib = 1024 * 768 * 2 / 2 ** 20  # the ViT-B pooled output, bf16
    vit = "vit_base_patch16_224"
    plain = dict(model=vit, pipeline="plain (fused SDPA, no stats)")
    stats_row = dict(model=vit, pipeline="record_attention_stats (all blocks)")
    an_plain = dict(model=vit, pipeline="plain fused-attention forward (generated tensors)")
    an_rows = dict(model=vit, pipeline="analyze forward + running sums (generated tensors)")
    rows = [
        (2, "pool fwd K=1, ViT-B bf16 (ms)", k1_fwd, "<=", 0.09),
        (2, "pool fwd K=16 / K=1", _ratio(_value(ab, "ms", K=16, mode="fwd", **vit_b), k1_fwd), "<=", 1.5),
        (2, "probe step as a graph, K=1 (ms)", _value(ab, "ms", K=1, mode="probe_graph", **vit_b), "<=",
         0.25),
        (2, "pool fwd peak extra memory / output", _ratio(_value(ab, "peak_MiB", K=1, mode="fwd", **vit_b),
                                                          output_mib), "<=", 2.0),
        (3, "attention+stats block, ViT-B bf16 (ms)", _value(at, "ms", shape="ViT-B", provider="fused"), "<=",
         0.20),
        (3, "attention+stats block peak (MiB)", _value(at, "peak_MiB", shape="ViT-B", provider="fused"), "<=",
         100.0),
        (3, "whole ViT-B with stats, all blocks (img/s)", _value(at, "img_per_s", **stats_row), ">=",
         8000.0),
        (3, "whole ViT-B peak / plain", _ratio(_value(at, "peak_MiB", **stats_row), _value(at, "peak_MiB", **plain)),
         "<=", 1.1),
    ]
    for model in ("ViT-B", "ViT-L"):
        rows.append((4, f"12 fused heads, {model} batch 1024 (% over the forward)",
                     _value(pr, "overhead_pct", model=model, heads="12 (fused)"), "<=", 5.0))
    rows += [
        (5, "analyze kernel-bound / plain forward", _value(an, "ratio_to_plain", **an_rows), ">=", 0.9),
        (5, "analyze peak / plain", _ratio(_value(an, "peak_MiB", **an_rows), _value(an, "peak_MiB", **an_plain)),
         "<=", 1.1),
    ]
    hd = read_rows(out, "heads")  # bench/heads.py: ViT-B tokens B=1024 bf16

    def step(head, provider, column="ms"):
        return _value(hd, column, shape="ViT-B", head=head, provider=provider, mode="step")

    ap12 = step("ap12", "fused")
    rows += [
        (12, "ap12 step: timm eager / fused", _ratio(step("ap12", "timm"), ap12), ">=", 5.0),
        (12, "ap12 step: timm compiled / fused", _ratio(step("ap12", "timm compiled"), ap12), ">=", 2.0),
        (12, "ap12 step peak extra memory: fused / timm", _ratio(step("ap12", "fused", "peak_MiB"),
                                                               step("ap12", "timm", "peak_MiB")), "<=", 0.25),
        (12, "ap12 step / selective step", _ratio(ap12, step("selective", "fused")), "<=", 1.6),
        (12, "ap12 x 4 lrs in one pass / one ap12", _ratio(step("ap12 x 4 lrs", "fused (1 pass)"), ap12), "<=", 1.3),
        (12, "MLP-Tanh step / its hidden-layer GEMMs alone",
         _ratio(step("mlp_tanh", "fused"), _value(hd, "ms", shape="ViT-B", head="mlp_tanh hidden GEMMs")), "<=", 1.3),
        (12, "MLP-Tanh step peak extra memory: fused / eager", _ratio(step("mlp_tanh", "fused", "peak_MiB"),
                                                                    step("mlp_tanh", "eager", "peak_MiB")), "<=",
         0.333),
    ]
    fused_block = _value(at, "ms", shape="ViT-B", provider="fused")
    rows.append((19, "attention+stats block with logit bias / without, ViT-B",
                 _ratio(_value(at, "ms", shape="ViT-B", provider="fused + logit bias"), fused_block), "<=", 1.15))
    kn = read_rows(out, "knn")  # bench/knn.py: 1.28 M x 50 k bf16 ViT-B features on the GPU
    rows += [
        (20, "ep32 step / selective step", _ratio(step("ep32", "fused"), step("selective", "fused")), "<=", 1.5),
        (20, "pool fwd K=32 / K=1", _ratio(_value(ab, "ms", K=32, mode="fwd", **vit_b), k1_fwd), "<=", 2.0),
        (20, "k-NN, 21 (k, T), 1.28 M x 50 k ViT-B features (s)",
         _value(kn, "seconds", pipeline="knn_eval: one pass, all 21 (k, T)", settings=21), "<=", 60.0),
    ]
    return rows


def format_targets(out: str) -> str:
    lines = [f"{'issue':>5}  {'target':<58}{'measured':>10}  {'goal':<8}  verdict"]
    for issue, what, value, op, goal in targets(out):
        shown = "-" if value is None else (f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}")
        verdict = "not measured" if value is None else ("met" if _OPS[op](value, goal) else "MISSED")
        lines.append(f"{issue:>5}  {what:<58}{shown:>10}  {op + ' ' + format(goal, 'g'):<8}  {verdict}")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "bench/out"
    print(f"Targets of issues 2-5, 12, 19 and 20 against the benchmarks in {out}")
    print(format_targets(out))


if __name__ == "__main__":
    main()
