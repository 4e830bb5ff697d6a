"""Junction benchmark: a ResNeXt-50 block's batch norms as the model runs them, at the four stage shapes.

    python -m bench.junction [--out DIR]          # GPU: batch 64, bf16, channels_last, forward + backward
    python -m bench.junction --report FILE.json   # the short table (and the target) of a run

Two ops, each forward + backward in training (every gradient: x, the BatchNorm's weight and bias, and for
the junction u, u_prev and k), against a device-to-device copy of one activation measured in the same run:

* ``junction``, the end of a post-activation block: torchvision's BatchNorm + add + ReLU (``F.batch_norm``,
  ``out += identity``, ``relu_``, as its Bottleneck runs it; ``torchvision``), the LM update written in plain
  PyTorch after ``F.batch_norm`` (``plain-lm``), both eager and under ``torch.compile``, and
  ``lmfused.batch_norm_lm_step`` (scalar k, relu; ``cuda``, ``triton``). The LM update is Lu, Zhong, Li &
  Dong, *Beyond Finite Layer Neural Networks* (ICML 2018), eq. (5), with the branch's batch norm fused in.
* ``bn_relu``, the batch norms inside the branch: ``F.batch_norm`` + ``relu_`` (``torchvision``, eager and
  compiled) against ``lmfused.batch_norm_relu``.

Every row gives the wall time per call (launch overhead included), the kernels' own time replayed from a
CUDA graph, the ratio of torchvision's eager time to the row's (the target for batch_norm_lm_step: at least
1 at every stage shape), and ``x_at_copy``: the kernel time in activations moved at copy speed (a copy of one
activation moves 2 X in its time), to hold against the byte counts of ``python -m bench.traffic``. Rows run
eager first (every shape), then compiled, and the JSON is rewritten after each row, so a run cut by a time
limit keeps what it measured and lists what it skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import lmfused
from bench.common import ROOT, environment, graph_ms, median_ms, write_json
from bench.ops import STAGE_SHAPES, eager_lm_step

BATCH = 64
SMOKE_SHAPES = [(4, 16, 8, 8)]  # the CPU run
OPS = ("junction", "bn_relu")
MOMENTUM, EPS = 0.1, 1e-5


def shapes(device: torch.device) -> list[tuple[int, ...]]:
    """The four ResNeXt-50 stage outputs at batch 64 on a GPU; one small shape on CPU."""
    return [(BATCH, *stage) for stage in STAGE_SHAPES] if device.type == "cuda" else SMOKE_SHAPES


def inputs(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> dict:
    """Random activations (channels_last) and fresh BatchNorm parameters and statistics; scalar k."""
    channels = shape[1]

    def activation() -> torch.Tensor:
        t = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return t.requires_grad_()

    return {
        "x": activation(),
        "u": activation(),
        "u_prev": activation(),
        "weight": (1 + 0.1 * torch.randn(channels, device=device)).requires_grad_(),
        "bias": (0.1 * torch.randn(channels, device=device)).requires_grad_(),
        "running_mean": torch.zeros(channels, device=device),
        "running_var": torch.ones(channels, device=device),
        "k": (-0.05 * torch.rand(1, device=device)).requires_grad_(),
    }


def _batch_norm(t: dict) -> torch.Tensor:
    return F.batch_norm(
        t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], True, MOMENTUM, EPS
    )


def _torchvision_junction(t: dict) -> torch.Tensor:
    out = _batch_norm(t)
    out += t["u"]  # torchvision's Bottleneck: out += identity; relu (in place)
    return torch.relu_(out)


def _plain_lm_junction(t: dict) -> torch.Tensor:
    return eager_lm_step(t["u"], t["u_prev"], _batch_norm(t), t["k"], None, True)


def function(op: str, provider: str) -> tuple[Callable[[dict], torch.Tensor], tuple[str, ...]]:
    """(the forward of ``provider`` for ``op``, the inputs it takes gradients of)."""
    base, _, compiled = provider.partition("+")
    if op == "bn_relu":
        leaves = ("x", "weight", "bias")
        if base == "torchvision":
            fn = lambda t: torch.relu_(_batch_norm(t))  # noqa: E731
        else:
            fn = lambda t: lmfused.batch_norm_relu(  # noqa: E731
                t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], training=True,
                momentum=MOMENTUM, eps=EPS, backend=base,
            )  # fmt: skip
    elif base == "torchvision":
        fn, leaves = _torchvision_junction, ("x", "weight", "bias", "u")
    else:
        leaves = ("x", "weight", "bias", "u", "u_prev", "k")
        if base == "plain-lm":
            fn = _plain_lm_junction
        else:
            fn = lambda t: lmfused.batch_norm_lm_step(  # noqa: E731
                t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], t["u"], t["u_prev"],
                t["k"], training=True, momentum=MOMENTUM, eps=EPS, relu=True, backend=base,
            )  # fmt: skip
    if compiled:
        fn = torch.compile(fn, dynamic=False)
    return fn, leaves


def providers(op: str, device: torch.device, compile_rows: bool) -> list[str]:
    """Eager providers, then (``compile_rows``) the compiled ones: ``name+compile``."""
    plain = ["torchvision"] + (["plain-lm"] if op == "junction" else [])
    fused = [b for b in ("cuda", "triton") if b in lmfused.available_backends(device)]
    if device.type != "cuda":
        fused = ["reference"]
    return plain + fused + ([f"{p}+compile" for p in plain] if compile_rows else [])


def plan(device: torch.device, compile_rows: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """(op, shape, provider) in the order they run: every eager row (all shapes), then the compiled ones, so
    that a time limit cuts compilation first."""
    rows = [(op, shape, p) for shape in shapes(device) for op in OPS for p in providers(op, device, False)]
    if compile_rows:
        rows += [
            (op, shape, p)
            for shape in shapes(device)
            for op in OPS
            for p in providers(op, device, True)
            if p.endswith("+compile")
        ]
    return rows


def measure(op: str, shape: tuple[int, ...], provider: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Wall and CUDA-graph time of one forward + backward."""
    t = inputs(shape, device, dtype)
    fn, leaves = function(op, provider)
    grad_out = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def step():
        return torch.autograd.grad(fn(t), [t[name] for name in leaves], grad_out)

    started = time.perf_counter()
    step()  # compile (torch.compile, Triton) outside the timings
    warmup_s = time.perf_counter() - started
    return {"wall_ms": median_ms(step, device), "gpu_ms": graph_ms(step, device), "warmup_s": warmup_s}


