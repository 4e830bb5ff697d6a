"""Installing lmfused: finding the CUDA toolkit; a failed optional CUDA build leaves a pure-Python install.

The toolkits here are fakes in tmp_path: a folder with ``bin/nvcc`` (a shell script answering
``nvcc -v --dryrun`` the way the real one does) and ``include/cuda_runtime.h``, reached through a wrapper
script on PATH the way some machines install nvcc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmfused import _cuda_build, info
from lmfused._cuda_build import (
    cuda_toolkit_problem,
    find_cuda_home,
    install_build_failure,
    nvcc_toolkit_root,
)
from tests.conftest import import_or_skip

needs_sh = pytest.mark.skipif(sys.platform == "win32", reason="fake nvcc scripts are shell scripts")


def fake_toolkit(root: Path, *, header: bool = True, prints_top: bool = True) -> Path:
    """A CUDA toolkit lookalike: bin/nvcc printing ``#$ TOP=root/bin/..`` for -v --dryrun, the header."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    top = f'echo "#\\$ TOP={root}/bin/.." >&2' if prints_top else "true"
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\n{top}\necho '#$ _HERE_=somewhere' >&2\nexit 0\n")
    nvcc.chmod(0o755)
    if header:
        (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    return root


def wrapper(folder: Path, target: Path) -> Path:
    """A shell script ``folder/nvcc`` exec-ing ``target`` (not a symlink: nothing resolves it)."""
    folder.mkdir(parents=True)
    script = folder / "nvcc"
    script.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
    script.chmod(0o755)
    return script


@needs_sh
def test_the_real_toolkit_behind_an_nvcc_wrapper(tmp_path):
    """torch guesses the wrapper's parent's parent (tmp_path/usr); the toolkit is where nvcc runs from."""
    real = fake_toolkit(tmp_path / "cuda-13.0")
    nvcc = wrapper(tmp_path / "usr" / "bin", real / "bin" / "nvcc")
    assert nvcc_toolkit_root(nvcc) == str(real)
    home, how = find_cuda_home({}, which=lambda name: str(nvcc), default="")
    assert home == str(real) and "PATH" in how
    assert cuda_toolkit_problem(tmp_path / "usr") is not None  # what torch would have used


@needs_sh
def test_cuda_home_comes_first_and_is_checked(tmp_path):
    other = fake_toolkit(tmp_path / "other")
    nvcc = str(fake_toolkit(tmp_path / "onpath") / "bin" / "nvcc")
    assert find_cuda_home({"CUDA_HOME": str(other)}, which=lambda name: nvcc)[0] == str(other)
    assert find_cuda_home({"CUDA_PATH": str(other)}, which=lambda name: nvcc)[0] == str(other)
    broken = fake_toolkit(tmp_path / "broken", header=False)
    home, why = find_cuda_home({"CUDA_HOME": str(broken)}, which=lambda name: nvcc)
    assert home is None and "CUDA_HOME" in why and "cuda_runtime.h" in why  # not silently another toolkit


@needs_sh
def test_a_toolkit_without_the_runtime_headers_is_no_toolkit(tmp_path):
    headless = fake_toolkit(tmp_path / "headless", header=False)
    home, why = find_cuda_home({}, which=lambda name: str(headless / "bin" / "nvcc"), default="")
    assert home is None and "include/cuda_runtime.h" in why
    assert find_cuda_home({}, which=lambda name: None, default="") == (
        None,
        "no CUDA toolkit found (set CUDA_HOME): no nvcc on PATH",
    )
    assert find_cuda_home({}, which=lambda name: None, default=str(fake_toolkit(tmp_path / "dflt")))[0] == (
        str(tmp_path / "dflt")
    )


@needs_sh
def test_nvcc_without_top_falls_back_to_its_resolved_location(tmp_path):
    real = fake_toolkit(tmp_path / "quiet", prints_top=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    assert nvcc_toolkit_root(tmp_path / "bin" / "nvcc") == str(real)
    assert nvcc_toolkit_root(tmp_path / "no-such-nvcc") is None


@needs_sh
def test_info_reports_the_toolkit_lmfused_uses(tmp_path, monkeypatch):
    real = fake_toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(real))
    assert info._cuda_home_line().startswith(f"{real} (from $CUDA_HOME)")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert info._cuda_home_line().startswith("none: $CUDA_HOME=")


def test_the_jit_build_uses_the_toolkit_found(monkeypatch):
    """Without a usable toolkit the JIT build says why instead of trusting torch's guess."""
    monkeypatch.setattr(_cuda_build.torch.version, "cuda", "13.0")
    monkeypatch.setattr(_cuda_build.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_cuda_build, "find_cuda_home", lambda: (None, "no CUDA toolkit found (test)"))
    monkeypatch.delenv("LMFUSED_NO_JIT", raising=False)
    module, why = _cuda_build._jit_build()
    assert module is None and "no CUDA toolkit found (test)" in why


SETUP = """
import sys
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, {lmfused_root!r})
from lmfused._cuda_build import optional_build_extension

setup(
    name="broken_ext_demo",
    version="0",
    packages=["demo"],
    ext_modules=[Extension("demo._C", ["demo/ext.c"])],
    cmdclass={{"build_ext": optional_build_extension(build_ext)}},
)
"""


def _build_in_place(folder: Path, env: dict) -> subprocess.CompletedProcess:
    """``python setup.py build_ext --inplace`` in ``folder``."""
    command = [sys.executable, "setup.py", "build_ext", "--inplace"]
    return subprocess.run(
        command, cwd=folder, capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_a_failed_extension_build_leaves_a_working_install(tmp_path):
    """A real setuptools build of an extension that does not compile: exit 0, the reason on stderr and in
    the note next to the package, and the package still importable."""
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "__init__.py").write_text("VALUE = 42\n")
    (tmp_path / "demo" / "ext.c").write_text('#error "deliberately broken"\n')
    root = str(Path(_cuda_build.__file__).resolve().parent.parent)
    (tmp_path / "setup.py").write_text(textwrap.dedent(SETUP.format(lmfused_root=root)))
    env = {**os.environ, "PYTHONPATH": ""}
    result = _build_in_place(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert "FAILED; installing pure Python" in result.stderr
    failure = install_build_failure(tmp_path / "demo")
    assert failure is not None and "install-time build" in failure
    assert not list((tmp_path / "demo").glob("_C*.so"))
    check = [sys.executable, "-c", "import demo; print(demo.VALUE)"]
    assert subprocess.run(check, cwd=tmp_path, capture_output=True, text=True).stdout.strip() == "42"
    # A build that works removes the stale note.
    (tmp_path / "demo" / "ext.c").write_text(
        textwrap.dedent(
            """
            #define PY_SSIZE_T_CLEAN
            #include <Python.h>
            static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL};
            PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&def); }
            """
        )
    )
    result = _build_in_place(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert install_build_failure(tmp_path / "demo") is None


def test_the_package_metadata_builds_without_deprecated_fields(tmp_path):
    """The installed setuptools builds lmfused's metadata with no deprecation warning (setuptools >= 77
    deprecates pyproject.toml's licence table, and a later one drops it) and with the licence, as an SPDX
    expression where setuptools knows them."""
    import setuptools

    root = Path(_cuda_build.__file__).resolve().parent.parent
    skip = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    for name in ("lmfused", "triton_kernels"):
        shutil.copytree(root / name, tmp_path / name, ignore=skip)
    (tmp_path / "metadata").mkdir()
    build = "import setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel('metadata'))"
    env = {**os.environ, "LMFUSED_NO_CUDA_BUILD": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", build], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "DeprecationWarning" not in result.stdout + result.stderr, result.stderr
    metadata = (tmp_path / "metadata" / result.stdout.split()[-1] / "METADATA").read_text()
    spdx = int(setuptools.__version__.split(".")[0]) >= 77
    assert ("License-Expression: BSD-3-Clause" if spdx else "License: BSD-3-Clause") in metadata.splitlines()


def test_the_backend_reason_names_a_failed_install_build(tmp_path, monkeypatch):
    (tmp_path / _cuda_build.BUILD_FAILURE_NOTE).write_text("RuntimeError: Error compiling objects\n")
    monkeypatch.setattr(
        _cuda_build, "install_build_failure", lambda: install_build_failure(tmp_path), raising=True
    )
    monkeypatch.setattr(_cuda_build.importlib, "import_module", _no_c_module)
    monkeypatch.delenv("LMFUSED_FORCE_JIT", raising=False)
    module, why = _cuda_build._import_prebuilt()
    assert module is None and "build at install time failed" in why and "Error compiling" in why


def _no_c_module(name: str):
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


# ----------------------------------------------------------------------------------------------------------
# Optional libraries in the tests: a broken import skips (or fails where required), never errors
# ----------------------------------------------------------------------------------------------------------


def test_a_library_that_raises_at_import_skips(tmp_path, monkeypatch):
    """A torchvision built for another torch raises RuntimeError at import: a skip, not a failure."""
    broken = "raise RuntimeError('operator torchvision::nms does not exist')\n"
    (tmp_path / "brokenlib_demo.py").write_text(broken)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LMFUSED_REQUIRE_LIBS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="RuntimeError: operator torchvision::nms"):
        import_or_skip("brokenlib_demo")
    with pytest.raises(pytest.skip.Exception, match="ModuleNotFoundError"):
        import_or_skip("no_such_library_demo.models")
    assert import_or_skip("json").dumps([]) == "[]"


def test_a_required_library_fails_instead_of_skipping(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFUSED_REQUIRE_LIBS", "torchvision, no_such_library_demo")
    with pytest.raises(pytest.fail.Exception, match="LMFUSED_REQUIRE_LIBS"):
        import_or_skip("no_such_library_demo.models")
    with pytest.raises(pytest.skip.Exception):
        import_or_skip("another_missing_library_demo")
