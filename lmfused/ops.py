"""The LM step as registered PyTorch ops: validation, backend choice, fake and autograd registration.

The update is the linear multi-step (LM) architecture of Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural
Networks* (ICML 2018), with stochastic depth and noise injection (their section 3):

    out = act((1 - k) * u + k * u_prev + s * f + noise_std * xi)

Each backend is one pair of ops in the ``lmfused`` namespace, all with the same schemas::

    lmfused::lm_step_<backend>(u, u_prev, f?, k, scale?, seed?, relu, noise_std) -> out
    lmfused::lm_step_<backend>_backward(grad_out, grad_shortcut?, u?, u_prev?, out?, k, scale?, relu,
                                        need_u, need_u_prev, need_f, need_k) -> 4 gradients

``reference`` is a ``custom_op`` (pure PyTorch), ``triton`` a ``triton_op`` (its kernels stay visible to
torch.compile), ``cuda`` a schema whose CUDA kernel is registered from C++ (``csrc/``). The fake and autograd
registrations below are shared by all three: one story from kernel to ``lm_step``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from numbers import Real

import torch
from torch import Tensor

from lmfused import handoff
from lmfused._layout import empty_in_layout, plan_layout
from lmfused.rebuild import carry, save_state, saved_state
from lmfused.reference import reference_backward, reference_forward

__all__ = ["BACKENDS", "available_backends", "lm_step", "lm_step_with_shortcut"]

BACKENDS = ("cuda", "triton", "reference")  # in order of preference on a GPU
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

FORWARD_SCHEMA = (
    "(Tensor u, Tensor u_prev, Tensor? f, Tensor k, Tensor? scale, Tensor? seed, bool relu, "
    "float noise_std) -> Tensor"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor? grad_shortcut, Tensor? u, Tensor? u_prev, Tensor? out, Tensor k, "
    "Tensor? scale, bool relu, bool need_u, bool need_u_prev, bool need_f, bool need_k) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


# ----------------------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes, dtypes and layouts only, shared by every backend.
# ----------------------------------------------------------------------------------------------------------


def _fake_forward(u, u_prev, f, k, scale, seed, relu, noise_std):
    return empty_in_layout(u.shape, plan_layout(u).channels_last, dtype=u.dtype, device=u.device)


def _fake_backward(
    grad_out, grad_shortcut, u, u_prev, out, k, scale, relu, need_u, need_u_prev, need_f, need_k
):
    layout = plan_layout(u if u is not None else grad_out).channels_last

    def grad(needed: bool) -> Tensor:
        if not needed:
            return grad_out.new_empty((0,))
        return empty_in_layout(grad_out.shape, layout, dtype=grad_out.dtype, device=grad_out.device)

    grad_k = torch.empty_like(k) if need_k else k.new_empty((0,))
    return grad(need_u), grad(need_u_prev), grad(need_f), grad_k


# ----------------------------------------------------------------------------------------------------------
# Autograd: saves only what the needed gradients read (DESIGN.md section 1).
# ----------------------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    u, u_prev, f, k, scale, seed, relu, noise_std = inputs
    need_u, need_u_prev, need_f, need_k = ctx.needs_input_grad[:4]
    need_f = need_f and f is not None
    ctx.flags = (relu, need_u, need_u_prev, need_f, need_k)
    # u_prev last: a projected shortcut is saved as what rebuilds it (lmfused.rebuild).
    prev = save_state(ctx, u_prev if need_k else None)
    ctx.save_for_backward(
        u if need_k else None, output if relu else None, k, scale if need_f else None, *prev
    )


def _input_grads(backward_op, ctx, grad_out, grad_shortcut=None) -> tuple:
    """Gradients for (u, u_prev, f, k), None where not needed, from what _setup_context saved.
    ``grad_shortcut``: the gradient of the shortcut output (:func:`lm_step_with_shortcut`), added into
    grad_u by the backward kernel."""
    u, out, k, scale, *prev = ctx.saved_tensors
    u_prev = saved_state(ctx, tuple(prev))
    relu, need_u, need_u_prev, need_f, need_k = ctx.flags
    grads = backward_op(
        grad_out, grad_shortcut, u, u_prev, out, k, scale, relu, need_u, need_u_prev, need_f, need_k
    )
    needed = (need_u, need_u_prev, need_f, need_k)
    return tuple(g if n else None for g, n in zip(grads, needed, strict=True))


def _autograd_backward(backward_op) -> Callable:
    def backward(ctx, grad_out):
        return _input_grads(backward_op, ctx, grad_out) + (None,) * 4  # scale, seed, relu, noise_std

    return backward


def zero_gradient_like(out: Tensor) -> Callable[[], Tensor]:
    """A maker of zeros shaped like ``out`` (same layout) that holds no reference to ``out``: the gradient
    of an output nobody used, when a Function with two outputs turns gradient materialisation off."""
    shape, dtype, device = out.shape, out.dtype, out.device
    channels_last = plan_layout(out).channels_last
    return lambda: empty_in_layout(shape, channels_last, dtype=dtype, device=device).zero_()


class _EagerLMStep(torch.autograd.Function):
    """The registered autograd formula (same context, same backward op) applied directly, for eager calls.

    torch.library's generic autograd wrapper rebuilds the argument list from the schema on every call, a
    noticeable part of the host time of one lm_step; this path skips it. Under torch.compile ``lm_step`` calls
    the registered op, whose autograd registration below is the same formula.

    With ``with_shortcut`` it also returns u itself (as a view) as the step's shortcut, which the next step
    takes as its u_prev: the gradient that step sends to u_prev then arrives here as the shortcut's gradient
    and the backward kernel adds it into grad_u, instead of autograd adding two full-size gradients in a
    separate kernel (gradient pass-through, see :func:`lm_step_with_shortcut`).
    """

    @staticmethod
    def forward(ctx, u, u_prev, f, k, scale, seed, relu, noise_std, backend, with_shortcut):
        inputs = (u, u_prev, f, k, scale, seed, relu, noise_std)
        out = _FORWARD_OPS[backend](*inputs)  # grad mode is off here: straight to the backend's kernel
        _setup_context(ctx, inputs, out)
        ctx.backend = backend
        ctx.zero_grad_out = zero_gradient_like(out)
        ctx.set_materialize_grads(False)  # an unused shortcut's gradient stays None: nothing to add
        return (out, u) if with_shortcut else out

    @staticmethod
    def backward(ctx, grad_out, grad_shortcut=None):
        grad_out = ctx.zero_grad_out() if grad_out is None else grad_out
        return _input_grads(_BACKWARD_OPS[ctx.backend], ctx, grad_out, grad_shortcut) + (None,) * 6


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------


_TRITON_IMPORT_ERROR = ""


def _triton_implementations() -> tuple[Callable, Callable] | None:
    global _TRITON_IMPORT_ERROR
    try:
        from lmfused.triton_kernels import lm_step as kernels
    except ImportError as exc:  # triton missing, or lmfused run from a source tree without installing
        _TRITON_IMPORT_ERROR = f"{exc} (install triton, and lmfused with pip install -e .)"
        return None
    return kernels.lm_step_forward_triton, kernels.lm_step_backward_triton


def _triton_traceable() -> bool:
    """triton_op lets torch.compile see the kernels; interpreted kernels (CPU) are kept opaque instead."""
    from lmfused.triton_kernels import lm_step as kernels

    return hasattr(torch.library, "triton_op") and not kernels.INTERPRETED


def _register(backend: str, implementations: tuple[Callable, Callable] | None) -> tuple[Callable, Callable]:
    """Define lmfused::lm_step_<backend> and its backward, with fake and autograd registrations."""
    name, backward_name = f"lmfused::lm_step_{backend}", f"lmfused::lm_step_{backend}_backward"
    if implementations is None:  # kernels registered from C++ (TORCH_LIBRARY_IMPL(lmfused, CUDA, ...))
        torch.library.define(name, FORWARD_SCHEMA)
        torch.library.define(backward_name, BACKWARD_SCHEMA)
        forward_op = getattr(torch.ops.lmfused, f"lm_step_{backend}").default
        backward_op = getattr(torch.ops.lmfused, f"lm_step_{backend}_backward").default
    else:
        make = torch.library.custom_op
        if backend == "triton" and _triton_traceable():
            make = torch.library.triton_op
        forward_op = make(name, mutates_args=(), schema=FORWARD_SCHEMA)(implementations[0])
        backward_op = make(backward_name, mutates_args=(), schema=BACKWARD_SCHEMA)(implementations[1])
    torch.library.register_fake(name, _fake_forward)
    torch.library.register_fake(backward_name, _fake_backward)
    torch.library.register_autograd(name, _autograd_backward(backward_op), setup_context=_setup_context)
    return forward_op, backward_op


_TRITON = _triton_implementations()
_IMPLEMENTATIONS = {"reference": (reference_forward, reference_backward), "cuda": None}  # cuda: from C++
if _TRITON is not None:
    _IMPLEMENTATIONS["triton"] = _TRITON
_FORWARD_OPS: dict[str, Callable] = {}
_BACKWARD_OPS: dict[str, Callable] = {}
for _backend, _implementations in _IMPLEMENTATIONS.items():
    _FORWARD_OPS[_backend], _BACKWARD_OPS[_backend] = _register(_backend, _implementations)


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------


def _backend_unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on tensors of ``device_type``, else why not."""
    if backend == "reference":
        return None
    if backend == "triton":
        if _TRITON is None:
            return f"the Triton kernels cannot be imported: {_TRITON_IMPORT_ERROR}"
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
    return [b for b in BACKENDS if _backend_unavailable_reason(b, device_type) is None]


