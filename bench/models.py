"""Model benchmark: training-step throughput of ResNet-50 / ResNeXt-50 and their LM versions.

    python -m bench.models [--batch 128] [--size 224] [--steps 20] [--out DIR]

Rows: torchvision's plain model (``torchvision``), the LM model with the update written as separate eager
PyTorch ops as the original code does (``eager``), and the LM model with ``lm_step`` on each lmfused backend;
each with and without torch.compile. Synthetic data, SGD with momentum, bf16 autocast, channels_last. Reports
the median img/s over timed steps after warm-up, and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lmfused
import lmfused.nn.step
from bench.common import ROOT, environment, print_table, write_json
from bench.ops import eager_lm_step

MODELS = {"resnet50": "lm_resnet50", "resnext50_32x4d": "lm_resnext50_32x4d"}


def _eager_update(u, u_prev, f, k, *, scale=None, relu=False, noise_std=0.0, backend=None):
    """The update as separate PyTorch ops (what LM-ResNet code without lmfused runs)."""
    if f is None:
        f = torch.zeros_like(u)
    return eager_lm_step(u, u_prev, f, k, scale, relu)


@contextlib.contextmanager
def eager_updates():
    """Swap the fused op in lmfused's modules for the eager composition."""
    fused = lmfused.nn.step.lm_step
    lmfused.nn.step.lm_step = _eager_update
    try:
        yield
    finally:
        lmfused.nn.step.lm_step = fused


def build(model_name: str, provider: str, device: torch.device) -> torch.nn.Module:
    if provider == "torchvision":
        import torchvision

        return getattr(torchvision.models, model_name)().to(device)
    backend = None if provider == "eager" else provider
    return lmfused.models.create_model(MODELS[model_name], backend=backend).to(device)


def make_train_step(model, device, batch: int, size: int, compiled: bool):
    """One SGD training step on a fixed synthetic batch (bf16 autocast, channels_last), as a closure."""
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    forward = torch.compile(model) if compiled else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train_throughput(model, device, batch: int, size: int, steps: int, warmup: int, compiled: bool):
    """(median img/s, peak memory GB) of SGD training steps on synthetic data."""
    step = make_train_step(model, device, batch, size, compiled)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return batch / statistics.median(times), peak


def providers(device: torch.device) -> list[str]:
    names = []
    try:
        import torchvision  # noqa: F401

        names.append("torchvision")
    except ImportError:
        print("torchvision is not installed: no plain torchvision rows")
    names.append("eager")
    if device.type != "cuda":
        return names + ["reference"]  # the Triton interpreter is far too slow for whole models
    return names + [b for b in lmfused.available_backends(device) if b != "reference"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=None, help="default 128 on GPU, 4 on CPU")
    parser.add_argument("--size", type=int, default=None, help="image size; default 224 on GPU, 64 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 20 on GPU, 2 on CPU")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch = args.batch or (128 if gpu else 4)
    size = args.size or (224 if gpu else 64)
    steps = args.steps or (20 if gpu else 2)
    rows = []
    for model_name in args.models:
        for provider in providers(device):
            for compiled in (False, True) if (gpu and not args.no_compile) else (False,):
                torch._dynamo.reset()
                model = build(model_name, provider, device)
                swap = eager_updates() if provider == "eager" else contextlib.nullcontext()
                with swap:
                    img_s, peak = train_throughput(
                        model, device, batch, size, steps, 5 if gpu else 1, compiled
                    )
                rows.append(
                    {
                        "model": model_name,
                        "provider": provider,
                        "compiled": compiled,
                        "batch": batch,
                        "img_per_s": img_s,
                        "peak_mem_gb": peak,
                    }
                )
                print(rows[-1], flush=True)
                del model
                if gpu:
                    torch.cuda.empty_cache()
    env = environment()
    name = "models-" + ("".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower())
    write_json(args.out / f"{name}.json", {"environment": env, "image_size": size, "rows": rows})
    print(
        f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
        f"commit {env['commit']} | batch {batch} | {size}x{size} | bf16 autocast, channels_last"
    )
    print_table(
        rows,
        [
            ("model", "s"),
            ("provider", "s"),
            ("compiled", "d"),
            ("batch", "d"),
            ("img_per_s", ".1f"),
            ("peak_mem_gb", ".2f"),
        ],
    )


if __name__ == "__main__":
    main()