def copy_times(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> dict:
    """One activation copied device to device (reads X, writes X): the yardstick of the rows."""
    src = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    dst = torch.empty_like(src)
    step = lambda: dst.copy_(src)  # noqa: E731
    return {"wall_ms": median_ms(step, device), "gpu_ms": graph_ms(step, device)}


def _time(row: dict) -> float | None:
    return row.get("gpu_ms") or row.get("wall_ms")


def add_ratios(rows: list[dict], copies: dict) -> None:
    """vs_torchvision (torchvision eager's time over the row's) and x_at_copy, kernel time where measured."""
    base = {(r["op"], r["shape"]): _time(r) for r in rows if r["provider"] == "torchvision" and _time(r)}
    for r in rows:
        mine, reference = _time(r), base.get((r["op"], r["shape"]))
        r["vs_torchvision"] = reference / mine if mine and reference else None
        copy = copies.get(r["shape"])
        r["x_at_copy"] = 2 * mine / _time(copy) if mine and copy and _time(copy) else None


def run(device: torch.device, compile_rows: bool, time_budget: float | None, out: Path | None) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    copies: dict[str, dict] = {}
    payload = {"environment": environment(), "dtype": str(dtype), "rows": rows, "copies": copies}
    started = time.perf_counter()
    for op, shape, provider in plan(device, compile_rows):
        name = "x".join(map(str, shape))
        row = {"op": op, "shape": name, "provider": provider}
        if time_budget is not None and time.perf_counter() - started > time_budget:
            row["status"] = "skipped (time budget)"
        else:
            torch._dynamo.reset()
            try:
                if name not in copies:
                    copies[name] = copy_times(shape, device, dtype)
                row.update(measure(op, shape, provider, device, dtype))
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        add_ratios(rows, copies)
        print(row, flush=True)
        if out is not None:
            write_json(out, payload)
    return payload


def report(payload: dict) -> str:
    """The short table: per op and shape, each provider's kernel time (wall time where no CUDA graph), the
    ratio to torchvision eager and x_at_copy; then the target line for batch_norm_lm_step."""
    env = payload["environment"]
    lines = [
        f"Junction fwd+bwd on {env['device']} (torch {env['torch']}, Triton {env['triton']}, commit "
        f"{env['commit']}), {payload['dtype']}, channels_last; ms = CUDA-graph kernel time [wall]; "
        "vs tv = torchvision eager / row; X@copy = activations a copy moves in that time",
        f"{'op':8} {'shape':>15} {'provider':>22} {'ms':>8} {'[wall]':>9} {'vs tv':>6} {'X@copy':>7}",
    ]
    for r in payload["rows"]:
        if r.get("status") != "ok":
            lines.append(f"{r['op']:8} {r['shape']:>15} {r['provider']:>22}  {r.get('status')}")
            continue
        gpu = f"{r['gpu_ms']:.3f}" if r.get("gpu_ms") else "-"
        ratio = f"{r['vs_torchvision']:.2f}" if r.get("vs_torchvision") else "-"
        copy = f"{r['x_at_copy']:.1f}" if r.get("x_at_copy") else "-"
        lines.append(
            f"{r['op']:8} {r['shape']:>15} {r['provider']:>22} {gpu:>8} [{r['wall_ms']:7.3f}] {ratio:>6} "
            f"{copy:>7}"
        )
    fused = [r for r in payload["rows"] if r["op"] == "junction" and r.get("vs_torchvision")]
    fused = [r for r in fused if r["provider"] in ("cuda", "triton", "reference")]
    for shape in dict.fromkeys(r["shape"] for r in fused):
        best = max((r for r in fused if r["shape"] == shape), key=lambda r: r["vs_torchvision"])
        verdict = "met" if best["vs_torchvision"] >= 1 else "MISSED"
        lines.append(
            f"target batch_norm_lm_step no slower than torchvision eager at {shape}: {verdict} "
            f"({best['provider']}, {best['vs_torchvision']:.2f}x)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="output folder")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile rows (default on CPU)")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds; rows not started by then are skipped"
    )
    parser.add_argument("--report", type=Path, help="print the short table of this JSON and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    name = "junction-" + "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    path = args.out / f"{name}.json"
    payload = run(device, device.type == "cuda" and not args.no_compile, args.time_budget, path)
    print(report(payload))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
