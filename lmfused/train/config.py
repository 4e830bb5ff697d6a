"""Command line and configuration of ``python -m lmfused.train``.

Options are parsed without argparse defaults, so the options given explicitly are known: a resumed run starts
from the configuration saved in its checkpoint and only the explicit options override it. Defaults that depend
on the model family (CIFAR or ImageNet: image size, classes, batch size, epochs, reference batch of the lr
scaling) are filled in by :func:`resolve_config`. Every invalid setting raises :class:`UsageError`, which the
command reports as one line and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

__all__ = ["DEFAULTS", "MODEL_KEYS", "TrainConfig", "UsageError", "build_parser", "parse_explicit"]

PROG = "lmfused-train"
DATASETS = ("synthetic", "digits", "cifar10", "imagefolder")
AMP_MODES = ("none", "bf16", "fp16")
SCHEDULES = ("step", "cosine")
DECODE_CHOICES = ("auto", "cpu", "pil", "gpu")
BAD_IMAGE_CHOICES = ("skip", "error")

# Recipe of Lu et al. (ICML 2018), which follows He et al. (2016): SGD with momentum 0.9, weight decay 1e-4,
# lr 0.1 at a batch of 128 (CIFAR) or 256 (ImageNet), divided by 10 at 50% and 75% of the epochs.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar": dict(image_size=32, num_classes=10, batch_size=128, epochs=160, lr=0.1, lr_ref_batch=128),
    "imagenet": dict(image_size=224, num_classes=1000, batch_size=64, epochs=90, lr=0.1, lr_ref_batch=256),
}
# Data sets meant for short runs override the family's epochs: smoke and throughput runs, and the digits
# run that must learn in well under a minute on two CPU cores.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": dict(epochs=1),
    "digits": dict(epochs=2, batch_size=32, lr=0.4, num_classes=10),
    "cifar10": dict(num_classes=10),
}

DEFAULTS: dict[str, Any] = dict(
    model="lm_resnet20",
    lm=True,
    data="synthetic",
    data_dir=None,
    image_size=None,
    num_classes=None,
    synthetic_size=6400,
    augment=True,
    workers=None,
    decode="auto",
    prefetch=2,
    on_bad_image="skip",
    epochs=None,
    max_steps=None,
    batch_size=None,
    global_batch_size=None,
    lr=None,
    momentum=0.9,
    weight_decay=1e-4,
    wd_on_k=True,
    schedule="step",
    warmup_epochs=0.0,
    label_smoothing=0.0,
    clip_grad=None,
    amp="none",
    channels_last=False,
    compile=False,
    backend=None,
    device="auto",
    survival_prob=1.0,
    sd_mode="sample",
    noise_std=0.0,
    per_channel_k=False,
    seed=0,
    out="runs/train",
    resume=None,
    overwrite=False,
    progress=True,
    log_every=100,
    timing_warmup=5,
    stop_after_steps=None,
    debug_param_hash=False,
)

# Settings that fix the shapes of the model's state or the meaning of a position in the data: a checkpoint
# resumes only under the same values.
MODEL_KEYS = ("model", "lm", "per_channel_k", "num_classes", "image_size", "data")
# Settings of one invocation, never taken over from a checkpoint's configuration.
RUN_KEYS = ("resume", "overwrite", "stop_after_steps", "debug_param_hash", "device")


class UsageError(Exception):
    """A bad command line or setting: reported as one message, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``lmfused-train`` parser. Options carry no defaults (see :data:`DEFAULTS`), so a parsed
    namespace holds exactly the options given on the command line."""
    p = _Parser(
        prog=PROG,
        argument_default=argparse.SUPPRESS,
        description="Train an LM-ResNet / LM-ResNeXt (Lu et al., ICML 2018) with the paper's recipe. "
        "Runs single-process or under torchrun (DDP).",
        epilog="Defaults marked 'family' depend on the model: CIFAR models 32x32 images, 10 classes, "
        "batch 128, 160 epochs, lr reference batch 128; ImageNet models 224, 1000, 64, 90, 256.",
    )
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"registered model name (default {DEFAULTS['model']})")
    g.add_argument(
        "--lm", action=bool_flag, help="LM updates with learnable k (default); --no-lm: plain ResNet"
    )
    g.add_argument("--backend", help="lm_step backend: cuda, triton or reference (default: automatic)")
    g.add_argument("--survival-prob", type=float, help="final survival probability p_L (default 1.0)")
    g.add_argument("--sd-mode", choices=("sample", "batch"), help="stochastic depth per sample or per batch")
    g.add_argument("--noise-std", type=float, help="noise injection standard deviation (default 0)")
    g.add_argument("--per-channel-k", action=bool_flag, help="one k per channel instead of per block")

    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, help="data set (default synthetic)")
    g.add_argument("--data-dir", help="local data directory (cifar10, imagefolder); nothing is downloaded")
    g.add_argument("--image-size", type=int, help="input resolution (default: family)")
    g.add_argument("--num-classes", type=int, help="classes of synthetic data (default: family)")
    g.add_argument("--synthetic-size", type=int, help="synthetic training samples per epoch (default 6400)")
    g.add_argument("--augment", action=bool_flag, help="training augmentation (default on)")
    g.add_argument(
        "--workers",
        type=int,
        help="loader processes per rank for imagefolder (default: the usable cores / ranks per node - 1, "
        "at most 16, or 4 with --decode gpu; 0: in the training process)",
    )
    g.add_argument(
        "--decode",
        choices=DECODE_CHOICES,
        help="imagefolder decoding: cpu (torchvision.io in the loader processes), pil (the PIL path), gpu "
        "(loader processes read files, nvjpeg decodes on the device); auto: cpu",
    )
    g.add_argument("--prefetch", type=int, help="batches each loader process prepares ahead (default 2)")
    g.add_argument(
        "--on-bad-image",
        choices=BAD_IMAGE_CHOICES,
        help="an unreadable image: skip it, count it and name it once (default); error: stop (exit 2) "
        "after saving the checkpoint",
    )

    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, help="epochs (default: family; synthetic 1, digits 2)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    g.add_argument("--batch-size", type=int, help="batch size per process (default: family)")
    g.add_argument("--global-batch-size", type=int, help="batch size over all processes (alternative)")
    g.add_argument(
        "--lr",
        type=float,
        help="lr at the reference batch (default 0.1, digits 0.4), scaled by global/reference",
    )
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, help="weight decay (default 1e-4)")
    g.add_argument("--wd-on-k", action=bool_flag, help="weight decay on the LM coefficients k (default on)")
    g.add_argument("--schedule", choices=SCHEDULES, help="step: x0.1 at 50%% and 75%% of the epochs; cosine")
    g.add_argument("--warmup-epochs", type=float, help="linear lr warm-up, in epochs (default 0)")
    g.add_argument("--label-smoothing", type=float, help="label smoothing (default 0)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    g.add_argument("--seed", type=int, help="seed of initialisation, data order and augmentation (default 0)")

    g = p.add_argument_group("performance")
    g.add_argument("--amp", choices=AMP_MODES, help="autocast dtype (fp16 adds a GradScaler; CUDA only)")
    g.add_argument("--channels-last", action=bool_flag, help="channels-last memory format")
    g.add_argument("--compile", action=bool_flag, help="torch.compile the model")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    g.add_argument("--timing-warmup", type=int, help="steps left out of the median img/s (default 5)")

    g = p.add_argument_group("output")
    g.add_argument("--out", help="output directory: metrics.jsonl, checkpoint.pt, summary.json")
    g.add_argument(
        "--resume", help="continue from this checkpoint (or its directory), with its settings and --out"
    )
    g.add_argument("--overwrite", action=bool_flag, help="start afresh in an --out that holds a checkpoint")
    g.add_argument("--progress", action=bool_flag, help="tqdm progress bar on a terminal (default on)")
    g.add_argument("--log-every", type=int, help="without a bar, print a line every N steps (default 100)")
    # Test hooks: stop after N steps through the signal path; write a hash of each rank's parameters.
    g.add_argument("--stop-after-steps", type=int, help=argparse.SUPPRESS)
    g.add_argument("--debug-param-hash", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_explicit(argv: Sequence[str] | None) -> dict[str, Any]:
    """The options given in ``argv`` (not their defaults), by destination name."""
    return vars(build_parser().parse_args(argv))


@dataclass(frozen=True)
class TrainConfig:
    """A resolved, validated training configuration (every family default filled in)."""

    model: str
    lm: bool
    data: str
    data_dir: str | None
    image_size: int
    num_classes: int
    synthetic_size: int
    augment: bool
    workers: int | None
    decode: str
    prefetch: int
    on_bad_image: str
    epochs: int
    max_steps: int | None
    batch_size: int
    global_batch_size: int
    world_size: int
    lr: float
    lr_ref_batch: int
    momentum: float
    weight_decay: float
    wd_on_k: bool
    schedule: str
    warmup_epochs: float
    label_smoothing: float
    clip_grad: float | None
    amp: str
    channels_last: bool
    compile: bool
    backend: str | None
    device: str
    survival_prob: float
    sd_mode: str
    noise_std: float
    per_channel_k: bool
    seed: int
    out: str
    resume: str | None
    overwrite: bool
    progress: bool
    log_every: int
    timing_warmup: int
    stop_after_steps: int | None
    debug_param_hash: bool
    family: str

    @property
    def scaled_lr(self) -> float:
        """The lr actually used: --lr scaled linearly by global batch / reference batch (Goyal et al.)."""
        return self.lr * self.global_batch_size / self.lr_ref_batch

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as saved in checkpoints and summary.json."""
        return dataclasses.asdict(self)


