# lmfused: `make test` (lint + tests, CPU-only is fine) and `make bench` (benchmarks; GPU for real numbers).
# Both first install what is missing into $(PYTHON)'s environment (see the stamp rule below).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
OUT ?= runs/bench
# One stamp per Python environment (two virtual environments on one checkout each get their install).
ENV_ID := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])" 2>/dev/null || echo none)
STAMP = build/install-$(ENV_ID).stamp
TORCH_PIN = build/torch-pin-$(ENV_ID).txt

.PHONY: install test lint pytest bench cuda-compile cuda-sass cuda-emulated device-check

# Installs lmfused (editable) with its test and bench extras and what they need. An installed torch is never
# replaced (every pip call is constrained to its exact version); only when torch is missing does it install
# the current torch with the torchvision and timm that match it. timm is added beside an installed
# torchvision; a missing torchvision beside an installed torch is reported, not installed (the one that
# matches a given torch build is the user's choice), and the tests that need it skip.
install:
	@rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

$(STAMP): setup.py pyproject.toml
	@mkdir -p build
	@if ! $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "== torch is not installed: installing torch, torchvision and timm"; \
	  $(PIP) install torch torchvision timm || exit 1; \
	fi
	@$(PYTHON) -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(TORCH_PIN)
	@echo "== keeping $$(cat $(TORCH_PIN))"
	$(PIP) install -q -c $(TORCH_PIN) "setuptools>=64" wheel ninja
	$(PIP) install -q -c $(TORCH_PIN) --no-build-isolation -e ".[test,bench]"
	@if $(PYTHON) -c "import torchvision" 2>/dev/null; then \
	  $(PYTHON) -c "import timm" 2>/dev/null || { \
	    $(PYTHON) -c "from importlib.metadata import version as v; print('torchvision==' + v('torchvision'))" \
	      >> $(TORCH_PIN); \
	    $(PIP) install -q -c $(TORCH_PIN) timm \
	      || echo "== timm could not be installed beside $$(tr '\n' ' ' < $(TORCH_PIN)); its tests skip"; }; \
	else \
	  echo "== torchvision is not importable beside $$(cat $(TORCH_PIN)): the torchvision/timm tests skip" \
	       "(pip install the torchvision built for this torch to run them)"; \
	fi
	@$(PYTHON) -c "import importlib.util as u; from lmfused._cuda_build import install_build_failure as f; \
	  print('== lmfused._C (CUDA backend):', 'built' if u.find_spec('lmfused._C') else \
	  'build failed, pure Python: ' + ' '.join(f().split()) if f() else 'not built, pure Python (python -m lmfused.info says why)')"
	@touch $@

lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# One worker per core (pytest-xdist, from the test extra): the tests are single-threaded.
pytest: $(STAMP)
	$(PYTHON) -m pytest -q -rs -n auto --durations=20

test: lint pytest

bench: $(STAMP)
	$(PYTHON) -m bench.ops --out $(OUT)
	$(PYTHON) -m bench.models --out $(OUT)

# Compiles the torch-free CUDA kernels and their C++ test with nvcc (no GPU needed).
cuda-compile:
	bash tools/check_compile.sh build/cmake

# The CUDA kernels' compiled code (nvcc, cuobjdump and nvdisasm; no GPU): no local memory on sm_80 and sm_90,
# vector paths store as wide as they load, reductions store nothing in their main loop, channels-last
# kernels read shared memory without bank conflicts (offsets of whole table rows); prints the static
# table of the sm_90 kernels (registers, local bytes, CTAs per SM, loads in flight, predicted bandwidth).
cuda-sass:
	PYTHON=$(PYTHON) bash tools/check_sass.sh build/cmake

# The C++ kernel tests on the CPU emulation of CUDA (needs the CUDA headers, no GPU). float and bf16 (between
# them every vector width) under UBSan, which also flags misaligned vector accesses and integer overflow;
# fp16 and fp64 plain: one build (every file in one pool, the largest first), one test process per dtype.
cuda-emulated:
	LMFUSED_KERNEL_TESTS_UBSAN=float,bf16 bash tools/run_emulated.sh build/emulated

# On a GPU machine, two commands of about five minutes each (OUT=folder): PHASE=correctness (builds,
# python -m lmfused.check, ctest, compute-sanitizer, the GPU tests), then PHASE=speed (junction rows, op grid
# with CUDA-graph times, model table with peak memory, Nsight Compute). DRY_RUN=1 prints the plan.
PHASE ?= correctness
device-check:
	bash bench/device_check.sh $(OUT) $(PHASE)
