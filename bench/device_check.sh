#!/usr/bin/env bash
# Everything that needs a GPU, as two prepared commands of about seven and five minutes, on a machine with
# CUDA torch, Triton and nvcc (no network needed). Every step has its own time limit, and the whole command a
# deadline: a slow step is cut, the steps after it still run, and what was measured stays in OUT, which is
# written as the steps end (log.txt gets each step's log, summary.txt its status line, JSON results grow
# row by row), so even a command killed from outside leaves what it had.
#
#   bench/device_check.sh OUT correctness   # 1: the setup.py build alone; then, most needed first: python -m
#                                           #    lmfused.check, the C++ argument errors under cuda-gdb, the
#                                           #    adversarial-mask tests, the GPU-marked tests file by file, the
#                                           #    op tests on the GPU backends; beside them the CMake build with
#                                           #    ctest, memcheck (all dtypes), racecheck (bf16), and the speed
#                                           #    runs' Triton kernels compiled
#   bench/device_check.sh OUT speed         # 2: the junction rows (batch_norm_lm_step, batch_norm_relu against
#                                           #    torchvision's and plain PyTorch, eager and compiled), the
#                                           #    headline lm_step grid, the model table (img/s, peak memory),
#                                           #    Nsight Compute on the lm_step and batch-norm kernels; builds _C
#                                           #    first only if it is not importable
#   bench/device_check.sh OUT STEP ...      # single steps: setup ctest sanitizer info check errors mask
#                                           #    gpu-tests op-tests warm built junction ops models ncu, and the
#                                           #    extra ones: jit ops-full train profile
#   DRY_RUN=1 bench/device_check.sh OUT correctness   # print the plan (steps and limits) and exit
#
# Env: DEADLINE_S (whole command; default 420 with the setup step, else 300), CHECK_TIMEOUT (75),
#      TESTS_TIMEOUT (GPU-marked tests, 75), GPU_TEST_WORKERS (8), TEST_WORKERS (op tests, 12),
#      RACECHECK_DTYPES (bf16), JUNCTION_TIMEOUT (65), OPS_TIMEOUT (70), MODELS_TIMEOUT (170, less what ncu
#      keeps), NCU_TIMEOUT (50), MODELS_ARGS (extra bench.models flags), TORCH_CUDA_ARCH_LIST (9.0),
#      LMFUSED_COMMIT (the commit measured, for machines without the git history).
# OUT ends with log.txt (every step's output), summary.txt (one line per step, then the short tables) and the
# JSON results (and ncu.csv + the ncu report); the short table is printed last.
set -uo pipefail
OUT=${1:?usage: bench/device_check.sh OUT correctness|speed|STEP...}
shift
case "${*:-correctness}" in
  correctness) STEPS="setup ctest sanitizer info check errors mask gpu-tests op-tests warm" ;;
  speed) STEPS="built junction ops models ncu" ;;
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
WORK=$(mktemp -d /tmp/lmfused-device-check.XXXXXX)  # step logs until each step ends, the ncu report
LOGS=$WORK/logs
START=$(date +%s)
[[ " $STEPS " == *" setup "* ]] && DEADLINE_S=${DEADLINE_S:-420}
DEADLINE=$((START + ${DEADLINE_S:-300}))
NCU_TIMEOUT=${NCU_TIMEOUT:-50}
mkdir -p "$LOGS"
wants() { [[ " $STEPS " == *" $1 "* ]]; }
SPENT=0  # a dry run's clock: every step before used its whole limit (the worst case)
now() { if [ "${DRY_RUN:-0}" = 1 ]; then echo $((START + SPENT)); else date +%s; fi; }
left() { echo $((DEADLINE - $(now) - ${1:-0})); }  # seconds to the deadline, less a reserve

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "steps: $STEPS (deadline $((DEADLINE - START)) s; each limit as if every step before used all of its own)"
fi

append() {  # append FILE < text: one writer at a time (steps run side by side)
  if command -v flock >/dev/null 2>&1; then
    (flock 9 && cat >>"$1") 9>"$WORK/lock"
  else
    cat >>"$1"
  fi
}

