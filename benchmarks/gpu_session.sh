#!/usr/bin/env bash
# Everything a GPU session verifies, in one command, for a machine with torch, triton,
# nvcc, pybind11 and ninja preinstalled and nothing downloadable (the project's GPU
# machines). Writes at most 8 files to $OUT (default /tmp/gpu-out):
#   env.json          build/runtime report after the build
#   tests.log         the GPU-marked tests (CUDA and Triton backends, large shapes)
#   sanitizer.log     compute-sanitizer memcheck + racecheck on the cuda backend tests
#   quick.json        the quick suite (bf16/fp16) on the GPU
#   flashrnn.json     B=16 T=1024 I=H=768 (+ sweeps) against cuDNN, same run
#   batch-sweep.json  the batch sweep
#   summary.txt       pass/fail of each step and wall times
# Then commit the JSON files under benchmarks/results/<gpu>/ and run
# `python benchmarks/report.py` to regenerate the README performance section.
#
# Usage (device tool, from the repo root):
#   OUT=$OUT bash benchmarks/gpu_session.sh [budget_seconds]
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
BUDGET=${1:-540}
mkdir -p "$OUT"
START=$(date +%s)
summary() { echo "$(($(date +%s) - START))s $*" | tee -a "$OUT/summary.txt"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
export PYTHONUNBUFFERED=1 CNNLSTM_FAST_CUDA_ARCHS=${CNNLSTM_FAST_CUDA_ARCHS:-90}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
MAX_JOBS=16 python3 -m pip install -q -e . --no-build-isolation --no-deps > "$OUT/tests.log" 2>&1
summary "build rc=$?"
python3 -m cnnlstm_fast.env --json > "$OUT/env.json" 2>&1
summary "env rc=$?"

timeout $(( $(left) / 3 )) python3 -m pytest -q -m gpu tests -x -p no:cacheprovider >> "$OUT/tests.log" 2>&1
summary "gpu tests rc=$? ($(tail -n 1 "$OUT/tests.log"))"

if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    CNNLSTM_FAST_CUDA_KERNEL=${SANITIZE_KERNEL:-auto} timeout $(( $(left) / 6 )) \
      compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python3 -m pytest -q -m gpu tests/test_cuda_backend.py -k "fp32" -x -p no:cacheprovider \
      >> "$OUT/sanitizer.log" 2>&1
    summary "compute-sanitizer $tool rc=$?"
  done
else
  summary "compute-sanitizer not found"
fi

for suite in quick flashrnn batch-sweep; do
  timeout $(( $(left) / 2 )) python3 -m cnnlstm_fast.bench --suite "$suite" --device cuda \
    --no-progress --json "$OUT/$suite.json" >> "$OUT/summary.txt" 2>&1
  summary "bench $suite rc=$?"
done
