"""Launches per junction, forward and backward, counted on CPU (DESIGN.md 1d).

    python -m bench.launches                     # every op, backend and layout; table + JSON
    python -m bench.launches --shape 4 64 8 8 --plan-shape 64 256 56 56 --out DIR

On a GPU every kernel launch, and every torch op that computes or copies, costs a few microseconds of host
time and a kernel's ramp-up; at 14x14 and 7x7 a junction is launch-bound. This counts them without a GPU for
one forward and backward of each junction op, called as the model zoo calls it (training, ReLU, the gradient
pass-through: the shortcut's gradient comes back into the op's backward):

- ``batch_norm_lm_step`` (``return_shortcut=True``), per-channel or scalar k, with or without the
  stochastic-depth ``scale``; ``batch_norm_relu``; ``lm_step`` (``return_shortcut=True``, f given, ReLU),
  per-channel or scalar k, with or without ``scale``;
- in the models' layout (bf16 channels_last activations, float32 weight, bias, k and scale) and contiguous;
- per backend: ``reference`` (every torch op it dispatches), ``triton`` (its kernels through Triton's
  interpreter, counted at the launcher, plus every torch op around them), ``cuda`` (the binding's own launch
  plan from ``lmfused._C.launch_plan``, which runs the binding's host code with a recording launcher, plus
  the torch ops of the same Python glue, counted on the reference backend's run), and, as the yardstick,
  ``torchvision`` (F.batch_norm, ``out += identity``, ReLU; or F.batch_norm then ReLU).

Counted: kernel launches, and torch ops that compute or copy (a cast, a copy, a fill, an ``item()``).
Not counted: allocations, views and metadata ops, and what the Triton interpreter does to move a kernel's
arguments. A torch op is one launch here; on a GPU an aten op may launch more than one kernel (a batch norm
two each way). Not in any row: ``num_batches_tracked += 1`` (one op, in nn.BatchNorm2d and in the zoo alike)
and autograd's addition of the block input's two gradients (outside the junction op in both networks).

Goal (issue 19, item 6): at most 6 launches per ``batch_norm_lm_step`` junction (forward + backward) on the
kernel backends (triton, cuda), with no alignment copy in the models' layout.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before lmfused is imported: the Triton kernels run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lmfused  # noqa: E402
from bench.common import ROOT, environment, print_table, write_json  # noqa: E402

GOAL = 6  # launches per batch_norm_lm_step junction, forward + backward (issue 19, item 6)
KERNEL_BACKENDS = ("triton", "cuda")  # the backends the goal applies to (reference is the oracle)
BACKENDS = ("reference", "triton", "cuda", "torchvision")
LAYOUTS = ("channels_last", "contiguous")
# The activation shape the ops run at on CPU, and the one the CUDA binding plans for (ResNeXt-50's layer1).
CPU_SHAPE = (4, 64, 8, 8)
PLAN_SHAPE = (64, 256, 56, 56)

# Ops that launch nothing: allocations (no data written), and metadata ops (views are told by their schema).
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_METADATA = {"detach", "alias", "lift_fresh", "set_", "_unsafe_view", "resize_", "_reshape_alias"}
# Torch ops that only move data: copies (a same-dtype copy is a layout or alignment copy), and casts.
_COPIES = {"clone", "contiguous", "_local_scalar_dense", "lift_fresh_copy"}

# Schema argument -> the launch_plan flag its presence sets (the contract of lmfused._C.launch_plan).
_PRESENCE_FLAGS = {
    "u": "has_state",
    "weight": "has_weight",
    "bias": "has_bias",
    "scale": "has_scale",
    "grad_shortcut": "has_shortcut",
    "grad_handoff": "has_handoff",
    "mask": "has_mask",
    "running_mean": "has_running_stats",
    "seed": "noise",
}
PLAN_FLAGS = (
    "training", "relu", "has_state", "has_weight", "has_bias", "has_scale", "noise", "per_channel_k",
    "has_shortcut", "has_handoff", "write_mask", "has_mask", "has_running_stats", "need_x", "need_u",
    "need_u_prev", "need_f", "need_k",
)  # fmt: skip
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}  # fmt: skip


@dataclass
class Launch:
    """One launch: a kernel (``kind`` triton or cuda) or a torch op that computes (``kind`` torch)."""

    phase: str  # forward / backward
    kind: str  # triton / cuda / torch
    name: str  # kernel name, or aten op (``aten.mul``)
    inside: str | None  # the lmfused op it ran in; None: the Python glue around the ops
    moves: str | None = None  # a torch op that only moves data: "copy" (same dtype) or "cast"

    def __str__(self) -> str:
        where = f"in {self.inside}" if self.inside else "glue"
        return f"{self.phase} {self.kind} {self.name} ({where}{', ' + self.moves if self.moves else ''})"


def _base_name(func) -> str:
    return func._schema.name.split("::")[-1]


def computes(func) -> bool:
    """Whether a dispatched op computes or copies (launches a kernel on a GPU): not an allocation, a view or
    a metadata op."""
    return not (
        func.namespace == "prim"
        or func.is_view
        or _base_name(func) in _ALLOCATIONS
        or _base_name(func) in _METADATA
    )


def data_movement(func, args: tuple, kwargs: dict) -> str | None:
    """ "copy" for an op that only copies (a same-dtype copy: a layout or alignment copy, or ``item()``),
    "cast" for one that converts the dtype as it copies, None for an op that computes."""
    name = _base_name(func)
    if name == "_to_copy":
        dtype = kwargs.get("dtype")
        return "cast" if dtype is not None and dtype != args[0].dtype else "copy"
    if name == "copy_":
        return "cast" if args[0].dtype != args[1].dtype else "copy"
    return "copy" if name in _COPIES else None


@dataclass
class LaunchCounter(TorchDispatchMode):
    """Dispatch mode that records every launch: torch ops that compute (in the glue, and inside the lmfused
    ops, whose implementations run under the mode too), Triton kernels (through :func:`triton_launches`), and,
    when ``plan`` is given, the CUDA binding's launches for each lmfused op instead of its internals."""

    plan: Callable[[str, object, tuple, dict], list[str]] | None = None
    launches: list[Launch] = field(default_factory=list)
    phase: str = "forward"
    inside: str | None = None
    in_kernel: bool = False
    namespaces: tuple[str, ...] = ("lmfused",)  # whose ops are counted from inside (or planned)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_kernel:  # the Triton interpreter moving a kernel's arguments: part of that launch
            return func(*args, **kwargs)
        if func.namespace in self.namespaces:
            return self._lmfused_op(func, args, kwargs)
        if self.inside is not None:
            # Below autograd (inside an op's implementation) composite ops reach the mode undecomposed:
            # decompose them here, so that only what really runs (a copy, or nothing) is counted.
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        if computes(func):
            name = f"{func.namespace}.{_base_name(func)}"
            self.launches.append(
                Launch(self.phase, "torch", name, self.inside, data_movement(func, args, kwargs))
            )
        return func(*args, **kwargs)

    def _lmfused_op(self, func, args, kwargs):
        name = _base_name(func)
        if self.plan is not None:
            for entry in self.plan(name, func, args, kwargs):
                kind = "torch" if entry.startswith("aten::") else "cuda"
                moves = "copy" if entry in ("cudaMemcpyAsync", "aten::clone", "aten::contiguous") else None
                self.launches.append(Launch(self.phase, kind, entry.replace("::", "."), name, moves))
            return func(*args, **kwargs)  # computed by the stand-in backend, not counted
        outer, self.inside = self.inside, name
        try:
            with self:  # the op's own implementation (its CPU kernel), under this mode
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        finally:
            self.inside = outer


