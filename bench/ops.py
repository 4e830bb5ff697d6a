"""Op benchmark: lm_step against eager PyTorch, torch.compile and the copy-bandwidth roofline.

    python -m bench.ops                  # GPU: the ResNet-50/ResNeXt-50 grid; CPU: a small smoke grid
    python -m bench.ops --grid headline  # 64x256x56x56 bf16, all flags, + launch-bound rows
    python -m bench.ops --cuda-graph     # also the kernels' own time, replayed from a CUDA graph
    python -m bench.ops --out DIR        # JSON into DIR (ops-<gpu>[-<grid>][-graph].json)

Providers: ``eager`` (the original code's composition, in the activation dtype), ``compile`` and
``compile-max`` (torch.compile of that composition, default mode and max-autotune-no-cudagraphs; measured on
the bf16 configurations with scale and relu on, to keep compilation time bounded), and the
lmfused backends (``triton``, ``cuda``; ``reference`` on CPU). Modes: fwd, bwd, fwd+bwd. Every row reports the
median time per call as a Python loop sees it (``median_ms``, launch overhead included), with
``--cuda-graph`` the kernels' own time replayed from a CUDA graph (``gpu_ms``), the bandwidth achieved
counting DESIGN.md's minimum bytes and its fraction of a device-to-device copy measured in the same run,
the speedup over eager and over the best compile mode, and peak memory. The tiny launch-bound rows tell the
host overhead per call (``median_ms``) from the kernels' floor (``gpu_ms``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import lmfused
from bench.common import ROOT, copy_gbps, environment, graph_ms, median_ms, print_table, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
# Outputs of the four stages of ResNet-50 and ResNeXt-50 (the same widths), where the LM update runs.
STAGE_SHAPES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
HEADLINE = (64, 256, 56, 56)
SMOKE = (8, 32, 16, 16)  # the CPU grid
# So small that every provider is launch-bound: its wall time is the host overhead per call (Python, dispatch,
# launches), its CUDA-graph time the kernels' floor.
TINY = (2, 64, 8, 8)


@dataclass(frozen=True)
class Config:
    shape: tuple[int, ...]
    dtype: str
    layout: str  # "contiguous" | "channels_last"
    k: str  # "scalar" | "channel"
    scale: bool
    relu: bool


def grid(name: str, device: torch.device) -> list[Config]:
    """The configurations a grid measures."""
    if device.type != "cuda" or name == "smoke":
        return [Config(SMOKE, "fp32", lay, "channel", True, True) for lay in ("contiguous", "channels_last")]
    flags = list(itertools.product(("scalar", "channel"), (False, True), (False, True)))
    layouts = ("channels_last", "contiguous")  # the models' layout first: a time limit cuts the other
    headline = [Config(HEADLINE, "bf16", lay, k, s, r) for lay in layouts for k, s, r in flags]
    headline += [Config(TINY, "bf16", lay, "channel", True, True) for lay in layouts]
    if name == "headline":
        return headline
    sweep = [
        Config((batch, *stage), dtype, lay, "channel", True, True)
        for batch in (64, 256)
        for stage in STAGE_SHAPES
        for dtype in DTYPES
        for lay in ("contiguous", "channels_last")
    ]
    return headline + [c for c in sweep if c not in headline]


CUDA_GRAPH_TIMES = False  # set by --cuda-graph


def compiles(config: Config) -> bool:
    """Whether the torch.compile providers are measured on ``config``: compilation (max-autotune above all)
    costs up to minutes per configuration, so only bf16 with scale and relu on, the ImageNet-block case."""
    return config.scale and config.relu and (config.dtype == "bf16" or config.shape == SMOKE)


def min_bytes(config: Config, mode: str, itemsize: int) -> int:
    """DESIGN.md's minimum traffic: fwd 3 reads + 1 write; bwd reads g, u, u_prev (+ out) and writes 3."""
    numel = math.prod(config.shape)
    fwd = 4
    bwd = 3 + (1 if config.relu else 0) + 3
    tensors = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    return tensors * numel * itemsize


