#!/usr/bin/env bash
# Build the kernel tests against the CPU emulation of CUDA (csrc/tests/cuda_emulator.h) with the
# host C++ compiler and run them: the real kernel code, checked on a machine without a GPU.
#   tools/run_emulated.sh [BUILD_DIR]     (default: build/emulated, relative to the repo root)
# Needs the CUDA headers (found through nvcc, or $CUDA_HOME/include) and a C++17 compiler.
# Env: LMFUSED_KERNEL_TESTS_DTYPES (float,bf16,half,double or a subset; default all): only those
#      dtypes' kernel files are compiled (the others are linked as stubs, emulation_stubs.cpp),
#      and each dtype's tests run as a process of its own, JOBS (default: the cores) at a time;
#      LMFUSED_KERNEL_TESTS_UBSAN (dtypes from those, default none): their kernel files, and the
#      tests and the emulator, compile under UBSan (-fsanitize=undefined, which also flags misaligned
#      vector accesses and integer overflow; see below for the two checks left out);
#      LMFUSED_KERNEL_TESTS_OPS as for the GPU run; CXX
#      (g++); EMULATION_CXXFLAGS (extra flags for every file).
# Every file compiles in one pool of JOBS, the largest first.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${1:-build/emulated}"
case "$build_dir" in /*) ;; *) build_dir="$root/$build_dir" ;; esac
mkdir -p "$build_dir"
rm -f "$build_dir/failed"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

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

IFS=, read -r -a dtypes <<< "${LMFUSED_KERNEL_TESTS_DTYPES:-float,bf16,half,double}"
declare -A suffix=([float]=f32 [half]=f16 [bf16]=bf16 [double]=f64)
declare -A ctype=([float]=float [half]=__half [bf16]=__nv_bfloat16 [double]=double)
wanted=" ${dtypes[*]} "
sanitized=" ${LMFUSED_KERNEL_TESTS_UBSAN:-} "
sanitized="${sanitized//,/ }"
for d in $sanitized; do
  if [ -z "${suffix[$d]:-}" ]; then
    echo "run_emulated: LMFUSED_KERNEL_TESTS_UBSAN: unknown dtype '$d' (float, bf16, half, double)" >&2
    exit 2
  fi
done
# Left out: `null` and `pointer-overflow`, a check on every access that doubled the kernel files' compile
# (the float batch-norm file: 197 -> 107 s), for faults the emulation reports anyway: a null pointer's
# access, or a wrapped pointer's, lands on unmapped memory (page zero, the top of the address space),
# and the test process dies with SIGSEGV, which fails the run as a UBSan error does.
ubsan=(-fsanitize=undefined -fno-sanitize=null,pointer-overflow -fno-sanitize-recover=undefined)
any_ubsan=()
for d in "${dtypes[@]}"; do [[ "$sanitized" == *" $d "* ]] && any_ubsan=("${ubsan[@]}"); done

exe="$build_dir/lmfused_kernel_tests_emulated"
# -O1: the kernel files (hundreds of specialisations) compile in 2/3 of -O2's time, and the tests
# run as fast (their time is the emulation's fiber switches).
flags=(-std=c++17 -O1 -DLMF_CUDA_EMULATION -I"$include_dir" -I"$root/csrc"
  -include "$root/csrc/tests/cuda_emulator.h"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ ${EMULATION_CXXFLAGS:-})
# The kernel files of the wanted dtypes (batch norm's, the largest, first), stubs for the others,
# and the rest: one compile command per line, run $jobs at a time in that order.
commands="$build_dir/compile.commands"
objects=()
: > "$commands"
add() {  # add SRC OBJ [FLAGS...]
  local src="$1" obj="$2"
  shift 2
  objects+=("$obj")
  printf '%q ' "${CXX:-g++}" "${flags[@]}" "$@" -x c++ -c "$root/csrc/$src" -o "$obj" >> "$commands"
  echo >> "$commands"
}
for family in batch_norm_lm_step lm_step; do
  for d in "${dtypes[@]}"; do
    extra=()
    [[ "$sanitized" == *" $d "* ]] && extra=("${ubsan[@]}")
    add "${family}_${suffix[$d]}.cu" "$build_dir/${family}_${suffix[$d]}.o" "${extra[@]}"
  done
done
for d in float bf16 half double; do
  [[ "$wanted" == *" $d "* ]] ||
    add tests/emulation_stubs.cpp "$build_dir/stubs_${suffix[$d]}.o" -DLMF_STUB_T="${ctype[$d]}"
done
for src in tests/test_batch_norm_kernels.cu tests/test_lm_step_kernels.cu lm_step.cu \
    batch_norm_lm_step.cu tests/cuda_emulator.cpp; do
  add "$src" "$build_dir/$(basename "$src").o" "${any_ubsan[@]}"
done
if ! xargs -P "$jobs" -d '\n' -n 1 bash -c 'eval "$1"' _ < "$commands"; then
  echo "run_emulated: compile failed" >&2
  exit 1
fi
${CXX:-g++} ${EMULATION_CXXFLAGS:-} "${any_ubsan[@]}" "${objects[@]}" -o "$exe"
echo "run_emulated: built $exe (dtypes: ${dtypes[*]}; under UBSan: ${LMFUSED_KERNEL_TESTS_UBSAN:-none})"

# One process per dtype, $jobs at a time; their outputs in dtype order.
export exe build_dir
printf '%s\n' "${dtypes[@]}" | xargs -P "$jobs" -n 1 bash -c \
  'LMFUSED_KERNEL_TESTS_DTYPES="$1" "$exe" > "$build_dir/test_$1.log" 2>&1 ||
     echo "$1" >> "$build_dir/failed"' _
for d in "${dtypes[@]}"; do
  echo "---- $d"
  cat "$build_dir/test_$d.log"
done
if [ -s "$build_dir/failed" ]; then
  echo "run_emulated: FAILED: $(tr '\n' ' ' < "$build_dir/failed")" >&2
  exit 1
fi
