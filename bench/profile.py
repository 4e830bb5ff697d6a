"""Where the time goes: torch.profiler over lm_step calls and over LM-ResNeXt-50 training steps.

    python -m bench.profile [--out DIR] [--batch 128] [--steps 5]

For each provider it reports, per call (op) or per training step (model): the wall time under the profiler,
the CPU time of the host thread, and the GPU time summed over kernels, split into lm_step kernels, the
elementwise/reduction kernels around them, convolutions/GEMMs and batch norm; plus the top kernels. Wall time
well above GPU time means a launch-bound provider; lm_step or elementwise time above torchvision's says what
the LM update costs inside the network. Writes profile-<gpu>.json. On CPU it runs a tiny smoke version (CPU
op time in place of kernel time), which only checks that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import ROOT, environment, print_table, write_json
from bench.models import build, eager_updates, make_train_step
from bench.models import providers as model_providers
from bench.ops import HEADLINE, Config, inputs, make_fn
from bench.ops import providers as op_providers

# Kernel-name fragments of each category, first match wins (cuDNN / CUTLASS / Triton / aten kernel names).
CATEGORIES = (
    ("lm_step", ("lm_step",)),
    ("batch_norm", ("batch_norm", "bn_", "welford")),
    (
        "conv/gemm",
        ("conv", "gemm", "cutlass", "xmma", "sm80_", "sm90_", "cudnn", "implicit", "wgrad", "dgrad"),
    ),
    ("optimizer", ("multi_tensor", "foreach", "sgd")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return label
    return "elementwise/other"


def _device_events(prof, device: torch.device):
    """(name, count, self time in us) of every kernel (GPU) or every aten op (CPU smoke run)."""
    rows = []
    for event in prof.key_averages():
        on_gpu = event.device_type == torch.autograd.DeviceType.CUDA
        if device.type == "cuda" and on_gpu:
            rows.append((event.key, event.count, event.self_device_time_total))
        elif device.type != "cuda" and event.key.startswith("aten::"):
            rows.append((event.key, event.count, event.self_cpu_time_total))
    return rows


def profile_fn(fn, device: torch.device, iterations: int) -> dict:
    """Profile ``iterations`` calls of ``fn`` after warm-up; times per call, in ms."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        sync()
        wall = (time.perf_counter() - start) / iterations * 1e3
    events = _device_events(prof, device)
    by_category: dict[str, float] = {}
    for name, _, us in events:
        by_category[category(name)] = by_category.get(category(name), 0.0) + us / iterations / 1e3
    top = sorted(events, key=lambda e: -e[2])[:8]
    host = sum(e.self_cpu_time_total for e in prof.key_averages()) / iterations / 1e3
    return {
        "wall_ms": wall,
        "host_cpu_ms": host,
        "device_ms": sum(by_category.values()),
        "by_category_ms": by_category,
        "top": [{"name": n[:120], "calls": c / iterations, "ms": us / iterations / 1e3} for n, c, us in top],
    }


def op_rows(device: torch.device, iterations: int) -> list[dict]:
    """lm_step fwd+bwd at the headline shape (a small one on CPU) for each backend."""
    shape = HEADLINE if device.type == "cuda" else (4, 16, 8, 8)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    names = [p for p in op_providers(device) if not p.startswith("compile")]  # eager and the backends
    rows = []
    for layout in ("channels_last", "contiguous"):
        config = Config(shape, dtype, layout, "channel", True, True)
        *tensors, scale = inputs(config, device, requires_grad=True)
        grad_out = torch.randn_like(tensors[0])
        for provider in names:
            fn = make_fn(provider, config.relu)

            def call(fn=fn, tensors=tensors, scale=scale, grad_out=grad_out):
                return torch.autograd.grad(fn(*tensors, scale), tensors, grad_out)

            result = profile_fn(call, device, iterations)
            rows.append({"what": f"op {layout}", "provider": provider, **result})
    return rows


def model_rows(device: torch.device, batch: int, size: int, steps: int) -> list[dict]:
    """Training steps of ResNeXt-50: torchvision, the eager-update LM model, and lm_step on each backend."""
    rows = []
    for provider in model_providers(device):
        model = build("resnext50_32x4d", provider, device)
        swap = eager_updates() if provider == "eager" else contextlib.nullcontext()
        with swap:
            step = make_train_step(model, device, batch, size, compiled=False)
            rows.append({"what": "resnext50 step", "provider": provider, **profile_fn(step, device, steps)})
        print(rows[-1]["provider"], f"{rows[-1]['wall_ms']:.1f} ms/step", flush=True)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=None, help="model batch; default 128 on GPU, 2 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="profiled iterations; default 5 (GPU), 2")
    parser.add_argument("--what", nargs="+", choices=["op", "model"], default=["op", "model"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    steps = args.steps or (5 if gpu else 2)
    rows = []
    if "op" in args.what:
        rows += op_rows(device, steps * 4)
    if "model" in args.what:
        rows += model_rows(device, args.batch or (128 if gpu else 2), 224 if gpu else 32, steps)
    env = environment()
    name = "profile-" + ("".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower())
    write_json(args.out / f"{name}.json", {"environment": env, "rows": rows})
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    table = []
    for row in rows:
        cats = row["by_category_ms"]
        table.append(
            {
                "what": row["what"],
                "provider": row["provider"],
                "wall_ms": row["wall_ms"],
                "host_cpu_ms": row["host_cpu_ms"],
                "device_ms": row["device_ms"],
                **{label: cats.get(label, 0.0) for label in ("lm_step", "elementwise/other", "conv/gemm")},
            }
        )
    columns = [
        ("what", "s"),
        ("provider", "s"),
        ("wall_ms", ".3f"),
        ("host_cpu_ms", ".3f"),
        ("device_ms", ".3f"),
    ]
    columns += [("lm_step", ".3f"), ("elementwise/other", ".3f"), ("conv/gemm", ".3f")]
    print_table(table, columns)
    print(f"wrote {args.out / (name + '.json')}")


if __name__ == "__main__":
    main()
