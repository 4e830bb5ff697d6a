"""The batch-norm-fused LM step (DESIGN.md 1b): the post-activation junction in one pass each way.

In a post-activation block (torchvision's Bottleneck) the branch ends in a BatchNorm whose output feeds the
update directly. Fused, that output f and its gradient are never written or read:

    out = act((1 - k) * u + k * u_prev + s * BN(x) + noise_std * xi),     BN = F.batch_norm semantics

(the LM update of Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks*, ICML 2018, eq. (5), with the
stochastic depth and noise of their section 3). In training the batch statistics are computed first (one
read of x, deterministic per-channel sums, the running statistics updated in place as F.batch_norm does, all
in one kernel); in evaluation the running statistics are folded into a per-channel affine. The backward
reduces the per-channel sums of the BN gradient and grad_k in one pass over g, x and the ReLU's 1-bit mask
(u, u_prev for grad_k), then writes grad_x, grad_u and grad_u_prev in a second. Without u and u_prev (the
no-state mode) the same kernels are ``batch_norm_relu``, for the BatchNorm + ReLU pairs inside a branch. The
``return_shortcut`` option returns u as a second output for the next step's u_prev and adds its gradient into
grad_u in the backward kernel (gradient pass-through).

Each backend is four ops in the ``lmfused`` namespace, one kernel launch each, and nothing computes between
them (a junction's forward and backward: 4 launches, + 1 for the noise seed)::

    lmfused::batch_norm_stats_<backend>(x, running_mean!?, running_var!?, training, momentum, eps)
                                          -> (mean, invstd)                  compute dtype
    lmfused::batch_norm_lm_step_<backend>(x, mean, invstd, weight?, bias?, u?, u_prev?, k, scale?, seed?,
                                          training, relu, noise_std, write_mask) -> (out, mask)
    lmfused::batch_norm_lm_step_<backend>_backward_reduce(grad_out, grad_handoff?, x, mean, invstd, weight?,
                                          bias?, u?, u_prev?, k, mask?, scale?, relu, need_k)
                                          -> (sum dy, sum dy xhat, grad_k in k's shape)
    lmfused::batch_norm_lm_step_<backend>_backward(grad_out, grad_handoff?, grad_shortcut?, x, mean, invstd,
                                          weight?, bias?, sum_dy, sum_dy_xhat, mask?, k, scale?, training,
                                          relu, need_x, need_u, need_u_prev) -> (grad_x, grad_u, grad_u_prev)

The output's gradient is ``grad_out + grad_handoff``: with the states the forward also hands its output to
the next step as a tensor of its own (:mod:`lmfused.handoff`), whose gradient arrives apart and is added in
registers by both backward passes (None: grad_out alone).

The ReLU's mask: with the states, a 1-bit mask of the stored output written by the forward
(:func:`mask_shape`; 1/16 of a bf16 tensor's bytes, where reading out back would cost all of them, and it
cannot disagree with the forward, which wrote it); without them (``batch_norm_relu``), recomputed from x by
the forward's own operation order and rounded to x's dtype.

``mean`` and ``invstd`` are constants to autograd: in training they are x's own batch statistics, and the
backward's grad_x includes their dependence on x (the full batch-norm gradient). ``training`` is read by the
autograd formula only (which grad_x formula); the forward kernels compute the same either way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor

from lmfused import handoff, reference
from lmfused.op_support import (
    call_op,
    channel_view,
    check_like,
    check_step_inputs,
    check_tensor,
    choose_backend,
    empty_in_layout,
    passes_gradients,
    plan_layout,
    register_op,
    result_in_layout,
    to_layout,
    triton_import_error,
    zero_gradient_like,
)
from lmfused.rebuild import carry, mark, save_state, saved_state
from lmfused.reference import compute_dtype

__all__ = [
    "BatchNormBackwardArgs",
    "BatchNormBackwardReduceArgs",
    "BatchNormForwardArgs",
    "BatchNormStatsArgs",
    "batch_norm",
    "batch_norm_lm_step",
    "batch_norm_relu",
    "has_backend",
]

STATS_SCHEMA = (
    "(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
    "float eps) -> (Tensor, Tensor)"
)
FORWARD_SCHEMA = (
    "(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? u, Tensor? u_prev, "
    "Tensor k, Tensor? scale, Tensor? seed, bool training, bool relu, float noise_std, bool write_mask) "
    "-> (Tensor, Tensor)"
)
REDUCE_SCHEMA = (
    "(Tensor grad_out, Tensor? grad_handoff, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
    "Tensor? bias, Tensor? u, Tensor? u_prev, Tensor k, Tensor? mask, Tensor? scale, bool relu, bool need_k) "
    "-> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor? grad_handoff, Tensor? grad_shortcut, Tensor x, Tensor mean, Tensor invstd, "
    "Tensor? weight, Tensor? bias, Tensor sum_dy, Tensor sum_dy_xhat, Tensor? mask, Tensor k, Tensor? scale, "
    "bool training, bool relu, bool need_x, bool need_u, bool need_u_prev) -> (Tensor, Tensor, Tensor)"
)
GRADIENTS = ("x", "weight", "bias", "u", "u_prev", "k")  # the order of ``needs`` and of the gradients


# ----------------------------------------------------------------------------------------------------------
# The operands of each pass: one record per op (fields in its schema's order), built once by the registered
# op from its arguments and passed whole to the backend's function.
# ----------------------------------------------------------------------------------------------------------


class BatchNormStatsArgs(NamedTuple):
    """The statistics pass (``lmfused::batch_norm_stats_<backend>``)."""

    x: Tensor
    running_mean: Tensor | None  # (C,), updated in place in training; None with running_var
    running_var: Tensor | None
    training: bool  # batch statistics of x, else the running statistics (x not read)
    momentum: float
    eps: float


class BatchNormForwardArgs(NamedTuple):
    """The forward pass (``lmfused::batch_norm_lm_step_<backend>``)."""

    x: Tensor
    mean: Tensor  # (C,) compute dtype, from the statistics pass
    invstd: Tensor
    weight: Tensor | None
    bias: Tensor | None
    u: Tensor | None  # None with u_prev: the no-state mode (batch_norm_relu, batch_norm)
    u_prev: Tensor | None
    k: Tensor
    scale: Tensor | None
    seed: Tensor | None
    training: bool  # read by the autograd formula only
    relu: bool
    noise_std: float
    write_mask: bool  # also write the ReLU's 1-bit mask of the output (:func:`mask_shape`)


class BatchNormBackwardReduceArgs(NamedTuple):
    """The backward's reduction pass (``lmfused::batch_norm_lm_step_<backend>_backward_reduce``)."""

    grad_out: Tensor
    grad_handoff: Tensor | None  # the gradient of the output handed to the next step, added to grad_out
    x: Tensor
    mean: Tensor
    invstd: Tensor
    weight: Tensor | None
    bias: Tensor | None
    u: Tensor | None  # required when need_k
    u_prev: Tensor | None
    k: Tensor
    mask: Tensor | None  # the forward's ReLU mask; None: recomputed from x (the no-state mode)
    scale: Tensor | None
    relu: bool
    need_k: bool

    LIKE_GRAD_OUT = ("grad_handoff", "x", "u", "u_prev")  # (checked by the op, op_support._taking_record)


