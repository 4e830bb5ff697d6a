"""What the Triton kernels of lmfused share: jit helpers inlined into the kernels of ``lm_step`` and
``batch_norm_lm_step`` (promotion to the accumulation type, the noise's four normals, the stores of the LM
step's state gradients), and the host side of a launch (wrapping for torch.library, tile counts, aligned
data)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ALIGNMENT", "aligned", "cdiv", "four_normals", "launcher", "promote", "store_state_grads"]


@triton.jit
def promote(x, FP64: tl.constexpr):
    """Promote to the accumulation type: float64 for float64 tensors, float32 otherwise."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def four_normals(seed, counter):
    """Four standard normals per ``counter`` from one Philox4x32-10 call (``tl.randn4x``), shape
    ``counter.shape + [2, 2]`` with lane 2 a + b at [..., a, b]: reshaping the last three dims into one puts a
    counter's four lanes at consecutive elements (the caller's counter: element offset // 4)."""
    n0, n1, n2, n3 = tl.randn4x(seed, counter)
    return tl.join(tl.join(n0, n2), tl.join(n1, n3))


@triton.jit
def store_state_grads(
    grad_u_ptr, grad_u_prev_ptr, offs, mask, g, k, shortcut,
    HAS_SHORTCUT: tl.constexpr, NEED_U: tl.constexpr, NEED_U_PREV: tl.constexpr,
):  # fmt: skip
    """Store the LM step's state gradients of one tile, those asked for: grad_u = (1 - k) g (+ ``shortcut``,
    the gradient of u itself, with HAS_SHORTCUT) and grad_u_prev = k g; g is the output's gradient through
    the ReLU's mask."""
    if NEED_U:
        grad_u = (1.0 - k) * g
        if HAS_SHORTCUT:
            grad_u += shortcut  # the gradient of u itself: not masked by the ReLU; one rounding below
        tl.store(grad_u_ptr + offs, grad_u.to(grad_u_ptr.dtype.element_ty), mask=mask)
    if NEED_U_PREV:
        tl.store(grad_u_prev_ptr + offs, (k * g).to(grad_u_prev_ptr.dtype.element_ty), mask=mask)


def launcher(kernel):
    """The kernel wrapped for torch.library tracing where the installed torch can (triton_op/wrap_triton)."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers (tile counts)."""
    return -(-a // b)  # plain integers: triton.cdiv costs a JIT-function call per use on the host


ALIGNMENT = 16  # bytes: Triton specialises pointer arguments on this divisibility


def aligned(t: Tensor) -> Tensor:
    """``t``, or a copy in the same layout when its data does not start on a 16-byte boundary.

    Allocations are aligned (CUDA's caching allocator to 512 bytes), so a misaligned pointer means a view at
    a storage offset; the offset is read instead of the pointer, which traced (fake) tensors do not have.
    """
    if (t.storage_offset() * t.element_size()) % ALIGNMENT == 0:
        return t
    return t.clone()  # preserve_format: dense strides are kept
