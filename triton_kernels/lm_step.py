"""Triton kernels for the fused LM step (Lu et al., ICML 2018, LM-architecture) and their launchers.

One forward and one backward kernel. Both walk the activation as the 2-D matrix of ``lmfused._layout``
(M rows of L contiguous elements) in [BLOCK_M, BLOCK_L] tiles over a 1-D grid, with 64-bit offsets.
Every option is a ``tl.constexpr`` so each variant compiles to straight-line code:

    HAS_F, HAS_SCALE, RELU, HAS_NOISE, PER_CHANNEL_K, CHANNELS_LAST, FP64 (float64 math for gradcheck)

The backward writes only the gradients asked for, and the per-program float32 partial sums of
dL/dk = sum g * (u_prev - u) (one per program for a scalar k, one per program and channel otherwise) into a
buffer that one torch reduction sums: no atomics, so the same inputs give bitwise the same gradients. Block
sizes are a fixed function of the shape (no autotuning), so the partial-sum buffer's shape is known before
launch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from lmfused._layout import Plan, empty_in_layout, plan_layout, to_layout

__all__ = ["INTERPRETED", "lm_step_backward_triton", "lm_step_forward_triton"]


@triton.jit
def _acc(x, FP64: tl.constexpr):
    """Promote to the accumulation type: float64 for float64 tensors, float32 otherwise."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _tile(pid, M, L, num_l_blocks, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """Rows, columns, element offsets (int64) and bounds mask of this program's tile."""
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
def _coefficient_k(
    k_ptr, rows, cols, row_ok, col_ok, C, PER_CHANNEL_K: tl.constexpr, CHANNELS_LAST: tl.constexpr, FP64
):
    """k broadcastable to the tile: one scalar, or per channel along columns / rows."""
    if PER_CHANNEL_K:
        if CHANNELS_LAST:
            k = _acc(tl.load(k_ptr + cols, mask=col_ok, other=0.0), FP64)[None, :]
        else:
            k = _acc(tl.load(k_ptr + rows % C, mask=row_ok, other=0.0), FP64)[:, None]
    else:
        k = _acc(tl.load(k_ptr), FP64)
    return k