@contextlib.contextmanager
def triton_launches(counter: LaunchCounter) -> Iterator[None]:
    """Record every Triton kernel launched through the interpreter (``kernel[grid](...)``) in ``counter``,
    and hide the torch ops the interpreter runs to move the kernel's arguments."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run

    def counted_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            counter.launches.append(Launch(counter.phase, "triton", self.fn.__name__, counter.inside))
        counter.in_kernel = True
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            counter.in_kernel = False

    InterpretedFunction.run = counted_run
    try:
        yield
    finally:
        InterpretedFunction.run = run


# ----------------------------------------------------------------------------------------------------------
# The CUDA binding's launch plan
# ----------------------------------------------------------------------------------------------------------


def cuda_plan_module() -> tuple[ModuleType | None, str | None]:
    """(lmfused._C, None) when it has ``launch_plan``, else (None, why not). A prebuilt extension only: a
    JIT build is not started for a count."""
    try:
        module = importlib.import_module("lmfused._C")
    except Exception as exc:  # noqa: BLE001 - not built, or built for another torch: no CUDA rows
        return None, f"lmfused._C is not importable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if not hasattr(module, "launch_plan"):
        return None, "lmfused._C has no launch_plan (the binding's recording launcher is not built in)"
    return module, None


def plan_arguments(func, args: tuple, kwargs: dict) -> tuple[str, list[int], str, bool, dict[str, bool]]:
    """launch_plan's arguments for a dispatched lmfused op: (op without backend, activation shape, dtype,
    channels_last, flags), the flags read from the op's own arguments by their schema names."""
    names = [a.name for a in func._schema.arguments]
    values = dict(zip(names, args, strict=False)) | kwargs
    flags = dict.fromkeys(PLAN_FLAGS, False)
    for name, value in values.items():
        if name in _PRESENCE_FLAGS:
            flags[_PRESENCE_FLAGS[name]] |= value is not None
        elif name == "noise_std":
            flags["noise"] |= bool(value > 0)
        elif name == "k":
            flags["per_channel_k"] = value.numel() > 1
        elif isinstance(value, bool) and name in flags:
            flags[name] = value
    activation = next(v for v in values.values() if isinstance(v, torch.Tensor) and v.dim() >= 2)
    channels_last = activation.dim() == 4 and not activation.is_contiguous()
    op = re.sub(f"_({'|'.join(lmfused.ops.BACKENDS)})(?=_|$)", "", _base_name(func))
    return op, list(activation.shape), _DTYPE_NAMES[activation.dtype], channels_last, flags


