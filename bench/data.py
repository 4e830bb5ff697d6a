"""Input-pipeline benchmark: image-folder loader throughput per worker, for each decoding path.

    python -m bench.data                          # 512 generated JPEGs (ImageNet-like, ~500x375, ~85 KB)
    python -m bench.data --synthetic 2048 --workers 1,2,4
    python -m bench.data --folder DATA/imagenet/train --images 4096
    python -m bench.data --model lm_resnext50_32x4d   # beside it: the training step rate (GPU: default on)
    python -m bench.data --out bench/results      # JSON into DIR (data-<device>.json)
    python -m bench.data --synthetic 8192 --keep DIR  # and keep the JPEGs: DIR/train, DIR/val

Paths, all on the same images in one run, measured in turns (so a busy machine slows each alike):

* ``pil-float``: the previous pipeline, the baseline: PIL decode, ``RandomResizedCrop`` + flip on the PIL
  image, ``ToTensor`` + ``Normalize``, float32 batches (torchvision.datasets.ImageFolder).
* ``pil-uint8``: PIL decode and crop, uint8 batches (flip and normalisation move to the device).
* ``cpu``: ``torchvision.io`` decode, crop on the uint8 tensor, uint8 channels-last batches (the default).
* ``gpu`` (CUDA only): the loader processes read the files; nvjpeg decodes, crops and resizes on the GPU.

Each row: img/s of the loader (host batches ready, after a warm-up pass; for ``gpu`` decoded on the device),
img/s per loader process, and the CPU time per image of the loader's own work (one process, measured
in-process: the cost a loader process pays per image). A second table splits the per-image time of one
process into stages (read, decode, crop/resize, flip, to-float/normalise, collate). With ``--model`` (default
on a GPU) the training rate on synthetic data is measured beside it, and the training rate fed by the ``cpu``
and ``gpu`` paths through the prefetcher (the most ``--workers``), so the loader is held to the step rate.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import ROOT, environment, print_table, write_json

PATHS = ("pil-float", "pil-uint8", "cpu", "gpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def generate_jpegs(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` ImageNet-like JPEGs in ``root/{c0..c3}``: about 500x375 (sizes vary), quality 90, photo-like
    content (smooth structure plus grain, about 85 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        if rng.random() < 0.3:
            w, h = h, w  # some portrait images
        coarse = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((w, h), 3)
        pixels = np.asarray(coarse).astype(np.float32) + rng.normal(0, 12, (h, w, 3))
        folder = root / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def _loader(path: str, samples: list, size: int, batch: int, workers: int, pin: bool) -> Any:
    from torch.utils.data import DataLoader

    from lmfused.train import images as im

    common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=pin)
    if workers > 0:
        common["prefetch_factor"] = 2
    if path == "pil-float":
        from torchvision import transforms as T

        tf = T.Compose(
            [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
        )
        dataset = _PilFloat(samples, tf)
        return DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=True, **common)
    decoder = {"pil-uint8": "pil", "cpu": "cpu", "gpu": "gpu"}[path]
    dataset = im.ImageFolderDataset([samples, samples], size, decoder, augment=True)
    items = [(0, i, im.sample_key(0, 0, i)) for i in range(len(samples))]
    batches = [items[s : s + batch] for s in range(0, len(items) - batch + 1, batch)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=im.collate, **common)


class _PilFloat:
    """The previous pipeline's dataset (torchvision's ImageFolder loader: PIL, RGB), without torchvision's
    folder scan so that every path reads the same file list."""

    def __init__(self, samples: list, transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img), label


def _consume(path: str, loader: Any, device: torch.device, size: int) -> int:
    """One pass over ``loader``; returns the images seen (device-decoded for ``gpu``)."""
    from lmfused.train import images as im

    n = 0
    for batch in loader:
        if path == "gpu":
            images, _, _, _ = im.decode_on_device(batch, device, size)
            n += len(images)
        else:
            n += len(batch[1]) if isinstance(batch, list | tuple) else len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def measure_loaders(
    paths: list[str],
    samples: list,
    workers: list[int],
    size: int,
    batch: int,
    rounds: int,
    device: torch.device,
) -> list[dict]:
    """img/s of every (path, workers), each loader built once, warmed up by one pass, then timed ``rounds``
    passes taken in turns across the paths (the best pass counts: the least disturbed by other load)."""
    rows = []
    for w in workers:
        loaders = {p: _loader(p, samples, size, batch, w, device.type == "cuda") for p in paths}
        for p, loader in loaders.items():
            _consume(p, loader, device, size)  # start the workers, warm the page cache
        times: dict[str, list[float]] = {p: [] for p in paths}
        counts: dict[str, int] = {}
        for _ in range(rounds):
            for p, loader in loaders.items():
                start = time.perf_counter()
                counts[p] = _consume(p, loader, device, size)
                times[p].append(time.perf_counter() - start)
        for p in paths:
            rate = counts[p] / min(times[p])
            rows.append(
                dict(
                    path=p,
                    workers=w,
                    img_per_s=rate,
                    img_per_s_per_worker=rate / max(1, w),
                    median_img_per_s=counts[p] / statistics.median(times[p]),
                    device=str(device),
                )
            )
        del loaders
    return rows


def cpu_time_per_image(path: str, samples: list, size: int, batch: int) -> float:
    """CPU milliseconds per image of the loader process's own work (in-process, one thread): what each
    loader process spends per image (for ``gpu``: reading the file, the decode being on the device)."""
    loader = _loader(path, samples, size, batch, 0, False)
    it = iter(loader)
    next(it)  # warm-up
    start, n = time.process_time(), 0
    for b in it:
        n += len(b[1]) if isinstance(b, list | tuple) else len(b)
    return (time.process_time() - start) * 1e3 / max(1, n)


def stage_times(samples: list, size: int, batch: int) -> list[dict]:
    """Per-image CPU milliseconds of each stage, PIL path against the torchvision.io path."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision import transforms as T

    from lmfused.train import images as im

    files = [Path(p).read_bytes() for p, _ in samples[: max(batch, 32)]]
    n = len(files)

    def clock(fn: Callable[[], Any]) -> float:
        fn()
        start = time.process_time()
        fn()
        return (time.process_time() - start) * 1e3 / n

    keys = [im.sample_key(0, 0, i) for i in range(n)]
    pil = [Image.open(io.BytesIO(d)).convert("RGB") for d in files]
    tens = [im.decode_cpu(d) for d in files]
    geo = [im.geometry(t.shape[-2], t.shape[-1], size, True, k) for t, k in zip(tens, keys, strict=True)]

    def pil_crop() -> list:
        return [TF.resized_crop(p, *g[0], [size, size]) for p, g in zip(pil, geo, strict=True)]

    pil_crops = pil_crop()
    floats = [TF.to_tensor(c) for c in pil_crops]
    tv_crops = [im.crop_tensor(t, g[0], size) for t, g in zip(tens, geo, strict=True)]
    normalize = T.Normalize(MEAN, STD)
    rows = [
        dict(stage="read file", pil=clock(lambda: [Path(p).read_bytes() for p, _ in samples[:n]]), tv=None),
        dict(
            stage="decode",
            pil=clock(lambda: [Image.open(io.BytesIO(d)).convert("RGB") for d in files]),
            tv=clock(lambda: [im.decode_cpu(d) for d in files]),
        ),
        dict(
            stage="crop + resize",
            pil=clock(
                lambda: [TF.resized_crop(p, *g[0], [size, size]) for p, g in zip(pil, geo, strict=True)]
            ),
            tv=clock(lambda: [im.crop_tensor(t, g[0], size) for t, g in zip(tens, geo, strict=True)]),
        ),
        dict(stage="flip", pil=clock(lambda: [TF.hflip(c) for c in pil_crops]), tv=0.0),
        dict(
            stage="to float + normalise",
            pil=clock(lambda: [normalize(TF.to_tensor(c)) for c in pil_crops]),
            tv=0.0,
        ),
        dict(
            stage="collate",
            pil=clock(lambda: torch.stack(floats)),
            tv=clock(lambda: im.collate([(c, 0, False, 0, "", [], True) for c in tv_crops])),
        ),
    ]
    rows.append(
        dict(stage="total", pil=sum(r["pil"] for r in rows), tv=sum(r["tv"] or 0.0 for r in rows[1:]))
    )
    return rows


