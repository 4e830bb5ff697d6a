"""Compile Triton kernels for sm_90 (Hopper) without a GPU: what the interpreter never checks.

    python tools/compile_triton_sm90.py MODULE [KERNEL ...]      (default: every *_kernel of MODULE)
    python tools/compile_triton_sm90.py --check-pre-activation     (issue 19 item 1, see below)
    python tools/compile_triton_sm90.py --table                    (issue 19 item 8, bench/NOTES.md)
    python tools/compile_triton_sm90.py --check-in-flight          (the table's goals, see check_in_flight)

Runs the real compiler (Triton IR, LLVM, ptxas from the Triton wheel) on every kernel given, for these
variants of its boolean constexpr flags (block sizes and other integer constexprs fixed):

* all flags off and all on, with every pointer bf16, float32 or float64 (FP64 on with float64 only);
* each flag flipped alone from all off and from all on (bf16 pointers): every pair of flags then meets in
  all four on/off combinations, so mixed paths (RELU on with MASK_FROM_X off, ...) are compiled too;
* all flags on with every integer argument 1, which a launch specialises to a constant (bf16 pointers).

Prints one line per variant and exits 1 if any fails to compile. Run it in a process without
TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).

--check-pre-activation: the batch-norm forward and the two backward passes that recompute the ReLU's mask (the
no-state mode) must compute the pre-activation by the same instruction sequence, or the recomputed mask can
disagree with the forward's output. For every flag combination that touches it (weight, bias, scale; both
layouts; bf16, fp16, fp32) it reads each kernel's sm_90 PTX, takes the value every float comparison against a
constant tests (the forward's ReLU, the backward's rounded sign), follows its definitions back to the loaded
values (through shared-memory layout conversions, which return the stored bits), and writes the expression
tree (opcodes with their rounding modifiers; commutative operands sorted, as IEEE addition and multiplication
commute exactly). The three kernels' sets of trees must be equal, and no tree may hold a plain mul.f32 feeding
a plain add/sub.f32 (a pair ptxas may contract into an FFMA in one kernel and not in another). Exits 1
otherwise.
"""

from __future__ import annotations

import importlib
import itertools
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_sass  # noqa: E402 - the SASS parser and counts of the CUDA kernels' table

# Integer constexprs (block sizes, vector widths, loop counts); every other constexpr is a boolean flag.
BLOCKS = {
    "BLOCK_M": 8, "BLOCK_L": 256, "BLOCK_A": 8, "BLOCK_B": 256, "BLOCK_C": 256, "MERGE_ROWS": 16,
    "BLOCK": 1024, "VEC": 8, "ROW_ITERS": 2, "ITEMS": 4, "ROW_PAD": 64,
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


def compile_variant(
    kernel, pointer: str, flags: dict, blocks: dict | None = None, num_warps: int = 4, **options
):
    """Compile ``kernel`` for sm_90 with ``pointer`` activations, ``flags`` (others off) and ``blocks``;
    ``options``: further launch options (``maxnreg``)."""
    names = {p.name for p in kernel.params}
    constexprs = {k: v for k, v in {**BLOCKS, **(blocks or {})}.items() if k in names}
    constexprs.update({p.name: False for p in kernel.params if p.is_constexpr and p.name not in constexprs})
    constexprs.update(flags)
    if "FP64" in names:
        constexprs["FP64"] = pointer == "*fp64"
    signature = _signature(kernel, pointer)
    # As a launch specialises them: pointers 16-byte aligned (the launchers copy misaligned views).
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if signature[p.name][0] == "*"
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **options}
    )


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
    # A launch specialises an integer argument equal to 1 to a constant (no .to on it): every one at 1, all
    # flags on, in both layouts (channels-first has paths of its own).
    signature = _signature(kernel, "*bf16")
    ones = {name: 1 for name, kind in signature.items() if kind == "i64"}
    for layout in ("", "-CHANNELS_LAST") if "CHANNELS_LAST" in flags else ("",):
        constexprs = {**blocks, **dict.fromkeys(flags, True), **ones, "FP64": False}
        if layout:
            constexprs["CHANNELS_LAST"] = False
        constexprs = {name: value for name, value in constexprs.items() if name in names}
        label = f"flags=on{layout} ints=1 *bf16"
        out.append((label, {**signature, **dict.fromkeys(ones, "constexpr")}, constexprs))
    for label, pointer, values in chosen:
        constexprs = {**blocks, **values}
        if "FP64" in names:
            constexprs["FP64"] = pointer == "*fp64"
        key = (pointer, tuple(sorted(constexprs.items())))
        if key not in seen:  # a kernel with one flag: its flips are the all-on and all-off variants
            seen.add(key)
            out.append((f"{label} {pointer}", _signature(kernel, pointer), constexprs))
    return out


