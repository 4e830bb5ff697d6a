#!/usr/bin/env bash
# Everything that needs a GPU, as two prepared commands of about five minutes each, on a machine with CUDA
# torch, Triton and nvcc (no network needed). Every step has its own time limit, and the whole command a
# deadline: a slow step is cut, the steps after it still run, and what was measured stays in OUT.
#
#   bench/device_check.sh OUT correctness   # 1: builds (setup.py, JIT, CMake), ctest, GPU op tests on the
#                                           #    cuda and triton backends, memcheck (all dtypes), racecheck
#                                           #    (bf16), and the Triton kernels of the speed grid compiled
#   bench/device_check.sh OUT speed         # 2: the headline op grid with CUDA-graph times, then the model
#                                           #    table (torchvision / plain-PyTorch LM / fused, eager and
#                                           #    compiled); builds _C first only if it is not importable
#   bench/device_check.sh OUT STEP ...      # single steps: setup jit ctest info tests sanitizer warm built
#                                           #    ops models ops-full train profile ncu
#   DRY_RUN=1 bench/device_check.sh OUT correctness   # print the plan (steps and limits) and exit
#
# Env: DEADLINE_S (whole command, default 300), TESTS_TIMEOUT (default 150), TEST_WORKERS (default 12),
#      RACECHECK_DTYPES (default bf16), OPS_TIMEOUT (default 140), MODELS_TIMEOUT (default 170),
#      MODELS_ARGS (extra bench.models flags), TORCH_CUDA_ARCH_LIST (default 9.0), LMFUSED_COMMIT (the
#      commit measured, for machines without the git history).
# OUT ends with log.txt (every step's output), summary.txt (one line per step) and the JSON results; the
# short table (step status, % of copy per layout/provider/mode, the model table) is printed last.
set -uo pipefail
OUT=${1:?usage: bench/device_check.sh OUT correctness|speed|STEP...}
shift
case "${*:-correctness}" in
  correctness) STEPS="setup jit ctest info tests sanitizer warm" ;;
  speed) STEPS="built ops models" ;;
  *) STEPS="$*" ;;
esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export LMFUSED_CACHE_DIR=${LMFUSED_CACHE_DIR:-/tmp/lmfused-jit}
export LMFUSED_COMMIT=${LMFUSED_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
CMAKE_DIR=/tmp/lmfused-cmake
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-300}))
mkdir -p "$OUT/logs"
wants() { [[ " $STEPS " == *" $1 "* ]]; }

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "steps: $STEPS (deadline ${DEADLINE_S:-300} s)"
fi

run_step() {  # run_step NAME LIMIT_S CMD...: its own log, one summary line, cut at the command's deadline
  local name=$1 limit=$2 start rc left
  shift 2
  left=$((DEADLINE - $(date +%s)))
  ((limit > left)) && limit=$left
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%-12s limit %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if ((limit < 5)); then
    printf '%-12s %-14s %4ss\n' "$name" "SKIPPED(time)" 0 >>"$OUT/summary.txt"
    return 124
  fi
  start=$(date +%s)
  echo "\$ $*" >"$OUT/logs/$name.log"
  timeout -k 10 "$limit" "$@" >>"$OUT/logs/$name.log" 2>&1
  rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status="TIMEOUT(${limit}s)"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED($rc)"
  printf '%-12s %-14s %4ss\n' "$name" "$status" $(($(date +%s) - start)) >>"$OUT/summary.txt"
  return $rc
}

: >"$OUT/summary.txt"
if [ "${DRY_RUN:-0}" != 1 ]; then
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo "commit $LMFUSED_COMMIT"; } >"$OUT/environment.txt" 2>&1
fi

# ---- 1. correctness -----------------------------------------------------------------------------------
# Builds side by side (CPU-bound): setup.py in place, the JIT path (LMFUSED_FORCE_JIT ignores the prebuilt
# _C), and the CMake kernel library + C++ kernel tests, which then run on the GPU (ctest) and under
# compute-sanitizer as soon as they are built, beside the Python tests.
setup_pid=
if wants setup; then
  run_step setup-build 120 $PY -m pip install --no-build-isolation --no-deps --no-index -e . &
  setup_pid=$!
