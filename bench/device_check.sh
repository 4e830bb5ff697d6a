#!/usr/bin/env bash
# Everything that needs a GPU, in one call, on a machine with CUDA torch, Triton, nvcc (no network needed):
# build lmfused._C ahead of time (setup.py) and just in time, GPU tests, the C++ kernel tests (ctest) and
# compute-sanitizer over them, then benchmarks and profiles. Logs, JSON and a summary go to OUT.
#   bench/device_check.sh OUT [STEP ...]
#   steps: jit setup ctest tests sanitizer ops ops-graph train models profile ncu   (default: all;
#          independent steps run in parallel). Every step after the builds needs `setup` (or an installed _C).
# Env: OPS_GRID (full|headline), MODELS_ARGS (extra bench.models flags), TORCH_CUDA_ARCH_LIST (default 9.0),
#      TESTS_TIMEOUT (s, default 420), TEST_WORKERS (default 12), RACECHECK_DTYPES (default bf16: racecheck
#      takes ~2 min per dtype), LMFUSED_COMMIT (the commit measured, for the summary).
set -uo pipefail
OUT=${1:?usage: bench/device_check.sh OUT [STEP ...]}
shift
STEPS=${*:-jit setup ctest tests sanitizer ops ops-graph train models profile ncu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export LMFUSED_CACHE_DIR=${LMFUSED_CACHE_DIR:-/tmp/lmfused-jit}
PY=${PYTHON:-python3}
CMAKE_DIR=/tmp/lmfused-cmake
mkdir -p "$OUT/logs"

run_step() {  # run_step NAME TIMEOUT_S CMD...: its own log, one summary line
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "\$ $*" >"$OUT/logs/$name.log"
  timeout "$limit" "$@" >>"$OUT/logs/$name.log" 2>&1
  rc=$?
  printf '%-12s %-12s %4ss\n' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED($rc)")" \
    $(( $(date +%s) - start )) >>"$OUT/summary.txt"
  return $rc
}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

: >"$OUT/summary.txt"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${LMFUSED_COMMIT:-unknown}"; } >"$OUT/environment.txt" 2>&1

# 1. Builds (CPU-bound, in parallel): JIT (LMFUSED_FORCE_JIT ignores a prebuilt _C), setup.py, CMake.
wants jit && run_step jit-build 400 env LMFUSED_FORCE_JIT=1 $PY -c "
import lmfused._cuda_build as b
m = b.load_cuda_extension()
assert m is not None, b.cuda_unavailable_reason()
print('JIT build ok:', m.build_info())" &
wants setup && run_step setup-build 400 $PY -m pip install --no-build-isolation --no-deps --no-index -e . &
wants ctest && run_step ctest 400 env CUDA_ARCHS=90 RUN_TESTS=1 bash csrc/check_compile.sh "$CMAKE_DIR" &
wait
wants setup && run_step info 60 $PY -m lmfused.info

# 2. Correctness (GPU tests in parallel workers; compute-sanitizer on the kernel tests beside them).
if wants sanitizer; then
  ( run_step memcheck 300 compute-sanitizer --tool memcheck --error-exitcode 9 "$CMAKE_DIR/lmfused_kernel_tests"
    run_step racecheck 400 env LMFUSED_KERNEL_TESTS_DTYPES="${RACECHECK_DTYPES:-bf16}" \
      compute-sanitizer --tool racecheck --error-exitcode 9 "$CMAKE_DIR/lmfused_kernel_tests" ) &
fi
wants tests && run_step tests "${TESTS_TIMEOUT:-420}" $PY -m pytest tests -q -rfE -p no:cacheprovider \
  -n "${TEST_WORKERS:-12}" --durations=10 --ignore=tests/test_train.py
wait

# 3. Speed (one thing at a time on the GPU).
wants ops && run_step ops 240 $PY -m bench.ops --grid "${OPS_GRID:-full}" --out "$OUT"
wants ops-graph && run_step ops-graph 200 $PY -m bench.ops --grid headline --providers eager triton cuda \
  --cuda-graph --out "$OUT"
if wants train; then
  for backend in triton cuda; do
    run_step "train-$backend" 100 $PY -m lmfused.train --model lm_resnext50_32x4d --data synthetic --amp bf16 \
      --channels-last --backend "$backend" --max-steps 30 --batch-size 64 --out "/tmp/train-$backend" \
      --overwrite --no-progress && cp "/tmp/train-$backend/summary.json" "$OUT/train-$backend.json"
  done
fi
wants models && run_step models 200 $PY -m bench.models --out "$OUT" ${MODELS_ARGS:-}
wants profile && run_step profile 200 $PY -m bench.profile --out "$OUT"
# Nsight Compute on each lm_step kernel (clocks left alone): throughput vs peak, memory, occupancy.
wants ncu && run_step ncu 300 ncu --clock-control none -k regex:'lm_step|reduce_partials' \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  $PY -m bench.kernels_once

tail -n 3 "$OUT"/logs/tests.log "$OUT"/logs/memcheck.log "$OUT"/logs/racecheck.log 2>/dev/null
# Few files come back from a lent machine: one log, one summary, the JSON results.
for f in "$OUT"/logs/*.log; do echo "==== $(basename "$f")"; cat "$f"; done >"$OUT/log.txt"
rm -r "$OUT/logs"
cat "$OUT/environment.txt" "$OUT/summary.txt" >"$OUT/summary.tmp" && mv "$OUT/summary.tmp" "$OUT/summary.txt"
rm "$OUT/environment.txt"
cat "$OUT/summary.txt"
# Last, the short table: % of copy per layout, provider and mode (CUDA-graph kernel times in brackets).
for f in "$OUT"/ops-*.json; do
  [ -e "$f" ] && echo "== $(basename "$f")" && $PY -m bench.report "$f" --brief | tee -a "$OUT/summary.txt"
done
