"""Image-folder input pipeline of ``lmfused.train``: uint8 batches, normalised on the device.

Three decoders share one crop geometry (``--decode``):

* ``cpu`` (the default): loader processes decode with ``torchvision.io`` (libjpeg-turbo for JPEG,
  ``decode_image`` for PNG, WebP, GIF; PIL for what those do not read), random-resized-crop on the uint8
  tensor (``v2.functional.resized_crop``, bilinear, antialiased), and return uint8 batches, channels-last.
* ``pil``: the previous decoder (PIL, ``transforms.functional.resized_crop``), for comparison and as a
  fallback; its batches are uint8 as well.
* ``gpu``: loader processes only read the files; the batch is decoded on the device
  (``torchvision.io.decode_jpeg(..., device="cuda")``, nvjpeg) and cropped and resized there. Files that are
  not JPEG are decoded and cropped in the loader process as with ``cpu``.

Every sample's crop and flip are drawn from a generator seeded by (seed, epoch, index): the same image gets
the same crop on every decoder, with any number of loader processes, and a resumed run repeats the
augmentation of the uninterrupted one. The crops follow torchvision's ``RandomResizedCrop.get_params``
algorithm (scale (0.08, 1), ratio (3/4, 4/3)), drawn from Python's generator (microseconds a sample). The
flip and the conversion to the training dtype, the normalisation and the memory format happen on the
device (:func:`normalize_batch`), on a side stream that overlaps the previous step on CUDA
(:class:`DevicePrefetcher`): the host moves a quarter of the bytes of float32 batches.

Where the host time goes (``python -m bench.data`` prints it by stage): for ImageNet-like JPEGs (about
500x375, 85 KB) decoding is about two thirds of the torchvision.io path; crop and resize on the uint8 tensor
take half the PIL time, and the flip, float conversion and normalisation leave the host. Decoding at reduced
size (JPEG DCT scaling, PIL's ``draft``) is not used: a 1/2-scale decode loses nothing only where the crop is
at least 2 x 224 pixels on both sides, which a 375-pixel short side never allows; elsewhere the model would
see blurrier crops.

Unreadable images (truncated, not an image, unreadable file) are reported with their path; a loader process
replaces such a sample by the next readable image of the folder, so that batches keep their size (a changing
batch size would recompile a compiled model and unbalance DDP). torchvision is imported lazily.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import queue
import random
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DECODERS",
    "DevicePrefetcher",
    "HostBatch",
    "ImageFolderDataset",
    "collate",
    "decode_on_device",
    "default_workers",
    "list_images",
    "normalize_batch",
    "rrc_params",
    "sample_generator",
]

DECODERS = ("cpu", "pil", "gpu")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)
VAL_RESIZE_FRACTION = 0.875  # validation: resize the shorter side to size / 0.875, then the central crop
MAX_SUBSTITUTES = 64  # readable images tried in place of an unreadable one before giving up
JPEG_MAGIC = b"\xff\xd8"

Item = tuple[int, int, int]  # (split: 0 train / 1 val, index in the split, generator key)
Sample = tuple[Tensor | None, int, bool, int, str, list[str], bool]  # image None: path says why


def _reason(exc: BaseException) -> str:
    """An exception's message in one short line, without torchvision's source location."""
    lines = str(exc).strip().splitlines() or [""]
    return re.sub(r"^[\w.]+, \S+\.cpp:\d+, ", "", lines[0])[:200]


def default_workers(local_world_size: int | None = None) -> int:
    """Loader processes per rank: the cores this process may use, shared by the ranks of this node, less one
    for the training process itself; at least 1, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ranks = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(16, cores // max(1, ranks) - 1))


def sample_generator(key: int) -> random.Random:
    """The generator of one sample's augmentation draws (Python's: seeding and drawing cost microseconds)."""
    return random.Random(key)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The generator key of sample ``index`` of the training split in ``epoch``."""
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % (2**63)


def rrc_params(
    height: int,
    width: int,
    rng: random.Random,
    scale: Sequence[float] = RRC_SCALE,
    ratio: Sequence[float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop: ``RandomResizedCrop.get_params``'s algorithm (area
    fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``, 10 tries, then the central crop of
    the nearest allowed ratio), drawing from ``rng`` instead of torch's global generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_params(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) in the original image of the validation crop: the central size x size
    window after resizing the shorter side to ceil(size / 0.875) (ImageNet's 256 -> 224)."""
    resize = int(math.ceil(size / VAL_RESIZE_FRACTION))
    side = min(height, width) * size / resize  # the crop's side in original pixels
    h = w = max(1, int(round(side)))
    h, w = min(h, height), min(w, width)
    return int(round((height - h) / 2)), int(round((width - w) / 2)), h, w


def geometry(height: int, width: int, size: int, train: bool, key: int) -> tuple[tuple[int, ...], bool]:
    """The crop (top, left, height, width) and the flip of one sample."""
    if not train:
        return center_params(height, width, size), False
    rng = sample_generator(key)
    params = rrc_params(height, width, rng)
    return params, rng.random() < 0.5


def list_images(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class folders of ``root`` and their images (path, class index), in torchvision ImageFolder's order:
    classes sorted, files sorted within each class folder and its subfolders."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples = []
    for target, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), target))
    return classes, samples


