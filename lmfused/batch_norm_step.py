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

Each backend is four ops in the ``lmfused`` namespace, one kernel pass each::

    lmfused::batch_norm_stats_<backend>(x) -> (mean, var)                    biased variance, compute dtype
    lmfused::batch_norm_lm_step_<backend>(x, mean, invstd, weight?, bias?, u, u_prev, k, scale?, seed?,
                                          training, relu, noise_std) -> out
    lmfused::batch_norm_lm_step_<backend>_backward_reduce(grad_out, x, mean, invstd, u?, u_prev?, out?,
                                          scale?, relu, need_k) -> (sum dy, sum dy xhat, grad_k per channel)
    lmfused::batch_norm_lm_step_<backend>_backward(grad_out, x, mean, invstd, weight?, mean_dy, mean_dy_xhat,
                                          out?, k, scale?, training, relu, need_x, need_u, need_u_prev)
                                          -> (grad_x, grad_u, grad_u_prev)

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
from lmfused import reference
from lmfused._layout import empty_in_layout, plan_layout
from lmfused.ops import (
    _check_inputs,
    _check_tensor,
    _choose_backend,
    _triton_traceable,
    available_backends,
)
from lmfused.reference import _channel_view, _in_layout, compute_dtype

__all__ = ["batch_norm_lm_step", "has_backend"]

STATS_SCHEMA = "(Tensor x) -> (Tensor, Tensor)"
FORWARD_SCHEMA = (
    "(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor u, Tensor u_prev, Tensor k, "
    "Tensor? scale, Tensor? seed, bool training, bool relu, float noise_std) -> Tensor"
)
REDUCE_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? u, Tensor? u_prev, Tensor? out, "
    "Tensor? scale, bool relu, bool need_k) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor mean_dy, "
    "Tensor mean_dy_xhat, Tensor? out, Tensor k, Tensor? scale, bool training, bool relu, bool need_x, "
    "bool need_u, bool need_u_prev) -> (Tensor, Tensor, Tensor)"
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
    return reference.reference_forward(u, u_prev, y, k, scale, seed, relu, noise_std)


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum(_reduce_dims(t))


def _masked_gradient(grad_out: Tensor, out: Tensor | None, relu: bool, cd: torch.dtype) -> Tensor:
    """The output gradient through the ReLU, as torch.relu's backward: 0 where out <= 0 (NaN passes)."""
    g = grad_out.to(cd)
    if not relu:
        return g
    if out is None:
        raise ValueError("out: the forward output is required when relu=True")
    return torch.where(out <= 0, torch.zeros((), dtype=cd, device=g.device), g)


def _branch_gradient(g: Tensor, scale: Tensor | None) -> Tensor:
    """dy = s * g: the gradient of the batch norm's output."""
    return g if scale is None else scale.to(g.dtype).reshape((-1,) + (1,) * (g.dim() - 1)) * g


