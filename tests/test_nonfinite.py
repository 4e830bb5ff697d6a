"""NaN and +-Inf behave as in torch on every backend: forward and every gradient, with and without ReLU.

The float64 eager composition (``torch.relu`` and autograd) is the oracle: ``torch.relu`` keeps NaN, and its
backward (threshold_backward) zeroes the gradient only where the output is <= 0, so a NaN output passes its
gradient on. A backend that clamps NaN to 0 would hide a diverging run.
"""

from __future__ import annotations

import math

import pytest
import torch

import lmfused
from tests.conftest import DEVICE
from tests.helpers import backends, make_inputs, oracle

NAN, INF = math.nan, math.inf
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter

SHAPE = (2, 3, 4, 5)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (tensor, index, value): each kind of non-finite value alone, and in combinations that make NaN or cancel.
PLANTS = [
    ("u", (0, 0, 0, 0), NAN),
    ("u_prev", (0, 1, 1, 2), NAN),
    ("f", (1, 2, 3, 4), NAN),
    ("u", (0, 2, 0, 1), INF),
    ("u", (1, 0, 2, 2), -INF),
    ("u_prev", (1, 1, 0, 0), INF),
    ("u_prev", (0, 0, 3, 3), -INF),
    ("f", (0, 1, 2, 0), INF),
    ("f", (1, 2, 1, 1), -INF),  # ReLU output 0 (gradient masked) unless another plant makes it NaN
    ("u", (1, 1, 3, 4), INF),  # inf - inf in the update: NaN
    ("u_prev", (1, 1, 3, 4), -INF),
    ("u", (0, 2, 2, 2), INF),  # u and u_prev both +inf: inf in the output, NaN in grad_k
    ("u_prev", (0, 2, 2, 2), INF),
]
# Only f non-finite: grad_k (which reads u and u_prev) stays finite where ReLU does not mask.
F_ONLY = [p for p in PLANTS if p[0] == "f"]


def _planted(tensors: dict, plants) -> dict:
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        t = t.detach().clone()  # keeps the layout (clone preserves strides of dense tensors)
        for target, index, value in plants:
            if target == name:
                t[index] = value
        out[name] = t
    return out


def _assert_same(name: str, x: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, atol: float) -> None:
    """Same NaN and +-Inf positions as the float64 oracle; finite entries within 2x the eager
    same-precision error plus ``atol``."""
    x = x.double()
    for what, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        assert torch.equal(test(x), test(ref)), f"{name}: {what} positions differ from torch"
    finite = torch.isfinite(ref)
    if not finite.any():
        return
    err = (x - ref)[finite].abs().max().item()
    low_err = (low.double() - ref)[finite & torch.isfinite(low.double())].abs().max().item()
    assert err <= 2 * low_err + atol, f"{name}: error {err:.3g} > {2 * low_err + atol:.3g}"


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("relu", [False, True], ids=["identity", "relu"])
@pytest.mark.parametrize("per_channel_k", [True, False], ids=["k_per_channel", "k_scalar"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("plants", [PLANTS, F_ONLY], ids=["all", "f_only"])
def test_nonfinite_like_torch(backend, relu, per_channel_k, layout, dtype, plants):
    """Forward and all four gradients have NaN/Inf exactly where the float64 eager composition has them."""
    u, u_prev, f, k, scale = make_inputs(
        SHAPE, dtype, layout, per_channel_k=per_channel_k, with_f=True, with_scale=True, seed=3
    )
    scale = torch.ones_like(scale)  # a dropped sample (scale 0) would turn f's Inf into NaN: tested below
    t = _planted(dict(u=u, u_prev=u_prev, f=f), plants)
    u, u_prev, f = t["u"], t["u_prev"], t["f"]
    grad_out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)).to(dtype).to(DEVICE)

    leaves = [x.detach().clone().requires_grad_() for x in (u, u_prev, f, k)]
    out = lmfused.lm_step(*leaves, scale=scale, relu=relu, backend=backend)
    out.backward(grad_out)
    ref_out, ref_grads = oracle(u, u_prev, f, k, scale, relu, grad_out)
    low_out, low_grads = oracle(u, u_prev, f, k, scale, relu, grad_out, dtype=dtype)
    assert not torch.isfinite(ref_out).all()  # the plants reached the output
    _assert_same("out", out, ref_out, low_out, ATOL[dtype])
    names = ("grad_u", "grad_u_prev", "grad_f", "grad_k")
    for name, leaf, ref, low in zip(names, leaves, ref_grads, low_grads, strict=True):
        terms = u.numel() // k.numel() if name == "grad_k" else 1
        _assert_same(name, leaf.grad, ref, low, ATOL[dtype] * math.sqrt(terms))


@pytest.mark.parametrize("backend", backends())
def test_relu_keeps_nan_and_passes_its_gradient(backend):
    """The two properties in isolation: relu(NaN) = NaN, and the gradient at a NaN output is g (not 0)."""
    u = torch.tensor([[NAN, 1.0, -1.0, INF, -INF, 0.5]], device=DEVICE).reshape(1, 1, 6)
    zeros = torch.zeros_like(u)
    leaves = [x.clone().requires_grad_() for x in (u, zeros, zeros)]
    k = torch.zeros(1, device=DEVICE, requires_grad=True)
    out = lmfused.lm_step(*leaves, k, relu=True, backend=backend)
    want = torch.relu(u + 0.0)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(want))
    g = torch.arange(1.0, 7.0, device=DEVICE).reshape(1, 1, 6)
    out.backward(g)
    x = u.clone().requires_grad_()
    torch.relu(x).backward(g)
    assert torch.equal(leaves[0].grad, x.grad)  # g at NaN and +Inf, 0 where the output is 0


@pytest.mark.parametrize("backend", backends())
def test_dropped_sample_with_inf_branch_is_nan(backend):
    """scale 0 times an Inf branch is NaN in torch (0 * inf); the fused update does not skip the product."""
    u, u_prev, f, k, _ = make_inputs(SHAPE, torch.float32, "contiguous", per_channel_k=True, with_f=True,
                                     with_scale=False)  # fmt: skip
    f = f.clone()
    f[1, 0, 0, 0] = INF
    scale = torch.tensor([1.0, 0.0], device=DEVICE)
    out = lmfused.lm_step(u, u_prev, f, k, scale=scale, backend=backend)
    ref, _ = oracle(u, u_prev, f, k, scale, False, torch.ones_like(u))
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[1, 0, 0, 0])
