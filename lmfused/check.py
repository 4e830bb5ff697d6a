"""``python -m lmfused.check``: are the fused kernels right on this machine?

Runs every path the model zoo takes by default on a GPU (lm_step, batch_norm_lm_step, batch_norm_relu, the
gradient pass-through (``return_shortcut=True``); the ReLU, stochastic-depth scale, per-channel k
and noise flags as the zoo sets them; forward, running statistics and every gradient) on each kernel backend
(cuda, triton), dtype (fp16, bf16, fp32) and layout (contiguous, channels_last), on small random tensors,
against the ``reference`` backend run in float64 on the same inputs. The update is the LM step of Lu, Zhong,
Li & Dong, *Beyond Finite Layer Neural Networks* (ICML 2018), with the batch norm of its branch fused in
(DESIGN.md 1, 1b).

    python -m lmfused.check              # on a GPU: a table, exit status 1 on any mismatch
    python -m lmfused.check --cpu        # the Triton kernels on CPU through TRITON_INTERPRET=1 (slow)
    python -m lmfused.check --cases adversarial --dtypes bf16 -v

How a result is judged: outputs and activation gradients element by element, ``|got - want| <= atol + rtol *
|want|`` with rtol about two roundings of the dtype; per-channel values (grad_k, grad_weight, grad_bias,
running statistics) to 1e-4 of their largest magnitude. A ReLU's gradient is compared with the float64
gradient under the kernel's own mask, ``out > 0`` of the output it returned: where a pre-activation rounds to
zero the mask is the kernel's to choose, but its gradient must agree with the output it gave. The
``adversarial`` cases make half of all pre-activations cancel to rounding level (u_prev = u and f = -u, or x
chosen so that BN(x) = -u, or BN(x) = 0) so that any difference between the forward's rounding and the
backward's recomputed mask shows; ``flips`` counts the elements where grad_u_prev's mask disagrees with out's
sign. Noise is checked in distribution (the backends agree with the reference in distribution, not bit for
bit): out minus the noise-free float64 update has mean 0 and standard deviation noise_std, and the same seed
gives the same noise.

Only the public API is used (``lmfused.lm_step(..., backend=...)`` and its siblings), so what is checked is
what a model runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

import lmfused
from lmfused.op_support import backend_unavailable_reason

__all__ = ["CASES", "Case", "main", "run_check"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("contiguous", "channels_last")
KERNEL_BACKENDS = ("cuda", "triton")
# Elementwise (rtol, atol): rtol about two roundings of the dtype (the kernels compute in float32 and round
# once, the float64 oracle does not round; Triton's interpreter rounds to bfloat16 toward zero), atol for
# results that cancel: some float32 roundings of terms up to about 10 (8 ulps of 10 are 7.6e-6).
TOLERANCES = {torch.float16: (1e-3, 3e-5), torch.bfloat16: (8e-3, 3e-5), torch.float32: (1e-5, 3e-5)}
REDUCTION_RTOL = 1e-4  # per-channel sums, relative to the largest magnitude of the vector
NOISE_STD = 0.1
VECTOR_SHAPE = (4, 32, 8, 8)  # rows of 64 and 32 channels: the vector paths
TAIL_SHAPE = (3, 24, 7, 7)  # rows of 49 (ResNet's 7x7 stage): the scalar and tail paths


@dataclass(frozen=True)
class Case:
    """One path of the model zoo: which public function, with which flags.

    ``first_block``: a stage's first block, the plain ResNet step (k = 0, a buffer; u_prev = u.detach(), the
    same memory as u). ``shortcut``: ``return_shortcut=True``, whose second output (the next step's
    u_prev) gets a gradient of its own (the gradient pass-through). ``adversarial``: half of the
    pre-activations cancel to rounding level.
    """

    name: str
    op: str  # "lm_step" | "batch_norm_lm_step" | "batch_norm_relu"
    what: str
    shape: tuple[int, ...] = VECTOR_SHAPE
    relu: bool = True
    per_channel_k: bool = False
    scale: bool = False
    noise: bool = False
    with_f: bool = True
    shortcut: bool = True
    first_block: bool = False
    training: bool = True
    adversarial: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.shape))}"


def _both_shapes(*cases: Case) -> list[Case]:
    return [c for case in cases for c in (case, replace(case, shape=TAIL_SHAPE))]


CASES: tuple[Case, ...] = (
    *_both_shapes(
        Case("lm_step/imagenet-sd", "lm_step", "LM block, BatchNorm unfused: relu, k per channel, "
             "stochastic-depth scale, pass-through", per_channel_k=True, scale=True),
        Case("lm_step/cifar", "lm_step", "pre-activation (CIFAR) LM block: no relu, scalar k, pass-through",
             relu=False),
    ),
    Case("lm_step/first-block", "lm_step", "a stage's first block: k = 0, u_prev = u.detach(), relu",
         first_block=True),
    Case("lm_step/dropped", "lm_step", "branch dropped for the batch (f = None), relu, scalar k",
         with_f=False),
    Case("lm_step/noise", "lm_step", "noise injection, relu, k per channel, scale", per_channel_k=True,
         scale=True, noise=True),
    *_both_shapes(
        Case("bn_lm_step/block", "batch_norm_lm_step", "ImageNet LM block's junction (default): training, "
             "relu, scalar k, affine, running statistics, pass-through"),
        Case("bn_lm_step/first-block", "batch_norm_lm_step", "a stage's first block: k = 0, "
             "u_prev = u.detach()", first_block=True),
    ),
    Case("bn_lm_step/block-sd", "batch_norm_lm_step", "junction with k per channel and stochastic depth",
         per_channel_k=True, scale=True),
    Case("bn_lm_step/eval", "batch_norm_lm_step", "junction in evaluation (running statistics folded)",
         training=False, shortcut=False),
    Case("bn_lm_step/noise", "batch_norm_lm_step", "junction with noise injection", noise=True),
    *_both_shapes(
        Case("bn_relu/train", "batch_norm_relu", "a branch's BatchNorm + ReLU, training", shortcut=False),
    ),
    Case("bn_relu/eval", "batch_norm_relu", "a branch's BatchNorm + ReLU, evaluation", training=False,
         shortcut=False),
    Case("adversarial/lm_step", "lm_step", "half the pre-activations cancel: u_prev = u, f = -u; k per "
         "channel", per_channel_k=True, adversarial=True),
    Case("adversarial/bn_lm_step", "batch_norm_lm_step", "half cancel: u_prev = u, x with BN(x) = -u; k per "
         "channel", per_channel_k=True, adversarial=True),
    Case("adversarial/bn_relu", "batch_norm_relu", "half cancel: bias with BN(x) = 0 at a repeated x",
         shortcut=False, adversarial=True),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------

ACTIVATIONS = ("x", "u", "u_prev", "f")  # compared element by element; everything else per channel


def _seed(case: Case, dtype: str, layout: str) -> int:
    """The same inputs for every backend (and worker process) of one case, dtype and layout."""
    return zlib.crc32(f"{case.label}/{dtype}/{layout}".encode())


def _inputs(case: Case, dtype: torch.dtype, layout: str, device: torch.device, seed: int) -> dict:
    """Fresh random inputs of ``case`` (never zeros): activations in ``dtype`` and ``layout``, parameters and
    running statistics in float32 (as under autocast), the incoming gradients ``g`` and ``g_shortcut``."""
    gen = torch.Generator().manual_seed(seed)
    shape, channels = case.shape, case.shape[1]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    def activation(t: Tensor) -> Tensor:
        return t.to(dtype).to(device).contiguous(memory_format=memory_format)

    t: dict[str, Tensor | None] = {}
    cancel = torch.rand(shape, generator=gen) < 0.5  # adversarial: where the pre-activation cancels
    u = randn(*shape).to(dtype).double()
    if case.op != "batch_norm_relu":
        t["u"] = u
        t["u_prev"] = torch.where(cancel, u, randn(*shape)) if case.adversarial else randn(*shape)
        t["k"] = 0.5 * randn(channels if case.per_channel_k else 1)
        if case.first_block:
            t["k"] = torch.zeros(1, dtype=torch.float64)
        t["scale"] = (torch.rand(shape[0], generator=gen) < 0.7).double() / 0.7 if case.scale else None
    if case.op == "lm_step":
        f = torch.where(cancel, -u, randn(*shape)) if case.adversarial else randn(*shape)
        t["f"] = f if case.with_f else None
    else:
        x = 2 * randn(*shape) + 0.5
        dims = [0, *range(2, len(shape))]
        weight, bias = 1 + 0.5 * randn(channels), 0.5 * randn(channels)
        if case.adversarial and case.op == "batch_norm_lm_step":
            # BN(x) = x to float32 round-off (weight = batch std, bias = batch mean), x = -u where u_prev = u:
            # the update (1 - k) u + k u + BN(x) cancels to rounding level there.
            x = torch.where(cancel, -u, x).to(dtype).double()
            weight = (x.var(dims, unbiased=False) + 1e-5).sqrt()
            bias = x.mean(dims)
        elif case.adversarial:
            # Half of each channel holds one repeated value v, and the bias puts BN(v) at 0.
            v = randn(channels).to(dtype).double()
            x = torch.where(cancel, v.reshape(1, -1, 1, 1), x).to(dtype).double()
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            weight = torch.ones(channels, dtype=torch.float64)
            bias = -(v - mean) / (var + 1e-5).sqrt()
        t["x"] = x
        t["weight"], t["bias"] = weight, bias
        t["running_mean"] = 0.3 * randn(channels)
        t["running_var"] = 0.5 + torch.rand(channels, generator=gen, dtype=torch.float64)
    t["g"] = randn(*shape)
    t["g_shortcut"] = randn(*shape) if case.shortcut else None
    return {
        name: None if v is None else activation(v) if v.shape == shape else v.float().to(device)
        for name, v in t.items()
    }


def _grad_names(case: Case) -> list[str]:
    """The inputs the zoo asks gradients for in this path (the first block's k and u_prev are constants)."""
    names = {"lm_step": ["u", "u_prev", "f", "k"], "batch_norm_relu": ["x", "weight", "bias"]}.get(
        case.op, ["x", "weight", "bias", "u", "u_prev", "k"]
    )
    if case.first_block:
        names = [n for n in names if n not in ("u_prev", "k")]
    return [n for n in names if n != "f" or case.with_f]


def _leaves(t: dict, case: Case, dtype: torch.dtype | None = None) -> dict:
    """Copies of the inputs (in ``dtype`` if given, layout kept), those of _grad_names requiring grad; the
    first block's u_prev is u.detach(), the same memory as u, as the zoo passes it."""
    out = {}
    for name, value in t.items():
        if value is not None:
            value = value.detach().clone() if dtype is None else value.detach().to(dtype)
            value.requires_grad_(name in _grad_names(case))
        out[name] = value
    if case.first_block:
        out["u_prev"] = out["u"].detach()
    return out


# ----------------------------------------------------------------------------------------------------------
# Running a case through the public API
# ----------------------------------------------------------------------------------------------------------


def _call(case: Case, t: dict, backend: str, *, relu: bool, noise_std: float) -> tuple[Tensor, Tensor | None]:
    """(out, shortcut or None) of the case's public function; functions are looked up on ``lmfused`` at call
    time, so what runs is what a user of the package gets."""
    if case.op == "lm_step":
        result = lmfused.lm_step(
            t["u"], t["u_prev"], t["f"], t["k"], scale=t["scale"], relu=relu, noise_std=noise_std,
            backend=backend, return_shortcut=case.shortcut,
        )  # fmt: skip
    elif case.op == "batch_norm_lm_step":
        result = lmfused.batch_norm_lm_step(
            t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], t["u"], t["u_prev"], t["k"],
            training=case.training, scale=t["scale"], relu=relu, noise_std=noise_std, backend=backend,
            return_shortcut=case.shortcut,
        )  # fmt: skip
    elif relu:
        result = lmfused.batch_norm_relu(
            t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], training=case.training,
            backend=backend,
        )  # fmt: skip
    else:  # the oracle of batch_norm_relu: BN(x) alone, as the junction on zero states without the ReLU
        zeros = torch.zeros_like(t["x"])
        result = lmfused.batch_norm_lm_step(
            t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], zeros, zeros,
            zeros.new_zeros(1), training=case.training, relu=False, backend=backend,
        )  # fmt: skip
    return result if case.shortcut else (result, None)