def eager_lm_step(u, u_prev, f, k, scale, relu: bool):
    """The update as the original LM-ResNet code writes it: separate ops (k cast to the activation dtype)."""
    k = k.to(u.dtype).reshape((1, -1) + (1,) * (u.dim() - 2)) if k.numel() > 1 else k.to(u.dtype)
    branch = f if scale is None else scale.to(u.dtype).reshape((-1,) + (1,) * (u.dim() - 1)) * f
    out = (1 - k) * u + k * u_prev + branch
    return torch.relu(out) if relu else out


def providers(device: torch.device) -> list[str]:
    names = ["eager", "compile", "compile-max"]
    if device.type == "cuda":
        names += [b for b in ("triton", "cuda") if b in lmfused.available_backends(device)]
    else:
        names += ["reference"]
    return names


def make_fn(provider: str, relu: bool):
    if provider == "eager":
        return lambda u, up, f, k, s: eager_lm_step(u, up, f, k, s, relu)
    if provider in ("compile", "compile-max"):
        mode = "max-autotune-no-cudagraphs" if provider == "compile-max" else None
        return torch.compile(
            lambda u, up, f, k, s: eager_lm_step(u, up, f, k, s, relu), mode=mode, dynamic=False
        )
    return lambda u, up, f, k, s: lmfused.lm_step(u, up, f, k, scale=s, relu=relu, backend=provider)


def inputs(config: Config, device: torch.device, requires_grad: bool):
    """Fresh random operands, drawn from the benchmark's own generator: a CUDA-graph capture that fails part
    way leaves the device's default generator unusable outside a capture, and the next rows still run."""
    dtype = DTYPES[config.dtype]
    memory_format = torch.channels_last if config.layout == "channels_last" else torch.contiguous_format
    gen = _generator(device)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=gen)

    u, u_prev, f = (
        randn(*config.shape, dtype=dtype)
        .contiguous(memory_format=memory_format)
        .requires_grad_(requires_grad)
        for _ in range(3)
    )
    k = (0.1 * randn(config.shape[1] if config.k == "channel" else 1)).requires_grad_(requires_grad)
    keep = torch.rand(config.shape[0], device=device, generator=gen) < 0.8
    scale = keep.float() / 0.8 if config.scale else None
    return u, u_prev, f, k, scale


@functools.cache
def _generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def measure(config: Config, provider: str, device: torch.device) -> dict[str, tuple]:
    """{mode: (median_ms, peak_mem_mb, graph_ms)} for one configuration and provider."""
    fn = make_fn(provider, config.relu)
    results = {}
    u, u_prev, f, k, scale = inputs(config, device, requires_grad=False)
    results["fwd"] = _timed(lambda: fn(u, u_prev, f, k, scale), device)
    *tensors, scale = inputs(config, device, requires_grad=True)
    grad_out = torch.empty_like(tensors[0]).normal_(generator=_generator(device))
    results["bwd"] = _timed_backward(fn, tensors, scale, grad_out, device)
    results["fwd+bwd"] = _timed(lambda: torch.autograd.grad(fn(*tensors, scale), tensors, grad_out), device)
    return results


def _timed_backward(fn, tensors, scale, grad_out, device: torch.device) -> tuple:
    """The backward alone, over one forward's graph. That graph holds the leaves' gradient accumulators, made
    on this stream, and goes with this function: a capture on another stream that reached them would sync
    with this one and be invalidated (torch 2.11 warns of the mismatch first)."""
    out = fn(*tensors, scale)
    return _timed(
        lambda: torch.autograd.grad(out, tensors, grad_out, retain_graph=True),
        device,
        graph_time=lambda: _backward_graph_ms(fn, tensors, scale, grad_out, device),
    )