run_step() {  # run_step NAME LIMIT_S CMD...: its own log, one summary line, cut at the command's deadline
  local name=$1 limit=$2 start rc
  shift 2
  ((limit > $(left))) && limit=$(left)
  if [ "${DRY_RUN:-0}" = 1 ]; then
    ((limit < 5)) && limit=0
    printf '%-12s limit %4ss %-8s %s\n' "$name" "$limit" "${BESIDE:-}" "$*"
    [ -z "${BESIDE:-}" ] && SPENT=$((SPENT + limit))
    return 0
  fi
  if ((limit < 5)); then
    printf '%-12s %-14s %4ss\n' "$name" "SKIPPED(time)" 0 | append "$OUT/summary.txt"
    return 124
  fi
  start=$(date +%s)
  echo "\$ $*" >"$LOGS/$name.log"
  timeout -k 10 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
  rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status="TIMEOUT(${limit}s)"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED($rc)"
  { echo "==== $name ($status)"; sed '$a\' "$LOGS/$name.log"; } | append "$OUT/log.txt"  # (a cut last line ended)
  printf '%-12s %-14s %4ss\n' "$name" "$status" $(($(date +%s) - start)) | append "$OUT/summary.txt"
  return $rc
}

background() {  # background CMD...: run beside the steps that follow (in order in a dry run)
  if [ "${DRY_RUN:-0}" = 1 ]; then
    BESIDE="(beside)" "$@"
  else
    BESIDE="(beside)" "$@" &
  fi
}

skip_step() {  # skip_step NAME WHY: a summary line for a step that has nothing to run here
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%-12s skipped: %s\n' "$1" "$2"
  else
    printf '%-12s %-14s %4ss  %s\n' "$1" "SKIPPED" 0 "$2" | append "$OUT/summary.txt"
  fi
}

if [ "${DRY_RUN:-0}" != 1 ]; then
  : >"$OUT/log.txt"
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo "commit $LMFUSED_COMMIT"; } >"$OUT/summary.txt" 2>&1
fi

