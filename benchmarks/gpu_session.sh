#!/usr/bin/env bash
# Everything a GPU session verifies, in one command, for a machine with torch, triton,
# nvcc, pybind11 and ninja preinstalled and nothing downloadable (the project's GPU
# machines). A session has 15 device-minutes, the machine's start included, and one
# command at most 10 minutes, so the steps run in order of importance, each under a cap,
# and every file in $OUT is complete up to the step that was cut off. At most 8 files
# come back (the device tool's limit); this writes at most 8 to $OUT (default /tmp/gpu-out)
# with the 2 default suites (canonical, models: whole models swapped vs torch.nn):
#   summary.txt       GPU, driver, pass/fail and wall time of each step
#   env.json          build/runtime report after the build
#   experimental-verification.json
#                     per experimental kernel (cnnlstm_fast/experimental.py), what its GPU
#                     tests gave under CNNLSTM_FAST_EXPERIMENTAL=1: pass, fail (with the
#                     failed tests) or not run; rewritten after every test ("complete")
#   tests.log         build log, the build checks, the experimental and the default GPU
#                     tests, the large shapes, each with pytest's slowest durations (to
#                     plan the next session)
#   sanitizer.log     compute-sanitizer on a few tests that pin each cuda kernel
#   bench-*.json      benchmark suites ($SUITES), rewritten after every configuration, so
#                     a suite cut off keeps what it measured ("complete": false); on CUDA
#                     each layer row carries the measured per-step floor and the ratio to it
#   floor.json        the per-step floor over batch, hidden and dtype
#                     (python -m cnnlstm_fast.bench.floor)
# Then commit the files under benchmarks/results/<gpu>/ and run
# `python benchmarks/report.py` to regenerate the README performance section.
#
# Usage (device tool, from the repo root; budget_seconds defaults to 560):
#   OUT=$OUT bash benchmarks/gpu_session.sh [budget_seconds]
# Steps, in this order (SKIP: words to leave out):
#   build      pip install -e . (CNNLSTM_FAST_CUDA_ARCHS, default 90)
#   experimental
#              the GPU tests (as in `tests`) with CNNLSTM_FAST_EXPERIMENTAL=1: the
#              experimental kernels' own tests and, under the switch, every other test
#              on the default kernels' newer versions; writes
#              experimental-verification.json; capped at EXPERIMENTAL_S seconds (120).
#              Nothing is promoted here: a kernel that passes is promoted by a reviewed
#              commit (docs/gpu.md#promoting-an-experimental-kernel)
#   tests      the default path (the switch unset; the experimental tests skip):
#              tests/test_env.py and every GPU-marked test but the large shapes ($TESTS:
#              a pytest -k expression), on $PYTEST_WORKERS xdist workers (default 4;
#              processes on one GPU are time-sliced, so a cooperative or persistent
#              kernel still has the SMs to itself); capped at TESTS_S seconds (200)
#   sanitizer  $SANITIZE_TOOLS (default "memcheck racecheck") on $SANITIZE_TESTS, each
#              capped at SANITIZE_S seconds (60); on the default path, or with
#              SANITIZE_EXPERIMENTAL=1 under the switch (the experimental kernels' cases,
#              which a promotion needs clean)
#   floor      python -m cnnlstm_fast.bench.floor (float16, 18 shapes), capped at
#              FLOOR_S seconds (45)
#   bench      $SUITES (default "canonical models"), each capped at
#              BENCH_S seconds (120); BENCH_ARGS adds bench options
#   large      tests/test_gpu_large.py on the workers, with what is left
# Suites: a name of `python -m cnnlstm_fast.bench --suite`, or canonical (B=16 T=1024
# I=H=768), h<N> (B=16 T=1024 I=H=N), each with a suffix that pins a kernel (the bench's
# --cuda-forward, --cuda-backward, --cuda-pdl or --triton-backward, recorded in the JSON's
# cuda_settings): -st the per-step kernels (e.g. h2048-st: their forward at
# hidden 2048); experimental, run with CNNLSTM_FAST_EXPERIMENTAL=1: -x the switch alone
# (the default kernels' newer versions), -pb the cuda persistent backward, -tpb the
# triton persistent backward, -mp the pipelined tensor-core forward, -mc the
# thread-block-cluster one, -pdl the per-step kernels with programmatic dependent launch
# (canonical-pdl: the backward's steps). The pinned suites time torch.nn and the pinned
# backend only (cuDNN in the same run).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
BUDGET=${1:-560}
SUITES=${SUITES:-canonical models}
SKIP=${SKIP:-}
EXPERIMENTAL_S=${EXPERIMENTAL_S:-120}
TESTS_S=${TESTS_S:-200}
SANITIZE_S=${SANITIZE_S:-60}
BENCH_S=${BENCH_S:-120}
FLOOR_S=${FLOOR_S:-45}
# One small case per cuda kernel: the packed LSTM (hidden 33) through step, persistent,
# auto (and, with the switch, streamed and the persistent backward); the GRU of batch 33
# through mma (and mma-pipelined, streamed and mma-cluster) (bf16); packed rows over
# several launches (with the switch).
SANITIZE_TESTS=${SANITIZE_TESTS:-(33 and not torch.float16) or several_launches}
mkdir -p "$OUT"
START=$(date +%s)
summary() { echo "$(($(date +%s) - START))s $*" | tee -a "$OUT/summary.txt"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
# cap SECONDS: the smaller of SECONDS and what is left of the budget (at least 1)
cap() { local l; l=$(left); ((l < $1)) && echo $((l > 1 ? l : 1)) || echo "$1"; }
skipped() { [[ " $SKIP " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 CNNLSTM_FAST_CUDA_ARCHS=${CNNLSTM_FAST_CUDA_ARCHS:-90}
# the default path is verified without the switch; the steps that want it set it
unset CNNLSTM_FAST_EXPERIMENTAL
# pytest-timeout ends a hung test (a persistent kernel that never passes its barrier).
PYTEST=(python3 -m pytest -q -rfE -p no:cacheprovider -o faulthandler_timeout=120)
python3 -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout=120)
WORKERS=()
python3 -c "import xdist" 2> /dev/null && WORKERS=(-n "${PYTEST_WORKERS:-4}")

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
if ! skipped build; then
  MAX_JOBS=16 python3 -m pip install -q -e . --no-build-isolation --no-deps > "$OUT/tests.log" 2>&1
  summary "build rc=$?"
fi
python3 -m cnnlstm_fast.env --json > "$OUT/env.json" 2>&1
summary "env rc=$?"

if ! skipped experimental; then
  # first the experimental kernels, recorded per kernel; their result decides nothing here
  echo "== the GPU tests with CNNLSTM_FAST_EXPERIMENTAL=1 ==" >> "$OUT/tests.log"
  timeout "$(cap "$EXPERIMENTAL_S")" env CNNLSTM_FAST_EXPERIMENTAL=1 "${PYTEST[@]}" \
    ${WORKERS[@]+"${WORKERS[@]}"} --durations=10 -m gpu tests --ignore=tests/test_gpu_large.py \
    ${TESTS:+-k "$TESTS"} --experimental-report "$OUT/experimental-verification.json" \
    >> "$OUT/tests.log" 2>&1
  summary "experimental tests rc=$? ($(tail -n 1 "$OUT/tests.log"))"
  python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print('experimental:',
    'complete' if r['complete'] else 'cut off', *(f'{k}={v[\"result\"]}' for k, v in
    r['kernels'].items()))" "$OUT/experimental-verification.json" | tee -a "$OUT/summary.txt"
fi

if ! skipped tests; then
  echo "== the GPU tests on the default path ==" >> "$OUT/tests.log"
  # the build checks (test_env.py: one libstdc++ in the process, ...), then the GPU tests
  timeout 60 "${PYTEST[@]}" tests/test_env.py >> "$OUT/tests.log" 2>&1
  summary "build checks rc=$? ($(tail -n 1 "$OUT/tests.log"))"
  timeout "$(cap "$TESTS_S")" "${PYTEST[@]}" ${WORKERS[@]+"${WORKERS[@]}"} --durations=25 -m gpu tests \
    --ignore=tests/test_gpu_large.py ${TESTS:+-k "$TESTS"} >> "$OUT/tests.log" 2>&1
  summary "gpu tests rc=$? ($(tail -n 1 "$OUT/tests.log"))"
fi

if ! skipped sanitizer; then
  if command -v compute-sanitizer > /dev/null; then
    switch=()
    [[ ${SANITIZE_EXPERIMENTAL:-0} == 1 ]] && switch=(env CNNLSTM_FAST_EXPERIMENTAL=1)
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
      timeout "$(cap "$SANITIZE_S")" ${switch[@]+"${switch[@]}"} \
        compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "${PYTEST[@]}" -m gpu tests/test_cuda_backend.py -k "$SANITIZE_TESTS" \
        >> "$OUT/sanitizer.log" 2>&1
      summary "compute-sanitizer $tool${switch[@]+ (experimental)} rc=$? ($(tail -n 1 "$OUT/sanitizer.log"))"
    done
  else
    summary "compute-sanitizer not found"
  fi
fi

if ! skipped floor; then
  # one block per SM (the grid designs) and 16 (a thread-block cluster's size); ~20 s
  timeout "$(cap "$FLOOR_S")" python3 -m cnnlstm_fast.bench.floor --dtype float16 \
    --batch 1 16 64 --hidden 256 768 2048 --blocks 0 16 --json "$OUT/floor.json" \
    >> "$OUT/summary.txt" 2>&1
  summary "floor rc=$?"
fi

if ! skipped bench; then
  for suite in $SUITES; do
    # switch: the environment the bench runs in (the experimental switch); pins: its
    # kernel pin options (cnnlstm_fast.experimental.set_kernels, recorded in cuda_settings)
    switch=() pins=() providers=()
    x=CNNLSTM_FAST_EXPERIMENTAL=1
    case $suite in
      *-tpb) switch=(env $x) pins=(--triton-backward persistent) providers=(--providers torch.nn,triton) ;;
      *-pb) switch=(env $x) pins=(--cuda-backward persistent) providers=(--providers torch.nn,cuda) ;;
      *-mp) switch=(env $x) pins=(--cuda-forward mma-pipelined) providers=(--providers torch.nn,cuda) ;;
      *-mc) switch=(env $x) pins=(--cuda-forward mma-cluster) providers=(--providers torch.nn,cuda) ;;
      *-pdl) switch=(env $x) pins=(--cuda-pdl) providers=(--providers torch.nn,cuda) ;;
      *-x) switch=(env $x) providers=(--providers torch.nn,cuda,triton) ;;
      *-st) pins=(--cuda-forward step) providers=(--providers torch.nn,cuda) ;;
    esac
    if [[ $suite =~ ^canonical(-[a-z]+)?$ ]]; then
      what=(--config B=16,T=1024,I=768,H=768)
    elif [[ $suite =~ ^h([0-9]+)(-[a-z]+)?$ ]]; then
      what=(--config "B=16,T=1024,I=${BASH_REMATCH[1]},H=${BASH_REMATCH[1]}")
    else
      what=(--suite "$suite")
    fi
    timeout "$(cap "$BENCH_S")" ${switch[@]+"${switch[@]}"} python3 -m cnnlstm_fast.bench "${what[@]}" \
      --device cuda --no-progress ${providers[@]+"${providers[@]}"} ${pins[@]+"${pins[@]}"} \
      ${BENCH_ARGS:-} --json "$OUT/bench-$suite.json" >> "$OUT/summary.txt" 2>&1
    summary "bench $suite rc=$?"
  done
fi

if ! skipped large && (($(left) > 20)); then
  timeout "$(cap "$(left)")" "${PYTEST[@]}" ${WORKERS[@]+"${WORKERS[@]}"} --durations=15 tests/test_gpu_large.py \
    ${TESTS:+-k "$TESTS"} >> "$OUT/tests.log" 2>&1
  summary "large shapes rc=$? ($(tail -n 1 "$OUT/tests.log"))"
fi
summary "done"