_INSTRUCTION = re.compile(r"^\s*(?:@%\w+\s+)?([a-z][\w.:]*)\s+([^;]*);")
_ARITHMETIC = re.compile(r"^(add|sub|mul|fma|neg|div|abs|min|max)(\.[a-z0-9]+)*\.f(32|64)$")
_COMMUTATIVE = ("add", "mul", "fma", "min", "max")


def _registers(operand: str) -> list[str]:
    """The registers of a vector operand ``{%r1, %r2}`` (or of a single one)."""
    return re.findall(r"%\w+", operand) if not operand.startswith("[") else []


def _definitions(ptx: str) -> tuple[dict[str, tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """(register -> (opcode, operands)) of single-destination instructions, and every instruction.

    A layout conversion goes through shared memory: stores, bar.sync, loads, bar.sync. The bits come back
    unchanged, so a register loaded from shared memory is defined as ("shared", the registers the stores
    before the last barrier wrote): the same value when they all have one expression tree."""
    defs, instructions = {}, []
    pending, published = [], []
    for line in ptx.splitlines():
        match = _INSTRUCTION.match(line)
        if not match or match.group(1).startswith((".", "//")):
            continue
        opcode, text = match.group(1), match.group(2)
        operands = [o.strip() for o in text.split(",")]
        instructions.append((opcode, operands))
        if opcode.startswith("bar."):
            if pending:
                published, pending = pending, []
        elif opcode.startswith(("st.shared", "stmatrix")):
            pending += _registers(text[text.index("]") + 1 :])
        elif opcode.startswith("ld.shared"):
            for register in _registers(text[: text.index("[")]):
                defs[register] = ("shared", list(published))
        elif operands and operands[0].startswith("%") and not opcode.startswith(("st.", "setp")):
            defs[operands[0]] = (opcode, operands[1:])
    return defs, instructions


def _tree(register: str, defs, contractible: list[str], depth: int = 0) -> str:
    """The expression tree of ``register``: arithmetic opcodes down to leaves (loads, conversions: "v";
    literals as written), through shared-memory round trips whose stores agree."""
    if not register.startswith("%"):
        return register
    opcode, operands = defs.get(register, ("leaf", []))
    if opcode == "shared" and depth <= 32:
        stored = {_tree(o, defs, contractible, depth + 1) for o in operands}
        return stored.pop() if len(stored) == 1 else "v"
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
    # channels-last, channels-first, and channels-first span tiles (rows of any length, values gathered)
    layouts = {"channels_last": (True, False), "channels_first": (False, False), "span": (False, True)}
    for pointer, layout, (weight, bias, scale) in itertools.product(dtypes, layouts, combos):
        if pointer != "*bf16" and not (weight and bias and scale):
            continue  # every combination in bf16; the other dtypes with everything on
        flags = {"HAS_WEIGHT": weight, "HAS_BIAS": bias, "HAS_SCALE": scale,
                 **dict(zip(("CHANNELS_LAST", "SPAN"), layouts[layout], strict=True))}  # fmt: skip
        label = f"{pointer} {layout} weight={weight} bias={bias} scale={scale}"
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
    if argv[:1] == ["--table"]:
        return table()
    if argv[:1] == ["--check-in-flight"]:
        return check_in_flight()
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


# ---------------------------------------------------------------------------------------------------------
# --table: the static performance table of the batch-norm Triton kernels (issue 19 item 8)
# ---------------------------------------------------------------------------------------------------------

# H100 SXM and H200: HBM bandwidth (bytes/s), SMs; a DRAM load latency of 700 ns (an assumption).
GPUS = {"H100": (3.35e12, 132), "H200": (4.8e12, 132)}
LATENCY_S = 700e-9


def _resources(cubin: bytes) -> dict[str, int]:
    import os
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def _sass_kernel(cubin: bytes):
    """The kernel of ``cubin`` as tools/check_sass.py parses it (SASS from cuobjdump, registers, shared)."""
    import os
    import subprocess
    import tempfile

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}  # cuobjdump runs nvdisasm
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [os.path.join(bin_dir, "cuobjdump"), "-sass", f.name], capture_output=True, text=True, env=env
        ).stdout
    (kernel,) = check_sass.parse_sass(text).values()
    resources = _resources(cubin)
    kernel.regs, kernel.shared = resources.get("REG", 0), resources.get("SHARED", 0)
    kernel.local = resources.get("LOCAL", 0) + resources.get("STACK", 0)
    return kernel


