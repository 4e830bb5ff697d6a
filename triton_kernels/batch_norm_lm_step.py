"""Triton kernels of the batch-norm-fused LM step (DESIGN.md 1b) and their launchers.

Four kernels over the same [BLOCK_M, BLOCK_L] tiles of ``lmfused._layout``'s 2-D view as the LM step's:

* ``batch_norm_stats_kernel``: per-channel partial sums of (x - c) and (x - c)^2, c = the channel's first
  element (a shift that keeps the variance free of cancellation when the mean is large);
* ``batch_norm_lm_step_forward_kernel``: out = act((1 - k) u + k u_prev + s ((x - mean) gain + bias) + noise),
  or without u and u_prev (the no-state mode: a branch's own batch norm + ReLU) act(s (...) + noise);
* ``batch_norm_lm_step_backward_reduce_kernel``: per-channel partial sums of dy, dy * xhat and
  g * (u_prev - u), where g is the output gradient masked by the ReLU and dy = s g;
* ``batch_norm_lm_step_backward_kernel``: grad_x, grad_u (plus the shortcut output's gradient) and
  grad_u_prev from those sums.

The ReLU's mask comes from out, or (noise-free calls) from the forward's pre-activation recomputed by the same
code and rounded to x's dtype, which has out's sign: in the no-state mode from x (the backward reads only
grad_out and x), and in the reduction of a step that reads u and u_prev for grad_k anyway from x, u, u_prev
and k (one tensor fewer than also reading out).

Partial sums are written per tile and channel (channels-first: one per row and column block; channels-last:
one per row block and column) and summed by one torch reduction in a fixed order: no atomics, the same inputs
give bitwise the same results. The tile shape is the LM step's, a fixed function of the shape.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from lmfused.triton_kernels.lm_step import _acc, _aligned, _cdiv, _launcher
from torch import Tensor

from lmfused._layout import Plan, empty_in_layout, plan_layout, to_layout

__all__ = [
    "batch_norm_lm_step_backward_reduce_triton",
    "batch_norm_lm_step_backward_triton",
    "batch_norm_lm_step_forward_triton",
    "batch_norm_stats_triton",
]


@triton.jit
def _tile(pid, M, L, num_l_blocks, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """Block indices, rows, columns, element offsets (int64) and bounds masks of this program's tile."""
    pid_m = pid // num_l_blocks
    pid_l = pid % num_l_blocks
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < M
    col_ok = cols < L
    offs = rows[:, None] * L + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    return pid_m, pid_l, rows, cols, row_ok, col_ok, offs, mask


@triton.jit
def _per_channel(ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST: tl.constexpr, FP64: tl.constexpr):
    """A (C,) vector broadcast to the tile: along the columns (channels-last) or the rows (row m is channel
    m % C)."""
    if CHANNELS_LAST:
        return _acc(tl.load(ptr + cols, mask=col_ok, other=0.0), FP64)[None, :]
    else:
        return _acc(tl.load(ptr + rows % C, mask=row_ok, other=0.0), FP64)[:, None]


