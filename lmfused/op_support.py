"""What every lmfused op shares: backend choice, argument checks, registration helpers and the layout.

One op, one story: a kernel (``triton_kernels/``, ``csrc/``) -> its launcher -> the registered op
(``lmfused.ops`` for ``lm_step``, ``lmfused.batch_norm_step`` for the batch-norm family) -> the functional
API -> the modules. The pieces below serve both op families under one name each.

Layout. Every backend views a dense (N, C, *spatial) tensor as M rows of L contiguous elements:

* channels-first (plain contiguous): M = N * C rows of L = prod(spatial); row m is channel m % C;
* channels-last (NHWC-like, and rank-2 (N, C)): M = N * prod(spatial) rows of L = C; column l is channel l.

A contiguous tensor with no spatial extent (N, C, 1, 1) is read as channels-last, its natural 2-D shape.
Channels-last tensors are read in place; any other strides are copied to contiguous first.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable
from numbers import Real
from typing import ForwardRef, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "FLOAT_DTYPES",
    "Plan",
    "available_backends",
    "backend_unavailable_reason",
    "call_op",
    "channel_view",
    "check_like",
    "check_step_inputs",
    "check_tensor",
    "choose_backend",
    "empty_in_layout",
    "is_channels_last_dense",
    "passes_gradients",
    "plan_layout",
    "register_op",
    "result_in_layout",
    "to_layout",
    "triton_import_error",
    "triton_traceable",
    "zero_gradient_like",
]

BACKENDS = ("cuda", "triton", "reference")  # in order of preference on a GPU
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    """The 2-D view of an activation: rows, row length, channels and rows per sample."""

    channels_last: bool
    rows: int  # M
    row_len: int  # L
    channels: int  # C
    rows_per_sample: int  # C (channels-first) or prod(spatial) (channels-last)


def _to_last(t: Tensor) -> Tensor:
    return t.permute(0, *range(2, t.dim()), 1)


def _from_last(t: Tensor) -> Tensor:
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def is_channels_last_dense(t: Tensor) -> bool:
    """True if ``t`` is dense with the channel dim (1) fastest: NHWC, NDHWC, ... (rank >= 3)."""
    # torch keeps this flag for ranks 4 and 5 (the same rule: size-1 dims are skipped), so no view is made.
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return t.dim() >= 3 and _to_last(t).is_contiguous()


def _spatial(shape: torch.Size) -> int:
    return math.prod(shape[2:])


def plan_layout(u: Tensor) -> Plan:
    """Choose the 2-D view for ``u``: channels-last if it already is (read in place), else channels-first."""
    n, c = u.shape[0], u.shape[1]
    spatial = _spatial(u.shape)
    if u.dim() == 2 or spatial == 1:
        channels_last = True
    elif u.is_contiguous():
        channels_last = False
    else:
        channels_last = is_channels_last_dense(u)
    if channels_last:
        return Plan(True, n * spatial, c, c, spatial)
    return Plan(False, n * c, spatial, c, c)


def to_layout(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` in the planned layout: returned as is when it already is, copied otherwise."""
    if not channels_last or t.dim() == 2:
        return t.contiguous()
    if is_channels_last_dense(t):
        return t
    return _from_last(_to_last(t).contiguous())


