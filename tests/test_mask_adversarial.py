"""The ReLU's mask on adversarial data (issue 19 item 1): pre-activations whose sign hangs on the last
rounding. x = -bf16(state) makes (1 - k) u + k u_prev + BN(x) the rounding error of the state, and x = bf16(m
+ tiny) with running mean m makes BN(x) (no states) as small as one rounding; the backward must pass the
gradient exactly where the forward's stored output is > 0 (or NaN). On the GPU for the cuda and triton
backends (where a contraction the interpreter never makes could flip a mask), on the CPU for reference and
the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

import lmfused
from lmfused.batch_norm_step import batch_norm_lm_step, batch_norm_relu
from tests.conftest import HAS_CUDA

GPU_SHAPE = (8, 64, 56, 56)  # ~1.6 M elements
CPU_SHAPE = (2, 16, 6, 7)


def _cpu_backends() -> list[str]:
    return [b for b in lmfused.available_backends("cpu") if b in ("reference", "triton")]


def _adversarial_step(shape, dtype, device, layout, per_channel_k: bool, seed: int = 0):
    """u, u_prev, k and x = -round(state) with eval statistics mean 0, var 1 - eps (BN(x) = x exactly)."""
    gen = torch.Generator().manual_seed(seed)
    u, u_prev = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    k = 0.5 * torch.randn(shape[1] if per_channel_k else 1, generator=gen)
    kc = k.reshape(1, -1, *([1] * (len(shape) - 2))) if per_channel_k else k
    state = (1 - kc) * u.float() + kc * u_prev.float()
    x = (-state).to(dtype)
    # A quarter of the elements a little off, so both signs and exact zeros occur.
    x = torch.where(torch.rand(shape, generator=gen) < 0.25, (-1.001 * state).to(dtype), x)
    tensors = [t.to(device) for t in (x, u, u_prev)]
    if layout == "channels_last":
        tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    channels = shape[1]
    eps = 1e-5
    stats = (torch.zeros(channels, device=device), torch.full((channels,), 1 - eps, device=device))
    return (*tensors, k.to(device), stats, eps)


def _gpu_backends() -> list[str]:
    if not HAS_CUDA:
        return ["cuda", "triton"]  # collected, then skipped by the gpu marker
    return [b for b in ("cuda", "triton") if b in lmfused.available_backends("cuda")]


def _backends_and_devices() -> list:
    """(backend, device, shape): reference and the Triton interpreter on the CPU; cuda and triton on the GPU,
    marked gpu (skipped without a CUDA device)."""
    on_cpu = [pytest.param(b, "cpu", CPU_SHAPE, id=f"{b}-cpu") for b in _cpu_backends()]
    on_gpu = [
        pytest.param(b, "cuda", GPU_SHAPE, id=f"{b}-gpu", marks=pytest.mark.gpu) for b in _gpu_backends()
    ]
    return on_cpu + on_gpu


@pytest.mark.parametrize("backend, device, shape", _backends_and_devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per_channel_k", [False, True])
def test_step_mask(backend, device, shape, dtype, layout, per_channel_k):
    x, u, u_prev, k, (running_mean, running_var), eps = _adversarial_step(shape, dtype, device, layout,
                                                                          per_channel_k)  # fmt: skip
    u_prev = u_prev.requires_grad_()
    k = k.requires_grad_()
    out = batch_norm_lm_step(x, running_mean, running_var, None, None, u, u_prev, k, training=False, eps=eps,
                             relu=True, backend=backend)  # fmt: skip
    near_zero = (out == 0).sum().item()
    assert 0 < near_zero < out.numel()
    grad_out = torch.ones_like(out)
    grad_u_prev, grad_k = torch.autograd.grad(out, (u_prev, k), grad_out)
    kc = k.detach().reshape(1, -1, *([1] * (len(shape) - 2))) if per_channel_k else k.detach()
    passes = out > 0
    # grad_u_prev = k g where the output passes, 0 elsewhere: its zeros are the mask's (k, g never 0 here).
    assert torch.equal(grad_u_prev != 0, passes.expand_as(grad_u_prev) & (kc != 0))
    want_k = ((u_prev.detach().double() - u.double()) * passes).sum(dim=[0, *range(2, len(shape))])
    if not per_channel_k:
        want_k = want_k.sum().reshape(1)
    torch.testing.assert_close(grad_k.double(), want_k, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend, device, shape", _backends_and_devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_relu_mask(backend, device, shape, dtype, layout):
    """No states: BN(x) = x - m with m the running mean and x = round(m + tiny): signs hang on one rounding,
    the backward recomputes the mask from x."""
    gen = torch.Generator().manual_seed(1)
    channels = shape[1]
    m = torch.randn(channels, generator=gen)
    tiny = 1e-3 * torch.randn(shape, generator=gen)
    x = (m.reshape(1, -1, *([1] * (len(shape) - 2))) + tiny).to(dtype).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_()
    eps = 1e-5
    out = batch_norm_relu(x, m.to(device), torch.full((channels,), 1 - eps, device=device), None, None,
                          training=False, eps=eps, backend=backend)  # fmt: skip
    assert 0 < (out == 0).sum().item() < out.numel()
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(grad_x != 0, out > 0)
