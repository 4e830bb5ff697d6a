"""Compile Triton kernels for sm_90 (Hopper) without a GPU: what the interpreter never checks.

    python tests/compile_triton_sm90.py MODULE [KERNEL ...]      (default: every *_kernel of MODULE)
    python tests/compile_triton_sm90.py --check-pre-activation     (issue 19 item 1, see below)

Runs the real compiler (Triton IR, LLVM, ptxas from the Triton wheel) on every kernel given, for these
variants of its boolean constexpr flags (block sizes and other integer constexprs fixed):

* all flags off and all on, with every pointer bf16, float32 or float64 (FP64 on with float64 only);
* each flag flipped alone from all off and from all on (bf16 pointers): every pair of flags then meets in
  all four on/off combinations, so mixed paths (RELU on with MASK_FROM_X off, ...) are compiled too.

Prints one line per variant and exits 1 if any fails to compile. Run it in a process without
TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).

--check-pre-activation: the batch-norm forward and the two backward passes that recompute the ReLU's mask
(the no-state mode) must compute the pre-activation by the same instruction sequence, or the recomputed mask
can disagree with the forward's output. For every flag combination that touches it (weight, bias, scale;
both layouts; bf16, fp16, fp32) it reads each kernel's sm_90 PTX, takes the value every float comparison
against a constant tests (the forward's ReLU, the backward's rounded sign), follows its definitions back to
the loaded values, and writes the expression tree (opcodes with their rounding modifiers; commutative
operands sorted, as IEEE addition and multiplication commute exactly). The three kernels' sets of trees
must be equal, and no tree may hold a plain mul.f32 feeding a plain add/sub.f32 (a pair ptxas may contract
into an FFMA in one kernel and not in another). Exits 1 otherwise.
"""

from __future__ import annotations

import importlib
import itertools
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Integer constexprs (block sizes, vector widths, loop counts); every other constexpr is a boolean flag.
BLOCKS = {
    "BLOCK_M": 8, "BLOCK_L": 256, "BLOCK_A": 8, "BLOCK_B": 256, "BLOCK_C": 256, "MERGE_ROWS": 16,
    "BLOCK": 1024, "VEC": 8, "ROW_ITERS": 2,
}  # fmt: skip
# Pointers that are not activations: per-channel and per-sample vectors (float32, or float64 with float64
# activations), the mask, ticket counters, the noise seed.
VECTOR_POINTERS = {
    "mean_ptr", "invstd_ptr", "weight_ptr", "bias_ptr", "k_ptr", "scale_ptr", "partial_ptr",
    "running_mean_ptr", "running_var_ptr", "sum_dy_ptr", "sum_dy_xhat_ptr", "grad_k_ptr", "shift_ptr",
}  # fmt: skip
OTHER_POINTERS = {"seed_ptr": "*i64", "mask_ptr": "*u8", "counter_ptr": "*i32"}


def _signature(kernel, pointer: str) -> dict[str, str]:
    signature = {}
    vector = "*fp64" if pointer == "*fp64" else "*fp32"
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in OTHER_POINTERS:
            signature[name] = OTHER_POINTERS[name]
        elif name in VECTOR_POINTERS:
            signature[name] = vector
        elif name.endswith("_ptr"):
            signature[name] = pointer
        elif name in ("noise_std", "momentum", "eps"):
            signature[name] = "fp32"  # a Python float argument
        else:
            signature[name] = "i64"
    return signature


