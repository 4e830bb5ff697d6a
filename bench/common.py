"""What every benchmark needs: the environment stamp, a median timer, the copy-bandwidth yardstick, and the
ops a function really dispatches."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent


def environment() -> dict:
    """GPU (or CPU) name, library versions and the git commit measured."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("LMFUSED_COMMIT", "unknown")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name()
        if cuda
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def median_ms(
    fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100
) -> float:
    """Median time of ``fn`` in milliseconds after warm-up: CUDA events on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (and compilation)
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    stream: torch.cuda.Stream | None = None,
    replays: int = 20,
    repeats: int = 15,
) -> float | None:
    """Median GPU time of ``fn`` replayed from a CUDA graph: the kernels alone, without Python and launch
    overhead (None on CPU, or if ``fn`` cannot be captured).

    ``fn`` is warmed up and captured on ``stream`` (a new side stream by default). A backward is replayed by
    autograd on the stream its forward ran on, so to time only a backward, run the forward under
    ``torch.cuda.stream(stream)`` first and pass the same stream here.
    """
    if device.type != "cuda":
        return None
    stream = stream if stream is not None else torch.cuda.Stream()
    try:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile, autotune and fill the allocator outside the capture
                fn()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / replays)
        del graph
        return statistics.median(times)
    except Exception as exc:  # noqa: BLE001 - a provider that cannot be captured just has no graph time
        torch.cuda.synchronize()
        print(f"(no CUDA-graph time: {type(exc).__name__}: {exc})")
        return None


def copy_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written), the roofline every row is held to."""
    if device.type != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def op_name(func) -> str:
    """A dispatched op's name as the counts print it: ``aten.convolution``, ``lmfused.lm_step_cuda``."""
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[op_name(func)] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> Counter[str]:
    """How often ``fn()`` dispatched each op (``aten.convolution``, ``lmfused.lm_step_cuda``, ...), below
    autograd: what a row really ran."""
    mode = _OpNames()
    with mode:
        fn()
    return mode.names


def lmfused_ops(names: Counter[str]) -> int:
    """How many of the dispatched ops were lmfused's."""
    return sum(count for name, count in names.items() if name.startswith("lmfused."))


@contextlib.contextmanager
def environment_settings(settings: dict[str, str]) -> Iterator[None]:
    """Set environment variables (``LMFUSED_*`` switches) for the duration of the context."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """A plain aligned table: ``columns`` is a list of (key, format) pairs."""
    cells = [[key for key, _ in columns]]
    for row in rows:
        cells.append([format(row[key], fmt) if row.get(key) is not None else "-" for key, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
