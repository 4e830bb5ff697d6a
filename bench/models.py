"""Model benchmark: training-step throughput of ResNet-50 / ResNeXt-50 and their LM versions.

    python -m bench.models [--batch 128] [--size 224] [--steps 20] [--out DIR]
    python -m bench.models --compile-providers torchvision plain-pytorch cuda --time-budget 170

Providers: torchvision's plain model (``torchvision``); the zoo's LM model with every lmfused op replaced by
plain PyTorch, as a user without lmfused writes it (``plain-pytorch``: nn.BatchNorm2d, ReLU and the LM update
as torch ops in float32, the fused op's numerics; see :func:`plain_pytorch_lm`); the LM model with the
lmfused ops on each backend (``cuda``, ``triton``; ``reference`` on CPU), the fastest of them also with every
BatchNorm outside the lmfused kernels (``+unfused-bn``), without the gradient pass-through between steps
(``+no-passthrough``) and, compiled, with the junction decomposed into plain ops for Inductor
(``+decomposed``). Each is measured eagerly, and compiled with
``torch.compile`` for the providers in ``--compile-providers`` (default on a GPU: every provider, the plain
torchvision, the plain-PyTorch LM and the fastest fused backend first). Synthetic data, SGD with momentum,
bf16 autocast, channels_last, all rows in the same run. Reports the median img/s over timed steps after
warm-up, the peak memory (``torch.cuda.max_memory_allocated`` over the timed steps, after a reset) beside
bench.memory's prediction of it (fake tensors, no GPU), the warm-up (compile) time, and the ratio to eager
torchvision of the same model. Every row says what ran (``ran``) and, for eager rows, how many lmfused ops
one training step dispatched (``lmfused_ops``, counted after the timing).

Rows run in priority order (every eager row, then the compiled ones) and the JSON is rewritten after every
row, so a run stopped by ``--time-budget`` or an outer timeout keeps what it measured; rows it had no time
for are listed as skipped, never dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lmfused
from bench.common import (
    ROOT,
    dispatched_ops,
    environment,
    environment_settings,
    lmfused_ops,
    print_table,
    write_json,
)
from lmfused.nn import LMStep, ResidualStep
from lmfused.nn.step import plain_update

MODELS = {"resnext50_32x4d": "lm_resnext50_32x4d", "resnet50": "lm_resnet50"}
PLAIN_PYTORCH = "plain-pytorch"  # the LM network with every lmfused op replaced by plain PyTorch


# Variants of a fused provider ("cuda+decomposed"): the environment a row runs under.
VARIANTS = {
    "decomposed": {"LMFUSED_COMPILE_JUNCTION": "decompose"},  # compiled: the junction as plain ops
    "unfused-bn": {"LMFUSED_FUSE_BN": "0"},  # every BatchNorm outside the lmfused kernels
    "no-passthrough": {"LMFUSED_GRADIENT_PASSTHROUGH": "0"},  # autograd adds the two gradients of u_n
}


@contextlib.contextmanager
def variant_environment(provider: str):
    """Set the environment of ``provider``'s variant (if any) for the duration of its row."""
    _, _, variant = provider.partition("+")
    with environment_settings(VARIANTS[variant] if variant else {}):
        yield