def cuda_planner(module: ModuleType, shape: tuple[int, ...] | None = None) -> Callable:
    """The ``plan`` of a :class:`LaunchCounter`: ``module.launch_plan`` for each lmfused op, at ``shape``
    (None: the shape the op runs at)."""

    def plan(name, func, args, kwargs) -> list[str]:
        op, activation_shape, dtype, channels_last, flags = plan_arguments(func, args, kwargs)
        if shape is not None:
            activation_shape = list(shape)
        return list(module.launch_plan(op, activation_shape, dtype, channels_last, flags))

    return plan


# ----------------------------------------------------------------------------------------------------------
# The junctions
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str  # batch_norm_lm_step / batch_norm_relu / lm_step
    layout: str  # channels_last / contiguous
    k: str  # channel / scalar ("-" for batch_norm_relu)
    scale: bool


def cases() -> list[Case]:
    """Every op, layout, k and scale counted (batch_norm_relu has no k and no scale)."""
    out = []
    for layout in LAYOUTS:
        for op in ("batch_norm_lm_step", "lm_step"):
            out += [Case(op, layout, k, scale) for k in ("channel", "scalar") for scale in (False, True)]
        out.append(Case("batch_norm_relu", layout, "-", False))
    return out


def _inputs(case: Case, shape: tuple[int, ...]) -> dict:
    """Fresh random leaves of the junction (activations bf16 in ``case.layout``, vectors float32), and the
    gradients of its outputs."""
    generator = torch.Generator().manual_seed(0)
    memory_format = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format

    def activation():
        t = torch.randn(shape, generator=generator).to(torch.bfloat16, memory_format=memory_format)
        return t.requires_grad_()

    def vector(n, low=-1.0, high=1.0):
        return (torch.rand(n, generator=generator) * (high - low) + low).requires_grad_()

    channels = shape[1]
    return {
        "x": activation(),
        "u": activation(),
        "u_prev": activation(),
        "f": activation(),
        "running_mean": torch.zeros(channels),
        "running_var": torch.ones(channels),
        "weight": vector(channels, 0.5, 1.5),
        "bias": vector(channels),
        "k": vector(channels if case.k == "channel" else 1, -0.1, 0.0),
        "scale": (torch.rand(shape[0], generator=generator) < 0.8).float() / 0.8 if case.scale else None,
        "grad_out": torch.randn(shape, generator=generator).to(torch.bfloat16, memory_format=memory_format),
        "grad_shortcut": torch.randn(shape, generator=generator).to(
            torch.bfloat16, memory_format=memory_format
        ),
    }


