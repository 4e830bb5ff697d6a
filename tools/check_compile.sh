#!/usr/bin/env bash
# Configure and build the standalone CMake project (kernel library + kernel test executable)
# with nvcc, to catch CUDA compile errors without torch or a GPU.
#   tools/check_compile.sh [BUILD_DIR]                (default: build/cmake, relative to the repo root)
#   tools/check_compile.sh --tests-only [BUILD_DIR]   only the kernel test executable's sources, to
#                                                     objects (the kernels themselves compile in
#                                                     setup.py's build of lmfused._C)
# Env: CUDA_ARCHS (default "80;90"; --tests-only: 90), CMAKE_GENERATOR (default Ninja when
#      available), RUN_TESTS=1 to also run ctest (the test skips cleanly without a GPU).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tests_only=0
if [ "${1:-}" = "--tests-only" ]; then
  tests_only=1
  shift
fi
build_dir="${1:-build/cmake}"
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac

source "$root/tools/nvcc.sh"
find_nvcc check_compile

if [ "$tests_only" = 1 ]; then  # the flags of CMakeLists.txt's kernel build
  mkdir -p "$build_dir"
  pids=()
  for t in test_lm_step_kernels test_batch_norm_kernels; do
    "$nvcc_bin" -c -std=c++17 -O3 -arch="sm_${CUDA_ARCHS:-90}" -D__CUDA_NO_HALF_OPERATORS__ \
      -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -I"$root/csrc" "$root/csrc/tests/$t.cu" -o "$build_dir/$t.o" &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  [ "$status" = 0 ] || { echo "check_compile: the kernel tests failed to compile" >&2; exit 1; }
  echo "check_compile: OK, the kernel tests' sources ($build_dir)"
  exit 0
fi

generator_args=()
if [ -z "${CMAKE_GENERATOR:-}" ] && command -v ninja >/dev/null 2>&1; then
  generator_args=(-G Ninja)
fi

cmake -S "$root" -B "$build_dir" "${generator_args[@]}" \
  -DCMAKE_CUDA_COMPILER="$nvcc_bin" \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-80;90}" \
  -DCMAKE_BUILD_TYPE=Release
cmake --build "$build_dir" --parallel "${JOBS:-$(nproc 2>/dev/null || echo 4)}"

if [ "${RUN_TESTS:-0}" = "1" ]; then
  ctest --test-dir "$build_dir" --output-on-failure
fi
echo "check_compile: OK ($build_dir)"