@torch.compiler.assume_constant_result
def _choose_backend(backend: str | None, device_type: str) -> str:
    """The backend= argument, else $LMFUSED_BACKEND, else the fastest available for the device."""
    requested = backend if backend is not None else os.environ.get("LMFUSED_BACKEND") or None
    if requested is None:
        if device_type == "cpu":
            return "reference"  # the Triton interpreter is a test vehicle, not a fast CPU path
        return available_backends(device_type)[0]
    if requested not in BACKENDS:
        raise ValueError(f"backend: unknown backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    reason = _backend_unavailable_reason(requested, device_type)
    if reason is not None:
        raise RuntimeError(f"backend: {requested!r} is not available: {reason}")
    return requested


# ----------------------------------------------------------------------------------------------------------
# Validation: every error names the argument and says what was expected (DESIGN.md section 2).
# ----------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_like(name: str, t: object, u: Tensor) -> None:
    _check_tensor(name, t)
    if t.shape != u.shape:
        raise ValueError(f"{name}: expected shape {tuple(u.shape)} (the shape of u), got {tuple(t.shape)}")
    if t.dtype != u.dtype:
        raise TypeError(f"{name}: expected dtype {u.dtype} (the dtype of u), got {t.dtype}")
    if t.device != u.device:
        raise ValueError(f"{name}: expected device {u.device} (the device of u), got {t.device}")


def _check_inputs(u, u_prev, f, k, scale, relu, noise_std) -> Tensor:
    """Validate the arguments of lm_step; returns k viewed as (1,) or (C,)."""
    _check_tensor("u", u)
    if u.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"u: expected dtype float16, bfloat16, float32 or float64, got {u.dtype}")
    if u.dim() < 2:
        raise ValueError(f"u: expected rank >= 2, shape (N, C, *spatial), got shape {tuple(u.shape)}")
    _check_like("u_prev", u_prev, u)
    if f is not None:
        _check_like("f", f, u)
    _check_tensor("k", k)
    channels = u.shape[1]
    per_channel = k.dim() >= 1 and k.shape[0] == channels and all(s == 1 for s in k.shape[1:])
    if not ((k.dim() == 1 and k.shape[0] == 1) or (per_channel and k.dim() < u.dim())):
        raise ValueError(
            f"k: expected shape (1,) or (C,) = ({channels},) (or (C, 1, ...)), got {tuple(k.shape)}"
        )
    if k.device != u.device:
        raise ValueError(f"k: expected device {u.device} (the device of u), got {k.device}")
    if scale is not None:
        _check_tensor("scale", scale)
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
# Public API
# ----------------------------------------------------------------------------------------------------------