def junction(case: Case, backend: str, t: dict) -> Callable[[], tuple]:
    """The forward of ``case`` on ``backend`` as the zoo calls it: (outputs, their gradients)."""
    bn = (t["running_mean"], t["running_var"], t["weight"], t["bias"])
    if backend == "torchvision":  # the yardstick: torchvision's Bottleneck junction, or BatchNorm + ReLU
        y = F.batch_norm(t["x"], *bn[:2], *bn[2:], True, 0.1, 1e-5)
        if case.op == "batch_norm_relu":
            return (torch.relu(y),), (t["grad_out"],)
        y += t["u"]  # torchvision: out += identity; out = relu(out)
        return (torch.relu_(y),), (t["grad_out"],)
    if case.op == "batch_norm_relu":
        out = lmfused.batch_norm_relu(t["x"], *bn, training=True, momentum=0.1, eps=1e-5, backend=backend)
        return (out,), (t["grad_out"],)
    common = dict(scale=t["scale"], relu=True, noise_std=0.0, backend=backend, return_shortcut=True)
    if case.op == "batch_norm_lm_step":
        outputs = lmfused.batch_norm_lm_step(
            t["x"], *bn, t["u"], t["u_prev"], t["k"], training=True, momentum=0.1, eps=1e-5, **common
        )
    else:
        outputs = lmfused.lm_step(t["u"], t["u_prev"], t["f"], t["k"], **common)
    return outputs, (t["grad_out"], t["grad_shortcut"])


def count(case: Case, backend: str, shape: tuple[int, ...] = CPU_SHAPE, plan_module: ModuleType | None = None,
          plan_shape: tuple[int, ...] | None = PLAN_SHAPE) -> list[Launch]:  # fmt: skip
    """The launches of one forward and backward of ``case`` on ``backend`` (cuda: ``plan_module``'s
    launch plan at ``plan_shape``, with the glue counted on the reference backend's run)."""
    plan = cuda_planner(plan_module, plan_shape) if backend == "cuda" else None
    counter = LaunchCounter(plan=plan)
    run_on = "reference" if backend == "cuda" else backend
    hook = triton_launches(counter) if backend == "triton" else contextlib.nullcontext()
    # Once uncounted: a first call's one-time work (the Triton ticket counters' cache) is no junction's.
    _forward_and_backward(case, run_on, _inputs(case, shape), LaunchCounter())
    tensors = _inputs(case, shape)
    with hook, counter:
        _forward_and_backward(case, run_on, tensors, counter)
    return counter.launches


