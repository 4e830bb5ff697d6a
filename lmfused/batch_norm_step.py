"""The batch-norm-fused LM step (DESIGN.md 1b): the post-activation junction in one pass each way.

In a post-activation block (torchvision's Bottleneck) the branch ends in a BatchNorm whose output feeds the
update directly. Fused, that output f and its gradient are never written or read:

    out = act((1 - k) * u + k * u_prev + s * BN(x) + noise_std * xi),     BN = F.batch_norm semantics

(the LM update of Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks*, ICML 2018, eq. (5), with the
stochastic depth and noise of their section 3). In training the batch statistics are computed first (one
read of x, deterministic per-channel sums) and the running statistics updated in place as F.batch_norm does;
in evaluation the running statistics are folded into a per-channel affine. The backward reduces the
per-channel sums of the BN gradient and grad_k in one pass over g, out, x (and u, u_prev for grad_k), then
writes grad_x, grad_u and grad_u_prev in a second.

Each backend is a pair of ops in the ``lmfused`` namespace (statistics, forward, backward)::

    lmfused::batch_norm_stats_<backend>(x) -> (mean, var)                    biased variance, compute dtype
    lmfused::batch_norm_lm_step_<backend>(x, mean, invstd, weight?, bias?, u, u_prev, k, scale?, seed?,
                                          training, relu, noise_std) -> out
    lmfused::batch_norm_lm_step_<backend>_backward(grad_out, x, mean, invstd, weight?, u?, u_prev?, out?, k,
                                          scale?, training, relu, needs[6]) -> 6 gradients

``mean`` and ``invstd`` are constants to autograd: in training they are x's own batch statistics, and the
backward's grad_x includes their dependence on x (the full batch-norm gradient).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from numbers import Real

import torch
from torch import Tensor

import lmfused.ops as _lm_step_ops
from lmfused._layout import empty_in_layout, plan_layout
from lmfused.ops import (
    _check_inputs,
    _check_tensor,
    _choose_backend,
    _triton_traceable,
    available_backends,
)
from lmfused.reference import _channel_view, _in_layout, _noise, compute_dtype, lm_step_eager

__all__ = ["batch_norm_lm_step"]

STATS_SCHEMA = "(Tensor x) -> (Tensor, Tensor)"
FORWARD_SCHEMA = (
    "(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor u, Tensor u_prev, Tensor k, "
    "Tensor? scale, Tensor? seed, bool training, bool relu, float noise_std) -> Tensor"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? u, Tensor? u_prev, "
    "Tensor? out, Tensor k, Tensor? scale, bool training, bool relu, bool[6] needs) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
GRADIENTS = ("x", "weight", "bias", "u", "u_prev", "k")  # the order of ``needs`` and of the gradients


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dim but the channel dim (1): what batch norm reduces over."""
    return [0, *range(2, x.dim())]


# ----------------------------------------------------------------------------------------------------------
# Reference backend: the maths of DESIGN.md 1b in float32 (float64 for float64 inputs); the kernels' oracle.
# ----------------------------------------------------------------------------------------------------------