def empty_in_layout(shape: torch.Size, channels_last: bool, *, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised tensor of ``shape`` in the planned layout."""
    if not channels_last or len(shape) == 2:
        return torch.empty(shape, dtype=dtype, device=device)
    last = (shape[0], *shape[2:], shape[1])
    return _from_last(torch.empty(last, dtype=dtype, device=device))


def result_in_layout(result: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh tensor in the layout every backend gives ``like``'s shape (:func:`plan_layout`), holding
    ``result`` in ``dtype``."""
    fresh = empty_in_layout(like.shape, plan_layout(like).channels_last, dtype=dtype, device=like.device)
    return fresh.copy_(result)


def channel_view(k: Tensor, like: Tensor) -> Tensor:
    """View k ((1,) or (C,)) so that it broadcasts along dim 1 of ``like``."""
    if k.numel() == 1:
        return k.reshape(())
    return k.reshape((1, -1) + (1,) * (like.dim() - 2))


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def triton_import_error() -> str | None:
    """None if the Triton kernels import, else why not (recorded once)."""
    try:
        import lmfused.triton_kernels.lm_step  # noqa: F401
    except ImportError as exc:  # triton missing, or lmfused run from a source tree without installing
        return f"{exc} (install triton, and lmfused with pip install -e .)"
    return None


def triton_traceable() -> bool:
    """triton_op lets torch.compile see the kernels; interpreted kernels (CPU) are kept opaque instead."""
    from lmfused.triton_kernels import lm_step as kernels

    return hasattr(torch.library, "triton_op") and not kernels.INTERPRETED


def backend_unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on tensors of ``device_type``, else why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        if triton_import_error() is not None:
            return f"the Triton kernels cannot be imported: {triton_import_error()}"
        if device_type == "cuda":
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None if device_type == "cpu" else f"triton does not run on {device_type} tensors"
        return f"triton needs CUDA tensors ({device_type} given; TRITON_INTERPRET=1 runs it on CPU tensors)"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend needs CUDA tensors ({device_type} given)"
        from lmfused._cuda_build import cuda_unavailable_reason, load_cuda_extension

        return None if load_cuda_extension() is not None else cuda_unavailable_reason()
    return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device`` (default: CUDA if present, else CPU), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return [b for b in BACKENDS if backend_unavailable_reason(b, device_type) is None]


@torch.compiler.assume_constant_result
def choose_backend(backend: str | None, device_type: str) -> str:
    """The backend= argument, else $LMFUSED_BACKEND, else the fastest available for the device."""
    requested = backend if backend is not None else os.environ.get("LMFUSED_BACKEND") or None
    if requested is None:
        if device_type == "cpu":
            return "reference"  # the Triton interpreter is a test vehicle, not a fast CPU path
        return available_backends(device_type)[0]
    if requested not in BACKENDS:
        raise ValueError(f"backend: unknown backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    reason = backend_unavailable_reason(requested, device_type)
    if reason is not None:
        raise RuntimeError(f"backend: {requested!r} is not available: {reason}")
    return requested


# ----------------------------------------------------------------------------------------------------------
# Validation: every error names the argument and says what was expected (DESIGN.md section 2).
# ----------------------------------------------------------------------------------------------------------


def check_tensor(name: str, t: object) -> Tensor:
    """``t`` if it is a floating-point tensor, else TypeError naming ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def check_like(name: str, t: object, u: Tensor, like: str = "u") -> None:
    """``t`` a tensor with the shape, dtype and device of ``u`` (the argument named ``like``), else an error
    naming ``name``."""
    check_tensor(name, t)
    if t.shape != u.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(u.shape)} (the shape of {like}), got {tuple(t.shape)}"
        )
    if t.dtype != u.dtype:
        raise TypeError(f"{name}: expected dtype {u.dtype} (the dtype of {like}), got {t.dtype}")
    if t.device != u.device:
        raise ValueError(f"{name}: expected device {u.device} (the device of {like}), got {t.device}")


def check_step_inputs(u, u_prev, f, k, scale, relu, noise_std) -> Tensor:
    """Validate the arguments of the LM update (lm_step's, and batch_norm_lm_step's LM half); returns k
    viewed as (1,) or (C,)."""
    check_tensor("u", u)
    if u.dtype not in FLOAT_DTYPES:
        raise TypeError(f"u: expected dtype float16, bfloat16, float32 or float64, got {u.dtype}")
    if u.dim() < 2:
        raise ValueError(f"u: expected rank >= 2, shape (N, C, *spatial), got shape {tuple(u.shape)}")
    check_like("u_prev", u_prev, u)
    if f is not None:
        check_like("f", f, u)
    check_tensor("k", k)
    channels = u.shape[1]
    per_channel = k.dim() >= 1 and k.shape[0] == channels and all(s == 1 for s in k.shape[1:])
    if not ((k.dim() == 1 and k.shape[0] == 1) or (per_channel and k.dim() < u.dim())):
        raise ValueError(
            f"k: expected shape (1,) or (C,) = ({channels},) (or (C, 1, ...)), got {tuple(k.shape)}"
        )
    if k.device != u.device:
        raise ValueError(f"k: expected device {u.device} (the device of u), got {k.device}")
    if scale is not None:
        check_tensor("scale", scale)
        if scale.shape != (u.shape[0],):
            raise ValueError(f"scale: expected shape (N,) = ({u.shape[0]},), got {tuple(scale.shape)}")
        if scale.device != u.device:
            raise ValueError(f"scale: expected device {u.device} (the device of u), got {scale.device}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu: expected a bool, got {type(relu).__name__}")
    if isinstance(noise_std, bool) or not isinstance(noise_std, Real):
        raise TypeError(f"noise_std: expected a real number, got {type(noise_std).__name__}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std: expected a finite number >= 0, got {noise_std}")
    return k.reshape(-1) if k.dim() > 1 else k


# ----------------------------------------------------------------------------------------------------------
# Registration and autograd helpers
# ----------------------------------------------------------------------------------------------------------


def _taking_record(implementation: Callable, record: type, name: str, schema: str) -> Callable:
    """The op's implementation: its flat arguments (in the schema's order) as one ``record``, the backend's
    ``implementation`` called on it. The record's fields must be the schema's argument names, in order. A
    backward op's record names in ``LIKE_GRAD_OUT`` the operands that must have grad_out's shape, dtype and
    device when given: checked here for every Python backend (the kernels index them as grad_out; the C++
    binding checks the same), so none reads past a smaller tensor or broadcasts it."""
    arguments = tuple(a.name for a in torch._C.parse_schema(f"lmfused::{name}{schema}").arguments)
    if record._fields != arguments:
        raise TypeError(f"{record.__name__}: fields {record._fields}, {name} takes {arguments}")
    like_grad_out = getattr(record, "LIKE_GRAD_OUT", ())

    def from_arguments(*args, **kwargs):
        operands = record(*args, **kwargs)
        for field in like_grad_out:
            if (operand := getattr(operands, field)) is not None:
                check_like(field, operand, operands.grad_out, like="grad_out")
        return implementation(operands)

    from_arguments.__name__ = getattr(implementation, "__name__", name)

    # The schema's signature, for the torch versions whose triton_op infers the schema from the function (as
    # annotation strings, which it reads; a NamedTuple keeps them as ForwardRef objects, which it does not).
    def annotation(field: str) -> object:
        hint = record.__annotations__[field]
        return hint.__forward_arg__ if isinstance(hint, ForwardRef) else hint

    from_arguments.__signature__ = inspect.Signature(
        [
            inspect.Parameter(f, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation(f))
            for f in record._fields
        ],
        return_annotation=inspect.signature(implementation).return_annotation,
    )
    return from_arguments


def register_op(
    backend: str,
    name: str,
    schema: str,
    implementation: Callable | None,
    fake: Callable,
    record: type,
    mutates_args: tuple[str, ...] = (),
) -> Callable:
    """Define ``lmfused::name`` with its fake implementation; returns the op. ``implementation`` None: only
    the schema, the kernel being registered from C++ (``TORCH_LIBRARY_IMPL(lmfused, CUDA, ...)``, csrc/);
    else a ``custom_op``, or for the Triton backend a ``triton_op`` when torch.compile can trace its kernels
    (:func:`triton_traceable`), that builds ``record`` (a NamedTuple with the schema's arguments as fields)
    from its arguments and passes it to ``implementation``, the backend's function of that one record."""
    if implementation is None:
        torch.library.define(f"lmfused::{name}", schema)
        op = getattr(torch.ops.lmfused, name).default
    else:
        make = torch.library.custom_op
        if backend == "triton" and triton_traceable():
            make = torch.library.triton_op
        run = _taking_record(implementation, record, name, schema)
        op = make(f"lmfused::{name}", mutates_args=mutates_args, schema=schema)(run)
        _EAGER_FUNCTIONS[op] = (run, tuple(record._fields.index(a) for a in mutates_args))
    torch.library.register_fake(f"lmfused::{name}", fake)
    return op


# A Python backend's op -> (the function its registration calls with the op's arguments, the positions of the
# arguments it mutates). See call_op.
_EAGER_FUNCTIONS: dict[object, tuple[Callable, tuple[int, ...]]] = {}


def call_op(op: Callable, *args):
    """``op(*args)``. In plain eager code with grad mode off (the passes of the ops' autograd Functions, the
    statistics), a Python backend's op runs its function directly: the same work, without the Python layers
    of a ``custom_op`` call (autograd, view and backend redispatch, the torch.compile guard): 15-25 us per
    call on a 2-core CPU. Anything else goes through the op: tracing and compiling, dispatch and function
    modes (fake tensors, selective checkpointing, counters), functorch transforms, tensor subclasses, and grad
    mode on (where the op's own autograd registration, or its lack of one, has to be seen)."""
    eager = _EAGER_FUNCTIONS.get(op)
    if eager is None or not _plain_eager(args):
        return op(*args)
    run, mutated = eager
    result = run(*args)
    for i in mutated:  # what the op's in-place registration does for autograd's saved-tensor checks
        if args[i] is not None:
            torch.autograd.graph.increment_version(args[i])
    return result


def _plain_eager(args: tuple) -> bool:
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, Tensor))


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)  # (a Parameter dispatches as a plain tensor does)


def zero_gradient_like(out: Tensor) -> Callable[[], Tensor]:
    """A maker of zeros shaped like ``out`` (same layout) that holds no reference to ``out``: the gradient
    of an output nobody used, when a Function with two outputs turns gradient materialisation off."""
    shape, dtype, device = out.shape, out.dtype, out.device
    channels_last = plan_layout(out).channels_last
    return lambda: empty_in_layout(shape, channels_last, dtype=dtype, device=device).zero_()


def passes_gradients() -> bool:
    """Whether steps pass gradients to each other directly, the default: the shortcut pass-through
    (``return_shortcut``) and the output's handoff (:mod:`lmfused.handoff`); or leave every addition of two
    gradients to autograd (``LMFUSED_GRADIENT_PASSTHROUGH=0``, to measure what they save)."""
    return os.environ.get("LMFUSED_GRADIENT_PASSTHROUGH", "1") != "0"
