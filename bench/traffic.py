"""Bytes moved by a training step, counted op by op with fake tensors: no GPU, no real memory (DESIGN.md 1d).

    python -m bench.traffic            # lm_resnext50_32x4d against torchvision's resnext50_32x4d
    python -m bench.traffic --model lm_resnet50 --batch 64 --size 224 --blocks --out DIR

The junction ops are bandwidth-bound, so their cost is the bytes they move. Every aten (or lmfused) op that
the forward and backward of one training step dispatch is counted as one kernel that reads each tensor
argument once and writes each output once; views and metadata ops move nothing, allocations without data
move nothing. Bytes are grouped by category (convolution/matmul, batch norm, the LM junction, other
elementwise, gradient accumulation = the additions autograd makes when a tensor has several consumers,
copies, other) and by block, for a zoo model and its plain counterpart (torchvision's model of the same
name, or the zoo's ``lm=False`` network), in bf16 autocast and channels_last as the model benchmark runs.
The optimizer step is not counted (it is the same for both).

Per block, ``junction_x`` is the traffic of the junction, everything from the last convolution's output to
the block's output and back (the last batch norm, the LM op or the residual addition and the ReLU after it,
their backward and the gradient accumulation of the block input), in units of X, the bytes of the block's
output: an op counts there when it is a batch norm, elementwise, LM or accumulation op and its largest tensor
has the output's size (exact for bottleneck blocks, whose inner tensors are narrower; a basic block's inner
ReLU and batch norm count too, as does a projection shortcut's batch norm). The batch norm stays inside the
junction so that the unfused and the batch-norm-fused LM step (lmfused.batch_norm_lm_step) compare alike.

Two conventions, side by side. One pass per op: every op reads its inputs once. As a GPU runs it
(``gpu_*`` keys): aten's batch norm in training reads x twice forward (statistics, then normalisation) and
(grad_out, x) twice backward (per-channel sums, then grad_x), and a convolution backward reads grad_out once
for dgrad and once for wgrad (two kernels), since none of these tensors fits in cache at the model's sizes.
lmfused's passes are separate ops here (statistics, forward, backward reduction, backward), so both counts
are the same for them; the first count is optimistic for aten's batch norm and convolution backward.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lmfused
from bench.common import ROOT, environment, op_name, print_table, write_json

CATEGORIES = ("convolution", "batch_norm", "lm_junction", "elementwise", "grad_accumulation", "copy", "other")
_CONVOLUTION = ("convolution", "conv2d", "mm", "addmm", "bmm", "linear")
_BATCH_NORM = (
    "batch_norm",
    "native_batch_norm",
    "_native_batch_norm_legit",
    "cudnn_batch_norm",
    "layer_norm",
)
_COPY = ("_to_copy", "copy_", "clone", "contiguous")
_ELEMENTWISE = (
    "add", "add_", "sub", "mul", "mul_", "div", "div_", "relu", "relu_", "threshold_backward", "where",
    "neg", "sigmoid", "sigmoid_backward", "fill_", "zero_", "zeros_like", "ones_like", "bernoulli_",
)  # fmt: skip
# Ops that move no data: views, metadata, allocations whose contents are never written.
_NO_TRAFFIC = (
    "detach",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
)
# Ops that write a new tensor without reading their tensor arguments (those only give dtype, device, shape).
_WRITE_ONLY = ("new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "fill_", "zero_")
# Ops of the junction, when they run on tensors of the block output's size.
_JUNCTION_CATEGORIES = ("batch_norm", "lm_junction", "elementwise", "grad_accumulation")


def category(op_name: str, phase: str) -> str:
    """Category of an op (``aten.add``, ``lmfused.lm_step_reference``, ...) in ``phase`` (forward/backward).

    An addition in the backward is autograd accumulating a tensor's gradients: no backward formula of the
    networks here adds (the residual addition's backward passes the gradient through)."""
    namespace, _, name = op_name.partition(".")
    if namespace == "lmfused":
        return "lm_junction"
    base = name.removesuffix("_backward").removesuffix("_with_indices")
    if name in ("add", "add_") and phase == "backward":
        return "grad_accumulation"
    if any(base == c or base.startswith(c + "_") or base.endswith("_" + c) for c in _BATCH_NORM):
        return "batch_norm"
    if base in _CONVOLUTION or base.startswith("convolution") or base.startswith("cudnn_convolution"):
        return "convolution"
    if name in _COPY:
        return "copy"
    if name in _ELEMENTWISE:
        return "elementwise"
    return "other"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# aten's batch norms (forward, backward) and convolution backward: the ops a GPU runs in two passes.
_BATCH_NORM_FORWARD = (
    "native_batch_norm",
    "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional",
    "cudnn_batch_norm",
    "miopen_batch_norm",
)
_BATCH_NORM_BACKWARD = (
    "native_batch_norm_backward",
    "batch_norm_backward",
    "cudnn_batch_norm_backward",
    "miopen_batch_norm_backward",
)


def second_pass_reads(func, args: tuple, kwargs: dict) -> int:
    """Bytes an aten op reads a second time as a GPU runs it (DESIGN.md 1d): a batch norm in training reads x
    again to normalise it, its backward reads grad_out and x again to write grad_x after the per-channel
    sums, and a convolution backward that computes both dgrad and wgrad reads grad_out in each."""
    if func.namespace != "aten":
        return 0
    name = func._schema.name.split("::")[-1]
    values = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | kwargs
    if name in _BATCH_NORM_FORWARD:
        return _nbytes([values["input"]]) if values.get("training") else 0
    if name in _BATCH_NORM_BACKWARD:
        grad = values.get("grad_out", values.get("grad_output"))
        training = values.get("train", values.get("update", True))  # cudnn/miopen: training only
        wants_grad_x = values.get("output_mask", (True,))[0]
        return _nbytes([grad, values["input"]]) if training and wants_grad_x else 0
    if name == "convolution_backward":
        dgrad, wgrad = values["output_mask"][:2]
        return _nbytes([values["grad_output"]]) if dgrad and wgrad else 0
    return 0


@dataclass
class OpRecord:
    op: str
    category: str
    phase: str
    block: str
    read: int
    written: int
    largest: int  # elements of the largest tensor the op touches
    reread: int = 0  # bytes read a second time as a GPU runs the op (second_pass_reads)

    @property
    def bytes(self) -> int:
        """One pass per op."""
        return self.read + self.written

    @property
    def gpu_bytes(self) -> int:
        """As a GPU runs it."""
        return self.read + self.reread + self.written


@dataclass
class PhaseAndBlockMode(TorchDispatchMode):
    """A dispatch mode that knows where the step is: its phase ("forward" or "backward", set by the caller)
    and the block running (set by :func:`block_attribution`; "-" outside every block)."""

    phase: str = "forward"
    block: str = "-"

    def __post_init__(self) -> None:
        super().__init__()


@dataclass
class TrafficCounter(PhaseAndBlockMode):
    """Dispatch mode that records, for every op, the bytes it reads and writes, its phase and its block."""

    records: list[OpRecord] = field(default_factory=list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if func.namespace == "prim" or func.is_view or func._schema.name.split("::")[-1] in _NO_TRAFFIC:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        everything = inputs + outputs
        self.records.append(
            OpRecord(
                op=name,
                category=category(name, self.phase),
                phase=self.phase,
                block=self.block,
                read=0 if func._schema.name.split("::")[-1] in _WRITE_ONLY else _nbytes(inputs),
                written=_nbytes(outputs),
                largest=max((t.numel() for t in everything), default=0),
                reread=second_pass_reads(func, args, kwargs),
            )
        )
        return out


def is_block(module: torch.nn.Module) -> bool:
    """Residual blocks: lmfused's LM blocks, torchvision's and timm's BasicBlock / Bottleneck."""
    return bool(getattr(module, "is_lm_block", False)) or type(module).__name__ in (
        "BasicBlock",
        "Bottleneck",
    )


@contextlib.contextmanager
def block_attribution(model: torch.nn.Module, counter: PhaseAndBlockMode) -> Iterator[dict[str, int]]:
    """Attribute ops to blocks: forward ops to the block running; backward ops to the block whose output's
    gradient came last (the backward of a chain of blocks runs block by block, from the last one). Yields
    {block name: elements of its output}."""
    sizes: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if not is_block(module):
            continue

        def before(_module, _args, name=name):
            counter.block = name

        def after(_module, _args, output, name=name):
            first = tree_flatten(output)[0][0]
            sizes[name] = first.numel()
            if first.requires_grad:

                def backward_starts(grad, name=name):
                    counter.block = name
                    return grad

                first.register_hook(backward_starts)
            counter.block = "-"

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield sizes
    finally:
        for handle in handles:
            handle.remove()


def training_inputs(build: Callable[[], torch.nn.Module], batch: int, size: int):
    """(``build()`` in training mode with channels_last weights, a channels_last image batch): under a
    FakeTensorMode, the model and batch of a counted step."""
    model = build()
    for parameter in model.parameters():
        if parameter.dim() == 4:  # channels_last without Module.to (which cannot swap fake parameters)
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    model.train()
    return model, torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)


def count_training_step(build: Callable[[], torch.nn.Module], batch: int, size: int):
    """(records, block output sizes) of one forward + backward of ``build()`` on fake tensors, bf16 autocast,
    channels_last (the model benchmark's setting)."""
    counter = TrafficCounter()
    with FakeTensorMode():
        model, images = training_inputs(build, batch, size)
        with block_attribution(model, counter) as sizes, counter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(images)
                loss = F.cross_entropy(logits, torch.randint(0, logits.shape[1], (batch,)))
            counter.phase, counter.block = "backward", "-"
            loss.backward()
    return counter.records, sizes


def summarize(records: list[OpRecord], sizes: dict[str, int], itemsize: int = 2) -> dict:
    """Totals per category and per block (bytes), and each block's junction traffic in units of its output;
    each once with one pass per op and once as a GPU runs it (``gpu_`` keys)."""
    by_category: dict[str, int] = defaultdict(int)
    gpu_by_category: dict[str, int] = defaultdict(int)
    blocks: dict[str, dict] = {}
    for r in records:
        by_category[r.category] += r.bytes
        gpu_by_category[r.category] += r.gpu_bytes
        if r.block == "-":
            continue
        block = blocks.setdefault(
            r.block,
            {"block": r.block, "bytes": 0, "junction_bytes": 0, "gpu_bytes": 0, "gpu_junction_bytes": 0},
        )
        block["bytes"] += r.bytes
        block["gpu_bytes"] += r.gpu_bytes
        if r.category in _JUNCTION_CATEGORIES and r.largest == sizes.get(r.block):
            block["junction_bytes"] += r.bytes
            block["gpu_junction_bytes"] += r.gpu_bytes
    for name, block in blocks.items():
        x = sizes[name] * itemsize
        block["output_bytes"] = x
        block["junction_x"] = block["junction_bytes"] / x
        block["gpu_junction_x"] = block["gpu_junction_bytes"] / x
    return {
        "total_bytes": sum(by_category.values()),
        "by_category": {c: by_category.get(c, 0) for c in CATEGORIES},
        "gpu_total_bytes": sum(gpu_by_category.values()),
        "gpu_by_category": {c: gpu_by_category.get(c, 0) for c in CATEGORIES},
        "lmfused_ops": sum(r.op.startswith("lmfused.") for r in records),
        "blocks": list(blocks.values()),
    }


def counterpart(model_name: str) -> tuple[str, Callable[[], torch.nn.Module]]:
    """The plain network to compare with: torchvision's model of the same name, else the zoo's lm=False."""
    plain = model_name.removeprefix("lm_")
    try:
        import torchvision

        if plain in torchvision.models.list_models(module=torchvision.models):
            return f"torchvision {plain}", getattr(torchvision.models, plain)
    except Exception:  # noqa: BLE001 - no (importable) torchvision: the zoo's plain network instead
        pass
    return f"{model_name}(lm=False)", lambda: lmfused.models.create_model(model_name, lm=False)


def compare(model_name: str, batch: int, size: int, backend: str = "reference") -> dict:
    """Traffic of ``model_name`` with the lmfused ops (``backend``'s registered ops), of the same LM network
    in plain PyTorch (``lm_pytorch``: bench.models.plain_pytorch_lm) and of its plain counterpart; each
    network's ``ran`` says what it is, its ``lmfused_ops`` how many lmfused ops its step dispatched."""
    from bench.models import plain_pytorch_lm

    plain_name, plain_build = counterpart(model_name)
    result = {"model": model_name, "counterpart": plain_name, "batch": batch, "image_size": size}
    networks = {
        "lm": (f"{model_name}, lmfused ops ({backend} backend's registered ops)",
               lambda: lmfused.models.create_model(model_name, backend=backend)),
        "lm_pytorch": (f"{model_name} with every lmfused op replaced by plain PyTorch",
                       lambda: plain_pytorch_lm(lmfused.models.create_model(model_name))),
        "plain": (plain_name, plain_build),
    }  # fmt: skip
    for key, (what, build) in networks.items():
        records, sizes = count_training_step(build, batch, size)
        result[key] = {"ran": what, **summarize(records, sizes)}
    result["ratio"] = result["lm"]["total_bytes"] / result["plain"]["total_bytes"]
    result["gpu_ratio"] = result["lm"]["gpu_total_bytes"] / result["plain"]["gpu_total_bytes"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="lm_resnext50_32x4d", choices=lmfused.models.list_models())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="image size (CIFAR models: use 32)")
    parser.add_argument("--blocks", action="store_true", help="also print the per-block table")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args(argv)
    result = compare(args.model, args.batch, args.size)
    env = environment()
    write_json(args.out / f"traffic-{args.model}.json", {"environment": env, **result})
    print(f"# {args.model} vs {result['counterpart']}: batch {args.batch}, {args.size}px, bf16 autocast, "
          f"channels_last, forward + backward (commit {env['commit']})")  # fmt: skip
    lm, pytorch, plain = result["lm"], result["lm_pytorch"], result["plain"]
    networks = {"lm": lm, "pt": pytorch, "tv": plain}

    def gb(net: dict, key: str, category: str | None) -> float:
        return (net[f"{key}by_category"][category] if category else net[f"{key}total_bytes"]) / 1e9

    rows = [
        {"category": c or "total"}
        | {f"{name}{suffix}": gb(net, key, c) for key, suffix in (("", "_gb"), ("gpu_", "_gpu_gb"))
           for name, net in networks.items()}
        for c in (*CATEGORIES, None)
    ]  # fmt: skip
    for name, net in networks.items():
        print(f"{name}: {net['ran']} ({net['lmfused_ops']} lmfused ops)")
    print("*_gb: one pass per op | *_gpu_gb: as a GPU runs it (aten's batch norm 2 passes each way, "
          "convolution backward reads grad_out for dgrad and for wgrad)")  # fmt: skip
    print_table(rows, [("category", "s")] + [(key, ".3f") for key in rows[0] if key != "category"])
    print(f"lm / tv: {result['ratio']:.3f}x one pass per op, {result['gpu_ratio']:.3f}x as a GPU runs it; "
          f"pt / tv: {pytorch['total_bytes'] / plain['total_bytes']:.3f}x, "
          f"{pytorch['gpu_total_bytes'] / plain['gpu_total_bytes']:.3f}x")  # fmt: skip
    if args.blocks:
        plain_blocks = {b["block"]: b for b in plain["blocks"]}
        block_rows = []
        for b in lm["blocks"]:
            twin = plain_blocks.get(b["block"], {})
            block_rows.append({
                "block": b["block"],
                "lm_junction_x": b["junction_x"],
                "plain_junction_x": twin.get("junction_x"),
                "lm_gpu_junction_x": b["gpu_junction_x"],
                "plain_gpu_junction_x": twin.get("gpu_junction_x"),
                "lm_mb": b["bytes"] / 1e6,
                "plain_mb": twin["bytes"] / 1e6 if twin else None,
            })  # fmt: skip
        junctions = ("lm_junction_x", "plain_junction_x", "lm_gpu_junction_x", "plain_gpu_junction_x")
        print_table(block_rows, [("block", "s"), *((key, ".1f") for key in junctions), ("lm_mb", ".0f"),
                                 ("plain_mb", ".0f")])  # fmt: skip


if __name__ == "__main__":
    main()
