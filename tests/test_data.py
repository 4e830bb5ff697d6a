"""lmfused.train data: CIFAR-10 batches read without a checksum; the image-folder pipeline (torchvision.io
decode, uint8 batches, device-side normalisation, device decode, bad images) against the PIL path."""

from __future__ import annotations

import io
import json
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lmfused.train import images as im
from lmfused.train import main
from lmfused.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from lmfused.train.images import RRC_RATIO, RRC_SCALE
from tests.conftest import required_libraries

try:  # the image-folder pipeline needs torchvision (and PIL); the CIFAR-10 reader does not
    import torchvision  # noqa: F401
    from PIL import Image

    HAS_TORCHVISION = True
except Exception:  # absent, or built for another torch
    if "torchvision" in required_libraries():  # LMFUSED_REQUIRE_LIBS: a missing library fails, not skips
        raise
    HAS_TORCHVISION = False
needs_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")


def records(out_dir: Path, kind: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def write_cifar_batches(root: Path, per_batch: int = 8, test: int = 8) -> Path:
    """Fake CIFAR-10 python batches (random pixels, labels i % 10) in ROOT/cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        entry = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [i % 10 for i in range(n)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar10_reads_batches_without_a_checksum(tmp_path: Path, capsys) -> None:
    write_cifar_batches(tmp_path / "data")
    args = ["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--batch-size", "8", "--no-progress"]
    rc = main([*args, "--image-size", "16", "--epochs", "1", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "10 classes" in out and "5 steps/epoch" in out  # 40 training images, batches of 8
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    (epoch,) = [r for r in map(json.loads, lines) if r["type"] == "epoch"]
    assert epoch["val_loss"] is not None


@pytest.mark.parametrize("damage", ["missing", "truncated", "wrong-shape"])
def test_cifar10_names_the_missing_or_damaged_file(tmp_path: Path, capsys, damage: str) -> None:
    folder = write_cifar_batches(tmp_path / "data")
    target = folder / "data_batch_3"
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    else:
        with target.open("wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    rc = main(["--data", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(target) in err
    assert ("is missing" if damage == "missing" else "is damaged or not a CIFAR-10 python batch") in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------

SIZE = 24


def smooth_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A photo-like test image: upsampled coarse noise (so resizing filters agree) plus a little grain."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), 3)
    grain = rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))


def make_folder(root: Path, per_class: int = 6, val: int = 2, png: bool = False) -> Path:
    """DIR/{train,val}/{a,b}/*.jpg of assorted sizes (one PNG per class with ``png``)."""
    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("val", val)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(30, 70, 2))
                ext = "png" if png and i == 0 else "jpg"
                smooth_image(rng, h, w).save(root / split / name / f"{i}.{ext}", quality=90)
    return root


@needs_torchvision
@pytest.mark.parametrize(
    "height, width", [(375, 500), (500, 333), (20, 200)], ids=["wide", "tall", "fallback"]
)
def test_crop_draws_follow_torchvision_get_params(height: int, width: int) -> None:
    """The same distribution of crops as RandomResizedCrop.get_params: area fraction, aspect ratio, position,
    and how often the fallback (central crop) is taken."""
    from torchvision import transforms as T

    n = 3000
    torch.manual_seed(0)
    ours = np.array([im.rrc_params(height, width, im.sample_generator(k)) for k in range(n)], dtype=float)
    ref = np.array(
        [T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(RRC_SCALE), list(RRC_RATIO))
         for _ in range(n)],
        dtype=float,
    )  # fmt: skip

    def features(p: np.ndarray) -> np.ndarray:
        top, left, h, w = p.T
        centre_y = (top + h / 2) / height
        centre_x = (left + w / 2) / width
        return np.stack([h * w / (height * width), np.log(w / h), centre_y, centre_x], 1)

    a, b = features(ours), features(ref)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # quantiles within sampling noise (a few % of the range)
        np.testing.assert_allclose(np.quantile(a, q, 0), np.quantile(b, q, 0), atol=0.03)
    np.testing.assert_allclose(a.mean(0), b.mean(0), atol=0.015)
    fallback = [(np.abs(p[:, 2] - p[:, 2].max()) < 1).mean() for p in (ours, ref)]
    assert abs(fallback[0] - fallback[1]) < 0.03
    assert (ours[:, 2] <= height).all() and (ours[:, 3] <= width).all() and (ours >= 0).all()


@needs_torchvision
def test_decoders_agree_in_geometry_and_statistics(tmp_path: Path) -> None:
    """The torchvision.io path and the device-decode path (on CPU) against the PIL path: same crops and flips
    for the same keys, pixel values within a few levels, the same statistics."""
    root = make_folder(tmp_path / "data", per_class=4)
    _, samples = im.list_images(str(root / "train"))
    paths = [p for p, _ in samples]
    for train in (True, False):
        keys = [im.sample_key(0, 3, i) for i in range(len(paths))]
        pil = [
            im.pil_transform(Path(p).read_bytes(), SIZE, train, k) for p, k in zip(paths, keys, strict=True)
        ]
        tvio = [
            im.tensor_transform(Path(p).read_bytes(), SIZE, train, k)
            for p, k in zip(paths, keys, strict=True)
        ]
        assert [f for _, f in pil] == [f for _, f in tvio]
        if train:
            assert 0 < sum(f for _, f in pil) < len(pil)  # some flipped, some not
        a = torch.stack([x for x, _ in pil]).float()
        b = torch.stack([x for x, _ in tvio]).float()
        assert (a - b).abs().mean() < 3.0, (a - b).abs().mean()  # of 255 levels: decoder and filter rounding
        assert (a.mean((0, 2, 3)) - b.mean((0, 2, 3))).abs().max() < 1.0
        assert (a.std((0, 2, 3)) - b.std((0, 2, 3))).abs().max() < 1.5
        # Device decode (here on the CPU): the same code as on CUDA, identical to the torchvision.io path.
        dataset = im.ImageFolderDataset([samples, samples], SIZE, "gpu", augment=True)
        batch = im.collate([dataset[(0 if train else 1, i, k)] for i, k in enumerate(keys)])
        assert batch.images is None and all(p.dim() == 1 for p in batch.payload)
        images, labels, flips, bad = im.decode_on_device(batch, torch.device("cpu"), SIZE)
        assert not bad and torch.equal(images, b.to(torch.uint8))
        assert flips.tolist() == [f for _, f in tvio] and labels.tolist() == [c for _, c in samples]


@needs_torchvision
def test_crop_geometry_with_a_marked_image(tmp_path: Path) -> None:
    """Every decoder crops the same window: an image whose pixels encode their coordinates (PNG, lossless)."""
    h, w = 48, 64
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    arr = np.stack([yy * 5, xx * 4, np.full_like(yy, 128)], -1).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(arr).save(data, "PNG")
    for key in range(20):
        (top, left, ch, cw), _ = im.geometry(h, w, SIZE, True, key)
        for transform in (im.pil_transform, im.tensor_transform):
            out, _ = transform(data.getvalue(), SIZE, True, key)
            rows, cols = out[0].float() / 5, out[1].float() / 4
            # The output spans the crop window: first and last rows/columns near its edges.
            assert abs(rows[0].mean() - (top + 0.5 * ch / SIZE - 0.5)) < 1.0
            assert abs(rows[-1].mean() - (top + ch - 0.5 * ch / SIZE - 0.5)) < 1.0
            assert abs(cols[:, 0].mean() - (left + 0.5 * cw / SIZE - 0.5)) < 1.0
            assert abs(cols[:, -1].mean() - (left + cw - 0.5 * cw / SIZE - 0.5)) < 1.0


@needs_torchvision
def test_normalize_batch_equals_to_tensor_and_normalize() -> None:
    x = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    flips = torch.tensor([True, False, True])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = im.normalize_batch(x, flips, mean, std, memory_format=torch.channels_last)
    ref = torch.where(flips[:, None, None, None], x.flip(-1), x).float() / 255
    ref = (ref - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert im.normalize_batch(x, None, mean, std, torch.bfloat16).dtype == torch.bfloat16


@needs_torchvision
def test_collate_stacks_channels_last_uint8() -> None:
    images = [torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(3)]
    batch = im.collate([(x, i, bool(i % 2), i, f"{i}.jpg", [], True) for i, x in enumerate(images)])
    assert batch.images.dtype == torch.uint8 and batch.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch.images, torch.stack(images)) and batch.flips.tolist() == [False, True, False]


@needs_torchvision
def test_device_decode_replaces_an_undecodable_image(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", per_class=2)
    _, samples = im.list_images(str(root / "train"))
    Path(samples[1][0]).write_bytes(Path(samples[1][0]).read_bytes()[:200])  # truncated JPEG
    dataset = im.ImageFolderDataset([samples, samples], SIZE, "gpu", augment=True)
    batch = im.collate([dataset[(0, i, i)] for i in range(len(samples))])
    images, labels, _, bad = im.decode_on_device(batch, torch.device("cpu"), SIZE)
    assert len(bad) == 1 and bad[0].startswith(samples[1][0] + ": ")
    assert images.shape == (len(samples), 3, SIZE, SIZE) and torch.equal(images[1], images[0])
    assert labels[1] == labels[0]


@needs_torchvision
def test_default_workers_share_the_cores(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert im.default_workers(1) == 15 and im.default_workers(8) == 1 and im.default_workers(2) == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert im.default_workers(1) == 1


def imagefolder_args(root: Path, *extra: str) -> list[str]:
    return [
        "--data", "imagefolder", "--data-dir", str(root), "--image-size", str(SIZE), "--batch-size", "4",
        "--no-progress", *extra,
    ]  # fmt: skip


STOCHASTIC_FREE: list[str] = []


@needs_torchvision
@pytest.mark.parametrize("decode, workers", [("cpu", "1"), ("gpu", "0"), ("pil", "0")])
def test_imagefolder_runs_with_each_decoder(tmp_path: Path, capsys, decode: str, workers: str) -> None:
    root = make_folder(tmp_path / "data", png=True)
    args = imagefolder_args(root, "--decode", decode, "--workers", workers, "--epochs", "1")
    rc = main([*args, "--channels-last", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "2 classes" in out and "3 steps/epoch" in out
    (epoch,) = records(tmp_path / "out", "epoch")
    assert epoch["val_acc"] is not None and epoch["bad_images"] == 0


@needs_torchvision
def test_imagefolder_loader_is_built_once(tmp_path: Path) -> None:
    from lmfused.train.config import resolve_config
    from lmfused.train.data import ImageFolderSource

    root = make_folder(tmp_path / "data")
    cfg = resolve_config({"data": "imagefolder", "data_dir": str(root), "image_size": SIZE, "batch_size": 4,
                          "workers": 1})  # fmt: skip
    source = ImageFolderSource(cfg, 0, torch.device("cpu"))
    first = [labels for _, labels in source.train_batches(0)]
    iterator = source.loader._iterator
    worker_pids = [w.pid for w in iterator._workers]
    val = [labels for _, labels in source.val_batches()]
    again = [labels for _, labels in source.train_batches(0, start_step=1)]
    assert source.loader._iterator is iterator and [w.pid for w in iterator._workers] == worker_pids
    assert len(first) == 3 and sum(len(v) for v in val) == 4
    assert [t.tolist() for t in again] == [t.tolist() for t in first[1:]]  # the same order from step 1 on
    images, _ = next(iter(source.train_batches(1)))
    assert images.dtype == torch.float32 and images.shape == (4, 3, SIZE, SIZE)


@needs_torchvision
def test_imagefolder_resume_repeats_the_uninterrupted_run(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "data")
    args = imagefolder_args(root, "--workers", "0", "--epochs", "2")
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    assert main([*args, "--out", str(tmp_path / "cut"), "--stop-after-steps", "4"]) == 0
    assert main(["--resume", str(tmp_path / "cut"), "--no-progress", "--workers", "1"]) == 0
    capsys.readouterr()
    losses = [(r["step"], r["loss"]) for r in records(tmp_path / "full", "step")]
    assert [(r["step"], r["loss"]) for r in records(tmp_path / "cut", "step")] == losses  # bitwise


@needs_torchvision
@pytest.mark.parametrize("decode", ["cpu", "gpu"], ids=["host-decode", "device-decode"])  # not "gpu": a mark
def test_bad_image_is_skipped_and_named_once(tmp_path: Path, capsys, decode: str) -> None:
    root = make_folder(tmp_path / "data")
    bad = root / "train" / "a" / "truncated.jpg"
    bad.write_bytes((root / "train" / "a" / "1.jpg").read_bytes()[:300])
    (root / "train" / "b" / "notanimage.jpg").write_text("hello")
    args = imagefolder_args(root, "--workers", "1", "--epochs", "2", "--decode", decode)
    rc = main([*args, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0 and "Traceback" not in err
    assert out.count(f"skipped unreadable image {bad} (") == 1  # two epochs, named once
    named = records(tmp_path / "out", "bad_image")
    assert sorted(Path(r["path"]).name for r in named) == ["notanimage.jpg", "truncated.jpg"]
    assert [r["bad_images"] for r in records(tmp_path / "out", "epoch")] == [2, 2]


@needs_torchvision
def test_bad_image_error_exits_2_naming_the_file_and_keeps_the_checkpoint(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "data")
    args = imagefolder_args(root, "--workers", "0", "--on-bad-image", "error")
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "out")]) == 0
    bad = root / "train" / "b" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    rc = main(["--resume", str(tmp_path / "out"), "--epochs", "2", "--no-progress"])
    _, err = capsys.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"lmfused-train: error: --on-bad-image error: unreadable image {bad} (")
    ckpt = load_checkpoint(tmp_path / "out" / CHECKPOINT_NAME)
    assert ckpt["position"]["global_step"] >= 3  # the first epoch (and any step of the second) is kept


@needs_torchvision
@pytest.mark.gpu
def test_device_decode_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", per_class=4)
    _, samples = im.list_images(str(root / "train"))
    dataset = im.ImageFolderDataset([samples, samples], SIZE, "gpu", augment=True)
    batch = im.collate([dataset[(0, i, i)] for i in range(len(samples))])
    cpu, _, cpu_flips, _ = im.decode_on_device(batch, torch.device("cpu"), SIZE)
    cuda, labels, flips, bad = im.decode_on_device(batch.pin_memory(), torch.device("cuda"), SIZE)
    assert not bad and torch.equal(flips.cpu(), cpu_flips) and labels.tolist() == [c for _, c in samples]
    # nvjpeg's IDCT and chroma upsampling differ from libjpeg's, magnified here by upscaling 30-70 px images:
    # a mean of 3.3 (of 255) on an H200 (torch 2.11). A crop one pixel off gives 10-14 on these images, a
    # wrong flip 57: the bound separates decoders from geometry.
    assert (cuda.cpu().float() - cpu.float()).abs().mean() < 5.0
    device = torch.device("cuda")

    def prepare(b: im.HostBatch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, flips, _ = im.decode_on_device(b, device, SIZE)
        return im.normalize_batch(images, flips, (0.5,) * 3, (0.25,) * 3), labels.to(device)

    expected = prepare(batch)
    for thread in (False, True):  # the side stream, and the decode thread with its own stream
        out = list(im.DevicePrefetcher([batch] * 4, prepare, device, thread=thread))
        assert len(out) == 4
        for x, y in out:
            assert x.is_cuda and torch.equal(x, expected[0]) and torch.equal(y, expected[1])


@needs_torchvision
def test_a_folder_of_unreadable_images_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    root = make_folder(tmp_path / "data", per_class=2)
    for path in (root / "train").rglob("*.jpg"):
        path.write_text("not an image")
    rc = main([*imagefolder_args(root, "--workers", "1", "--epochs", "1"), "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--data-dir: no readable image among 4 files from" in err


def test_threaded_prefetcher_yields_in_order_raises_and_stops() -> None:
    batches = [torch.full((2,), float(i)) for i in range(5)]
    device = torch.device("cpu")
    prepare = lambda b: (b * 2, b.long())  # noqa: E731
    inline = list(im.DevicePrefetcher(batches, prepare, device))
    threaded = list(im.DevicePrefetcher(batches, prepare, device, thread=True, depth=2))
    assert (
        [x.tolist() for x, _ in threaded]
        == [x.tolist() for x, _ in inline]
        == [[2.0 * i] * 2 for i in range(5)]
    )

    def failing(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if b[0] == 2:
            raise ValueError("batch 2")
        return prepare(b)

    seen = []
    with pytest.raises(ValueError, match="batch 2"):
        for x, _ in im.DevicePrefetcher(batches, failing, device, thread=True):
            seen.append(x[0].item())
    assert seen == [0.0, 2.0]
    it = iter(im.DevicePrefetcher(iter(batches), prepare, device, thread=True, depth=1))
    next(it)
    threads = [t for t in threading.enumerate() if t.name == "lmfused-device-decode"]
    assert threads and threads[0].is_alive()
    it.close()  # an abandoned pass: the thread stops
    assert not threads[0].is_alive()


@needs_torchvision
def test_cmyk_and_grayscale_jpegs_decode_on_every_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    samples = []
    for i, mode in enumerate(("CMYK", "L", "RGB")):
        path = tmp_path / f"{i}.jpg"
        smooth_image(rng, 40, 50).convert(mode).save(path, quality=95)
        samples.append((str(path), 0))
    for decoder in ("cpu", "pil", "gpu"):
        dataset = im.ImageFolderDataset([samples, samples], SIZE, decoder, augment=True)
        batch = im.collate([dataset[(0, i, i)] for i in range(3)])
        assert not batch.bad, batch.bad
        if decoder == "gpu":
            images, _, _, bad = im.decode_on_device(batch, torch.device("cpu"), SIZE)
            assert not bad
        else:
            images = batch.images
        assert images.shape == (3, 3, SIZE, SIZE)
        gray = images[1].float()
        assert (gray[0] - gray[1]).abs().max() <= 2  # a grayscale image stays gray in RGB


@needs_torchvision
def test_imagefolder_ranks_split_each_epoch_afresh(tmp_path: Path) -> None:
    """Under DDP every rank reads its DistributedSampler share of (seed, epoch), also with persistent
    loader processes: the shares are disjoint, cover the epoch, and change from epoch to epoch."""
    from lmfused.train.config import resolve_config
    from lmfused.train.data import ImageFolderSource

    root = make_folder(tmp_path / "data", per_class=8)
    explicit = {"data": "imagefolder", "data_dir": str(root), "image_size": SIZE, "batch_size": 4}
    explicit["workers"] = 0
    cfg = resolve_config(explicit, world_size=2)
    sources = [ImageFolderSource(cfg, rank, torch.device("cpu")) for rank in (0, 1)]
    orders = []
    for epoch in (0, 1):
        shares = []
        for source in sources:
            list(source.train_batches(epoch))
            shares.append([index for batch in source.plan.batches for _, index, _ in batch])
        assert len(shares[0]) == len(shares[1]) == 8 and not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(16))
        orders.append(shares[0])
    assert orders[0] != orders[1]
