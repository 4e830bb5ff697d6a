#!/usr/bin/env bash
# Everything that needs a GPU, in one call, for a machine with CUDA torch, Triton, nvcc and no network:
# build lmfused._C ahead of time (setup.py) and just in time (torch.utils.cpp_extension.load), GPU tests,
# the C++ kernel tests (ctest) under compute-sanitizer, then benchmarks. Logs and JSON go to OUT.
#   bench/device_check.sh OUT [STEP ...]   steps: build tests ctest sanitizer ops models train (default: all)
set -uo pipefail
OUT=${1:?usage: bench/device_check.sh OUT [STEP ...]}
shift
STEPS=${*:-build tests ctest sanitizer ops models train}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export LMFUSED_CACHE_DIR=${LMFUSED_CACHE_DIR:-/tmp/lmfused-jit}
PY=${PYTHON:-python3}
SUMMARY=()

run_step() {  # run_step NAME TIMEOUT_S CMD...: log everything, keep one summary line
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "==== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  SUMMARY+=("$(printf '%-10s %-12s %4ss' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED($rc)")" $(( $(date +%s) - start )))")
  echo "==== $name rc=$rc" >>"$LOG"
  return $rc
}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; } >>"$LOG" 2>&1

if wants build; then
  # LMFUSED_FORCE_JIT=1 ignores any prebuilt _C, so this really exercises the JIT path.
  run_step jit-build 400 env LMFUSED_FORCE_JIT=1 $PY -c "
import lmfused._cuda_build as b
m = b.load_cuda_extension()
assert m is not None, b.cuda_unavailable_reason()
print('JIT build ok:', m.build_info())" &
  jit=$!
  run_step setup-build 400 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
  wait $jit
  run_step info 60 $PY -m lmfused.info
fi
wants tests && run_step tests 420 $PY -m pytest tests/test_lm_step.py tests/test_errors.py tests/test_nn.py \
  tests/test_models.py tests/test_convert.py -q -p no:cacheprovider
if wants ctest; then
  run_step ctest 300 env CUDA_ARCHS=90 RUN_TESTS=1 bash csrc/check_compile.sh /tmp/lmfused-cmake
fi
if wants sanitizer; then
  exe=/tmp/lmfused-cmake/lmfused_kernel_tests
  run_step memcheck 200 env LMFUSED_KERNEL_TESTS_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 "$exe"
  run_step racecheck 200 env LMFUSED_KERNEL_TESTS_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 "$exe"
fi
wants ops && run_step ops 420 $PY -m bench.ops --grid "${OPS_GRID:-full}" --out "$OUT"
wants models && run_step models 500 $PY -m bench.models --out "$OUT"
if wants train; then
  for backend in triton cuda; do
    run_step "train-$backend" 240 $PY -m lmfused.train --model lm_resnext50_32x4d --data synthetic --amp bf16 \
      --channels-last --backend "$backend" --max-steps 30 --batch-size 64 --out "/tmp/train-$backend" --no-progress
    cp "/tmp/train-$backend/summary.json" "$OUT/train-$backend.json" 2>/dev/null
  done
fi

grep -E "passed|failed|error" "$LOG" | grep -vi "warning" | tail -n 12
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
