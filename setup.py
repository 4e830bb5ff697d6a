"""Build script: pure Python everywhere; adds the CUDA backend (lmfused._C) when a CUDA torch and a CUDA
toolkit exist.

``pip install --no-build-isolation -e .`` uses the torch already installed and never replaces it. The CUDA
toolkit is $CUDA_HOME, else the folder the nvcc on PATH really runs from (see
``lmfused._cuda_build.find_cuda_home``). The extension is optional: when it cannot be built, or its build
fails, the install goes on as pure Python (Triton and reference backends), says why on stderr (``pip -v``
shows it) and leaves the reason in ``lmfused/_C_build_failure.txt`` for ``python -m lmfused.info``; on a GPU
machine the run-time JIT build tries again. Set LMFUSED_NO_CUDA_BUILD=1 to skip the extension;
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import __version__ as setuptools_version
from setuptools import setup

ROOT = Path(__file__).resolve().parent
LICENSE = "BSD-3-Clause"
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


def _license_kwargs() -> dict:
    """BSD-3-Clause as an SPDX expression where setuptools knows them (>= 77, which deprecates the licence
    table of pyproject.toml), else as the free-text licence older ones take."""
    major = int(setuptools_version.split(".")[0])
    return {"license_expression": LICENSE} if major >= 77 else {"license": LICENSE}


def _say(message: str) -> None:
    print(f"lmfused: {message}", file=sys.stderr, flush=True)


def _extension_kwargs() -> dict:
    """setup() arguments for the CUDA extension, or {} (pure Python) with the reason printed."""
    if os.environ.get("LMFUSED_NO_CUDA_BUILD") == "1":
        _say("LMFUSED_NO_CUDA_BUILD=1, installing pure Python (triton/reference backends)")
        return {}
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken torch install
        _say(f"torch is not importable at build time ({type(exc).__name__}), installing pure Python")
        return {}
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU build, installing pure Python (triton/reference backends)")
        return {}
    try:
        helpers = _cuda_build_helpers()
        cuda_home, how = helpers.find_cuda_home()
        if cuda_home is None:
            _say(f"not building the CUDA backend: {how}; installing pure Python (triton/reference backends)")
            return {}
        # torch.utils.cpp_extension reads CUDA_HOME when imported; its own guess (the parent of the nvcc
        # on PATH) is wrong behind a wrapper script.
        os.environ["CUDA_HOME"] = cuda_home
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", helpers.DEFAULT_ARCH_LIST)
        extension = cpp_extension.CUDAExtension(
            name="lmfused._C",
            sources=[os.path.relpath(s, ROOT) for s in helpers.cuda_extension_sources(ROOT)],
            extra_compile_args=helpers.extension_compile_args(),
            extra_link_args=helpers.EXTENSION_LINK_ARGS,
        )
        build_ext = helpers.optional_build_extension(
            cpp_extension.BuildExtension.with_options(use_ninja=True)
        )
    except Exception as exc:  # never let the optional backend abort the install
        _say(f"not building the CUDA backend ({type(exc).__name__}: {exc}); installing pure Python")
        return {}
    _say(
        f"building lmfused._C with the CUDA toolkit {cuda_home} (found as {how}) for "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (minutes; LMFUSED_NO_CUDA_BUILD=1 skips)"
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": build_ext}}


setup(
    packages=PACKAGES,
    package_dir={"lmfused.triton_kernels": "triton_kernels"},
    **_license_kwargs(),
    **_extension_kwargs(),
)
