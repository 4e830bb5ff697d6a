"""Training data for ``lmfused.train``: synthetic, scikit-learn digits, CIFAR-10 and image folders.

Every source yields the batches of one rank for one epoch, starting at any step of it, so that a resumed run
continues exactly. The data order is a function of (seed, epoch) only (``DistributedSampler`` with
``set_epoch``); the in-memory sources (synthetic, digits, cifar10) draw their augmentation per batch from one
generator whose state is checkpointed; image folders seed each sample's augmentation by (seed, epoch, index)
(see :mod:`lmfused.train.images`), so both resume exactly.

Nothing is ever downloaded: cifar10 reads the python batches of a local directory directly (no checksum);
imagefolder needs torchvision, which stays optional (a clear error names it when it is missing).
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lmfused.train.config import TrainConfig, UsageError

__all__ = ["DataSource", "ImageFolderSource", "TensorSource", "build_source", "random_crop_flip"]

Batch = tuple[Tensor, Tensor]
Item = tuple[int, int, int]  # (split, index, augmentation key) of an image-folder sample
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# CIFAR augmentation: a random 32x32 crop of the image zero-padded by 4 pixels, then a flip; other sizes pad
# by the same fraction (size / 8).
CROP_PADDING_FRACTION = 8
DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED = 0.2, 0  # fixed split, independent of --seed


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator, flip: bool = True) -> Tensor:
    """Per-sample random crop of the zero-padded batch and random horizontal flip (CIFAR augmentation).

    Args:
        x: images (N, C, H, W), any device.
        padding: pixels of zero padding on each side; each crop is an H x W window of the padded image.
        generator: CPU generator of the offsets and flips (its state decides the draws on any device).
        flip: flip half of the images horizontally (off for digits: a mirrored digit is another symbol).

    Returns:
        The augmented batch (N, C, H, W), channels-last strided.
    """
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    flipped = (torch.rand(n, generator=generator) < 0.5).to(x.device) if flip else None
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H) rows of each window
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    if flipped is not None:  # flipping the crop = reading its columns backwards
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding)).permute(0, 2, 3, 1)  # (N, H+2p, W+2p, C)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype)[:, None, None]
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean_t) / std_t


def _epoch_indices(size: int, cfg: TrainConfig, rank: int, epoch: int) -> list[int]:
    """This rank's sample indices for ``epoch``: a permutation seeded by seed + epoch, split across ranks."""
    sampler = DistributedSampler(
        range(size), num_replicas=cfg.world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def _shard(size: int, rank: int, world_size: int) -> list[int]:
    """Evaluation indices of one rank: every sample exactly once over all ranks (no padding duplicates)."""
    return list(range(rank, size, world_size))


class DataSource:
    """Batches of one rank: ``train_batches(epoch, start_step)`` and ``val_batches()``, on the device.

    Images come out normalised, float32, contiguous (the training loop chooses the memory format).
    """

    steps_per_epoch: int
    num_classes: int

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The training batches of ``epoch`` from step ``start_step`` on."""
        raise NotImplementedError

    def val_batches(self) -> Iterator[Batch]:
        """The validation batches of this rank (possibly none)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Random state to checkpoint (the augmentation generator)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def take_bad_images(self) -> list[tuple[str, str]]:
        """(path, reason) of the unreadable images met since the last call (each path once per run)."""
        return []

    @property
    def bad_image_count(self) -> int:
        """Unreadable images met by this rank so far."""
        return 0


class TensorSource(DataSource):
    """In-memory images (float in [0, 1] or uint8), CIFAR augmentation drawn from a checkpointed generator.

    Synthetic data is a TensorSource too, without stored images: each batch is drawn from a generator keyed by
    (seed, split, epoch, step, rank) on the device, so it is reproducible and costs no host work.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        device: torch.device,
        *,
        train: Batch | None,
        val: Batch | None,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        flip: bool = True,
    ) -> None:
        self.cfg, self.rank, self.device = cfg, rank, device
        self.flip = flip
        self.train, self.val = train, val
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes = num_classes
        self.augment_generator = torch.Generator().manual_seed(cfg.seed + 1_000_003 * (rank + 1))
        train_size = cfg.synthetic_size if train is None else len(train[1])
        self.steps_per_epoch = train_size // cfg.global_batch_size
        if self.steps_per_epoch == 0:
            what = "--synthetic-size" if train is None else f"the {train_size} training samples"
            raise UsageError(f"{what}: fewer than one global batch ({cfg.global_batch_size} samples)")

    def _synthetic(self, split: int, epoch: int, step: int) -> Batch:
        key = (((self.cfg.seed * 7919 + split) * 1_000_003 + epoch) * 1_000_003 + step) * 4099 + self.rank
        gen = torch.Generator(device=self.device).manual_seed(key % (2**63))
        size, b = self.cfg.image_size, self.cfg.batch_size
        images = torch.rand(b, 3, size, size, generator=gen, device=self.device)
        labels = torch.randint(0, self.num_classes, (b,), generator=gen, device=self.device)
        return images, labels

    def _prepare(self, images: Tensor, labels: Tensor, augment: bool) -> Batch:
        images = images.to(self.device, non_blocking=True)
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        if augment:
            padding = max(1, images.shape[-1] // CROP_PADDING_FRACTION)
            images = random_crop_flip(images, padding, self.augment_generator, flip=self.flip)
        return _normalize(images, self.mean, self.std).contiguous(), labels.to(self.device, non_blocking=True)

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        b = self.cfg.batch_size
        indices = (
            None if self.train is None else _epoch_indices(len(self.train[1]), self.cfg, self.rank, epoch)
        )
        for step in range(start_step, self.steps_per_epoch):
            if indices is None:
                images, labels = self._synthetic(0, epoch, step)
            else:
                batch = torch.tensor(indices[step * b : (step + 1) * b])
                images, labels = self.train[0][batch], self.train[1][batch]
            yield self._prepare(images, labels, self.cfg.augment)

    def val_batches(self) -> Iterator[Batch]:
        b = self.cfg.batch_size
        if self.val is None:  # synthetic: a fifth of an epoch, at least one batch per rank
            for step in range(max(1, self.steps_per_epoch // 5)):
                yield self._prepare(*self._synthetic(1, 0, step), augment=False)
            return
        shard = torch.tensor(_shard(len(self.val[1]), self.rank, self.cfg.world_size), dtype=torch.long)
        for start in range(0, len(shard), b):
            batch = shard[start : start + b]
            yield self._prepare(self.val[0][batch], self.val[1][batch], augment=False)

    def state_dict(self) -> dict[str, Any]:
        return {"augment_generator": self.augment_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.augment_generator.set_state(state["augment_generator"])


class _BatchPlan(Sampler[list[Item]]):
    """The batches the persistent loader reads next: an epoch's training batches from a step on, or the
    validation batches. The loader is built once; each pass sets the plan, then starts an iteration (the
    plan is read in the training process, so a new plan reaches persistent loader processes)."""

    def __init__(self) -> None:
        self.batches: list[list[Item]] = []

    def __iter__(self) -> Iterator[list[Item]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BadImageError(UsageError):
    """An unreadable image under ``--on-bad-image error``."""


class ImageFolderSource(DataSource):
    """``DIR/train`` and ``DIR/val`` class folders (the ImageNet layout): random-resized crop + flip for
    training, resize + center crop for validation (see :mod:`lmfused.train.images`).

    One DataLoader serves the whole run (persistent loader processes, ``--prefetch`` batches each), for
    training and validation; it returns uint8 batches that :class:`~lmfused.train.images.DevicePrefetcher`
    flips, converts and normalises on the device. The data order is DistributedSampler's (seed, epoch); each
    sample's augmentation is seeded by (seed, epoch, index), so a resumed run repeats it exactly.
    """

    def __init__(self, cfg: TrainConfig, rank: int, device: torch.device) -> None:
        root = _data_dir(cfg)
        _import_torchvision("imagefolder")
        from lmfused.train import images as im

        self._im = im
        splits, classes = [], []
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UsageError(f"--data-dir: {root} has no '{split}' folder (expected DIR/train, DIR/val)")
            try:
                names, samples = im.list_images(str(root / split))
            except OSError as exc:
                raise UsageError(f"--data-dir: cannot read image folders under {root}: {exc}") from None
            splits.append(samples)
            classes.append(names)
        if not splits[0]:
            raise UsageError(f"--data-dir: {root}/train holds no images in class folders")
        if classes[1] != classes[0]:
            raise UsageError(f"--data-dir: the class folders of {root}/train and {root}/val differ")
        self.cfg, self.rank, self.device = cfg, rank, device
        self.num_classes = len(classes[0])
        self.steps_per_epoch = len(splits[0]) // cfg.global_batch_size
        if self.steps_per_epoch == 0:
            raise UsageError(f"--data-dir: {root}/train holds fewer images than one global batch")
        self.decoder = "cpu" if cfg.decode == "auto" else cfg.decode
        self.dataset = im.ImageFolderDataset(splits, cfg.image_size, self.decoder, cfg.augment)
        self.workers = im.default_workers() if cfg.workers is None else cfg.workers
        if cfg.workers is None and self.decoder == "gpu":  # reading files: one process reads 10,000+ img/s
            self.workers = min(self.workers, 4)
        self.plan = _BatchPlan()
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.plan,
            num_workers=self.workers,
            collate_fn=im.collate,
            pin_memory=device.type == "cuda",
            persistent_workers=self.workers > 0,
            prefetch_factor=cfg.prefetch if self.workers > 0 else None,
        )
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp, torch.float32)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.bad_images: dict[str, str] = {}  # path -> reason, every unreadable image met by this rank
        self._new_bad: list[tuple[str, str]] = []
        self._active: Any = None  # the iterator of the pass in progress
        self._lock = threading.Lock()

    def _report(self, bad: list[str]) -> None:
        """Record unreadable images (the device-decode thread too), or stop under --on-bad-image error."""
        for entry in bad:
            path, _, reason = entry.partition(": ")
            if self.cfg.on_bad_image == "error":
                raise BadImageError(f"--on-bad-image error: unreadable image {path} ({reason})")
            with self._lock:
                if path not in self.bad_images:
                    self.bad_images[path] = reason
                    self._new_bad.append((path, reason))

    def take_bad_images(self) -> list[tuple[str, str]]:
        with self._lock:
            new, self._new_bad = self._new_bad, []
        return new

    @property
    def bad_image_count(self) -> int:
        return len(self.bad_images)

    def _prepare(self, batch: Any) -> Batch:
        """A host batch -> normalised images and labels on the device (on the prefetcher's stream)."""
        if batch.images is not None:
            images, labels, flips = batch.images.to(self.device, non_blocking=True), batch.labels, batch.flips
        else:
            images, labels, flips, bad = self._im.decode_on_device(batch, self.device, self.cfg.image_size)
            self._report(bad)
        images = self._im.normalize_batch(
            images, flips, IMAGENET_MEAN, IMAGENET_STD, self.dtype, self.memory_format
        )
        return images, labels.to(self.device, non_blocking=True)

    def _checked(self) -> Iterator[Any]:
        for batch in self.loader:
            self._report(batch.bad)
            if batch.fatal is not None:
                raise UsageError(f"--data-dir: {batch.fatal}")
            yield batch

    def _run(self, batches: list[list[Item]]) -> Iterator[Batch]:
        if self._active is not None:  # an abandoned pass (max-steps, interruption): stop its thread first
            self._active.close()
        self.plan.batches = batches
        prefetcher = self._im.DevicePrefetcher(
            self._checked(), self._prepare, self.device, thread=self.decoder == "gpu"
        )
        self._active = iter(prefetcher)
        return self._active

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        b = self.cfg.batch_size
        indices = _epoch_indices(len(self.dataset), self.cfg, self.rank, epoch)
        key = self._im.sample_key
        batches = [
            [(0, i, key(self.cfg.seed, epoch, i)) for i in indices[step * b : (step + 1) * b]]
            for step in range(start_step, self.steps_per_epoch)
        ]
        return self._run(batches)

    def val_batches(self) -> Iterator[Batch]:
        shard = _shard(len(self.dataset.splits[1]), self.rank, self.cfg.world_size)
        b = self.cfg.batch_size
        return self._run([[(1, i, 0) for i in shard[s : s + b]] for s in range(0, len(shard), b)])


def _import_torchvision(dataset: str) -> Any:
    try:
        import torchvision
    except Exception as exc:  # ImportError, or an install that does not match this torch
        raise UsageError(
            f"--data {dataset}: needs the optional package torchvision, which cannot be imported "
            f"({type(exc).__name__}: {exc}); install a torchvision built for this torch"
        ) from None
    return torchvision


def _data_dir(cfg: TrainConfig) -> Path:
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data-dir: {root} is not a directory")
    return root


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8) if images.dtype == torch.uint8 else out.clamp_(0, 1)


def _digits(cfg: TrainConfig, rank: int, device: torch.device) -> TensorSource:
    """scikit-learn's bundled 8x8 handwritten digits, upscaled (bilinear) to the image size, 3 channels, a
    fixed 80/20 train/val split; normalised with the training split's mean and std."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("--data digits: needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # pixel values 0..16
    images = _resize(images, cfg.image_size).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_val = int(len(labels) * DIGITS_VAL_FRACTION)
    val, train = order[:n_val], order[n_val:]
    mean, std = images[train].mean().item(), images[train].std().item()
    return TensorSource(
        cfg,
        rank,
        device,
        train=(images[train], labels[train]),
        val=(images[val], labels[val]),
        mean=(mean,) * 3,
        std=(std,) * 3,
        num_classes=10,
        flip=False,
    )


CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"


def read_cifar_batch(path: Path) -> Batch:
    """One CIFAR-10 python batch (a pickled dict with b"data", uint8 (N, 3072), and b"labels") as uint8 images
    (N, 3, 32, 32) and int64 labels. No checksum: any file in that format is accepted.

    Raises:
        UsageError: naming the file when it is missing or not a batch of that format.
    """
    if not path.is_file():
        raise UsageError(
            f"--data-dir: no CIFAR-10 data: {path} is missing (expected the python version, "
            f"cifar-10-batches-py/{{{','.join(CIFAR_TRAIN_FILES)},{CIFAR_TEST_FILE}}}; nothing is downloaded)"
        )
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"] if b"data" in entry else entry["data"], dtype=np.uint8)
        labels = entry.get(b"labels", entry.get("labels"))
        if labels is None:
            raise KeyError("labels")
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels_t) != len(data):
            raise ValueError(f"data of shape {data.shape} with {len(labels_t)} labels, expected (N, 3072)")
        if len(labels_t) and (labels_t.min() < 0 or labels_t.max() > 9):
            raise ValueError("labels outside 0..9")
    except Exception as exc:  # noqa: BLE001 - any damage is reported as one line naming the file
        raise UsageError(
            f"--data-dir: {path} is damaged or not a CIFAR-10 python batch ({type(exc).__name__}: {exc})"
        ) from None
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, labels_t


def _cifar10(cfg: TrainConfig, rank: int, device: torch.device) -> TensorSource:
    """CIFAR-10 from DIR/cifar-10-batches-py (or DIR itself holding the batches), read directly (no
    torchvision, no checksum), in memory as uint8."""
    root = _data_dir(cfg)
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir() and (root / CIFAR_TEST_FILE).exists():
        folder = root
    splits = []
    for names in (CIFAR_TRAIN_FILES, (CIFAR_TEST_FILE,)):
        parts = [read_cifar_batch(folder / name) for name in names]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        splits.append((_resize(images, cfg.image_size), labels))
    return TensorSource(
        cfg, rank, device, train=splits[0], val=splits[1], mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10
    )


def build_source(cfg: TrainConfig, rank: int, device: torch.device) -> DataSource:
    """The data source of ``cfg.data`` for ``rank`` (UsageError when its data or packages are missing)."""
    if cfg.data == "digits":
        return _digits(cfg, rank, device)
    if cfg.data == "cifar10":
        return _cifar10(cfg, rank, device)
    if cfg.data == "imagefolder":
        return ImageFolderSource(cfg, rank, device)
    mean, std = (0.5,) * 3, (0.29,) * 3  # uniform [0, 1) pixels: mean 1/2, std 1/sqrt(12)
    return TensorSource(
        cfg, rank, device, train=None, val=None, mean=mean, std=std, num_classes=cfg.num_classes
    )
