"""Triton kernels of the batch-norm-fused LM step (DESIGN.md 1b) and their launchers: one launch per op.

The activation is the 2-D matrix of ``lmfused._layout`` (M rows of L contiguous elements; channels-last: a
row is a position and column l channel l; channels-first: row m is channel m % C of sample m // C).

* ``batch_norm_stats_kernel`` (training): per-channel sums of x - c and (x - c)^2 (c = the channel's first
  element, a shift that keeps the variance free of cancellation when the mean is large), merged in the same
  launch into mean, invstd and the running statistics (see "Merge" below);
* ``batch_norm_eval_stats_kernel`` (evaluation): mean and invstd of the running statistics;
* ``batch_norm_lm_step_forward_kernel``: out = act((1 - k) u + k u_prev + s ((x - mean) gain + bias) + noise)
  (without u and u_prev, the no-state mode: act(s (...) + noise)), and the ReLU's 1-bit mask of the stored
  output (bit j % 8 of byte [r, j // 8] for element (r, j));
* ``batch_norm_lm_step_backward_reduce_kernel``: per-channel sums of dy, dy * xhat and g * (u_prev - u)
  (g: the output gradient through the ReLU's mask, dy = s g), merged in the same launch (for a scalar k
  over the channels too);
* ``batch_norm_lm_step_backward_kernel``: grad_x, grad_u (plus the shortcut output's gradient) and
  grad_u_prev from those sums (count divided in the kernel).

Rounding: the pre-activation has one operation order, written out with explicit fused multiply-adds
(``_pre_activation``): (x - mean) gain + bias = fma(x - mean, gain, bias), s y + state = fma(s, y, state),
state = fma(k, u_prev - u, u) (= u exactly for k = 0). No product feeds a separate addition, so neither
LLVM nor ptxas can contract anything differently in the forward and in the no-state backward's recomputed
mask (tests/compile_triton_sm90.py --check-pre-activation compares the two in the sm_90 PTX). The mask is
compared in float32 after rounding to the activation dtype (an interpreter that compares bf16 values as
integers then still gets the sign right).

Merge (the reductions): program (p, b) of a P x B grid (P <= 128 row groups, B channel blocks) sums its row
tiles in a fixed order, in registers, and stores one partial per channel: at most 128 x C staged values per
sum. Then every thread's stores are ordered before one thread's atomic ticket by a CTA barrier
(``tl.debug_barrier``: bar.sync), and the ticket is an ``atom.acq_rel.gpu`` add on the block's counter: its
release half publishes the CTA's partials GPU-wide (PTX release is cumulative over what the barrier
ordered before it); the program that draws ticket P - 1 is the last of its block, and its acquire half
(plus the barrier Triton places after broadcasting the ticket) orders its reads of the other programs'
partials after their stores; those reads are ``ld.global.cg`` (L2, never a stale L1 line). The last
program sums the P partials in a fixed order (the same tile shape and loop every call), finishes the
per-channel results and resets the counter to 0. The same pattern as the fused layer-norm backward of
Triton's tutorials (stores, ``debug_barrier``, then the atomic that releases) and of PyTorch's channels-last
batch norm (``__threadfence``, atomic ticket, last block merges). The result depends only on the shape,
never on which program finishes last.

Counters: int32 per channel block, zero at every launch: one zeroed buffer per (device, stream), kept by
the launcher, every launch's last programs set their counters back to 0, and launches that share it are
ordered by their stream. A CUDA graph captures the same kernels, so each replay also leaves it at zero;
two streams never share one. (A traced call, torch.compile, takes a freshly zeroed buffer instead.)

Tile shapes are a fixed function of the shape (no autotuning), with 16 or 32 bytes per thread and tensor per
tile (the statistics load 4 tiles of 16 bytes per thread at once: 4 independent 128-bit loads per thread;
2 per tensor elsewhere) at 4 warps.
Misaligned views are copied (rare; never in the models' layout): Triton compiles a variant per pointer
alignment, whose register layout sets the order of the in-program sums.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from lmfused.triton_kernels.lm_step import _acc, _aligned, _cdiv, _launcher, four_normals
from torch import Tensor

from lmfused._layout import Plan, empty_in_layout, plan_layout, to_layout

__all__ = [
    "batch_norm_lm_step_backward_reduce_triton",
    "batch_norm_lm_step_backward_triton",
    "batch_norm_lm_step_forward_triton",
    "batch_norm_stats_triton",
]


# --------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid, M, L, num_l_blocks, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """Rows [BLOCK_M, 1], columns [1, BLOCK_L] (int64), element offsets and bounds mask of an elementwise
    program's tile."""
    pid_m = pid // num_l_blocks
    pid_l = pid % num_l_blocks
    rows = (pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]
    return rows, cols, rows * L + cols, (rows < M) & (cols < L)


@triton.jit
def _vector(ptr, index, ok, FP64: tl.constexpr):
    """A per-channel or per-sample vector gathered at ``index`` (any broadcastable shape) in the
    accumulation type: loaded in the tile's own layout, no shared-memory round trip."""
    return _acc(tl.load(ptr + index, mask=ok, other=0.0), FP64)


