"""Compile Triton kernels for sm_90 (Hopper) without a GPU: what the interpreter never checks.

    python tests/compile_triton_sm90.py MODULE [KERNEL ...]      (default: every *_kernel of MODULE)

Runs the real compiler (Triton IR, LLVM, ptxas from the Triton wheel) on every kernel given, for each
combination of: all its boolean constexpr flags off or on, each pointer bf16 or float32 (block sizes and
other integer constexprs fixed). Prints one line per variant and exits 1 if any fails to compile. Run it
in a process without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import importlib
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Integer constexprs (block sizes, vector widths, loop counts); every other constexpr is a boolean flag.
BLOCKS = {"BLOCK_M": 16, "BLOCK_L": 256, "BLOCK": 1024, "VEC": 8, "ROW_ITERS": 2}


def variants(kernel) -> list[tuple[dict, dict]]:
    """(signature, constexprs) pairs covering the kernel's flags and pointer dtypes."""
    flags = [p.name for p in kernel.params if p.is_constexpr and p.name not in BLOCKS]
    out = []
    for on, pointer in itertools.product((False, True), ("*bf16", "*fp32")):
        names = {p.name for p in kernel.params}
        signature, constexprs = {}, {k: v for k, v in BLOCKS.items() if k in names}
        for param in kernel.params:
            name = param.name
            if param.is_constexpr:
                signature[name] = "constexpr"
            elif name == "seed_ptr":
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = pointer
            elif "std" in name:
                signature[name] = "fp32"
            else:
                signature[name] = "i64"
        constexprs.update({flag: on for flag in flags})
        if "FP64" in constexprs:
            constexprs["FP64"] = False  # float64 math on float32/bf16 pointers is not a variant that runs
        out.append((signature, constexprs))
    return out


def main(argv: list[str]) -> int:
    module = importlib.import_module(argv[0])
    names = argv[1:] or sorted(
        name
        for name, value in vars(module).items()
        if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.JITFunction)
    )
    if not names:
        print(f"no Triton kernels in {argv[0]} (is TRITON_INTERPRET set?)")
        return 1
    failures = 0
    for name in names:
        kernel = getattr(module, name)
        for signature, constexprs in variants(kernel):
            flags_on = any(v is True for v in constexprs.values())
            pointer = next(v for k, v in signature.items() if k.endswith("_ptr") and k != "seed_ptr")
            label = f"{name} flags={'on' if flags_on else 'off'} {pointer}"
            try:
                source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
                assert "cubin" in compiled.asm, "no cubin"
                print(f"ok    {label}")
            except Exception as exc:  # noqa: BLE001 - report every variant, then fail
                failures += 1
                cause = exc
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                print(f"FAIL  {label}: {type(cause).__name__}: {str(cause).splitlines()[-1][:300]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
