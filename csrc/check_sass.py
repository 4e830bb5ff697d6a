#!/usr/bin/env python3
"""Store widths of the LM-step and batch-norm-fused kernels, read from their sm_90 SASS (no GPU).

    python3 csrc/check_sass.py [-v] FILE...     (cubins or object files holding sm_90 code)

For every kernel of the LM step (lm_step_forward/backward_kernel) and of the batch-norm-fused step
(batch_norm_stats_kernel, batch_norm_lm_step_forward/backward_reduce/backward_kernel) it counts the
global stores (STG, and generic ST) and loads (LDG) by width, and prints one row per (dtype, kernel,
layout, vector width). It fails (exit 1) when
  * an elementwise kernel on a vector path (VEC > 1) stores narrower than it loads: every activation
    store must be one VEC * sizeof(T)-byte access. The only narrower stores allowed are the grad_k
    partial sums of an LM-step NEED_K backward (accumulator width: 4 bytes, 8 for double), at most
    MAX_PARTIAL_STORES store instructions;
  * a reduction (statistics, backward_reduce: no activation stores) stores anything but its partial
    sums (accumulator width, at most MAX_PARTIAL_STORES per sum), or, on a vector path, never loads
    VEC * sizeof(T) bytes at once.
-v prints every kernel.

The disassembler is cuobjdump -sass, which runs nvdisasm; both are found on PATH, in $CUDA_HOME/bin, or
in the bin/ folder of their wheels (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

MAX_PARTIAL_STORES = 2  # store_tile_partials: one store for a tile sum, one for a column sum

# Template arguments after the element type, in order (csrc/lm_step.cuh, csrc/batch_norm_lm_step.cuh),
# by kernel: (short name, argument names, reduction?). A reduction has a logical width W (its sums'
# order) and a load width VEC <= W; an elementwise kernel has VEC only.
KERNELS = {
    "lm_step_forward_kernel": ("forward", ("VEC", "CL", "HAS_F", "HAS_SCALE", "RELU", "HAS_NOISE"), False),
    "lm_step_backward_kernel": (
        "backward",
        ("VEC", "CL", "RELU", "HAS_SCALE", "NEED_U", "NEED_UP", "NEED_F", "NEED_K"),
        False,
    ),
    "batch_norm_stats_kernel": ("bn_stats", ("W", "VEC", "CL"), True),
    "batch_norm_lm_step_forward_kernel": ("bn_fwd", ("VEC", "CL", "STATE", "RELU", "HAS_NOISE"), False),
    "batch_norm_lm_step_backward_reduce_kernel": ("bn_red", ("W", "VEC", "CL", "MASK", "NEED_K"), True),
    "batch_norm_lm_step_backward_kernel": ("bn_bwd", ("VEC", "CL", "MASK", "GRAD_X"), False),
}
DTYPES = {"13__nv_bfloat16": ("bf16", 2, 4), "6__half": ("f16", 2, 4), "f": ("f32", 4, 4), "d": ("f64", 8, 8)}
# The mangled name's length prefix (a digit) comes right before the kernel's name, so that
# lm_step_forward_kernel does not match inside batch_norm_lm_step_forward_kernel.
KERNEL_RE = re.compile(r"(?<=\d)(" + "|".join(KERNELS) + r")I(13__nv_bfloat16|6__half|f|d)((?:L[ib]\d+E)+)")
WIDTHS = (128, 64, 32, 16, 8)


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


def access_width(opcode: str, default: int = 32) -> int:
    """Bits moved by a load/store opcode: STG.E.128 -> 128, STG.E.U16 -> 16, STG.E -> 32."""
    for part in opcode.split(".")[1:]:
        digits = part.lstrip("USB")
        if digits.isdigit() and int(digits) in WIDTHS:
            return int(digits)
    return default


def parse_sass(text: str) -> dict[str, collections.Counter]:
    """{mangled kernel name: Counter of ('st'|'ld', width)} for each function in cuobjdump's output."""
    kernels: dict[str, collections.Counter] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), collections.Counter())
            continue
        if current is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        opcode = m.group(1)
        base = opcode.split(".")[0]
        if base in ("STG", "ST"):
            current[("st", access_width(opcode))] += 1
        elif base == "LDG":
            current[("ld", access_width(opcode))] += 1
    return kernels


def describe(mangled: str):
    """(kernel, dtype, elem bytes, acc bytes, VEC, template arguments dict, reduction?) or None for
    other functions."""
    m = KERNEL_RE.search(mangled)
    if not m:
        return None
    name, tcode, args = m.groups()
    kernel, arg_names, reduction = KERNELS[name]
    dtype, size, acc = DTYPES[tcode]
    values = [int(v) for v in re.findall(r"L[ib](\d+)E", args)]
    flags = dict(zip(arg_names, values, strict=True))
    return kernel, dtype, size, acc, flags["VEC"], flags, reduction


def partial_sums(kernel: str, flags: dict) -> int:
    """How many partial-sum arrays a kernel writes (store_tile_partials calls)."""
    if kernel == "backward":
        return 1 if flags["NEED_K"] else 0
    if kernel == "bn_stats":
        return 2
    if kernel == "bn_red":
        return 3 if flags["NEED_K"] else 2
    return 0


