#!/usr/bin/env bash
# One-shot GPU check for a lent Hopper machine (no network): install, benchmarks, CUDA tests,
# a compact table last. Usage: bash bench/gpu_check.sh [OUTDIR]; run it with a 600 s limit.
# By default the benchmarks run at the issues' target shapes only (ViT-B; aiming at under 5
# minutes with the tests); FULL=1 adds ViT-S/L/H and, for pooling, the torch.compile peer. Each
# table is appended to OUTDIR/summary.txt as soon as its benchmark ends, so a run cut short still
# returns what it measured. ONLY=abmilp,probe,heads,tests runs a subset (the CUDA tests are the item
# "tests"; "overhead" is host time per call against GPU time, bench/host_overhead.py); "sweep"
# (the kernels over a wide launch-config grid, bench/sweep.py, ~5 min, last) runs only when named.
# FULL=probe,abmilp gives those benchmarks every shape, FULL=1 all of them.
# The device tool returns at most 8 files from OUTDIR, so logs and CSVs go to a work folder that
# is packed into OUTDIR/raw.tgz after every step; OUTDIR itself holds summary.txt and raw.tgz.
# DEADLINE (seconds, default 560) caps the whole script: each step gets what is left of it, so
# the results table prints before a 600 s call limit kills the run.
set -u
OUT=${1:-${OUT:-/tmp/selagg_gpu}}
WORK=${WORK:-/tmp/selagg_gpu_work}
DEADLINE=${DEADLINE:-560}
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
pack() { tar -czf "$OUT/raw.tgz" -C "$WORK" . 2>/dev/null; }
# seconds a step may take: its own limit, or what is left before the deadline (less a reserve)
budget() { local left=$((DEADLINE - SECONDS - ${2:-15})); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
# the commit the figures are labelled with: pass SELAGG_COMMIT=<hash> when the copy's git metadata
# may be stale (the device tool sends the working tree, whose .git can be an older snapshot);
# otherwise HEAD, marked +modified when the files differ from it
export PYTHONUNBUFFERED=1 SELAGG_COMMIT=${SELAGG_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "?")$(
  git diff --quiet HEAD 2>/dev/null || echo +modified)}
unset TRITON_INTERPRET
cd "$(dirname "$0")/.."
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation . >"$WORK/install.log" 2>&1 || { tail "$WORK/install.log"; pack; exit 1; }
cd /tmp  # import the installed package, not the checkout
python3 - <<'PY' | tee "$WORK/versions.txt"
import torch, triton, timm; print("torch", torch.__version__, "triton", triton.__version__, "timm", timm.__version__)
PY
cat "$WORK/versions.txt" "$WORK/gpu.txt" >>"$SUMMARY"
REPO=$(cd "$OLDPWD" && pwd)

# wanted NAME: whether this run includes step NAME (ONLY unset: the default steps)
wanted() { case ",${ONLY:-abmilp,attention,probe,heads,analyze,compare,knn,overhead,tests}," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# full NAME: every shape and peer for NAME (FULL=1: for all; FULL=probe,abmilp: for those)
full() { case ",${FULL:-0}," in *",1,"*|*",$1,"*) return 0 ;; *) return 1 ;; esac; }
# bench NAME TITLE_REGEX TIMEOUT [ARGS...]: run one benchmark, keep its table in the summary
bench() {
  local name=$1 title=$2 limit=$3; shift 3
  wanted "$name" || return 0
  full "$name" && limit=$((limit * 2))  # every shape and peer: give it twice the time
  limit=$(budget "${BENCH_TIMEOUT:-$limit}" "${RESERVE:-60}")  # keep a minute for the tests and the table
  timeout "$limit" selagg-fast bench "$name" --out "$WORK" "$@" >"$WORK/bench_$name.log" 2>&1
  echo "$name bench exit $? after ${SECONDS}s (limit ${limit}s)"
  sed -n "/^$title/,\$p" "$WORK/bench_$name.log" | grep -vE "^(wrote|WARNING|INFO) " >>"$SUMMARY"
  grep -hE "Error|error:" "$WORK/bench_$name.log" | tail -n 4 >>"$SUMMARY" || true
  pack
}
quick() { full "$1" || echo --quick; }
# benchmarks first: they carry the targets
bench abmilp "AbMILP pooling" 240 $(quick abmilp) $(full abmilp || echo --no-compile)
bench attention "One attention block" 170 $(quick attention)   # with its torch.compile and FlexAttention peers
bench probe "Probe training step" 110 $(quick probe)
bench heads "Heads probe step" 150 $(quick heads)  # issue 12: AP / variants vs timm; quick compiles ap12 peers only
bench analyze "Analyze throughput" 90 --quick
bench compare "Compare throughput" 90  # issue 13: compare's per-batch work vs a plain forward
bench knn "k-NN sweep" 150  # issue 20: all 21 (k, T) at 1.28 M x 50 k ViT-B features (<= 60 s) vs the peer's calls
if wanted overhead; then  # host time per call vs GPU time (~30 s)
  timeout "$(budget 90 60)" python3 -m selagg_fast.bench.host_overhead >"$WORK/overhead.log" 2>&1
  echo "overhead exit $? after ${SECONDS}s"
  sed -n "/^Host time/,/^$/p" "$WORK/overhead.log" >>"$SUMMARY"
  pack
fi
if wanted tests; then
  # default launch configs (autotuning every test shape would only cost compile time); the
  # torchrun tests (CPUs, gloo) and the torch.compile test ran on the CPU machine: deselected here.
  # pytest-xdist (on the GPU image) spreads the tests' Triton compiles over the CPUs; one GPU serves all
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}")
  SELAGG_AUTOTUNE=0 timeout $(budget "${TEST_TIMEOUT:-200}" 5) python3 -m pytest "$REPO/tests" -p no:cacheprovider \
    ${XDIST:-} -rs --rootdir "$REPO" -c "$REPO/pytest.ini" \
    ${PYTEST_ARGS:--k "not two_process and not compiled_backbone"} >"$WORK/tests.log" 2>&1
  echo "tests exit $? after ${SECONDS}s"
  grep -E "^(FAILED|ERROR)" "$WORK/tests.log" | head -20 >>"$SUMMARY"
  grep -E "passed|failed" "$WORK/tests.log" | tail -n 1 >>"$SUMMARY"
  pack
fi
RESERVE=10 bench sweep "Sweep" 300  # only when asked (ONLY=...,sweep): last, it takes what time is left
# the issues' targets against what was just measured, printed last
python3 -m selagg_fast.bench.targets "$WORK" >"$WORK/targets.txt" 2>&1
pack
echo; echo "==== results (${SECONDS}s) ===="; cat "$SUMMARY"; echo; cat "$WORK/targets.txt"