def reference_backward_reduce(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    u: Tensor | None,
    u_prev: Tensor | None,
    out: Tensor | None,
    scale: Tensor | None,
    relu: bool,
    need_k: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """First backward pass: per-channel sums of dy, dy * xhat and (``need_k``) g * (u_prev - u), where g is
    the output gradient through the ReLU, dy = s * g and xhat = (x - mean) * invstd (compute dtype)."""
    cd = compute_dtype(grad_out.dtype)
    g = _masked_gradient(grad_out, out, relu, cd)
    dy = _branch_gradient(g, scale)
    sum_dy_xhat = _channel_sum(dy * _normalized(x, mean, invstd, cd))
    grad_k = g.new_empty((0,))
    if need_k:
        if u is None or u_prev is None:
            raise ValueError("u, u_prev: required when the gradient of k is needed")
        grad_k = _channel_sum(g * (u_prev.to(cd) - u.to(cd)))
    return _channel_sum(dy), sum_dy_xhat, grad_k


def reference_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
    out: Tensor | None,
    k: Tensor,
    scale: Tensor | None,
    training: bool,
    relu: bool,
    need_x: bool,
    need_u: bool,
    need_u_prev: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Second backward pass: grad_x = w invstd (dy - mean(dy) - xhat mean(dy xhat)) in training (the batch
    statistics' own gradient included), w invstd dy in evaluation; grad_u = (1 - k) g, grad_u_prev = k g.
    Unneeded gradients come back empty."""
    cd = compute_dtype(grad_out.dtype)
    g = _masked_gradient(grad_out, out, relu, cd)
    grad_x = grad_u = grad_u_prev = None
    if need_x:
        dy = _branch_gradient(g, scale)
        if training:
            xhat = _normalized(x, mean, invstd, cd)
            dy = dy - _channel_view(mean_dy.to(cd), dy) - xhat * _channel_view(mean_dy_xhat.to(cd), dy)
        gain = invstd.to(cd) * (weight.to(cd) if weight is not None else 1.0)
        grad_x = _in_layout(dy * _channel_view(gain, dy), x, x.dtype)
    kc = _channel_view(k.to(cd), g)
    if need_u:
        grad_u = _in_layout((1 - kc) * g, x, grad_out.dtype)
    if need_u_prev:
        grad_u_prev = _in_layout(kc * g, x, grad_out.dtype)
    return tuple(t if t is not None else grad_out.new_empty((0,)) for t in (grad_x, grad_u, grad_u_prev))


# ----------------------------------------------------------------------------------------------------------
# Fake implementations and autograd, shared by every backend.
# ----------------------------------------------------------------------------------------------------------


def _fake_stats(x):
    channels = x.shape[1]
    cd = compute_dtype(x.dtype)
    return x.new_empty((channels,), dtype=cd), x.new_empty((channels,), dtype=cd)


def _fake_forward(x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, noise_std):
    return empty_in_layout(u.shape, plan_layout(u).channels_last, dtype=u.dtype, device=u.device)


def _fake_reduce(grad_out, x, mean, invstd, u, u_prev, out, scale, relu, need_k):
    cd = compute_dtype(grad_out.dtype)
    channels = (x.shape[1],)
    grad_k = x.new_empty(channels if need_k else (0,), dtype=cd)
    return x.new_empty(channels, dtype=cd), x.new_empty(channels, dtype=cd), grad_k


def _fake_backward(
    grad_out, x, mean, invstd, weight, mean_dy, mean_dy_xhat, out, k, scale, training, relu, need_x, need_u,
    need_u_prev,
):  # fmt: skip
    layout = plan_layout(x).channels_last

    def grad(needed: bool) -> Tensor:  # unneeded: a fresh empty tensor each (outputs must not alias)
        if not needed:
            return grad_out.new_empty((0,))
        return empty_in_layout(x.shape, layout, dtype=grad_out.dtype, device=x.device)

    return grad(need_x), grad(need_u), grad(need_u_prev)


_INPUT_POSITIONS = {"x": 0, "weight": 3, "bias": 4, "u": 5, "u_prev": 6, "k": 7}


def _setup_context(ctx, inputs, output) -> None:
    x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, noise_std = inputs
    needs = [bool(ctx.needs_input_grad[_INPUT_POSITIONS[name]]) for name in GRADIENTS]
    needs[1] = needs[1] and weight is not None
    needs[2] = needs[2] and bias is not None
    ctx.flags = (training, relu, needs, bias.dtype if bias is not None else None)
    ctx.save_for_backward(
        x, mean, invstd, weight, u if needs[5] else None, u_prev if needs[5] else None,
        output if relu else None, k, scale,
    )  # fmt: skip


def _input_grads(reduce_op, backward_op, ctx, grad_out) -> tuple:
    """Gradients for every input of the forward op (None where not needed): the reduction pass when a sum
    is needed, then the pass that writes the activation gradients."""
    x, mean, invstd, weight, u, u_prev, out, k, scale = ctx.saved_tensors
    training, relu, needs, bias_dtype = ctx.flags
    need_x, need_weight, need_bias, need_u, need_u_prev, need_k = needs
    grad_weight = grad_bias = grad_k = None
    mean_dy = mean_dy_xhat = mean
    if need_weight or need_bias or need_k or (need_x and training):
        sum_dy, sum_dy_xhat, per_channel_k = reduce_op(grad_out, x, mean, invstd, u, u_prev, out, scale, relu,
                                                       need_k)  # fmt: skip
        count = x.numel() // x.shape[1]
        mean_dy, mean_dy_xhat = sum_dy / count, sum_dy_xhat / count
        grad_weight = sum_dy_xhat.to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(bias_dtype) if need_bias else None
        if need_k:
            grad_k = (per_channel_k.sum() if k.numel() == 1 else per_channel_k).reshape(k.shape).to(k.dtype)
    grad_x = grad_u = grad_u_prev = None
    if need_x or need_u or need_u_prev:
        grads = backward_op(grad_out, x, mean, invstd, weight, mean_dy, mean_dy_xhat, out, k, scale, training,
                            relu, need_x, need_u, need_u_prev)  # fmt: skip
        wanted = (need_x, need_u, need_u_prev)
        grad_x, grad_u, grad_u_prev = (g if n else None for g, n in zip(grads, wanted, strict=True))
    constants = (None,) * 5  # scale, seed, training, relu, noise_std
    return (grad_x, None, None, grad_weight, grad_bias, grad_u, grad_u_prev, grad_k) + constants


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------


def _register(backend: str, implementations: tuple[Callable, ...]) -> tuple[Callable, ...]:
    """Define the four ops of ``backend`` (statistics, forward, backward reduction, backward) with their
    fake implementations, and the forward's autograd."""
    make = torch.library.custom_op
    if backend == "triton" and _triton_traceable():
        make = torch.library.triton_op
    step = f"batch_norm_lm_step_{backend}"
    names = (f"batch_norm_stats_{backend}", step, f"{step}_backward_reduce", f"{step}_backward")
    schemas = (STATS_SCHEMA, FORWARD_SCHEMA, REDUCE_SCHEMA, BACKWARD_SCHEMA)
    fakes = (_fake_stats, _fake_forward, _fake_reduce, _fake_backward)
    ops = []
    for name, schema, impl, fake in zip(names, schemas, implementations, fakes, strict=True):
        ops.append(make(f"lmfused::{name}", mutates_args=(), schema=schema)(impl))
        torch.library.register_fake(f"lmfused::{name}", fake)
    _, _, reduce_op, backward_op = ops
    torch.library.register_autograd(
        f"lmfused::{names[1]}",
        lambda ctx, grad_out: _input_grads(reduce_op, backward_op, ctx, grad_out),
        setup_context=_setup_context,
    )
    return tuple(ops)


def _triton_implementations() -> tuple[Callable, ...] | None:
    if _lm_step_ops._TRITON is None:  # triton missing: lm_step's registration recorded why
        return None
    from lmfused.triton_kernels import batch_norm_lm_step as kernels

    return (
        kernels.batch_norm_stats_triton,
        kernels.batch_norm_lm_step_forward_triton,
        kernels.batch_norm_lm_step_backward_reduce_triton,
        kernels.batch_norm_lm_step_backward_triton,
    )


_IMPLEMENTATIONS = {
    "reference": (reference_stats, reference_forward, reference_backward_reduce, reference_backward)
}
if (_TRITON := _triton_implementations()) is not None:
    _IMPLEMENTATIONS["triton"] = _TRITON
_OPS: dict[str, tuple[Callable, ...]] = {
    name: _register(name, impl) for name, impl in _IMPLEMENTATIONS.items()
}


def _backend(backend: str | None, device_type: str) -> str:
    """lm_step's choice (the argument, $LMFUSED_BACKEND, else the fastest for the device: reference on CPU);
    a default this op lacks (cuda) falls to the next available; one asked for by name is an error that
    says which backends it has."""
    chosen = _choose_backend(backend, device_type)
    if chosen in _OPS:
        return chosen
    if backend is None and not os.environ.get("LMFUSED_BACKEND"):
        return next(b for b in available_backends(device_type) if b in _OPS)
    raise RuntimeError(f"backend: batch_norm_lm_step has no {chosen!r} backend (it has {list(_OPS)})")


def has_backend(backend: str | None, device_type: str) -> bool:
    """Whether batch_norm_lm_step runs on ``device_type`` with ``backend`` (None: the default choice)."""
    try:
        _backend(backend, device_type)
    except (RuntimeError, ValueError, StopIteration):
        return False
    return True


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
    stats_op, forward_op, *_ = _OPS[backend]
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