def _run(case: Case, t: dict, backend: str, *, relu: bool, noise_std: float, grad_out: Tensor) -> dict:
    """Forward and backward of one call: the output, every needed gradient and the running statistics."""
    out, shortcut = _call(case, t, backend, relu=relu, noise_std=noise_std)
    names = _grad_names(case)
    outputs, grads_in = [out], [grad_out]
    if shortcut is not None:
        outputs.append(shortcut)
        grads_in.append(t["g_shortcut"].to(shortcut.dtype))
    grads = torch.autograd.grad(outputs, [t[n] for n in names], grads_in)
    result = {"out": out.detach()}
    result.update({f"grad_{n}": g for n, g in zip(names, grads, strict=True)})
    for name in ("running_mean", "running_var"):
        if t.get(name) is not None:
            result[name] = t[name]
    return result


# ----------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------


def _ratio(got: Tensor, want: Tensor, elementwise: bool, dtype: torch.dtype) -> tuple[float, int]:
    """(worst error over its tolerance, elements beyond it): <= 1 passes; NaN is infinitely wrong."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return math.inf, want.numel()
    if elementwise:
        rtol, atol = TOLERANCES[dtype]
        tol = atol + rtol * want.abs()
    else:
        tol = REDUCTION_RTOL * max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    ratio = ((got - want).abs() / tol).nan_to_num(nan=math.inf)
    return (ratio.max().item() if ratio.numel() else 0.0), int((ratio > 1).sum())


def _noise_ratio(out: Tensor, pre: Tensor) -> tuple[float, str]:
    """How far out - pre (pre: the noise-free float64 update) is from N(0, NOISE_STD^2), where pre is clear of
    the ReLU: 1 = at the limit (standard deviation within 10%; mean within 5 standard errors, plus the
    rounding of out, which Triton's interpreter biases toward zero in bfloat16)."""
    keep = pre > 4 * NOISE_STD
    d = (out.double() - pre)[keep]
    if d.numel() < 100:
        return math.inf, f"only {d.numel()} elements clear of the ReLU"
    std, mean = d.std().item(), d.mean().item()
    mean_tol = 5 * NOISE_STD / math.sqrt(d.numel()) + TOLERANCES[out.dtype][0] / 2 * pre[keep].mean().item()
    ratio = max(abs(std / NOISE_STD - 1) / 0.1, abs(mean) / mean_tol)
    return ratio, f"noise mean {mean:+.4f} std {std:.4f} (want 0, {NOISE_STD}) over {d.numel()} elements"


def _in_layout(t: Tensor, layout: str) -> bool:
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.is_contiguous(memory_format=memory_format)


def run_check(case: Case, backend: str, dtype_name: str, layout: str, device: torch.device) -> dict:
    """One case on one backend, dtype and layout against the float64 reference; a result row."""
    dtype = DTYPES[dtype_name]
    row = {"case": case.name, "shape": "x".join(map(str, case.shape)), "backend": backend,
           "dtype": dtype_name, "layout": layout, "worst": 0.0, "worst_in": "-", "flips": None,
           "notes": []}  # fmt: skip
    start = time.perf_counter()
    try:
        _compare(case, backend, dtype, layout, device, row)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported with the rest
        row["worst"], row["worst_in"] = math.inf, "exception"
        row["notes"].append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
    row["status"] = "ok" if row["worst"] <= 1 and (not row["flips"]) else "FAIL"
    row["seconds"] = time.perf_counter() - start
    return row


def _compare(case: Case, backend: str, dtype: torch.dtype, layout: str, device: torch.device, row: dict):
    t = _inputs(case, dtype, layout, device, _seed(case, row["dtype"], layout))
    noise_std = NOISE_STD if case.noise else 0.0
    torch.manual_seed(0)
    got = _run(case, _leaves(t, case), backend, relu=case.relu, noise_std=noise_std, grad_out=t["g"])
    out = got["out"]
    # The oracle: the reference backend in float64 without the ReLU, its gradient fed through the kernel's
    # own mask (out > 0; NaN passes, as torch.relu's backward).
    mask = ~(out <= 0) if case.relu else torch.ones_like(out, dtype=torch.bool)
    oracle = _leaves(t, case, torch.float64)
    want = _run(case, oracle, "reference", relu=False, noise_std=0.0, grad_out=oracle["g"] * mask)
    pre = want["out"]
    want["out"] = pre.clamp_min(0) if case.relu else pre

    def record(what: str, ratio: float, bad: int = 0) -> None:
        if ratio > row["worst"]:
            row["worst"], row["worst_in"] = ratio, what
        if bad:
            row["notes"].append(f"{what}: {bad} elements beyond tolerance")

    for name, value in got.items():
        if name == "out" and case.noise:
            ratio, note = _noise_ratio(out, pre)
            record("noise", ratio)
            row["notes"].append(note)
            continue
        elementwise = name == "out" or name.removeprefix("grad_") in ACTIVATIONS
        record(name, *_ratio(value, want[name], elementwise, dtype))
        if elementwise and not _in_layout(value, layout):
            record(f"{name} layout", math.inf)
            row["notes"].append(f"{name} is not {layout} (strides {value.stride()})")
    if case.relu and "grad_u_prev" in got:
        # grad_u_prev = k g where out > 0, else 0: its mask must be out's sign (where k g cannot underflow).
        k = t["k"].double()
        k = k.reshape((1, -1) + (1,) * (out.dim() - 2)) if k.numel() > 1 else k
        clear = (k * t["g"].double()).abs() > 1e-3
        row["flips"] = int((((got["grad_u_prev"] != 0) != (out > 0)) & clear).sum())
        if row["flips"]:
            row["notes"].append(f"grad_u_prev: {row['flips']} elements whose mask disagrees with out's sign")
    if case.relu:
        row["notes"].append(f"{int((out == 0).sum())} of {out.numel()} outputs are 0")
    if case.noise:  # the same seed gives the same noise (here without autograd, as the first call with it)
        torch.manual_seed(0)
        with torch.no_grad():
            again = _call(case, _leaves(t, case), backend, relu=case.relu, noise_std=noise_std)[0]
        if not torch.equal(again, out):
            record("noise seed", math.inf)
            row["notes"].append("torch.manual_seed does not reproduce the noise")


# ----------------------------------------------------------------------------------------------------------
# Plan, workers, table
# ----------------------------------------------------------------------------------------------------------


def plan(cases: Sequence[Case], backends: Sequence[str], dtypes: Sequence[str], layouts: Sequence[str]):
    """Every (case, backend, dtype, layout) to check, grouped by (dtype, layout): a group is what one worker
    process runs (its Triton kernels compiled once, in that process)."""
    groups = [(d, lay) for d in dtypes for lay in layouts]
    return groups, [(c, b, d, lay) for d, lay in groups for c in cases for b in backends]


def _run_in_workers(args: argparse.Namespace, forwarded: list[str], count: int) -> list[dict]:
    """Run the groups in ``count`` processes at once (each compiles its Triton kernels in parallel with the
    others: the first run on a machine is bound by compilation) and gather their rows."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lmfused-check-") as folder:
        procs = []
        for index in range(count):
            path = Path(folder) / f"shard{index}.json"
            shard = ["--shard", f"{index}/{count}", "--json", str(path), "--jobs", "1"]
            cmd = [sys.executable, "-m", "lmfused.check", *forwarded, *shard]
            procs.append((subprocess.Popen(cmd, stdout=None if args.verbose else subprocess.DEVNULL), path))
        for index, (proc, path) in enumerate(procs):
            proc.wait()
            if path.exists():
                rows += json.loads(path.read_text())["rows"]
            else:
                note = f"worker exited with status {proc.returncode}"
                rows.append(
                    {"case": f"(worker {index}/{count})", "shape": "-", "backend": "-", "dtype": "-",
                     "layout": "-", "status": "FAIL", "worst": math.inf, "worst_in": "worker", "flips": None,
                     "notes": [note]}
                )  # fmt: skip
    return rows


def _cell(rows: list[dict]) -> str:
    if not rows:
        return "-"
    worst = max(r["worst"] for r in rows)
    text = "inf" if math.isinf(worst) else f"{worst:.2f}"
    return text if all(r["status"] == "ok" for r in rows) else f"FAIL {text}"


def table(rows: list[dict], dtypes: Sequence[str], layouts: Sequence[str]) -> str:
    """One line per case and backend, one column per dtype and layout: the worst error over its tolerance
    (<= 1 passes; FAIL marks a mismatch), then the failures in full."""
    columns = [(d, lay) for d in dtypes for lay in layouts]
    keys = list(dict.fromkeys((r["case"], r["shape"], r["backend"]) for r in rows))
    head = ["case", "shape", "backend"]
    head += [f"{d}/{'cl' if lay == 'channels_last' else 'contig'}" for d, lay in columns]
    cells = [head]
    for key in keys:
        mine = [r for r in rows if (r["case"], r["shape"], r["backend"]) == key]
        cells.append([*key, *(_cell([r for r in mine if (r["dtype"], r["layout"]) == c]) for c in columns)])
    widths = [max(len(line[i]) for line in cells) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines.append("")
        lines.append("Failures:")
        for r in failed:
            where = f"{r['case']} {r['shape']} {r['backend']} {r['dtype']} {r['layout']}"
            lines.append(f"  {where}: worst {r['worst']:.3g} in {r['worst_in']}; " + "; ".join(r["notes"]))
    flips = sum(r["flips"] or 0 for r in rows)
    checked = sum(1 for r in rows if r["flips"] is not None)
    lines.append("")
    verdict = f"{len(rows)} checks, {len(failed)} failed"
    lines.append(f"{verdict}; ReLU mask against out's sign: {flips} flips in {checked} checks")
    return "\n".join(lines)


def _describe(cases: Sequence[Case], backends: Sequence[str], dtypes, layouts) -> str:
    lines = [f"  {c.label:<34} {c.what}" for c in cases]
    return (
        f"{len(cases)} cases x backends {', '.join(backends)} x dtypes {', '.join(dtypes)} x layouts "
        f"{', '.join(layouts)}, against the reference backend in float64:\n" + "\n".join(lines)
    )


def _environment(device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return (
        f"lmfused {lmfused.__version__} on {where} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
        f"Triton {triton_version}"
    )


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m lmfused.check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="run on CPU, the Triton kernels through TRITON_INTERPRET=1 (what CI can run)",
    )
    parser.add_argument("--backends", nargs="+", choices=KERNEL_BACKENDS, help="default: every one available")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--cases", nargs="+", metavar="TEXT", help="only the cases whose name contains TEXT")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes, each one (dtype, layout) group at a time; default on a GPU: up to 6 "
        "(compiling the Triton kernels is most of a first run), on CPU 1",
    )
    parser.add_argument("--json", type=Path, help="also write every result row to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per check as it finishes")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # I/N: the groups of one worker
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    forwarded = list(argv)
    for flag in ("--jobs", "--json", "--shard"):  # the parent's own options, not the workers'
        while flag in forwarded:
            i = forwarded.index(flag)
            del forwarded[i : i + 2]
    return args, forwarded


def main(argv: list[str] | None = None) -> int:
    """Run the checks (or, on a machine without CUDA and without --cpu, say what they would be); returns the
    exit status: 0 if every check passed, 1 on any mismatch or error (or if nothing could be checked)."""
    args, forwarded = _parse(argv)
    if args.cpu and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be chosen before the Triton kernels are defined, i.e. before lmfused imports.
        env = dict(os.environ, TRITON_INTERPRET="1")
        again = [sys.executable, "-m", "lmfused.check", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.call(again, env=env)
    cases = [c for c in CASES if not args.cases or any(text in c.name for text in args.cases)]
    if not cases:
        print(f"--cases {' '.join(args.cases)}: no case matches; cases: {', '.join(c.name for c in CASES)}")
        return 1
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu and not args.cpu:
        what = _describe(cases, args.backends or KERNEL_BACKENDS, args.dtypes, args.layouts)
        print(f"lmfused.check: no CUDA device here, nothing run. On a GPU it checks {what}")
        print("(`python -m lmfused.check --cpu`: the same on CPU, Triton through TRITON_INTERPRET=1)")
        return 0
    available = [b for b in KERNEL_BACKENDS if b in lmfused.available_backends(device)]
    backends = [b for b in (args.backends or available)]
    missing = [b for b in backends if b not in available]
    if missing or not backends:
        for name in missing or KERNEL_BACKENDS:
            why = backend_unavailable_reason(name, device.type)
            print(f"lmfused.check: {name} not available on {device.type}: {why}")
        return 1
    groups, todo = plan(cases, backends, args.dtypes, args.layouts)
    index, count = (int(p) for p in args.shard.split("/"))
    mine = set(groups[index::count])
    jobs = args.jobs
    if jobs is None:  # a worker per group on a GPU, with half the cores: compiling is most of a first run
        jobs = min(len(groups), max(1, (os.cpu_count() or 2) // 2)) if on_gpu else 1
    start = time.perf_counter()
    if count == 1 and jobs > 1:
        rows = _run_in_workers(args, forwarded, min(jobs, len(groups)))
    else:
        rows = []
        for case, backend, dtype, layout in todo:
            if (dtype, layout) not in mine:
                continue
            rows.append(run_check(case, backend, dtype, layout, device))
            if args.verbose:
                r = rows[-1]
                print(f"{r['status']:4} {r['worst']:8.3f}  {backend:6} {dtype} {layout:13} {case.label}",
                      flush=True)  # fmt: skip
    if args.json:
        payload = {"environment": _environment(device), "rows": rows}
        args.json.write_text(json.dumps(payload, default=str) + "\n")
    if count > 1:  # a worker: its parent prints the table
        return int(any(r["status"] != "ok" for r in rows))
    print(f"lmfused.check: {_environment(device)}")
    print(f"worst error over tolerance per case (<= 1 passes), against the reference backend in float64; "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    print(table(rows, args.dtypes, args.layouts))
    return int(any(r["status"] != "ok" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
