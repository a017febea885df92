#!/usr/bin/env bash
# Everything a GPU session verifies, in one command, for a machine with torch, triton,
# nvcc, pybind11 and ninja preinstalled and nothing downloadable (the project's GPU
# machines). Writes at most 8 files to $OUT (default /tmp/gpu-out):
#   summary.txt       pass/fail of each step and wall times
#   env.json          build/runtime report after the build
#   tests.log         build log, then the GPU-marked tests (every failure, not just the first)
#   sanitizer.log     compute-sanitizer memcheck + racecheck on the cuda backend tests
#   bench-*.json      benchmark suites ($SUITES, default "canonical quick"; "canonical" is
#                     B=16 T=1024 I=H=768 against cuDNN in the same run); rewritten after
#                     every configuration, so a suite cut off by the budget keeps what it
#                     measured ("complete": false)
# Then commit the JSON files under benchmarks/results/<gpu>/ and run
# `python benchmarks/report.py` to regenerate the README performance section.
#
# Usage (device tool, from the repo root):
#   OUT=$OUT bash benchmarks/gpu_session.sh [budget_seconds]
# Variables: SUITES, BENCH_ARGS (extra bench options, e.g. --providers torch.nn,cuda),
# TESTS (pytest -k expression), SKIP (words: build tests sanitizer bench), SANITIZE_TOOLS
# (default "memcheck racecheck"). The sanitizer runs the tests that pin each kernel
# themselves (fp32: step, persistent, streamed, the persistent backward; tensor_core:
# mma, mma-pipelined, mma-cluster), so no kernel needs choosing here.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
BUDGET=${1:-540}
SUITES=${SUITES:-canonical quick}
SKIP=${SKIP:-}
mkdir -p "$OUT"
START=$(date +%s)
summary() { echo "$(($(date +%s) - START))s $*" | tee -a "$OUT/summary.txt"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
skipped() { [[ " $SKIP " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 CNNLSTM_FAST_CUDA_ARCHS=${CNNLSTM_FAST_CUDA_ARCHS:-90}
# pytest-timeout ends a hung test (a persistent kernel that never passes its barrier).
PYTEST=(python3 -m pytest -q -rfE -p no:cacheprovider -o faulthandler_timeout=120)
python3 -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout=120)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
if ! skipped build; then
  MAX_JOBS=16 python3 -m pip install -q -e . --no-build-isolation --no-deps > "$OUT/tests.log" 2>&1
  summary "build rc=$?"
fi
python3 -m cnnlstm_fast.env --json > "$OUT/env.json" 2>&1
summary "env rc=$?"

if ! skipped tests; then
  # the GPU tests, and the build checks (test_env.py: one libstdc++ in the process, ...)
  timeout $(( $(left) / 2 )) "${PYTEST[@]}" tests/test_env.py >> "$OUT/tests.log" 2>&1
  timeout $(( $(left) / 2 )) "${PYTEST[@]}" -m gpu tests ${TESTS:+-k "$TESTS"} >> "$OUT/tests.log" 2>&1
  summary "gpu tests rc=$? ($(tail -n 1 "$OUT/tests.log"))"
fi

if ! skipped sanitizer; then
  if command -v compute-sanitizer > /dev/null; then
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
      timeout $(( $(left) / 6 )) \
        compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "${PYTEST[@]}" -m gpu tests/test_cuda_backend.py -k "(fp32 and not 301) or (tensor_core and not 768 and not 1024)" \
        >> "$OUT/sanitizer.log" 2>&1
      summary "compute-sanitizer $tool rc=$? ($(tail -n 1 "$OUT/sanitizer.log"))"
    done
  else
    summary "compute-sanitizer not found"
  fi
fi

if ! skipped bench; then
  for suite in $SUITES; do
    # The canonical size with a kernel pinned (recorded in the JSON's cuda_settings):
    # canonical-pb / canonical-tpb the cuda / triton persistent backward, canonical-mp the
    # pipelined tensor-core forward. h<N> is B=16 T=1024 I=H=N, and h<N>-mc the same with
    # the cluster variant of the tensor-core forward pinned (hidden <= 256 for LSTM).
    pinned=()
    case $suite in
      canonical-pb) pinned=(env CNNLSTM_FAST_CUDA_BACKWARD=persistent) ;;
      canonical-tpb) pinned=(env CNNLSTM_FAST_TRITON_BACKWARD=persistent) ;;
      canonical-mp) pinned=(env CNNLSTM_FAST_CUDA_KERNEL=mma-pipelined) ;;
      h*-mc) pinned=(env CNNLSTM_FAST_CUDA_KERNEL=mma-cluster) ;;
    esac
    if [[ $suite == canonical* ]]; then
      what=(--config B=16,T=1024,I=768,H=768)
    elif [[ $suite =~ ^h([0-9]+)(-mc)?$ ]]; then
      what=(--config "B=16,T=1024,I=${BASH_REMATCH[1]},H=${BASH_REMATCH[1]}")
    else
      what=(--suite "$suite")
    fi
    timeout $(( $(left) - 10 )) ${pinned[@]+"${pinned[@]}"} python3 -m cnnlstm_fast.bench "${what[@]}" --device cuda \
      --no-progress ${BENCH_ARGS:-} --json "$OUT/bench-$suite.json" >> "$OUT/summary.txt" 2>&1
    summary "bench $suite rc=$?"
  done
fi