fi
wants jit && run_step jit-build 120 env LMFUSED_FORCE_JIT=1 $PY -c "
import lmfused._cuda_build as b
m = b.load_cuda_extension()
assert m is not None, b.cuda_unavailable_reason()
print('JIT build ok:', m.build_info())" &
if wants ctest || wants sanitizer; then
  (
    wants ctest && run_step ctest 120 env CUDA_ARCHS=90 RUN_TESTS=1 bash csrc/check_compile.sh "$CMAKE_DIR"
    if wants sanitizer; then
      run_step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$CMAKE_DIR/lmfused_kernel_tests"
      run_step racecheck 130 env LMFUSED_KERNEL_TESTS_DTYPES="${RACECHECK_DTYPES:-bf16}" \
        compute-sanitizer --tool racecheck --error-exitcode 9 "$CMAKE_DIR/lmfused_kernel_tests"
    fi
  ) &
fi
[ -n "$setup_pid" ] && wait "$setup_pid"  # the Python steps need _C; the other builds go on meanwhile
wants info && run_step info 40 $PY -m lmfused.info
if wants warm; then  # compile the speed grid's Triton kernels into the on-disk cache, 4 processes at once
  for shard in 0 1 2 3; do
    run_step "warm-$shard" 150 $PY -m bench.kernels_once --all-flags --shard "$shard/4" &
  done
fi
if wants tests; then  # the op tests on the GPU backends; -v names every result even if the step is cut
  test_files=$(ls tests/test_lm_step.py tests/test_errors.py tests/test_nonfinite.py tests/test_dtypes.py \
    tests/test_cuda*.py tests/test_batch_norm_step.py tests/test_batch_norm_relu.py \
    tests/test_shortcut_gradient.py tests/test_batch_norm_modules.py 2>/dev/null)
  run_step tests "${TESTS_TIMEOUT:-150}" $PY -m pytest $test_files -v -rfE -p no:cacheprovider \
    -n "${TEST_WORKERS:-12}" -k "not reference" --tb=short
fi
wait

# ---- 2. speed (one thing at a time on the GPU) ----------------------------------------------------------
if wants built && ! $PY -c "import lmfused._C" 2>/dev/null; then
  run_step setup-build 120 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
fi
wants ops && run_step ops "${OPS_TIMEOUT:-140}" $PY -m bench.ops --grid headline --cuda-graph --out "$OUT"
wants models && run_step models "${MODELS_TIMEOUT:-170}" $PY -m bench.models --out "$OUT" --steps 10 \
  --warmup 3 --time-budget $((${MODELS_TIMEOUT:-170} - 50)) ${MODELS_ARGS:-}
# Extra steps, by name only.
wants ops-full && run_step ops-full 300 $PY -m bench.ops --grid full --providers eager triton cuda --out "$OUT"
if wants train; then
  for backend in triton cuda; do
    run_step "train-$backend" 100 $PY -m lmfused.train --model lm_resnext50_32x4d --data synthetic --amp bf16 \
      --channels-last --backend "$backend" --max-steps 30 --batch-size 64 --out "/tmp/train-$backend" \
      --overwrite --no-progress && cp "/tmp/train-$backend/summary.json" "$OUT/train-$backend.json"
  done
fi
wants profile && run_step profile 200 $PY -m bench.profile --out "$OUT"
# Nsight Compute on each lm_step kernel (clocks left alone): throughput vs peak, memory, occupancy.
wants ncu && run_step ncu 300 ncu --clock-control none -k regex:'lm_step|reduce_partials' \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  $PY -m bench.kernels_once
[ "${DRY_RUN:-0}" = 1 ] && exit 0

# ---- what comes back: one log, one summary, the JSON results; the short table last ----------------------
{
  cat "$OUT/environment.txt"
  cat "$OUT/summary.txt"
  grep -h -E "^(FAILED|ERROR) |\] (FAILED|ERROR) " "$OUT/logs/tests.log" 2>/dev/null | sed 's/^/  /' | sort -u
  tail -n 2 "$OUT/logs/memcheck.log" "$OUT/logs/racecheck.log" 2>/dev/null
} >"$OUT/summary.tmp"
mv "$OUT/summary.tmp" "$OUT/summary.txt"
for f in "$OUT"/logs/*.log; do echo "==== $(basename "$f")"; cat "$f"; done >"$OUT/log.txt"
rm -r "$OUT/logs" "$OUT/environment.txt"
echo "== total $(($(date +%s) - START)) s"
cat "$OUT/summary.txt"
models=$(ls "$OUT"/models-*.json 2>/dev/null | head -n 1)
for f in "$OUT"/ops-*.json; do
  [ -e "$f" ] && $PY -m bench.report "$f" --brief ${models:+--models "$models"} | tee -a "$OUT/summary.txt"
done
if [ -n "$models" ] && ! ls "$OUT"/ops-*.json >/dev/null 2>&1; then
  $PY -c "import json, sys; from bench.report import models_table; print(models_table(json.load(open(sys.argv[1]))))" \
    "$models" | tee -a "$OUT/summary.txt"
fi