@triton.jit
def _gain(invstd_ptr, weight_ptr, chan, chan_ok, HAS_WEIGHT: tl.constexpr, FP64: tl.constexpr):
    """invstd * weight per channel (one rounding), or invstd."""
    gain = _vector(invstd_ptr, chan, chan_ok, FP64)
    if HAS_WEIGHT:
        gain = gain * _vector(weight_ptr, chan, chan_ok, FP64)
    return gain


@triton.jit
def _pre_activation(
    x, u, u_prev, k, mean, gain, bias, s, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):  # fmt: skip
    """(1 - k) u + k u_prev + s ((x - mean) gain + bias), or without HAS_STATE s ((x - mean) gain + bias):
    the update before noise and ReLU, in one fixed operation order (module docstring, "Rounding")."""
    if HAS_BIAS:
        y = tl.fma(x - mean, gain, bias)
    else:
        y = (x - mean) * gain
    if HAS_STATE:
        state = tl.fma(k, u_prev - u, u)
        if HAS_SCALE:
            pre = tl.fma(s, y, state)
        else:
            pre = state + y
    elif HAS_SCALE:
        pre = s * y
    else:
        pre = y
    return pre


@triton.jit
def _passes(value, DTYPE: tl.constexpr):
    """Where the ReLU passes the gradient, as torch's threshold_backward: NOT (value <= 0) for the value
    rounded to the activation dtype (out > 0, or NaN), compared in float32."""
    rounded = value.to(DTYPE).to(tl.float32)
    return (rounded > 0.0) | (rounded != rounded)