def reference_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` over (N, *spatial), in the compute dtype."""
    xc = x.to(compute_dtype(x.dtype))
    mean = xc.mean(_reduce_dims(x))
    var = (xc - _channel_view(mean, xc)).square().mean(_reduce_dims(x))
    return mean, var


def _normalized(x: Tensor, mean: Tensor, invstd: Tensor, cd: torch.dtype) -> Tensor:
    return (x.to(cd) - _channel_view(mean.to(cd), x)) * _channel_view(invstd.to(cd), x)


def reference_forward(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    u: Tensor,
    u_prev: Tensor,
    k: Tensor,
    scale: Tensor | None,
    seed: Tensor | None,
    training: bool,
    relu: bool,
    noise_std: float,
) -> Tensor:
    """Forward of the ``reference`` backend: y = (x - mean) * invstd * weight + bias, then the LM update."""
    cd = compute_dtype(u.dtype)
    y = _normalized(x, mean, invstd, cd)
    if weight is not None:
        y = y * _channel_view(weight.to(cd), y)
    if bias is not None:
        y = y + _channel_view(bias.to(cd), y)
    noise = None
    if noise_std > 0.0:
        if seed is None:
            raise ValueError("seed: an int64 tensor is required when noise_std > 0")
        noise = noise_std * _noise(seed, u, cd)
    out = lm_step_eager(
        u.to(cd),
        u_prev.to(cd),
        y,
        k.to(cd),
        scale=None if scale is None else scale.to(cd),
        relu=relu,
        noise=noise,
    )
    return _in_layout(out, u, u.dtype)


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum(_reduce_dims(t))


def reference_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    u: Tensor | None,
    u_prev: Tensor | None,
    out: Tensor | None,
    k: Tensor,
    scale: Tensor | None,
    training: bool,
    relu: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of the ``reference`` backend; gradients in ``GRADIENTS`` order, unneeded ones empty.

    With g the output gradient (masked by the ReLU as torch.relu's backward masks it), dy = s * g and
    xhat = (x - mean) * invstd: grad_weight = sum dy * xhat, grad_bias = sum dy, and grad_x = w * invstd * dy
    in evaluation, w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) in training (the batch statistics'
    own gradient included); grad_u = (1 - k) g, grad_u_prev = k g, grad_k = sum g * (u_prev - u).
    """
    need_x, need_weight, need_bias, need_u, need_u_prev, need_k = needs
    cd = compute_dtype(grad_out.dtype)
    g = grad_out.to(cd)
    if relu:
        if out is None:
            raise ValueError("out: the forward output is required when relu=True")
        g = torch.where(out <= 0, torch.zeros((), dtype=cd, device=g.device), g)

    def nothing() -> Tensor:  # an unneeded gradient: a fresh empty tensor (outputs must not alias)
        return grad_out.new_empty((0,))

    dy = g if scale is None else scale.to(cd).reshape((-1,) + (1,) * (g.dim() - 1)) * g
    xhat = _normalized(x, mean, invstd, cd)
    sum_dy = _channel_sum(dy)
    sum_dy_xhat = _channel_sum(dy * xhat)
    grad_weight = sum_dy_xhat.to(weight.dtype) if need_weight and weight is not None else nothing()
    grad_bias = sum_dy.to(weight.dtype if weight is not None else torch.float32) if need_bias else nothing()
    grad_x = nothing()
    if need_x:
        gain = invstd.to(cd) * (weight.to(cd) if weight is not None else 1.0)
        if training:
            count = x.numel() // x.shape[1]
            dy = dy - _channel_view(sum_dy / count, dy) - xhat * _channel_view(sum_dy_xhat / count, dy)
        grad_x = _in_layout(dy * _channel_view(gain, dy), x, x.dtype)
    kc = _channel_view(k.to(cd), g)
    grad_u = _in_layout((1 - kc) * g, x, grad_out.dtype) if need_u else nothing()
    grad_u_prev = _in_layout(kc * g, x, grad_out.dtype) if need_u_prev else nothing()
    grad_k = k.new_empty((0,))
    if need_k:
        if u is None or u_prev is None:
            raise ValueError("u, u_prev: required when the gradient of k is needed")
        prod = g * (u_prev.to(cd) - u.to(cd))
        grad_k = (
            (prod.sum() if k.numel() == 1 else _channel_sum(prod)).reshape(k.shape).to(k.dtype, copy=True)
        )
    return grad_x, grad_weight, grad_bias, grad_u, grad_u_prev, grad_k


# ----------------------------------------------------------------------------------------------------------
# Fake implementations and autograd, shared by every backend.
# ----------------------------------------------------------------------------------------------------------


def _fake_stats(x):
    channels = x.shape[1]
    cd = compute_dtype(x.dtype)
    return x.new_empty((channels,), dtype=cd), x.new_empty((channels,), dtype=cd)


def _fake_forward(x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, noise_std):
    return empty_in_layout(u.shape, plan_layout(u).channels_last, dtype=u.dtype, device=u.device)


def _fake_backward(grad_out, x, mean, invstd, weight, u, u_prev, out, k, scale, training, relu, needs):
    layout = plan_layout(x).channels_last

    def nothing() -> Tensor:  # an unneeded gradient: a fresh empty tensor (outputs must not alias)
        return grad_out.new_empty((0,))

    def activation(needed: bool, dtype: torch.dtype) -> Tensor:
        return empty_in_layout(x.shape, layout, dtype=dtype, device=x.device) if needed else nothing()

    need_x, need_weight, need_bias, need_u, need_u_prev, need_k = needs
    affine_dtype = weight.dtype if weight is not None else torch.float32
    return (
        activation(need_x, x.dtype),
        weight.new_empty(weight.shape) if need_weight and weight is not None else nothing(),
        grad_out.new_empty((x.shape[1],), dtype=affine_dtype) if need_bias else nothing(),
        activation(need_u, grad_out.dtype),
        activation(need_u_prev, grad_out.dtype),
        torch.empty_like(k) if need_k else k.new_empty((0,)),
    )


_INPUT_POSITIONS = {"x": 0, "weight": 3, "bias": 4, "u": 5, "u_prev": 6, "k": 7}


def _setup_context(ctx, inputs, output) -> None:
    x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, noise_std = inputs
    needs = [bool(ctx.needs_input_grad[_INPUT_POSITIONS[name]]) for name in GRADIENTS]
    needs[1] = needs[1] and weight is not None
    needs[2] = needs[2] and bias is not None
    ctx.flags = (training, relu, needs)
    ctx.save_for_backward(
        x, mean, invstd, weight, u if needs[5] else None, u_prev if needs[5] else None,
        output if relu else None, k, scale,
    )  # fmt: skip


def _input_grads(backward_op, ctx, grad_out) -> tuple:
    """Gradients for every input of the forward op, None where not needed."""
    x, mean, invstd, weight, u, u_prev, out, k, scale = ctx.saved_tensors
    training, relu, needs = ctx.flags
    grads = backward_op(grad_out, x, mean, invstd, weight, u, u_prev, out, k, scale, training, relu, needs)
    grads = [g if needed else None for g, needed in zip(grads, needs, strict=True)]
    grad_x, grad_weight, grad_bias, grad_u, grad_u_prev, grad_k = grads
    # x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, noise_std
    return (
        grad_x,
        None,
        None,
        grad_weight,
        grad_bias,
        grad_u,
        grad_u_prev,
        grad_k,
        None,
        None,
        None,
        None,
        None,
    )


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------


def _register(backend: str, stats: Callable, forward: Callable, backward: Callable) -> tuple[Callable, ...]:
    """Define lmfused::batch_norm_stats_<backend>, lmfused::batch_norm_lm_step_<backend> and its backward."""
    make = torch.library.custom_op
    if backend == "triton" and _triton_traceable():
        make = torch.library.triton_op
    ops = []
    for name, schema, impl, fake in (
        (f"lmfused::batch_norm_stats_{backend}", STATS_SCHEMA, stats, _fake_stats),
        (f"lmfused::batch_norm_lm_step_{backend}", FORWARD_SCHEMA, forward, _fake_forward),
        (f"lmfused::batch_norm_lm_step_{backend}_backward", BACKWARD_SCHEMA, backward, _fake_backward),
    ):
        op = make(name, mutates_args=(), schema=schema)(impl)
        torch.library.register_fake(name, fake)
        ops.append(op)
    stats_op, forward_op, backward_op = ops
    torch.library.register_autograd(
        f"lmfused::batch_norm_lm_step_{backend}",
        lambda ctx, grad_out: _input_grads(backward_op, ctx, grad_out),
        setup_context=_setup_context,
    )
    return stats_op, forward_op, backward_op


def _triton_implementations() -> tuple[Callable, Callable, Callable] | None:
    if _lm_step_ops._TRITON is None:  # triton missing: lm_step's registration recorded why
        return None
    from lmfused.triton_kernels import batch_norm_lm_step as kernels

    return (
        kernels.batch_norm_stats_triton,
        kernels.batch_norm_lm_step_forward_triton,
        kernels.batch_norm_lm_step_backward_triton,
    )


_IMPLEMENTATIONS = {"reference": (reference_stats, reference_forward, reference_backward)}
if (_TRITON := _triton_implementations()) is not None:
    _IMPLEMENTATIONS["triton"] = _TRITON
_OPS: dict[str, tuple[Callable, ...]] = {
    name: _register(name, *impl) for name, impl in _IMPLEMENTATIONS.items()
}


def _backend(backend: str | None, device_type: str) -> str:
    """lm_step's choice (argument, $LMFUSED_BACKEND, fastest available); by default only among the backends
    this op has, asked for by name an error that says which it has."""
    if backend is None and not os.environ.get("LMFUSED_BACKEND"):
        return next(b for b in available_backends(device_type) if b in _OPS)
    chosen = _choose_backend(backend, device_type)
    if chosen not in _OPS:
        raise RuntimeError(f"backend: batch_norm_lm_step has no {chosen!r} backend (it has {list(_OPS)})")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _check_channel_vector(name: str, t: object, x: Tensor) -> None:
    if t is None:
        return
    _check_tensor(name, t)
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name}: expected shape (C,) = ({x.shape[1]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")


def _check_batch_norm_args(x, running_mean, running_var, weight, bias, u, training, momentum, eps) -> None:
    """Validate the batch-norm half of the arguments (the LM half goes through lm_step's checks)."""
    _check_tensor("x", x)
    if x.shape != u.shape:
        raise ValueError(f"x: expected shape {tuple(u.shape)} (the shape of u), got {tuple(x.shape)}")
    if x.dtype != u.dtype:
        raise TypeError(f"x: expected dtype {u.dtype} (the dtype of u), got {x.dtype}")
    if x.device != u.device:
        raise ValueError(f"x: expected device {u.device} (the device of u), got {x.device}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):  # fmt: skip
        _check_channel_vector(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both tensors or both None")
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError("running_mean: required in evaluation (training=False)")
    if training and x.numel() // max(x.shape[1], 1) == 1:
        raise ValueError(
            f"x: expected more than 1 value per channel when training, got shape {tuple(x.shape)}"
        )
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise TypeError(f"{name}: expected a finite real number, got {value!r}")
    if eps <= 0:
        raise ValueError(f"eps: expected a number > 0, got {eps}")


def batch_norm_lm_step(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    u: Tensor,
    u_prev: Tensor,
    k: Tensor,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    scale: Tensor | None = None,
    relu: bool = False,
    noise_std: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """Batch norm of the branch's last convolution fused into the LM step (DESIGN.md 1b).

    The same as ``lm_step(u, u_prev, F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps), k, scale=scale, relu=relu, noise_std=noise_std)``, running statistics included, without
    writing or reading the batch norm's output and its gradient.

    Args:
        x: the branch's last convolution output, same shape, dtype and device as ``u``.
        running_mean, running_var: (C,) running statistics, updated in place in training (momentum as in
            F.batch_norm; the variance unbiased); both None to use batch statistics only (training only).
        weight, bias: (C,) affine parameters of the batch norm, or None.
        u, u_prev, k, scale, relu, noise_std, backend: as for :func:`lmfused.lm_step`.
        training: batch statistics (and running-statistics update) if True, the running statistics if False.
        momentum, eps: as for F.batch_norm.

    Returns:
        The updated state, same shape, dtype and layout as ``u``.
    """
    k = _check_inputs(u, u_prev, None, k, scale, relu, noise_std)
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, u, training, momentum, eps)
    backend = _backend(backend, u.device.type)
    stats_op, forward_op, _ = _OPS[backend]
    cd = compute_dtype(x.dtype)
    if training and x.numel() == 0:  # as F.batch_norm: an empty result, running statistics untouched
        mean, var = x.new_zeros((x.shape[1],), dtype=cd), x.new_ones((x.shape[1],), dtype=cd)
    elif training:
        with torch.no_grad():
            mean, var = stats_op(x)
            if running_mean is not None:
                count = x.numel() // x.shape[1]
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (count / (count - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    else:
        mean, var = running_mean.detach().to(cd), running_var.detach().to(cd)
    invstd = torch.rsqrt(var + eps)
    seed = None
    if noise_std > 0:
        seed = torch.randint(0, 2**62, (1,), device=u.device, dtype=torch.int64)
    return forward_op(
        x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, float(noise_std)
    )
