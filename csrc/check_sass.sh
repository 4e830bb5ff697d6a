#!/usr/bin/env bash
# Check the LM-step and batch-norm-fused kernels in their compiled code, without a GPU: no kernel
# uses local memory on sm_80 or sm_90, vector paths store as wide as they load, reductions store
# nothing in their main loop (csrc/check_sass.py has the rules), and print the static table of the
# sm_90 kernels (registers, local bytes, CTAs per SM, loads in flight, wide accesses, predicted
# fraction of copy bandwidth).
#   csrc/check_sass.sh [BUILD_DIR]      (default: build/sass, relative to the repo root)
# Reuses the objects of csrc/check_compile.sh (sm_80 and sm_90 code) when BUILD_DIR is its build
# folder (they are under CMakeFiles/); otherwise compiles the eight per-dtype kernel files to
# cubins for both archs in BUILD_DIR (device code only, several minutes on 2 cores).
# Needs nvcc (PATH or CUDA_HOME) and cuobjdump: PATH, $CUDA_HOME/bin, or
#   pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
# Env: SASS_VERBOSE=1 prints one row per kernel; SASS_NVCC_FLAGS (extra nvcc flags); PYTHON
#      (python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${1:-build/sass}"
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
mkdir -p "$build_dir"
python="${PYTHON:-python3}"
units=()
for d in f32 f16 bf16 f64; do units+=("lm_step_$d" "batch_norm_lm_step_$d"); done
headers=(kernel_common.cuh lm_step.cuh lm_step_impl.cuh batch_norm_lm_step.cuh)

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
    obj="$build_dir/$u.o"
    inputs+=("$obj")
    "$nvcc_bin" -c -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -O3 -std=c++17 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      ${SASS_NVCC_FLAGS:-} -I"$root/csrc" "$root/csrc/$u.cu" -o "$obj" \
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
"$python" "$root/csrc/check_sass.py" "${verbose[@]}" --table --arch sm_90 --arch sm_80 "${inputs[@]}"