def check(kernel: str, info, counts: collections.Counter) -> str | None:
    """Why this kernel fails the store-width rule, or None."""
    name, _dtype, size, acc, vec, flags, reduction = info
    if vec == 1:
        return None
    wide = size * vec * 8
    allowed = {acc * 8: MAX_PARTIAL_STORES * partial_sums(name, flags)}
    if reduction:  # no activation stores at all; the loads must use the vector width
        bad = {w: n for (kind, w), n in counts.items() if kind == "st" and n > allowed.get(w, 0)}
        if not bad and counts[("ld", wide)] == 0:
            return f"no {wide}-bit global load on a vector path"
    else:
        narrow = {w: n for (kind, w), n in counts.items() if kind == "st" and w < wide and n}
        bad = {w: n for w, n in narrow.items() if n > allowed.get(w, 0)}
    if bad:
        listing = ", ".join(f"{n} x {w}-bit" for w, n in sorted(bad.items(), reverse=True))
        return f"{listing} global stores, vector width {wide} bits"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("-v", "--verbose", action="store_true", help="one row per kernel")
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    cuobjdump = find_tool("cuobjdump")
    # cuobjdump -sass runs nvdisasm, which it looks for on PATH (the wheels do not put it there).
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(find_tool("nvdisasm")) + os.pathsep + env.get("PATH", "")

    kernels: dict[str, collections.Counter] = {}
    for path in args.files:
        result = subprocess.run(
            [cuobjdump, "-sass", "-arch", args.arch, path],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        if result.returncode != 0:
            sys.exit(f"check_sass: cuobjdump failed on {path}: {result.stderr.strip()}")
        kernels.update(parse_sass(result.stdout))

    groups: dict[tuple, list] = collections.defaultdict(list)
    failures = []
    for name, counts in sorted(kernels.items()):
        info = describe(name)
        if info is None:
            continue
        direction, dtype, _size, _acc, vec, flags, _reduction = info
        layout = "chlast" if flags["CL"] else "contig"
        groups[(dtype, direction, layout, vec)].append(counts)
        why = check(name, info, counts)
        if why:
            failures.append((name, why))
        if args.verbose:
            on = (
                ",".join(
                    f"{k}={v}" if k in ("W", "MASK", "GRAD_X") else k
                    for k, v in flags.items()
                    if v and k not in ("CL", "VEC")
                )
                or "-"
            )
            stores = " ".join(f"{counts[('st', w)]:4d}" for w in WIDTHS)
            print(f"{dtype:4s} {direction:8s} {layout} VEC={vec:<2d} {on:38s} STG {stores}  {why or 'ok'}")
    if not groups:
        sys.exit(f"check_sass: no lmfused kernels for {args.arch} in {' '.join(args.files)}")

    head = "STG.128 STG.64 STG.32 STG.16 STG.8 | LDG.128 LDG.64 LDG.32 LDG.16"
    print(f"{'dtype':5s} {'dir':8s} {'layout':6s} {'VEC':>3s} {'kernels':>7s}  {head}  narrow-store kernels")
    order = sorted(groups, key=lambda key: (key[0], key[1], key[2], -key[3]))
    for dtype, direction, layout, vec in order:
        rows = groups[(dtype, direction, layout, vec)]
        total = sum(rows, collections.Counter())
        names = head.split(" |")[0].split()
        st = " ".join(f"{total[('st', w)]:>{len(h)}d}" for w, h in zip(WIDTHS, names, strict=True))
        ld = " ".join(f"{total[('ld', w)]:>7d}" for w in WIDTHS[:4])
        n_bad = sum(1 for name, _ in failures if _group_of(name) == (dtype, direction, layout, vec))
        bad = str(n_bad) if vec > 1 else "-"
        print(f"{dtype:5s} {direction:8s} {layout:6s} {vec:3d} {len(rows):7d}  {st} | {ld}  {bad}")
    if failures:
        print(f"\ncheck_sass: FAILED: {len(failures)} vector-path kernels break the store-width rule:")
        for name, why in failures[:40]:
            print(f"  {name}: {why}")
        return 1
    n_vec = sum(len(r) for k, r in groups.items() if k[3] > 1 and not k[1].startswith(REDUCTIONS))
    n_red = sum(len(r) for k, r in groups.items() if k[3] > 1 and k[1].startswith(REDUCTIONS))
    print(
        f"\ncheck_sass: OK: {n_vec} vector-path kernels store as wide as they load, {n_red} vector-path "
        f"reductions store only their partial sums ({args.arch})"
    )
    return 0


REDUCTIONS = tuple(short for short, _args, reduction in KERNELS.values() if reduction)


def _group_of(name: str):
    info = describe(name)
    direction, dtype, _size, _acc, vec, flags, _reduction = info
    return dtype, direction, "chlast" if flags["CL"] else "contig", vec


if __name__ == "__main__":
    sys.exit(main())
