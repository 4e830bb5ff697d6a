"""Transport analysis of a model of the zoo: ``python -m lmfused.analyze --model NAME [options]``.

Runs one batch through the model (in eval mode, without gradients), records the state after every LM block
(:class:`lmfused.analysis.FlowRecorder`) and prints, per block, the transport metrics of Sonoda & Murata
(*Transport analysis of infinitely deep neural network*, JMLR 2019;
:func:`lmfused.analysis.transport_metrics`) next to the learned LM coefficient k_n (Lu et al., ICML 2018;
:func:`lmfused.analysis.lm_coefficients`). With ``--out DIR`` it writes ``analysis.json`` and ``analysis.png``
(displacement, entropy and k_n against depth).

Options: ``--checkpoint PATH`` (a torch.save'd dict holding the state dict under ``"model"``, or a bare
state dict), ``--data synthetic|digits`` (standard-normal images, or scikit-learn's bundled 8x8 digits
upscaled to ``--image-size`` and repeated over 3 channels), ``--batch-size N``, ``--image-size S``,
``--num-classes K`` (passed to the model builder), ``--seed``, ``--device``. Bad arguments exit with status 2
and one message.
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

from lmfused.analysis import analyze_flow

__all__ = ["build_model", "format_table", "load_batch", "load_checkpoint", "main"]


class UsageError(Exception):
    """A problem with the command line arguments: reported as one message, exit status 2."""


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """``lmfused.models.create_model(name)`` (``num_classes`` passed when given); UsageError if unknown."""
    try:
        from lmfused.models import create_model
    except ImportError as error:
        raise UsageError(f"the model zoo is not available (lmfused.models.create_model: {error})") from None
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return create_model(name, **kwargs)
    except (KeyError, ValueError, TypeError) as error:  # the zoo's message lists the known names
        raise UsageError(f"--model: cannot build {name!r}: {error}") from None


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a checkpoint into ``model``: a dict with the state dict under ``"model"``, or a bare state dict.

    Prefixes added by DataParallel (``module.``) and torch.compile (``_orig_mod.``) are stripped. Raises
    UsageError when the file cannot be read or does not match the model.
    """
    if not path.is_file():
        raise UsageError(f"--checkpoint: no such file: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types (pickle, zip, weights-only refusals)
        raise UsageError(f"--checkpoint: cannot read {path}: {error}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"--checkpoint: {path} holds neither a state dict nor a dict with one under 'model'")
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"--checkpoint: does not fit the model: {error}") from None


def load_batch(data: str, batch_size: int, image_size: int, *, seed: int = 0) -> Tensor:
    """A (batch_size, 3, image_size, image_size) float32 batch: ``synthetic`` (standard normal) or ``digits``.

    ``digits`` takes scikit-learn's bundled 8x8 digits (no download), a random subset chosen by ``seed``,
    upscaled bilinearly, repeated over 3 channels and standardised to mean 0 and std 1.
    """
    generator = torch.Generator().manual_seed(seed)
    if data == "synthetic":
        return torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    if data != "digits":
        raise UsageError(f"--data: expected 'synthetic' or 'digits', got {data!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("--data digits needs scikit-learn (pip install scikit-learn)") from None
    images = torch.as_tensor(load_digits().images, dtype=torch.float32)  # (1797, 8, 8), values 0..16
    if batch_size > images.shape[0]:
        raise UsageError(f"--batch-size: the digits data have {images.shape[0]} images, {batch_size} asked")
    chosen = images[torch.randperm(images.shape[0], generator=generator)[:batch_size]].unsqueeze(1)
    x = nn.functional.interpolate(chosen, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    return x.expand(-1, 3, -1, -1).contiguous()


_COLUMNS = (
    ("stage", "stage", "{:d}"),
    ("block", "block", "{:d}"),
    ("name", "name", "{}"),
    ("displacement", "displ", "{:.4f}"),
    ("kinetic_energy", "energy", "{:.4f}"),
    ("cosine", "cos", "{:+.3f}"),
    ("entropy", "entropy", "{:.2f}"),
    ("w2", "W2", "{:.4f}"),
    ("k", "k", "{:+.4f}"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-block rows as a fixed-width text table; undefined entries (None) print as '-'."""
    cells = [[title for _, title, _ in _COLUMNS]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    justify = [
        str.ljust if key == "name" else str.rjust for key, _, _ in _COLUMNS
    ]  # names left, numbers right
    return "\n".join(
        "  ".join(j(c, w) for j, c, w in zip(justify, line, widths, strict=True)) for line in cells
    )


def _json_safe(value: Any) -> Any:
    """Non-finite floats as None, so the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _plot(rows: list[dict[str, Any]], title: str, path: Path) -> bool:
    """Displacement, entropy and k_n against depth, one line per stage; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (("displacement", "displacement |v| / sqrt(D)"), ("entropy", "entropy (nats)"), ("k", "k_n"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for stage in sorted({row["stage"] for row in rows}):
            points = [(r["depth"], r[key]) for r in rows if r["stage"] == stage and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", ms=3, label=f"stage {stage}")
        ax.set(xlabel="block (depth)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _positive_int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmfused.analyze",
        description="Per-block transport analysis (Sonoda & Murata) and LM coefficients (Lu et al.).",
    )
    parser.add_argument("--model", required=True, help="model name, as for lmfused.models.create_model")
    parser.add_argument("--checkpoint", type=Path, help="torch.save'd dict with 'model', or a state dict")
    parser.add_argument("--data", choices=("synthetic", "digits"), default="synthetic", help="input batch")
    parser.add_argument("--batch-size", type=_positive_int(2), default=64, help="samples (>= 2; default 64)")
    parser.add_argument("--image-size", type=_positive_int(1), default=32, help="image side (default 32)")
    parser.add_argument("--num-classes", type=_positive_int(1), help="passed to the model builder")
    parser.add_argument("--seed", type=int, default=0, help="seed for the batch (default 0)")
    parser.add_argument("--out", type=Path, help="directory for analysis.json and analysis.png")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parser


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise UsageError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {text} asked but CUDA is not available")
    return device


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see the module docstring). Returns 0; bad arguments exit with status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out: {args.out} exists and is not a directory")
        device = _device(args.device)
        model = build_model(args.model, args.num_classes)
        if args.checkpoint is not None:
            load_checkpoint(model, args.checkpoint)
        x = load_batch(args.data, args.batch_size, args.image_size, seed=args.seed)
        model = model.to(device).eval()
        try:
            rows = analyze_flow(model, x.to(device))
        except RuntimeError as error:  # e.g. an image size the model cannot take
            raise UsageError(
                f"model {args.model!r} failed on a batch of shape {tuple(x.shape)}: {error}"
            ) from None
        except ValueError as error:  # no LM blocks
            raise UsageError(f"--model: {error}") from None
    except UsageError as error:
        parser.error(str(error))  # prints usage and the message, exits with status 2

    print(f"{args.model}: {args.data} batch of {args.batch_size} at {args.image_size}x{args.image_size}")
    print(format_table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {
            "model": args.model,
            "checkpoint": args.checkpoint.name if args.checkpoint is not None else None,
            "data": args.data,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "seed": args.seed,
            "blocks": rows,
        }
        (args.out / "analysis.json").write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False))
        plotted = _plot(rows, f"{args.model} ({args.data})", args.out / "analysis.png")
        written = "analysis.json" + (" and analysis.png" if plotted else " (matplotlib missing: no plot)")
        print(f"wrote {written} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