@triton.jit
def _mask_bits(mask_ptr, row, col, ok, mask_row_bytes):
    """The forward's mask bits (0 or 1, int32) of elements (row, col) of the 2-D view."""
    byte = tl.load(mask_ptr + row * mask_row_bytes + col // 8, mask=ok, other=0).to(tl.int32)
    return (byte >> (col % 8).to(tl.int32)) & 1


# --------------------------------------------------------------------------------------------------------
# Reductions: a P x B grid, row tiles summed in registers, merged by the last program of each block.
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_channels(block, C, CHANNELS_LAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Channel indices of channel block ``block`` and their bounds, broadcastable to [BLOCK_A, BLOCK_B]:
    along B (channels-last) or A (channels-first)."""
    if CHANNELS_LAST:
        chan = (block * BLOCK_B + tl.arange(0, BLOCK_B))[None, :]
    else:
        chan = (block * BLOCK_A + tl.arange(0, BLOCK_A))[:, None]
    return chan, chan < C


@triton.jit
def _reduction_tile(
    item, chan, chan_ok, M, L, C, num_l_blocks, rows_per_sample, CHANNELS_LAST: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Tile ``item`` of a channel block (``_tile_channels``): (offsets, in bounds, sample index, 2-D view
    row, 2-D view column), broadcastable to [BLOCK_A, BLOCK_B]; for ``item`` an [ITEMS, 1, 1] tensor, ITEMS
    tiles at once, broadcastable to [ITEMS, BLOCK_A, BLOCK_B].

    channels-last: item = a block of BLOCK_A rows (positions), the channels along B;
    channels-first: item = (sample n, column block), BLOCK_A channels of sample n along A, positions along B.
    """
    if CHANNELS_LAST:
        rows = tl.cast(item, tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)[:, None]
        return rows * L + chan, (rows < M) & chan_ok, rows // rows_per_sample, rows, chan
    else:
        n = item // num_l_blocks
        cols = tl.cast(item % num_l_blocks, tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)[None, :]
        row = tl.cast(n, tl.int64) * C + chan
        return row * L + cols, chan_ok & (cols < L) & (row < M), n + 0 * chan, row, cols


@triton.jit
def _channel_total(acc, CHANNELS_LAST: tl.constexpr):
    """Sum a [BLOCK_A, BLOCK_B] accumulator over the non-channel axis."""
    if CHANNELS_LAST:
        return tl.sum(acc, axis=0)
    else:
        return tl.sum(acc, axis=1)


@triton.jit
def _block_channels(block, C, BLOCK_C: tl.constexpr):
    chan = block * BLOCK_C + tl.arange(0, BLOCK_C)
    return chan, chan < C


@triton.jit
def _store_partial(partial_ptr, total, program, block, C, BLOCK_C: tl.constexpr):
    """Store this program's per-channel partial: row ``program`` of a (P, C) buffer."""
    chan, chan_ok = _block_channels(block, C, BLOCK_C)
    tl.store(partial_ptr + program.to(tl.int64) * C + chan, total, mask=chan_ok)


@triton.jit
def _is_last(counter_ptr, num_programs):
    """Draw a ticket after this program's partials are stored (see the module docstring): True for the
    program that draws the last one, which then reads every partial and resets the counter."""
    tl.debug_barrier()  # every thread's partial stores before the releasing atomic
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == num_programs - 1


@triton.jit
def _merged(partial_ptr, block, P, C, FP64: tl.constexpr, MERGE_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The P partials of the block's channels summed in a fixed order: [MERGE_ROWS, BLOCK_C] tiles down the
    rows, accumulated, then one in-register tree sum. Loads through L2 (.cg)."""
    chan, chan_ok = _block_channels(block, C, BLOCK_C)
    acc = tl.zeros([MERGE_ROWS, BLOCK_C], dtype=tl.float64 if FP64 else tl.float32)
    for start in range(0, P, MERGE_ROWS):
        rows = start + tl.arange(0, MERGE_ROWS)[:, None]
        ok = (rows < P) & chan_ok[None, :]
        acc += tl.load(partial_ptr + rows.to(tl.int64) * C + chan[None, :], mask=ok, other=0.0,
                       cache_modifier=".cg")  # fmt: skip
    return tl.sum(acc, axis=0)


@triton.jit
def _invstd(var, eps, FP64: tl.constexpr):
    """1 / sqrt(var + eps), correctly rounded steps (float32 sqrt and division default to approximations)."""
    if FP64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _update_running(ptr, stat, chan, chan_ok, momentum, FP64: tl.constexpr):
    """r = (1 - momentum) r + momentum stat, in place, in the running statistic's own dtype."""
    updated = (1.0 - momentum) * _vector(ptr, chan, chan_ok, FP64) + momentum * stat
    tl.store(ptr + chan, updated.to(ptr.dtype.element_ty), mask=chan_ok)


@triton.jit
def batch_norm_stats_kernel(
    x_ptr,
    partial_ptr,
    counter_ptr,
    mean_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    M,
    L_vec,
    C,
    num_l_blocks,
    num_items,
    per_channel,
    momentum,
    eps,
    HAS_RUNNING: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ITEMS: tl.constexpr,
    MERGE_ROWS: tl.constexpr,
):
    """Training statistics of one channel block: this program's sums of x - shift and (x - shift)^2 over
    tiles ``program, program + P, ...``, ITEMS of them per step loaded by one 3-D load (every load issued
    before the first is used: ITEMS independent vectors in flight per thread), summed over the ITEMS, then
    added to the [BLOCK_A, BLOCK_B] sums; the block's last program merges them into mean, invstd and the
    running statistics (r = (1 - momentum) r + momentum stat, the variance unbiased)."""
    program = tl.program_id(0)
    block = tl.program_id(1)
    P = tl.num_programs(0)
    L = L_vec * VEC  # a multiple of VEC: rows start on VEC-element boundaries (vector accesses)
    BLOCK_C: tl.constexpr = BLOCK_B if CHANNELS_LAST else BLOCK_A
    acc_type = tl.float64 if FP64 else tl.float32
    # Channels-last: bound the channels by L (= C, a multiple of VEC the compiler sees: vector loads).
    chan, chan_ok = _tile_channels(block, L if CHANNELS_LAST else C, CHANNELS_LAST, BLOCK_A, BLOCK_B)
    # The shift: each channel's first element (row 0 of the 2-D view, or the start of the channel's row).
    shift = _vector(x_ptr, chan * (1 if CHANNELS_LAST else L), chan_ok, FP64)
    sums = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_type)
    squares = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_type)
    step = tl.arange(0, ITEMS)[:, None, None] * P  # tiles past num_items are out of bounds (masked)
    for item in range(program, num_items, ITEMS * P):
        offs, ok, sample, row, col = _reduction_tile(
            item + step, chan, chan_ok, M, L, C, num_l_blocks, 1, CHANNELS_LAST, BLOCK_A, BLOCK_B
        )
        centred = tl.where(ok, _acc(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64) - shift, 0.0)
        sums += tl.sum(centred, axis=0)
        squares += tl.sum(centred * centred, axis=0)
    _store_partial(partial_ptr, _channel_total(sums, CHANNELS_LAST), program, block, C, BLOCK_C)
    _store_partial(partial_ptr + P * C, _channel_total(squares, CHANNELS_LAST), program, block, C, BLOCK_C)
    if _is_last(counter_ptr + block, P):
        block_chan, block_ok = _block_channels(block, C, BLOCK_C)
        count = tl.cast(per_channel, acc_type)
        centred_mean = _merged(partial_ptr, block, P, C, FP64, MERGE_ROWS, BLOCK_C) / count
        var = _merged(partial_ptr + P * C, block, P, C, FP64, MERGE_ROWS, BLOCK_C) / count
        var = tl.maximum(var - centred_mean * centred_mean, 0.0)
        mean = _vector(x_ptr, block_chan * (1 if CHANNELS_LAST else L), block_ok, FP64) + centred_mean
        tl.store(mean_ptr + block_chan, mean, mask=block_ok)
        tl.store(invstd_ptr + block_chan, _invstd(var, eps, FP64), mask=block_ok)
        if HAS_RUNNING:
            _update_running(running_mean_ptr, mean, block_chan, block_ok, momentum, FP64)
            _update_running(
                running_var_ptr, var * (count / (count - 1.0)), block_chan, block_ok, momentum, FP64
            )
        tl.store(counter_ptr + block, 0)  # zero for the next launch on this stream


@triton.jit
def batch_norm_eval_stats_kernel(
    running_mean_ptr, running_var_ptr, mean_ptr, invstd_ptr, C, eps, FP64: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Evaluation statistics: mean = running_mean, invstd = 1 / sqrt(running_var + eps)."""
    chan, chan_ok = _block_channels(tl.program_id(0), C, BLOCK_C)
    tl.store(mean_ptr + chan, _vector(running_mean_ptr, chan, chan_ok, FP64), mask=chan_ok)
    var = _vector(running_var_ptr, chan, chan_ok, FP64)
    tl.store(invstd_ptr + chan, _invstd(var, eps, FP64), mask=chan_ok)


@triton.jit
def batch_norm_lm_step_backward_reduce_kernel(
    g_ptr,
    x_ptr,
    u_ptr,
    u_prev_ptr,
    mask_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    partial_ptr,
    counter_ptr,
    sum_dy_ptr,
    sum_dy_xhat_ptr,
    grad_k_ptr,
    M,
    L_vec,
    C,
    num_l_blocks,
    num_items,
    rows_per_sample,
    mask_row_bytes,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    MASK_FROM_X: tl.constexpr,
    NEED_K: tl.constexpr,
    SCALAR_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MERGE_ROWS: tl.constexpr,
):
    """Sums of dy, dy * xhat and (NEED_K) g * (u_prev - u) per channel over this program's tiles; the
    block's last program merges them; with SCALAR_K the last block to finish also sums grad_k over the
    channels (a second ticket, counter B). The ReLU's mask: the forward's bits, or with MASK_FROM_X (the
    no-state mode) the forward's pre-activation recomputed from x by ``_pre_activation``."""
    program = tl.program_id(0)
    block = tl.program_id(1)
    P = tl.num_programs(0)
    B = tl.num_programs(1)
    L = L_vec * VEC
    BLOCK_C: tl.constexpr = BLOCK_B if CHANNELS_LAST else BLOCK_A
    acc_type = tl.float64 if FP64 else tl.float32
    chan, chan_ok = _tile_channels(block, L if CHANNELS_LAST else C, CHANNELS_LAST, BLOCK_A, BLOCK_B)
    mean = _vector(mean_ptr, chan, chan_ok, FP64)
    invstd = _vector(invstd_ptr, chan, chan_ok, FP64)
    gain = invstd  # read for the recomputed mask only
    bias = 0.0
    if RELU and MASK_FROM_X:
        gain = _gain(invstd_ptr, weight_ptr, chan, chan_ok, HAS_WEIGHT, FP64)
        if HAS_BIAS:
            bias = _vector(bias_ptr, chan, chan_ok, FP64)
    sum_dy = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_type)
    sum_dy_xhat = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_type)
    sum_k = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_type)
    for item in range(program, num_items, P):
        offs, ok, sample, row, col = _reduction_tile(
            item, chan, chan_ok, M, L, C, num_l_blocks, rows_per_sample, CHANNELS_LAST, BLOCK_A, BLOCK_B
        )
        g = _acc(tl.load(g_ptr + offs, mask=ok, other=0.0), FP64)
        x = _acc(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64)
        if NEED_K:
            u = _acc(tl.load(u_ptr + offs, mask=ok, other=0.0), FP64)
            u_prev = _acc(tl.load(u_prev_ptr + offs, mask=ok, other=0.0), FP64)
        s = 1.0
        if HAS_SCALE:
            s = _vector(scale_ptr, sample, ok, FP64)
        if RELU:
            if MASK_FROM_X:
                pre = _pre_activation(x, 0.0, 0.0, 0.0, mean, gain, bias, s, False, HAS_BIAS, HAS_SCALE)
                g = tl.where(_passes(pre, x_ptr.dtype.element_ty), g, 0.0)
            else:
                g = tl.where(_mask_bits(mask_ptr, row, col, ok, mask_row_bytes) != 0, g, 0.0)
        dy = g * s if HAS_SCALE else g
        sum_dy += dy
        sum_dy_xhat += dy * ((x - mean) * invstd)
        if NEED_K:
            sum_k += g * (u_prev - u)
    stride = P * C
    _store_partial(partial_ptr, _channel_total(sum_dy, CHANNELS_LAST), program, block, C, BLOCK_C)
    _store_partial(
        partial_ptr + stride, _channel_total(sum_dy_xhat, CHANNELS_LAST), program, block, C, BLOCK_C
    )
    if NEED_K:
        _store_partial(
            partial_ptr + 2 * stride, _channel_total(sum_k, CHANNELS_LAST), program, block, C, BLOCK_C
        )
    if _is_last(counter_ptr + block, P):
        block_chan, block_ok = _block_channels(block, C, BLOCK_C)
        tl.store(
            sum_dy_ptr + block_chan,
            _merged(partial_ptr, block, P, C, FP64, MERGE_ROWS, BLOCK_C),
            mask=block_ok,
        )
        total = _merged(partial_ptr + stride, block, P, C, FP64, MERGE_ROWS, BLOCK_C)
        tl.store(sum_dy_xhat_ptr + block_chan, total, mask=block_ok)
        if NEED_K:
            per_channel_k = _merged(partial_ptr + 2 * stride, block, P, C, FP64, MERGE_ROWS, BLOCK_C)
            if SCALAR_K:
                # Per-channel totals staged in row 0 of the grad_k partials, then summed in channel order by
                # the last block to finish.
                tl.store(partial_ptr + 3 * stride + block_chan, per_channel_k, mask=block_ok)
                if _is_last(counter_ptr + B, B):
                    acc = tl.zeros([BLOCK_C], dtype=acc_type)
                    for start in range(0, C, BLOCK_C):
                        index = start + tl.arange(0, BLOCK_C)
                        acc += tl.load(partial_ptr + 3 * stride + index, mask=index < C, other=0.0,
                                       cache_modifier=".cg")  # fmt: skip
                    tl.store(grad_k_ptr, tl.sum(acc, axis=0))
                    tl.store(counter_ptr + B, 0)
            else:
                tl.store(grad_k_ptr + block_chan, per_channel_k, mask=block_ok)
        tl.store(counter_ptr + block, 0)


