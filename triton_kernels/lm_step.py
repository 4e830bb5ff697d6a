"""Triton kernels for the fused LM step (Lu et al., ICML 2018, LM-architecture) and their launchers.

The activation is the 2-D matrix of ``lmfused.op_support`` (M rows of L contiguous elements; a row is one
channel of one sample (channels-first) or one position (channels-last)). Three walks over it, all with 64-bit
offsets and every option a ``tl.constexpr`` (so each variant compiles to straight-line code):

    HAS_F, HAS_SCALE, RELU, HAS_NOISE, HAS_SHORTCUT, PER_CHANNEL_K, CHANNELS_LAST, NEED_*,
    FP64 (float64 math, gradcheck)

* flat (the forward; the backward unless k is per channel and its gradient is needed): tiles of BLOCK
  consecutive elements in memory, whatever the row length, so loads and stores are full-width vectors and no
  lane idles at row ends. An element's row (for a per-channel k and the per-sample scale) is offset // L,
  computed from the tile's start with one multiply-shift per element (no division in the loop).
* channel (channels-first backward with a per-channel grad_k): each tile holds BLOCK elements of one channel,
  the channel's N runs of L elements walked in order (the CUDA kernels' contiguous cursor); one partial sum
  per tile. Runs of L elements vectorise by the largest power of two dividing L.
* columns (channels-last backward with a per-channel grad_k): [BLOCK_M, BLOCK_L] tiles, ROW_ITERS of them
  down the rows per program, each program keeping one partial per column (channel).

The backward adds the shortcut output's gradient (the next step's u_prev is this step's u) into grad_u in
the same pass, unmasked by the ReLU. It writes only the gradients asked for and float32 partial sums of
dL/dk = sum g (u_prev - u) that one torch reduction sums: no atomics, so the same inputs give bitwise the
same gradients. Tile sizes are a fixed function of the shape (no autotuning), so partial buffers are known
before launch, and the launcher copies misaligned views so that the compiled variant (whose register layout
sets the order of the in-program sums) does not depend on where the data sits.

Noise: one Philox4x32-10 call gives four normals (``tl.randn4x``): the element at memory offset o (in the
planned layout) takes lane o % 4 of ``randn4x(seed, o // 4)``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from lmfused.triton_kernels.common import aligned, cdiv, four_normals, launcher, promote, store_state_grads
from torch import Tensor

from lmfused.op_support import Plan, empty_in_layout, plan_layout, to_layout

if TYPE_CHECKING:  # (lmfused.reference owns the records; the launchers only read them)
    from lmfused.reference import LMStepBackwardArgs, LMStepForwardArgs

__all__ = ["INTERPRETED", "lm_step_backward_triton", "lm_step_forward_triton"]


@triton.jit
def _divmod_near(x0, inc, d, magic, shift, SMALL: tl.constexpr):
    """(q, r) with x0 + inc = q * d + r and 0 <= r < d, for a scalar 0 <= x0 < d and 0 <= inc < BLOCK.

    SMALL (d < BLOCK): x0 + inc < 2 * BLOCK, and q = ((x0 + inc) * magic) >> shift in int32 is exact there
    (magic, shift from ``_magic`` on the host). Otherwise x0 + inc < 2 d, so q is 0 or 1 (int64 offsets).
    """
    if SMALL:
        t = x0.to(tl.int32) + inc
        q = (t * magic) >> shift
        r = t - q * d
    else:
        t = x0.to(tl.int64) + inc
        q = (t >= d).to(tl.int32)
        r = t - q.to(tl.int64) * d
    return q, r


@triton.jit
def _flat_rows(
    start, idx, L, R, magic_l, shift_l, magic_r, shift_r,
    SECOND: tl.constexpr, SMALL_L: tl.constexpr, SMALL_R: tl.constexpr,
):  # fmt: skip
    """For the elements start + idx of a flat tile: (offset % L, row % R, row // R), row = offset // L.

    row = (start // L) + q1 with q1 from the first division; the second (by R, for row % R and row // R) only
    if SECOND, else the first result stands in for the two others.
    """
    q1, r1 = _divmod_near(start % L, idx, L, magic_l, shift_l, SMALL_L)
    if SECOND:
        row0 = start // L
        q2, r2 = _divmod_near(row0 % R, q1, R, magic_r, shift_r, SMALL_R)
        return r1, r2, row0 // R + q2
    else:
        return r1, r1, r1


@triton.jit
def _flat_tile(numel, BLOCK: tl.constexpr):
    """This program's flat tile: (program id, first element (int64), lanes, element offsets, in bounds)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    idx = tl.arange(0, BLOCK)
    offs = start + idx
    return pid, start, idx, offs, offs < numel


@triton.jit
def lm_step_forward_kernel(
    u_ptr,
    u_prev_ptr,
    f_ptr,
    k_ptr,
    scale_ptr,
    seed_ptr,
    out_ptr,
    numel,
    L,
    R,
    magic_l,
    shift_l,
    magic_r,
    shift_r,
    noise_std,
    HAS_F: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    PER_CHANNEL_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr,
    SMALL_L: tl.constexpr,
    SMALL_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = act((1 - k) u + k u_prev + s f + noise_std xi) on one flat tile."""
    pid, start, idx, offs, mask = _flat_tile(numel, BLOCK)
    # k and the sample's scale per element: channel = row % C (channels-first, R = C) or offset % C
    # (channels-last, L = C), sample = row // R (R = rows per sample).
    if PER_CHANNEL_K or (HAS_F and HAS_SCALE):
        r1, r2, sample = _flat_rows(
            start, idx, L, R, magic_l, shift_l, magic_r, shift_r,
            (HAS_F and HAS_SCALE) or not CHANNELS_LAST, SMALL_L, SMALL_R,
        )  # fmt: skip
    if PER_CHANNEL_K:
        if CHANNELS_LAST:
            k = promote(tl.load(k_ptr + r1), FP64)
        else:
            k = promote(tl.load(k_ptr + r2), FP64)
    else:
        k = promote(tl.load(k_ptr), FP64)
    u = promote(tl.load(u_ptr + offs, mask=mask, other=0.0), FP64)
    u_prev = promote(tl.load(u_prev_ptr + offs, mask=mask, other=0.0), FP64)
    acc = (1.0 - k) * u + k * u_prev
    if HAS_F:
        f = promote(tl.load(f_ptr + offs, mask=mask, other=0.0), FP64)
        if HAS_SCALE:
            f = f * promote(tl.load(scale_ptr + sample, mask=mask, other=0.0), FP64)
        acc += f
    if HAS_NOISE:
        # One Philox call per 4 elements: counter = offset // 4, lane = offset % 4 (BLOCK is a multiple
        # of 4). Reproducible from the seed alone, no host sync.
        seed = tl.load(seed_ptr)
        normals = four_normals(seed, pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4))
        acc += noise_std * tl.reshape(normals, [BLOCK])
    if RELU:
        # As torch.relu: NaN stays NaN (tl.maximum would return 0 for it and hide a diverging run).
        acc = tl.where(acc < 0.0, 0.0, acc)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gradients(
    g_ptr, grad_shortcut_ptr, u_ptr, u_prev_ptr, out_ptr, grad_u_ptr, grad_u_prev_ptr, grad_f_ptr, offs, mask,
    k, s, HAS_SCALE: tl.constexpr, RELU: tl.constexpr, HAS_SHORTCUT: tl.constexpr, NEED_U: tl.constexpr,
    NEED_U_PREV: tl.constexpr, NEED_F: tl.constexpr, NEED_K: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    """Store grad_u = (1-k) g (+ grad_shortcut), grad_u_prev = k g, grad_f = s g for one tile; return
    g (u_prev - u) (or g)."""
    # Every load before the first store: Triton must assume the pointers may alias, so a load after a
    # store could not be hoisted, and fewer bytes would be in flight.
    g = promote(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
    shortcut = 0.0
    if HAS_SHORTCUT and NEED_U:
        shortcut = promote(tl.load(grad_shortcut_ptr + offs, mask=mask, other=0.0), FP64)
    if NEED_K:
        u = promote(tl.load(u_ptr + offs, mask=mask, other=0.0), FP64)
        u_prev = promote(tl.load(u_prev_ptr + offs, mask=mask, other=0.0), FP64)
    if RELU:
        out = tl.load(out_ptr + offs, mask=mask, other=0.0)
        # As torch's threshold_backward: zero where out <= 0, so a NaN output passes its gradient on.
        g = tl.where(out <= 0, 0.0, g)
    store_state_grads(
        grad_u_ptr, grad_u_prev_ptr, offs, mask, g, k, shortcut, HAS_SHORTCUT, NEED_U, NEED_U_PREV
    )
    if NEED_F:
        grad_f = g
        if HAS_SCALE:
            grad_f = g * s
        tl.store(grad_f_ptr + offs, grad_f.to(grad_f_ptr.dtype.element_ty), mask=mask)
    if NEED_K:
        return g * (u_prev - u)
    else:
        return g


@triton.jit
def lm_step_backward_kernel(
    g_ptr,
    grad_shortcut_ptr,
    u_ptr,
    u_prev_ptr,
    out_ptr,
    k_ptr,
    scale_ptr,
    grad_u_ptr,
    grad_u_prev_ptr,
    grad_f_ptr,
    partial_ptr,
    numel,
    L,
    R,
    magic_l,
    shift_l,
    magic_r,
    shift_r,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr,
    PER_CHANNEL_K: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    NEED_U: tl.constexpr,
    NEED_U_PREV: tl.constexpr,
    NEED_F: tl.constexpr,
    NEED_K: tl.constexpr,
    FP64: tl.constexpr,
    SMALL_L: tl.constexpr,
    SMALL_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Flat walk: the elementwise gradients, and one partial of g (u_prev - u) per program (scalar k only:
    a per-channel grad_k takes the channel or columns walk)."""
    pid, start, idx, offs, mask = _flat_tile(numel, BLOCK)
    k = 1.0  # placeholders for what a variant does not read
    s = 1.0
    if (PER_CHANNEL_K and (NEED_U or NEED_U_PREV)) or (NEED_F and HAS_SCALE):
        r1, r2, sample = _flat_rows(
            start, idx, L, R, magic_l, shift_l, magic_r, shift_r,
            (NEED_F and HAS_SCALE) or not CHANNELS_LAST, SMALL_L, SMALL_R,
        )  # fmt: skip
        if NEED_F and HAS_SCALE:
            s = promote(tl.load(scale_ptr + sample, mask=mask, other=0.0), FP64)
    if NEED_U or NEED_U_PREV:
        if not PER_CHANNEL_K:
            k = promote(tl.load(k_ptr), FP64)
        elif CHANNELS_LAST:
            k = promote(tl.load(k_ptr + r1), FP64)
        else:
            k = promote(tl.load(k_ptr + r2), FP64)
    d = _gradients(
        g_ptr, grad_shortcut_ptr, u_ptr, u_prev_ptr, out_ptr, grad_u_ptr, grad_u_prev_ptr, grad_f_ptr, offs,
        mask, k, s, HAS_SCALE, RELU, HAS_SHORTCUT, NEED_U, NEED_U_PREV, NEED_F, NEED_K, FP64,
    )  # fmt: skip
    if NEED_K:
        tl.store(partial_ptr + pid, tl.sum(d, axis=0))


@triton.jit
def lm_step_backward_channel_kernel(
    g_ptr,
    grad_shortcut_ptr,
    u_ptr,
    u_prev_ptr,
    out_ptr,
    k_ptr,
    scale_ptr,
    grad_u_ptr,
    grad_u_prev_ptr,
    grad_f_ptr,
    partial_ptr,
    per_channel,
    L,
    sample_stride,
    tiles_per_channel,
    magic_l,
    shift_l,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr,
    NEED_U: tl.constexpr,
    NEED_U_PREV: tl.constexpr,
    NEED_F: tl.constexpr,
    FP64: tl.constexpr,
    SMALL_L: tl.constexpr,
    VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Channel walk (channels-first, per-channel grad_k): BLOCK elements v of one channel c, element v at
    offset (v // L) * C L + c L + v % L; one partial of g (u_prev - u) per program."""
    pid = tl.program_id(0)
    c = pid // tiles_per_channel
    v0 = (pid % tiles_per_channel).to(tl.int64) * BLOCK
    idx = tl.arange(0, BLOCK)
    q, r = _divmod_near(v0 % L, idx, L, magic_l, shift_l, SMALL_L)
    n = v0 // L + q
    offs = n * sample_stride + c.to(tl.int64) * L + r
    # Runs of L elements: VEC (a power of two dividing L and BLOCK) consecutive elements stay in one run.
    offs = tl.max_contiguous(tl.multiple_of(offs, VEC), VEC)
    mask = tl.max_constancy((v0 + idx) < per_channel, VEC)
    k = promote(tl.load(k_ptr + c), FP64)
    s = 1.0
    if NEED_F and HAS_SCALE:
        s = promote(tl.load(scale_ptr + n, mask=mask, other=0.0), FP64)
    d = _gradients(
        g_ptr, grad_shortcut_ptr, u_ptr, u_prev_ptr, out_ptr, grad_u_ptr, grad_u_prev_ptr, grad_f_ptr, offs,
        mask, k, s, HAS_SCALE, RELU, HAS_SHORTCUT, NEED_U, NEED_U_PREV, NEED_F, True, FP64,
    )  # fmt: skip
    tl.store(partial_ptr + pid, tl.sum(d, axis=0))


@triton.jit
def lm_step_backward_columns_kernel(
    g_ptr,
    grad_shortcut_ptr,
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
    rows_per_sample,
    num_l_blocks,
    HAS_SCALE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr,
    NEED_U: tl.constexpr,
    NEED_U_PREV: tl.constexpr,
    NEED_F: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ROW_ITERS: tl.constexpr,
):
    """Columns walk (channels-last, per-channel grad_k): ROW_ITERS [BLOCK_M, BLOCK_L] tiles down the rows,
    one partial per column (channel) per program: buffer (M / (BLOCK_M ROW_ITERS), L)."""
    pid = tl.program_id(0)
    pid_m = pid // num_l_blocks
    cols = (pid % num_l_blocks).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    col_ok = cols < L
    k = promote(tl.load(k_ptr + cols, mask=col_ok, other=0.0), FP64)[None, :]
    acc = tl.zeros([BLOCK_L], dtype=tl.float64 if FP64 else tl.float32)
    for it in range(ROW_ITERS):
        rows = (pid_m.to(tl.int64) * ROW_ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        offs = rows[:, None] * L + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        s = 1.0
        if NEED_F and HAS_SCALE:
            s = promote(tl.load(scale_ptr + rows // rows_per_sample, mask=row_ok, other=0.0), FP64)[:, None]
        d = _gradients(
            g_ptr, grad_shortcut_ptr, u_ptr, u_prev_ptr, out_ptr, grad_u_ptr, grad_u_prev_ptr, grad_f_ptr,
            offs, mask, k, s, HAS_SCALE, RELU, HAS_SHORTCUT, NEED_U, NEED_U_PREV, NEED_F, True, FP64,
        )  # fmt: skip
        acc += tl.sum(d, axis=0)
    tl.store(partial_ptr + pid_m.to(tl.int64) * L + cols, acc, mask=col_ok)


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------

_TILE_ELEMENTS = 4096  # elements per program: 8 KiB of bf16 per tensor keeps enough bytes in flight
_MIN_PROGRAMS = 2048  # the columns walk stacks row blocks per program while this many programs remain


def _magic(d: int, block: int) -> tuple[int, int, bool]:
    """(magic, shift, small) for ``_divmod_near`` by ``d`` in tiles of ``block`` elements.

    For d < block, x < 2 block: x // d == (x * magic) >> shift with magic = ceil(2^shift / d) and
    shift = bits(2 block - 1) + ceil(log2 d): the error x (magic d - 2^shift) / (d 2^shift) stays below
    1 / d, and x * magic < 2^29 fits in int32.
    """
    if d >= block:
        return 0, 0, False
    shift = (2 * block - 1).bit_length() + (d - 1).bit_length()
    return -(-(1 << shift) // d), shift, True


def _flat_block(numel: int) -> tuple[int, int]:
    block = max(64, min(_TILE_ELEMENTS, triton.next_power_of_2(numel)))
    return block, 8 if block >= 4096 else 4


@functools.lru_cache(maxsize=512)
def _flat_plan(numel: int, L: int, R: int) -> tuple:
    """Grid and arguments of a flat walk: (num_programs, block, num_warps, magic_l, shift_l, small_l,
    magic_r, shift_r, small_r)."""
    block, num_warps = _flat_block(numel)
    magic_l, shift_l, small_l = _magic(L, block)
    magic_r, shift_r, small_r = _magic(R, block)
    return (cdiv(numel, block), block, num_warps, magic_l, shift_l, small_l, magic_r, shift_r, small_r)


@functools.lru_cache(maxsize=512)
def _channel_plan(N: int, C: int, L: int, element_size: int) -> tuple:
    """(num_programs, tiles_per_channel, block, num_warps, vec, magic_l, shift_l, small_l) of the channel
    walk: the tile length wasting the fewest masked lanes at the end of each channel's N L elements."""
    per_channel = N * L
    cap = min(_TILE_ELEMENTS, max(64, triton.next_power_of_2(per_channel)))
    candidates = [b for b in (64, 128, 256, 512, 1024, 2048, 4096) if b <= cap and b >= cap // 4]
    block = min(candidates, key=lambda b: (cdiv(per_channel, b) * b, -b))
    vec = 1
    while vec * element_size < 16 and L % (2 * vec) == 0:  # up to 16-byte vectors
        vec *= 2
    tiles = cdiv(per_channel, block)
    magic_l, shift_l, small_l = _magic(L, block)
    return C * tiles, tiles, block, 8 if block >= 4096 else 4, vec, magic_l, shift_l, small_l


@functools.lru_cache(maxsize=512)
def _columns_plan(M: int, L: int) -> tuple:
    """(num_programs, num_m_programs, num_l_blocks, block_m, block_l, row_iters, num_warps) of the
    columns walk: row blocks are stacked per program (fewer partials) while enough programs remain."""
    block_l = min(triton.next_power_of_2(L), _TILE_ELEMENTS)
    block_m = max(1, min(triton.next_power_of_2(M), _TILE_ELEMENTS // block_l))
    num_l_blocks = cdiv(L, block_l)
    row_blocks = cdiv(M, block_m)
    row_iters = 1
    while row_iters < 8 and cdiv(row_blocks, 2 * row_iters) * num_l_blocks >= _MIN_PROGRAMS:
        row_iters *= 2
    num_m = cdiv(row_blocks, row_iters)
    num_warps = 8 if block_m * block_l >= 4096 else 4
    return num_m * num_l_blocks, num_m, num_l_blocks, block_m, block_l, row_iters, num_warps


# Under TRITON_INTERPRET=1 the kernels run through Triton's CPU interpreter, which torch cannot trace into.
INTERPRETED = not isinstance(lm_step_forward_kernel, triton.runtime.jit.JITFunction)


def _flat_args(plan: Plan) -> tuple:
    """_flat_plan for a layout plan; shapes are specialised (block sizes are compile-time constants)."""
    return _flat_plan(int(plan.rows) * int(plan.row_len), int(plan.row_len), int(plan.rows_per_sample))


def lm_step_forward_triton(args: LMStepForwardArgs) -> Tensor:
    """Launch the forward kernel; inputs are validated by lmfused.ops. Output has u's planned layout."""
    plan = plan_layout(args.u)
    u = to_layout(args.u, plan.channels_last)
    out = empty_in_layout(u.shape, plan.channels_last, dtype=u.dtype, device=u.device)
    if u.numel() == 0:
        return out
    u_prev = to_layout(args.u_prev, plan.channels_last)
    f = to_layout(args.f, plan.channels_last) if args.f is not None else None
    k = args.k.contiguous()  # (1,) or (C,), any float dtype: the kernel promotes it on load, as scale
    scale = args.scale.contiguous() if args.scale is not None else None
    has_noise = args.noise_std > 0.0
    num_programs, block, num_warps, magic_l, shift_l, small_l, magic_r, shift_r, small_r = _flat_args(plan)
    launcher(lm_step_forward_kernel)[(num_programs,)](
        u,
        u_prev,
        f if f is not None else u,  # unused pointer when HAS_F is off
        k,
        scale if scale is not None else k,
        args.seed if has_noise else k,
        out,
        u.numel(),
        plan.row_len,
        plan.rows_per_sample,
        magic_l,
        shift_l,
        magic_r,
        shift_r,
        float(args.noise_std),
        HAS_F=f is not None,
        HAS_SCALE=scale is not None and f is not None,
        RELU=args.relu,
        HAS_NOISE=has_noise,
        PER_CHANNEL_K=k.numel() > 1,
        CHANNELS_LAST=plan.channels_last,
        FP64=u.dtype == torch.float64,
        SMALL_L=small_l,
        SMALL_R=small_r,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out


def lm_step_backward_triton(args: LMStepBackwardArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward kernel of the walk the flags call for, then sum the grad_k partials in a fixed
    order. ``grad_shortcut`` (the gradient of the step's shortcut output, i.e. of u itself) is added to
    grad_u, unmasked, in the same pass."""
    u, u_prev, out, k, relu = args.u, args.u_prev, args.out, args.k, args.relu
    need_u, need_u_prev, need_f, need_k = args.need_u, args.need_u_prev, args.need_f, args.need_k
    plan = plan_layout(u if u is not None else args.grad_out)
    layout = plan.channels_last
    g = to_layout(args.grad_out, layout)
    grad_shortcut = args.grad_shortcut
    has_shortcut = grad_shortcut is not None and need_u
    if has_shortcut:
        grad_shortcut = to_layout(grad_shortcut, layout)  # read where grad_out is: the same plan
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

    if need_k:
        # Triton compiles a variant per pointer alignment, and the variant's register layout sets the order
        # of the in-program sums: grad_k's bits would depend on where the data sits. Misaligned views (rare)
        # are copied so that the same values always take the same variant.
        g = aligned(g)
        u = aligned(to_layout(u, layout))
        u_prev = aligned(to_layout(u_prev, layout))
    out = (aligned(to_layout(out, layout)) if need_k else to_layout(out, layout)) if relu else None
    per_channel = k.numel() > 1
    k = k.contiguous()  # any float dtype: the kernels promote k and scale on load
    scale = args.scale.contiguous() if args.scale is not None else None
    pointers = (
        g,
        grad_shortcut if has_shortcut else g,
        u if need_k else g,  # unused pointers stand in for tensors a variant does not read
        u_prev if need_k else g,
        out if relu else g,
        k,
        scale if scale is not None else k,
        grad_u if need_u else g,
        grad_u_prev if need_u_prev else g,
        grad_f if need_f else g,
    )
    flags = dict(HAS_SCALE=scale is not None, RELU=relu, HAS_SHORTCUT=has_shortcut)
    flags.update(NEED_U=need_u, NEED_U_PREV=need_u_prev)
    if need_k and per_channel and not layout:
        C, L = int(plan.channels), int(plan.row_len)
        N = int(plan.rows) // C
        num_programs, tiles, block, num_warps, vec, magic_l, shift_l, small_l = _channel_plan(
            N, C, L, g.element_size()
        )
        partials = torch.empty((C, tiles), dtype=acc_dtype, device=g.device)
        launcher(lm_step_backward_channel_kernel)[(num_programs,)](
            *pointers, partials, N * L, L, C * L, tiles, magic_l, shift_l,
            **flags, NEED_F=need_f, FP64=fp64, SMALL_L=small_l, VEC=vec, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        per_channel_sum = partials.sum(1)
    elif need_k and per_channel:
        num_programs, num_m, num_l_blocks, block_m, block_l, row_iters, num_warps = _columns_plan(
            int(plan.rows), int(plan.row_len)
        )
        partials = torch.empty((num_m, plan.row_len), dtype=acc_dtype, device=g.device)
        launcher(lm_step_backward_columns_kernel)[(num_programs,)](
            *pointers, partials, plan.rows, plan.row_len, plan.rows_per_sample, num_l_blocks,
            **flags, NEED_F=need_f, FP64=fp64, BLOCK_M=block_m, BLOCK_L=block_l, ROW_ITERS=row_iters,
            num_warps=num_warps,
        )  # fmt: skip
        per_channel_sum = partials.sum(0)
    else:
        flat = _flat_args(plan)
        num_programs, block, num_warps, magic_l, shift_l, small_l, magic_r, shift_r, small_r = flat
        # Scalar k: one partial per program.
        partials = torch.empty((num_programs,), dtype=acc_dtype, device=g.device) if need_k else k
        launcher(lm_step_backward_kernel)[(num_programs,)](
            *pointers, partials, g.numel(), plan.row_len, plan.rows_per_sample, magic_l, shift_l, magic_r,
            shift_r, **flags, NEED_F=need_f, PER_CHANNEL_K=per_channel, CHANNELS_LAST=layout, NEED_K=need_k,
            FP64=fp64, SMALL_L=small_l, SMALL_R=small_r, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        per_channel_sum = partials.sum() if need_k else None
    if need_k:
        # torch's sums use no atomics, so the order is fixed.
        grad_k = per_channel_sum.reshape(k.shape).to(k.dtype)
    return grad_u, grad_u_prev, grad_f, grad_k
