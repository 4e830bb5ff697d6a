"""Training checkpoints: atomic writes, validated reads, and the random state a resumed run needs.

A checkpoint is one ``torch.save`` dict holding only tensors and plain data (so it loads with
``weights_only=True``): format and version, the resolved configuration, the position (epoch, step in the
epoch, global step, the epoch's running sums), model / optimizer / scheduler / grad-scaler states, and the
random states of every rank (torch CPU and CUDA, numpy, Python, the data augmentation generator) plus the
shared stochastic-depth generator. The data order needs no state: it is a function of (seed, epoch).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from lmfused.nn import stochastic_depth_generator

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "atomic_save",
    "atomic_write",
    "capture_rng",
    "check_state_dict",
    "load_checkpoint",
    "restore_rng",
    "sd_generator",
]

FORMAT, VERSION = "lmfused-train-checkpoint", 1
CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("config", "model", "optimizer", "scheduler", "scaler", "position", "rng")


class CheckpointError(Exception):
    """An unreadable, truncated or mismatched checkpoint (reported as one message, exit code 2)."""


def sd_generator() -> torch.Generator:
    """The CPU generator behind every batch-mode stochastic-depth draw (shared by all LM modules)."""
    return stochastic_depth_generator()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms whose directories cannot be opened (the rename is still atomic)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write`` fills a temporary file in the same directory, which is flushed,
    fsynced and renamed over ``path``; then the directory is fsynced. A crash leaves the old file or the new
    one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def resolve_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """``path``, or ``path/checkpoint.pt`` when ``path`` is a directory."""
    path = Path(path).expanduser()
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a training checkpoint (on CPU); CheckpointError if it is missing, unreadable,
    truncated, or not an lmfused training checkpoint. Reads only: nothing on disk changes."""
    path = resolve_checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, pickle errors, ... for damaged files
        raise CheckpointError(
            f"--resume: cannot read {path}: the file is truncated or corrupt ({type(exc).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"--resume: {path} is not an lmfused training checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"--resume: {path} has checkpoint version {ckpt.get('version')!r}; this lmfused reads {VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"--resume: {path} lacks {', '.join(missing)}: the file is incomplete")
    return ckpt


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """CheckpointError unless ``state`` has exactly the keys and shapes of ``model``'s state_dict."""
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k}: {tuple(v.shape)} saved, {tuple(own[k].shape)} expected"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else "")
        raise CheckpointError(f"--resume: {path} was saved for another model ({shown})")


def capture_rng(extra: Mapping[str, Any]) -> dict[str, Any]:
    """This process's random states as tensors and plain data (``extra``: e.g. the data source's state)."""
    np_state = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None,
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
        **extra,
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore the states of :func:`capture_rng` (not ``extra``, which its owner restores)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def make_checkpoint(
    *,
    config: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    position: Mapping[str, Any],
    rng_per_rank: list[dict[str, Any]],
) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": dict(config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "position": dict(position),
        "rng": {"per_rank": rng_per_rank, "stochastic_depth": sd_generator().get_state()},
    }