# ---- 1. correctness -----------------------------------------------------------------------------------
# setup.py builds _C in place first, alone: on the H200's 16 cores it took 100 s alone, and none of three
# builds side by side (setup.py, JIT, CMake) finished in 120 s. Every Python step then runs with
# LMFUSED_NO_JIT=1: it uses the prebuilt _C or says the cuda backend is missing, and never waits on a JIT
# build of its own (with the setup build cut, every step after it did, until its limit).
wants setup && run_step setup-build 180 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
export LMFUSED_NO_JIT=1
# The CMake kernel library + C++ kernel tests, then run on the GPU (ctest) and under compute-sanitizer,
# beside the Python steps.
kernel_tests() {  # the C++ kernel tests: built and run (ctest), then under compute-sanitizer
  wants ctest && run_step ctest 180 env CUDA_ARCHS=90 RUN_TESTS=1 bash tools/check_compile.sh "$CMAKE_DIR"
  if wants sanitizer; then
    run_step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$CMAKE_DIR/lmfused_kernel_tests"
    run_step racecheck 130 env LMFUSED_KERNEL_TESTS_DTYPES="${RACECHECK_DTYPES:-bf16}" \
      compute-sanitizer --tool racecheck --error-exitcode 9 "$CMAKE_DIR/lmfused_kernel_tests"
  fi
}
(wants ctest || wants sanitizer) && background kernel_tests
wants info && run_step info 30 $PY -m lmfused.info
# What a user runs first: every default path of the zoo on both backends against the float64 reference.
wants check && run_step check "${CHECK_TIMEOUT:-75}" $PY -m lmfused.check -v --json "$OUT/check.json"
if wants errors; then  # the binding's argument errors on CUDA tensors: at eb59331 on the H200 the first one
  # (grad_handoff unlike grad_out) ended the process with SIGSEGV; cuda-gdb prints the native stack
  error_test=(-m pytest -p no:xdist -p no:cacheprovider -q --tb=short
    tests/test_cuda_batch_norm_paths.py::test_grad_handoff_unlike_grad_out_is_an_error)
  # What the throw depends on there (the same throws pass on CPU with torch 2.11 and 2.14): the compiler
  # that built _C, the C++ runtime it loads, and torch's settings.
  # At f370e66 the native stack ended in c10's operator<< for sizes -> std::ostream::_M_insert<long> ->
  # "std::codecvt<char16_t>::do_unshift", all three inside _C itself: does _C define C++-runtime code of its
  # own (built here, the same sources import _M_insert from libstdc++.so)?
  run_step toolchain 15 bash -c "g++ --version | head -n 1; \${CXX:-c++} --version | head -n 1; command -v \${CXX:-c++}
    env | grep -E '^(TORCH|LD|CXX|CC)' || true
    $PY -c 'import lmfused._C; print(*sorted({l.split()[-1] for l in open(\"/proc/self/maps\")
      if any(n in l for n in (\"stdc++\", \"gcc_s\", \"libc10.so\", \"lmfused\"))}), sep=\"\\n\")'
    so=\$(ls lmfused/_C*.so); ls -l \$so; readelf -d \$so | grep -E 'NEEDED|RUNPATH'
    echo defined std::locale/codecvt/_M_insert symbols: \$(nm -C --defined-only \$so |
      grep -cE 'std::(locale|codecvt)|::_M_insert<'); nm -C --defined-only \$so |
      grep -E 'codecvt|::_M_insert<' | head -n 8"
  # The same call without pytest (and its plugins) in the process.
  run_step errors-plain 20 $PY -X faulthandler -c "
import torch, lmfused._C
x, g, h = (torch.randn(2, 8, 4, 4, device='cuda') for _ in range(3))
v, k = torch.rand(8, device='cuda') + 0.5, torch.full((8,), 0.3, device='cuda')
mean, invstd = torch.ops.lmfused.batch_norm_stats_cuda(x, None, None, True, 0.1, 1e-5)
try:
    torch.ops.lmfused.batch_norm_lm_step_cuda_backward_reduce(g, h[:1], x, mean, invstd, v, v, x, x, k, None,
                                                              None, False, True)
except ValueError as exc:
    print('ValueError:', exc)"
  if command -v cuda-gdb >/dev/null 2>&1; then
    # (the status: the test's exit code, or 139 when it died on a signal and gdb printed its stack)
    run_step errors 90 cuda-gdb -batch -ex "set pagination off" -ex run -ex "bt 40" \
      -ex 'quit $_isvoid($_exitcode) ? 139 : $_exitcode' \
      --args "$($PY -c 'import sys; print(sys.executable)')" "${error_test[@]}"  # (a binary, not a wrapper)
  else
    run_step errors 60 $PY "${error_test[@]}"
  fi
fi
if wants warm; then  # compile the speed runs' Triton kernels into the on-disk cache, 4 processes at once
  for shard in 0 1 2 3; do
    background run_step "warm-$shard" 150 $PY -m bench.kernels_once --all-flags --shard "$shard/4"
  done
fi
# The tests, most needed first; -v names every result even if a step is cut.
pytest_args=(-v -rfE -p no:cacheprovider --tb=short)
if wants mask; then  # ReLU masks on data whose pre-activations cancel to rounding level, both backends
  if [ -e tests/test_mask_adversarial.py ]; then
    run_step mask 45 $PY -m pytest tests/test_mask_adversarial.py "${pytest_args[@]}" -n 4
  else
    skip_step mask "no tests/test_mask_adversarial.py"
  fi
fi
if wants gpu-tests; then  # every test marked gpu, file by file (vector paths, 2^31 elements, CUDA graphs, decode)
  gpu_files=$( (ls tests/test_lm_step.py tests/test_cuda_vector_paths.py tests/test_cuda_batch_norm_paths.py \
    tests/test_data.py; grep -l "mark.gpu" tests/test_*.py) 2>/dev/null | grep -v test_mask_adversarial |
    awk '!seen[$0]++')
  run_step gpu-tests "${TESTS_TIMEOUT:-75}" $PY -m pytest $gpu_files -m gpu "${pytest_args[@]}" \
    -n "${GPU_TEST_WORKERS:-8}"
fi
if wants op-tests; then  # the op tests (CI runs them on the interpreter) on the compiled kernels and cuda;
  # test_rebuild: the projection rebuilt in the backward, the stem pooling, checkpointed and compiled stages
  op_files=$(ls tests/test_lm_step.py tests/test_batch_norm_step.py tests/test_batch_norm_relu.py \
    tests/test_shortcut_gradient.py tests/test_nonfinite.py tests/test_dtypes.py tests/test_errors.py \
    tests/test_batch_norm_modules.py tests/test_rebuild.py 2>/dev/null)
  run_step op-tests "$(left 5)" $PY -m pytest $op_files -m "not gpu" -k "not reference" "${pytest_args[@]}" \
    -n "${TEST_WORKERS:-12}"
fi
wait

# ---- 2. speed (one thing at a time on the GPU) ----------------------------------------------------------
if wants built && [ "${DRY_RUN:-0}" = 1 ]; then  # (not counted: the correctness command built it)
  BESIDE="(no _C)" run_step setup-build 180 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
elif wants built && ! $PY -c "import lmfused._C" 2>/dev/null; then
  run_step setup-build 180 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
fi
# The junction at the four ResNeXt-50 stage shapes: eager rows first, compiled ones while time is left.
junction_s=${JUNCTION_TIMEOUT:-65}
wants junction && run_step junction "$junction_s" $PY -m bench.junction --out "$OUT" \
  --time-budget $((junction_s - 20))
wants ops && run_step ops "${OPS_TIMEOUT:-70}" $PY -m bench.ops --grid headline --cuda-graph \
  --providers eager compile triton cuda --out "$OUT"
if wants models; then  # what is left but ncu's share; rows not started within the budget are listed
  reserve=0
  wants ncu && reserve=$NCU_TIMEOUT
  models_s=$(left "$reserve")
  ((models_s > ${MODELS_TIMEOUT:-170})) && models_s=${MODELS_TIMEOUT:-170}
  run_step models "$models_s" $PY -m bench.models --out "$OUT" --steps 10 --warmup 3 \
    --time-budget $((models_s > 80 ? models_s - 50 : models_s / 2)) ${MODELS_ARGS:-}
fi
# Nsight Compute (clocks left alone) on each lm_step and batch-norm kernel at 64x256x56x56 bf16 channels_last:
# the metrics of bench.kernels_once.NCU_COLUMNS that this ncu knows (dram bytes and bandwidth, lsu
# wavefronts, local-memory traffic, achieved occupancy, registers); the report and its CSV come back.
if wants ncu; then
  metrics="(bench.kernels_once.NCU_COLUMNS known to this ncu)"
  if [ "${DRY_RUN:-0}" != 1 ]; then
    ncu --query-metrics >"$WORK/ncu-metrics.txt" 2>&1
    metrics=$($PY -m bench.kernels_once --ncu-metrics "$WORK/ncu-metrics.txt" || echo gpu__time_duration.sum)
  fi
  ncu_args=(--clock-control none --kernel-name-base demangled -k "regex:lm_step|batch_norm|reduce_" -f
    -o "$WORK/ncu")
  if ! run_step ncu "$NCU_TIMEOUT" ncu "${ncu_args[@]}" --metrics "$metrics" \
    $PY -m bench.kernels_once --layouts channels_last; then  # a metric it refused: its standard sections
    run_step ncu-sections "$NCU_TIMEOUT" ncu "${ncu_args[@]}" --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      $PY -m bench.kernels_once --layouts channels_last
  fi
  if [ -e "$WORK/ncu.ncu-rep" ]; then
    ncu --import "$WORK/ncu.ncu-rep" --csv --page raw --print-units base >"$OUT/ncu.csv" 2>>"$OUT/log.txt"
    cp "$WORK/ncu.ncu-rep" "$OUT/"
  fi
fi
# Extra steps, by name only. jit: the JIT path (LMFUSED_FORCE_JIT ignores the prebuilt _C; about as long as
# the setup.py build).
wants jit && run_step jit-build 180 env -u LMFUSED_NO_JIT LMFUSED_FORCE_JIT=1 $PY -c "
import lmfused._cuda_build as b
m = b.load_cuda_extension()
assert m is not None, b.cuda_unavailable_reason()
print('JIT build ok:', m.build_info())"
wants ops-full && run_step ops-full 300 $PY -m bench.ops --grid full --providers eager triton cuda --out "$OUT"
if wants train; then
  for backend in triton cuda; do
    run_step "train-$backend" 100 $PY -m lmfused.train --model lm_resnext50_32x4d --data synthetic --amp bf16 \
      --channels-last --backend "$backend" --max-steps 30 --batch-size 64 --out "/tmp/train-$backend" \
      --overwrite --no-progress && cp "/tmp/train-$backend/summary.json" "$OUT/train-$backend.json"
  done
fi
wants profile && run_step profile 200 $PY -m bench.profile --out "$OUT"
[ "${DRY_RUN:-0}" = 1 ] && rm -r "$WORK" && exit 0

# ---- the short tables, after the step lines of summary.txt; printed last --------------------------------
{
  echo "== total $(($(date +%s) - START)) s"
  grep -h -E "^(FAILED|ERROR) |\] (FAILED|ERROR) " "$LOGS"/{mask,gpu-tests,op-tests}.log 2>/dev/null |
    sed 's/^/  /' | sort -u
  for name in memcheck racecheck; do
    [ -s "$LOGS/$name.log" ] && echo "$name: $(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1)"
  done
  [ -e "$LOGS/check.log" ] && sed -n '/^lmfused.check: /,$p' "$LOGS/check.log"
  for f in "$OUT"/junction-*.json; do [ -e "$f" ] && $PY -m bench.junction --report "$f"; done
  models=$(ls "$OUT"/models-*.json 2>/dev/null | head -n 1)
  for f in "$OUT"/ops-*.json; do
    [ -e "$f" ] && $PY -m bench.report "$f" --brief ${models:+--models "$models"}
  done
  if [ -n "$models" ] && ! ls "$OUT"/ops-*.json >/dev/null 2>&1; then
    $PY -c "import json, sys; from bench.report import models_table; print(models_table(json.load(open(sys.argv[1]))))" \
      "$models"
  fi
  [ -s "$OUT/ncu.csv" ] && $PY -m bench.kernels_once --ncu-table "$OUT/ncu.csv"
} 2>&1 | append "$OUT/summary.txt"
rm -r "$WORK"
cat "$OUT/summary.txt"