def lm_step(
    u: Tensor,
    u_prev: Tensor,
    f: Tensor | None,
    k: Tensor,
    *,
    scale: Tensor | None = None,
    relu: bool = False,
    noise_std: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """Fused linear multi-step residual update (Lu et al., ICML 2018, LM-architecture).

    ``out = act((1 - k) * u + k * u_prev + scale * f + noise_std * xi)``, one kernel forward and one backward.

    Args:
        u: u_n, the block input (or its projected shortcut), shape (N, C, *spatial), float16/bfloat16/float32
            (float64 too, for gradcheck).
        u_prev: u_{n-1}, the previous state; same shape, dtype and device as ``u``.
        f: f(u_n), the residual branch; same shape as ``u``, or None for the two-term update.
        k: the learnable LM coefficient, shape (1,) or (C,) ((C, 1, 1) is accepted and viewed).
        scale: per-sample stochastic-depth multiplier, shape (N,) (mask / survival probability), or None.
            It is a constant: no gradient flows to it.
        relu: apply ReLU after the update (post-activation blocks).
        noise_std: standard deviation of the injected Gaussian noise (not differentiated). Its seed is drawn
            from torch's generator, so ``torch.manual_seed`` reproduces it.
        backend: "cuda", "triton" or "reference"; default $LMFUSED_BACKEND, else the fastest available.

    Returns:
        The updated state, same shape and dtype as ``u`` (channels-last stays channels-last).
    """
    return _lm_step(u, u_prev, f, k, scale, relu, noise_std, backend, with_shortcut=False)


def lm_step_with_shortcut(
    u: Tensor,
    u_prev: Tensor,
    f: Tensor | None,
    k: Tensor,
    *,
    scale: Tensor | None = None,
    relu: bool = False,
    noise_std: float = 0.0,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(lm_step(u, u_prev, f, k, ...), u)``, where the returned u is the shortcut the next step takes as its
    ``u_prev``, with the gradient pass-through between steps.

    In a chain of steps u_n feeds two updates: its own (as u) and the next one's (as u_prev). Called with
    plain tensors, autograd writes both gradients and then adds them in a separate kernel (read 2, write 1).
    Here the second use goes through the returned shortcut, a view of u whose gradient comes back to this
    step's backward kernel, which adds it into grad_u as it writes it: per step 2 X less traffic (X = the
    bytes of u), as ``python -m bench.traffic`` counts. Values and gradients are the same as two plain
    calls. Under torch.compile the shortcut is u itself (Inductor fuses the addition its own way) and the
    pass-through does not apply.
    """
    return _lm_step(u, u_prev, f, k, scale, relu, noise_std, backend, with_shortcut=True)


def _lm_step(u, u_prev, f, k, scale, relu, noise_std, backend, *, with_shortcut: bool):
    k = _check_inputs(u, u_prev, f, k, scale, relu, noise_std)
    u = handoff.take(u)  # the previous step's output as its own autograd input, if it was handed off
    backend = _choose_backend(backend, u.device.type)
    seed = None
    if noise_std > 0:
        seed = torch.randint(0, 2**62, (1,), device=u.device, dtype=torch.int64)
    args = (u, u_prev, f, k, scale, seed, relu, float(noise_std))
    needs_grad = torch.is_grad_enabled() and (
        u.requires_grad or u_prev.requires_grad or k.requires_grad or (f is not None and f.requires_grad)
    )
    if needs_grad and not torch.compiler.is_compiling():
        if with_shortcut and u.requires_grad:  # (a u without gradient is its own shortcut)
            out, shortcut = _EagerLMStep.apply(*args, backend, True)
            return out, carry(u, shortcut)
        out = _EagerLMStep.apply(*args, backend, False)
    else:
        out = _FORWARD_OPS[backend](*args)
    return (out, u) if with_shortcut else out