def model_family(name: str) -> str:
    """The family of the registered model ``name``, "cifar" or "imagenet" (found by building it on the meta
    device, which allocates nothing); UsageError for an unknown name."""
    from lmfused.models import LMCifarResNet, create_model, list_models

    if name not in list_models():
        raise UsageError(f"--model: unknown model {name!r}; available: {', '.join(list_models())}")
    with torch.device("meta"):
        model = create_model(name, num_classes=1)
    return "cifar" if isinstance(model, LMCifarResNet) else "imagenet"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def resolve_config(
    explicit: Mapping[str, Any], saved: Mapping[str, Any] | None = None, *, world_size: int = 1
) -> TrainConfig:
    """Merge defaults < ``saved`` (a checkpoint's configuration) < ``explicit`` options, fill in the family
    defaults, and validate everything (UsageError naming the option)."""
    merged: dict[str, Any] = dict(DEFAULTS)
    if saved is not None:
        merged.update({k: v for k, v in saved.items() if k in DEFAULTS and k not in RUN_KEYS})
    merged.update(explicit)
    family = model_family(merged["model"])
    for key, value in {**FAMILY_DEFAULTS[family], **DATA_DEFAULTS.get(merged["data"], {})}.items():
        if merged.get(key) is None:
            merged[key] = value
    # lr_ref_batch is not an option: it follows the family (saved configs may carry it; the family decides).
    merged["lr_ref_batch"] = FAMILY_DEFAULTS[family]["lr_ref_batch"]

    def positive(key: str, *, allow_none: bool = False) -> None:
        value = merged[key]
        if value is None and allow_none:
            return
        _require(value is not None and value > 0, f"--{key.replace('_', '-')}: expected > 0, got {value}")

    for key in ("image_size", "num_classes", "synthetic_size", "epochs", "batch_size", "lr"):
        positive(key)
    for key in ("max_steps", "global_batch_size", "clip_grad", "stop_after_steps"):
        positive(key, allow_none=True)
    positive("prefetch")
    for key in ("workers", "timing_warmup", "log_every", "weight_decay", "warmup_epochs", "noise_std"):
        value = merged[key]
        if value is None and key == "workers":
            continue
        _require(
            value >= 0 and math.isfinite(value), f"--{key.replace('_', '-')}: expected >= 0, got {value}"
        )
    _require(
        0.0 <= merged["momentum"] < 1.0, f"--momentum: expected a value in [0, 1), got {merged['momentum']}"
    )
    smoothing = merged["label_smoothing"]
    _require(0.0 <= smoothing < 1.0, f"--label-smoothing: expected a value in [0, 1), got {smoothing}")
    survival = merged["survival_prob"]
    _require(0.0 < survival <= 1.0, f"--survival-prob: expected a probability in (0, 1], got {survival}")
    _require(merged["image_size"] >= 8, f"--image-size: expected >= 8, got {merged['image_size']}")
    _require(merged["seed"] >= 0, f"--seed: expected >= 0, got {merged['seed']}")
    if "num_classes" in explicit:
        _require(
            merged["data"] == "synthetic",
            f"--num-classes: only for synthetic data (--data {merged['data']} decides its classes)",
        )

    # The global batch decides the lr and the data positions; the per-process batch follows from it.
    if "global_batch_size" in explicit:
        global_batch = explicit["global_batch_size"]
        _require(
            global_batch % world_size == 0,
            f"--global-batch-size: {global_batch} is not divisible by the {world_size} processes",
        )
        if "batch_size" in explicit:
            _require(
                global_batch == merged["batch_size"] * world_size,
                f"--global-batch-size: {global_batch} != --batch-size {merged['batch_size']} x {world_size} "
                "processes (give one of the two)",
            )
        merged["batch_size"] = global_batch // world_size
    merged["global_batch_size"] = merged["batch_size"] * world_size
    merged["world_size"] = world_size

    if merged["data"] in ("cifar10", "imagefolder"):
        _require(merged["data_dir"] is not None, f"--data-dir: required with --data {merged['data']}")
    if merged["amp"] == "fp16":
        _require(
            merged["device"] != "cpu" and torch.cuda.is_available(),
            "--amp fp16: needs a CUDA device (use --amp bf16 on CPU)",
        )
    if merged["device"] == "cuda":
        _require(torch.cuda.is_available(), "--device cuda: no CUDA device is available")
    if merged["device"] == "auto":
        merged["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    merged["family"] = family
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in merged.items() if k in fields})
