#!/usr/bin/env bash
# One-call GPU check for a fresh GPU machine (torch, triton, nvcc, pytest there; no network):
# builds fastformer._C, runs the gpu-marked tests, compute-sanitizer memcheck over the CUDA and Triton kernels and
# racecheck over the CUDA ones,
# then the quick benchmarks. $OUT (else ./gpu-results) receives two files: summary.txt (also printed last)
# and logs.tar.gz with every step's log and the benchmarks' JSON.
# Budget: under 8 minutes on an H200. Set FULL=1 to also run the whole test suite on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
LOG=$(mktemp -d /tmp/fastformer-gpu.XXXX)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FASTFORMER_CACHE_DIR=${FASTFORMER_CACHE_DIR:-/tmp/fastformer-cache}
unset TRITON_INTERPRET
declare -A STATUS
BUDGET=${BUDGET:-450}  # seconds; later steps are skipped once the check has used this much
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  if [ "$SECONDS" -ge "$BUDGET" ]; then STATUS[$name]="skipped (budget of ${BUDGET}s used)"; return; fi
  local t0=$SECONDS
  echo "=== $name"
  timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  tail -n 25 "$LOG/$name.log"
}

step env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'; nvcc --version; git rev-parse HEAD 2>/dev/null || true"
step install 60 env FASTFORMER_BUILD_CUDA=0 $PY -m pip install --no-deps --no-build-isolation --no-index -e . -q
step build 150 env MAX_JOBS=16 $PY -m fastformer._build -v
step gpu_tests 180 $PY -m pytest tests -m gpu -q --maxfail=10 -p no:cacheprovider --junitxml="$LOG/gpu_tests.xml"
step sanitizer 90 compute-sanitizer --tool memcheck --error-exitcode 9 $PY benchmarks/sanitize.py
step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 9 $PY benchmarks/sanitize.py cuda
for b in layer_norm attention ffn models hf; do
  step "bench_$b" 75 $PY -m fastformer.cli bench "$b" --quick --json "$LOG/bench_$b.json" --csv "$LOG/bench_$b.csv"
done
if [ "${FULL:-0}" = 1 ]; then
  BUDGET=100000 step full_tests 600 $PY -m pytest tests -q -x -p no:cacheprovider
fi

summary() {
  echo "=== summary ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  for k in env install build gpu_tests sanitizer racecheck bench_layer_norm bench_attention bench_ffn bench_models bench_hf full_tests; do
    [ -n "${STATUS[$k]:-}" ] && printf '%-18s %s\n' "$k" "${STATUS[$k]}"
  done
  grep -h -E "passed|failed|error" "$LOG/gpu_tests.log" 2>/dev/null | tail -n 3
  grep -h -E "^(ok|FAIL) |ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/sanitizer.log" "$LOG/racecheck.log" 2>/dev/null
  for f in "$LOG"/bench_*.log; do [ -f "$f" ] && grep -A 40 "^== " "$f" | head -n 60; done
}
echo
summary | tee "$OUT/summary.txt"
tar czf "$OUT/logs.tar.gz" -C "$LOG" .