def _forward_and_backward(case: Case, backend: str, tensors: dict, counter: LaunchCounter) -> None:
    outputs, grads = junction(case, backend, tensors)
    counter.phase = "backward"
    # Gradients returned, not accumulated into .grad: a leaf's AccumulateGrad would copy a gradient that the
    # caller still holds, a copy no network makes (its block input's gradients are added instead).
    leaves = [t for t in tensors.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(outputs, leaves, grads, allow_unused=True)


def unavailable(backend: str, plan_module: ModuleType | None, plan_reason: str | None) -> str | None:
    """Why ``backend``'s rows cannot be counted here, or None."""
    if backend == "cuda":
        return None if plan_module is not None else plan_reason
    if backend in ("reference", "triton") and backend not in lmfused.available_backends("cpu"):
        return f"{backend} does not run on CPU tensors here (TRITON_INTERPRET=1 before lmfused is imported)"
    return None


def summarize(launches: list[Launch]) -> dict:
    """Counts per phase and kind: kernels (triton/cuda), torch ops, copies among them; and the sequence."""
    row: dict = {}
    for phase in ("forward", "backward"):
        mine = [x for x in launches if x.phase == phase]
        row[f"{phase}_kernels"] = sum(x.kind != "torch" for x in mine)
        row[f"{phase}_torch_ops"] = sum(x.kind == "torch" for x in mine)
    row["total"] = len(launches)
    row["glue_ops"] = sum(x.inside is None for x in launches)
    row["copies"] = sum(x.moves == "copy" for x in launches)
    row["casts"] = sum(x.moves == "cast" for x in launches)
    row["launches"] = [str(x) for x in launches]
    return row


def measure(
    backends: tuple[str, ...] = BACKENDS,
    selected: list[Case] | None = None,
    shape: tuple[int, ...] = CPU_SHAPE,
    plan_shape: tuple[int, ...] | None = PLAN_SHAPE,
    plan_source: tuple[ModuleType | None, str | None] | None = None,
) -> dict:
    """Rows for every case and backend (a backend that cannot be counted here: its rows say why), and
    whether the goal is met."""
    plan_module, plan_reason = plan_source if plan_source is not None else cuda_plan_module()
    rows = []
    for case in selected if selected is not None else cases():
        for backend in backends:
            if backend == "torchvision" and case.op == "lm_step":
                continue  # no single torchvision counterpart of the unfused update
            row = {"backend": backend, **asdict(case)}
            reason = unavailable(backend, plan_module, plan_reason)
            if reason is None:
                row.update(summarize(count(case, backend, shape, plan_module, plan_shape)))
                row["status"] = "ok"
            else:
                row["status"] = f"skipped: {reason}"
            rows.append(row)
    return {"shape": list(shape), "plan_shape": list(plan_shape) if plan_shape else None, "rows": rows,
            "goal": goal(rows)}  # fmt: skip


def goal(rows: list[dict]) -> dict:
    """The goal per kernel backend: every batch_norm_lm_step junction at most GOAL launches, and no copy in
    the models' layout (channels_last); ``met`` None where the backend was not counted."""
    result = {}
    for backend in KERNEL_BACKENDS:
        mine = [r for r in rows if r["backend"] == backend and r["op"] == "batch_norm_lm_step"]
        counted = [r for r in mine if r["status"] == "ok"]
        if not counted:
            result[backend] = {"met": None, "why": mine[0]["status"] if mine else "not counted"}
            continue
        most = max(r["total"] for r in counted)
        copies = max(r["copies"] for r in counted if r["layout"] == "channels_last")
        result[backend] = {"met": most <= GOAL and copies == 0, "most": most, "copies_channels_last": copies}
    return result


def table_rows(result: dict) -> list[dict]:
    """One line per case, one cell per backend: "total = forward kernels+ops / backward kernels+ops"."""
    lines: dict[tuple, dict] = {}
    for r in result["rows"]:
        key = (r["op"], r["layout"], r["k"], r["scale"])
        line = lines.setdefault(key, dict(zip(("op", "layout", "k", "scale"), key, strict=True)))
        if r["status"] == "ok":
            line[r["backend"]] = (
                f"{r['total']} = {r['forward_kernels']}+{r['forward_torch_ops']} / "
                f"{r['backward_kernels']}+{r['backward_torch_ops']}"
            )
            if r["copies"]:
                line[r["backend"]] += f" ({r['copies']} copies)"
    return list(lines.values())


def goal_line(result: dict) -> str:
    parts = []
    for backend, g in result["goal"].items():
        if g["met"] is None:
            parts.append(f"{backend}: not counted ({g['why']})")
        else:
            parts.append(f"{backend}: {'met' if g['met'] else 'NOT met'} (at most {g['most']} launches, "
                         f"{g['copies_channels_last']} copies in channels_last)")  # fmt: skip
    return (f"Goal: at most {GOAL} launches per batch_norm_lm_step junction (forward + backward), no "
            "alignment copy in the models' layout. " + "; ".join(parts))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs="+", default=list(CPU_SHAPE),
                        help="activation shape the ops run at on CPU")  # fmt: skip
    parser.add_argument("--plan-shape", type=int, nargs="+", default=list(PLAN_SHAPE),
                        help="activation shape the CUDA binding plans for")  # fmt: skip
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(tuple(args.backends), shape=tuple(args.shape), plan_shape=tuple(args.plan_shape))
    env = environment()
    path = args.out / "launches.json"
    write_json(path, {"environment": env, **result})
    print(f"# launches per junction, forward + backward (commit {env['commit']}, torch {env['torch']}, "
          f"triton {env['triton']}); CPU shape {tuple(args.shape)}, bf16, float32 vectors; CUDA plan at "
          f"{tuple(args.plan_shape)}")  # fmt: skip
    print("cell: launches = forward kernels+torch ops / backward kernels+torch ops")
    backends = [
        b for b in args.backends if any(r["backend"] == b and r["status"] == "ok" for r in result["rows"])
    ]
    print_table(table_rows(result), [("op", "s"), ("layout", "s"), ("k", "s"), ("scale", "d")]
                + [(b, "s") for b in backends])  # fmt: skip
    for backend in args.backends:
        skipped = {r["status"] for r in result["rows"] if r["backend"] == backend and r["status"] != "ok"}
        for status in skipped:
            print(f"{backend}: {status}")
    print(goal_line(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
