#!/usr/bin/env bash
# Build the kernel tests against the CPU emulation of CUDA (csrc/tests/cuda_emulator.h) with the
# host C++ compiler and run them: the real kernel code, checked on a machine without a GPU.
#   csrc/tests/run_emulated.sh [BUILD_DIR]     (default: build/emulated, relative to the repo root)
# Needs the CUDA headers (found through nvcc, or $CUDA_HOME/include) and a C++17 compiler.
# Env: LMFUSED_KERNEL_TESTS_DTYPES and LMFUSED_KERNEL_TESTS_OPS as for the GPU run (default here:
#      every dtype and op), CXX (g++),
#      EMULATION_CXXFLAGS (extra flags, e.g. -fsanitize=undefined to catch misaligned vector accesses).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build_dir="${1:-build/emulated}"
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
mkdir -p "$build_dir"

include_dir=""
if [ -n "${CUDA_HOME:-}" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
  include_dir="$CUDA_HOME/include"
elif command -v nvcc >/dev/null 2>&1; then
  header="$(echo '#include <cuda_runtime.h>' | nvcc -E -x cu - 2>/dev/null \
    | grep -m1 -o '"[^"]*/cuda_runtime\.h"' | tr -d '"' || true)"
  [ -n "$header" ] && include_dir="$(dirname "$header")"
fi
if [ -z "$include_dir" ]; then
  echo "run_emulated: CUDA headers not found (put nvcc on PATH or set CUDA_HOME)" >&2
  exit 2
fi

exe="$build_dir/lmfused_kernel_tests_emulated"
flags=(-std=c++17 -O2 -U_FORTIFY_SOURCE -DLMF_CUDA_EMULATION -I"$include_dir" -I"$root/csrc"
  -include "$root/csrc/tests/cuda_emulator.h"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ ${EMULATION_CXXFLAGS:-})
sources=(lm_step.cu lm_step_f32.cu lm_step_f16.cu lm_step_bf16.cu lm_step_f64.cu
  batch_norm_lm_step.cu batch_norm_lm_step_f32.cu batch_norm_lm_step_f16.cu
  batch_norm_lm_step_bf16.cu batch_norm_lm_step_f64.cu
  tests/test_lm_step_kernels.cu tests/test_batch_norm_kernels.cu)
objects=()
pids=()
for src in "${sources[@]}" tests/cuda_emulator.cpp; do  # one compiler per source, in parallel
  obj="$build_dir/$(basename "$src").o"
  objects+=("$obj")
  ${CXX:-g++} "${flags[@]}" -x c++ -c "$root/csrc/$src" -o "$obj" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
${CXX:-g++} ${EMULATION_CXXFLAGS:-} "${objects[@]}" -o "$exe"
echo "run_emulated: built $exe"
"$exe"
