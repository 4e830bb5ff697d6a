#!/usr/bin/env bash
# Configure and build the standalone CMake project (kernel library + kernel test executable)
# with nvcc, to catch CUDA compile errors without torch or a GPU.
#   csrc/check_compile.sh [BUILD_DIR]      (default: build/cmake, relative to the repo root)
# Env: CUDA_ARCHS (default "80;90"), CMAKE_GENERATOR (default Ninja when available),
#      RUN_TESTS=1 to also run ctest (the test skips cleanly without a GPU).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${1:-build/cmake}"
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac

nvcc_bin="$(command -v nvcc || true)"
if [ -z "$nvcc_bin" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  nvcc_bin="$CUDA_HOME/bin/nvcc"
fi
if [ -z "$nvcc_bin" ]; then
  echo "check_compile: nvcc not found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 2
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