def streaming_loop(kernel) -> list:
    """The main loop as check_sass.main_loop finds it, except that a loop may store to shared memory: in
    a Triton kernel that is a layout conversion or a register gather (the span tiles' mask bytes), not a
    fill of per-channel coefficients. Loops that read through L2 only (the merge) are still left out."""
    index = {insn.addr: i for i, insn in enumerate(kernel.insns)}
    loops = []
    for i, insn in enumerate(kernel.insns):
        target = re.search(r"0x([0-9a-f]+)", insn.operands) if insn.base == "BRA" else None
        if target and int(target.group(1), 16) < insn.addr and int(target.group(1), 16) in index:
            body = kernel.insns[index[int(target.group(1), 16)] : i + 1]
            if not any(b.base == "LDG" and "STRONG" in b.opcode for b in body):
                loops.append((sum(check_sass.access_bits(b.opcode) for b in body if b.base == "LDG"), body))
    busiest = max((load for load, _ in loops), default=0)
    if not busiest:
        return kernel.insns
    return min((body for load, body in loops if load * 2 >= busiest), key=len)


def streaming_figures(cubin: bytes, threads: int) -> dict[str, float]:
    """From the sm_90 SASS, as tools/check_sass.py counts the CUDA kernels: registers, local bytes, CTAs per
    SM, bytes of global loads a thread issues in its main loop (the whole kernel without one) before the
    first use of one of them, the same per SM, and the fraction of the main loop's global bytes moved by
    accesses of 64 bits or more."""
    kernel = _sass_kernel(cubin)
    body = streaming_loop(kernel)
    ctas = check_sass.ctas_per_sm(kernel, threads)
    per_thread = check_sass.loads_before_first_use(body)
    moved = [check_sass.access_bits(i.opcode) for i in body if i.base in ("LDG", "STG")]
    return {
        "regs": kernel.regs,
        "local": kernel.local,
        "ctas": ctas,
        "per_thread": per_thread,
        "per_sm": per_thread * threads * ctas,
        "wide": sum(b for b in moved if b >= 64) / max(1, sum(moved)),
    }


TABLE_SHAPES = [
    ("64x256x56x56 cl", (64, 256, 56, 56), True),
    ("64x2048x7x7 cl", (64, 2048, 7, 7), True),
    ("64x1024x14x14 cf", (64, 1024, 14, 14), False),
    ("64x2048x7x7 cf", (64, 2048, 7, 7), False),
]


