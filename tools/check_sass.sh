#!/usr/bin/env bash
# Check the LM-step and batch-norm-fused kernels in their compiled code, without a GPU: no kernel
# uses local memory on sm_80 or sm_90, vector paths store as wide as they load, reductions store
# nothing in their main loop (tools/check_sass.py has the rules), and print the static table of the
# sm_90 kernels (registers, local bytes, CTAs per SM, loads in flight, wide accesses, predicted
# fraction of copy bandwidth).
#   tools/check_sass.sh [BUILD_DIR]     (default: build/sass, relative to the repo root)
#   tools/check_sass.sh FILE...         (compiled code to read: the extension lmfused/_C*.so that
#                                        setup.py builds for 8.0;9.0, objects or cubins)
# With a folder: reuses the objects of tools/check_compile.sh (sm_80 and sm_90 code) when it is that
# build folder (they are under CMakeFiles/) and they are newer than the kernel headers; otherwise
# compiles the eight per-dtype kernel files to objects for both archs in it (device code only,
# several minutes on 2 cores).
# Needs nvcc (PATH or CUDA_HOME; not with FILE...) and cuobjdump: PATH, $CUDA_HOME/bin, or
#   pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
# Env: SASS_VERBOSE=1 prints one row per kernel; SASS_NVCC_FLAGS (extra nvcc flags); PYTHON
#      (python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
verbose=()
[ "${SASS_VERBOSE:-0}" = "1" ] && verbose=(-v)
check() { "$python" "$root/tools/check_sass.py" "${verbose[@]}" --table --arch sm_90 --arch sm_80 "$@"; }
if [ "$#" -ge 1 ] && [ -f "$1" ]; then
  check "$@"
  exit
fi

build_dir="${1:-build/sass}"
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
mkdir -p "$build_dir"
units=()
for d in f32 f16 bf16 f64; do units+=("lm_step_$d" "batch_norm_lm_step_$d"); done
headers=(kernel_common.cuh lm_step.cuh lm_step_impl.cuh batch_norm_lm_step.cuh batch_norm_lm_step_dispatch.h)

inputs=()
for u in "${units[@]}"; do
  obj="$(find "$build_dir" -path '*CMakeFiles*' -name "$u.cu.o" 2>/dev/null | head -n1)"
  fresh=1
  for h in "${headers[@]}"; do [ -n "$obj" ] && [ "$obj" -nt "$root/csrc/$h" ] || fresh=0; done
  [ "$fresh" = 1 ] && inputs+=("$obj")
done
if [ "${#inputs[@]}" -ne "${#units[@]}" ]; then
  source "$root/tools/nvcc.sh"
  find_nvcc check_sass
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

check "${inputs[@]}"