class BatchNormBackwardArgs(NamedTuple):
    """The backward pass that writes the activation gradients
    (``lmfused::batch_norm_lm_step_<backend>_backward``)."""

    grad_out: Tensor
    grad_handoff: Tensor | None  # as for the reduction pass
    grad_shortcut: Tensor | None  # the gradient of the step's shortcut output, added into grad_u unmasked
    x: Tensor
    mean: Tensor
    invstd: Tensor
    weight: Tensor | None
    bias: Tensor | None
    sum_dy: Tensor  # the reduction pass's sums (read in training only)
    sum_dy_xhat: Tensor
    mask: Tensor | None
    k: Tensor
    scale: Tensor | None
    training: bool
    relu: bool
    need_x: bool
    need_u: bool
    need_u_prev: bool

    LIKE_GRAD_OUT = ("grad_handoff", "grad_shortcut", "x")  # (checked by the op, op_support._taking_record)


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dim but the channel dim (1): what batch norm reduces over."""
    return [0, *range(2, x.dim())]


def mask_shape(like: Tensor) -> tuple[int, int]:
    """Shape of the ReLU's 1-bit mask over ``like``: (rows, ceil(row_len / 8)) bytes of the 2-D view of
    ``lmfused.op_support.plan_layout(like)``; bit j % 8 of byte [r, j // 8] is element (r, j)."""
    plan = plan_layout(like)
    return int(plan.rows), -(-int(plan.row_len) // 8)


def _rows_view(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` as the (rows, row_len) matrix of the planned layout, in memory order."""
    t = to_layout(t, channels_last)
    if channels_last and t.dim() > 2:
        t = t.permute(0, *range(2, t.dim()), 1)
    return t.reshape(-1, t.shape[-1] if channels_last else math.prod(t.shape[2:]))


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_mask(passes: Tensor) -> Tensor:
    """The 1-bit mask of a boolean tensor laid out as the activation it belongs to (see :func:`mask_shape`):
    padding bits 0."""
    plan = plan_layout(passes)
    rows = _rows_view(passes, plan.channels_last)
    padded = rows.new_zeros((rows.shape[0], mask_shape(passes)[1] * 8))
    padded[:, : rows.shape[1]] = rows
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=passes.device)
    return (padded.view(rows.shape[0], -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_mask(mask: Tensor, like: Tensor) -> Tensor:
    """The boolean tensor (shape of ``like``) whose bits :func:`pack_mask` packed."""
    plan = plan_layout(like)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    bits = (mask.unsqueeze(-1) & weights) != 0
    rows = bits.reshape(mask.shape[0], -1)[:, : int(plan.row_len)]
    if not plan.channels_last:
        return rows.reshape(like.shape)
    if like.dim() == 2:
        return rows.reshape(like.shape)
    last = rows.reshape(like.shape[0], *like.shape[2:], like.shape[1])
    return last.permute(0, last.dim() - 1, *range(1, last.dim() - 1))


def _empty_mask(like: Tensor) -> Tensor:
    return like.new_empty((0,), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# Reference backend: the maths of DESIGN.md 1b in float32 (float64 for float64 inputs); the kernels' oracle.
# ----------------------------------------------------------------------------------------------------------


def reference_stats(args: BatchNormStatsArgs) -> tuple[Tensor, Tensor]:
    """Per-channel mean and invstd = 1 / sqrt(var + eps) in the compute dtype: in training of x (biased
    variance), the running statistics updated in place as F.batch_norm does (r = (1 - momentum) r +
    momentum stat, the variance unbiased); in evaluation of the running statistics (x not read)."""
    x, running_mean, running_var, eps = args.x, args.running_mean, args.running_var, args.eps
    cd = compute_dtype(x.dtype)
    channels = x.shape[1]
    if not args.training:
        return running_mean.to(cd, copy=True), torch.rsqrt(running_var.to(cd) + eps)
    if x.numel() == 0:  # as F.batch_norm: nothing to average, running statistics untouched
        return x.new_zeros((channels,), dtype=cd), x.new_full((channels,), 1 / math.sqrt(1 + eps), dtype=cd)
    xc = x.to(cd)
    mean = xc.mean(_reduce_dims(x))
    var = (xc - channel_view(mean, xc)).square().mean(_reduce_dims(x))
    if running_mean is not None:
        count = x.numel() // channels
        unbiased = var * (count / (count - 1))
        for running, stat in ((running_mean, mean), (running_var, unbiased)):
            running.copy_((1 - args.momentum) * running.to(cd) + args.momentum * stat)
    return mean, torch.rsqrt(var + eps)


def _normalized(x: Tensor, mean: Tensor, invstd: Tensor, cd: torch.dtype) -> Tensor:
    return (x.to(cd) - channel_view(mean.to(cd), x)) * channel_view(invstd.to(cd), x)


def reference_forward(args: BatchNormForwardArgs) -> tuple[Tensor, Tensor]:
    """Forward of the ``reference`` backend: y = (x - mean) * invstd * weight + bias, then the LM update
    (without u and u_prev, the no-state mode: act(s * y + noise)); with ``write_mask`` also the ReLU's
    1-bit mask of the stored output (NOT out <= 0, see :func:`pack_mask`)."""
    x, u, u_prev, k = args.x, args.u, args.u_prev, args.k
    y = _batch_norm_output(x, args.mean, args.invstd, args.weight, args.bias, compute_dtype(x.dtype))
    if u is None:  # (1 - k) * 0 + k * 0 + s * y: the update's arithmetic with zero states
        u = u_prev = torch.zeros_like(x)
        k = torch.zeros_like(k)
    step = reference.LMStepForwardArgs(u, u_prev, y, k, args.scale, args.seed, args.relu, args.noise_std)
    out = reference.reference_forward(step)
    return out, pack_mask(~(out <= 0)) if args.write_mask else _empty_mask(out)


def _batch_norm_output(x, mean, invstd, weight, bias, cd: torch.dtype) -> Tensor:
    """y = (x - mean) * invstd * weight + bias per channel, in the compute dtype ``cd``."""
    y = _normalized(x, mean, invstd, cd)
    if weight is not None:
        y = y * channel_view(weight.to(cd), y)
    if bias is not None:
        y = y + channel_view(bias.to(cd), y)
    return y


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum(_reduce_dims(t))


def _masked_gradient(args: BatchNormBackwardReduceArgs | BatchNormBackwardArgs, cd: torch.dtype) -> Tensor:
    """The output gradient (grad_out + grad_handoff, added in the compute dtype) through the ReLU, as
    torch.relu's backward: 0 where out <= 0 (NaN passes).

    With a mask (the forward's, of its stored output) its bits; without one (the no-state mode,
    ``batch_norm_relu``) the sign of the forward's pre-activation s * BN(x), recomputed and rounded to x's
    dtype (the output's sign: rounding is monotone and keeps 0)."""
    grad_out, grad_handoff, x = args.grad_out, args.grad_handoff, args.x
    g = grad_out.to(cd) if grad_handoff is None else grad_out.to(cd) + grad_handoff.to(cd)
    if not args.relu:
        return g
    if args.mask is not None:  # x has the planned layout of u, which the mask follows
        passes = unpack_mask(args.mask, x)
    else:
        y = _batch_norm_output(x, args.mean, args.invstd, args.weight, args.bias, cd)
        passes = ~(_branch_gradient(y, args.scale).to(x.dtype) <= 0)
    return torch.where(passes, g, torch.zeros((), dtype=cd, device=g.device))


def _branch_gradient(g: Tensor, scale: Tensor | None) -> Tensor:
    """dy = s * g: the gradient of the batch norm's output."""
    return g if scale is None else scale.to(g.dtype).reshape((-1,) + (1,) * (g.dim() - 1)) * g


def reference_backward_reduce(args: BatchNormBackwardReduceArgs) -> tuple[Tensor, Tensor, Tensor]:
    """First backward pass: per-channel sums of dy and dy * xhat, and (``need_k``) of g * (u_prev - u)
    reduced to k's shape ((1,): over the channels too), where g is the output gradient through the ReLU
    (:func:`_masked_gradient`), dy = s * g and xhat = (x - mean) * invstd (compute dtype)."""
    cd = compute_dtype(args.grad_out.dtype)
    g = _masked_gradient(args, cd)
    dy = _branch_gradient(g, args.scale)
    sum_dy_xhat = _channel_sum(dy * _normalized(args.x, args.mean, args.invstd, cd))
    grad_k = g.new_empty((0,))
    if args.need_k:
        if args.u is None or args.u_prev is None:
            raise ValueError("u, u_prev: required when the gradient of k is needed")
        grad_k = _channel_sum(g * (args.u_prev.to(cd) - args.u.to(cd)))
        if args.k.numel() == 1:
            grad_k = grad_k.sum().reshape(1)
    return _channel_sum(dy), sum_dy_xhat, grad_k


def reference_backward(args: BatchNormBackwardArgs) -> tuple[Tensor, Tensor, Tensor]:
    """Second backward pass: grad_x = w invstd (dy - sum(dy) / n - xhat sum(dy xhat) / n) in training (n
    values per channel; the batch statistics' own gradient included), w invstd dy in evaluation; grad_u =
    (1 - k) g (+ grad_shortcut, the gradient of the step's shortcut output, unmasked), grad_u_prev = k g.
    Unneeded gradients come back empty."""
    grad_out, x, grad_shortcut = args.grad_out, args.x, args.grad_shortcut
    cd = compute_dtype(grad_out.dtype)
    g = _masked_gradient(args, cd)
    grad_x = grad_u = grad_u_prev = None
    if args.need_x:
        dy = _branch_gradient(g, args.scale)
        if args.training:
            count = x.numel() // x.shape[1]
            xhat = _normalized(x, args.mean, args.invstd, cd)
            mean_dy, mean_dy_xhat = args.sum_dy.to(cd) / count, args.sum_dy_xhat.to(cd) / count
            dy = dy - channel_view(mean_dy, dy) - xhat * channel_view(mean_dy_xhat, dy)
        gain = args.invstd.to(cd) * (args.weight.to(cd) if args.weight is not None else 1.0)
        grad_x = result_in_layout(dy * channel_view(gain, dy), x, x.dtype)
    kc = channel_view(args.k.to(cd), g)
    if args.need_u:
        grad_u = (1 - kc) * g if grad_shortcut is None else (1 - kc) * g + grad_shortcut.to(cd)
        grad_u = result_in_layout(grad_u, x, grad_out.dtype)
    if args.need_u_prev:
        grad_u_prev = result_in_layout(kc * g, x, grad_out.dtype)
    return tuple(t if t is not None else grad_out.new_empty((0,)) for t in (grad_x, grad_u, grad_u_prev))


# ----------------------------------------------------------------------------------------------------------
# Fake implementations and autograd, shared by every backend.
# ----------------------------------------------------------------------------------------------------------


def _fake_stats(x, running_mean, running_var, training, momentum, eps):
    channels = x.shape[1]
    cd = compute_dtype(x.dtype)
    return x.new_empty((channels,), dtype=cd), x.new_empty((channels,), dtype=cd)


def _fake_forward(
    x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, noise_std, write_mask
):
    like = u if u is not None else x
    out = empty_in_layout(like.shape, plan_layout(like).channels_last, dtype=like.dtype, device=like.device)
    return out, like.new_empty(mask_shape(like) if write_mask else (0,), dtype=torch.uint8)


def _fake_reduce(
    grad_out, grad_handoff, x, mean, invstd, weight, bias, u, u_prev, k, mask, scale, relu, need_k
):
    cd = compute_dtype(grad_out.dtype)
    channels = (x.shape[1],)
    grad_k = x.new_empty(tuple(k.shape) if need_k else (0,), dtype=cd)
    return x.new_empty(channels, dtype=cd), x.new_empty(channels, dtype=cd), grad_k


def _fake_backward(
    grad_out, grad_handoff, grad_shortcut, x, mean, invstd, weight, bias, sum_dy, sum_dy_xhat, mask, k, scale,
    training, relu, need_x, need_u, need_u_prev,
):  # fmt: skip
    layout = plan_layout(x).channels_last

    def grad(needed: bool) -> Tensor:  # unneeded: a fresh empty tensor each (outputs must not alias)
        if not needed:
            return grad_out.new_empty((0,))
        return empty_in_layout(x.shape, layout, dtype=grad_out.dtype, device=x.device)

    return grad(need_x), grad(need_u), grad(need_u_prev)


_INPUT_POSITIONS = {"x": 0, "weight": 3, "bias": 4, "u": 5, "u_prev": 6, "k": 7}


def _setup_context(ctx, inputs, output) -> None:
    x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, noise_std, write_mask = inputs
    needs = [bool(ctx.needs_input_grad[_INPUT_POSITIONS[name]]) for name in GRADIENTS]
    needs[1] = needs[1] and weight is not None
    needs[2] = needs[2] and bias is not None
    ctx.flags = (training, relu, needs, bias.dtype if bias is not None else None, u is not None)
    # With the states the ReLU's mask is the forward's 1-bit mask (out is never kept); without them (the
    # no-state mode) the backward recomputes it from x.
    mask = output[1] if relu and u is not None else None
    # u_prev last: a projected shortcut is saved as what rebuilds it (lmfused.rebuild).
    prev = save_state(ctx, u_prev if needs[5] else None)
    ctx.save_for_backward(x, mean, invstd, weight, bias, u if needs[5] else None, mask, k, scale, *prev)


def _cast(t: Tensor, like: Tensor) -> Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _input_grads(reduce_op, backward_op, ctx, grad_out, grad_shortcut=None, grad_handoff=None) -> tuple:
    """Gradients for every input of the forward op (None where not needed): the reduction pass when a sum
    is needed, then the pass that writes the activation gradients (adding ``grad_shortcut``, the gradient of
    the shortcut output (``return_shortcut``), into grad_u). ``grad_handoff``, the
    gradient of the output handed to the next step (:mod:`lmfused.handoff`), is added to grad_out by both
    passes. No other op: the kernels take the sums, not their means, and every gradient comes out in the
    dtype it is needed in."""
    x, mean, invstd, weight, bias, u, mask, k, scale, *prev = ctx.saved_tensors
    training, relu, needs, bias_dtype, has_state = ctx.flags
    if relu and has_state and (mask is None or mask.numel() == 0):
        raise RuntimeError("mask: the forward was called with write_mask=False, but a gradient is needed")
    need_x, need_weight, need_bias, need_u, need_u_prev, need_k = needs
    grad_weight = grad_bias = grad_k = None
    sum_dy = sum_dy_xhat = mean  # stand-ins, not read outside training
    if need_weight or need_bias or need_k or (need_x and training):
        u_prev = saved_state(ctx, tuple(prev))  # (rebuilt here when it was not kept, dropped after)
        reduce_args = (grad_out, grad_handoff, x, mean, invstd, weight, bias, u, u_prev, k, mask, scale, relu,
                       need_k)  # fmt: skip
        sum_dy, sum_dy_xhat, grad_k = call_op(reduce_op, *reduce_args)
        del u_prev, reduce_args
        grad_weight = _cast(sum_dy_xhat, weight) if need_weight else None
        grad_bias = sum_dy.to(bias_dtype) if need_bias and sum_dy.dtype != bias_dtype else sum_dy
        grad_bias = grad_bias if need_bias else None
        grad_k = _cast(grad_k, k) if need_k else None
    grad_x = grad_u = grad_u_prev = None
    if need_x or need_u or need_u_prev:
        grads = call_op(backward_op, grad_out, grad_handoff, grad_shortcut, x, mean, invstd, weight, bias,
                        sum_dy, sum_dy_xhat, mask, k, scale, training, relu, need_x, need_u,
                        need_u_prev)  # fmt: skip
        wanted = (need_x, need_u, need_u_prev)
        grad_x, grad_u, grad_u_prev = (g if n else None for g, n in zip(grads, wanted, strict=True))
    constants = (None,) * 6  # scale, seed, training, relu, noise_std, write_mask
    return (grad_x, None, None, grad_weight, grad_bias, grad_u, grad_u_prev, grad_k) + constants


def is_forward_op(op: object) -> bool:
    """True for the forward op (``lmfused::batch_norm_lm_step_<backend>``) of any backend, as torch.compile's
    selective checkpointing policies see it (an OpOverload): the op whose output a recompute rebuilds from
    the statistics and x."""
    schema = getattr(op, "_schema", None)
    name = getattr(schema, "name", "")
    return name.startswith("lmfused::batch_norm_lm_step_") and not name.endswith(("_backward", "_reduce"))


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------


_RECORDS = (BatchNormStatsArgs, BatchNormForwardArgs, BatchNormBackwardReduceArgs, BatchNormBackwardArgs)


def _register(backend: str, implementations: tuple[Callable, ...] | None) -> tuple[Callable, ...]:
    """Define the four ops of ``backend`` (statistics, forward, backward reduction, backward) with their
    fake implementations, and the forward's autograd. ``implementations`` None: the kernels are registered
    from C++ (``TORCH_LIBRARY_IMPL(lmfused, CUDA, ...)`` in csrc/), only the schemas are defined here."""
    step = f"batch_norm_lm_step_{backend}"
    names = (f"batch_norm_stats_{backend}", step, f"{step}_backward_reduce", f"{step}_backward")
    schemas = (STATS_SCHEMA, FORWARD_SCHEMA, REDUCE_SCHEMA, BACKWARD_SCHEMA)
    fakes = (_fake_stats, _fake_forward, _fake_reduce, _fake_backward)
    ops = []
    for i, (name, schema, fake, record) in enumerate(zip(names, schemas, fakes, _RECORDS, strict=True)):
        implementation = implementations[i] if implementations is not None else None
        mutates = ("running_mean", "running_var") if i == 0 else ()
        ops.append(register_op(backend, name, schema, implementation, fake, record, mutates))
    _, _, reduce_op, backward_op = ops
    torch.library.register_autograd(
        f"lmfused::{names[1]}",
        lambda ctx, grad_out, grad_mask: _input_grads(reduce_op, backward_op, ctx, grad_out),
        setup_context=_setup_context,
    )
    return tuple(ops)


def _triton_implementations() -> tuple[Callable, ...] | None:
    if triton_import_error() is not None:  # (the backend's unavailability says why)
        return None
    from lmfused.triton_kernels import batch_norm_lm_step as kernels

    return (
        kernels.batch_norm_stats_triton,
        kernels.batch_norm_lm_step_forward_triton,
        kernels.batch_norm_lm_step_backward_reduce_triton,
        kernels.batch_norm_lm_step_backward_triton,
    )


_IMPLEMENTATIONS: dict[str, tuple[Callable, ...] | None] = {
    "reference": (reference_stats, reference_forward, reference_backward_reduce, reference_backward),
    "cuda": None,  # from C++ (csrc/batch_norm_lm_step_binding.cpp)
}
if (_TRITON := _triton_implementations()) is not None:
    _IMPLEMENTATIONS["triton"] = _TRITON
_OPS: dict[str, tuple[Callable, ...]] = {
    name: _register(name, impl) for name, impl in _IMPLEMENTATIONS.items()
}


def _backend(backend: str | None, device_type: str) -> str:
    """lm_step's choice: the argument, $LMFUSED_BACKEND, else the fastest for the device (reference on
    CPU); every lm_step backend has this op too."""
    chosen = choose_backend(backend, device_type)
    if chosen not in _OPS:  # only if a backend's registration failed at import
        raise RuntimeError(f"backend: batch_norm_lm_step has no {chosen!r} backend (it has {list(_OPS)})")
    return chosen


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
    check_tensor(name, t)
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name}: expected shape (C,) = ({x.shape[1]},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (the device of x), got {t.device}")


def _check_batch_norm_args(x, running_mean, running_var, weight, bias, u, training, momentum, eps) -> None:
    """Validate the batch-norm half of the arguments (the LM half goes through lm_step's checks)."""
    check_like("x", x, u)
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


class _EagerBatchNormStep(torch.autograd.Function):
    """The registered autograd formula applied directly (as lm_step's ``_EagerLMStep``), optionally with the
    shortcut output of the gradient pass-through (see :func:`lmfused.lm_step`) and with
    the output's handoff to the next step (:mod:`lmfused.handoff`). Outputs: out, then the shortcut (if
    ``with_shortcut``), then the handoff (if ``with_handoff``)."""

    @staticmethod
    def forward(ctx, backend, with_shortcut, with_handoff, needs_input_grad, *inputs):
        out, mask = call_op(_OPS[backend][1], *inputs)  # grad mode is off here: straight to the backend
        ctx.needs_input_grad = needs_input_grad  # of the op's inputs, as _setup_context reads them
        _setup_context(ctx, inputs, (out, mask))
        ctx.backend, ctx.with_shortcut, ctx.with_handoff = backend, with_shortcut, with_handoff
        ctx.zero_grad_out = zero_gradient_like(out)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: nothing to add
        outputs = (out, inputs[5]) if with_shortcut else (out,)
        # The handoff: out's memory as a second output, not a view of out (no reference back to it).
        outputs += (out.detach(),) if with_handoff else ()
        return outputs if len(outputs) > 1 else out

    @staticmethod
    def backward(ctx, grad_out, *more):
        grad_shortcut = more[0] if ctx.with_shortcut else None
        grad_handoff = more[-1] if ctx.with_handoff else None
        if grad_out is None:  # only the handoff was used, or nothing
            grad_out, grad_handoff = grad_handoff, None
        grad_out = ctx.zero_grad_out() if grad_out is None else grad_out
        _, _, reduce_op, backward_op = _OPS[ctx.backend]
        grads = _input_grads(reduce_op, backward_op, ctx, grad_out, grad_shortcut, grad_handoff)
        return (None, None, None, None) + grads


def _batch_norm_step(
    x, running_mean, running_var, weight, bias, u, u_prev, k, training, momentum, eps, scale, relu, noise_std,
    backend, return_shortcut,
):  # fmt: skip
    """Validate, compute the statistics (training) and run the forward op, through the eager autograd
    Function when a gradient is needed outside torch.compile."""
    if u is None:  # no-state mode (batch_norm_relu): validate as a step of x on zero states
        check_step_inputs(x, x, None, k, scale, relu, noise_std)
    else:
        k = check_step_inputs(u, u_prev, None, k, scale, relu, noise_std)
        u = handoff.take(u)  # the previous step's output as its own autograd input, if it was handed off
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, x if u is None else u, training,
                           momentum, eps)  # fmt: skip
    backend = _backend(backend, x.device.type)
    stats_op, forward_op, *_ = _OPS[backend]
    if u is not None:  # every pass then walks one layout, the one the ReLU's mask is laid out in
        x = to_layout(x, plan_layout(u).channels_last)  # (no copy when x already has it, as in the models)
    with torch.no_grad():  # mean and invstd are constants to autograd (grad_x includes their gradient)
        mean, invstd = call_op(stats_op, x, running_mean, running_var, training, float(momentum), float(eps))
    seed = None
    if noise_std > 0:
        seed = torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
    args = (x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, training, relu, float(noise_std))
    needs = tuple(isinstance(t, Tensor) and t.requires_grad for t in args)
    grad_needed = torch.is_grad_enabled() and any(needs)
    # The backward of a step with states reads the ReLU's mask from the forward's 1-bit mask, not from out.
    inputs = (*args, relu and u is not None and grad_needed)
    if grad_needed and not torch.compiler.is_compiling():
        # (a u without gradient, or with LMFUSED_GRADIENT_PASSTHROUGH=0, is its own shortcut)
        with_shortcut_output = return_shortcut and u.requires_grad and passes_gradients()
        with_handoff = u is not None and handoff.offers()
        outputs = _EagerBatchNormStep.apply(backend, with_shortcut_output, with_handoff, needs, *inputs)
        out = outputs[0] if with_shortcut_output or with_handoff else outputs
        if with_handoff:
            handoff.offer(out, outputs[-1])
        if with_shortcut_output:
            return out, carry(u, outputs[1])
        if u is None and not relu and scale is None and noise_std == 0:  # a plain batch norm: rebuildable
            mark(
                out,
                (x, mean, invstd, weight, bias),
                functools.partial(_rebuild_batch_norm, backend, training),
            )
    else:
        out = call_op(forward_op, *inputs)[0]
    return (out, u) if return_shortcut else out


def _rebuild_batch_norm(backend, training, x, mean, invstd, weight, bias) -> Tensor:
    """The output of :func:`batch_norm` again, by the same kernel from the same inputs (lmfused.rebuild)."""
    k = x.new_empty((1,), dtype=torch.float32)  # never read without states
    args = (x, mean, invstd, weight, bias, None, None, k, None, None, training, False, 0.0, False)
    return call_op(_OPS[backend][1], *args)[0]


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
    return_shortcut: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Batch norm of the branch's last convolution fused into the LM step (DESIGN.md 1b).

    The same as ``lm_step(u, u_prev, F.batch_norm(x, running_mean, running_var, weight, bias, training,
    momentum, eps), k, scale=scale, relu=relu, noise_std=noise_std)``, running statistics included, without
    writing or reading the batch norm's output and its gradient.

    Args:
        x: the branch's last convolution output, same shape, dtype and device as ``u``.
        running_mean, running_var: (C,) running statistics, updated in place in training (momentum as in
            F.batch_norm; the variance unbiased); both None to use batch statistics only (training only).
        weight, bias: (C,) affine parameters of the batch norm, or None.
        u, u_prev, k, scale, relu, noise_std, backend, return_shortcut: as for :func:`lmfused.lm_step` (with
            ``return_shortcut``: ``(out, shortcut)``, the gradient pass-through between steps).
        training: batch statistics (and running-statistics update) if True, the running statistics if False.
        momentum, eps: as for F.batch_norm.

    Returns:
        The updated state, same shape, dtype and layout as ``u`` (and the shortcut, with
        ``return_shortcut``). In training with gradients the output is also handed to the next step as an
        autograd tensor of its own (:mod:`lmfused.handoff`).
    """
    if not isinstance(u, Tensor):
        raise TypeError(f"u: expected a torch.Tensor, got {type(u).__name__}")
    if not isinstance(return_shortcut, bool):
        raise TypeError(f"return_shortcut: expected a bool, got {type(return_shortcut).__name__}")
    return _batch_norm_step(x, running_mean, running_var, weight, bias, u, u_prev, k, training, momentum, eps,
                            scale, relu, noise_std, backend, return_shortcut)  # fmt: skip


def batch_norm_relu(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str | None = None,
) -> Tensor:
    """``relu(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``, running
    statistics included, as the same kernels as :func:`batch_norm_lm_step` without the states.

    For the batch norms inside a residual branch (BN, ReLU, then the next convolution). The backward
    recomputes the ReLU's mask from x, so it reads only the output gradient and x: 8 passes over a tensor
    of x's size per training step (statistics; normalise; two backward passes over the gradient and x,
    one writing grad_x) against 10 for a batch norm and a separate ReLU, as ``python -m bench.traffic``
    counts them.

    Args:
        x: (N, C, *spatial) input, float16/bfloat16/float32/float64, contiguous or channels_last.
        running_mean, running_var, weight, bias, training, momentum, eps: as for F.batch_norm.
        backend: as for :func:`lmfused.lm_step`.

    Returns:
        relu(BN(x)), same shape, dtype and layout as ``x``.
    """
    return _no_state_step(x, running_mean, running_var, weight, bias, training, momentum, eps, True, backend)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str | None = None,
) -> Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)`` by the kernels of
    :func:`batch_norm_relu` without the ReLU, for a projection shortcut's BatchNorm.

    Its output can be rebuilt, bitwise, from what its own backward keeps (x and the statistics): a step
    that takes it as u_prev saves nothing more for it (:mod:`lmfused.rebuild`), where a plain ResNet keeps
    nothing either.

    Args and returns: as :func:`batch_norm_relu`, without the ReLU.
    """
    return _no_state_step(x, running_mean, running_var, weight, bias, training, momentum, eps, False, backend)


def _no_state_step(x, running_mean, running_var, weight, bias, training, momentum, eps, relu, backend):
    check_tensor("x", x)
    k = x.new_empty((1,), dtype=torch.float32)  # never read without states; the op's schema takes one
    return _batch_norm_step(x, running_mean, running_var, weight, bias, None, None, k, training, momentum,
                            eps, None, relu, 0.0, backend, return_shortcut=False)  # fmt: skip
