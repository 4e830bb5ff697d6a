"""Triton kernels of the batch-norm-fused LM step (DESIGN.md 1b) and their launchers: one launch per op.

The activation is the 2-D matrix of ``lmfused.op_support`` (M rows of L contiguous elements; channels-last: a
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

The output gradient g arrives in one part (grad_out) or two (HAS_HANDOFF: grad_out and the gradient of the
output's handoff to the next step, ``lmfused.handoff``): both backward passes load the two and add them in
the accumulation type before the ReLU's mask (``_output_gradient``), where autograd would add them in the
activation dtype in a kernel of its own (reading 2 tensors, writing 1).

Rounding: the pre-activation has one operation order, written out with explicit fused multiply-adds
(``_pre_activation``): (x - mean) gain + bias = fma(x - mean, gain, bias), s y + state = fma(s, y, state),
state = fma(k, u_prev - u, u) (= u exactly for k = 0). No product feeds a separate addition, so neither
LLVM nor ptxas can contract anything differently in the forward and in the no-state backward's recomputed
mask (tools/compile_triton_sm90.py --check-pre-activation compares the two in the sm_90 PTX). The mask is
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
the backward reduction one 16-byte vector per tensor; the forward and backward 2 per tensor) at 4 warps.

Span tiles (SPAN): channels-first rows whose length is not a multiple of the 16-byte vector (7x7: 49
elements, 14x14: 196) would start on any element, so a 2-D tile of them gets no (7x7) or 8-byte (14x14)
accesses. A span tile is several whole rows read as one flat stream from a vector boundary: element e of
the tile is column e % L of row e // L, vectors cross row boundaries, and the per-channel (per-row) values
are loaded once per row and spread to the elements by a register gather (``tl.gather``). The mask bytes of
whole rows are contiguous too: the forward gathers each byte's 8 bits from the tile, the backward passes
load the tile's bytes and gather each element's. The reductions take as tile a channel block's rows of one
sample, accumulate per element over the samples and sum each row once at the end (``_row_totals``).
Misaligned views are copied (rare; never in the models' layout): Triton compiles a variant per pointer
alignment, whose register layout sets the order of the in-program sums.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl
from lmfused.triton_kernels.common import aligned, cdiv, four_normals, launcher, promote, store_state_grads
from torch import Tensor

from lmfused.op_support import Plan, empty_in_layout, plan_layout, to_layout

if TYPE_CHECKING:  # (lmfused.batch_norm_step owns the records; the launchers only read them)
    from lmfused.batch_norm_step import (
        BatchNormBackwardArgs,
        BatchNormBackwardReduceArgs,
        BatchNormForwardArgs,
        BatchNormStatsArgs,
    )

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
def _span_tile(pid, M, L, tile_rows, tile_vec, total_vec, VEC: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_L: tl.constexpr):  # fmt: skip
    """A tile of ``tile_rows`` whole rows (channels-first rows whose length is not a multiple of the
    16-byte vector) read as one flat stream of tile_vec x VEC elements starting on a VEC boundary, so that
    vectors cross row boundaries: (offsets [BLOCK_L], in bounds, row in the tile (int32), column, rows of
    the tile [BLOCK_M] (int64), rows in bounds)."""
    tile_len = tile_vec * VEC
    start = pid.to(tl.int64) * tile_len
    lane = tl.arange(0, BLOCK_L)
    ok = (lane < tile_len) & (start + lane < tl.cast(total_vec, tl.int64) * VEC)
    row_in_tile = tl.minimum(lane // L, BLOCK_M - 1)  # clamped on the masked lanes past the tile
    rows = pid.to(tl.int64) * tile_rows + tl.arange(0, BLOCK_M)
    return (
        start + lane,
        ok,
        row_in_tile,
        lane - row_in_tile * L,
        rows,
        (tl.arange(0, BLOCK_M) < tile_rows) & (rows < M),
    )


@triton.jit
def _spread(per_row, row_in_tile, SPAN: tl.constexpr):
    """A per-row value of a span tile (``_span_tile``) at each of its elements (a register gather, no
    global load per element); a 2-D tile's per-row or per-column value as it is."""
    if SPAN:
        return tl.gather(per_row, row_in_tile, 0)
    else:
        return per_row


@triton.jit
def _vector(ptr, index, ok, FP64: tl.constexpr):
    """A per-channel or per-sample vector gathered at ``index`` (any broadcastable shape) in the
    accumulation type: loaded in the tile's own layout, no shared-memory round trip."""
    return promote(tl.load(ptr + index, mask=ok, other=0.0), FP64)


@triton.jit
def _gain(invstd_ptr, weight_ptr, chan, chan_ok, HAS_WEIGHT: tl.constexpr, FP64: tl.constexpr):
    """invstd * weight per channel (one rounding), or invstd."""
    gain = _vector(invstd_ptr, chan, chan_ok, FP64)
    if HAS_WEIGHT:
        gain = gain * _vector(weight_ptr, chan, chan_ok, FP64)
    return gain


@triton.jit
def _bias(bias_ptr, chan, chan_ok, row_in_tile, HAS_BIAS: tl.constexpr, SPAN: tl.constexpr,
          FP64: tl.constexpr):  # fmt: skip
    """The bias per channel, spread over a span tile (``_spread``), or 0 without one."""
    bias = 0.0
    if HAS_BIAS:
        bias = _spread(_vector(bias_ptr, chan, chan_ok, FP64), row_in_tile, SPAN)
    return bias


