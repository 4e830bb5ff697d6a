"""lmfused.train: smoke, learning, exact resume, DDP (gloo, 2 processes), signals, checkpoints, bad input.

Everything runs on CPU with lm_resnet20 on tiny inputs. Most runs call ``main`` in-process; the signal,
torchrun and exit-code tests run the command in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmfused.train import main
from lmfused.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from lmfused.train.data import random_crop_flip
from lmfused.train.loop import lr_factor, step_milestones

REPO = Path(__file__).resolve().parents[1]
# 3 steps per epoch of 8 images of 16x16: a run of a few steps takes a second or two.
TINY = ["--image-size", "16", "--batch-size", "8", "--synthetic-size", "24", "--no-progress"]
# Every source of randomness on: per-batch stochastic depth, noise injection, augmentation.
STOCHASTIC = ["--survival-prob", "0.5", "--sd-mode", "batch", "--noise-std", "0.01"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(args) in-process: (exit code, stdout, stderr)."""
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def records(out_dir: Path, kind: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def step_losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(out_dir, "step")]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time, to show that nothing changed."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def subprocess_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of a finished 2-step run (a valid checkpoint to damage or mismatch)."""
    out = tmp_path_factory.mktemp("finished")
    assert main([*TINY, "--max-steps", "2", "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


def test_random_crop_flip_is_a_window_of_the_padded_image() -> None:
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6) + 1
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r : r + 5, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    # Same generator state, same draws; no padding and no flip is the identity.
    assert torch.equal(out, random_crop_flip(x, 2, torch.Generator().manual_seed(0)))
    assert torch.equal(random_crop_flip(x, 0, torch.Generator(), flip=False), x)


def test_lr_schedule() -> None:
    assert step_milestones(160) == (80, 120)
    step = dict(steps_per_epoch=10, epochs=160, schedule="step", warmup_epochs=0.0)
    assert [lr_factor(s, **step) for s in (0, 799, 800, 1199, 1200)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    warm = dict(step, warmup_epochs=1.0)
    assert lr_factor(0, **warm) == pytest.approx(0.1) and lr_factor(9, **warm) == 1.0
    cosine = dict(step, schedule="cosine")
    assert lr_factor(0, **cosine) == 1.0 and lr_factor(1599, **cosine) < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------


def test_synthetic_run_writes_metrics_checkpoint_and_summary(tmp_path: Path, capsys) -> None:
    rc, out, _ = run([*TINY, "--epochs", "1", "--global-batch-size", "8", "--out", str(tmp_path)], capsys)
    assert rc == 0 and "completed" in out
    steps = records(tmp_path, "step")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(set(r) == {"type", "step", "epoch", "loss", "lr", "img_per_s"} for r in steps)
    assert steps[0]["lr"] == pytest.approx(0.1 * 8 / 128)  # linear scaling from the CIFAR reference batch
    (epoch,) = records(tmp_path, "epoch")
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(epoch)
    assert sorted(epoch["k"]) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in (1, 2)]  # blocks with an LMStep
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["position"]["epoch"] == 1 and ckpt["position"]["global_step"] == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["median_img_per_s"] > 0


def test_recipe_options_run(tmp_path: Path, capsys) -> None:
    options = [
        "--amp", "bf16", "--channels-last", "--clip-grad", "1.0", "--label-smoothing", "0.1",
        "--schedule", "cosine", "--warmup-epochs", "0.5", "--no-wd-on-k", "--per-channel-k",
    ]  # fmt: skip
    rc, _, _ = run([*TINY, *options, "--epochs", "1", "--out", str(tmp_path)], capsys)
    assert rc == 0
    lrs = [r["lr"] for r in records(tmp_path, "step")]
    assert lrs[0] < lrs[1]  # warm-up
    assert main([*TINY, "--no-lm", "--max-steps", "1", "--out", str(tmp_path / "plain")]) == 0


def test_progress_bar_on_a_terminal(tmp_path: Path, monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*TINY, "--progress", "--epochs", "1", "--out", str(tmp_path)]) == 0
    assert "epoch 1/1:" in terminal.getvalue() and "img_s=" in terminal.getvalue()


def test_digits_run_learns(tmp_path: Path, capsys) -> None:
    # Defaults for digits: 2 epochs of batch 32; 16x16 inputs keep it to seconds on CPU.
    rc, _, _ = run(
        ["--data", "digits", "--image-size", "16", "--no-progress", "--out", str(tmp_path)], capsys
    )
    assert rc == 0
    losses = [loss for _, loss in step_losses(tmp_path)]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    final = records(tmp_path, "epoch")[-1]
    assert final["val_acc"] > 0.5, final  # chance is 0.1