def _backward_graph_ms(fn, tensors, scale, grad_out, device: torch.device) -> float | None:
    """CUDA-graph time of the backward alone. Autograd replays a backward on the stream its forward ran on,
    and a capture records only the capturing stream's work: so the forward runs on the capture stream, from
    new leaves (the same storage), whose gradient accumulators are made there too."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fn(*leaves, scale)
    backward = lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)  # noqa: E731
    return graph_ms(backward, device, stream=stream)


def _timed(fn, device: torch.device, graph_time=None) -> tuple[float, float | None, float | None]:
    """Wall time per call (what a Python loop sees), peak memory, and kernel time from a CUDA graph
    (``graph_time()`` if given, else ``fn`` captured as it is)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ms = median_ms(fn, device)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    gpu_ms = None
    if CUDA_GRAPH_TIMES and device.type == "cuda":
        gpu_ms = graph_time() if graph_time is not None else graph_ms(fn, device)
    return ms, peak, gpu_ms


def run(
    grid_name: str,
    device: torch.device,
    only: list[str] | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Measure every configuration of the grid; ``on_progress`` gets the payload so far after each one (so a
    run cut by a time limit keeps its rows)."""
    copy = copy_gbps(device)
    rows = []
    payload = {"environment": environment(), "copy_gbps": copy, "rows": rows, "complete": False}
    names = [p for p in providers(device) if only is None or p in only]
    for config in grid(grid_name, device):
        itemsize = DTYPES[config.dtype].itemsize
        measured = {
            p: measure(config, p, device) for p in names if not p.startswith("compile") or compiles(config)
        }
        for provider, mode in itertools.product(measured, MODES):
            ms, peak, gpu_ms = measured[provider][mode]
            nbytes = min_bytes(config, mode, itemsize)
            gbps = nbytes / ms / 1e6
            gpu_gbps = nbytes / gpu_ms / 1e6 if gpu_ms else None
            compile_best = min(
                (measured[p][mode][0] for p in ("compile", "compile-max") if p in measured), default=None
            )
            rows.append(
                {
                    **{key: value for key, value in asdict(config).items()},
                    "shape": "x".join(map(str, config.shape)),
                    "provider": provider,
                    "mode": mode,
                    "median_ms": ms,
                    "gbps": gbps,
                    "copy_gbps": copy,
                    "frac_of_copy": gbps / copy,
                    "gpu_ms": gpu_ms,
                    "gpu_gbps": gpu_gbps,
                    "gpu_frac_of_copy": gpu_gbps / copy if gpu_gbps else None,
                    "speedup_vs_eager": measured["eager"][mode][0] / ms if "eager" in measured else None,
                    "speedup_vs_compile": compile_best / ms if compile_best else None,
                    "peak_mem_mb": peak,
                }
            )
        torch._dynamo.reset()  # keep recompilation limits out of the way between shapes
        if on_progress is not None:
            on_progress(payload)
    payload["complete"] = True
    return payload


COLUMNS = [
    ("shape", "s"), ("dtype", "s"), ("layout", ".6s"), ("k", ".4s"), ("scale", "d"), ("relu", "d"),
    ("provider", "s"), ("mode", "s"), ("median_ms", ".3f"), ("frac_of_copy", ".2f"), ("gpu_ms", ".3f"),
    ("gpu_frac_of_copy", ".2f"), ("speedup_vs_eager", ".2f"), ("speedup_vs_compile", ".2f"),
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", choices=["full", "headline", "smoke"], default="full")
    parser.add_argument("--providers", nargs="+", default=None, help="subset of providers to run")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="output folder")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="also time kernels replayed from a CUDA graph"
    )
    args = parser.parse_args(argv)
    global CUDA_GRAPH_TIMES
    CUDA_GRAPH_TIMES = args.cuda_graph
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    name = "ops-" + ("".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower())
    name += "" if args.grid == "full" else f"-{args.grid}"
    name += "-graph" if args.cuda_graph else ""
    result = run(
        args.grid, device, args.providers, lambda payload: write_json(args.out / f"{name}.json", payload)
    )
    write_json(args.out / f"{name}.json", result)
    print(
        f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
        f"commit {env['commit']} | copy {result['copy_gbps']:.0f} GB/s"
    )
    print_table(result["rows"], COLUMNS)
    print(f"wrote {args.out / (name + '.json')}")


if __name__ == "__main__":
    main()