@triton.jit
def _scale_mean_gain(
    scale_ptr, mean_ptr, invstd_ptr, weight_ptr, sample, row_ok, chan, chan_ok, row_in_tile,
    HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, SPAN: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """An elementwise pass's per-sample scale (1 without one), mean and gain (``_gain``) at its tile's
    elements, loaded in this order."""
    s = 1.0
    if HAS_SCALE:
        s = _spread(_vector(scale_ptr, sample, row_ok, FP64), row_in_tile, SPAN)
    mean = _spread(_vector(mean_ptr, chan, chan_ok, FP64), row_in_tile, SPAN)
    gain = _spread(_gain(invstd_ptr, weight_ptr, chan, chan_ok, HAS_WEIGHT, FP64), row_in_tile, SPAN)
    return s, mean, gain


@triton.jit
def _step_k(k_ptr, chan, chan_ok, row_in_tile, PER_CHANNEL_K: tl.constexpr, SPAN: tl.constexpr,
            FP64: tl.constexpr):  # fmt: skip
    """The LM step's k at an elementwise pass's tile: per channel (spread over a span tile), or the scalar."""
    if PER_CHANNEL_K:
        return _spread(_vector(k_ptr, chan, chan_ok, FP64), row_in_tile, SPAN)
    else:
        return promote(tl.load(k_ptr), FP64)


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
def _span_mask_bits(mask_ptr, first, byte_count, row_in_tile, col, ok, mask_row_bytes, BLOCK_L: tl.constexpr):
    """The forward's mask bits (0 or 1, int32) of a span tile's elements: the tile's ``byte_count`` mask
    bytes from byte ``first`` on (contiguous: whole rows) in one load, each element's byte gathered."""
    byte_index = tl.arange(0, BLOCK_L // 8)
    tile_bytes = tl.load(mask_ptr + first + byte_index, mask=byte_index < byte_count, other=0).to(tl.int32)
    element_byte = tl.where(ok, row_in_tile * mask_row_bytes + col // 8, 0)
    return (tl.gather(tile_bytes, element_byte, 0) >> (col % 8)) & 1


@triton.jit
def _mask_bits(mask_ptr, row, col, ok, mask_row_bytes):
    """The forward's mask bits (0 or 1, int32) of elements (row, col) of the 2-D view."""
    byte = tl.load(mask_ptr + row * mask_row_bytes + col // 8, mask=ok, other=0).to(tl.int32)
    return (byte >> (col % 8).to(tl.int32)) & 1


@triton.jit
def _output_gradient(g_ptr, grad_handoff_ptr, offs, ok, HAS_HANDOFF: tl.constexpr, FP64: tl.constexpr):
    """The output's gradient at ``offs`` in the accumulation type, before the ReLU's mask: grad_out, plus
    with HAS_HANDOFF the gradient of the output's handoff (module docstring), added after both loads."""
    g = promote(tl.load(g_ptr + offs, mask=ok, other=0.0), FP64)
    if HAS_HANDOFF:
        g += promote(tl.load(grad_handoff_ptr + offs, mask=ok, other=0.0), FP64)
    return g


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
def _row_totals(acc, L, BLOCK_R: tl.constexpr, ROW_PAD: tl.constexpr):
    """Per-row sums [BLOCK_R] of a span tile's flat per-element sums ``acc`` (rows of L <= ROW_PAD
    elements), gathered into [BLOCK_R, ROW_PAD] and summed along the row."""
    col = tl.arange(0, ROW_PAD)[None, :]
    in_row = col < L
    index = tl.reshape(tl.where(in_row, tl.arange(0, BLOCK_R)[:, None] * L + col, 0), [BLOCK_R * ROW_PAD])
    values = tl.reshape(tl.gather(acc, index, 0), [BLOCK_R, ROW_PAD])
    return tl.sum(tl.where(in_row, values, 0.0), axis=1)


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
    sample_vec,
    tile_vec,
    per_channel,
    momentum,
    eps,
    HAS_RUNNING: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    SPAN: tl.constexpr,
    FP64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ITEMS: tl.constexpr,
    MERGE_ROWS: tl.constexpr,
    ROW_PAD: tl.constexpr,
):
    """Training statistics of one channel block: this program's sums of x - shift and (x - shift)^2 over
    tiles ``program, program + P, ...``, ITEMS of them per step loaded by one 3-D load (every load issued
    before the first is used: ITEMS independent vectors in flight per thread), summed over the ITEMS, then
    added to the [BLOCK_A, BLOCK_B] sums; the block's last program merges them into mean, invstd and the
    running statistics (r = (1 - momentum) r + momentum stat, the variance unbiased).

    SPAN (channels-first rows that are not a multiple of the vector): a tile is the block's BLOCK_A whole
    rows (channels) of one sample, read as one flat stream (``_span_tile``'s layout; an item is a sample,
    tile_vec and sample_vec its and a sample's length in VEC-element vectors), summed per element over the
    samples and per row at the end (``_row_totals``)."""
    program = tl.program_id(0)
    block = tl.program_id(1)
    P = tl.num_programs(0)
    span: tl.constexpr = SPAN and not CHANNELS_LAST
    BLOCK_C: tl.constexpr = BLOCK_B if CHANNELS_LAST else BLOCK_A
    acc_type = tl.float64 if FP64 else tl.float32
    if span:
        L = L_vec  # any length: tiles start on vector boundaries
        chan, chan_ok = _block_channels(block, C, BLOCK_A)
        lane = tl.arange(0, BLOCK_B)
        row_in_tile = tl.minimum(lane // L, BLOCK_A - 1)
        # The block's rows in bounds, as a multiple of VEC the compiler sees (vector loads).
        lane_ok = lane < (tl.minimum(C - block * BLOCK_A, BLOCK_A) * L) // VEC * VEC
        shift = _spread(_vector(x_ptr, chan * L, chan_ok, FP64), row_in_tile, True)
        sums = tl.zeros([BLOCK_B], dtype=acc_type)
        squares = tl.zeros([BLOCK_B], dtype=acc_type)
        step = tl.arange(0, ITEMS)[:, None] * P
        for item in range(program, num_items, ITEMS * P):
            n = item + step
            offs = (n.to(tl.int64) * sample_vec + block * tile_vec) * VEC + lane[None, :]
            ok = (n < num_items) & lane_ok[None, :]
            centred = tl.where(ok, promote(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64) - shift, 0.0)
            sums += tl.sum(centred, axis=0)
            squares += tl.sum(centred * centred, axis=0)
        sums = _row_totals(sums, L, BLOCK_A, ROW_PAD)
        squares = _row_totals(squares, L, BLOCK_A, ROW_PAD)
    else:
        L = L_vec * VEC  # a multiple of VEC: rows start on VEC-element boundaries (vector accesses)
        # Channels-last: bound the channels by L (= C, a multiple of VEC the compiler sees: vector loads).
        chan, chan_ok = _tile_channels(block, L if CHANNELS_LAST else C, CHANNELS_LAST, BLOCK_A, BLOCK_B)
        # The shift: each channel's first element (row 0 of the 2-D view, or the start of the channel's row).
        shift = _vector(x_ptr, chan * (1 if CHANNELS_LAST else L), chan_ok, FP64)
        tile_sums = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_type)
        tile_squares = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_type)
        step = tl.arange(0, ITEMS)[:, None, None] * P  # tiles past num_items are out of bounds (masked)
        for item in range(program, num_items, ITEMS * P):
            offs, ok, sample, row, col = _reduction_tile(
                item + step, chan, chan_ok, M, L, C, num_l_blocks, 1, CHANNELS_LAST, BLOCK_A, BLOCK_B
            )
            centred = tl.where(ok, promote(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64) - shift, 0.0)
            tile_sums += tl.sum(centred, axis=0)
            tile_squares += tl.sum(centred * centred, axis=0)
        sums = _channel_total(tile_sums, CHANNELS_LAST)
        squares = _channel_total(tile_squares, CHANNELS_LAST)
    _store_partial(partial_ptr, sums, program, block, C, BLOCK_C)
    _store_partial(partial_ptr + P * C, squares, program, block, C, BLOCK_C)
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
    grad_handoff_ptr,
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
    sample_vec,
    tile_vec,
    HAS_HANDOFF: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    MASK_FROM_X: tl.constexpr,
    NEED_K: tl.constexpr,
    SCALAR_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    SPAN: tl.constexpr,
    FP64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MERGE_ROWS: tl.constexpr,
    ROW_PAD: tl.constexpr,
):
    """Sums of dy, dy * xhat and (NEED_K) g * (u_prev - u) per channel over this program's tiles; the
    block's last program merges them; with SCALAR_K the last block to finish also sums grad_k over the
    channels (a second ticket, counter B). g: ``_output_gradient`` (HAS_HANDOFF: two parts). The ReLU's
    mask: the forward's bits, or with MASK_FROM_X (the no-state mode) the forward's pre-activation
    recomputed from x by ``_pre_activation``. SPAN: tiles of BLOCK_A whole rows of one sample, as in
    ``batch_norm_stats_kernel``."""
    program = tl.program_id(0)
    block = tl.program_id(1)
    P = tl.num_programs(0)
    B = tl.num_programs(1)
    span: tl.constexpr = SPAN and not CHANNELS_LAST
    BLOCK_C: tl.constexpr = BLOCK_B if CHANNELS_LAST else BLOCK_A
    acc_type = tl.float64 if FP64 else tl.float32
    row_in_tile = 0
    if span:
        L = L_vec
        chan, chan_ok = _block_channels(block, C, BLOCK_A)
        lane = tl.arange(0, BLOCK_B)
        row_in_tile = tl.minimum(lane // L, BLOCK_A - 1)
        rows_here = tl.minimum(C - block * BLOCK_A, BLOCK_A)
        lane_ok = lane < (rows_here * L) // VEC * VEC  # a multiple of VEC the compiler sees
        span_col = lane - row_in_tile * L
        sum_dy = tl.zeros([BLOCK_B], dtype=acc_type)
    else:
        L = L_vec * VEC
        chan, chan_ok = _tile_channels(block, L if CHANNELS_LAST else C, CHANNELS_LAST, BLOCK_A, BLOCK_B)
        sum_dy = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_type)
    sum_dy_xhat = tl.zeros_like(sum_dy)
    sum_k = tl.zeros_like(sum_dy)
    mean = _spread(_vector(mean_ptr, chan, chan_ok, FP64), row_in_tile, span)
    invstd = _spread(_vector(invstd_ptr, chan, chan_ok, FP64), row_in_tile, span)
    gain = invstd  # read for the recomputed mask only
    bias = 0.0
    if RELU and MASK_FROM_X:
        gain = _spread(_gain(invstd_ptr, weight_ptr, chan, chan_ok, HAS_WEIGHT, FP64), row_in_tile, span)
        bias = _bias(bias_ptr, chan, chan_ok, row_in_tile, HAS_BIAS, span, FP64)
    for item in range(program, num_items, P):
        if span:  # item = sample
            offs = (tl.cast(item, tl.int64) * sample_vec + block * tile_vec) * VEC + lane
            ok = lane_ok
        else:
            offs, ok, sample, row, col = _reduction_tile(
                item, chan, chan_ok, M, L, C, num_l_blocks, rows_per_sample, CHANNELS_LAST, BLOCK_A, BLOCK_B
            )
        g = _output_gradient(g_ptr, grad_handoff_ptr, offs, ok, HAS_HANDOFF, FP64)
        x = promote(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64)
        if NEED_K:
            u = promote(tl.load(u_ptr + offs, mask=ok, other=0.0), FP64)
            u_prev = promote(tl.load(u_prev_ptr + offs, mask=ok, other=0.0), FP64)
        s = 1.0
        if HAS_SCALE:
            if span:
                s = promote(tl.load(scale_ptr + item), FP64)
            else:
                s = _vector(scale_ptr, sample, ok, FP64)
        if RELU:
            if MASK_FROM_X:
                pre = _pre_activation(x, 0.0, 0.0, 0.0, mean, gain, bias, s, False, HAS_BIAS, HAS_SCALE)
                g = tl.where(_passes(pre, x_ptr.dtype.element_ty), g, 0.0)
            elif span:
                first = (tl.cast(item, tl.int64) * C + block * BLOCK_A) * mask_row_bytes
                bits = _span_mask_bits(
                    mask_ptr, first, rows_here * mask_row_bytes, row_in_tile, span_col, ok, mask_row_bytes,
                    BLOCK_B,
                )  # fmt: skip
                g = tl.where(bits != 0, g, 0.0)
            else:
                g = tl.where(_mask_bits(mask_ptr, row, col, ok, mask_row_bytes) != 0, g, 0.0)
        dy = g * s if HAS_SCALE else g
        sum_dy += dy
        sum_dy_xhat += dy * ((x - mean) * invstd)
        if NEED_K:
            sum_k += g * (u_prev - u)
    if span:
        sum_dy = _row_totals(sum_dy, L, BLOCK_A, ROW_PAD)
        sum_dy_xhat = _row_totals(sum_dy_xhat, L, BLOCK_A, ROW_PAD)
        sum_k = _row_totals(sum_k, L, BLOCK_A, ROW_PAD)
    else:
        sum_dy = _channel_total(sum_dy, CHANNELS_LAST)
        sum_dy_xhat = _channel_total(sum_dy_xhat, CHANNELS_LAST)
        sum_k = _channel_total(sum_k, CHANNELS_LAST)
    stride = P * C
    _store_partial(partial_ptr, sum_dy, program, block, C, BLOCK_C)
    _store_partial(partial_ptr + stride, sum_dy_xhat, program, block, C, BLOCK_C)
    if NEED_K:
        _store_partial(partial_ptr + 2 * stride, sum_k, program, block, C, BLOCK_C)
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
def _elementwise_tile(
    pid, M, L_vec, C, rows_per_sample, num_l_blocks, tile_rows, tile_vec, total_vec, SPAN: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """The forward's and backward's tile: (row length L, offsets, in bounds, rows, columns, rows in bounds,
    row in the tile (span tiles; else 0), channel, channel in bounds, sample). SPAN: ``_span_tile`` with
    per-row channel and sample [BLOCK_M] (L_vec = L: the tile, not the row, starts on a vector boundary);
    else a 2-D tile (``_tile``, L_vec = L / VEC)."""
    if SPAN:
        offs, ok, row_in_tile, cols, rows, row_ok = _span_tile(
            pid, M, L_vec, tile_rows, tile_vec, total_vec, VEC, BLOCK_M, BLOCK_L
        )
        return L_vec, offs, ok, rows, cols, row_ok, row_in_tile, rows % C, row_ok, rows // rows_per_sample
    else:
        L = L_vec * VEC
        rows, cols, offs, ok = _tile(pid, M, L, num_l_blocks, BLOCK_M, BLOCK_L)
        chan, chan_ok, sample = _channel_and_sample(rows, cols, M, L, C, rows_per_sample, CHANNELS_LAST)
        return L, offs, ok, rows, cols, rows < M, 0, chan, chan_ok, sample


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
    tile_rows,
    tile_vec,
    total_vec,
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
    SPAN: tl.constexpr,
    FP64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out = act(pre + noise_std xi) on one tile, pre = ``_pre_activation``; WRITE_MASK: the ReLU's bits of
    the stored out, 8 elements per byte along the row. A SPAN tile (``_span_tile``, channels-first) loads
    the per-channel values per row and spreads them to its elements in registers."""
    pid = tl.program_id(0)
    span: tl.constexpr = SPAN and not CHANNELS_LAST
    L, offs, ok, rows, cols, row_ok, row_in_tile, chan, chan_ok, sample = _elementwise_tile(
        pid, M, L_vec, C, rows_per_sample, num_l_blocks, tile_rows, tile_vec, total_vec, span, CHANNELS_LAST,
        VEC, BLOCK_M, BLOCK_L,
    )  # fmt: skip
    x = promote(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64)
    k = 0.0  # read only with the states
    u = 0.0
    u_prev = 0.0
    if HAS_STATE:
        k = _step_k(k_ptr, chan, chan_ok, row_in_tile, PER_CHANNEL_K, span, FP64)
        u = promote(tl.load(u_ptr + offs, mask=ok, other=0.0), FP64)
        u_prev = promote(tl.load(u_prev_ptr + offs, mask=ok, other=0.0), FP64)
    bias = _bias(bias_ptr, chan, chan_ok, row_in_tile, HAS_BIAS, span, FP64)
    s, mean, gain = _scale_mean_gain(
        scale_ptr, mean_ptr, invstd_ptr, weight_ptr, sample, row_ok, chan, chan_ok, row_in_tile, HAS_SCALE,
        HAS_WEIGHT, span, FP64,
    )  # fmt: skip
    acc = _pre_activation(x, u, u_prev, k, mean, gain, bias, s, HAS_STATE, HAS_BIAS, HAS_SCALE)
    if HAS_NOISE:
        seed = tl.load(seed_ptr)
        if span:
            # Four normals per Philox call: counter offset // 4, lane offset % 4 (tiles start on 8 elements).
            normals = four_normals(
                seed, pid.to(tl.int64) * (tile_vec * VEC // 4) + tl.arange(0, BLOCK_L // 4)
            )
            acc += noise_std * tl.reshape(normals, [BLOCK_L])
        else:
            # Counter (row, col // 4), lane col % 4 (BLOCK_L is a multiple of 4).
            group = rows * ((L + 3) // 4) + (pid % num_l_blocks).to(tl.int64) * (BLOCK_L // 4)
            normals = four_normals(seed, group + tl.arange(0, BLOCK_L // 4)[None, :])
            acc += noise_std * tl.reshape(normals, [BLOCK_M, BLOCK_L])
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=ok)
    if WRITE_MASK:
        bits = tl.where(ok & _passes(out, out_ptr.dtype.element_ty), 1 << (cols % 8).to(tl.int32), 0)
        if span:
            # The tile's mask bytes are contiguous (tile_rows x mask_row_bytes <= BLOCK_L // 8): byte b
            # gathers the bits of its 8 elements from the flat tile.
            byte_index = tl.arange(0, BLOCK_L // 8)
            byte_row = byte_index // mask_row_bytes
            col = ((byte_index - byte_row * mask_row_bytes) * 8)[:, None] + tl.arange(0, 8)[None, :]
            in_tile = (col < L) & (byte_row < tile_rows)[:, None]
            element = tl.reshape(tl.where(in_tile, byte_row[:, None] * L + col, 0), [BLOCK_L])
            gathered = tl.reshape(tl.gather(bits, element, 0), [BLOCK_L // 8, 8])
            byte = tl.sum(tl.where(in_tile, gathered, 0), axis=1)
            first = pid.to(tl.int64) * tile_rows * mask_row_bytes
            byte_ok = (byte_row < tile_rows) & (first + byte_index < tl.cast(M, tl.int64) * mask_row_bytes)
            tl.store(mask_ptr + first + byte_index, byte.to(tl.uint8), mask=byte_ok)
        else:
            byte = tl.sum(tl.reshape(bits, [BLOCK_M, BLOCK_L // 8, 8]), axis=2)
            byte_cols = (pid % num_l_blocks) * (BLOCK_L // 8) + tl.arange(0, BLOCK_L // 8)[None, :]
            byte_ok = row_ok & (byte_cols < mask_row_bytes)
            tl.store(mask_ptr + rows * mask_row_bytes + byte_cols, byte.to(tl.uint8), mask=byte_ok)


@triton.jit
def batch_norm_lm_step_backward_kernel(
    g_ptr,
    grad_handoff_ptr,
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
    tile_rows,
    tile_vec,
    total_vec,
    per_channel,
    HAS_HANDOFF: tl.constexpr,
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
    SPAN: tl.constexpr,
    FP64: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """grad_x = gain (dy - sum(dy) / n - xhat sum(dy xhat) / n) (training; gain dy in evaluation),
    grad_u = (1 - k) g (+ grad_shortcut, unmasked), grad_u_prev = k g, on one tile (a SPAN tile as in the
    forward); g: ``_output_gradient`` (HAS_HANDOFF: two parts) through the ReLU's mask."""
    pid = tl.program_id(0)
    span: tl.constexpr = SPAN and not CHANNELS_LAST
    L, offs, ok, rows, cols, row_ok, row_in_tile, chan, chan_ok, sample = _elementwise_tile(
        pid, M, L_vec, C, rows_per_sample, num_l_blocks, tile_rows, tile_vec, total_vec, span, CHANNELS_LAST,
        VEC, BLOCK_M, BLOCK_L,
    )  # fmt: skip
    # Every load before the first store (Triton must assume the pointers may alias).
    g = _output_gradient(g_ptr, grad_handoff_ptr, offs, ok, HAS_HANDOFF, FP64)
    x = 0.0
    if (NEED_X and TRAINING) or (RELU and MASK_FROM_X):
        x = promote(tl.load(x_ptr + offs, mask=ok, other=0.0), FP64)
    shortcut = 0.0
    if HAS_SHORTCUT and NEED_U:
        shortcut = promote(tl.load(grad_shortcut_ptr + offs, mask=ok, other=0.0), FP64)
    s, mean, gain = _scale_mean_gain(
        scale_ptr, mean_ptr, invstd_ptr, weight_ptr, sample, row_ok, chan, chan_ok, row_in_tile, HAS_SCALE,
        HAS_WEIGHT, span, FP64,
    )  # fmt: skip
    if RELU:
        if MASK_FROM_X:
            bias = _bias(bias_ptr, chan, chan_ok, row_in_tile, HAS_BIAS, span, FP64)
            pre = _pre_activation(x, 0.0, 0.0, 0.0, mean, gain, bias, s, False, HAS_BIAS, HAS_SCALE)
            g = tl.where(_passes(pre, x_ptr.dtype.element_ty), g, 0.0)
        elif span:
            first = pid.to(tl.int64) * tile_rows * mask_row_bytes
            byte_count = tl.minimum(tile_rows * mask_row_bytes, tl.cast(M, tl.int64) * mask_row_bytes - first)
            bits = _span_mask_bits(
                mask_ptr, first, byte_count, row_in_tile, cols, ok, mask_row_bytes, BLOCK_L
            )
            g = tl.where(bits != 0, g, 0.0)
        else:
            g = tl.where(_mask_bits(mask_ptr, rows, cols, ok, mask_row_bytes) != 0, g, 0.0)
    if NEED_X:
        dy = g * s if HAS_SCALE else g
        if TRAINING:
            count = tl.cast(per_channel, tl.float64 if FP64 else tl.float32)
            invstd = _spread(_vector(invstd_ptr, chan, chan_ok, FP64), row_in_tile, span)
            mean_dy = _spread(_vector(sum_dy_ptr, chan, chan_ok, FP64) / count, row_in_tile, span)
            mean_dy_xhat = _spread(_vector(sum_dy_xhat_ptr, chan, chan_ok, FP64) / count, row_in_tile, span)
            dy = dy - mean_dy - (x - mean) * invstd * mean_dy_xhat
        tl.store(grad_x_ptr + offs, (gain * dy).to(grad_x_ptr.dtype.element_ty), mask=ok)
    if NEED_U or NEED_U_PREV:
        k = _step_k(k_ptr, chan, chan_ok, row_in_tile, PER_CHANNEL_K, span, FP64)
        store_state_grads(
            grad_u_ptr, grad_u_prev_ptr, offs, ok, g, k, shortcut, HAS_SHORTCUT, NEED_U, NEED_U_PREV
        )


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
REDUCE_BYTES_PER_THREAD = 16
REDUCE_MAX_CHANNELS = 128
# The span backward reduction with the handoff: left to choose, ptxas keeps 96 registers at sm_90 (5 CTAs per
# SM) by using the first loads of a tile before it issues the last (48 B in flight per thread, 30 KB per SM);
# with 128 (4 CTAs per SM, as without the handoff) it issues all five first (81 B, 40.5 KB per SM; counted by
# tools/compile_triton_sm90.py --table).
SPAN_HANDOFF_MAX_REGISTERS = 128
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
        block_l = min(candidates, key=lambda b: (cdiv(L, b) * b, -b))
    block_m = max(1, min(triton.next_power_of_2(rows), tile // block_l))
    return block_m, block_l, cdiv(rows, block_m) * cdiv(L, block_l)


class Span(NamedTuple):
    """Launch shape of a span tile (``_span_tile``): rows per tile, BLOCK_M (a power of two >= rows),
    BLOCK_L lanes, VEC, the tile and the tensor in VEC-element vectors, programs."""

    tile_rows: int
    block_m: int
    block_l: int
    vec: int
    tile_vec: int
    total_vec: int
    num_programs: int


@functools.lru_cache(maxsize=512)
def span_shape(channels_last: bool, rows: int, L: int, element_size: int) -> Span | None:
    """Tiles of whole rows for the forward and backward where channels-first rows are not a multiple of
    the 16-byte vector (7x7, 14x14): as many rows as fit one 16-byte vector per thread and tensor with
    their mask bytes (rows x mask_row_bytes <= BLOCK_L // 8), in steps that start every tile on 8 elements
    (noise) and on the widest vector the row length allows; None where rows are vector-aligned or too long.
    (32 bytes per thread took 168 registers in the forward at sm_90, 3 CTAs per SM; 16 bytes take 80.)"""
    vec_full = max(1, 16 // element_size)
    if channels_last or L % vec_full == 0:
        return None
    block_l = _tile_elements(element_size, 16)
    step = 8 // math.gcd(L, 8)
    tile_rows = block_l // (8 * cdiv(L, 8)) // step * step
    if tile_rows == 0:
        return None
    vec = _vec(math.gcd(tile_rows * L, rows * L), element_size)
    block_m = triton.next_power_of_2(tile_rows)
    return Span(
        tile_rows, block_m, block_l, vec, tile_rows * L // vec, rows * L // vec, cdiv(rows, tile_rows)
    )


@functools.lru_cache(maxsize=512)
def reduction_shape(
    plan: Plan, element_size: int, bytes_per_thread: int, max_channels: int | None = None
) -> tuple[int, int, int, int, int]:
    """(BLOCK_A, BLOCK_B, num_l_blocks, num_items, P x B grid as (P, B)) of a reduction: tiles of
    ``bytes_per_thread`` per thread and tensor, channels-last channel blocks of at most ``max_channels``,
    narrowed (down to 32-byte rows) until MAX_PARTIALS row groups per block give _TARGET_PROGRAMS programs,
    at most MAX_PARTIALS per block."""
    tile = _tile_elements(element_size, bytes_per_thread)
    C, L = int(plan.channels), int(plan.row_len)
    if plan.channels_last:
        block_c = min(triton.next_power_of_2(C), tile, max_channels or tile)
        narrowest = max(1, 32 // element_size)
        while cdiv(C, block_c) * MAX_PARTIALS < _TARGET_PROGRAMS and block_c // 2 >= narrowest:
            block_c //= 2
        block_a, block_b = max(1, tile // block_c), block_c
        num_l_blocks, num_items = 1, cdiv(int(plan.rows), block_a)
    else:
        block_b = min(elementwise_shape(False, int(plan.rows), L, element_size)[1], tile)
        block_a = max(1, min(triton.next_power_of_2(C), tile // block_b))
        num_l_blocks = cdiv(L, block_b)
        num_items = (int(plan.rows) // C) * num_l_blocks
        block_c = block_a
    blocks = cdiv(C, block_c)
    partials = max(1, min(MAX_PARTIALS, num_items, cdiv(_TARGET_PROGRAMS, blocks)))
    return block_a, block_b, num_l_blocks, num_items, (partials, blocks)


class ReductionTiles(NamedTuple):
    """Launch shape of a reduction: a 2-D tile (``reduction_shape``) or a span tile of BLOCK_A whole rows
    (rows of any length, ``batch_norm_stats_kernel``)."""

    is_span: bool
    row_len_arg: int  # L (span) or L // VEC
    vec: int
    block_a: int
    block_b: int
    num_l_blocks: int
    num_items: int
    sample_vec: int  # span: a sample's and a tile's length in vectors (else 0)
    tile_vec: int
    row_pad: int  # span: a power of two >= L (else 1)
    grid: tuple[int, int]


@functools.lru_cache(maxsize=512)
def reduction_tiles(
    plan: Plan, element_size: int, bytes_per_thread: int, max_channels: int | None = None
) -> ReductionTiles:
    """A reduction's tiles: channels-first rows that are not a multiple of the 16-byte vector (7x7, 14x14)
    as span tiles of the largest power of two of rows that fit ``bytes_per_thread`` per thread with their
    mask bytes, vectors as wide as the sample's and the tile's length allow; others as ``reduction_shape``."""
    C, L, rows = int(plan.channels), int(plan.row_len), int(plan.rows)
    lanes = _tile_elements(element_size, bytes_per_thread)
    padded = 8 * cdiv(L, 8)  # a row's elements with its mask bytes' padding
    if not plan.channels_last and L % max(1, 16 // element_size) and padded <= lanes:
        block_a = min(triton.next_power_of_2(C), 1 << (lanes // padded).bit_length() - 1)
        vec = _vec(math.gcd(C * L, block_a * L), element_size)
        blocks, samples = cdiv(C, block_a), rows // C
        partials = max(1, min(MAX_PARTIALS, samples, cdiv(_TARGET_PROGRAMS, blocks)))
        return ReductionTiles(True, L, vec, block_a, lanes, 1, samples, C * L // vec, block_a * L // vec,
                              triton.next_power_of_2(L), (partials, blocks))  # fmt: skip
    block_a, block_b, num_l_blocks, num_items, grid = reduction_shape(
        plan, element_size, bytes_per_thread, max_channels
    )
    vec = _vec(L, element_size)
    return ReductionTiles(False, L // vec, vec, block_a, block_b, num_l_blocks, num_items, 0, 0, 1, grid)


def stats_shape(plan: Plan, element_size: int) -> ReductionTiles:
    """The statistics' tiles: STATS_BYTES_PER_THREAD per thread (STATS_ITEMS of them loaded per step)."""
    return reduction_tiles(plan, element_size, STATS_BYTES_PER_THREAD)


def backward_reduction_shape(plan: Plan, element_size: int) -> ReductionTiles:
    """The backward reduction's tiles: one 16-byte vector per thread and tensor (four loads per tile with
    grad_k), channels-last channel blocks of at most 128 channels (8 x 128 at 2048 channels: 79 registers
    at sm_90 where 8 x 256 with 32 bytes per thread took 152)."""
    return reduction_tiles(plan, element_size, REDUCE_BYTES_PER_THREAD, REDUCE_MAX_CHANNELS)


def backward_reduction_options(tiles: ReductionTiles, has_handoff: bool) -> dict[str, int]:
    """Launch options of the backward reduction besides its tiles and warps: for span tiles with the
    handoff (five tensors read per tile) a register budget, Triton's ``maxnreg``, of
    SPAN_HANDOFF_MAX_REGISTERS; none otherwise (the launch as it was before the handoff)."""
    return {"maxnreg": SPAN_HANDOFF_MAX_REGISTERS} if tiles.is_span and has_handoff else {}


class ElementwiseTiles(NamedTuple):
    """Arguments of a forward or backward launch: a span tile (``span_shape``) or a 2-D one."""

    is_span: bool
    span: Span  # zeros for a 2-D tile (unused arguments)
    row_len_arg: int  # L (span) or L // VEC
    num_l_blocks: int
    vec: int
    block_m: int
    block_l: int
    num_programs: int


def _elementwise_tiles(plan: Plan, element_size: int) -> ElementwiseTiles:
    rows, L = int(plan.rows), int(plan.row_len)
    span = span_shape(plan.channels_last, rows, L, element_size)
    if span is not None:
        return ElementwiseTiles(True, span, L, 1, span.vec, span.block_m, span.block_l, span.num_programs)
    vec = _vec(L, element_size)
    block_m, block_l, num_programs = elementwise_shape(plan.channels_last, rows, L, element_size)
    none = Span(0, 0, 0, 0, 0, 0, 0)
    return ElementwiseTiles(False, none, L // vec, cdiv(L, block_l), vec, block_m, block_l, num_programs)


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
    return aligned(t.contiguous()) if t is not None else other


def batch_norm_stats_triton(args: BatchNormStatsArgs) -> tuple[Tensor, Tensor]:
    """One launch: per-channel mean and invstd (float32; float64 for float64 x) and, in training, the running
    statistics updated in place; in evaluation of the running statistics (x not read)."""
    x, running_mean, running_var, eps = args.x, args.running_mean, args.running_var, args.eps
    channels = x.shape[1]
    acc = _acc_dtype(x)
    mean = x.new_empty((channels,), dtype=acc)
    invstd = x.new_empty((channels,), dtype=acc)
    fp64 = acc == torch.float64
    if not args.training:
        block_c = min(1024, triton.next_power_of_2(max(channels, 1)))
        launcher(batch_norm_eval_stats_kernel)[(cdiv(channels, block_c),)](
            _stand_in(running_mean, mean), _stand_in(running_var, mean), mean, invstd, channels, float(eps),
            FP64=fp64, BLOCK_C=block_c, num_warps=NUM_WARPS,
        )  # fmt: skip
        return mean, invstd
    if x.numel() == 0:  # as F.batch_norm: nothing to average, running statistics untouched
        return mean.zero_(), invstd.fill_(1.0 / (1.0 + eps) ** 0.5)
    plan = plan_layout(x)
    x = aligned(to_layout(x, plan.channels_last))
    shape = stats_shape(plan, x.element_size())
    grid = shape.grid
    partials = torch.empty((2, grid[0], channels), dtype=acc, device=x.device)
    has_running = running_mean is not None
    launcher(batch_norm_stats_kernel)[grid](
        x,
        partials,
        _counters(x, grid[1]),
        mean,
        invstd,
        running_mean if has_running else mean,  # in place: F.batch_norm's own (contiguous) buffers
        running_var if has_running else invstd,
        plan.rows,
        shape.row_len_arg,
        channels,
        shape.num_l_blocks,
        shape.num_items,
        shape.sample_vec,
        shape.tile_vec,
        x.numel() // channels,
        float(args.momentum),
        float(eps),
        HAS_RUNNING=has_running,
        CHANNELS_LAST=plan.channels_last,
        SPAN=shape.is_span,
        FP64=fp64,
        VEC=shape.vec,
        BLOCK_A=shape.block_a,
        BLOCK_B=shape.block_b,
        ITEMS=STATS_ITEMS,
        MERGE_ROWS=_MERGE_ROWS,
        ROW_PAD=shape.row_pad,
        num_warps=NUM_WARPS,
    )
    return mean, invstd


def _mask_row_bytes(plan: Plan) -> int:
    return cdiv(int(plan.row_len), 8)


def _elementwise_args(plan: Plan, tiles: ElementwiseTiles) -> tuple:
    """The forward's and backward's tile arguments, M to total_vec."""
    return (
        plan.rows,
        tiles.row_len_arg,
        plan.channels,
        plan.rows_per_sample,
        tiles.num_l_blocks,
        _mask_row_bytes(plan),
        tiles.span.tile_rows,
        tiles.span.tile_vec,
        tiles.span.total_vec,
    )


def batch_norm_lm_step_forward_triton(args: BatchNormForwardArgs) -> tuple[Tensor, Tensor]:
    """One launch: out in u's planned layout (without u and u_prev, the no-state mode, x's) and, with
    ``write_mask``, the ReLU's 1-bit mask of it. Inputs are validated by lmfused.batch_norm_step."""
    u, u_prev, mean, k, write_mask = args.u, args.u_prev, args.mean, args.k, args.write_mask
    has_state = u is not None
    plan = plan_layout(u if has_state else args.x)
    layout = plan.channels_last
    x = to_layout(args.x, layout)
    out = empty_in_layout(x.shape, layout, dtype=x.dtype, device=x.device)
    mask_row_bytes = _mask_row_bytes(plan)
    mask = x.new_empty((plan.rows, mask_row_bytes) if write_mask else (0,), dtype=torch.uint8)
    if x.numel() == 0:
        return out, mask
    if has_state:
        u, u_prev = to_layout(u, layout), to_layout(u_prev, layout)
    tiles = _elementwise_tiles(plan, x.element_size())
    has_noise = args.noise_std > 0.0
    launcher(batch_norm_lm_step_forward_kernel)[(tiles.num_programs,)](
        x,
        mean,
        args.invstd,
        _stand_in(args.weight, mean),
        _stand_in(args.bias, mean),
        u if has_state else x,  # unused pointers stand in for tensors a variant does not read
        u_prev if has_state else x,
        _stand_in(k, mean),
        _stand_in(args.scale, mean),
        args.seed if has_noise else mean,
        out,
        mask if write_mask else out,
        *_elementwise_args(plan, tiles),
        float(args.noise_std),
        HAS_STATE=has_state,
        HAS_WEIGHT=args.weight is not None,
        HAS_BIAS=args.bias is not None,
        HAS_SCALE=args.scale is not None,
        RELU=args.relu,
        HAS_NOISE=has_noise,
        WRITE_MASK=write_mask,
        PER_CHANNEL_K=has_state and k.numel() > 1,
        CHANNELS_LAST=layout,
        SPAN=tiles.is_span,
        FP64=x.dtype == torch.float64,
        VEC=tiles.vec,
        BLOCK_M=tiles.block_m,
        BLOCK_L=tiles.block_l,
        num_warps=NUM_WARPS,
    )
    return out, mask


def batch_norm_lm_step_backward_reduce_triton(
    args: BatchNormBackwardReduceArgs,
) -> tuple[Tensor, Tensor, Tensor]:
    """One launch: per-channel sums of dy and dy * xhat and (``need_k``) grad_k = sum g * (u_prev - u) in
    k's shape, merged in the kernel; g = grad_out (+ ``grad_handoff``, added in the kernel). With ``relu``
    the forward's mask, or without one (the no-state mode) the mask recomputed from x as the forward
    computes the pre-activation."""
    x, mean, weight, bias, scale = args.x, args.mean, args.weight, args.bias, args.scale
    k, mask, relu, need_k = args.k, args.mask, args.relu, args.need_k
    plan = plan_layout(x)
    layout, channels = plan.channels_last, plan.channels
    acc = _acc_dtype(args.grad_out)
    sum_dy = x.new_empty((channels,), dtype=acc)
    sum_dy_xhat = x.new_empty((channels,), dtype=acc)
    grad_k = x.new_empty(tuple(k.shape) if need_k else (0,), dtype=acc)
    if x.numel() == 0:
        return sum_dy.zero_(), sum_dy_xhat.zero_(), grad_k.zero_()
    # Aligned operands (see the module docstring): the sums' bits depend only on the values.
    g, x = aligned(to_layout(args.grad_out, layout)), aligned(to_layout(x, layout))
    grad_handoff = args.grad_handoff
    has_handoff = grad_handoff is not None
    if has_handoff:
        grad_handoff = aligned(to_layout(grad_handoff, layout))
    if need_k:
        u, u_prev = aligned(to_layout(args.u, layout)), aligned(to_layout(args.u_prev, layout))
    mask_from_x = relu and mask is None
    tiles = backward_reduction_shape(plan, x.element_size())
    grid = tiles.grid
    partials = torch.empty((4 if need_k else 2, grid[0], channels), dtype=acc, device=x.device)
    launcher(batch_norm_lm_step_backward_reduce_kernel)[grid](
        g,
        grad_handoff if has_handoff else g,  # unused pointers stand in for tensors a variant does not read
        x,
        u if need_k else g,
        u_prev if need_k else g,
        mask if relu and not mask_from_x else g,
        mean,
        args.invstd,
        _stand_in(weight, mean),
        _stand_in(bias, mean),
        _stand_in(scale, mean),
        partials,
        _counters(x, grid[1] + 1),
        sum_dy,
        sum_dy_xhat,
        grad_k if need_k else sum_dy,
        plan.rows,
        tiles.row_len_arg,
        channels,
        tiles.num_l_blocks,
        tiles.num_items,
        plan.rows_per_sample,
        _mask_row_bytes(plan),
        tiles.sample_vec,
        tiles.tile_vec,
        HAS_HANDOFF=has_handoff,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        RELU=relu,
        MASK_FROM_X=mask_from_x,
        NEED_K=need_k,
        SCALAR_K=k.numel() == 1,
        CHANNELS_LAST=layout,
        SPAN=tiles.is_span,
        FP64=acc == torch.float64,
        VEC=tiles.vec,
        BLOCK_A=tiles.block_a,
        BLOCK_B=tiles.block_b,
        MERGE_ROWS=_MERGE_ROWS,
        ROW_PAD=tiles.row_pad,
        num_warps=NUM_WARPS,
        **backward_reduction_options(tiles, has_handoff),
    )
    return sum_dy, sum_dy_xhat, grad_k


def batch_norm_lm_step_backward_triton(args: BatchNormBackwardArgs) -> tuple[Tensor, Tensor, Tensor]:
    """One launch: grad_x, grad_u (+ ``grad_shortcut``, the gradient of the step's shortcut output) and
    grad_u_prev (the needed ones; others empty) of g = grad_out (+ ``grad_handoff``, added in the kernel).
    With ``relu`` the forward's mask, or without one (the no-state mode) the mask recomputed from x."""
    mean, weight, bias, scale = args.mean, args.weight, args.bias, args.scale
    k, mask, relu = args.k, args.mask, args.relu
    need_x, need_u, need_u_prev = args.need_x, args.need_u, args.need_u_prev
    plan = plan_layout(args.x)
    layout = plan.channels_last
    g = to_layout(args.grad_out, layout)

    def grad(needed: bool) -> Tensor:  # unneeded: a fresh empty tensor each (outputs must not alias)
        return (
            empty_in_layout(g.shape, layout, dtype=g.dtype, device=g.device) if needed else g.new_empty((0,))
        )

    grad_x, grad_u, grad_u_prev = grad(need_x), grad(need_u), grad(need_u_prev)
    if g.numel() == 0:
        return grad_x, grad_u, grad_u_prev
    grad_handoff, grad_shortcut = args.grad_handoff, args.grad_shortcut
    has_handoff = grad_handoff is not None
    if has_handoff:
        grad_handoff = to_layout(grad_handoff, layout)  # read where grad_out is: the same plan
    has_shortcut = grad_shortcut is not None and need_u
    if has_shortcut:
        grad_shortcut = to_layout(grad_shortcut, layout)
    x = to_layout(args.x, layout)
    mask_from_x = relu and mask is None
    tiles = _elementwise_tiles(plan, x.element_size())
    launcher(batch_norm_lm_step_backward_kernel)[(tiles.num_programs,)](
        g,
        grad_handoff if has_handoff else g,  # unused pointers stand in for tensors a variant does not use
        grad_shortcut if has_shortcut else g,
        x,
        mask if relu and not mask_from_x else g,
        mean,
        args.invstd,
        _stand_in(weight, mean),
        _stand_in(bias, mean),
        args.sum_dy,
        args.sum_dy_xhat,
        _stand_in(k, mean),
        _stand_in(scale, mean),
        grad_x if need_x else g,
        grad_u if need_u else g,
        grad_u_prev if need_u_prev else g,
        *_elementwise_args(plan, tiles),
        x.numel() // plan.channels,
        HAS_HANDOFF=has_handoff,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None,
        RELU=relu,
        MASK_FROM_X=mask_from_x,
        HAS_SHORTCUT=has_shortcut,
        TRAINING=args.training,
        PER_CHANNEL_K=k.numel() > 1,
        NEED_X=need_x,
        NEED_U=need_u,
        NEED_U_PREV=need_u_prev,
        CHANNELS_LAST=layout,
        SPAN=tiles.is_span,
        FP64=g.dtype == torch.float64,
        VEC=tiles.vec,
        BLOCK_M=tiles.block_m,
        BLOCK_L=tiles.block_l,
        num_warps=NUM_WARPS,
    )
    return grad_x, grad_u, grad_u_prev
