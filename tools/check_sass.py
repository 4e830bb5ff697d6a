#!/usr/bin/env python3
"""Static checks and counts of the lmfused CUDA kernels from their compiled code (no GPU).

    python3 tools/check_sass.py [-v] [--arch sm_90] [--table] FILE...   (cubins or objects)

Reads every lmfused kernel's SASS (cuobjdump -sass) and resource usage (cuobjdump
--dump-resource-usage) and fails (exit 1) when
  * a kernel uses local memory (a stack frame or local bytes: register spills, or arrays the
    compiler could not keep in registers), on any arch given;
  * an elementwise kernel on a vector path (VEC > 1) stores, in its main loop, narrower than it
    loads (every activation store one VEC * sizeof(T)-byte access; the 1-bit ReLU mask's byte
    stores of a forward that writes it excepted);
  * a reduction (statistics, backward reduction) stores in its main loop (its sums stay in
    registers until the merge), or, on a vector path, never loads VEC * sizeof(T) bytes at once;
  * a channels-last kernel reads shared memory in its main loop at an offset that is not a whole
    row of the per-channel coefficients' table (kMaxColUnits = 32 words): stored [coefficient]
    [element][column], the lanes of a warp read consecutive words, and one base register plus such
    offsets reaches every value; offsets a word apart are the [column][element] order, whose loads
    conflict on the banks up to UW-fold (on an H200 the batch-norm kernels were bound by them).

The main loop is the smallest loop (a backward branch) holding at least half the global-load bytes
of the kernel's busiest loop. From it and the resource usage, --table prints per kernel family
(dtype, kernel, layout, vector width; the worst instantiation of each figure; "+h": the backward
kernels' grad_handoff variants, a family of their own), for sm_90:
  regs        registers per thread
  local       local memory bytes (stack + local)
  CTA/SM      resident CTAs of 256 threads per SM (registers, shared memory, 2048 threads)
  inflight    bytes of global loads a thread issues in the main loop before the first use of one
              of them (its loads in flight), times the resident threads: KB per SM
  wide        fraction of the main loop's global load and store bytes moved by 128-bit accesses
  ldg<=32     global loads of 4 bytes or less in the main loop (per-channel values, scale, mask)
  H100 H200   predicted fraction of copy bandwidth (Little's law): inflight per SM over the bytes
              per SM that keep the memory busy, bandwidth x latency / SMs, capped at 1
with LATENCY_NS of loaded DRAM latency on both (132 SMs; H100 SXM 3.35 TB/s, H200 4.8 TB/s).
-v prints every instantiation.

The disassembler is cuobjdump, which runs nvdisasm; both are found on PATH, in $CUDA_HOME/bin, or
in the bin/ folder of their wheels (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import glob
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

LATENCY_NS = 700.0  # loaded HBM latency assumed for H100 and H200
SMS = 132
PEAK_TBS = {"H100": 3.35, "H200": 4.8}
GOAL_KB = 32  # the streaming kernels' goal: at least this many KB of loads in flight per SM

# Template arguments after the element type, by kernel: (short name, argument names, kind), kind
# "elementwise" | "reduction" | "other". A reduction has a unit width W (its sums' order) and a
# load width VEC <= W; an elementwise kernel has VEC only.
KERNELS = {
    "lm_step_forward_kernel": (
        "lm_fwd",
        ("VEC", "CL", "HAS_F", "RELU", "HAS_NOISE"),
        "elementwise",
    ),
    "lm_step_backward_kernel": ("lm_bwd", ("VEC", "CL", "RELU"), "elementwise"),
    "lm_step_backward_grad_k_kernel": ("lm_bwd_k", ("W", "VEC", "CL", "RELU"), "reduction"),
    "batch_norm_stats_kernel": ("bn_stats", ("W", "VEC", "CL"), "reduction"),
    "batch_norm_eval_stats_kernel": ("bn_eval", (), "other"),
    "batch_norm_lm_step_forward_kernel": (
        "bn_fwd",
        ("VEC", "CL", "STATE", "RELU", "HAS_NOISE", "MASK"),
        "elementwise",
    ),
    "batch_norm_lm_step_backward_reduce_kernel": (
        "bn_red",
        ("W", "VEC", "CL", "MASK", "NEED_K", "HANDOFF"),
        "reduction",
    ),
    "batch_norm_lm_step_backward_kernel": (
        "bn_bwd",
        ("VEC", "CL", "MASK", "GRAD_X", "HANDOFF"),
        "elementwise",
    ),
}
DTYPES = {"13__nv_bfloat16": ("bf16", 2, 4), "6__half": ("f16", 2, 4), "f": ("f32", 4, 4), "d": ("f64", 8, 8)}
# Any lmfused::detail kernel: its name and template arguments (element type first).
KERNEL_RE = re.compile(r"_ZN7lmfused6detail\d+(\w+?)I(13__nv_bfloat16|6__half|f|d)((?:L[ib]\d+E)*)E")
INSN_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
REG_RE = re.compile(r"(?<![\w.])R(\d+)(\.64)?")
COEF_TABLE_COLUMNS = 32  # kMaxColUnits: a row of the channels-last coefficients' table
LDS_OFFSET_RE = re.compile(r"\[R\w+(?:\+0x([0-9a-f]+))?\]")  # an LDS address: [register + offset]


def find_tool(name: str) -> str:
    """``name`` on PATH, in $CUDA_HOME/bin, or in a pip-installed nvidia wheel's bin/ folder."""
    found = shutil.which(name)
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.access(os.path.join(cuda_home, "bin", name), os.X_OK):
        return os.path.join(cuda_home, "bin", name)
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    for root in roots:  # nvidia/cu13/bin (CUDA 13 wheels) or nvidia/cuda_cuobjdump/bin (older)
        for path in sorted(glob.glob(os.path.join(root, "*", "bin", name))):
            if os.access(path, os.X_OK):
                return path
    sys.exit(f"check_sass: {name} not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


def access_bits(opcode: str, default: int = 32) -> int:
    """Bits moved by a load/store opcode: STG.E.128 -> 128, STG.E.U16 -> 16, STG.E -> 32."""
    for part in opcode.split(".")[1:]:
        digits = part.lstrip("USB")
        if digits.isdigit() and int(digits) in (128, 64, 32, 16, 8):
            return int(digits)
    return default


def registers(text: str) -> set[int]:
    """General registers named in an operand string (R4.64 names R4 and R5; RZ none)."""
    regs = set()
    for m in REG_RE.finditer(text):
        r = int(m.group(1))
        regs.add(r)
        if m.group(2):
            regs.add(r + 1)
    return regs


@dataclass
class Insn:
    addr: int
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    def split(self) -> list[str]:
        return [o.strip() for o in self.operands.split(",")] if self.operands.strip() else []

    def sources(self) -> set[int]:
        ops = self.split()
        if self.base in ("STG", "ST", "STS", "STL", "RED", "ATOM", "ATOMG", "BRA", "BAR"):
            return registers(",".join(ops))
        return registers(",".join(ops[1:]))


@dataclass
class Kernel:
    mangled: str
    insns: list[Insn] = field(default_factory=list)
    regs: int = 0
    local: int = 0
    shared: int = 0


def parse_sass(text: str) -> dict[str, Kernel]:
    kernels: dict[str, Kernel] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            continue
        m = INSN_RE.search(line)
        if current is not None and m:
            current.insns.append(Insn(int(m.group(1), 16), m.group(3), m.group(4)))
    return kernels


def parse_resources(text: str, kernels: dict[str, Kernel]) -> None:
    for name, reg, stack, shared, local in re.findall(
        r"Function (\S+):\n\s+REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text
    ):
        k = kernels.setdefault(name, Kernel(name))
        k.regs, k.local, k.shared = int(reg), int(stack) + int(local), int(shared)


def main_loop(k: Kernel) -> list[Insn]:
    """The kernel's streaming loop: of the loops (backward branches) that neither fill shared memory
    (STS: the per-channel coefficients) nor read through L2 only (LDG.STRONG: the merge's partial
    sums), the smallest holding at least half the global-load bytes of the busiest one."""
    index = {insn.addr: i for i, insn in enumerate(k.insns)}
    loops = []
    for i, insn in enumerate(k.insns):
        if insn.base == "BRA":
            m = re.search(r"0x([0-9a-f]+)", insn.operands)
            if m and int(m.group(1), 16) < insn.addr and int(m.group(1), 16) in index:
                body = k.insns[index[int(m.group(1), 16)] : i + 1]
                if any(b.base == "STS" or (b.base == "LDG" and "STRONG" in b.opcode) for b in body):
                    continue
                load = sum(access_bits(b.opcode) for b in body if b.base == "LDG")
                loops.append((load, body))
    busiest = max((load for load, _ in loops), default=0)
    if not busiest:
        return k.insns
    return min((b for load, b in loops if load * 2 >= busiest), key=len)


def loads_before_first_use(body: list[Insn]) -> int:
    """Bytes of global loads a thread has in flight in the loop: the largest batch of loads issued
    (in address order, from any load on) before one of their values is read."""
    best = 0
    for start, first_insn in enumerate(body):
        if first_insn.base != "LDG":
            continue
        pending: set[int] = set()
        total = 0
        for insn in body[start:]:
            if pending & insn.sources():
                break
            if insn.base == "LDG":
                bits = access_bits(insn.opcode)
                dest = registers(insn.split()[0]) if insn.split() else set()
                if dest:
                    first = min(dest)
                    pending |= set(range(first, first + max(1, bits // 32)))
                total += bits // 8
        best = max(best, total)
    return best


def ctas_per_sm(k: Kernel, threads: int = 256) -> int:
    """Resident CTAs per SM on sm_90 (65536 registers allocated per warp in 256s, 228 KB shared
    memory with 1 KB reserved per CTA, 2048 threads, 32 CTAs)."""
    warps = threads // 32
    regs_per_warp = -(-max(k.regs, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = 233472 // (k.shared + 1024)
    return max(0, min(by_regs, by_smem, 2048 // threads, 32))


def describe(mangled: str):
    """(kernel short name, dtype, element bytes, acc bytes, {arg: value}, kind) or None."""
    m = KERNEL_RE.search(mangled)
    if not m:
        return None
    name, tcode, args = m.groups()
    values = [int(v) for v in re.findall(r"L[ib](\d+)E", args)]
    short, arg_names, kind = KERNELS.get(name, (name, tuple(f"a{i}" for i in range(len(values))), "other"))
    if len(arg_names) != len(values):
        arg_names = tuple(f"a{i}" for i in range(len(values)))
    dtype, size, acc = DTYPES[tcode]
    return short, dtype, size, acc, dict(zip(arg_names, values, strict=True)), kind


@dataclass
class Row:
    mangled: str
    short: str
    dtype: str
    flags: dict
    kind: str
    regs: int
    local: int
    ctas: int
    inflight_kb: float
    wide: float
    narrow_loads: int
    why: str | None


def analyse(k: Kernel) -> Row | None:
    info = describe(k.mangled)
    if info is None:
        return None
    short, dtype, size, acc, flags, kind = info
    body = main_loop(k)
    ldg = [i for i in body if i.base == "LDG"]
    stg = [i for i in body if i.base in ("STG", "ST")]
    moved = [(access_bits(i.opcode), i) for i in ldg + stg]
    total = sum(b for b, _ in moved)
    wide = sum(b for b, _ in moved if b == 128) / total if total else 0.0
    ctas = ctas_per_sm(k)
    inflight = loads_before_first_use(body) * ctas * 256 / 1024
    why = None
    if k.local:
        why = f"{k.local} bytes of local memory"
    vec = flags.get("VEC", 1)
    bits = size * vec * 8
    if why is None and vec > 1 and kind == "elementwise":
        narrow = [i for b, i in ((access_bits(i.opcode), i) for i in stg) if b < bits]
        if short == "bn_fwd" and flags.get("MASK"):
            narrow = [i for i in narrow if access_bits(i.opcode) != 8]
        if narrow:
            why = f"{len(narrow)} stores narrower than {bits} bits in the main loop"
    if why is None and kind == "reduction" and short != "lm_bwd_k" and stg:
        why = f"{len(stg)} stores in the main loop"
    if (
        why is None
        and kind == "reduction"
        and vec > 1
        and not any(access_bits(i.opcode) == bits for i in ldg)
    ):
        why = f"no {bits}-bit load in the main loop"
    if why is None and flags.get("CL"):
        row = COEF_TABLE_COLUMNS * acc  # one row of the coefficients' table, in bytes
        offsets = [
            int(m.group(1) or "0", 16)
            for i in body
            if i.base == "LDS"
            for m in [LDS_OFFSET_RE.search(i.operands)]
            if m
        ]
        if any(offset % row for offset in offsets):
            why = f"shared-memory loads in the main loop at offsets that are not multiples of {row} bytes"
    narrow_loads = sum(1 for i in ldg if access_bits(i.opcode) <= 32)
    return Row(k.mangled, short, dtype, flags, kind, k.regs, k.local, ctas, inflight, wide, narrow_loads, why)


def needed_kb(gpu: str) -> float:
    return PEAK_TBS[gpu] * 1e12 * LATENCY_NS * 1e-9 / SMS / 1024


def predicted(inflight_kb: float, gpu: str) -> float:
    return min(1.0, inflight_kb / needed_kb(gpu))


def flag_text(flags: dict) -> str:
    shown = [
        f"{k}={v}" if k in ("W", "MASK", "GRAD_X") else k
        for k, v in flags.items()
        if v and k not in ("CL", "VEC")
    ]
    return ",".join(shown) or "-"


def run_cuobjdump(files: list[str], arch: str) -> dict[str, Kernel]:
    cuobjdump = find_tool("cuobjdump")
    # cuobjdump -sass runs nvdisasm, which it looks for on PATH (the wheels do not put it there).
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(find_tool("nvdisasm")) + os.pathsep + env.get("PATH", "")
    kernels: dict[str, Kernel] = {}
    for path in files:
        for args, parse in (
            (["-sass", "-arch", arch], parse_sass),
            (["--dump-resource-usage", "-arch", arch], None),
        ):
            result = subprocess.run(
                [cuobjdump, *args, path], capture_output=True, text=True, check=False, env=env
            )
            if result.returncode != 0:
                sys.exit(f"check_sass: cuobjdump failed on {path}: {result.stderr.strip()}")
            if parse is not None:
                for name, k in parse(result.stdout).items():
                    kernels.setdefault(name, k).insns = k.insns
            else:
                parse_resources(result.stdout, kernels)
    return kernels


def print_table(rows: list[Row], arch: str) -> None:
    groups: dict[tuple, list[Row]] = collections.defaultdict(list)
    for r in rows:
        layout = "chlast" if r.flags.get("CL") else "contig" if "CL" in r.flags else "-"
        width = r.flags.get("W", r.flags.get("VEC", 1))
        short = r.short + ("+h" if r.flags.get("HANDOFF") else "")  # the grad_handoff variants apart
        groups[(r.dtype, short, layout, width, r.flags.get("VEC", 1))].append(r)
    print(f"Static table: lmfused CUDA kernels ({arch}; per family the worst instantiation of each figure)")
    print(
        f"loads in flight per SM needed at {LATENCY_NS:.0f} ns: H100 {needed_kb('H100'):.1f} KB, "
        f"H200 {needed_kb('H200'):.1f} KB (goal {GOAL_KB} KB)"
    )
    print(
        f"{'dtype':5s} {'kernel':8s} {'layout':6s} {'W':>2s} {'VEC':>3s} {'n':>4s} {'regs':>4s} "
        f"{'local':>5s} {'CTA/SM':>6s} {'inflight':>8s} {'wide':>5s} {'ldg<=32':>7s} "
        f"{'H100':>5s} {'H200':>5s}"
    )
    order = sorted(groups, key=lambda key: (key[0], key[1], key[2], -key[3], -key[4]))
    for key in order:
        g = groups[key]
        dtype, short, layout, width, vec = key
        kb = min(r.inflight_kb for r in g)
        regs, local, ctas = max(r.regs for r in g), max(r.local for r in g), min(r.ctas for r in g)
        wide, narrow = min(r.wide for r in g), max(r.narrow_loads for r in g)
        print(
            f"{dtype:5s} {short:8s} {layout:6s} {width:2d} {vec:3d} {len(g):4d} {regs:4d} {local:5d} "
            f"{ctas:6d} {kb:6.1f}KB {wide:5.2f} {narrow:7d} {predicted(kb, 'H100'):5.2f} "
            f"{predicted(kb, 'H200'):5.2f}"
        )


# The kernels of the models' junctions (bf16 channels-last, 128-bit units): (row label, kernel, flags).
MODEL_PATH = [
    ("bn_lm_step stats", "bn_stats", {"W": 8, "VEC": 8, "CL": 1}),
    ("bn_lm_step forward", "bn_fwd", {"VEC": 8, "CL": 1, "STATE": 1, "RELU": 1, "HAS_NOISE": 0, "MASK": 1}),
    # (the handoff: a step's output handed to the next step as its u, whose gradient arrives apart)
    ("bn_lm_step reduce", "bn_red", {"W": 8, "VEC": 8, "CL": 1, "MASK": 1, "NEED_K": 1, "HANDOFF": 0}),
    ("  + grad_handoff", "bn_red", {"W": 8, "VEC": 8, "CL": 1, "MASK": 1, "NEED_K": 1, "HANDOFF": 1}),
    ("bn_lm_step backward", "bn_bwd", {"VEC": 8, "CL": 1, "MASK": 1, "GRAD_X": 2, "HANDOFF": 0}),
    ("  + grad_handoff", "bn_bwd", {"VEC": 8, "CL": 1, "MASK": 1, "GRAD_X": 2, "HANDOFF": 1}),
    ("bn_relu forward", "bn_fwd", {"VEC": 8, "CL": 1, "STATE": 0, "RELU": 1, "HAS_NOISE": 0, "MASK": 0}),
    ("bn_relu reduce", "bn_red", {"W": 8, "VEC": 8, "CL": 1, "MASK": 2, "NEED_K": 0, "HANDOFF": 0}),
    ("bn_relu backward", "bn_bwd", {"VEC": 8, "CL": 1, "MASK": 2, "GRAD_X": 2, "HANDOFF": 0}),
    ("lm_step forward", "lm_fwd", {"VEC": 8, "CL": 1, "HAS_F": 1, "RELU": 1, "HAS_NOISE": 0}),
    ("lm_step backward", "lm_bwd_k", {"W": 8, "VEC": 8, "CL": 1, "RELU": 1}),
]


def print_model_path(rows: list[Row]) -> None:
    print("The junctions' kernels (bf16, channels-last, 128-bit units), as the models run them:")
    for label, short, flags in MODEL_PATH:
        match = [r for r in rows if r.dtype == "bf16" and r.short == short and r.flags == flags]
        for r in match:
            print(
                f"  {label:20s} regs {r.regs:3d} local {r.local} CTA/SM {r.ctas} inflight "
                f"{r.inflight_kb:5.1f}KB wide {r.wide:4.2f} ldg<=32 {r.narrow_loads:2d} "
                f"H100 {predicted(r.inflight_kb, 'H100'):4.2f} H200 {predicted(r.inflight_kb, 'H200'):4.2f}"
            )


def check_arch(files: list[str], arch: str, verbose: bool, table: bool) -> tuple[str, list[str]]:
    """One arch's report (its rows, the table when asked, the count line) and its failures."""
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        kernels = run_cuobjdump(files, arch)
        rows = [r for r in (analyse(k) for k in kernels.values()) if r is not None]
        if not rows:
            sys.exit(f"check_sass: no lmfused kernels for {arch} in {' '.join(files)}")
        if verbose:
            for r in rows:
                layout = "chlast" if r.flags.get("CL") else "contig"
                print(
                    f"{arch} {r.dtype:4s} {r.short:8s} {layout} VEC={r.flags.get('VEC', 1):<2d} "
                    f"{flag_text(r.flags):36s} regs {r.regs:3d} local {r.local:4d} CTA/SM {r.ctas} "
                    f"inflight {r.inflight_kb:6.1f}KB wide {r.wide:4.2f}  {r.why or 'ok'}"
                )
        if table:
            print_table(rows, arch)
            print_model_path(rows)
        local = sum(1 for r in rows if r.local)
        print(f"check_sass: {arch}: {len(rows)} kernels, {local} with local memory")
    return report.getvalue(), [f"{arch} {r.mangled}: {r.why}" for r in rows if r.why]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("-v", "--verbose", action="store_true", help="one row per kernel instantiation")
    parser.add_argument("--arch", action="append", help="archs to check (repeatable; default sm_90)")
    parser.add_argument("--table", action="store_true", help="the static table (first arch)")
    args = parser.parse_args()
    archs = args.arch or ["sm_90"]
    # The archs in parallel (disassembly and parsing each take a core), reported in the order asked.
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(archs)) as pool:
        jobs = [
            pool.submit(check_arch, args.files, a, args.verbose, n == 0 and args.table)
            for n, a in enumerate(archs)
        ]
        reports = [job.result() for job in jobs]
    failures = []
    for text, arch_failures in reports:
        print(text, end="")
        failures += arch_failures
    if failures:
        print(f"\ncheck_sass: FAILED: {len(failures)} kernels:")
        for failure in failures[:40]:
            print(f"  {failure}")
        return 1
    print(
        f"check_sass: OK ({', '.join(archs)}): no local memory; vector paths store as wide as they load; "
        "reductions store nothing in their main loop; channels-last shared-memory loads on whole table rows"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
