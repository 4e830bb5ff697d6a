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

from collections.abc import Callable

import torch
from torch import Tensor

from lmfused import handoff
from lmfused.op_support import (
    BACKENDS,
    available_backends,
    call_op,
    check_step_inputs,
    choose_backend,
    empty_in_layout,
    passes_gradients,
    plan_layout,
    register_op,
    triton_import_error,
    zero_gradient_like,
)
from lmfused.rebuild import carry, save_state, saved_state
from lmfused.reference import LMStepBackwardArgs, LMStepForwardArgs, reference_backward, reference_forward

__all__ = ["BACKENDS", "available_backends", "lm_step"]

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
    ``grad_shortcut``: the gradient of the shortcut output (:func:`lm_step` with ``return_shortcut``),
    added into grad_u by the backward kernel."""
    u, out, k, scale, *prev = ctx.saved_tensors
    u_prev = saved_state(ctx, tuple(prev))
    relu, need_u, need_u_prev, need_f, need_k = ctx.flags
    args = (grad_out, grad_shortcut, u, u_prev, out, k, scale, relu, need_u, need_u_prev, need_f, need_k)
    grads = call_op(backward_op, *args)
    needed = (need_u, need_u_prev, need_f, need_k)
    return tuple(g if n else None for g, n in zip(grads, needed, strict=True))


def _autograd_backward(backward_op) -> Callable:
    def backward(ctx, grad_out):
        return _input_grads(backward_op, ctx, grad_out) + (None,) * 4  # scale, seed, relu, noise_std

    return backward


class _EagerLMStep(torch.autograd.Function):
    """The registered autograd formula (same context, same backward op) applied directly, for eager calls.

    torch.library's generic autograd wrapper rebuilds the argument list from the schema on every call, a
    noticeable part of the host time of one lm_step; this path skips it. Under torch.compile ``lm_step`` calls
    the registered op, whose autograd registration below is the same formula.

    With ``with_shortcut`` it also returns u itself (as a view) as the step's shortcut, which the next step
    takes as its u_prev: the gradient that step sends to u_prev then arrives here as the shortcut's gradient
    and the backward kernel adds it into grad_u, instead of autograd adding two full-size gradients in a
    separate kernel (gradient pass-through, see :func:`lm_step`).
    """

    @staticmethod
    def forward(ctx, u, u_prev, f, k, scale, seed, relu, noise_std, backend, with_shortcut):
        inputs = (u, u_prev, f, k, scale, seed, relu, noise_std)
        out = call_op(_FORWARD_OPS[backend], *inputs)  # grad mode is off here: straight to the backend
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


def _triton_implementations() -> tuple[Callable, Callable] | None:
    if triton_import_error() is not None:  # (the backend's unavailability says why)
        return None
    from lmfused.triton_kernels import lm_step as kernels

    return kernels.lm_step_forward_triton, kernels.lm_step_backward_triton


def _register(backend: str, implementations: tuple[Callable, Callable] | None) -> tuple[Callable, Callable]:
    """Define lmfused::lm_step_<backend> and its backward (``implementations`` None: kernels registered
    from C++), with fake and autograd registrations. The implementations take one record each,
    :class:`LMStepForwardArgs` / :class:`LMStepBackwardArgs`, built by the op from its arguments."""
    forward, backward = implementations if implementations is not None else (None, None)
    name = f"lm_step_{backend}"
    forward_op = register_op(backend, name, FORWARD_SCHEMA, forward, _fake_forward, LMStepForwardArgs)
    backward_op = register_op(
        backend, f"{name}_backward", BACKWARD_SCHEMA, backward, _fake_backward, LMStepBackwardArgs
    )
    torch.library.register_autograd(
        f"lmfused::{name}", _autograd_backward(backward_op), setup_context=_setup_context
    )
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
    return_shortcut: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
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
        return_shortcut: also return the shortcut the next step takes as its ``u_prev``, with the gradient
            pass-through between steps (below).

    Returns:
        The updated state, same shape and dtype as ``u`` (channels-last stays channels-last); with
        ``return_shortcut``, ``(out, shortcut)``, the shortcut having u's values.

    Gradient pass-through. In a chain of steps u_n feeds two updates: its own (as u) and the next one's (as
    u_prev). Given u itself, autograd writes both gradients and then adds them in a separate kernel (read 2,
    write 1). The shortcut is a view of u whose gradient comes back to this step's backward kernel, which
    adds it into grad_u as it writes it: per step 2 X less traffic (X = the bytes of u), as ``python -m
    bench.traffic`` counts. Values and gradients are the same. Under torch.compile, without gradients, and
    with ``LMFUSED_GRADIENT_PASSTHROUGH=0`` the shortcut is u itself (Inductor fuses the addition its own
    way).
    """
    if not isinstance(return_shortcut, bool):
        raise TypeError(f"return_shortcut: expected a bool, got {type(return_shortcut).__name__}")
    k = check_step_inputs(u, u_prev, f, k, scale, relu, noise_std)
    u = handoff.take(u)  # the previous step's output as its own autograd input, if it was handed off
    backend = choose_backend(backend, u.device.type)
    seed = None
    if noise_std > 0:
        seed = torch.randint(0, 2**62, (1,), device=u.device, dtype=torch.int64)
    args = (u, u_prev, f, k, scale, seed, relu, float(noise_std))
    needs_grad = torch.is_grad_enabled() and (
        u.requires_grad or u_prev.requires_grad or k.requires_grad or (f is not None and f.requires_grad)
    )
    if needs_grad and not torch.compiler.is_compiling():
        if return_shortcut and u.requires_grad and passes_gradients():  # (else u is its own shortcut)
            out, shortcut = _EagerLMStep.apply(*args, backend, True)
            return out, carry(u, shortcut)
        out = _EagerLMStep.apply(*args, backend, False)
    else:
        out = call_op(_FORWARD_OPS[backend], *args)
    return (out, u) if return_shortcut else out
