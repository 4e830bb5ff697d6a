"""Memory of a training step, counted with fake tensors: no GPU, no real memory (DESIGN.md 1d).

    python -m bench.memory                       # ResNeXt-50 and ResNet-50, every provider and variant
    python -m bench.memory --models resnet50 --batch 64 --size 224 --out DIR

The memory twin of ``bench.traffic``: one forward + loss + backward of a model (bf16 autocast,
channels_last, training, as the model benchmark runs it) on fake tensors, recording every storage the step
creates (its producing op, block and role) and when it dies (no reference left). Reports:

- saved for backward: every tensor autograd keeps from the forward to the backward (seen through
  ``torch.autograd.graph.saved_tensors_hooks``), counted naively (each saved tensor's bytes, as often as it
  is saved) and each storage once (what it costs); the parameters it saves (BatchNorm weights, a few
  hundred kB, which exist anyway) are included as their own role, as issue 20 counts them;
- the peak of live bytes over the step: the storages the step created and still held, after every op (the
  gradients included; parameters, buffers and the optimizer's state apart, see ``state_bytes``);
- a breakdown of both by role: BatchNorm inputs (convolution outputs), convolution inputs (BatchNorm + ReLU
  outputs), block outputs, projected shortcuts (a downsample's BatchNorm output), weight casts (autocast's
  bf16 copies), float32 temporaries (inside blocks: an update written in plain PyTorch), the stem, pooling
  and head outside the blocks, masks, per-channel vectors, indices (max pooling's), gradients (everything
  the backward creates), other.

Rows: torchvision's model, the zoo's LM network by default and under each ``LMFUSED_*`` switch that changes
what an eager step runs (``LMFUSED_FUSE_BN=0``, ``LMFUSED_GRADIENT_PASSTHROUGH=0``;
``LMFUSED_COMPILE_JUNCTION=decompose`` acts under torch.compile only and is shown to be the same as the
default here), the LM network written in plain PyTorch (``bench.models.plain_pytorch_lm``) and the zoo's
``lm=False`` network; then torchvision, the LM network and ``lm=False`` with every block checkpointed
(activation checkpointing: their peak falls in the backward). The lmfused ops run their fake
implementations, so what they keep is what their shared autograd code saves, whatever the backend; a
kernel's own workspace (partial sums) is not seen.

A GPU's ``torch.cuda.max_memory_allocated`` over a training step adds the parameters, buffers and the
optimizer's momentum to the peak (:func:`predicted_peak_bytes`), plus what no count here sees (cuDNN and
cuBLAS workspaces, the allocator's 512-byte rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten

import lmfused
from bench.common import ROOT, environment, environment_settings, op_name, print_table, write_json
from bench.models import MODELS, VARIANTS, plain_pytorch_lm
from bench.traffic import PhaseAndBlockMode, block_attribution, counterpart, is_block, training_inputs
from lmfused.nn.blocks import set_grad_checkpointing

ROLES = (
    "BatchNorm inputs",
    "conv inputs",
    "block outputs",
    "projected shortcuts",
    "weight casts",
    "float32 temporaries",
    "stem, pooling and head",
    "masks",
    "per-channel vectors",
    "indices",
    "gradients",
    "other",
)
_CONVOLUTION = ("convolution", "conv2d", "cudnn_convolution")
_BATCH_NORM = ("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "cudnn_batch_norm")


@dataclass(eq=False)
class Storage:
    """A storage the step created: its bytes, what produced it, where, and what autograd saved it for."""

    nbytes: int
    op: str
    phase: str
    block: str
    in_downsample: bool
    dtype: torch.dtype
    dim: int
    ref: StorageWeakRef
    weight_cast: bool = False  # autocast's copy of a parameter
    block_output: bool = False  # a block's output
    savers: set[str] = field(default_factory=set)  # the ops autograd saved it for

    @property
    def role(self) -> str:
        """What the storage is to the network (see the module docstring); known once the step has run."""
        op = self.op.split(".")[-1]
        checks = (
            (self.phase == "backward", "gradients"),
            (self.block_output, "block outputs"),
            (self.dtype in (torch.bool, torch.uint8), "masks"),  # ReLU masks: bool, or 1 bit per element
            (self.dtype in (torch.int64, torch.int32), "indices"),
            (self.dim <= 1, "per-channel vectors"),
            (self.weight_cast, "weight casts"),
            (any(op.startswith(c) for c in _CONVOLUTION), "BatchNorm inputs"),
            (
                self.in_downsample and (op in _BATCH_NORM or self.op.startswith("lmfused.")),
                "projected shortcuts",
            ),
            (any(s.split(".")[-1].startswith(c) for s in self.savers for c in _CONVOLUTION), "conv inputs"),
            (self.block == "-", "stem, pooling and head"),
            (self.dtype == torch.float32, "float32 temporaries"),
        )
        return next((role for applies, role in checks if applies), "other")


def _storages(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def by_role(storages) -> dict[str, int]:
    """Bytes per role (every role, 0 where none)."""
    totals = dict.fromkeys(ROLES, 0)
    for storage in storages:
        totals[storage.role] += storage.nbytes
    return totals


@dataclass
class MemoryCounter(PhaseAndBlockMode):
    """Dispatch mode that records every storage an op creates and the peak of live bytes over the ops; with
    :meth:`saving` it also records what autograd saves for the backward. A storage is live while anything
    (a tensor, autograd's saved variables) refers to it; storages are told apart by their address while
    they live, so a record is dropped as soon as its storage is seen dead."""

    persistent: set[int] = field(default_factory=set)  # parameters, buffers and inputs: not the step's
    records: list[Storage] = field(default_factory=list)  # every storage the step created, in order
    live: dict[int, Storage] = field(default_factory=dict)  # by address; may hold dead ones until a sweep
    live_bytes: int = 0  # of ``live``: exact after :meth:`sweep`
    peak_bytes: int = 0
    peak: list[Storage] = field(default_factory=list)  # the storages live at the peak
    saved: dict[int, Storage | None] = field(default_factory=dict)  # by address (None: a persistent one)
    saved_naive: int = 0
    saved_persistent: int = 0
    in_downsample: bool = False
    last_op: str | None = None  # the op dispatched last, and its outputs' storages
    last_outputs: set[int] = field(default_factory=set)
    pending: list[Storage] = field(default_factory=list)  # saved inputs whose op has not run yet

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        from_parameter = name == "aten._to_copy" and _key(args[0]) in self.persistent
        for t in _storages(out):
            key = _key(t)
            known = self.live.get(key)
            if key in self.persistent or (known is not None and not known.ref.expired()):
                continue  # a view or an in-place result: nothing new
            if known is not None:  # a dead storage's address, reused
                self.live_bytes -= self.live.pop(key).nbytes
            storage = t.untyped_storage()
            record = Storage(storage.nbytes(), name, self.phase, self.block, self.in_downsample, t.dtype,
                             t.dim(), StorageWeakRef(storage), weight_cast=from_parameter)  # fmt: skip
            self.records.append(record)
            self.live[key] = record
            self.live_bytes += record.nbytes
        if self.live_bytes > self.peak_bytes:
            self.sweep()  # only a candidate peak needs the exact count
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes, self.peak = self.live_bytes, list(self.live.values())
        if func.namespace != "prim":  # (autograd asks prim.device of what it saves)
            self.last_op, self.last_outputs = name, {_key(t) for t in _storages(out)}
            for record in self.pending:  # inputs autograd saved before running this op
                record.savers.add(name)
            self.pending.clear()
        return out

    def sweep(self) -> int:
        """Forget the storages that died; returns the live bytes."""
        for key in [k for k, s in self.live.items() if s.ref.expired()]:
            self.live_bytes -= self.live.pop(key).nbytes
        return self.live_bytes

    def mark_block_output(self, t: torch.Tensor) -> None:
        record = self.live.get(_key(t))
        if record is not None:
            record.block_output = True

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Record every tensor autograd saves while the context is active (the forward)."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _key(t)
            self.saved_naive += t.numel() * t.element_size()
            if key in self.persistent:
                self.saved_persistent += t.untyped_storage().nbytes() if key not in self.saved else 0
                self.saved.setdefault(key, None)
            elif key in self.live:
                record = self.saved[key] = self.live[key]
                if key in self.last_outputs:  # an output, saved after its op ran
                    record.savers.add(self.last_op)
                else:  # an input, saved before its op runs (autograd's generated code)
                    self.pending.append(record)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


@contextlib.contextmanager
def downsample_attribution(model: torch.nn.Module, counter: MemoryCounter) -> Iterator[None]:
    """Mark the ops of every block's projection shortcut (``downsample``)."""
    handles = []
    for module in model.modules():
        downsample = getattr(module, "downsample", None)
        if isinstance(downsample, torch.nn.Module):

            def enter(_module, _args):
                counter.in_downsample = True

            def leave(_module, _args, _output):
                counter.in_downsample = False

            handles += [downsample.register_forward_pre_hook(enter), downsample.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def block_outputs(model: torch.nn.Module, counter: MemoryCounter, is_block) -> Iterator[None]:
    """Mark each block's output storage (its first output)."""
    handles = []
    for module in model.modules():
        if is_block(module):

            def after(_module, _args, output):
                counter.mark_block_output(tree_flatten(output)[0][0])

            handles.append(module.register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def measure_step(build: Callable[[], torch.nn.Module], batch: int, size: int) -> dict:
    """Saved-for-backward and peak live bytes of one training step of ``build()`` (fake tensors, bf16
    autocast, channels_last), with their breakdown by role, and the bytes of the model's state."""
    counter = MemoryCounter()
    with FakeTensorMode():
        model, images = training_inputs(build, batch, size)
        labels = torch.randint(0, 1000, (batch,))
        state = list(model.parameters()) + list(model.buffers())
        counter.persistent = {_key(t) for t in [*state, images, labels]}
        parameter_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
        buffer_bytes = sum(b.untyped_storage().nbytes() for b in model.buffers())
        input_bytes = images.untyped_storage().nbytes() + labels.untyped_storage().nbytes()
        hooks = (block_attribution(model, counter), block_outputs(model, counter, is_block),
                 downsample_attribution(model, counter))  # fmt: skip
        with contextlib.ExitStack() as stack:
            for hook in hooks:
                stack.enter_context(hook)
            stack.enter_context(counter)
            with counter.saving(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
            counter.phase, counter.block = "backward", "-"
            loss.backward()
            del logits, loss
    saved = [s for s in counter.saved.values() if s is not None]
    return {
        "saved_bytes": sum(s.nbytes for s in saved) + counter.saved_persistent,
        "saved_naive_bytes": counter.saved_naive,
        "saved_state_bytes": counter.saved_persistent,
        "saved_by_role": by_role(saved) | {"parameters": counter.saved_persistent},
        "peak_bytes": counter.peak_bytes,
        "peak_by_role": by_role(counter.peak),
        "parameter_bytes": parameter_bytes,
        "buffer_bytes": buffer_bytes,
        "input_bytes": input_bytes,
    }


def predicted_peak_bytes(result: dict) -> int:
    """What ``torch.cuda.max_memory_allocated`` should show over bench.models' timed steps: the step's peak
    of live bytes, plus what lives throughout: the parameters, buffers, SGD's momentum (one per parameter)
    and the synthetic batch (cuDNN/cuBLAS workspaces and the allocator's rounding not included)."""
    state = 2 * result["parameter_bytes"] + result["buffer_bytes"] + result["input_bytes"]
    return result["peak_bytes"] + state


def compiled_saved_bytes(build: Callable[[], torch.nn.Module], batch: int, size: int) -> dict:
    """What torch.compile keeps for the backward of one training step of ``build()`` (bf16 autocast,
    channels_last): the activations its forward graph hands to its backward graph, as AOTAutograd's
    min-cut partitioner (Inductor's, for training) chooses them. Real tensors on the CPU (a compiled step
    cannot run on fake ones), the graphs run as traced, without Inductor's code generation; parameters
    and their casts apart (tensors without the batch dimension). Slow: a real step."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[int] = []

    def forward_compiler(gm: torch.fx.GraphModule, example_inputs) -> Callable:
        return make_boxed_func(gm.forward)

    def backward_compiler(gm: torch.fx.GraphModule, example_inputs) -> Callable:
        values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append(sum(
            v.numel() * v.element_size()
            for name, v in zip(names, values, strict=True)
            if not name.startswith("tangents")
            and isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch
        ))  # fmt: skip
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                           partition_fn=min_cut_rematerialization_partition)  # fmt: skip
    torch._dynamo.reset()
    model = build().to(memory_format=torch.channels_last).train()
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(torch.compile(model, backend=backend)(images), labels)
    loss.backward()
    torch._dynamo.reset()
    return {"compiled_saved_bytes": sum(graphs), "graphs": len(graphs)}


@dataclass(frozen=True)
class Row:
    model: str  # torchvision name (resnext50_32x4d, resnet50)
    network: str  # torchvision / lm / plain-pytorch / lm=False
    settings: tuple[tuple[str, str], ...] = ()  # LMFUSED_* environment of the row
    checkpointing: bool = False  # activation checkpointing of every block (recomputed in the backward)

    @property
    def name(self) -> str:
        name = " ".join(f"{k}={v}" for k, v in self.settings) if self.settings else self.network
        return f"{name}, grad checkpointing" if self.checkpointing else name

    def ran(self) -> str:
        """What the row runs, in words."""
        lm_name = MODELS[self.model]
        if self.network == "torchvision":
            return f"torchvision {self.model}"
        if self.network == "plain-pytorch":
            return f"{lm_name} with every lmfused op replaced by plain PyTorch"
        if self.network == "lm=False":
            return f"{lm_name}(lm=False): the zoo's plain ResNet/ResNeXt (lmfused ops with k = 0)"
        return f"{lm_name}, lmfused ops ({self.name if self.settings else 'default settings'})"

    def build(self) -> Callable[[], torch.nn.Module]:
        build = self._build_network()
        if not self.checkpointing:
            return build

        def checkpointed() -> torch.nn.Module:
            model = build()
            if self.network == "torchvision":
                checkpoint_blocks(model)
            else:
                set_grad_checkpointing(model)
            return model

        return checkpointed

    def _build_network(self) -> Callable[[], torch.nn.Module]:
        lm_name = MODELS[self.model]
        if self.network == "torchvision":
            return counterpart(lm_name)[1]
        if self.network == "plain-pytorch":
            return lambda: plain_pytorch_lm(lmfused.models.create_model(lm_name))
        if self.network == "lm=False":
            return lambda: lmfused.models.create_model(lm_name, lm=False)
        return lambda: lmfused.models.create_model(lm_name)


def checkpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Activation checkpointing of every block of a torchvision ResNet (what timm's checkpoint_seq does):
    each block keeps its input only and runs again in the backward. Names and hooks stay the block's."""
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(model, name):
            block.forward = functools.partial(
                torch.utils.checkpoint.checkpoint, type(block).forward.__get__(block), use_reentrant=False
            )
    return model


def rows_for(model: str) -> list[Row]:
    """torchvision, the LM network by default and under each LMFUSED_* switch, in plain PyTorch, lm=False;
    then torchvision, the LM network and lm=False with every block checkpointed."""
    switches = [("LMFUSED_FUSE_BN", "0"), ("LMFUSED_GRADIENT_PASSTHROUGH", "0"),
                ("LMFUSED_COMPILE_JUNCTION", "decompose")]  # fmt: skip
    return [
        Row(model, "torchvision"),
        Row(model, "lm"),
        *(Row(model, "lm", (switch,)) for switch in switches),
        Row(model, "lm", tuple(switches[:2])),
        Row(model, "plain-pytorch"),
        Row(model, "lm=False"),
        Row(model, "torchvision", checkpointing=True),
        Row(model, "lm", checkpointing=True),
        Row(model, "lm=False", checkpointing=True),
    ]


def compiled_rows_for(model: str) -> list[Row]:
    """The rows counted under torch.compile: torchvision, the LM network with its registered ops and
    decomposed (LMFUSED_COMPILE_JUNCTION=decompose), in plain PyTorch, lm=False."""
    return [
        Row(model, "torchvision"),
        Row(model, "lm"),
        Row(model, "lm", (("LMFUSED_COMPILE_JUNCTION", "decompose"),)),
        Row(model, "plain-pytorch"),
        Row(model, "lm=False"),
    ]


def measure(row: Row, batch: int, size: int) -> dict:
    """The memory of ``row``'s training step."""
    with environment_settings(dict(row.settings)):
        result = measure_step(row.build(), batch, size)
    return {
        "model": row.model,
        "row": row.name,
        "ran": row.ran(),
        "batch": batch,
        "image_size": size,
        **result,
    }


def provider_row(model: str, provider: str) -> Row:
    """The bench.memory row of a bench.models provider (``cuda+unfused-bn`` -> LMFUSED_FUSE_BN=0): the lmfused
    backends keep the same tensors (shared autograd code), so any of them is the ``lm`` network."""
    base, _, variant = provider.partition("+")
    if base in ("torchvision", "plain-pytorch"):
        return Row(model, base)
    return Row(model, "lm", tuple(VARIANTS[variant].items()) if variant else ())


def _mb(value: int) -> float:
    return value / 1e6


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--roles", action="store_true", help="also print the saved bytes per role")
    parser.add_argument("--compiled", type=int, metavar="BATCH", default=0,
                        help="also count what torch.compile keeps, running real steps on the CPU at this "
                             "batch (slow: about a minute per row at 16)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args(argv)
    results = []
    for model in args.models:
        for row in rows_for(model):
            results.append(measure(row, args.batch, args.size))
            print(f"{model} {row.name}: saved {_mb(results[-1]['saved_bytes']):,.1f} MB", flush=True)
    compiled = []
    for model in args.models if args.compiled else ():
        for row in compiled_rows_for(model):
            with environment_settings(dict(row.settings)):
                counted = compiled_saved_bytes(row.build(), args.compiled, args.size)
            compiled.append(
                {"model": model, "row": row.name, "ran": row.ran(), "batch": args.compiled, **counted}
            )
            print(
                f"{model} {row.name} compiled: saved {_mb(counted['compiled_saved_bytes']):,.1f} MB",
                flush=True,
            )
    env = environment()
    path = args.out / "memory.json"
    payload = {"environment": env, "batch": args.batch, "image_size": args.size, "rows": results}
    write_json(path, payload | ({"compiled": compiled} if compiled else {}))
    base = {r["model"]: r for r in results if r["row"] == "torchvision"}
    table = []
    for r in results:
        plain = base[r["model"]]
        table.append({
            "model": r["model"], "row": r["row"],
            "saved_mb": _mb(r["saved_bytes"]), "vs_tv": r["saved_bytes"] / plain["saved_bytes"],
            "naive_mb": _mb(r["saved_naive_bytes"]),
            "peak_mb": _mb(r["peak_bytes"]), "peak_vs_tv": r["peak_bytes"] / plain["peak_bytes"],
            "gpu_prediction_gb": predicted_peak_bytes(r) / 1e9,
        })  # fmt: skip
    print(f"# memory of one training step (commit {env['commit']}): batch {args.batch}, {args.size}px, bf16 "
          "autocast, channels_last; saved = each storage once, naive = each saved tensor; peak = live bytes "
          "the step created; gpu_prediction = peak + parameters, momentum, buffers, batch")  # fmt: skip
    formats = {"saved_mb": ",.1f", "vs_tv": ".3f", "naive_mb": ",.1f", "peak_mb": ",.1f", "peak_vs_tv": ".3f",
               "gpu_prediction_gb": ".2f"}  # fmt: skip
    print_table(table, [("model", "s"), ("row", "s"), *formats.items()])
    if args.roles:
        for key in ("saved_by_role", "peak_by_role"):
            print(f"\n{key} (MB)")
            rows = [
                {"model": r["model"], "row": r["row"], **{k: _mb(v) for k, v in r[key].items()}}
                for r in results
            ]
            print_table(rows, [("model", "s"), ("row", "s")] + [(role, ",.1f") for role in ROLES])
    if compiled:
        base = {r["model"]: r for r in compiled if r["row"] == "torchvision"}
        print(f"\ntorch.compile (AOTAutograd's min-cut partitioner), batch {args.compiled}: activations "
              "kept for the backward")  # fmt: skip
        table = [{"model": r["model"], "row": r["row"], "saved_mb": _mb(r["compiled_saved_bytes"]),
                  "vs_tv": r["compiled_saved_bytes"] / base[r["model"]]["compiled_saved_bytes"],
                  "graphs": r["graphs"]} for r in compiled]  # fmt: skip
        print_table(
            table, [("model", "s"), ("row", "s"), ("saved_mb", ",.1f"), ("vs_tv", ".3f"), ("graphs", "d")]
        )
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
