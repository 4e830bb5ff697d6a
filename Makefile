# lmfused: `make test` (lint + tests, CPU-only is fine) and `make bench` (benchmarks; GPU for real numbers).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --no-build-isolation -e ".[test,bench]"
OUT ?= runs/bench

.PHONY: install test lint pytest bench cuda-compile cuda-emulated device-check

# Installs lmfused (editable) on top of the torch already present; never replaces torch.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "lmfused needs PyTorch: pip install torch first"; exit 1; }
	$(PIP_INSTALL)

.install.stamp: setup.py pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "lmfused needs PyTorch: pip install torch first"; exit 1; }
	$(PIP_INSTALL) -q
	@touch $@

lint: .install.stamp
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

pytest: .install.stamp
	$(PYTHON) -m pytest -q

test: lint pytest

bench: .install.stamp
	$(PYTHON) -m bench.ops --out $(OUT)
	$(PYTHON) -m bench.models --out $(OUT)

# Compiles the torch-free CUDA kernels and their C++ test with nvcc (no GPU needed).
cuda-compile:
	bash csrc/check_compile.sh build/cmake

# The C++ kernel tests on the CPU emulation of CUDA (needs the CUDA headers, no GPU; ~15 min on 2 cores).
# float and bf16 (between them every vector width) under UBSan, which also flags misaligned vector accesses
# and integer overflow; fp16 and fp64 plain.
cuda-emulated:
	EMULATION_CXXFLAGS="-fsanitize=undefined -fno-sanitize-recover=undefined" \
	LMFUSED_KERNEL_TESTS_DTYPES=float,bf16 bash csrc/tests/run_emulated.sh build/emulated-ubsan
	LMFUSED_KERNEL_TESTS_DTYPES=half,double bash csrc/tests/run_emulated.sh build/emulated

# On a GPU machine, two commands of about five minutes each (OUT=folder): PHASE=correctness (builds, ctest,
# GPU op tests, compute-sanitizer), then PHASE=speed (op grid with CUDA-graph times, model table).
PHASE ?= correctness
device-check:
	bash bench/device_check.sh $(OUT) $(PHASE)
