"""Deep Gaussian denoising autoencoder demo (Sonoda & Murata, *Transport analysis of infinitely deep neural
network*, JMLR 2019).

Usage: ``python -m lmfused.analysis.dae [--steps T] [--sigma S] [--iters N] [--seed K] [--width W]
[--out DIR]``.

On 2-D Gaussian-mixture data it illustrates two findings of that paper:

1. **A deep Gaussian DAE transports mass so that the entropy falls.** A DAE with noise s, applied to the
   data themselves, is a transport map; for a distribution with covariance C the best *linear* DAE is
   C (C + s^2 I)^-1 (:func:`~lmfused.analysis.gaussian_dae_map`). Composing T of them, each fitted to the
   distribution the previous ones produced and each with noise sigma / sqrt(T) (the paper's composition of
   DAEs, whose T -> infinity limit is the backward-heat flow dx/dt = grad log p_t(x)), lowers the Gaussian
   entropy at every step. The demo prints the closed form
   (:func:`~lmfused.analysis.deep_gaussian_dae_covariances`) next to linear DAEs actually fitted to the
   transported mixture samples, and the one-shot (shallow) DAE with noise sigma for comparison.
2. **Deeper DAEs converge faster.** Two denoisers of x + sigma * eps -> x are trained with the same optimiser,
   learning rate and batches: a shallow one (one residual step x + f(x), f a one-hidden-layer ReLU MLP of
   width w) and a deep one (T such steps of the same width, composed: the broken-line reading of a flow).
   Both start at the identity map (zero-initialised output layers), so their curves start at the same loss.
   A third, wide shallow model (width w T, about the deep one's parameter count) is trained too, so the
   table shows how much of the gap depth buys and how much parameters do: in our runs the wide shallow
   model keeps pace with the deep one.

Writes ``dae.json`` (and ``dae.png`` when matplotlib is importable) into ``--out``. Runs in a few seconds
on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmfused.analysis.gaussian import (
    deep_gaussian_dae_covariances,
    gaussian_dae_entropy_drop,
    gaussian_dae_map,
    gaussian_entropy,
    gaussian_entropy_of_cov,
    gaussian_fit,
)

__all__ = [
    "DAEStep",
    "fit_linear_dae",
    "gaussian_mixture",
    "iterations_to_reach",
    "main",
    "make_dae",
    "run_demo",
    "train_dae",
]


def gaussian_mixture(
    n: int, *, modes: int = 8, radius: float = 2.0, spread: float = 0.1, generator: torch.Generator
) -> Tensor:
    """``n`` samples (n, 2) from an equal-weight mixture of ``modes`` isotropic Gaussians (std ``spread``)
    centred on a circle of radius ``radius``."""
    angles = 2 * math.pi * torch.arange(modes, dtype=torch.float32) / modes
    centres = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    which = torch.randint(0, modes, (n,), generator=generator)
    return centres[which] + spread * torch.randn(n, 2, generator=generator)


class DAEStep(nn.Module):
    """One residual step x + f(x), f a one-hidden-layer ReLU MLP whose output layer starts at zero.

    Starting at the identity makes every composition start at the same map, so loss curves are comparable
    from iteration 0 (and each step is a small transport, a step of a broken-line flow).
    """

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, dim))
        nn.init.zeros_(self.f[2].weight)
        nn.init.zeros_(self.f[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        """x + f(x)."""
        return x + self.f(x)


def make_dae(steps: int, width: int, dim: int = 2) -> nn.Sequential:
    """A composition of ``steps`` :class:`DAEStep` of hidden width ``width`` (steps = 1: the shallow DAE)."""
    return nn.Sequential(*(DAEStep(dim, width) for _ in range(steps)))


def train_dae(
    model: nn.Module,
    *,
    sigma: float,
    iters: int,
    batch: int,
    lr: float,
    seed: int,
    data: dict[str, Any],
) -> list[float]:
    """Train ``model`` to denoise x + sigma * eps -> x with Adam; returns the loss of every iteration.

    The loss is E ||model(x + sigma eps) - x||^2 (sum over coordinates, mean over the batch). Batches come
    from a generator seeded with ``seed``, so models trained with the same seed see the same data and noise.
    ``data`` holds the keyword arguments of :func:`gaussian_mixture` other than ``n`` and ``generator``.
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(iters):
        x = gaussian_mixture(batch, generator=generator, **data)
        noisy = x + sigma * torch.randn(x.shape, generator=generator)
        loss = (model(noisy) - x).pow(2).sum(1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def fit_linear_dae(x: Tensor, sigma: float, *, generator: torch.Generator) -> Tensor:
    """The linear DAE W (D, D) trained on centred samples ``x`` (M, D): least squares, W (x + sigma eps) ~ x.

    Least squares is the exact minimiser of the empirical DAE loss over linear maps; as M grows W tends to
    C (C + sigma^2 I)^-1 for the covariance C of the data, whatever their distribution
    (:func:`~lmfused.analysis.gaussian_dae_map`). Computed in float64.
    """
    x = x.to(torch.float64)
    noisy = x + sigma * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return torch.linalg.lstsq(noisy, x).solution.T  # rows: noisy @ W^T ~ x


def iterations_to_reach(losses: list[float], target: float, window: int) -> int | None:
    """The first iteration count after which the running mean of the last ``window`` losses is <= target."""
    window = max(1, min(window, len(losses)))
    total = sum(losses[:window])
    if total / window <= target:
        return window
    for i in range(window, len(losses)):
        total += losses[i] - losses[i - window]
        if total / window <= target:
            return i + 1
    return None


def _window_means(losses: list[float], windows: int) -> list[tuple[int, int, float]]:
    """(first, last, mean) over ``windows`` consecutive stretches of iterations (1-based, inclusive)."""
    edges = [round(i * len(losses) / windows) for i in range(windows + 1)]
    return [(a + 1, b, sum(losses[a:b]) / (b - a)) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _transport_entropies(x: Tensor, sigma: float, steps: int, generator: torch.Generator) -> list[float]:
    """Gaussian entropy of ``x`` after each of ``steps`` linear DAEs (noise sigma/sqrt(steps)), each fitted to
    the samples the previous ones produced (the composition of DAEs of Sonoda & Murata)."""
    mean = x.to(torch.float64).mean(0)
    z = x.to(torch.float64) - mean  # a DAE maps the mean to itself; work on centred samples
    entropies = [gaussian_entropy(z, shrinkage=None)]
    for _ in range(steps):
        w = fit_linear_dae(z, sigma / math.sqrt(steps), generator=generator)
        z = z @ w.T
        entropies.append(gaussian_entropy(z, shrinkage=None))
    return entropies


def run_demo(
    *,
    steps: int = 8,
    sigma: float = 0.5,
    iters: int = 300,
    seed: int = 0,
    width: int = 8,
    batch: int = 256,
    lr: float = 1e-2,
    samples: int = 4096,
    windows: int = 6,
) -> dict[str, Any]:
    """Run both parts of the demo (see the module docstring) and return the results as a JSON-able dict.

    Keys: ``config``; ``transport`` (closed-form and fitted entropies per step of the deep linear DAE, and the
    shallow DAE's); ``training`` (per-model loss curves, parameter counts, window means, and the iterations
    each model needs to reach the shallow model's final loss).
    """
    data = {"modes": 8, "radius": 2.0, "spread": 0.1}
    generator = torch.Generator().manual_seed(seed)
    x = gaussian_mixture(samples, generator=generator, **data)

    # Part 1: transport by linear DAEs, closed form (Gaussian fit of the data) against fitted on samples.
    _, cov = gaussian_fit(x, shrinkage=None)
    closed = [gaussian_entropy_of_cov(c) for c in deep_gaussian_dae_covariances(cov, sigma, steps)]
    fitted = _transport_entropies(x, sigma, steps, generator)
    shallow_map = gaussian_dae_map(cov, sigma)
    centred = x.to(torch.float64) - x.to(torch.float64).mean(0)
    transport = {
        "deep_closed_form": closed,
        "deep_fitted": fitted,
        "shallow_closed_form": [closed[0], closed[0] - gaussian_dae_entropy_drop(cov, sigma)],
        "shallow_transported": [fitted[0], gaussian_entropy(centred @ shallow_map.T, shrinkage=None)],
    }

    # Part 2: training speed of shallow, wide shallow and deep denoisers on the same batches.
    models = {
        "shallow": (1, width),
        "wide": (1, width * steps),
        "deep": (steps, width),
    }
    training: dict[str, Any] = {}
    for name, (depth, hidden) in models.items():
        torch.manual_seed(seed)
        model = make_dae(depth, hidden)
        losses = train_dae(model, sigma=sigma, iters=iters, batch=batch, lr=lr, seed=seed + 1, data=data)
        training[name] = {
            "steps": depth,
            "width": hidden,
            "parameters": sum(p.numel() for p in model.parameters()),
            "losses": losses,
            "windows": _window_means(losses, windows),
        }
    window = max(1, iters // windows)
    target = training["shallow"]["windows"][-1][2]
    for entry in training.values():
        entry["iterations_to_shallow_final"] = iterations_to_reach(entry["losses"], target, window)
    config = {
        "steps": steps,
        "sigma": sigma,
        "iters": iters,
        "seed": seed,
        "width": width,
        "batch": batch,
        "lr": lr,
        "samples": samples,
        **data,
    }
    return {
        "config": config,
        "transport": transport,
        "training": training,
    }


def _print_report(result: dict[str, Any]) -> None:
    cfg, transport, training = result["config"], result["transport"], result["training"]
    steps = cfg["steps"]
    print(
        f"Deep Gaussian DAE (Sonoda & Murata, JMLR 2019): {cfg['modes']}-mode Gaussian mixture in 2-D, "
        f"noise sigma = {cfg['sigma']}, {steps} steps"
    )
    print(f"\n1. Transport by linear DAEs (noise sigma/sqrt({steps}) per step): Gaussian entropy in nats")
    print(f"{'step':>4}  {'closed form':>11}  {'fitted':>8}")
    for i, (c, f) in enumerate(zip(transport["deep_closed_form"], transport["deep_fitted"], strict=True)):
        print(f"{i:>4}  {c:>11.4f}  {f:>8.4f}")
    shallow_c, shallow_t = transport["shallow_closed_form"][1], transport["shallow_transported"][1]
    print(f"shallow DAE (one step, noise sigma): {shallow_c:.4f} closed form, {shallow_t:.4f} transported")

    names = list(training)
    labels = [f"{n} ({e['steps']}x{e['width']}, {e['parameters']} p)" for n, e in training.items()]
    print(f"\n2. Training to denoise x + sigma*eps -> x (Adam, lr {cfg['lr']}, batch {cfg['batch']}): loss")
    print(f"{'iterations':>12}  " + "  ".join(f"{label:>24}" for label in labels))
    for row in zip(*(training[n]["windows"] for n in names), strict=True):
        span = f"{row[0][0]}-{row[0][1]}"
        print(f"{span:>12}  " + "  ".join(f"{w[2]:>24.4f}" for w in row))
    reach = "  ".join(f"{n}: {training[n]['iterations_to_shallow_final'] or '-'}" for n in names)
    print(f"iterations to reach the shallow model's final loss: {reach}")


def _plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    transport = result["transport"]
    ax1.plot(transport["deep_closed_form"], "o-", label="deep, closed form")
    ax1.plot(transport["deep_fitted"], "x--", label="deep, fitted linear DAEs")
    ax1.axhline(transport["shallow_closed_form"][1], color="gray", ls="-.", label="shallow DAE")
    ax1.set(xlabel="step", ylabel="Gaussian entropy (nats)", title="Transport lowers entropy")
    ax1.legend(fontsize=8)
    for name, entry in result["training"].items():
        ax2.plot(entry["losses"], label=f"{name} ({entry['steps']}x{entry['width']})", lw=0.8)
    ax2.set(xlabel="iteration", ylabel="denoising loss", title="Training", yscale="log")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: run the demo, print the tables, write JSON (and a PNG) into --out."""
    parser = argparse.ArgumentParser(
        prog="python -m lmfused.analysis.dae", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--steps", type=_positive_int, default=8, help="depth T of the deep DAE (default 8)")
    parser.add_argument("--sigma", type=_positive_float, default=0.5, help="total noise std (default 0.5)")
    parser.add_argument("--iters", type=_positive_int, default=300, help="training iterations (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--width", type=_positive_int, default=8, help="hidden width of a step (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="directory for dae.json and dae.png")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out: {args.out} exists and is not a directory")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    try:
        result = run_demo(**{key: getattr(args, key) for key in ("steps", "sigma", "iters", "seed", "width")})
    finally:
        torch.set_num_threads(threads)
    _print_report(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dae.json").write_text(json.dumps(result, indent=1))
        plotted = _plot(result, args.out / "dae.png")
        print(f"\nwrote {args.out / 'dae.json'}" + (f" and {args.out / 'dae.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