def table_rows() -> list[dict]:
    """The rows of --table: each streaming batch-norm kernel compiled for sm_90 at the launchers' own tile
    shapes and warps for every shape of TABLE_SHAPES (bf16, every flag the models' junctions use); the two
    backward passes also with the output's gradient in two parts (``+handoff``: HAS_HANDOFF, as every inner
    block of a model's training step takes them, lmfused.handoff)."""
    import torch
    from lmfused.triton_kernels import batch_norm_lm_step as bn

    from lmfused.op_support import plan_layout

    rows = []
    for label, shape, channels_last in TABLE_SHAPES:
        x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        plan = plan_layout(x)
        stats_tiles, reduce_tiles = bn.stats_shape(plan, 2), bn.backward_reduction_shape(plan, 2)
        stats, reduce = ((t.block_a, t.block_b) for t in (stats_tiles, reduce_tiles))
        stats_layout, reduce_layout = (
            {"CHANNELS_LAST": channels_last, "VEC": t.vec, "SPAN": t.is_span, "ROW_PAD": t.row_pad}
            for t in (stats_tiles, reduce_tiles)
        )
        tiles = bn._elementwise_tiles(plan, 2)  # a span tile of whole rows, or a 2-D one
        tile = (tiles.block_m, tiles.block_l)
        elementwise = {"CHANNELS_LAST": channels_last, "VEC": tiles.vec, "SPAN": tiles.is_span}
        kernels = [
            ("stats", bn.batch_norm_stats_kernel, {"HAS_RUNNING": True},
             {**dict(zip(("BLOCK_A", "BLOCK_B"), stats, strict=True)), "ITEMS": bn.STATS_ITEMS}),
            ("forward", bn.batch_norm_lm_step_forward_kernel,
             {"HAS_STATE": True, "HAS_WEIGHT": True, "HAS_BIAS": True, "RELU": True, "WRITE_MASK": True,
              "PER_CHANNEL_K": True}, dict(zip(("BLOCK_M", "BLOCK_L"), tile, strict=True))),
            ("reduce", bn.batch_norm_lm_step_backward_reduce_kernel,
             {"HAS_WEIGHT": True, "HAS_BIAS": True, "RELU": True, "NEED_K": True},
             dict(zip(("BLOCK_A", "BLOCK_B"), reduce, strict=True))),
            ("backward", bn.batch_norm_lm_step_backward_kernel,
             {"HAS_WEIGHT": True, "HAS_BIAS": True, "RELU": True, "HAS_SHORTCUT": True, "TRAINING": True,
              "PER_CHANNEL_K": True, "NEED_X": True, "NEED_U": True, "NEED_U_PREV": True},
             dict(zip(("BLOCK_M", "BLOCK_L"), tile, strict=True))),
        ]  # fmt: skip
        # The passes that read the output's gradient, also with it in two parts (each after its own row).
        handoff = [(f"{name}+handoff", kernel, {**flags, "HAS_HANDOFF": True}, blocks)
                   for name, kernel, flags, blocks in kernels if name in ("reduce", "backward")]  # fmt: skip
        order = [row[0] for row in kernels]
        kernels = sorted(kernels + handoff, key=lambda row: order.index(row[0].split("+")[0]))
        for name, kernel, flags, blocks in kernels:
            base = name.split("+")[0]
            layout = {"stats": stats_layout, "reduce": reduce_layout}.get(base, elementwise)
            options = {}
            if base == "reduce":  # the launch options its launcher takes (a register budget, maxnreg)
                options = bn.backward_reduction_options(reduce_tiles, "HAS_HANDOFF" in flags)
            compiled = compile_variant(kernel, "*bf16", {**layout, **flags}, blocks, bn.NUM_WARPS, **options)
            figures = streaming_figures(compiled.asm["cubin"], 32 * bn.NUM_WARPS)
            tile_text = "x".join(str(v) for v in blocks.values()) + "".join(
                f" {k} {v}" for k, v in options.items()
            )
            rows.append({"kernel": name, "shape": label, "tile": tile_text, **figures})
    return rows


def table() -> int:
    """Print the markdown table of bench/NOTES.md "Static table: Triton kernels (sm_90)"."""
    print("| kernel | shape (bf16) | tile | regs | local B | CTAs/SM | in flight/thread | in flight/SM "
          "| wide "
          "| H100 | H200 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in table_rows():
        fractions = [min(1.0, row["per_sm"] / (bw * LATENCY_S / sms)) for bw, sms in GPUS.values()]
        print(f"| {row['kernel']} | {row['shape']} | {row['tile']} | {row['regs']} | {row['local']} "
              f"| {row['ctas']} | {row['per_thread']} B | {row['per_sm'] / 1024:.0f} KB | {row['wide']:.2f} "
              f"| {fractions[0]:.2f} | {fractions[1]:.2f} |")  # fmt: skip
    return 0


GOAL_PER_SM = 32 * 1024  # issue 19 item 8: bytes of loads in flight per SM of every streaming kernel
STATS_PER_THREAD = 4 * 16  # item 5: four independent 128-bit loads per thread in the statistics
# item 7: vector accesses at 7x7 and 14x14 too (what is left narrow: per-channel values, mask bytes)
WIDE_GOAL = 0.7


def check_in_flight() -> int:
    """Every row of the table: no local memory, at least GOAL_PER_SM bytes of loads in flight per SM and
    WIDE_GOAL of the bytes moved by wide accesses, and the channels-last statistics at least STATS_PER_THREAD
    per thread. Exits 1 otherwise."""
    failures = 0
    for row in table_rows():
        ok = row["local"] == 0 and row["per_sm"] >= GOAL_PER_SM and row["wide"] >= WIDE_GOAL
        if row["kernel"] == "stats" and row["shape"].endswith("cl"):
            ok = ok and row["per_thread"] >= STATS_PER_THREAD
        failures += not ok
        status = "ok  " if ok else "FAIL"
        print(f"{status}  {row['kernel']} {row['shape']}: {row['local']} local B, {row['per_thread']} B in "
              f"flight per thread, {row['per_sm'] / 1024:.0f} KB per SM, wide {row['wide']:.2f}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
