"""The training loop of ``lmfused.train``: recipe, steps, evaluation, records, checkpoints and signals.

Recipe of Lu, Zhong, Li & Dong (*Beyond Finite Layer Neural Networks*, ICML 2018), after He et al. (2016):
SGD with momentum 0.9 and weight decay 1e-4 (on every parameter, the LM coefficients k included, unless
``--no-wd-on-k``: the paper does not say), lr 0.1 scaled linearly with the global batch, divided by 10 at 50%
and 75% of the epochs (or a cosine schedule), optional linear warm-up, label smoothing, gradient clipping.

Stopping: SIGTERM and SIGINT (and the test hook ``--stop-after-steps``) set a flag that the loop checks after
each step; all ranks agree on it in the step's metric reduction, save a checkpoint holding the exact position,
print "interrupted by SIGTERM: checkpoint saved to ..." and exit with code 0. Further signals are ignored
meanwhile; the checkpoint on disk is never half-written, whatever kills the process.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import lmfused
from lmfused.models import create_model
from lmfused.nn import LMStep, seed_stochastic_depth
from lmfused.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_save,
    atomic_write,
    capture_rng,
    check_state_dict,
    make_checkpoint,
    restore_rng,
    sd_generator,
)
from lmfused.train.config import MODEL_KEYS, TrainConfig, UsageError
from lmfused.train.data import BadImageError, DataSource, build_source
from lmfused.train.distributed import DistInfo, gather_objects

__all__ = ["Trainer", "lr_factor", "step_milestones"]

METRICS_NAME, SUMMARY_NAME = "metrics.jsonl", "summary.json"
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------------------


def step_milestones(epochs: int) -> tuple[int, int]:
    """Epochs at which the step schedule divides the lr by 10: 50% and 75% of the run (80, 120 of 160)."""
    return math.ceil(0.5 * epochs), math.ceil(0.75 * epochs)


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, schedule: str, warmup_epochs: float) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warm-up over ``warmup_epochs``,
    then the step schedule (x0.1 at each milestone) or a cosine decay to 0 at the end of the last epoch."""
    warmup = round(warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        epoch = step // steps_per_epoch
        return 0.1 ** sum(epoch >= m for m in step_milestones(epochs))
    progress = (step - warmup) / max(1, epochs * steps_per_epoch - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------
# Signals, records
# ----------------------------------------------------------------------------------------------------------


class StopFlag:
    """SIGTERM / SIGINT handlers that only record the request; the loop acts on it after the current step.

    Repeated signals change nothing: under torchrun a Ctrl-C reaches each worker twice (from the terminal and
    from the agent), and the checkpoint must still be written. SIGKILL ends a stuck run at once; the
    checkpoint on disk is then the previous one, intact.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        """Ask the loop to stop after the current step (the first reason given is kept)."""
        if self.reason is None:
            self.reason = reason

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Install the handlers for the duration of the block (main thread only), then restore the old."""
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous.clear()


class MetricsLog:
    """``metrics.jsonl``, one JSON record a line, flushed as written (rank 0 only).

    A resumed run first drops the records past its checkpoint (left by the interrupted run after its last
    save), so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, *, resume_step: int | None, completed_epochs: int) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and self._keep(json.loads(line), resume_step, completed_epochs)
            ]
            atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
        self._file = path.open("a")

    @staticmethod
    def _keep(record: dict[str, Any], step: int, epochs: int) -> bool:
        if record.get("type") == "step":
            return record["step"] <= step
        if record.get("type") == "epoch":
            return record["epoch"] <= epochs
        return True

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


@dataclass
class Position:
    """Where training stands. ``epoch`` is 0-based and in progress; ``sums`` are the epoch's global
    (loss x samples, correct, samples) so far, so a resumed epoch reports the same means."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar on a terminal, else None (tqdm is optional)."""
    if not (enabled and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------


class Trainer:
    """Everything a run needs, built and checked before anything is written.

    Construction raises :class:`UsageError` / :class:`CheckpointError` for bad settings, missing data or a
    checkpoint that does not fit; :meth:`fit` then trains and returns the exit code.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo, ckpt: dict[str, Any] | None) -> None:
        self.info, self.device = info, info.device
        self.out = Path(cfg.out)
        if ckpt is None and (self.out / CHECKPOINT_NAME).exists() and not cfg.overwrite:
            raise UsageError(
                f"--out: {self.out} already holds a checkpoint; continue it with --resume {self.out} "
                "or start afresh with --overwrite"
            )
        self._check_backend(cfg)
        self.source: DataSource = build_source(cfg, info.rank, self.device)
        if cfg.num_classes != self.source.num_classes:
            cfg = replace(cfg, num_classes=self.source.num_classes)  # digits, cifar10, image folders
        self.cfg = cfg
        if ckpt is not None:
            self._check_compatible(ckpt)

        # Same initialisation and the same batch-mode stochastic-depth draws on every rank.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        seed_stochastic_depth(cfg.seed)
        try:
            self.raw_model = create_model(
                cfg.model,
                lm=cfg.lm,
                num_classes=cfg.num_classes,
                survival_prob=cfg.survival_prob,
                sd_mode=cfg.sd_mode,
                noise_std=cfg.noise_std,
                per_channel_k=cfg.per_channel_k,
                backend=cfg.backend,
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--model {cfg.model}: {exc}") from None
        if ckpt is not None:
            check_state_dict(self.raw_model, ckpt["model"], cfg.resume or "")
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.raw_model.to(self.device, memory_format=self.memory_format)

        self.model: nn.Module = self.raw_model
        if info.distributed:
            # Batch-mode stochastic depth skips dropped branches: their parameters get no gradient that step.
            unused = cfg.sd_mode == "batch" and cfg.survival_prob < 1.0
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.raw_model, device_ids=device_ids, find_unused_parameters=unused
            )
        if cfg.compile:
            self.model = torch.compile(self.model)

        self.optimizer = self._make_optimizer()
        spe, epochs = self.source.steps_per_epoch, cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(
                s, steps_per_epoch=spe, epochs=epochs, schedule=cfg.schedule, warmup_epochs=cfg.warmup_epochs
            ),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # From here on each rank draws its own sample-mode masks and noise.
        torch.manual_seed(cfg.seed + 1 + info.rank)

        self.pos = Position()
        if ckpt is not None:
            self._restore(ckpt)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.timings: list[float] = []  # img/s of every step this process ran
        self._epoch_steps, self._epoch_time = 0, 0.0  # of the epoch in progress, for its log line
        self._checkpoint_at: int | None = None  # global step of the last checkpoint written

    # -- setup helpers ------------------------------------------------------------------------------------

    def _check_backend(self, cfg: TrainConfig) -> None:
        """Refuse an unavailable --backend now, with lm_step's own reason, rather than at the first step."""
        if cfg.backend is None:
            return
        x = torch.zeros(1, 1, device=self.device)
        try:
            lmfused.lm_step(x, x, None, torch.zeros(1, device=self.device), backend=cfg.backend)
        except (RuntimeError, ValueError) as exc:
            raise UsageError(f"--backend {cfg.backend}: {str(exc).removeprefix('backend: ')}") from None

    def _check_compatible(self, ckpt: dict[str, Any]) -> None:
        saved, cfg, path = ckpt["config"], self.cfg, self.cfg.resume
        differ = [
            f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(cfg, k)!r})"
            for k in MODEL_KEYS
            if saved.get(k) != getattr(cfg, k)
        ]
        if differ:
            raise CheckpointError(f"--resume: {path} was saved for another setup: {', '.join(differ)}")
        if saved.get("global_batch_size") != cfg.global_batch_size:
            raise CheckpointError(
                f"--resume: {path} was saved with a global batch of {saved.get('global_batch_size')}; this "
                f"run has {cfg.global_batch_size} (set --global-batch-size to keep the same data positions)"
            )
        if saved.get("steps_per_epoch") not in (None, self.source.steps_per_epoch):
            raise CheckpointError(
                f"--resume: {path} has {saved['steps_per_epoch']} steps per epoch; this data has "
                f"{self.source.steps_per_epoch}"
            )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        k_params = [m.k for m in self.raw_model.modules() if isinstance(m, LMStep)]
        k_ids = {id(p) for p in k_params}
        groups = [{"params": [p for p in self.raw_model.parameters() if id(p) not in k_ids]}]
        if k_params:
            groups.append({"params": k_params, "weight_decay": cfg.weight_decay if cfg.wd_on_k else 0.0})
        return torch.optim.SGD(groups, lr=cfg.scaled_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(ckpt["model"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"--resume: {self.cfg.resume}: the optimizer state does not fit: {exc}"
            ) from None
        self.scaler.load_state_dict(ckpt["scaler"])
        self.pos = Position(**ckpt["position"])
        states = ckpt["rng"]["per_rank"]
        state = states[self.info.rank % len(states)]
        restore_rng(state)
        self.source.load_state_dict(state["data"])
        sd_generator().set_state(ckpt["rng"]["stochastic_depth"])

    # -- steps --------------------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _train_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step; returns the (detached) mean loss and the number of correct predictions."""
        with self._autocast():
            logits = self.model(images)
            loss = self.criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), (logits.argmax(1) == labels).sum()

    def _all_reduce(self, values: Tensor) -> list[float]:
        """Sum ``values`` over ranks; the result as floats (one host sync)."""
        if self.info.distributed:
            dist.all_reduce(values)
        return values.tolist()

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, float | None]:
        """Validation loss and accuracy over all ranks (None without validation data)."""
        if self.info.distributed:  # evaluate rank 0's BatchNorm statistics everywhere (they drift per rank)
            for buffer in self.raw_model.buffers():
                dist.broadcast(buffer, 0)
        self.raw_model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for images, labels in self.source.val_batches():
            with self._autocast():
                logits = self.raw_model(images.contiguous(memory_format=self.memory_format))
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            sums += torch.stack(
                [loss.double(), (logits.argmax(1) == labels).sum().double(), sums.new_tensor(len(labels))]
            )
        self.raw_model.train()
        loss_sum, correct, count = self._all_reduce(sums)
        return (loss_sum / count, correct / count) if count else (None, None)

    def k_values(self) -> dict[str, float]:
        """The LM coefficient of each block (per-channel k: its mean), by block name."""
        return {
            name.removesuffix(".step"): m.k.detach().float().mean().item()
            for name, m in self.raw_model.named_modules()
            if isinstance(m, LMStep)
        }

    # -- checkpoints --------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Save the current position (collective: every rank calls it; rank 0 writes)."""
        rng = gather_objects(capture_rng({"data": self.source.state_dict()}), self.info)
        path = self.out / CHECKPOINT_NAME
        if self.info.is_main:
            config = {**self.cfg.to_dict(), "steps_per_epoch": self.source.steps_per_epoch}
            ckpt = make_checkpoint(
                config=config,
                model=self.raw_model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                position=asdict(self.pos),
                rng_per_rank=rng,
            )
            atomic_save(ckpt, path)
        self._checkpoint_at = self.pos.global_step
        return path

    # -- the loop -----------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        """Print on rank 0."""
        if self.info.is_main:
            print(message, flush=True)

    def _reduce_step(self, loss: Tensor, correct: Tensor, n: int, stop: bool) -> list[float]:
        """(loss x n, correct, n, stop requests) summed over ranks: the step's global metrics, and the
        agreement to stop, in one collective."""
        local = torch.stack([loss.double() * n, correct.double()])
        return self._all_reduce(torch.cat([local, local.new_tensor([n, float(stop)])]))

    def _run_epoch(self, stop: StopFlag, metrics: MetricsLog | None) -> str | None:
        """Train the rest of the current epoch; "interrupted" or "max_steps" if it stopped early."""
        cfg, pos = self.cfg, self.pos
        desc = f"epoch {pos.epoch + 1}/{cfg.epochs}"
        bar = _progress_bar(
            cfg.progress and self.info.is_main, self.source.steps_per_epoch, pos.step_in_epoch, desc
        )
        start = last = time.perf_counter()
        self._epoch_steps = 0
        try:
            for images, labels in self.source.train_batches(pos.epoch, pos.step_in_epoch):
                lr = self.optimizer.param_groups[0]["lr"]
                loss, correct = self._train_step(images.contiguous(memory_format=self.memory_format), labels)
                if cfg.stop_after_steps is not None and pos.global_step + 1 >= cfg.stop_after_steps:
                    stop.request("--stop-after-steps")
                loss_sum, n_correct, count, stops = self._reduce_step(
                    loss, correct, len(labels), stop.reason is not None
                )
                now = time.perf_counter()
                img_per_s, last = cfg.global_batch_size / (now - last), now
                self.timings.append(img_per_s)
                self._epoch_steps += 1
                pos.step_in_epoch += 1
                pos.global_step += 1
                pos.sums = [a + b for a, b in zip(pos.sums, (loss_sum, n_correct, count), strict=True)]
                record = {"type": "step", "step": pos.global_step, "epoch": pos.epoch + 1}
                record.update(loss=loss_sum / count, lr=lr, img_per_s=img_per_s)
                if metrics is not None:
                    metrics.write(record)
                self._log_bad_images(metrics)
                loss_avg, acc = pos.sums[0] / pos.sums[2], 100 * pos.sums[1] / pos.sums[2]
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_avg:.4f}", acc=f"{acc:.1f}%", img_s=f"{img_per_s:.0f}")
                    bar.update(1)
                elif cfg.log_every and pos.step_in_epoch % cfg.log_every == 0:  # no bar: a line now and then
                    self.log(
                        f"{desc} step {pos.step_in_epoch}/{self.source.steps_per_epoch}  loss {loss_avg:.4f} "
                        f"acc {acc:.1f}%  {img_per_s:.0f} img/s"
                    )
                if stops > 0:
                    stop.request("a signal on another rank")
                    return "interrupted"
                if cfg.max_steps is not None and pos.global_step >= cfg.max_steps:
                    return "max_steps"
        finally:
            if bar is not None:
                bar.close()
            self._epoch_time = time.perf_counter() - start
        return None

    def _log_bad_images(self, metrics: MetricsLog | None) -> None:
        """Name each unreadable image once: a log line (every rank, with its rank under DDP) and a
        ``{"type": "bad_image"}`` record (rank 0's)."""
        for path, reason in self.source.take_bad_images():
            where = f"[rank {self.info.rank}] " if self.info.distributed else ""
            count = self.source.bad_image_count
            print(f"{where}skipped unreadable image {path} ({reason}); {count} so far", flush=True)
            if metrics is not None:
                record = {"type": "bad_image", "step": self.pos.global_step, "path": path, "reason": reason}
                metrics.write({**record, "rank": self.info.rank, "count": count})

    def _end_epoch(self, metrics: MetricsLog | None) -> None:
        cfg, pos = self.cfg, self.pos
        loss_sum, correct, count = pos.sums
        train_loss, train_acc = loss_sum / count, correct / count
        val_loss, val_acc = self.evaluate()
        self._log_bad_images(metrics)
        (bad_images,) = self._all_reduce(
            torch.tensor([float(self.source.bad_image_count)], dtype=torch.float64, device=self.device)
        )
        record = {
            "type": "epoch",
            "epoch": pos.epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "k": self.k_values(),
            "bad_images": int(bad_images),
        }
        if metrics is not None:
            metrics.write(record)
        rate = self._epoch_steps * cfg.global_batch_size / max(self._epoch_time, 1e-9)
        val = "" if val_loss is None else f"  val loss {val_loss:.4f} acc {100 * val_acc:.1f}%"
        train = f"train loss {train_loss:.4f} acc {100 * train_acc:.1f}%"
        self.log(f"epoch {pos.epoch + 1}/{cfg.epochs}  {train}{val}  {rate:.0f} img/s")
        self.pos = Position(epoch=pos.epoch + 1, global_step=pos.global_step)
        self.save_checkpoint()

    def fit(self) -> int:
        """Train to the end (or --max-steps, or a stop request); returns the exit code (0)."""
        cfg, info = self.cfg, self.info
        metrics = None
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = MetricsLog(
                self.out / METRICS_NAME,
                resume_step=None if cfg.resume is None else self.pos.global_step,
                completed_epochs=self.pos.epoch,
            )
        world = f"{info.world_size} processes" if info.distributed else "1 process"
        where = (
            f", resuming at epoch {self.pos.epoch + 1} step {self.pos.step_in_epoch}" if cfg.resume else ""
        )
        self.log(
            f"lmfused-train: {cfg.model} on {cfg.data} ({cfg.image_size}px, {cfg.num_classes} classes), "
            f"{world} on {self.device.type}, global batch {cfg.global_batch_size}, lr {cfg.scaled_lr:g}, "
            f"{self.source.steps_per_epoch} steps/epoch{where}"
        )
        status = "completed"
        try:
            with StopFlag().installed() as stop:
                while self.pos.epoch < cfg.epochs:
                    if cfg.max_steps is not None and self.pos.global_step >= cfg.max_steps:
                        status = "max_steps"
                        break
                    outcome = self._run_epoch(stop, metrics)
                    if outcome == "interrupted":
                        path = self.save_checkpoint()
                        self.log(
                            f"interrupted by {stop.reason}: checkpoint saved to {path} "
                            f"(epoch {self.pos.epoch + 1}, step {self.pos.global_step}); "
                            f"continue with --resume {path}"
                        )
                        status = "interrupted"
                        break
                    if self.pos.step_in_epoch >= self.source.steps_per_epoch:
                        self._end_epoch(metrics)
                    if outcome == "max_steps":
                        status = "max_steps"
                        break
                if self._checkpoint_at != self.pos.global_step:
                    self.save_checkpoint()
        except BadImageError as exc:
            # --on-bad-image error: keep what was trained (one process: the position is exact; under DDP the
            # other ranks cannot join the save, and the last checkpoint stands).
            if not info.distributed and self.pos.global_step > 0:
                exc.args = (f"{exc}; checkpoint saved to {self.save_checkpoint()}",)
            raise
        finally:
            if metrics is not None:
                metrics.close()
        self._finish(status)
        return 0

    def _finish(self, status: str) -> None:
        """summary.json and the final line (rank 0); the parameter hashes of the test hook (every rank)."""
        cfg, info = self.cfg, self.info
        if cfg.debug_param_hash:
            digest = hashlib.sha256()
            for name, p in self.raw_model.named_parameters():
                digest.update(name.encode())
                digest.update(p.detach().cpu().contiguous().numpy().tobytes())
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / f"param_hash.rank{info.rank}.txt").write_text(digest.hexdigest() + "\n")
        if not info.is_main:
            return
        skip = min(cfg.timing_warmup, max(0, len(self.timings) - 1))
        timed = self.timings[skip:]
        median = statistics.median(timed) if timed else None
        summary = {
            "status": status,
            "global_step": self.pos.global_step,
            "epochs_completed": self.pos.epoch,
            "median_img_per_s": median,
            "timed_steps": len(timed),
            "skipped_warmup_steps": skip,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "world_size": info.world_size,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "lmfused": lmfused.__version__,
            "config": self.cfg.to_dict(),
        }
        path = self.out / SUMMARY_NAME
        atomic_write(path, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
        rate = "no steps timed" if median is None else f"median {median:.1f} img/s over {len(timed)} steps"
        self.log(
            f"{status}: step {self.pos.global_step}, {rate} (first {skip} skipped), global batch "
            f"{cfg.global_batch_size} on {summary['device']} x{info.world_size}; summary in {path}"
        )