def _prepare(path: str, device: torch.device, size: int, fmt: torch.memory_format) -> Callable:
    """Host batch -> (images, labels) on the device, as the training source does for ``path``."""
    from lmfused.train import images as im

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def prepare(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if path == "pil-float":  # already normalised float32 on the host
            x, y = batch
            return x.to(device, non_blocking=True).to(dtype, memory_format=fmt), y.to(
                device, non_blocking=True
            )
        if path == "gpu":
            images, labels, flips, _ = im.decode_on_device(batch, device, size)
        else:
            images, labels, flips = batch.images.to(device, non_blocking=True), batch.labels, batch.flips
        x = im.normalize_batch(images, flips, MEAN, STD, dtype, fmt)
        return x, labels.to(device, non_blocking=True)

    return prepare


def _cycle(loader: Any, count: int) -> Any:
    """``count`` batches of ``loader``, passing over it as often as needed."""
    while count > 0:
        for batch in loader:
            yield batch
            count -= 1
            if count == 0:
                return


def train_rates(
    model_name: str,
    batch: int,
    size: int,
    device: torch.device,
    steps: int,
    samples: list,
    paths: list[str],
    workers: int,
) -> list[dict]:
    """Training img/s of ``model_name`` (bf16 autocast and channels-last on CUDA) on synthetic batches
    already on the device, and fed by each loader path through the prefetcher (``workers`` processes), in
    the same process: the loader keeps up when the fed rate matches the synthetic one."""
    from lmfused.models import create_model
    from lmfused.train import images as im

    model = create_model(model_name, num_classes=1000).to(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), y % 1000)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(batches: Any) -> float:
        it = iter(batches)
        for _ in range(3):
            step(*next(it))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(*next(it))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch * steps / (time.perf_counter() - start)

    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    rows = [dict(data="synthetic", workers=0, img_per_s=timed(iter(lambda: (x, y), None)))]
    for path in paths:
        loader = _loader(path, samples, size, batch, workers, device.type == "cuda")
        fed = im.DevicePrefetcher(_cycle(loader, steps + 3), _prepare(path, device, size, fmt), device)
        rows.append(dict(data=path, workers=workers, img_per_s=timed(fed)))
        del loader
    for r in rows:
        r["vs_synthetic"] = r["img_per_s"] / rows[0]["img_per_s"]
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print (and optionally save) the tables."""
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, help="class folders of images (e.g. DATA/imagenet/train)")
    p.add_argument(
        "--synthetic", type=int, default=512, help="generated JPEGs when no --folder (default 512)"
    )
    p.add_argument("--images", type=int, help="use at most this many images of --folder")
    p.add_argument(
        "--keep", type=Path, help="write the generated JPEGs to DIR/train and DIR/val (--data imagefolder)"
    )
    p.add_argument("--workers", default="1,2", help="comma-separated loader process counts (default 1,2)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="timed passes per path, taken in turns (default 3)")
    p.add_argument(
        "--model", help="also time training steps of this model (default on CUDA: lm_resnext50_32x4d)"
    )
    p.add_argument("--steps", type=int, default=20, help="timed training steps with --model")
    p.add_argument("--out", type=Path, help="write data-<device>[-<tag>].json into this directory")
    p.add_argument("--tag", help="suffix of the JSON file name (e.g. the machine)")
    p.add_argument("--note", help="free text stored in the JSON (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = [x for x in args.paths.split(",") if x and (x != "gpu" or device.type == "cuda")]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        p.error(f"--paths: unknown {unknown}; choose from {PATHS}")
    workers = [int(w) for w in args.workers.split(",")]

    from lmfused.train import images as im

    with tempfile.TemporaryDirectory() as tmp:
        if args.folder is not None:
            root, source = args.folder, str(args.folder)
        else:
            print(f"generating {args.synthetic} JPEGs ...", flush=True)
            base = args.keep if args.keep is not None else Path(tmp)
            root, source = generate_jpegs(base / "train", args.synthetic), f"synthetic {args.synthetic}"
            if args.keep is not None:  # a folder lmfused.train reads: DIR/train, DIR/val
                generate_jpegs(base / "val", max(64, args.synthetic // 16), seed=1)
        _, samples = im.list_images(str(root))
        if args.images:
            samples = samples[:: max(1, len(samples) // args.images)][: args.images]
        if len(samples) < args.batch_size:
            p.error(f"--folder: {len(samples)} images, fewer than one batch of {args.batch_size}")
        kbytes = statistics.mean(Path(s).stat().st_size for s, _ in samples) / 1e3
        print(
            f"{len(samples)} images ({source}), mean {kbytes:.0f} KB; batch {args.batch_size}, {args.size}px"
        )
        rows = measure_loaders(paths, samples, workers, args.size, args.batch_size, args.rounds, device)
        cpu_ms = {x: cpu_time_per_image(x, samples, args.size, args.batch_size) for x in paths}
        # The GPU path's loader side (reading the files) runs anywhere: its CPU time per image.
        gpu_loader_ms = cpu_ms.get("gpu") or cpu_time_per_image("gpu", samples, args.size, args.batch_size)
        stages = stage_times(samples, args.size, args.batch_size)
        base = {r["workers"]: r["img_per_s_per_worker"] for r in rows if r["path"] == "pil-float"}
        for r in rows:
            r["cpu_ms_per_img"] = cpu_ms[r["path"]]
            r["vs_pil_float"] = (
                r["img_per_s_per_worker"] / base[r["workers"]] if r["workers"] in base else None
            )
        print("\nloader throughput (best of the timed passes; per_worker: per loader process, 0 workers = 1)")
        print_table(
            rows,
            [
                ("path", "s"),
                ("workers", "d"),
                ("img_per_s", ".0f"),
                ("img_per_s_per_worker", ".0f"),
                ("median_img_per_s", ".0f"),
                ("vs_pil_float", ".2f"),
                ("cpu_ms_per_img", ".2f"),
            ],
        )
        print(
            f"gpu path, loader side (reads files; the device decodes): {gpu_loader_ms:.3f} CPU ms per image"
        )
        print(
            "\nCPU ms per image by stage, one process (pil: the previous pipeline; tv: torchvision.io path)"
        )
        print_table(stages, [("stage", "s"), ("pil", ".2f"), ("tv", ".2f")])
        model = args.model or ("lm_resnext50_32x4d" if device.type == "cuda" else None)
        train_rows = None
        if model:
            fed_workers = max(workers)
            fed_paths = [x for x in paths if x in ("cpu", "gpu")]
            train_rows = train_rates(
                model, args.batch_size, args.size, device, args.steps, samples, fed_paths, fed_workers
            )
            print(f"\n{model} training on {device.type}, batch {args.batch_size}: synthetic vs loader data")
            print_table(
                train_rows, [("data", "s"), ("workers", "d"), ("img_per_s", ".0f"), ("vs_synthetic", ".3f")]
            )
            need = train_rows[0]["img_per_s"]
            for r in rows:
                if r["workers"] == fed_workers:
                    print(
                        f"{r['path']}: {need / r['img_per_s_per_worker']:.1f} loader processes keep up with "
                        f"{need:.0f} img/s"
                    )
    env = environment()
    payload = dict(
        benchmark="data",
        env=env,
        note=args.note,
        source=source,
        images=len(samples),
        mean_kbytes=kbytes,
        batch_size=args.batch_size,
        size=args.size,
        rows=rows,
        stages_ms=stages,
        gpu_loader_cpu_ms_per_img=gpu_loader_ms,
        model=model,
        train=train_rows,
    )
    if args.out is not None:
        name = ("gpu" if device.type == "cuda" else "cpu") + (f"-{args.tag}" if args.tag else "")
        path = args.out / f"data-{name}.json"
        write_json(path, payload)
        print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
