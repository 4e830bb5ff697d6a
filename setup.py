"""Build script: pure Python everywhere; adds the CUDA backend (lmfused._C) when a CUDA torch and nvcc exist.

``pip install --no-build-isolation -e .`` uses the torch already installed and never replaces it.
Set LMFUSED_NO_CUDA_BUILD=1 to skip the extension; TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PACKAGES = [
    "lmfused",
    "lmfused.nn",
    "lmfused.models",
    "lmfused.analysis",
    "lmfused.train",
    "lmfused.triton_kernels",
]


def _cuda_build_helpers():
    """lmfused/_cuda_build.py, imported by path: the package itself is not installed yet."""
    spec = importlib.util.spec_from_file_location("_lmfused_cuda_build", ROOT / "lmfused" / "_cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_kwargs() -> dict:
    if os.environ.get("LMFUSED_NO_CUDA_BUILD") == "1":
        print("lmfused: LMFUSED_NO_CUDA_BUILD=1, installing pure Python (triton/reference backends)")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("lmfused: torch is not importable at build time, installing pure Python")
        return {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("lmfused: no CUDA torch or no nvcc, installing pure Python (triton/reference backends)")
        return {}
    helpers = _cuda_build_helpers()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", helpers.DEFAULT_ARCH_LIST)
    extension = CUDAExtension(
        name="lmfused._C",
        sources=[os.path.relpath(s, ROOT) for s in helpers.cuda_extension_sources(ROOT)],
        extra_compile_args=helpers.extension_compile_args(),
    )
    print(f"lmfused: building lmfused._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    build_ext = BuildExtension.with_options(use_ninja=True)
    return {"ext_modules": [extension], "cmdclass": {"build_ext": build_ext}}


setup(
    packages=PACKAGES,
    package_dir={"lmfused.triton_kernels": "triton_kernels"},
    **_extension_kwargs(),
)
