"""Test setup: without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are decorated, i.e. before lmfused is imported. The
interpreter then runs without the work whose result it never uses (tests/interpreter.py).

Optional libraries (torchvision, timm) are imported with :func:`import_or_skip`: a test skips when one is
missing or fails to import (a torchvision built for another torch raises RuntimeError, not ImportError), and
fails instead when LMFUSED_REQUIRE_LIBS (comma-separated, e.g. "torchvision,timm"; CI sets it) names it.
"""

import gc
import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Many tiny ops: one thread avoids OpenMP overheads that dominate on a busy 2-core machine.
    torch.set_num_threads(1)
    from tests.interpreter import install_interpreter_speedups

    install_interpreter_speedups()

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def most_of_the_gpu_memory():
    """For a test that needs a large share of the GPU's memory (tens of GB): such tests take turns across
    pytest-xdist's worker processes (a lock file), and each gives its memory back to the device when it ends.
    Four 2^31-element tests at once did not fit in an H200's 140 GB under ``-n 8``."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / "lmfused-tests-gpu-memory.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            gc.collect()
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


def required_libraries() -> set[str]:
    """Top-level names in LMFUSED_REQUIRE_LIBS: libraries whose absence fails a test, not skips it."""
    return {name.strip() for name in os.environ.get("LMFUSED_REQUIRE_LIBS", "").split(",") if name.strip()}


def import_or_skip(name: str) -> ModuleType:
    """``importlib.import_module(name)``, or skip the test when that fails for any reason (fail instead when
    LMFUSED_REQUIRE_LIBS names the library)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or e.g. RuntimeError from a torchvision built for another torch
        why = f"{name} is not usable: {type(exc).__name__}: {exc}"
        if name.split(".")[0] in required_libraries():
            pytest.fail(f"{why} (LMFUSED_REQUIRE_LIBS requires it)", pytrace=False)
        pytest.skip(why)