@pytest.mark.parametrize("stop_at", [3, 4], ids=["at-epoch-end", "mid-epoch"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path: Path, capsys, stop_at: int) -> None:
    args = [*TINY, *STOCHASTIC, "--epochs", "2"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    rc, out, _ = run([*args, "--out", str(tmp_path / "cut"), "--stop-after-steps", str(stop_at)], capsys)
    assert rc == 0 and "interrupted by --stop-after-steps: checkpoint saved to" in out
    assert [s for s, _ in step_losses(tmp_path / "cut")] == list(range(1, stop_at + 1))
    # The rest of the configuration comes from the checkpoint.
    rc, out, _ = run(["--resume", str(tmp_path / "cut"), "--no-progress"], capsys)
    assert rc == 0 and "completed" in out
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "full")  # bitwise
    assert records(tmp_path / "cut", "epoch") == records(tmp_path / "full", "epoch")  # losses, accuracies, k


def test_torchrun_two_processes_keep_identical_parameters(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "lmfused.train", *TINY, "--batch-size", "4", *STOCHASTIC, "--epochs", "1",
        "--out", str(tmp_path), "--debug-param-hash",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes on cpu, global batch 8" in proc.stdout
    hashes = [(tmp_path / f"param_hash.rank{r}.txt").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    assert len(records(tmp_path, "step")) == 3 and len(records(tmp_path, "epoch")) == 1
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["config"]["world_size"] == 2


def test_sigterm_saves_a_loadable_checkpoint_and_exits_0(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lmfused.train", *TINY, "--synthetic-size", "8000", "--out", str(tmp_path)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "no step was logged"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "interrupted by SIGTERM: checkpoint saved to" in stdout.decode()
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    position = ckpt["position"]
    assert position["global_step"] >= 1 and position["step_in_epoch"] == position["global_step"]
    assert len(records(tmp_path, "step")) == position["global_step"]


# ----------------------------------------------------------------------------------------------------------
# Refusals: one message, exit code 2, no traceback, nothing written
# ----------------------------------------------------------------------------------------------------------

BAD_ARGUMENTS = {
    "unknown-model": (["--model", "lm_resnet7"], "unknown model 'lm_resnet7'"),
    "unknown-option": (["--bogus"], "unrecognized arguments: --bogus"),
    "bad-amp": (["--amp", "fp8"], "invalid choice: 'fp8'"),
    "fp16-on-cpu": (["--amp", "fp16", "--device", "cpu"], "--amp fp16: needs a CUDA device"),
    "negative-batch": (["--batch-size", "-4"], "--batch-size: expected > 0"),
    "zero-epochs": (["--epochs", "0"], "--epochs: expected > 0"),
    "negative-image-size": (["--image-size", "-32"], "--image-size: expected > 0"),
    "tiny-synthetic": (["--synthetic-size", "4"], "--synthetic-size: fewer than one global batch"),
    "survival-prob": (["--survival-prob", "1.5"], "--survival-prob: expected a probability in (0, 1]"),
    "no-data-dir": (["--data", "cifar10"], "--data-dir: required with --data cifar10"),
    "missing-data-dir": (["--data", "imagefolder", "--data-dir", "/nonexistent/x"], "is not a directory"),
    "unavailable-backend": (["--backend", "cuda", "--device", "cpu"], "--backend cuda:"),
    "missing-checkpoint": (["--resume", "/nonexistent/ckpt.pt"], "no checkpoint file at"),
    "zero-prefetch": (["--prefetch", "0"], "--prefetch: expected > 0"),
    "negative-workers": (["--workers", "-1"], "--workers: expected >= 0"),
    "bad-decode": (["--decode", "nvjpeg"], "invalid choice: 'nvjpeg'"),
    "bad-on-bad-image": (["--on-bad-image", "ignore"], "invalid choice: 'ignore'"),
}


@pytest.mark.parametrize("args, message", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_bad_arguments_give_one_message_and_exit_2(tmp_path: Path, capsys, args, message) -> None:
    rc, out, err = run([*TINY, "--out", str(tmp_path / "out"), *args], capsys)
    assert rc == 2
    assert err.startswith("lmfused-train: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("data", ["cifar10", "imagefolder"])
def test_missing_torchvision_or_data_is_named(tmp_path: Path, capsys, data: str) -> None:
    try:
        import torchvision  # noqa: F401

        expected = "has no 'train' folder"
    except Exception:  # absent, or built for another torch
        expected = f"--data {data}: needs the optional package torchvision"
    if data == "cifar10":  # read directly, without torchvision
        expected = "no CIFAR-10 data"
    rc, _, err = run(["--data", data, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_global_batch_must_divide_across_ranks(monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; the check comes before any process group
    rc, _, err = run([*TINY, "--global-batch-size", "7"], capsys)
    assert rc == 2 and "--global-batch-size: 7 is not divisible by the 2 processes" in err


def test_command_exits_2_without_traceback() -> None:
    cmd = [sys.executable, "-m", "lmfused.train", "--model", "nope"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]


def test_out_holding_a_checkpoint_needs_resume_or_overwrite(finished_run: Path, capsys) -> None:
    before = snapshot(finished_run)
    rc, _, err = run([*TINY, "--out", str(finished_run)], capsys)
    assert rc == 2 and "already holds a checkpoint" in err
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_is_refused_and_left_untouched(
    tmp_path: Path, finished_run: Path, capsys, damage
) -> None:
    data = (finished_run / CHECKPOINT_NAME).read_bytes()
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 100)
    before = snapshot(tmp_path)
    rc, _, err = run(["--resume", str(path), "--out", str(tmp_path)], capsys)
    assert rc == 2 and "the file is truncated or corrupt" in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and snapshot(tmp_path) == before


def test_checkpoint_of_another_model_is_refused(tmp_path: Path, finished_run: Path, capsys) -> None:
    before = snapshot(finished_run)
    rc, _, err = run(["--resume", str(finished_run), "--model", "lm_resnet32"], capsys)
    assert rc == 2 and "was saved for another setup: --model 'lm_resnet20'" in err
    # Same name, other shapes (a hand-edited or foreign file): the state_dict check catches it.
    ckpt = torch.load(finished_run / CHECKPOINT_NAME, weights_only=True)
    ckpt["model"]["fc.weight"] = torch.zeros(3, 64)
    torch.save(ckpt, tmp_path / CHECKPOINT_NAME)
    rc, _, err = run(["--resume", str(tmp_path), "--out", str(tmp_path)], capsys)
    assert rc == 2 and "was saved for another model (fc.weight: (3, 64) saved, (10, 64) expected)" in err
    assert snapshot(finished_run) == before