def compile_variant(kernel, pointer: str, flags: dict, blocks: dict | None = None, num_warps: int = 4):
    """Compile ``kernel`` for sm_90 with ``pointer`` activations, ``flags`` (others off) and ``blocks``."""
    names = {p.name for p in kernel.params}
    constexprs = {k: v for k, v in {**BLOCKS, **(blocks or {})}.items() if k in names}
    constexprs.update({p.name: False for p in kernel.params if p.is_constexpr and p.name not in constexprs})
    constexprs.update(flags)
    if "FP64" in names:
        constexprs["FP64"] = pointer == "*fp64"
    source = ASTSource(fn=kernel, signature=_signature(kernel, pointer), constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


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


_INSTRUCTION = re.compile(r"^\s*(?:@%\w+\s+)?([a-z][\w.]*)\s+([^;]*);")
_ARITHMETIC = re.compile(r"^(add|sub|mul|fma|neg|div|abs|min|max)(\.[a-z0-9]+)*\.f(32|64)$")
_COMMUTATIVE = ("add", "mul", "fma", "min", "max")


def _definitions(ptx: str) -> tuple[dict[str, tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """(register -> (opcode, operands)) of single-destination instructions, and every instruction."""
    defs, instructions = {}, []
    for line in ptx.splitlines():
        match = _INSTRUCTION.match(line)
        if not match or match.group(1).startswith((".", "//")):
            continue
        opcode, operands = match.group(1), [o.strip() for o in match.group(2).split(",")]
        instructions.append((opcode, operands))
        if operands and operands[0].startswith("%") and not opcode.startswith(("st.", "setp")):
            defs[operands[0]] = (opcode, operands[1:])
    return defs, instructions


def _tree(register: str, defs, contractible: list[str], depth: int = 0) -> str:
    """The expression tree of ``register``: arithmetic opcodes down to leaves (loads, conversions: "v";
    literals as written)."""
    if not register.startswith("%"):
        return register
    opcode, operands = defs.get(register, ("leaf", []))
    if not _ARITHMETIC.match(opcode) or depth > 32:
        return "v"
    base = opcode.split(".")[0]
    if base in ("add", "sub") and ".rn" not in opcode:
        for operand in operands:
            inner = defs.get(operand, ("", []))[0]
            if inner.startswith("mul") and ".rn" not in inner:
                contractible.append(f"{inner} -> {opcode}")
    args = [_tree(o, defs, contractible, depth + 1) for o in operands]
    if base in _COMMUTATIVE:
        args[:2] = sorted(args[:2])
    return f"{opcode}({', '.join(args)})"


def pre_activation_trees(ptx: str) -> tuple[set[str], list[str]]:
    """The trees of the values float comparisons against a constant test (conversion chains at the root
    stripped), keeping those with arithmetic; and any plain mul feeding a plain add/sub inside them."""
    defs, instructions = _definitions(ptx)
    trees, contractible = set(), []
    for opcode, operands in instructions:
        if not re.match(r"^setp\.\w+\.f(32|64)$", opcode) or len(operands) < 3:
            continue
        if not (operands[2].startswith("0f") or operands[2].startswith("0d") or operands[2] == operands[1]):
            continue
        register = operands[1]
        while defs.get(register, ("", []))[0].startswith("cvt"):
            register = defs[register][1][0]
        tree = _tree(register, defs, contractible)
        if "(" in tree:
            trees.add(tree)
    return trees, contractible


def check_pre_activation() -> int:
    """--check-pre-activation (module docstring)."""
    from lmfused.triton_kernels import batch_norm_lm_step as bn

    kernels = {
        "forward": (bn.batch_norm_lm_step_forward_kernel, {"RELU": True}),
        "backward_reduce": (
            bn.batch_norm_lm_step_backward_reduce_kernel,
            {"RELU": True, "MASK_FROM_X": True},
        ),
        "backward": (
            bn.batch_norm_lm_step_backward_kernel,
            {"RELU": True, "MASK_FROM_X": True, "NEED_X": True, "TRAINING": True},
        ),
    }
    failures = 0
    combos = list(itertools.product((False, True), repeat=3))
    dtypes = ("*bf16", "*fp16", "*fp32")
    for pointer, layout, (weight, bias, scale) in itertools.product(dtypes, (True, False), combos):
        if pointer != "*bf16" and not (weight and bias and scale):
            continue  # every combination in bf16; the other dtypes with everything on
        flags = {"HAS_WEIGHT": weight, "HAS_BIAS": bias, "HAS_SCALE": scale, "CHANNELS_LAST": layout}
        label = f"{pointer} channels_last={layout} weight={weight} bias={bias} scale={scale}"
        found = {}
        for name, (kernel, own) in kernels.items():
            trees, contractible = pre_activation_trees(
                compile_variant(kernel, pointer, {**flags, **own}).asm["ptx"]
            )
            found[name] = trees
            if contractible:
                failures += 1
                print(f"FAIL  {label}: {name} has ptxas-contractible pairs {sorted(set(contractible))}")
        same = found["forward"] and all(trees == found["forward"] for trees in found.values())
        if same:
            print(f"ok    {label}: {sorted(found['forward'])}")
        else:
            failures += 1
            print(f"FAIL  {label}: " + "; ".join(f"{name} {sorted(trees)}" for name, trees in found.items()))
    return failures + check_ticket_order()


def check_ticket_order() -> int:
    """The merge's memory ordering in the PTX of the reductions: a CTA barrier before the ticket's
    acquire-release atomic (every thread's partial stores ordered before the release), and the last
    program's reads of the partials through L2 (ld.global.cg) after it (module docstring of
    lmfused.triton_kernels.batch_norm_lm_step, "Merge")."""
    from lmfused.triton_kernels import batch_norm_lm_step as bn

    failures = 0
    for kernel, flags in (
        (bn.batch_norm_stats_kernel, {"CHANNELS_LAST": True, "HAS_RUNNING": True}),
        (
            bn.batch_norm_lm_step_backward_reduce_kernel,
            {"CHANNELS_LAST": True, "NEED_K": True, "SCALAR_K": True},
        ),
    ):
        lines = [line.strip() for line in compile_variant(kernel, "*bf16", flags).asm["ptx"].splitlines()]
        atomics = [i for i, line in enumerate(lines) if re.search(r"\batom\.global\.(gpu\.)?acq_rel", line)]
        ok = bool(atomics)
        for index in atomics:
            before = [line for line in lines[max(0, index - 12) : index] if line.startswith("bar.sync")]
            after = [line for line in lines[index:] if "ld.global.cg" in line]
            ok = ok and bool(before) and bool(after)
        status = "ok  " if ok else "FAIL"
        what = f"{len(atomics)} acq_rel ticket(s) after bar.sync, partials read by ld.global.cg"
        print(f"{status}  {kernel.fn.__name__}: {what}")
        failures += not ok
    return failures


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check-pre-activation"]:
        return check_pre_activation()
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
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
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
