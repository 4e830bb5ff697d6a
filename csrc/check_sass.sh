#!/usr/bin/env bash
# Check the store widths of the LM-step and batch-norm-fused kernels in their sm_90 SASS, without a
# GPU: every vector-path kernel must store as wide as it loads (csrc/check_sass.py has the rule).
#   csrc/check_sass.sh [BUILD_DIR]      (default: build/sass, relative to the repo root)
# Reuses the sm_90 objects of csrc/check_compile.sh when BUILD_DIR is its build folder (they are
# under CMakeFiles/); otherwise compiles the eight per-dtype kernel files to sm_90 cubins in
# BUILD_DIR (device code only, several minutes on 2 cores).
# Needs nvcc (PATH or CUDA_HOME) and cuobjdump: PATH, $CUDA_HOME/bin, or
#   pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
# Env: SASS_VERBOSE=1 prints one row per kernel; SASS_NVCC_FLAGS (extra nvcc flags, e.g.
#      "-Xptxas -v" for register and spill counts); PYTHON (python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${1:-build/sass}"
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
mkdir -p "$build_dir"
python="${PYTHON:-python3}"
units=()
for d in f32 f16 bf16 f64; do units+=("lm_step_$d" "batch_norm_lm_step_$d"); done
headers=(lm_step.cuh lm_step_impl.cuh batch_norm_lm_step.cuh)

inputs=()
for u in "${units[@]}"; do
  obj="$(find "$build_dir" -path '*CMakeFiles*' -name "$u.cu.o" 2>/dev/null | head -n1)"
  fresh=1
  for h in "${headers[@]}"; do [ -n "$obj" ] && [ "$obj" -nt "$root/csrc/$h" ] || fresh=0; done
  [ "$fresh" = 1 ] && inputs+=("$obj")
done
if [ "${#inputs[@]}" -ne "${#units[@]}" ]; then
  nvcc_bin="$(command -v nvcc || true)"
  if [ -z "$nvcc_bin" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    nvcc_bin="$CUDA_HOME/bin/nvcc"
  fi
  if [ -z "$nvcc_bin" ]; then
    echo "check_sass: nvcc not found (set CUDA_HOME or put nvcc on PATH)" >&2
    exit 2
  fi
  inputs=()
  pids=()
  for u in "${units[@]}"; do  # the flags of the CMake and torch builds (see CMakeLists.txt)
    cubin="$build_dir/$u.sm_90.cubin"
    inputs+=("$cubin")
    "$nvcc_bin" -cubin -arch=sm_90 -O3 -std=c++17 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      ${SASS_NVCC_FLAGS:-} -I"$root/csrc" "$root/csrc/$u.cu" -o "$cubin" \
      2> "$build_dir/$u.nvcc.log" &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  if [ "$status" -ne 0 ]; then
    cat "$build_dir"/*.nvcc.log >&2
    echo "check_sass: nvcc failed" >&2
    exit 2
  fi
fi

verbose=()
[ "${SASS_VERBOSE:-0}" = "1" ] && verbose=(-v)
"$python" "$root/csrc/check_sass.py" "${verbose[@]}" "${inputs[@]}"
