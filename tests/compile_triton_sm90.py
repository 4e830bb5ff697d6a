"""Compile Triton kernels for sm_90 (Hopper) without a GPU: what the interpreter never checks.

    python tests/compile_triton_sm90.py MODULE [KERNEL ...]      (default: every *_kernel of MODULE)

Runs the real compiler (Triton IR, LLVM, ptxas from the Triton wheel) on every kernel given, for these
variants of its boolean constexpr flags (block sizes and other integer constexprs fixed):

* all flags off and all on, with every pointer bf16, float32 or float64 (FP64 on with float64 only);
* each flag flipped alone from all off and from all on (bf16 pointers): every pair of flags then meets in
  all four on/off combinations, so mixed paths (RELU on with MASK_FROM_X off, ...) are compiled too.

Prints one line per variant and exits 1 if any fails to compile. Run it in a process without
TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Integer constexprs (block sizes, vector widths, loop counts); every other constexpr is a boolean flag.
BLOCKS = {"BLOCK_M": 16, "BLOCK_L": 256, "BLOCK": 1024, "VEC": 8, "ROW_ITERS": 2}


def _signature(kernel, pointer: str) -> dict[str, str]:
    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name == "seed_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = pointer
        elif "std" in name:
            signature[name] = "fp32"  # a Python float argument
        else:
            signature[name] = "i64"
    return signature


def variants(kernel) -> list[tuple[str, dict, dict]]:
    """(label, signature, constexprs) triples covering the kernel's flags and pointer dtypes."""
    names = {p.name for p in kernel.params}
    blocks = {k: v for k, v in BLOCKS.items() if k in names}
    # FP64 follows the pointers (float64 math on float32/bf16 pointers is not a variant that runs).
    flags = [p.name for p in kernel.params if p.is_constexpr and p.name not in BLOCKS and p.name != "FP64"]
    chosen: list[tuple[str, str, dict]] = []
    for pointer in ("*bf16", "*fp32", "*fp64"):
        for on in (False, True):
            chosen.append((f"flags={'on' if on else 'off'}", pointer, dict.fromkeys(flags, on)))
    for on in (False, True):
        for flag in flags:
            values = dict.fromkeys(flags, on)
            values[flag] = not on
            chosen.append((f"flags={'on' if on else 'off'}{'-' if on else '+'}{flag}", "*bf16", values))
    out, seen = [], set()
    for label, pointer, values in chosen:
        constexprs = {**blocks, **values}
        if "FP64" in names:
            constexprs["FP64"] = pointer == "*fp64"
        key = (pointer, tuple(sorted(constexprs.items())))
        if key not in seen:  # a kernel with one flag: its flips are the all-on and all-off variants
            seen.add(key)
            out.append((f"{label} {pointer}", _signature(kernel, pointer), constexprs))
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
        for variant, signature, constexprs in variants(kernel):
            label = f"{name} {variant}"
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
