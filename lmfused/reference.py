"""Pure-PyTorch reference of the LM step: the oracle every kernel is tested against, and the CPU path.

The linear multi-step (LM) update of Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks* (ICML 2018),
eq. (LM-architecture), with the stochastic-depth multiplier and noise injection of their section 3:

    out = act((1 - k) * u + k * u_prev + s * f + noise_std * xi)

``lm_step_eager`` is the plain differentiable composition (what the original code runs: five or more kernels);
``reference_forward`` / ``reference_backward`` are the same maths with the hand-written gradients of
DESIGN.md section 1, in float32 (float64 for float64 inputs), and back the ``reference`` backend's ops.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lmfused.op_support import channel_view, result_in_layout

__all__ = [
    "LMStepBackwardArgs",
    "LMStepForwardArgs",
    "compute_dtype",
    "lm_step_computed",
    "lm_step_eager",
    "reference_backward",
    "reference_forward",
]


class LMStepForwardArgs(NamedTuple):
    """The operands of one LM step forward (``lmfused::lm_step_<backend>``, in its schema's order): what every
    backend's forward takes, built once by the registered op from its arguments (validated by lm_step)."""

    u: Tensor  # u_n, (N, C, *spatial)
    u_prev: Tensor  # u_{n-1}, same shape, dtype and device
    f: Tensor | None  # the residual branch, or None (the two-term update)
    k: Tensor  # (1,) or (C,)
    scale: Tensor | None  # per-sample stochastic-depth multiplier (N,), or None
    seed: Tensor | None  # int64 noise seed drawn from torch's generator; required when noise_std > 0
    relu: bool
    noise_std: float


class LMStepBackwardArgs(NamedTuple):
    """The operands of one LM step backward (``lmfused::lm_step_<backend>_backward``, in its schema's order),
    built once by the registered op from its arguments."""

    grad_out: Tensor
    grad_shortcut: Tensor | None  # the gradient of the step's shortcut output (u itself), added into grad_u
    u: Tensor | None  # required when need_k
    u_prev: Tensor | None  # required when need_k
    out: Tensor | None  # the forward output, required when relu
    k: Tensor
    scale: Tensor | None
    relu: bool
    need_u: bool
    need_u_prev: bool
    need_f: bool
    need_k: bool

    LIKE_GRAD_OUT = ("grad_shortcut", "u", "u_prev", "out")  # (checked by the op, op_support._taking_record)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 for float64 activations, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sample_view(scale: Tensor, like: Tensor) -> Tensor:
    """View scale (N,) so that it broadcasts along dim 0 of ``like``."""
    return scale.reshape((-1,) + (1,) * (like.dim() - 1))


def _noise(seed: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """Standard normal noise determined by ``seed`` (an int64 tensor drawn from torch's generator)."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed(int(seed.reshape(-1)[0].item()) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=dtype)


def lm_step_eager(
    u: Tensor,
    u_prev: Tensor,
    f: Tensor | None,
    k: Tensor,
    *,
    scale: Tensor | None = None,
    relu: bool = False,
    noise: Tensor | None = None,
) -> Tensor:
    """The LM step as the eager composition of PyTorch ops, differentiable by autograd.

    Runs in the inputs' own dtype (the test oracle calls it on float64 copies). ``noise`` is an already
    scaled noise tensor (``noise_std * xi``) or None.
    """
    kc = channel_view(k, u)
    out = (1 - kc) * u + kc * u_prev
    if f is not None:
        out = out + (f if scale is None else _sample_view(scale, f) * f)
    if noise is not None:
        out = out + noise
    return torch.relu(out) if relu else out


def reference_forward(args: LMStepForwardArgs) -> Tensor:
    """Forward of the ``reference`` backend: the LM step in float32 (float64 for float64 inputs)."""
    u = args.u
    noise = None
    if args.noise_std > 0.0:
        if args.seed is None:
            raise ValueError("seed: an int64 tensor is required when noise_std > 0")
        noise = args.noise_std * _noise(args.seed, u, compute_dtype(u.dtype))
    computed = lm_step_computed(u, args.u_prev, args.f, args.k, args.scale, args.relu, noise)
    return result_in_layout(computed, u, u.dtype)


def lm_step_computed(
    u: Tensor,
    u_prev: Tensor,
    f: Tensor | None,
    k: Tensor,
    scale: Tensor | None,
    relu: bool,
    noise: Tensor | None = None,
) -> Tensor:
    """:func:`lm_step_eager` on every input cast to the compute dtype (float32; float64 for float64 u), the
    result left in it."""
    cd = compute_dtype(u.dtype)
    return lm_step_eager(
        u.to(cd),
        u_prev.to(cd),
        None if f is None else f.to(cd),
        k.to(cd),
        scale=None if scale is None else scale.to(cd),
        relu=relu,
        noise=noise,
    )


def reference_backward(args: LMStepBackwardArgs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of the ``reference`` backend (DESIGN.md section 1); unneeded gradients come back empty.
    ``grad_shortcut`` (the gradient of the step's shortcut output, or None) is added into grad_u unmasked."""
    grad_out, u, k = args.grad_out, args.u, args.k
    cd = compute_dtype(grad_out.dtype)
    g = grad_out.to(cd)
    if args.relu:
        if args.out is None:
            raise ValueError("out: the forward output is required when relu=True")
        # As torch.relu's backward (threshold_backward): zero where out <= 0; a NaN output passes g on.
        g = torch.where(args.out <= 0, torch.zeros((), dtype=cd, device=g.device), g)
    kc = channel_view(k.to(cd), g)
    like = u if u is not None else grad_out
    grad_u = grad_out.new_empty((0,))
    if args.need_u:
        grad_u = (1 - kc) * g
        if args.grad_shortcut is not None:
            grad_u = grad_u + args.grad_shortcut.to(cd)
        grad_u = result_in_layout(grad_u, like, grad_out.dtype)
    grad_u_prev = grad_out.new_empty((0,))
    if args.need_u_prev:
        grad_u_prev = result_in_layout(kc * g, like, grad_out.dtype)
    if args.need_f:
        branch = g if args.scale is None else _sample_view(args.scale.to(cd), g) * g
        grad_f = result_in_layout(branch, like, grad_out.dtype)
    else:
        grad_f = grad_out.new_empty((0,))
    if args.need_k:
        if u is None or args.u_prev is None:
            raise ValueError("u, u_prev: required when need_k=True")
        prod = g * (args.u_prev.to(cd) - u.to(cd))
        if k.numel() == 1:
            grad_k = prod.sum().reshape(k.shape)
        else:
            grad_k = prod.transpose(0, 1).reshape(prod.shape[1], -1).sum(1).reshape(k.shape)
        grad_k = grad_k.to(k.dtype, copy=True)
    else:
        grad_k = k.new_empty((0,))
    return grad_u, grad_u_prev, grad_f, grad_k
