"""Find, build and load the hand-written CUDA backend (``lmfused._C``, sources in ``csrc/``).

The kernels implement the LM step of Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks*
(ICML 2018). ``lmfused._C`` is built ahead of time by ``setup.py`` when a CUDA torch and a CUDA toolkit
are present; otherwise (or when that build failed), on a GPU machine with a toolkit and a source checkout,
:func:`load_cuda_extension` JIT-builds the same sources with ``torch.utils.cpp_extension.load`` into a
per-version cache.

The toolkit is found as :func:`find_cuda_home` says: $CUDA_HOME (or $CUDA_PATH), else the folder the
``nvcc`` on PATH really runs from (asked of nvcc itself, so a wrapper script or a symlink in ``/usr/bin``
leads to the real toolkit, where torch's own guess takes the wrapper's parent folder), else
``/usr/local/cuda``; a toolkit counts only if it has ``bin/nvcc`` and ``include/cuda_runtime.h``.

setup.py imports this file by path before the package is installed, so at top level it imports only
the standard library and torch.

Environment variables:
    LMFUSED_NO_JIT=1              never JIT-build (use the prebuilt ``lmfused._C`` or nothing)
    LMFUSED_CACHE_DIR             JIT build cache root (default ``~/.cache/lmfused``)
    LMFUSED_VERBOSE_BUILD=1       show the compiler output of the JIT build
    LMFUSED_FORCE_JIT=1           ignore a prebuilt ``lmfused._C`` and JIT-build (to test that path)
    LMFUSED_CLEAR_STALE_LOCK=1    delete a JIT build ``lock`` file left behind by a killed build
    TORCH_CUDA_ARCH_LIST          archs to build for (setup.py default: ``8.0;9.0``;
                                  JIT default: the archs of the visible GPUs)
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "BUILD_FAILURE_NOTE",
    "DEFAULT_ARCH_LIST",
    "EXTENSION_LINK_ARGS",
    "cuda_extension_sources",
    "cuda_toolkit_problem",
    "cuda_unavailable_reason",
    "default_arch_flags",
    "extension_compile_args",
    "find_cuda_home",
    "install_build_failure",
    "load_cuda_extension",
    "nvcc_toolkit_root",
    "optional_build_extension",
]

DEFAULT_ARCH_LIST = "8.0;9.0"  # A100, H100
JIT_MODULE_NAME = "lmfused_C_jit"
STALE_LOCK_SECONDS = 600.0  # a JIT build takes minutes; a lock this old was left by a killed build

# Order matters only for readability; the binding is the one torch-aware file.
_SOURCE_NAMES = (
    "lm_step.cu",
    "lm_step_f32.cu",
    "lm_step_f16.cu",
    "lm_step_bf16.cu",
    "lm_step_f64.cu",
    "batch_norm_lm_step.cu",
    "batch_norm_lm_step_f32.cu",
    "batch_norm_lm_step_f16.cu",
    "batch_norm_lm_step_bf16.cu",
    "batch_norm_lm_step_f64.cu",
    "lm_step_binding.cpp",
    "batch_norm_lm_step_binding.cpp",
    "launch_plan.cpp",
)

# Written next to the package by setup.py when the ahead-of-time build of lmfused._C failed (the install
# itself goes on, pure Python): what failed, for `python -m lmfused.info` and the backend's reason.
BUILD_FAILURE_NOTE = "_C_build_failure.txt"
_NVCC_TIMEOUT_S = 30.0

_lock = threading.Lock()
_attempted = False
_module: ModuleType | None = None
_reason: str | None = "the CUDA extension has not been loaded yet"


# --------------------------------------------------------------------------------------------------
# Finding the CUDA toolkit (shared by setup.py, the JIT build and lmfused.info)
# --------------------------------------------------------------------------------------------------


def cuda_toolkit_problem(cuda_home: str | os.PathLike[str]) -> str | None:
    """Why ``cuda_home`` cannot build the extension (no ``bin/nvcc`` or no ``include/cuda_runtime.h``),
    or None if it has both."""
    home = Path(cuda_home)
    if not home.is_dir():
        return f"{home} is not a folder"
    if not (home / "bin" / "nvcc").is_file():
        return f"{home} has no bin/nvcc"
    if not (home / "include" / "cuda_runtime.h").is_file():
        return f"{home} has no include/cuda_runtime.h (the CUDA runtime headers)"
    return None


def nvcc_toolkit_root(nvcc: str | os.PathLike[str], timeout: float = _NVCC_TIMEOUT_S) -> str | None:
    """The toolkit folder ``nvcc`` really runs from, or None if it cannot be told.

    Asks nvcc itself: ``nvcc -v --dryrun`` prints the variables of its configuration, among them
    ``TOP``, the toolkit root, without compiling anything. That sees through wrapper scripts that exec
    the real nvcc, which the file's own location (torch's guess) does not. Falls back to the resolved
    symlink's grandparent when nvcc prints no ``TOP``.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="lmfused-nvcc-") as scratch:
            result = subprocess.run(
                [str(nvcc), "-v", "--dryrun", "-c", "probe.cu", "-o", "probe.o"],
                cwd=scratch,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        output = result.stdout + "\n" + result.stderr
    except (OSError, subprocess.SubprocessError):
        output = ""
    for line in output.splitlines():
        match = re.match(r"^#\$\s*TOP=(.+?)\s*$", line)
        if match:
            return os.path.normpath(match.group(1).strip().strip('"'))
    real = Path(nvcc).resolve()
    if real.parent.name == "bin" and output:  # it ran, but printed no TOP: trust its real location
        return str(real.parent.parent)
    return None


def find_cuda_home(
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    default: str = "/usr/local/cuda",
) -> tuple[str | None, str]:
    """The CUDA toolkit to build with: ``(folder, how it was found)``, or ``(None, why none)``.

    Looked for, in this order: ``$CUDA_HOME`` (or ``$CUDA_PATH``), which is used as given (a broken one is
    reported, not silently replaced by another toolkit); the folder the ``nvcc`` on PATH really runs from
    (:func:`nvcc_toolkit_root`); ``default``. Each candidate must pass :func:`cuda_toolkit_problem`.
    """
    environ = os.environ if environ is None else environ
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = environ.get(variable)
        if value:
            problem = cuda_toolkit_problem(value)
            if problem is not None:
                return None, f"${variable}={value} is not a usable CUDA toolkit: {problem}"
            return os.path.normpath(value), f"${variable}"
    tried = []
    nvcc = which("nvcc")
    if nvcc is not None:
        root = nvcc_toolkit_root(nvcc)
        if root is None:
            tried.append(f"nvcc at {nvcc} did not say where its toolkit is (nvcc -v --dryrun)")
        else:
            problem = cuda_toolkit_problem(root)
            if problem is None:
                return root, f"the nvcc on PATH ({nvcc})"
            tried.append(f"the nvcc on PATH ({nvcc}) runs from {root}, but {problem}")
    else:
        tried.append("no nvcc on PATH")
    if default and Path(default).exists():
        problem = cuda_toolkit_problem(default)
        if problem is None:
            return os.path.normpath(default), f"the default location {default}"
        tried.append(problem)
    return None, "no CUDA toolkit found (set CUDA_HOME): " + "; ".join(tried)


def install_build_failure(package_dir: str | os.PathLike[str] | None = None) -> str | None:
    """What setup.py recorded when the ahead-of-time build of ``lmfused._C`` failed, or None."""
    folder = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    try:
        return (folder / BUILD_FAILURE_NOTE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def optional_build_extension(base: type, note_name: str = BUILD_FAILURE_NOTE) -> type:
    """``base`` (a setuptools ``build_ext``, e.g. torch's ``BuildExtension``) made optional, for setup.py.

    When building fails, the install goes on without the extensions (pure Python): the reason goes to stderr
    and to ``note_name`` in the folder the extension would have gone to (read back by
    :func:`install_build_failure`); a successful build removes a stale note.
    """

    class OptionalBuildExtension(base):
        def run(self) -> None:
            note = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent / note_name
            try:
                super().run()
            except Exception as exc:  # compiler errors arrive as RuntimeError, CompileError, ...
                detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                print(
                    "lmfused: building the CUDA backend lmfused._C FAILED; installing pure Python "
                    "(Triton and reference backends) instead.\n"
                    f"lmfused:   reason: {detail} (the compiler output is above; pip shows it with -v)\n"
                    "lmfused:   On a GPU machine the JIT build tries again on first use "
                    "(LMFUSED_VERBOSE_BUILD=1 shows the compiler); LMFUSED_NO_CUDA_BUILD=1 skips this build.",
                    file=sys.stderr,
                    flush=True,
                )
                self.extensions = []
                try:
                    note.parent.mkdir(parents=True, exist_ok=True)
                    note.write_text(
                        f"{detail} (install-time build with CUDA_HOME={os.environ.get('CUDA_HOME')}; "
                        "pip install -v shows the compiler output)\n",
                        encoding="utf-8",
                    )
                except OSError:
                    pass
                return
            note.unlink(missing_ok=True)
            print("lmfused: built the CUDA backend lmfused._C", file=sys.stderr, flush=True)

        def get_outputs(self) -> list[str]:
            return super().get_outputs() if self.extensions else []

    OptionalBuildExtension.__name__ = OptionalBuildExtension.__qualname__ = f"Optional{base.__name__}"
    return OptionalBuildExtension


# --------------------------------------------------------------------------------------------------
# Build configuration (shared by setup.py and the JIT build)
# --------------------------------------------------------------------------------------------------


def cuda_extension_sources(root: str | os.PathLike[str]) -> list[str]:
    """Absolute paths of the extension's sources under ``root/csrc`` (``root``: the repo checkout).

    Raises FileNotFoundError naming the first missing file.
    """
    csrc = Path(root).resolve() / "csrc"
    paths = [csrc / name for name in _SOURCE_NAMES]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"lmfused CUDA source missing: {path}")
    return [str(path) for path in paths]


def _split_arch_list(arch_list: str) -> list[str]:
    """'8.0;9.0+PTX' or '8.0 9.0' -> ['8.0', '9.0+PTX'] (torch's TORCH_CUDA_ARCH_LIST syntax)."""
    return [a for a in re.split(r"[;\s,]+", arch_list.strip()) if a]


def default_arch_flags(arch_list: str | None = None) -> list[str]:
    """nvcc ``-gencode`` flags for ``arch_list`` (default: $TORCH_CUDA_ARCH_LIST, else 8.0;9.0).

    ``X.Y`` gives SASS for sm_XY; ``X.Y+PTX`` also embeds PTX so newer GPUs can JIT it.
    """
    archs = _split_arch_list(arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST)
    flags = []
    for arch in archs:
        number = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _archs_define(arch_list: str) -> str:
    """-D flag recording the requested archs for build_info(); commas, not ';', so it survives the shell."""
    return "-DLMFUSED_CUDA_ARCHS=" + ",".join(_split_arch_list(arch_list))


# The C++ runtime the process already has (libstdc++.so), named explicitly after the objects, so that it
# resolves every C++ runtime symbol before the compiler driver's own implicit one is reached. Linked
# statically instead (g++ -static-libstdc++, from LDFLAGS or a compiler's defaults), _C carries a copy of its
# own whose stream and locale state the process never sets up: built that way here, an argument error's
# message stopped at its first number; the H200 build whose argument error ended the process with SIGSEGV
# crashed in such a copy's std::ostream::_M_insert<long> (tests/test_cuda_binding_errors.py).
EXTENSION_LINK_ARGS = ["-lstdc++"]


def extension_compile_args(arch_list: str | None = None) -> dict[str, list[str]]:
    """``extra_compile_args`` for ``CUDAExtension`` (keys ``cxx`` and ``nvcc``).

    No ``--use_fast_math``: the kernels choose their fast intrinsics where they are accurate enough (the
    noise's sin/cos); the noise matches the Triton backend's in distribution, not bit for bit. No ``-std``
    flag: torch picks the standard its headers need, and the sources build as C++17 and C++20. ``-g0``
    for the bindings: Python's own flags (setuptools) add ``-g``, debug information for every torch header
    they include, a quarter of their compile time and 20 MB per object.
    """
    archs = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    return {"cxx": ["-O3", "-g0", _archs_define(archs)], "nvcc": ["-O3"]}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _source_root() -> Path | None:
    """The checkout holding ``csrc/`` next to this package (repo checkout or editable install)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "csrc" / _SOURCE_NAMES[0]).is_file() else None


def _jit_arch_list() -> str:
    """What torch's JIT build compiles for: $TORCH_CUDA_ARCH_LIST, else every visible GPU's arch."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _build_directory(arch_list: str) -> Path:
    base = Path(os.environ.get("LMFUSED_CACHE_DIR") or Path.home() / ".cache" / "lmfused")
    tag = f"{torch.__version__}_cuda{torch.version.cuda}_{'-'.join(_split_arch_list(arch_list))}"
    return base / re.sub(r"[^A-Za-z0-9._+-]", "_", tag)


def _check_stale_lock(build_dir: Path) -> str | None:
    """torch waits forever on a leftover ``lock`` file: clear it (if allowed) or say which to delete."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if age < STALE_LOCK_SECONDS:
        return None  # probably a concurrent build; torch waits for it
    if os.environ.get("LMFUSED_CLEAR_STALE_LOCK") == "1":
        lock.unlink(missing_ok=True)
        return None
    return (
        f"the JIT build lock {lock} is {age / 60:.0f} minutes old, probably left by a killed build; "
        "delete it (or set LMFUSED_CLEAR_STALE_LOCK=1) and retry"
    )


def _import_prebuilt() -> tuple[ModuleType | None, str]:
    if os.environ.get("LMFUSED_FORCE_JIT") == "1":
        return None, "prebuilt lmfused._C ignored (LMFUSED_FORCE_JIT=1)"
    try:
        return importlib.import_module("lmfused._C"), ""
    except ModuleNotFoundError as exc:
        if exc.name not in ("lmfused._C", "lmfused"):
            return None, f"lmfused._C failed to import: {exc}"
        failure = install_build_failure()
        if failure is not None:
            first_line = failure.splitlines()[0]
            return None, f"lmfused._C is not built: the build at install time failed ({first_line})"
        return None, "lmfused._C is not built (install with a CUDA torch and a CUDA toolkit present)"
    except (ImportError, OSError) as exc:  # e.g. built against another torch: undefined symbols
        return None, f"lmfused._C failed to import: {exc}"


def _jit_build() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("LMFUSED_NO_JIT") == "1":
        return None, "JIT build disabled by LMFUSED_NO_JIT=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return None, "no CUDA device (torch.cuda.is_available() is False)"
    from torch.utils import cpp_extension  # heavy; only when a build is possible

    cuda_home, how = find_cuda_home()
    if cuda_home is None:
        return None, f"no CUDA toolkit for the JIT build: {how}"
    if cpp_extension.CUDA_HOME != cuda_home:
        # torch guessed from the nvcc on PATH's own folder (wrong behind a wrapper): use the real toolkit.
        cpp_extension.CUDA_HOME = cuda_home
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (needed for the JIT build: pip install ninja)"
    root = _source_root()
    if root is None:
        return None, "the csrc/ sources are not next to the package (JIT needs a source checkout)"
    sources = cuda_extension_sources(root)
    arch_list = _jit_arch_list()
    build_dir = _build_directory(arch_list)
    build_dir.mkdir(parents=True, exist_ok=True)
    stale = _check_stale_lock(build_dir)
    if stale is not None:
        return None, stale
    args = extension_compile_args(arch_list)
    try:
        module = cpp_extension.load(
            name=JIT_MODULE_NAME,
            sources=sources,
            extra_cflags=args["cxx"],
            extra_cuda_cflags=args["nvcc"],
            extra_ldflags=EXTENSION_LINK_ARGS,
            build_directory=str(build_dir),
            with_cuda=True,
            verbose=os.environ.get("LMFUSED_VERBOSE_BUILD") == "1",
        )
    except Exception as exc:  # compiler errors arrive as RuntimeError/subprocess errors
        return None, (
            f"JIT build in {build_dir} failed: {type(exc).__name__}: {exc} "
            "(LMFUSED_VERBOSE_BUILD=1 shows the compiler output)"
        )
    return module, None


def load_cuda_extension() -> ModuleType | None:
    """The CUDA backend module (prebuilt ``lmfused._C``, else a JIT build), or None if unavailable.

    Importing it registers the CUDA kernels of ``lmfused::lm_step_cuda`` and
    ``lmfused::lm_step_cuda_backward``. Never raises; the result (and the reason for a None, see
    :func:`cuda_unavailable_reason`) is cached for the process.
    """
    global _attempted, _module, _reason
    with _lock:
        if _attempted:
            return _module
        _attempted = True
        try:
            module, prebuilt_reason = _import_prebuilt()
            if module is not None:
                _module, _reason = module, None
                return _module
            module, jit_reason = _jit_build()
            _module = module
            _reason = None if module is not None else f"{prebuilt_reason}; {jit_reason}"
        except Exception as exc:  # never let the optional backend break the import of lmfused
            _module, _reason = None, f"loading the CUDA extension failed: {type(exc).__name__}: {exc}"
        return _module


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA backend cannot be used (None if it can). Tries to load it first if not yet done."""
    load_cuda_extension()
    return _reason
