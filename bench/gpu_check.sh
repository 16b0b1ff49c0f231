#!/usr/bin/env bash
# One-shot GPU check for a lent Hopper machine (no network): install, CUDA tests, benchmarks,
# a compact table last. Usage: bash bench/gpu_check.sh [OUTDIR]   (about 7 minutes)
set -u
OUT=${1:-${OUT:-/tmp/selagg_gpu}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SELAGG_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
unset TRITON_INTERPRET
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation . >"$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
cd /tmp  # import the installed package, not the checkout
python3 - <<'PY' | tee "$OUT/versions.txt"
import torch, triton, timm; print("torch", torch.__version__, "triton", triton.__version__, "timm", timm.__version__)
PY
REPO=$(cd "$OLDPWD" && pwd)
# benchmarks first: they carry the targets
timeout ${BENCH_TIMEOUT:-160} selagg-fast bench abmilp --out "$OUT" >"$OUT/bench_abmilp.log" 2>&1; echo "abmilp bench exit $?"
timeout ${BENCH_TIMEOUT:-180} selagg-fast bench attention --out "$OUT" >"$OUT/bench_attention.log" 2>&1; echo "attention bench exit $?"
timeout ${BENCH_TIMEOUT:-120} selagg-fast bench probe --out "$OUT" >"$OUT/bench_probe.log" 2>&1; echo "probe bench exit $?"
timeout ${BENCH_TIMEOUT:-120} selagg-fast bench analyze --quick --out "$OUT" >"$OUT/bench_analyze.log" 2>&1; echo "analyze bench exit $?"
# tests: default launch configs (autotuning every test shape would only cost compile time)
SELAGG_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-240} python3 -m pytest "$REPO/tests" -p no:cacheprovider \
  --rootdir "$REPO" -c "$REPO/pytest.ini" ${PYTEST_ARGS:-} >"$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
echo; echo "==== results ===="
cat "$OUT/versions.txt" "$OUT/gpu.txt"
sed -n '/^AbMILP pooling/,$p' "$OUT/bench_abmilp.log" | grep -v "^wrote"
sed -n '/^One attention block/,$p' "$OUT/bench_attention.log" | grep -v "^wrote"
sed -n '/^Probe training step/,$p' "$OUT/bench_probe.log" | grep -v "^wrote"
sed -n '/^Analyze throughput/,$p' "$OUT/bench_analyze.log" | grep -v "^wrote"
grep -hE "Error|error:" "$OUT"/bench_*.log | tail -n 8 || true
grep -E "passed|failed" "$OUT/tests.log" | tail -n 1
