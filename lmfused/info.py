"""``python -m lmfused.info``: versions, devices, available backends, and why any backend is missing.

Backends run the LM step of Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks* (ICML 2018).
Checking the ``cuda`` backend may JIT-build it on first use (minutes); set LMFUSED_NO_JIT=1 to skip.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable

import torch

__all__ = ["collect", "main"]

_BACKENDS = ("cuda", "triton", "reference")


def _triton_version() -> tuple[str | None, str | None]:
    """(version, None) if triton imports, else (None, why not)."""
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"not importable ({type(exc).__name__}: {exc})"
    return str(getattr(triton, "__version__", "unknown")), None


def _fallback_reason(name: str, device_type: str) -> str | None:
    """Why ``name`` cannot run on ``device_type`` tensors, for when lmfused.ops does not say."""
    if name == "reference":
        return None
    if name == "triton":
        _, missing = _triton_version()
        if missing:
            return f"triton is {missing}"
        if device_type == "cuda":
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"no GPU for {device_type} tensors and TRITON_INTERPRET is not set to 1"
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend needs CUDA tensors ({device_type} given)"
        from lmfused._cuda_build import cuda_unavailable_reason

        return cuda_unavailable_reason()
    return f"unknown backend {name!r}"


def _reason_function() -> Callable[[str, str], str | None]:
    try:
        from lmfused.op_support import backend_unavailable_reason

        return backend_unavailable_reason
    except Exception:  # the ops module is missing or broken: compute the reasons here
        return _fallback_reason


def _available(device_type: str) -> list[str]:
    try:
        import lmfused

        return list(lmfused.available_backends(device_type))
    except Exception:
        reason = _reason_function()
        return [b for b in _BACKENDS if reason(b, device_type) is None]


def _cuda_home_line() -> str:
    """The CUDA toolkit lmfused builds with and how it was found (plus torch's guess when it differs)."""
    from lmfused._cuda_build import find_cuda_home

    try:
        cuda_home, how = find_cuda_home()
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"
    line = f"{cuda_home} (from {how})" if cuda_home else f"none: {how}"
    if torch.version.cuda is not None:
        import logging

        # torch logs a warning when it guesses CUDA_HOME on a machine without a GPU; not news here.
        cpp_logger = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_logger.level
        cpp_logger.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import CUDA_HOME as torch_guess
        except Exception:
            torch_guess = None
        finally:
            cpp_logger.setLevel(level)
        if torch_guess and cuda_home and os.path.normpath(torch_guess) != cuda_home:
            line += f"; torch's own guess {torch_guess} is not used"
    return line


def collect() -> dict[str, object]:
    """Everything ``main`` prints, as a dict (for bug reports and benchmark stamps)."""
    triton_version, triton_missing = _triton_version()
    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version or f"missing: {triton_missing}",
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            info["gpus"].append(f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    info["cuda_home"] = _cuda_home_line()

    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["available_backends"] = {d: _available(d) for d in device_types}
    reason = _reason_function()
    info["missing_backends"] = {
        f"{b} ({d})": reason(b, d) for d in device_types for b in _BACKENDS if reason(b, d) is not None
    }

    from lmfused._cuda_build import load_cuda_extension

    ext = load_cuda_extension()
    if ext is None:
        from lmfused._cuda_build import cuda_unavailable_reason

        info["cuda_extension"] = None
        info["cuda_extension_reason"] = cuda_unavailable_reason()
    else:
        build = ext.build_info() if hasattr(ext, "build_info") else {}
        info["cuda_extension"] = {"module": ext.__name__, **dict(build)}
    from lmfused._cuda_build import install_build_failure

    failure = install_build_failure()
    info["install_build_failure"] = " ".join(failure.split()) if failure else None
    return info


def main() -> None:
    """Print :func:`collect` as aligned ``key: value`` lines."""
    if os.environ.get("LMFUSED_NO_JIT") != "1" and torch.cuda.is_available():
        print("(checking the cuda backend; a first run may JIT-build it, LMFUSED_NO_JIT=1 skips)", flush=True)
    info = collect()
    width = 20
    for key in ("python", "platform", "torch", "torch_cuda", "triton", "cuda_available", "cuda_home"):
        print(f"{key + ':':<{width}}{info[key]}")
    print(f"{'gpus:':<{width}}{', '.join(info['gpus']) or 'none'}")  # type: ignore[arg-type]
    for device, names in info["available_backends"].items():  # type: ignore[union-attr]
        print(f"{'backends (' + device + '):':<{width}}{', '.join(names)}")
    ext = info["cuda_extension"]
    if ext:
        built = ", ".join(f"{k}={v}" for k, v in ext.items())  # type: ignore[union-attr]
        print(f"{'cuda extension:':<{width}}{built}")
    else:
        print(f"{'cuda extension:':<{width}}not loaded: {info['cuda_extension_reason']}")
    if info["install_build_failure"]:
        print(f"{'install build:':<{width}}failed: {info['install_build_failure']}")
    for name, why in info["missing_backends"].items():  # type: ignore[union-attr]
        print(f"{'missing:':<{width}}{name}: {why}")


if __name__ == "__main__":
    main()