@triton.jit
def _sample_scale(scale_ptr, rows, row_ok, rows_per_sample, FP64: tl.constexpr):
    """The stochastic-depth multiplier of each row's sample, as a column vector."""
    return _acc(tl.load(scale_ptr + rows // rows_per_sample, mask=row_ok, other=0.0), FP64)[:, None]


@triton.jit
def lm_step_forward_kernel(
    u_ptr,
    u_prev_ptr,
    f_ptr,
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
    HAS_F: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    PER_CHANNEL_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out = act((1 - k) u + k u_prev + s f + noise_std xi) on one tile."""
    pid = tl.program_id(0)
    _, _, rows, cols, row_ok, col_ok, offs, mask = _tile(pid, M, L, num_l_blocks, BLOCK_M, BLOCK_L)
    k = _coefficient_k(k_ptr, rows, cols, row_ok, col_ok, C, PER_CHANNEL_K, CHANNELS_LAST, FP64)
    u = _acc(tl.load(u_ptr + offs, mask=mask, other=0.0), FP64)
    u_prev = _acc(tl.load(u_prev_ptr + offs, mask=mask, other=0.0), FP64)
    acc = (1.0 - k) * u + k * u_prev
    if HAS_F:
        f = _acc(tl.load(f_ptr + offs, mask=mask, other=0.0), FP64)
        if HAS_SCALE:
            f = f * _sample_scale(scale_ptr, rows, row_ok, rows_per_sample, FP64)
        acc += f
    if HAS_NOISE:
        # Philox counter = the element's memory offset: reproducible from the seed alone, no host sync.
        seed = tl.load(seed_ptr)
        acc += noise_std * tl.randn(seed, offs)
    if RELU:
        # As torch.relu: NaN stays NaN (tl.maximum would return 0 for it and hide a diverging run).
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lm_step_backward_kernel(
    g_ptr,
    u_ptr,
    u_prev_ptr,
    out_ptr,
    k_ptr,
    scale_ptr,
    grad_u_ptr,
    grad_u_prev_ptr,
    grad_f_ptr,
    partial_ptr,
    M,
    L,
    C,
    rows_per_sample,
    num_l_blocks,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    PER_CHANNEL_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    NEED_U: tl.constexpr,
    NEED_U_PREV: tl.constexpr,
    NEED_F: tl.constexpr,
    NEED_K: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """grad_u = (1-k) g, grad_u_prev = k g, grad_f = s g and partial sums of g (u_prev - u) on one tile."""
    pid = tl.program_id(0)
    pid_m, pid_l, rows, cols, row_ok, col_ok, offs, mask = _tile(pid, M, L, num_l_blocks, BLOCK_M, BLOCK_L)
    # Every load before the first store: Triton must assume the pointers may alias, so a load after a
    # store could not be hoisted, and fewer bytes would be in flight.
    g = _acc(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
    if NEED_K:
        u = _acc(tl.load(u_ptr + offs, mask=mask, other=0.0), FP64)
        u_prev = _acc(tl.load(u_prev_ptr + offs, mask=mask, other=0.0), FP64)
    if RELU:
        out = tl.load(out_ptr + offs, mask=mask, other=0.0)
        # As torch's threshold_backward: zero where out <= 0, so a NaN output passes its gradient on.
        g = tl.where(out <= 0, 0.0, g)
    if NEED_U or NEED_U_PREV:
        k = _coefficient_k(k_ptr, rows, cols, row_ok, col_ok, C, PER_CHANNEL_K, CHANNELS_LAST, FP64)
        if NEED_U:
            tl.store(grad_u_ptr + offs, ((1.0 - k) * g).to(grad_u_ptr.dtype.element_ty), mask=mask)
        if NEED_U_PREV:
            tl.store(grad_u_prev_ptr + offs, (k * g).to(grad_u_prev_ptr.dtype.element_ty), mask=mask)
    if NEED_F:
        grad_f = g
        if HAS_SCALE:
            grad_f = g * _sample_scale(scale_ptr, rows, row_ok, rows_per_sample, FP64)
        tl.store(grad_f_ptr + offs, grad_f.to(grad_f_ptr.dtype.element_ty), mask=mask)
    if NEED_K:
        d = g * (u_prev - u)
        if not PER_CHANNEL_K:
            # One partial per program: buffer (num_programs,).
            tl.store(partial_ptr + pid, tl.sum(tl.sum(d, axis=1), axis=0))
        elif CHANNELS_LAST:
            # One partial per column (channel): buffer (num_m_blocks, L).
            tl.store(partial_ptr + pid_m.to(tl.int64) * L + cols, tl.sum(d, axis=0), mask=col_ok)
        else:
            # One partial per row (sample, channel): buffer (num_l_blocks, M).
            tl.store(partial_ptr + pid_l.to(tl.int64) * M + rows, tl.sum(d, axis=1), mask=row_ok)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

_TILE_ELEMENTS = 4096  # elements per program: 8 KiB of bf16 per tensor keeps enough bytes in flight


def _block_shape(plan: Plan) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_L, num_warps): a fixed function of the shape, so partial buffers are known up front.

    Block sizes are compile-time constants, so a symbolic shape (torch.compile with dynamic shapes) is
    specialised here.
    """
    return _block_shape_static(plan.channels_last, int(plan.rows), int(plan.row_len))


@functools.lru_cache(maxsize=256)
def _block_shape_static(channels_last: bool, rows: int, L: int) -> tuple[int, int, int]:
    if channels_last:
        block_l = min(triton.next_power_of_2(L), _TILE_ELEMENTS)
    else:
        # The row length is the spatial size (3136, 784, 196, 49 in a ResNet): pick the power of two
        # that wastes the fewest masked lanes, preferring longer rows on ties.
        candidates = [b for b in (32, 64, 128, 256, 512, 1024) if b <= max(32, triton.next_power_of_2(L))]
        block_l = min(candidates, key=lambda b: (_cdiv(L, b) * b, -b))
    block_m = max(1, min(triton.next_power_of_2(rows), _TILE_ELEMENTS // block_l))
    num_warps = 8 if block_m * block_l >= 4096 else 4
    return block_m, block_l, num_warps


# Under TRITON_INTERPRET=1 the kernels run through Triton's CPU interpreter, which torch cannot trace into.
INTERPRETED = not isinstance(lm_step_forward_kernel, triton.runtime.jit.JITFunction)


def _launcher(kernel):
    """The kernel wrapped for torch.library tracing where the installed torch can (triton_op/wrap_triton)."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain integers: triton.cdiv costs a JIT-function call per use on the host


_ALIGNMENT = 16  # bytes: Triton specialises pointer arguments on this divisibility


def _aligned(t: Tensor) -> Tensor:
    """``t``, or a copy in the same layout when its data does not start on a 16-byte boundary.

    Allocations are aligned (CUDA's caching allocator to 512 bytes), so a misaligned pointer means a view at
    a storage offset; the offset is read instead of the pointer, which traced (fake) tensors do not have.
    """
    if (t.storage_offset() * t.element_size()) % _ALIGNMENT == 0:
        return t
    return t.clone()  # preserve_format: dense strides are kept


def _grid(plan: Plan, block_m: int, block_l: int) -> tuple[int, int]:
    num_l_blocks = _cdiv(plan.row_len, block_l)
    return _cdiv(plan.rows, block_m) * num_l_blocks, num_l_blocks


def lm_step_forward_triton(
    u: Tensor,
    u_prev: Tensor,
    f: Tensor | None,
    k: Tensor,
    scale: Tensor | None,
    seed: Tensor | None,
    relu: bool,
    noise_std: float,
) -> Tensor:
    """Launch the forward kernel; inputs are validated by lmfused.ops. Output has u's planned layout."""
    plan = plan_layout(u)
    u = to_layout(u, plan.channels_last)
    out = empty_in_layout(u.shape, plan.channels_last, dtype=u.dtype, device=u.device)
    if u.numel() == 0:
        return out
    u_prev = to_layout(u_prev, plan.channels_last)
    f = to_layout(f, plan.channels_last) if f is not None else None
    k = k.contiguous()  # (1,) or (C,), any float dtype: the kernel promotes it on load, as it does scale
    scale = scale.contiguous() if scale is not None else None
    has_noise = noise_std > 0.0
    block_m, block_l, num_warps = _block_shape(plan)
    num_programs, num_l_blocks = _grid(plan, block_m, block_l)
    _launcher(lm_step_forward_kernel)[(num_programs,)](
        u,
        u_prev,
        f if f is not None else u,  # unused pointer when HAS_F is off
        k,
        scale if scale is not None else k,
        seed if has_noise else k,
        out,
        plan.rows,
        plan.row_len,
        plan.channels,
        plan.rows_per_sample,
        num_l_blocks,
        float(noise_std),
        HAS_F=f is not None,
        HAS_SCALE=scale is not None and f is not None,
        RELU=relu,
        HAS_NOISE=has_noise,
        PER_CHANNEL_K=k.numel() > 1,
        CHANNELS_LAST=plan.channels_last,
        FP64=u.dtype == torch.float64,
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        num_warps=num_warps,
    )
    return out


def lm_step_backward_triton(
    grad_out: Tensor,
    u: Tensor | None,
    u_prev: Tensor | None,
    out: Tensor | None,
    k: Tensor,
    scale: Tensor | None,
    relu: bool,
    need_u: bool,
    need_u_prev: bool,
    need_f: bool,
    need_k: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward kernel, then sum the grad_k partials in a fixed order."""
    plan = plan_layout(u if u is not None else grad_out)
    layout = plan.channels_last
    g = to_layout(grad_out, layout)
    fp64 = g.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32

    def grad_buffer(needed: bool) -> Tensor:
        if not needed:
            return g.new_empty((0,))
        return empty_in_layout(g.shape, layout, dtype=g.dtype, device=g.device)

    grad_u, grad_u_prev, grad_f = grad_buffer(need_u), grad_buffer(need_u_prev), grad_buffer(need_f)
    if not need_k:
        grad_k = k.new_empty((0,))
    elif g.numel() == 0:
        grad_k = torch.zeros_like(k)
    if g.numel() == 0:
        return grad_u, grad_u_prev, grad_f, grad_k

    block_m, block_l, num_warps = _block_shape(plan)
    num_programs, num_l_blocks = _grid(plan, block_m, block_l)
    if need_k:
        # Triton compiles a variant per pointer alignment, and the variant's register layout sets the order
        # of the in-program sums: grad_k's bits would depend on where the data sits. Misaligned views (rare)
        # are copied so that the same values always take the same variant.
        g = _aligned(g)
        u = _aligned(to_layout(u, layout))
        u_prev = _aligned(to_layout(u_prev, layout))
        # Scalar k: one partial per program. Per channel, every row of the buffer holds one partial per
        # channel: channels-last, one row per row-block; channels-first, (column-block, sample) rows.
        if k.numel() == 1:
            partial_shape = (num_programs,)
        elif layout:
            partial_shape = (num_programs // num_l_blocks, plan.row_len)
        else:
            partial_shape = (num_l_blocks, plan.rows)
        partials = torch.empty(partial_shape, dtype=acc_dtype, device=g.device)
    else:
        partials = k
    out = (_aligned(to_layout(out, layout)) if need_k else to_layout(out, layout)) if relu else None
    k = k.contiguous()  # any float dtype: the kernel promotes k and scale on load
    scale = scale.contiguous() if scale is not None else None
    _launcher(lm_step_backward_kernel)[(num_programs,)](
        g,
        u if need_k else g,  # unused pointers stand in for tensors a variant does not read
        u_prev if need_k else g,
        out if relu else g,
        k,
        scale if scale is not None else k,
        grad_u if need_u else g,
        grad_u_prev if need_u_prev else g,
        grad_f if need_f else g,
        partials,
        plan.rows,
        plan.row_len,
        plan.channels,
        plan.rows_per_sample,
        num_l_blocks,
        HAS_SCALE=scale is not None,
        RELU=relu,
        PER_CHANNEL_K=k.numel() > 1,
        CHANNELS_LAST=layout,
        NEED_U=need_u,
        NEED_U_PREV=need_u_prev,
        NEED_F=need_f,
        NEED_K=need_k,
        FP64=fp64,
        BLOCK_M=block_m,
        BLOCK_L=block_l,
        num_warps=num_warps,
    )
    if need_k:
        # One reduction over the program partials; torch's sum uses no atomics, so the order is fixed.
        per_channel = partials.sum() if k.numel() == 1 else partials.view(-1, plan.channels).sum(0)
        grad_k = per_channel.reshape(k.shape).to(k.dtype)
    return grad_u, grad_u_prev, grad_f, grad_k
