"""lmfused.train data: CIFAR-10 batches read without a checksum; the image-folder pipeline (torchvision.io
decode, uint8 batches, device-side normalisation, device decode, bad images) against the PIL path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from lmfused.train import main


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
