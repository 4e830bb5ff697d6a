"""Shared test helpers: random inputs in a given layout, the float64 oracle, a training step that checks k."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lmfused
from lmfused.nn import LMStep
from lmfused.reference import lm_step_eager
from tests.conftest import DEVICE

LAYOUTS = ("contiguous", "channels_last", "permuted")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Small absolute slack per dtype on top of "2x the rounding of the float64 result" in the oracle tests.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def in_layout(x: Tensor, layout: str) -> Tensor:
    """``x`` (contiguous) re-laid out: unchanged, channels-last dense, or a permuted non-contiguous view."""
    if layout == "contiguous":
        return x
    dims = list(range(x.dim()))
    if layout == "channels_last":
        order = [0, *dims[2:], 1]
    elif layout == "permuted":
        order = dims[::-1]
    else:
        raise ValueError(layout)
    inverse = [order.index(d) for d in dims]
    return x.permute(order).contiguous().permute(inverse)


def backends() -> list[str]:
    """Backends runnable on the test device (triton runs on CPU through the interpreter)."""
    return lmfused.available_backends(DEVICE)


def gradcheck(
    fn: Callable, inputs: Sequence[Tensor], backend: str, *, whole_jacobian: bool = False, **tolerances
) -> bool:
    """``torch.autograd.gradcheck`` of ``fn`` on ``backend``. Triton on the CPU runs in its interpreter, where
    one forward costs about 0.1 s and the whole Jacobian of a 36-element case takes a minute: there it checks
    v^T J u for random u and v (gradcheck's fast mode, with a tolerance that still fails one Jacobian entry 1%
    off: test_gradcheck_helper_catches_one_wrong_entry), unless ``whole_jacobian``. Every other backend, and
    the cases a test marks ``whole_jacobian``, compare every entry."""
    if backend == "triton" and DEVICE.type == "cpu" and not whole_jacobian:
        # One entry off by 1% moves v^T J u by about 1%/numel: gradcheck's rtol (0.1%) would pass it. In
        # float64 the central differences agree to about 1e-9, so the projections must agree to 1e-6.
        return torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True, rtol=1e-6, **tolerances)
    return torch.autograd.gradcheck(fn, tuple(inputs), **tolerances)


def oracle_grid(backend_names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> Callable:
    """Parametrizes a float64-oracle test ``test(backend, shape, layout, dtype)`` over every backend in
    ``backend_names``, shape, layout (LAYOUTS) and dtype (DTYPES)."""
    marks = (
        pytest.mark.parametrize("backend", backend_names),
        pytest.mark.parametrize("shape", shapes, ids=str),
        pytest.mark.parametrize("layout", LAYOUTS),
        pytest.mark.parametrize("dtype", DTYPES, ids=str),
    )

    def decorate(test: Callable) -> Callable:
        for mark in reversed(marks):  # as stacked decorators apply: the last one first
            test = mark(test)
        return test

    return decorate


def make_inputs(shape, dtype, layout, *, per_channel_k: bool, with_f: bool, with_scale: bool, seed: int = 0):
    """Fresh random u, u_prev, f, k, scale (never zeros)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32)

    u, u_prev, f = (in_layout(rand(*shape).to(dtype).to(DEVICE), layout) for _ in range(3))
    k = (0.5 * rand(shape[1] if per_channel_k else 1)).to(DEVICE)
    # Stochastic-depth multipliers: kept samples divided by the survival probability, dropped ones 0.
    scale = (torch.rand(shape[0], generator=gen) < 0.7).float().div(0.7).to(DEVICE) if with_scale else None
    return u, u_prev, (f if with_f else None), k, scale


def oracle(u, u_prev, f, k, scale, relu, grad_out, dtype=torch.float64):
    """Output and gradients (u, u_prev, f, k) of the eager composition in ``dtype`` (float64: the oracle).

    In a low-precision dtype, k is cast too, so every op rounds like the original eager code does.
    """
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (u, u_prev, f)]
    k_leaf = k.detach().to(dtype).requires_grad_()
    s = scale.to(dtype) if scale is not None else None
    out = lm_step_eager(leaves[0], leaves[1], leaves[2], k_leaf, scale=s, relu=relu)
    out.backward(grad_out.to(dtype))
    grads = [t.grad if t is not None else None for t in (*leaves, k_leaf)]
    return out.detach(), grads


def lm_coefficients(model: nn.Module) -> list[nn.Parameter]:
    """The k of every LMStep in ``model``."""
    return [m.k for m in model.modules() if isinstance(m, LMStep)]


def train_step_checking_k(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, ks: list[Tensor], dtype
) -> list[Tensor]:
    """One optimizer step on the cross-entropy of ``model(x)`` against ``y``: the loss is finite and every k
    in ``ks`` gets a finite gradient in ``dtype``. Returns the values of ``ks`` before the step."""
    before = [k.detach().clone() for k in ks]
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    assert math.isfinite(loss.item())
    for k in ks:
        assert k.grad is not None and k.grad.dtype == dtype and torch.isfinite(k.grad).all()
    optimizer.step()
    return before
