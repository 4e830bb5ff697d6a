# Sourced by the tools' scripts: find_nvcc TOOL sets nvcc_bin to the nvcc on PATH, else $CUDA_HOME/bin/nvcc,
# or exits 2 with TOOL's message.
find_nvcc() {
  nvcc_bin="$(command -v nvcc || true)"
  if [ -z "$nvcc_bin" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    nvcc_bin="$CUDA_HOME/bin/nvcc"
  fi
  if [ -z "$nvcc_bin" ]; then
    echo "$1: nvcc not found (set CUDA_HOME or put nvcc on PATH)" >&2
    exit 2
  fi
}