# --------------------------------------------------------------------------------------------------------
# Elementwise passes
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _channel_and_sample(rows, cols, M, L, C, rows_per_sample, CHANNELS_LAST: tl.constexpr):
    """Channel index (broadcastable), channel in range, and sample index [BLOCK_M, 1] of a tile."""
    if CHANNELS_LAST:
        return cols, cols < L, rows // rows_per_sample
    else:
        return rows % C, rows < M, rows // rows_per_sample


@triton.jit
def batch_norm_lm_step_forward_kernel(
    x_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    bias_ptr,
    u_ptr,
    u_prev_ptr,
    k_ptr,
    scale_ptr,
    seed_ptr,
    out_ptr,
    mask_ptr,
    M,
    L_vec,
    C,
    rows_per_sample,
    num_l_blocks,
    mask_row_bytes,
    noise_std,
    HAS_STATE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    PER_CHANNEL_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out = act(pre + noise_std xi) on one tile, pre = ``_pre_activation``; WRITE_MASK: the ReLU's bits of
    the stored out, 8 elements per byte along the row."""
    L = L_vec * VEC
    rows, cols, offs, ok = _tile(tl.program_id(0), M, L, num_l_blocks, BLOCK_M, BLOCK_L)
    chan, chan_ok, sample = _channel_and_sample(rows, cols, M, L, C, rows_per_sample, CHANNELS_LAST)
    x = _acc(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64)
    k = 0.0  # read only with the states
    u = 0.0
    u_prev = 0.0
    if HAS_STATE:
        if PER_CHANNEL_K:
            k = _vector(k_ptr, chan, chan_ok, FP64)
        else:
            k = _acc(tl.load(k_ptr), FP64)
        u = _acc(tl.load(u_ptr + offs, mask=ok, other=0.0), FP64)
        u_prev = _acc(tl.load(u_prev_ptr + offs, mask=ok, other=0.0), FP64)
    bias = 0.0
    if HAS_BIAS:
        bias = _vector(bias_ptr, chan, chan_ok, FP64)
    s = 1.0
    if HAS_SCALE:
        s = _vector(scale_ptr, sample, rows < M, FP64)
    mean = _vector(mean_ptr, chan, chan_ok, FP64)
    gain = _gain(invstd_ptr, weight_ptr, chan, chan_ok, HAS_WEIGHT, FP64)
    acc = _pre_activation(x, u, u_prev, k, mean, gain, bias, s, HAS_STATE, HAS_BIAS, HAS_SCALE)
    if HAS_NOISE:
        # Four normals per Philox call: counter (row, col // 4), lane col % 4 (BLOCK_L is a multiple of 4).
        seed = tl.load(seed_ptr)
        group = rows * ((L + 3) // 4) + (tl.program_id(0) % num_l_blocks).to(tl.int64) * (BLOCK_L // 4)
        normals = four_normals(seed, group + tl.arange(0, BLOCK_L // 4)[None, :])
        acc += noise_std * tl.reshape(normals, [BLOCK_M, BLOCK_L])
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=ok)
    if WRITE_MASK:
        bits = tl.where(ok & _passes(out, out_ptr.dtype.element_ty), 1 << (cols % 8).to(tl.int32), 0)
        byte = tl.sum(tl.reshape(bits, [BLOCK_M, BLOCK_L // 8, 8]), axis=2)
        byte_cols = (tl.program_id(0) % num_l_blocks) * (BLOCK_L // 8) + tl.arange(0, BLOCK_L // 8)[None, :]
        byte_ok = (rows < M) & (byte_cols < mask_row_bytes)
        tl.store(mask_ptr + rows * mask_row_bytes + byte_cols, byte.to(tl.uint8), mask=byte_ok)


@triton.jit
def batch_norm_lm_step_backward_kernel(
    g_ptr,
    grad_shortcut_ptr,
    x_ptr,
    mask_ptr,
    mean_ptr,
    invstd_ptr,
    weight_ptr,
    bias_ptr,
    sum_dy_ptr,
    sum_dy_xhat_ptr,
    k_ptr,
    scale_ptr,
    grad_x_ptr,
    grad_u_ptr,
    grad_u_prev_ptr,
    M,
    L_vec,
    C,
    rows_per_sample,
    num_l_blocks,
    mask_row_bytes,
    per_channel,
    HAS_WEIGHT: tl.constexpr,
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
    VEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """grad_x = gain (dy - sum(dy) / n - xhat sum(dy xhat) / n) (training; gain dy in evaluation),
    grad_u = (1 - k) g (+ grad_shortcut, unmasked), grad_u_prev = k g, on one tile."""
    L = L_vec * VEC
    rows, cols, offs, ok = _tile(tl.program_id(0), M, L, num_l_blocks, BLOCK_M, BLOCK_L)
    chan, chan_ok, sample = _channel_and_sample(rows, cols, M, L, C, rows_per_sample, CHANNELS_LAST)
    # Every load before the first store (Triton must assume the pointers may alias).
    g = _acc(tl.load(g_ptr + offs, mask=ok, other=0.0), FP64)
    x = 0.0
    if (NEED_X and TRAINING) or (RELU and MASK_FROM_X):
        x = _acc(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64)
    if HAS_SHORTCUT and NEED_U:
        shortcut = _acc(tl.load(grad_shortcut_ptr + offs, mask=ok, other=0.0), FP64)
    s = 1.0
    if HAS_SCALE:
        s = _vector(scale_ptr, sample, rows < M, FP64)
    mean = _vector(mean_ptr, chan, chan_ok, FP64)
    gain = _gain(invstd_ptr, weight_ptr, chan, chan_ok, HAS_WEIGHT, FP64)
    if RELU:
        if MASK_FROM_X:
            bias = 0.0
            if HAS_BIAS:
                bias = _vector(bias_ptr, chan, chan_ok, FP64)
            pre = _pre_activation(x, 0.0, 0.0, 0.0, mean, gain, bias, s, False, HAS_BIAS, HAS_SCALE)
            g = tl.where(_passes(pre, x_ptr.dtype.element_ty), g, 0.0)
        else:
            g = tl.where(_mask_bits(mask_ptr, rows, cols, ok, mask_row_bytes) != 0, g, 0.0)
    if NEED_X:
        dy = g * s if HAS_SCALE else g
        if TRAINING:
            count = tl.cast(per_channel, tl.float64 if FP64 else tl.float32)
            invstd = _vector(invstd_ptr, chan, chan_ok, FP64)
            mean_dy = _vector(sum_dy_ptr, chan, chan_ok, FP64) / count
            mean_dy_xhat = _vector(sum_dy_xhat_ptr, chan, chan_ok, FP64) / count
            dy = dy - mean_dy - (x - mean) * invstd * mean_dy_xhat
        tl.store(grad_x_ptr + offs, (gain * dy).to(grad_x_ptr.dtype.element_ty), mask=ok)
    if NEED_U or NEED_U_PREV:
        if PER_CHANNEL_K:
            k = _vector(k_ptr, chan, chan_ok, FP64)
        else:
            k = _acc(tl.load(k_ptr), FP64)
        if NEED_U:
            grad_u = (1.0 - k) * g
            if HAS_SHORTCUT:
                grad_u += shortcut  # the gradient of u itself: not masked by the ReLU; one rounding below
            tl.store(grad_u_ptr + offs, grad_u.to(grad_u_ptr.dtype.element_ty), mask=ok)
        if NEED_U_PREV:
            tl.store(grad_u_prev_ptr + offs, (k * g).to(grad_u_prev_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

NUM_WARPS = 4
_THREADS = 32 * NUM_WARPS
MAX_PARTIALS = 128  # row groups per channel block: at most 128 x C staged values per sum
# The statistics: tiles of one 16-byte vector per thread, STATS_ITEMS of them loaded per step (4 independent
# 128-bit loads in flight per thread, as PyTorch's channels-last batch norm; fewer live registers than one
# tile of 4 vectors per thread, whose loads ptxas interleaves with their use).
STATS_BYTES_PER_THREAD = 16
STATS_ITEMS = 4
_TARGET_PROGRAMS = 4 * 132  # 4 CTAs on each SM of an H100/H200: enough programs to fill it
_MERGE_ROWS = 16


def _vec(L: int, element_size: int) -> int:
    """The largest power of two dividing L, up to 16 bytes of elements: rows start on it."""
    vec = 1
    while vec * element_size < 16 and L % (2 * vec) == 0:
        vec *= 2
    return vec


def _tile_elements(element_size: int, bytes_per_thread: int) -> int:
    return _THREADS * max(1, bytes_per_thread // element_size)


@functools.lru_cache(maxsize=512)
def elementwise_shape(channels_last: bool, rows: int, L: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_L, num_programs) of the forward and backward: 32 bytes per thread and tensor (two
    128-bit accesses), rows of at least 8 (a byte of the mask)."""
    tile = _tile_elements(element_size, 32)
    if channels_last:
        block_l = max(8, min(triton.next_power_of_2(L), tile))
    else:
        # Rows are spatial planes (3136, 784, 196, 49 in a ResNet): the power of two that wastes the fewest
        # masked lanes, longer rows on ties.
        candidates = [
            b for b in (8, 16, 32, 64, 128, 256, 512, 1024) if b <= max(8, triton.next_power_of_2(L))
        ]
        block_l = min(candidates, key=lambda b: (_cdiv(L, b) * b, -b))
    block_m = max(1, min(triton.next_power_of_2(rows), tile // block_l))
    return block_m, block_l, _cdiv(rows, block_m) * _cdiv(L, block_l)


@functools.lru_cache(maxsize=512)
def reduction_shape(plan: Plan, element_size: int, bytes_per_thread: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_A, BLOCK_B, num_l_blocks, num_items, P x B grid as (P, B)) of a reduction: tiles of
    ``bytes_per_thread`` per thread and tensor, channel blocks narrowed (down to 32-byte rows) until
    MAX_PARTIALS row groups per block give _TARGET_PROGRAMS programs, at most MAX_PARTIALS per block."""
    tile = _tile_elements(element_size, bytes_per_thread)
    C, L = int(plan.channels), int(plan.row_len)
    if plan.channels_last:
        block_c = min(triton.next_power_of_2(C), tile)
        narrowest = max(1, 32 // element_size)
        while _cdiv(C, block_c) * MAX_PARTIALS < _TARGET_PROGRAMS and block_c // 2 >= narrowest:
            block_c //= 2
        block_a, block_b = max(1, tile // block_c), block_c
        num_l_blocks, num_items = 1, _cdiv(int(plan.rows), block_a)
    else:
        block_b = min(elementwise_shape(False, int(plan.rows), L, element_size)[1], tile)
        block_a = max(1, min(triton.next_power_of_2(C), tile // block_b))
        num_l_blocks = _cdiv(L, block_b)
        num_items = (int(plan.rows) // C) * num_l_blocks
        block_c = block_a
    blocks = _cdiv(C, block_c)
    partials = max(1, min(MAX_PARTIALS, num_items, _cdiv(_TARGET_PROGRAMS, blocks)))
    return block_a, block_b, num_l_blocks, num_items, (partials, blocks)


_COUNTERS: dict[tuple, Tensor] = {}


def _traced(t: Tensor) -> bool:
    """A fake or functional tensor (torch.compile tracing the launcher), not a real one."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def _counters(like: Tensor, count: int) -> Tensor:
    """``count`` int32 ticket counters, zero at launch (module docstring, "Counters")."""
    if _traced(like):
        return torch.zeros(count, dtype=torch.int32, device=like.device)
    stream = torch.cuda.current_stream(like.device).cuda_stream if like.device.type == "cuda" else 0
    key = (like.device, stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < count:
        counters = _COUNTERS[key] = torch.zeros(max(count, 1024), dtype=torch.int32, device=like.device)
    return counters


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stand_in(t: Tensor | None, other: Tensor) -> Tensor:
    """``t`` contiguous and aligned (a parameter may be a view into a larger buffer; every launcher treats
    k, bias, weight and scale alike), or ``other`` for the pointer of a tensor a variant does not read."""
    return _aligned(t.contiguous()) if t is not None else other


def batch_norm_stats_triton(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """One launch: per-channel mean and invstd (float32; float64 for float64 x) and, in training, the running
    statistics updated in place; in evaluation of the running statistics (x not read)."""
    channels = x.shape[1]
    acc = _acc_dtype(x)
    mean = x.new_empty((channels,), dtype=acc)
    invstd = x.new_empty((channels,), dtype=acc)
    fp64 = acc == torch.float64
    if not training:
        block_c = min(1024, triton.next_power_of_2(max(channels, 1)))
        _launcher(batch_norm_eval_stats_kernel)[(_cdiv(channels, block_c),)](
            _stand_in(running_mean, mean), _stand_in(running_var, mean), mean, invstd, channels, float(eps),
            FP64=fp64, BLOCK_C=block_c, num_warps=NUM_WARPS,
        )  # fmt: skip
        return mean, invstd
    if x.numel() == 0:  # as F.batch_norm: nothing to average, running statistics untouched
        return mean.zero_(), invstd.fill_(1.0 / (1.0 + eps) ** 0.5)
    plan = plan_layout(x)
    x = _aligned(to_layout(x, plan.channels_last))
    vec = _vec(int(plan.row_len), x.element_size())
    block_a, block_b, num_l_blocks, num_items, grid = reduction_shape(
        plan, x.element_size(), STATS_BYTES_PER_THREAD
    )
    partials = torch.empty((2, grid[0], channels), dtype=acc, device=x.device)
    has_running = running_mean is not None
    _launcher(batch_norm_stats_kernel)[grid](
        x,
        partials,
        _counters(x, grid[1]),
        mean,
        invstd,
        running_mean if has_running else mean,  # in place: F.batch_norm's own (contiguous) buffers
        running_var if has_running else invstd,
        plan.rows,
        plan.row_len // vec,
        channels,
        num_l_blocks,
        num_items,
        x.numel() // channels,
        float(momentum),
        float(eps),
        HAS_RUNNING=has_running,
        CHANNELS_LAST=plan.channels_last,
        FP64=fp64,
        VEC=vec,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        ITEMS=STATS_ITEMS,
        MERGE_ROWS=_MERGE_ROWS,
        num_warps=NUM_WARPS,
    )
    return mean, invstd


def _mask_row_bytes(plan: Plan) -> int:
    return _cdiv(int(plan.row_len), 8)


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
    """One launch: out in u's planned layout (without u and u_prev, the no-state mode, x's) and, with
    ``write_mask``, the ReLU's 1-bit mask of it. Inputs are validated by lmfused.batch_norm_step."""
    has_state = u is not None
    plan = plan_layout(u if has_state else x)
    layout = plan.channels_last
    x = to_layout(x, layout)
    out = empty_in_layout(x.shape, layout, dtype=x.dtype, device=x.device)
    mask_row_bytes = _mask_row_bytes(plan)
    mask = x.new_empty((plan.rows, mask_row_bytes) if write_mask else (0,), dtype=torch.uint8)
    if x.numel() == 0:
        return out, mask
    if has_state:
        u, u_prev = to_layout(u, layout), to_layout(u_prev, layout)
    vec = _vec(int(plan.row_len), x.element_size())
    block_m, block_l, num_programs = elementwise_shape(
        layout, int(plan.rows), int(plan.row_len), x.element_size()
    )
    has_noise = noise_std > 0.0
    _launcher(batch_norm_lm_step_forward_kernel)[(num_programs,)](
        x,
        mean,
        invstd,
        _stand_in(weight, mean),
        _stand_in(bias, mean),
        u if has_state else x,  # unused pointers stand in for tensors a variant does not read
        u_prev if has_state else x,
        _stand_in(k, mean),
        _stand_in(scale, mean),
        seed if has_noise else mean,
        out,
        mask if write_mask else out,
        plan.rows,
        plan.row_len // vec,
        plan.channels,
        plan.rows_per_sample,
        _cdiv(int(plan.row_len), block_l),
        mask_row_bytes,
        float(noise_std),
        HAS_STATE=has_state,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        RELU=relu,
        HAS_NOISE=has_noise,
        WRITE_MASK=write_mask,
        PER_CHANNEL_K=has_state and k.numel() > 1,
        CHANNELS_LAST=layout,
        FP64=x.dtype == torch.float64,
        VEC=vec,
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        num_warps=NUM_WARPS,
    )
    return out, mask


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
    """One launch: per-channel sums of dy and dy * xhat and (``need_k``) grad_k = sum g * (u_prev - u) in
    k's shape, merged in the kernel. With ``relu`` the forward's mask, or without one (the no-state mode)
    the mask recomputed from x as the forward computes the pre-activation."""
    plan = plan_layout(x)
    layout, channels = plan.channels_last, plan.channels
    acc = _acc_dtype(grad_out)
    sum_dy = x.new_empty((channels,), dtype=acc)
    sum_dy_xhat = x.new_empty((channels,), dtype=acc)
    grad_k = x.new_empty(tuple(k.shape) if need_k else (0,), dtype=acc)
    if x.numel() == 0:
        return sum_dy.zero_(), sum_dy_xhat.zero_(), grad_k.zero_()
    # Aligned operands (see the module docstring): the sums' bits depend only on the values.
    g, x = _aligned(to_layout(grad_out, layout)), _aligned(to_layout(x, layout))
    if need_k:
        u, u_prev = _aligned(to_layout(u, layout)), _aligned(to_layout(u_prev, layout))
    mask_from_x = relu and mask is None
    vec = _vec(int(plan.row_len), x.element_size())
    block_a, block_b, num_l_blocks, num_items, grid = reduction_shape(plan, x.element_size(), 32)
    partials = torch.empty((4 if need_k else 2, grid[0], channels), dtype=acc, device=x.device)
    _launcher(batch_norm_lm_step_backward_reduce_kernel)[grid](
        g,
        x,
        u if need_k else g,  # unused pointers stand in for tensors a variant does not read
        u_prev if need_k else g,
        mask if relu and not mask_from_x else g,
        mean,
        invstd,
        _stand_in(weight, mean),
        _stand_in(bias, mean),
        _stand_in(scale, mean),
        partials,
        _counters(x, grid[1] + 1),
        sum_dy,
        sum_dy_xhat,
        grad_k if need_k else sum_dy,
        plan.rows,
        plan.row_len // vec,
        channels,
        num_l_blocks,
        num_items,
        plan.rows_per_sample,
        _mask_row_bytes(plan),
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        RELU=relu,
        MASK_FROM_X=mask_from_x,
        NEED_K=need_k,
        SCALAR_K=k.numel() == 1,
        CHANNELS_LAST=layout,
        FP64=acc == torch.float64,
        VEC=vec,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        MERGE_ROWS=_MERGE_ROWS,
        num_warps=NUM_WARPS,
    )
    return sum_dy, sum_dy_xhat, grad_k


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
    """One launch: grad_x, grad_u (+ ``grad_shortcut``, the gradient of the step's shortcut output) and
    grad_u_prev (the needed ones; others empty). With ``relu`` the forward's mask, or without one (the
    no-state mode) the mask recomputed from x."""
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
    mask_from_x = relu and mask is None
    vec = _vec(int(plan.row_len), x.element_size())
    block_m, block_l, num_programs = elementwise_shape(
        layout, int(plan.rows), int(plan.row_len), x.element_size()
    )
    _launcher(batch_norm_lm_step_backward_kernel)[(num_programs,)](
        g,
        grad_shortcut if has_shortcut else g,  # unused pointers stand in for tensors a variant does not use
        x,
        mask if relu and not mask_from_x else g,
        mean,
        invstd,
        _stand_in(weight, mean),
        _stand_in(bias, mean),
        sum_dy,
        sum_dy_xhat,
        _stand_in(k, mean),
        _stand_in(scale, mean),
        grad_x if need_x else g,
        grad_u if need_u else g,
        grad_u_prev if need_u_prev else g,
        plan.rows,
        plan.row_len // vec,
        plan.channels,
        plan.rows_per_sample,
        _cdiv(int(plan.row_len), block_l),
        _mask_row_bytes(plan),
        x.numel() // plan.channels,
        HAS_WEIGHT=weight is not None,
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
        VEC=vec,
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        num_warps=NUM_WARPS,
    )
    return grad_x, grad_u, grad_u_prev