# ----------------------------------------------------------------------------------------------------------
# Decoding and cropping on the host
# ----------------------------------------------------------------------------------------------------------


def _pil_open(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def decode_cpu(data: bytes) -> Tensor:
    """uint8 (3, H, W) RGB of an encoded image: torchvision.io for JPEG, PNG, WebP, GIF; PIL otherwise."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if data[:2] == JPEG_MAGIC:
        try:
            return decode_jpeg(buf, mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            if "CMYK" not in str(exc) and "colorspace" not in str(exc).lower():
                raise
    elif data[:8] == b"\x89PNG\r\n\x1a\n" or data[:4] in (b"RIFF", b"GIF8"):
        return decode_image(buf, mode=ImageReadMode.RGB)
    img = _pil_open(data)  # BMP, TIFF, PPM, CMYK JPEG, ...
    return torch.from_numpy(_pil_array(img)).permute(2, 0, 1)


def _pil_array(img: Any) -> Any:
    import numpy as np

    return np.array(img, dtype=np.uint8, copy=True)


def crop_tensor(img: Tensor, params: Sequence[int], size: int) -> Tensor:
    """The crop ``params`` of a uint8 (3, H, W) image resized to size x size (bilinear, antialiased)."""
    from torchvision.transforms.v2 import functional as F

    top, left, h, w = params
    return F.resized_crop(img, top, left, h, w, [size, size], antialias=True)


def pil_transform(data: bytes, size: int, train: bool, key: int) -> tuple[Tensor, bool]:
    """The PIL path: decode with PIL, crop and resize with ``transforms.functional`` on the PIL image."""
    import torchvision.transforms.functional as TF

    img = _pil_open(data)
    params, flip = geometry(img.height, img.width, size, train, key)
    out = TF.resized_crop(img, *params, [size, size])
    return torch.from_numpy(_pil_array(out)).permute(2, 0, 1), flip


def tensor_transform(data: bytes, size: int, train: bool, key: int) -> tuple[Tensor, bool]:
    """The torchvision.io path: decode to a uint8 tensor, crop and resize it."""
    img = decode_cpu(data)
    params, flip = geometry(img.shape[-2], img.shape[-1], size, train, key)
    return crop_tensor(img, params, size), flip


# ----------------------------------------------------------------------------------------------------------
# Dataset and batches
# ----------------------------------------------------------------------------------------------------------


@dataclass
class HostBatch:
    """A batch as the loader processes return it.

    ``images`` (N, 3, S, S) uint8, channels-last, when the host decoded; with device decoding ``payload``
    holds per sample either the file's bytes (1-D uint8, decoded on the device) or an image the host
    already cropped (3, S, S). ``flips`` are applied on the device. ``bad`` names the unreadable images met
    while building the batch ("path: reason"); ``fatal`` says why a sample has no image at all (every
    substitute unreadable too).
    """

    labels: Tensor
    flips: Tensor
    keys: Tensor
    images: Tensor | None = None
    payload: list[Tensor] | None = None
    paths: list[str] = field(default_factory=list)
    train: bool = True
    bad: list[str] = field(default_factory=list)
    fatal: str | None = None

    def pin_memory(self) -> HostBatch:
        """Page-locked copies of the tensors (DataLoader's pin_memory thread calls this)."""
        self.labels, self.flips = self.labels.pin_memory(), self.flips.pin_memory()
        if self.images is not None:
            self.images = self.images.pin_memory()
        if self.payload is not None:
            self.payload = [p if p.dim() == 1 else p.pin_memory() for p in self.payload]
        return self

    def __len__(self) -> int:
        return len(self.labels)


class ImageFolderDataset:
    """Training and validation images of one folder pair, read by (split, index, key) items.

    Args:
        splits: the (path, class) samples of the training and of the validation split.
        size: output side in pixels.
        decoder: ``cpu``, ``pil`` or ``gpu`` (read bytes only; non-JPEG files are decoded here).
        augment: random-resized crop and flip for training (else the validation crop).
    """

    def __init__(
        self, splits: Sequence[Sequence[tuple[str, int]]], size: int, decoder: str, augment: bool
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
        self.splits, self.size, self.decoder, self.augment = splits, size, decoder, augment

    def __len__(self) -> int:
        return len(self.splits[0])

    def _load(self, path: str, train: bool, key: int) -> tuple[Tensor, bool]:
        with open(path, "rb") as f:
            data = f.read()
        if self.decoder == "gpu" and data[:2] == JPEG_MAGIC:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), False
        transform = pil_transform if self.decoder == "pil" else tensor_transform
        return transform(data, self.size, train, key)

    def __getitem__(self, item: Item) -> Sample:
        """(image or bytes, label, flip, key, path, unreadable images met, train) of one sample."""
        split, index, key = item
        samples = self.splits[split]
        train = split == 0 and self.augment
        bad = []
        for attempt in range(min(MAX_SUBSTITUTES, len(samples))):
            path, label = samples[(index + attempt) % len(samples)]
            try:
                image, flip = self._load(path, train, key)
                return image, label, flip, key, path, bad, train
            except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal here
                bad.append(f"{path}: {type(exc).__name__}: {_reason(exc)}")
        fatal = f"no readable image among {len(bad)} files from {samples[index][0]} on (first: {bad[0]})"
        return None, samples[index][1], False, key, fatal, bad, train


def collate(samples: list[Sample]) -> HostBatch:
    """Stack host-decoded uint8 images into one channels-last batch; keep device-decode payloads a list."""
    images, labels, flips, keys, paths, bad, train = zip(*samples, strict=True)
    batch = HostBatch(
        labels=torch.tensor(labels, dtype=torch.long),
        flips=torch.tensor(flips, dtype=torch.bool),
        keys=torch.tensor(keys, dtype=torch.long),
        paths=list(paths),
        train=bool(train[0]),
        bad=[b for sample_bad in bad for b in sample_bad],
    )
    if any(img is None for img in images):  # a run of unreadable files: nothing to put in its place
        batch.fatal = next(p for img, p in zip(images, paths, strict=True) if img is None)
        return batch
    if all(img.dim() == 3 for img in images) and len({img.shape for img in images}) == 1:
        # (N, H, W, C) stacked from HWC views: one contiguous copy, read as channels-last NCHW.
        batch.images = torch.stack([img.permute(1, 2, 0) for img in images]).permute(0, 3, 1, 2)
    else:
        batch.payload = list(images)
    return batch


# ----------------------------------------------------------------------------------------------------------
# On the device
# ----------------------------------------------------------------------------------------------------------


def decode_on_device(
    batch: HostBatch, device: torch.device, size: int
) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """Decode and crop a device-decode batch on ``device`` (nvjpeg on CUDA; the same code on CPU).

    Returns (uint8 images (N, 3, S, S), labels, flips, unreadable images). An image that fails to decode is
    replaced by the previous readable image of the batch (by the next one for the first).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    assert batch.payload is not None
    encoded = [i for i, p in enumerate(batch.payload) if p.dim() == 1]
    decoded: dict[int, Tensor] = {}
    bad: list[str] = []
    if encoded:
        data = [batch.payload[i] for i in encoded]
        if device.type == "cuda":
            # nvJPEG's hardware decoder may write its outputs before work already queued on the stream has
            # run, into blocks the caching allocator recycled from that work: start it on an idle stream.
            torch.cuda.current_stream(device).synchronize()
        try:
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            decoded.update(zip(encoded, images, strict=True))
        except RuntimeError:  # one bad file fails the batch: decode one by one to name it
            for i in encoded:
                try:
                    decoded[i] = decode_jpeg(batch.payload[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    try:  # what nvJPEG does not read (CMYK, ...), the host may
                        decoded[i] = decode_cpu(batch.payload[i].numpy().tobytes()).to(device)
                    except Exception as exc:  # noqa: BLE001 - reported, its place taken by another image
                        bad.append(f"{batch.paths[i]}: {type(exc).__name__}: {_reason(exc)}")
    out: list[Tensor | None] = []
    flips = batch.flips.clone()
    for i, p in enumerate(batch.payload):
        if p.dim() == 3:  # decoded and cropped by the loader process (not a JPEG)
            out.append(p.to(device, non_blocking=True))
        elif i in decoded:
            img = decoded[i]
            params, flips[i] = geometry(img.shape[-2], img.shape[-1], size, batch.train, int(batch.keys[i]))
            out.append(crop_tensor(img, params, size))
        else:
            out.append(None)
    good = [i for i, img in enumerate(out) if img is not None]
    if not good:
        raise RuntimeError(f"no image of the batch could be decoded: {bad[0]}")
    # An undecodable image's place goes to the previous readable one (the first readable for the first).
    source = [
        i if img is not None else max((g for g in good if g < i), default=good[0])
        for i, img in enumerate(out)
    ]
    images = torch.stack([out[j] for j in source])  # type: ignore[misc]
    index = torch.tensor(source)
    return images, batch.labels[index], flips[index], bad


def normalize_batch(
    images: Tensor,
    flips: Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """uint8 (N, 3, H, W) -> flipped where ``flips``, ``dtype``, (x / 255 - mean) / std, ``memory_format``."""
    if flips is not None:
        flips = flips.to(images.device, non_blocking=True)
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=images.device)[:, None, None]
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=images.device)[
        :, None, None
    ]
    out = torch.addcmul(shift, images.float(), scale)
    return out.to(dtype=dtype, memory_format=memory_format)


_END = object()


class DevicePrefetcher:
    """Wraps an iterable of :class:`HostBatch` and yields (images, labels) ready on the device.

    On CUDA each batch is copied (non_blocking, from pinned memory) and converted by ``prepare`` on a side
    stream while the previous batch trains; the consumer's stream waits for it before use (timm's prefetcher
    pattern). Elsewhere the same work runs synchronously.

    With ``thread=True`` (device decoding) ``prepare`` runs in a background thread, ``depth`` batches ahead,
    on its own stream: nvJPEG decoding blocks its calling thread until the batch is decoded, and the training
    thread goes on launching steps meanwhile. Exceptions of the thread are raised in the consumer; closing
    the iterator (or abandoning it) stops and joins the thread.

    Args:
        batches: host batches.
        prepare: host batch -> (images, labels) on the device; called under the side stream on CUDA.
        device: the training device.
        thread: prepare in a background thread.
        depth: batches the thread prepares ahead.
    """

    def __init__(
        self,
        batches: Iterable[HostBatch],
        prepare: Callable[[HostBatch], tuple[Tensor, Tensor]],
        device: torch.device,
        *,
        thread: bool = False,
        depth: int = 2,
    ) -> None:
        self.batches, self.prepare, self.device = batches, prepare, device
        self.thread, self.depth = thread, depth

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.thread:
            return self._threaded()
        return self._inline()

    def _inline(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.device.type != "cuda":
            for batch in self.batches:
                yield self.prepare(batch)
            return
        stream = torch.cuda.Stream(device=self.device)
        pending: tuple[Tensor, Tensor] | None = None
        for batch in self.batches:
            # The side stream does not wait for the training stream (its inputs come from the host), so that
            # a device decode's synchronisation of it never waits for a training step.
            with torch.cuda.stream(stream):
                ready = self.prepare(batch)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in ready:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending

    def _threaded(self) -> Iterator[tuple[Tensor, Tensor]]:
        cuda = self.device.type == "cuda"
        results: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(device=self.device) if cuda else None
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    for batch in self.batches:
                        ready = self.prepare(batch)
                        event = None
                        if stream is not None:
                            event = torch.cuda.Event()
                            event.record(stream)
                        if not put((ready, event)):
                            return
                put(_END)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                put(exc)

        worker = threading.Thread(target=work, name="lmfused-device-decode", daemon=True)
        worker.start()
        try:
            while True:
                item = results.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                ready, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in ready:
                        t.record_stream(current)
                yield ready
        finally:
            stop.set()
            worker.join()
