"""k in any float dtype: a model cast with .half() or .bfloat16() trains on every backend.

After ``model.to(torch.bfloat16)`` the LM coefficients follow the model's dtype. Every backend takes such a k
(as it takes any float ``scale``), computes in float32, and gives grad_k in k's own dtype, so the optimizer
updates the parameter in place without a cast either way.
"""

from __future__ import annotations

import math

import pytest
import torch

import lmfused
from lmfused.models.cifar import LMCifarResNet
from tests.conftest import DEVICE
from tests.helpers import backends, lm_coefficients, make_inputs, oracle, train_step_checking_k

HALF = [torch.bfloat16, torch.float16]
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("k_dtype", HALF, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per_channel_k", [True, False], ids=["k_per_channel", "k_scalar"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_k(backend, k_dtype, dtype, per_channel_k, layout):
    """A float16/bfloat16 k is used at its own value; grad_k comes back in k's dtype, rounded once from the
    float64 oracle's value (up to float32 summation slack)."""
    u, u_prev, f, k, scale = make_inputs(
        (3, 5, 6, 7), dtype, layout, per_channel_k=per_channel_k, with_f=True, with_scale=True, seed=4
    )
    k = k.to(k_dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (u, u_prev, f, k)]
    out = lmfused.lm_step(*leaves, scale=scale, relu=True, backend=backend)
    grad_out = torch.randn(u.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    out.backward(grad_out)
    ref_out, ref_grads = oracle(u, u_prev, f, k, scale, True, grad_out)  # k's half value, in float64
    assert out.dtype == dtype and leaves[3].grad.dtype == k_dtype and leaves[3].grad.shape == k.shape
    torch.testing.assert_close(out.double(), ref_out, rtol=2 * ULP[dtype], atol=4 * ULP[dtype])
    for leaf, ref in zip(leaves[:3], ref_grads[:3], strict=True):
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.double(), ref, rtol=2 * ULP[dtype], atol=4 * ULP[dtype])
    # grad_k: one rounding to k's dtype (half an ulp) on top of float32 sums of the rounded activations.
    terms = u.numel() // k.numel()
    ref_k = ref_grads[3]
    slack = 1e-5 * math.sqrt(terms) * ref_k.abs().max().item()
    torch.testing.assert_close(leaves[3].grad.double(), ref_k, rtol=ULP[k_dtype], atol=slack)


def _tiny_lm_resnet(backend: str) -> torch.nn.Module:
    """Two stages of two pre-activation basic blocks (one LMStep each), per-channel k, stochastic depth."""
    return LMCifarResNet(
        (2, 2), (8, 16), stem_channels=8, per_channel_k=True, survival_prob=0.8, backend=backend
    )


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_model_cast_to_half_precision_trains(backend, dtype):
    """model.to(dtype) then SGD and Adam steps: the k parameters stay the same tensors in ``dtype``, get
    finite gradients in ``dtype`` and move. (Their values are checked against the float64 oracle above: whole
    models in half precision differ between backends by legitimate one-ulp roundings, amplified.)"""
    torch.manual_seed(0)
    model = _tiny_lm_resnet(backend).to(device=DEVICE, dtype=dtype)
    ks = lm_coefficients(model)
    assert len(ks) == 2 and all(k.dtype == dtype for k in ks)
    ids = [id(k) for k in ks]
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device=DEVICE, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    # Adam's default eps (1e-8) is 0 in float16: 1e-3 keeps its denominator finite in both dtypes.
    for opt in (torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.Adam(model.parameters(), eps=1e-3)):
        for _ in range(2):
            before = train_step_checking_k(model, opt, x, y, ks, dtype)
            assert all(k.grad.abs().max() > 0 for k in ks)
            assert [id(k) for k in lm_coefficients(model)] == ids
            for k, b in zip(ks, before, strict=True):
                assert k.dtype == dtype and not torch.equal(k.detach(), b)