@triton.jit
def _coefficient_k(
    k_ptr, rows, cols, row_ok, col_ok, C, PER_CHANNEL_K: tl.constexpr, CHANNELS_LAST: tl.constexpr, FP64
):
    """k broadcastable to the tile: one scalar, or one per channel."""
    if PER_CHANNEL_K:
        return _per_channel(k_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
    else:
        return _acc(tl.load(k_ptr), FP64)


@triton.jit
def _sample_scale(scale_ptr, rows, row_ok, rows_per_sample, FP64: tl.constexpr):
    """The stochastic-depth multiplier of each row's sample, as a column vector."""
    return _acc(tl.load(scale_ptr + rows // rows_per_sample, mask=row_ok, other=0.0), FP64)[:, None]


@triton.jit
def _store_channel_partial(
    partial_ptr, value, pid_m, pid_l, rows, cols, row_ok, col_ok, M, L, CHANNELS_LAST: tl.constexpr
):
    """Sum ``value`` over the tile's positions of each channel; store one partial per channel in the tile."""
    if CHANNELS_LAST:
        tl.store(partial_ptr + pid_m.to(tl.int64) * L + cols, tl.sum(value, axis=0), mask=col_ok)
    else:
        tl.store(partial_ptr + pid_l.to(tl.int64) * M + rows, tl.sum(value, axis=1), mask=row_ok)


@triton.jit
def batch_norm_stats_kernel(
    x_ptr,
    shift_ptr,
    sum_ptr,
    sumsq_ptr,
    M,
    L,
    C,
    num_l_blocks,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Per-channel partial sums of x - shift and (x - shift)^2 on one tile."""
    pid = tl.program_id(0)
    pid_m, pid_l, rows, cols, row_ok, col_ok, offs, mask = _tile(pid, M, L, num_l_blocks, BLOCK_M, BLOCK_L)
    shift = _per_channel(shift_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
    x = _acc(tl.load(x_ptr + offs, mask=mask, other=0.0), FP64)
    centred = tl.where(mask, x - shift, 0.0)
    _store_channel_partial(sum_ptr, centred, pid_m, pid_l, rows, cols, row_ok, col_ok, M, L, CHANNELS_LAST)
    _store_channel_partial(
        sumsq_ptr, centred * centred, pid_m, pid_l, rows, cols, row_ok, col_ok, M, L, CHANNELS_LAST
    )


@triton.jit
def _branch(
    x, mean_ptr, gain_ptr, bias_ptr, scale_ptr, rows, cols, row_ok, col_ok, C, rows_per_sample,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, CHANNELS_LAST: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """s ((x - mean) gain + bias): the batch norm's output as it enters the update. One definition for the
    forward and the backward's recomputed ReLU mask, so that both round it the same way."""
    mean = _per_channel(mean_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
    f = (x - mean) * _per_channel(gain_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
    if HAS_BIAS:
        f += _per_channel(bias_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
    if HAS_SCALE:
        f = f * _sample_scale(scale_ptr, rows, row_ok, rows_per_sample, FP64)
    return f


@triton.jit
def _pre_activation(
    x, u, u_prev, k, mean_ptr, gain_ptr, bias_ptr, scale_ptr, rows, cols, row_ok, col_ok, C, rows_per_sample,
    HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
):  # fmt: skip
    """(1 - k) u + k u_prev + s ((x - mean) gain + bias), or without HAS_STATE s ((x - mean) gain + bias):
    the update before noise and ReLU. One definition (one operation order) for the forward and the
    backward's recomputed ReLU mask, so that both round it the same way."""
    acc = _branch(
        x, mean_ptr, gain_ptr, bias_ptr, scale_ptr, rows, cols, row_ok, col_ok, C, rows_per_sample,
        HAS_BIAS, HAS_SCALE, CHANNELS_LAST, FP64,
    )  # fmt: skip
    if HAS_STATE:
        acc = (1.0 - k) * u + k * u_prev + acc
    return acc


@triton.jit
def batch_norm_lm_step_forward_kernel(
    x_ptr,
    mean_ptr,
    gain_ptr,
    bias_ptr,
    u_ptr,
    u_prev_ptr,
    k_ptr,
    scale_ptr,
    seed_ptr,
    out_ptr,
    M,
    L,
    C,
    rows_per_sample,
    num_l_blocks,
    noise_std,
    HAS_STATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    PER_CHANNEL_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out = act((1 - k) u + k u_prev + s ((x - mean) gain + bias) + noise_std xi) on one tile; with
    HAS_STATE off (the branch's own batch norm + ReLU) act(s ((x - mean) gain + bias) + noise_std xi)."""
    pid = tl.program_id(0)
    _, _, rows, cols, row_ok, col_ok, offs, mask = _tile(pid, M, L, num_l_blocks, BLOCK_M, BLOCK_L)
    x = _acc(tl.load(x_ptr + offs, mask=mask, other=0.0), FP64)
    k = 0.0  # read only with the states
    u = 0.0
    u_prev = 0.0
    if HAS_STATE:
        k = _coefficient_k(k_ptr, rows, cols, row_ok, col_ok, C, PER_CHANNEL_K, CHANNELS_LAST, FP64)
        u = _acc(tl.load(u_ptr + offs, mask=mask, other=0.0), FP64)
        u_prev = _acc(tl.load(u_prev_ptr + offs, mask=mask, other=0.0), FP64)
    acc = _pre_activation(
        x, u, u_prev, k, mean_ptr, gain_ptr, bias_ptr, scale_ptr, rows, cols, row_ok, col_ok, C,
        rows_per_sample, HAS_STATE, HAS_BIAS, HAS_SCALE, CHANNELS_LAST, FP64,
    )  # fmt: skip
    if HAS_NOISE:
        seed = tl.load(seed_ptr)
        acc += noise_std * tl.randn(seed, offs)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_gradient(
    g_ptr, out_ptr, x_ptr, x, u, u_prev, k, mean_ptr, gain_ptr, bias_ptr, scale_ptr, offs, mask, rows, cols,
    row_ok, col_ok, C, rows_per_sample, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr, RELU: tl.constexpr, MASK_FROM_X: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
):  # fmt: skip
    """The output gradient through the ReLU, as torch.relu's backward: 0 where out <= 0 (NaN passes).

    MASK_FROM_X (no noise): out's sign is that of the forward's pre-activation rounded to x's dtype,
    recomputed from the loaded ``x`` (and with HAS_STATE the loaded ``u``, ``u_prev`` and ``k``) by the
    forward's own helper, so out is never read.
    """
    g = _acc(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
    if RELU:
        if MASK_FROM_X:
            pre = _pre_activation(
                x, u, u_prev, k, mean_ptr, gain_ptr, bias_ptr, scale_ptr, rows, cols, row_ok, col_ok, C,
                rows_per_sample, HAS_STATE, HAS_BIAS, HAS_SCALE, CHANNELS_LAST, FP64,
            ).to(x_ptr.dtype.element_ty)  # fmt: skip
        else:
            pre = tl.load(out_ptr + offs, mask=mask, other=0.0)
        g = tl.where(pre <= 0.0, 0.0, g)
    return g


@triton.jit
def batch_norm_lm_step_backward_reduce_kernel(
    g_ptr,
    out_ptr,
    x_ptr,
    u_ptr,
    u_prev_ptr,
    k_ptr,
    mean_ptr,
    invstd_ptr,
    gain_ptr,
    bias_ptr,
    scale_ptr,
    sum_dy_ptr,
    sum_dy_xhat_ptr,
    grad_k_ptr,
    M,
    L,
    C,
    rows_per_sample,
    num_l_blocks,
    HAS_STATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    MASK_FROM_X: tl.constexpr,
    PER_CHANNEL_K: tl.constexpr,
    NEED_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Per-channel partial sums of dy, dy * xhat and (NEED_K) g * (u_prev - u) on one tile. HAS_STATE (with
    RELU and MASK_FROM_X): the recomputed mask's pre-activation includes (1 - k) u + k u_prev."""
    pid = tl.program_id(0)
    pid_m, pid_l, rows, cols, row_ok, col_ok, offs, mask = _tile(pid, M, L, num_l_blocks, BLOCK_M, BLOCK_L)
    x = _acc(tl.load(x_ptr + offs, mask=mask, other=0.0), FP64)
    k = 0.0  # read only where grad_k or the recomputed mask needs them
    u = 0.0
    u_prev = 0.0
    if NEED_K or (RELU and MASK_FROM_X and HAS_STATE):
        u = _acc(tl.load(u_ptr + offs, mask=mask, other=0.0), FP64)
        u_prev = _acc(tl.load(u_prev_ptr + offs, mask=mask, other=0.0), FP64)
    if RELU and MASK_FROM_X and HAS_STATE:
        k = _coefficient_k(k_ptr, rows, cols, row_ok, col_ok, C, PER_CHANNEL_K, CHANNELS_LAST, FP64)
    g = _masked_gradient(
        g_ptr, out_ptr, x_ptr, x, u, u_prev, k, mean_ptr, gain_ptr, bias_ptr, scale_ptr, offs, mask, rows,
        cols, row_ok, col_ok, C, rows_per_sample, HAS_STATE, HAS_BIAS, HAS_SCALE, RELU, MASK_FROM_X,
        CHANNELS_LAST, FP64,
    )  # fmt: skip
    mean = _per_channel(mean_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
    invstd = _per_channel(invstd_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
    dy = g
    if HAS_SCALE:
        dy = g * _sample_scale(scale_ptr, rows, row_ok, rows_per_sample, FP64)
    xhat = (x - mean) * invstd
    _store_channel_partial(sum_dy_ptr, dy, pid_m, pid_l, rows, cols, row_ok, col_ok, M, L, CHANNELS_LAST)
    _store_channel_partial(
        sum_dy_xhat_ptr, dy * xhat, pid_m, pid_l, rows, cols, row_ok, col_ok, M, L, CHANNELS_LAST
    )
    if NEED_K:
        _store_channel_partial(
            grad_k_ptr, g * (u_prev - u), pid_m, pid_l, rows, cols, row_ok, col_ok, M, L, CHANNELS_LAST
        )


@triton.jit
def batch_norm_lm_step_backward_kernel(
    g_ptr,
    grad_shortcut_ptr,
    out_ptr,
    x_ptr,
    mean_ptr,
    invstd_ptr,
    gain_ptr,
    bias_ptr,
    mean_dy_ptr,
    mean_dy_xhat_ptr,
    k_ptr,
    scale_ptr,
    grad_x_ptr,
    grad_u_ptr,
    grad_u_prev_ptr,
    M,
    L,
    C,
    rows_per_sample,
    num_l_blocks,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    MASK_FROM_X: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr,
    TRAINING: tl.constexpr,
    PER_CHANNEL_K: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_U: tl.constexpr,
    NEED_U_PREV: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """grad_x = gain (dy - mean(dy) - xhat mean(dy xhat)) (training; gain dy in evaluation),
    grad_u = (1 - k) g (+ grad_shortcut, unmasked), grad_u_prev = k g, on one tile."""
    pid = tl.program_id(0)
    _, _, rows, cols, row_ok, col_ok, offs, mask = _tile(pid, M, L, num_l_blocks, BLOCK_M, BLOCK_L)
    x = 0.0  # read only where the mask or grad_x needs it
    if (NEED_X and TRAINING) or (RELU and MASK_FROM_X):
        x = _acc(tl.load(x_ptr + offs, mask=mask, other=0.0), FP64)
    # The mask is recomputed only in the no-state mode (from x); with the states this pass gets out.
    g = _masked_gradient(
        g_ptr, out_ptr, x_ptr, x, 0.0, 0.0, 0.0, mean_ptr, gain_ptr, bias_ptr, scale_ptr, offs, mask, rows,
        cols, row_ok, col_ok, C, rows_per_sample, False, HAS_BIAS, HAS_SCALE, RELU, MASK_FROM_X,
        CHANNELS_LAST, FP64,
    )  # fmt: skip
    if HAS_SHORTCUT and NEED_U:  # loaded before the first store (see lm_step's _gradients)
        shortcut = _acc(tl.load(grad_shortcut_ptr + offs, mask=mask, other=0.0), FP64)
    if NEED_X:
        dy = g
        if HAS_SCALE:
            dy = g * _sample_scale(scale_ptr, rows, row_ok, rows_per_sample, FP64)
        gain = _per_channel(gain_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
        if TRAINING:
            mean = _per_channel(mean_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
            invstd = _per_channel(invstd_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
            mean_dy = _per_channel(mean_dy_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
            mean_dy_xhat = _per_channel(mean_dy_xhat_ptr, rows, cols, row_ok, col_ok, C, CHANNELS_LAST, FP64)
            dy = dy - mean_dy - (x - mean) * invstd * mean_dy_xhat
        tl.store(grad_x_ptr + offs, (gain * dy).to(grad_x_ptr.dtype.element_ty), mask=mask)
    if NEED_U or NEED_U_PREV:
        k = _coefficient_k(k_ptr, rows, cols, row_ok, col_ok, C, PER_CHANNEL_K, CHANNELS_LAST, FP64)
        if NEED_U:
            grad_u = (1.0 - k) * g
            if HAS_SHORTCUT:
                grad_u += shortcut  # the gradient of u itself: not masked by the ReLU; one rounding below
            tl.store(grad_u_ptr + offs, grad_u.to(grad_u_ptr.dtype.element_ty), mask=mask)
        if NEED_U_PREV:
            tl.store(grad_u_prev_ptr + offs, (k * g).to(grad_u_prev_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------


_TILE_ELEMENTS = 4096  # elements per program: 8 KiB of bf16 per tensor keeps enough bytes in flight


@functools.lru_cache(maxsize=256)
def _block_shape(channels_last: bool, rows: int, L: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_L, num_warps): a fixed function of the shape, so partial buffers are known up front."""
    if channels_last:
        block_l = min(triton.next_power_of_2(L), _TILE_ELEMENTS)
    else:
        # Rows are spatial planes (3136, 784, 196, 49 in a ResNet): the power of two that wastes the fewest
        # masked lanes, longer rows on ties.
        candidates = [b for b in (32, 64, 128, 256, 512, 1024) if b <= max(32, triton.next_power_of_2(L))]
        block_l = min(candidates, key=lambda b: (_cdiv(L, b) * b, -b))
    block_m = max(1, min(triton.next_power_of_2(rows), _TILE_ELEMENTS // block_l))
    return block_m, block_l, 8 if block_m * block_l >= 4096 else 4


def _tiling(plan: Plan) -> tuple[int, int, int, int, int]:
    """(num_programs, num_l_blocks, BLOCK_M, BLOCK_L, num_warps) of a plan; shapes are specialised."""
    block_m, block_l, num_warps = _block_shape(plan.channels_last, int(plan.rows), int(plan.row_len))
    num_l_blocks = _cdiv(int(plan.row_len), block_l)
    return _cdiv(int(plan.rows), block_m) * num_l_blocks, num_l_blocks, block_m, block_l, num_warps


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _partials(plan: Plan, count: int, like: Tensor) -> list[Tensor]:
    """``count`` partial-sum buffers, one value per channel and tile; ``_channel_totals`` sums them."""
    num_programs, num_l_blocks, *_ = _tiling(plan)
    rows = num_programs // num_l_blocks if plan.channels_last else num_l_blocks
    shape = (rows, plan.row_len) if plan.channels_last else (rows, plan.rows)
    return [torch.empty(shape, dtype=_acc_dtype(like), device=like.device) for _ in range(count)]


def _channel_totals(partial: Tensor, channels: int) -> Tensor:
    """The per-channel totals of a partial buffer: every row holds channel-major runs of C partials."""
    return partial.reshape(-1, channels).sum(0)


def _channel_first_elements(x: Tensor) -> Tensor:
    """x[0, c, 0, ..., 0] for every channel c, in the accumulation dtype: the statistics' shift."""
    return x[(0, slice(None)) + (0,) * (x.dim() - 2)].to(_acc_dtype(x))


def batch_norm_stats_triton(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and invstd (float32; float64 for float64 x), running statistics updated."""
    from lmfused.batch_norm_step import reference_stats

    if not training or x.numel() == 0:
        return reference_stats(x, running_mean, running_var, training, momentum, eps)
    mean, var = _stats(x)
    if running_mean is not None:
        count = x.numel() // x.shape[1]
        for running, stat in ((running_mean, mean), (running_var, var * (count / (count - 1)))):
            running.copy_((1 - momentum) * running.to(mean.dtype) + momentum * stat)
    return mean, torch.rsqrt(var + eps)


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    plan = plan_layout(x)
    # Triton compiles a variant per pointer alignment, whose register layout sets the order of the in-tile
    # sums: a misaligned view (rare) is copied, so the same values always give the same bits.
    x = _aligned(to_layout(x, plan.channels_last))
    shift = _channel_first_elements(x).contiguous()
    num_programs, num_l_blocks, block_m, block_l, num_warps = _tiling(plan)
    sums, sumsqs = _partials(plan, 2, x)
    _launcher(batch_norm_stats_kernel)[(num_programs,)](
        x,
        shift,
        sums,
        sumsqs,
        plan.rows,
        plan.row_len,
        plan.channels,
        num_l_blocks,
        CHANNELS_LAST=plan.channels_last,
        FP64=x.dtype == torch.float64,
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        num_warps=num_warps,
    )
    count = x.numel() // plan.channels
    centred_mean = _channel_totals(sums, plan.channels) / count
    var = (_channel_totals(sumsqs, plan.channels) / count - centred_mean.square()).clamp_min(0.0)
    return shift + centred_mean, var


def _gain(invstd: Tensor, weight: Tensor | None) -> Tensor:
    return invstd if weight is None else invstd * weight.to(invstd.dtype)


def _vector(t: Tensor | None, stand_in: Tensor) -> Tensor:
    """A per-channel or per-sample vector, contiguous and aligned (a parameter may be a view into a larger
    buffer, and the compiled variant, hence the order of the in-tile sums, follows pointer alignment);
    ``stand_in`` for the unused pointer when it is None."""
    return _aligned(t.contiguous()) if t is not None else stand_in


def batch_norm_lm_step_forward_triton(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    u: Tensor | None,
    u_prev: Tensor | None,
    k: Tensor,
    scale: Tensor | None,
    seed: Tensor | None,
    training: bool,
    relu: bool,
    noise_std: float,
    write_mask: bool,
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel; inputs are validated by lmfused.batch_norm_step. The output has u's planned
    layout; without u and u_prev (the no-state mode: act(s BN(x) + noise), k unread) x's."""
    has_state = u is not None
    plan = plan_layout(u if has_state else x)
    x = to_layout(x, plan.channels_last)
    out = empty_in_layout(x.shape, plan.channels_last, dtype=x.dtype, device=x.device)
    from lmfused.batch_norm_step import pack_mask

    if x.numel() == 0:
        return out, pack_mask(out > 0) if write_mask else out.new_empty((0,), dtype=torch.uint8)
    if has_state:
        u, u_prev = to_layout(u, plan.channels_last), to_layout(u_prev, plan.channels_last)
    mean, gain = mean.contiguous(), _gain(invstd, weight).contiguous()
    k = k.contiguous()
    has_noise = noise_std > 0.0
    num_programs, num_l_blocks, block_m, block_l, num_warps = _tiling(plan)
    _launcher(batch_norm_lm_step_forward_kernel)[(num_programs,)](
        x,
        mean,
        gain,
        _vector(bias, mean),  # unused pointers stand in for tensors a variant does not read
        u if has_state else x,
        u_prev if has_state else x,
        k,
        _vector(scale, k),
        seed if has_noise else k,
        out,
        plan.rows,
        plan.row_len,
        plan.channels,
        plan.rows_per_sample,
        num_l_blocks,
        float(noise_std),
        HAS_STATE=has_state,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        RELU=relu,
        HAS_NOISE=has_noise,
        PER_CHANNEL_K=has_state and k.numel() > 1,
        CHANNELS_LAST=plan.channels_last,
        FP64=x.dtype == torch.float64,
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        num_warps=num_warps,
    )
    return out, pack_mask(~(out <= 0)) if write_mask else out.new_empty((0,), dtype=torch.uint8)


def _mask_as_out(mask: Tensor | None, like: Tensor) -> Tensor | None:
    from lmfused.batch_norm_step import unpack_mask

    return None if mask is None else unpack_mask(mask, like).to(like.dtype)


def batch_norm_lm_step_backward_reduce_triton(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    u: Tensor | None,
    u_prev: Tensor | None,
    k: Tensor,
    mask: Tensor | None,
    scale: Tensor | None,
    relu: bool,
    need_k: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the reduction kernel and sum its partials in a fixed order: per-channel sum of dy, of dy * xhat
    and (``need_k``) of g * (u_prev - u). With ``relu`` and no ``out`` (noise-free calls) the ReLU's mask is
    recomputed from x, and u, u_prev and k when given, as the forward computes the pre-activation."""
    out = _mask_as_out(mask, x)
    plan = plan_layout(x)
    layout, channels = plan.channels_last, plan.channels
    g = to_layout(grad_out, layout)
    acc = _acc_dtype(g)
    if g.numel() == 0:
        zeros = [g.new_zeros((channels,), dtype=acc) for _ in range(2)]
        return zeros[0], zeros[1], g.new_zeros(k.shape if need_k else (0,), dtype=acc)
    # Aligned operands (see batch_norm_stats_triton): the sums' bits depend only on the values.
    g, x = _aligned(g), _aligned(to_layout(x, layout))
    mask_from_x = relu and out is None
    mask_from_state = mask_from_x and u is not None  # the pre-activation's state terms: read u, u_prev, k
    out = _aligned(to_layout(out, layout)) if relu and not mask_from_x else g
    read_state = need_k or mask_from_state
    if read_state:
        u, u_prev = _aligned(to_layout(u, layout)), _aligned(to_layout(u_prev, layout))
    mean = _vector(mean, g)
    num_programs, num_l_blocks, block_m, block_l, num_warps = _tiling(plan)
    sum_dy, sum_dy_xhat, grad_k = _partials(plan, 3, g)
    _launcher(batch_norm_lm_step_backward_reduce_kernel)[(num_programs,)](
        g,
        out,
        x,
        u if read_state else g,  # unused pointers stand in for tensors a variant does not read
        u_prev if read_state else g,
        _vector(k, mean) if mask_from_state else mean,
        mean,
        _vector(invstd, mean),
        _vector(_gain(invstd, weight), mean) if mask_from_x else mean,
        _vector(bias, mean),
        _vector(scale, mean),
        sum_dy,
        sum_dy_xhat,
        grad_k,
        plan.rows,
        plan.row_len,
        channels,
        plan.rows_per_sample,
        num_l_blocks,
        HAS_STATE=mask_from_state,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        RELU=relu,
        MASK_FROM_X=mask_from_x,
        PER_CHANNEL_K=mask_from_state and k.numel() > 1,
        NEED_K=need_k,
        CHANNELS_LAST=layout,
        FP64=g.dtype == torch.float64,
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        num_warps=num_warps,
    )
    totals = [_channel_totals(partial, channels) for partial in (sum_dy, sum_dy_xhat)]
    if not need_k:
        return totals[0], totals[1], g.new_empty((0,), dtype=acc)
    grad_k = _channel_totals(grad_k, channels)
    return totals[0], totals[1], grad_k.sum().reshape(1) if k.numel() == 1 else grad_k


def batch_norm_lm_step_backward_triton(
    grad_out: Tensor,
    grad_shortcut: Tensor | None,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    mask: Tensor | None,
    k: Tensor,
    scale: Tensor | None,
    training: bool,
    relu: bool,
    need_x: bool,
    need_u: bool,
    need_u_prev: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the kernel that writes grad_x, grad_u (+ ``grad_shortcut``, the gradient of the step's shortcut
    output) and grad_u_prev (the needed ones; others empty). With ``relu`` and no ``out`` the ReLU's mask is
    recomputed from x (the no-state mode)."""
    out = _mask_as_out(mask, x)
    count = x.numel() // x.shape[1]
    mean_dy, mean_dy_xhat = sum_dy / count, sum_dy_xhat / count
    plan = plan_layout(x)
    layout = plan.channels_last
    g = to_layout(grad_out, layout)

    def grad(needed: bool) -> Tensor:  # unneeded: a fresh empty tensor each (outputs must not alias)
        return (
            empty_in_layout(g.shape, layout, dtype=g.dtype, device=g.device) if needed else g.new_empty((0,))
        )

    grad_x, grad_u, grad_u_prev = grad(need_x), grad(need_u), grad(need_u_prev)
    if g.numel() == 0:
        return grad_x, grad_u, grad_u_prev
    has_shortcut = grad_shortcut is not None and need_u
    if has_shortcut:
        grad_shortcut = to_layout(grad_shortcut, layout)  # read where grad_out is: the same plan
    x = to_layout(x, layout)
    mask_from_x = relu and out is None
    out = to_layout(out, layout) if relu and not mask_from_x else g
    mean, k = mean.contiguous(), k.contiguous()
    num_programs, num_l_blocks, block_m, block_l, num_warps = _tiling(plan)
    _launcher(batch_norm_lm_step_backward_kernel)[(num_programs,)](
        g,
        grad_shortcut if has_shortcut else g,  # unused pointers stand in for tensors a variant does not use
        out,
        x,
        mean,
        invstd.contiguous(),
        _gain(invstd, weight).contiguous(),
        _vector(bias, mean),
        mean_dy.contiguous(),
        mean_dy_xhat.contiguous(),
        k,
        _vector(scale, k),
        grad_x if need_x else g,
        grad_u if need_u else g,
        grad_u_prev if need_u_prev else g,
        plan.rows,
        plan.row_len,
        plan.channels,
        plan.rows_per_sample,
        num_l_blocks,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        RELU=relu,
        MASK_FROM_X=mask_from_x,
        HAS_SHORTCUT=has_shortcut,
        TRAINING=training,
        PER_CHANNEL_K=k.numel() > 1,
        NEED_X=need_x,
        NEED_U=need_u,
        NEED_U_PREV=need_u_prev,
        CHANNELS_LAST=layout,
        FP64=g.dtype == torch.float64,
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        num_warps=num_warps,
    )
    return grad_x, grad_u, grad_u_prev