class _PlainPyTorchUpdate:
    """The zoo step's update as :func:`plain_update` instead of an lmfused op (a block whose last norm is an
    :class:`UnfusedBatchNorm2d` calls it with that norm's output)."""

    def update_and_shortcut(
        self, u: Tensor, u_prev: Tensor | None, f: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        lm = isinstance(self, LMStep) and u_prev is not None
        u = u.to(f.dtype if f is not None else u.dtype)  # the branch's dtype, as the fused step
        out = plain_update(
            u,
            u_prev.to(u.dtype) if lm else None,
            f,
            self.k if lm else None,
            self._scale(u, f),
            self.relu,
            self.noise_std if self.training else 0.0,
        )
        return out, u  # u itself is the next step's u_prev: autograd adds its two gradients


class PlainPyTorchResidualStep(_PlainPyTorchUpdate, ResidualStep):
    """:class:`lmfused.nn.ResidualStep` (stochastic depth, noise, ReLU) in plain PyTorch."""


class PlainPyTorchLMStep(_PlainPyTorchUpdate, LMStep):
    """:class:`lmfused.nn.LMStep` (same k parameter) in plain PyTorch."""


class UnfusedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d itself (F.batch_norm); lmfused fuses only an exact nn.BatchNorm2d into its kernels
    (``lmfused.nn.step.fuses_batch_norm``), so the stem's and the branches' BatchNorm + ReLU stay plain."""


_PLAIN_CLASSES = {
    ResidualStep: PlainPyTorchResidualStep,
    LMStep: PlainPyTorchLMStep,
    nn.BatchNorm2d: UnfusedBatchNorm2d,
}


def plain_pytorch_lm(model: nn.Module) -> nn.Module:
    """``model`` (a zoo or converted LM network) with every lmfused op replaced by plain PyTorch, in place:
    each update module's class becomes its plain twin (same parameters, state_dict names and options: the
    update as :func:`plain_update`) and each nn.BatchNorm2d an :class:`UnfusedBatchNorm2d`, which the blocks
    and the stem call as the module (F.batch_norm) followed by ReLU. Needs no environment setting; its
    training step dispatches no lmfused op (tests/test_bench.py)."""
    for module in model.modules():
        if isinstance(module, ResidualStep | nn.BatchNorm2d):
            if type(module) not in _PLAIN_CLASSES:
                raise TypeError(f"model: no plain-PyTorch twin of {type(module).__name__}")
            module.__class__ = _PLAIN_CLASSES[type(module)]
    return model


@contextlib.contextmanager
def eager_updates():
    """Formerly the swap of one module-level name (which the gradient pass-through made ineffective); the
    plain-PyTorch provider needs no context now (:func:`plain_pytorch_lm`). Kept for bench.profile: it only
    sets ``LMFUSED_FUSE_BN=0`` for its duration."""
    with variant_environment("plain+unfused-bn"):
        yield


def ran(model_name: str, provider: str) -> str:
    """What a row of ``provider`` runs, in words (each row of the results says it)."""
    base, _, variant = provider.partition("+")
    if base == "torchvision":
        return f"torchvision {model_name}"
    if base in (PLAIN_PYTORCH, "eager"):
        return (f"{MODELS[model_name]} with every lmfused op replaced by plain PyTorch (nn.BatchNorm2d, "
                "ReLU, the LM update as torch ops in float32 by type promotion)")  # fmt: skip
    settings = " ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()) if variant else "default settings"
    return f"{MODELS[model_name]}, lmfused ops on the {base} backend ({settings})"


def build(model_name: str, provider: str, device: torch.device) -> torch.nn.Module:
    """The model a row measures: torchvision's, the plain-PyTorch LM network, or lmfused's LM version on
    ``provider``'s backend (``eager``: bench.profile's name for the plain-PyTorch provider)."""
    provider = provider.partition("+")[0]
    if provider == "torchvision":
        import torchvision

        return getattr(torchvision.models, model_name)().to(device)
    if provider in (PLAIN_PYTORCH, "eager"):
        return plain_pytorch_lm(lmfused.models.create_model(MODELS[model_name])).to(device)
    return lmfused.models.create_model(MODELS[model_name], backend=provider).to(device)


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
    """(median img/s, peak memory GB, warm-up seconds) of SGD training steps on synthetic data; the peak is
    torch.cuda.max_memory_allocated over the timed steps (reset after the warm-up), None on CPU."""
    step = make_train_step(model, device, batch, size, compiled)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return batch / statistics.median(times), peak, warmup_s


def count_lmfused_ops(model: nn.Module, device: torch.device, size: int) -> int | str:
    """How many lmfused ops one training step of ``model`` (batch 2) dispatches, or why it could not be
    counted (a failed count does not fail the row it describes)."""
    try:
        return lmfused_ops(dispatched_ops(make_train_step(model, device, 2, size, compiled=False)))
    except Exception as exc:  # noqa: BLE001 - the row's timing stands without this count
        return f"not counted: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def providers(device: torch.device) -> list[str]:
    """Providers runnable here: torchvision (if installed), the plain-PyTorch LM, and the fused backends."""
    names = []
    try:
        import torchvision  # noqa: F401

        names.append("torchvision")
    except Exception as exc:  # noqa: BLE001 - a torchvision that fails to import is as good as absent
        print(f"torchvision is not importable ({type(exc).__name__}): no plain torchvision rows")
    names.append(PLAIN_PYTORCH)
    if device.type != "cuda":
        return names + ["reference"]  # the Triton interpreter is far too slow for whole models
    return names + [b for b in lmfused.available_backends(device) if b != "reference"]


def _fused(names: list[str]) -> list[str]:
    return [
        p for p in names if p not in ("torchvision", PLAIN_PYTORCH)
    ]  # fastest first (lmfused.ops.BACKENDS)


def default_compile_providers(names: list[str], device: torch.device) -> list[str]:
    """On a GPU every provider is compiled, the rows the comparison needs first (torchvision, the
    plain-PyTorch LM, the fastest fused backend with the registered ops, then with the junction decomposed for
    Inductor); on CPU none (compiling a ResNet step there takes minutes)."""
    if device.type != "cuda":
        return []
    fused = _fused(names)
    best = [fused[0], f"{fused[0]}+decomposed"] if fused else []
    return [p for p in ("torchvision", PLAIN_PYTORCH) if p in names] + best + fused[1:]


def plan(models: list[str], names: list[str], compile_names: list[str]) -> list[tuple[str, str, bool]]:
    """(model, provider, compiled) in the order they run: per model, every eager row (and the fastest fused
    backend with the blocks' last BatchNorm unfused), then the compiled rows in ``compile_names`` order, so a
    time limit cuts the least needed rows."""
    fused = _fused(names)
    eager_names = names + ([f"{fused[0]}+unfused-bn", f"{fused[0]}+no-passthrough"] if fused else [])
    rows = []
    for model_name in models:
        rows += [(model_name, p, False) for p in eager_names]
        rows += [(model_name, p, True) for p in compile_names if p.partition("+")[0] in names]
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``vs_torchvision``: img/s over eager torchvision's for the same model (the 3% target's measure)."""
    base = {
        r["model"]: r["img_per_s"]
        for r in rows
        if r["provider"] == "torchvision" and not r["compiled"] and r.get("img_per_s")
    }
    for r in rows:
        r["vs_torchvision"] = (
            r["img_per_s"] / base[r["model"]] if r.get("img_per_s") and r["model"] in base else None
        )


def add_memory_predictions(rows: list[dict], size: int, on_row=lambda: None) -> None:
    """``predicted_peak_gb`` of every row that ran: bench.memory's count of its eager training step on fake
    tensors (:func:`bench.memory.predicted_peak_bytes`), to hold against ``peak_mem_gb``; one count per
    distinct network and setting (every lmfused backend keeps the same tensors)."""
    from bench import memory

    counted: dict = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        row = memory.provider_row(r["model"], r["provider"])
        if (row, r["batch"]) not in counted:
            counted[row, r["batch"]] = memory.predicted_peak_bytes(memory.measure(row, r["batch"], size))
        r["predicted_peak_gb"] = counted[row, r["batch"]] / 1e9
        on_row()


COLUMNS = [
    ("model", "s"), ("provider", "s"), ("compiled", "d"), ("batch", "d"), ("img_per_s", ".1f"),
    ("vs_torchvision", ".3f"), ("peak_mem_gb", ".2f"), ("predicted_peak_gb", ".2f"), ("warmup_s", ".1f"),
    ("lmfused_ops", ""), ("status", "s"),
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=None, help="default 128 on GPU, 4 on CPU")
    parser.add_argument("--size", type=int, default=None, help="image size; default 224 on GPU, 64 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 20 on GPU, 2 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps; default 5 on GPU, 1 on CPU")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--providers", nargs="+", default=None, help="subset of providers (default: all)")
    parser.add_argument(
        "--compile-providers",
        nargs="*",
        default=None,
        help="providers also measured under torch.compile, in this order (default: all on GPU, none on CPU)",
    )
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile rows")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds; rows not started by then are skipped"
    )
    parser.add_argument(
        "--no-memory-prediction", action="store_true", help="no bench.memory prediction of the peaks"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch = args.batch or (128 if gpu else 4)
    size = args.size or (224 if gpu else 64)
    steps = args.steps or (20 if gpu else 2)
    warmup = args.warmup or (5 if gpu else 1)
    names = [p for p in providers(device) if args.providers is None or p in args.providers]
    compile_names = args.compile_providers
    if compile_names is None:
        compile_names = default_compile_providers(names, device)
    if args.no_compile:
        compile_names = []
    env = environment()
    name = "models-" + ("".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower())
    path = args.out / f"{name}.json"
    started = time.perf_counter()
    rows = []
    for model_name, provider, compiled in plan(args.models, names, compile_names):
        row = {"model": model_name, "provider": provider, "compiled": compiled, "batch": batch}
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            row["status"] = "skipped (time budget)"
        else:
            torch._dynamo.reset()
            row["ran"] = ran(model_name, provider) + (", torch.compile" if compiled else "")
            try:
                model = build(model_name, provider, device)
                with variant_environment(provider):
                    row["img_per_s"], row["peak_mem_gb"], row["warmup_s"] = train_throughput(
                        model, device, batch, size, steps, warmup, compiled
                    )
                    if not compiled:  # what one step of this row dispatched (a small batch, after the timing)
                        row["lmfused_ops"] = count_lmfused_ops(model, device, size)
                row["status"] = "ok"
                del model
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if gpu:
                torch.cuda.empty_cache()
        rows.append(row)
        add_ratios(rows)
        print(row, flush=True)
        write_json(path, {"environment": env, "image_size": size, "steps": steps, "rows": rows})
    if not args.no_memory_prediction:  # after every timed row, so that a time limit cuts these first
        payload = {"environment": env, "image_size": size, "steps": steps, "rows": rows}
        add_memory_predictions(rows, size, on_row=lambda: write_json(path, payload))
    print(
        f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
        f"commit {env['commit']} | batch {batch} | {size}x{size} | bf16 autocast, channels_last"
    )
    print_table(rows, COLUMNS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
