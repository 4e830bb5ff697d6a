"""The CUDA batch-norm-fused kernels on their vector and scalar paths (GPU only).

Each of the four registered CUDA ops (statistics, forward, backward reduction, backward) against the reference
backend's op on the same inputs, in both layouts, on shapes whose rows take 128-bit, 64-bit and scalar
accesses, with and without state, and the reductions' bits across misaligned views: the kernels sum in an
order set by the shape alone, so a view at a storage offset gives the same bits. With state, the backward
reduction's ReLU mask recomputed from x, u, u_prev and k (out None) gives the bits of the one read from out.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.conftest import DEVICE
from tests.helpers import backends

pytestmark = pytest.mark.gpu

SHAPES = [(4, 64, 28, 28), (4, 36, 14, 14), (3, 5, 7, 9)]  # 128-bit, 64-bit, scalar rows (bf16/fp16)
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _need_cuda() -> None:
    if "cuda" not in backends():
        pytest.skip("the cuda backend is unavailable")


def _op(name: str, backend: str):
    return getattr(torch.ops.lmfused, name.format(b=backend))


def _inputs(shape, dtype, channels_last, seed):
    gen = torch.Generator().manual_seed(seed)

    def act(offset=0.0):
        t = (offset + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
        return t.to(memory_format=torch.channels_last) if channels_last else t

    channels = shape[1]

    def vec(lo, hi):
        return (lo + (hi - lo) * torch.rand(channels, generator=gen, dtype=torch.float64)).float().to(DEVICE)

    return act(3.0), act(), act(), act(), act(), vec(-1.5, 1.5), vec(-0.5, 0.5), vec(-0.5, 0.5)


def _close(got, want, dtype, what):
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = 1.0 + want.double().abs().max().item() if want.numel() else 1.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err}"


CASES = list(itertools.product(SHAPES, [torch.float32, torch.bfloat16], [False, True]))


@pytest.mark.parametrize(("shape", "dtype", "channels_last"), CASES)
def test_ops_match_reference(shape, dtype, channels_last):
    _need_cuda()
    x, u, u_prev, g, shortcut, weight, bias, k = _inputs(shape, dtype, channels_last, seed=7)
    mean, var = _op("batch_norm_stats_{b}", "cuda")(x)
    ref_mean, ref_var = _op("batch_norm_stats_{b}", "reference")(x)
    _close(mean, ref_mean, torch.float32, "mean")
    _close(var, ref_var, torch.float32, "var")
    invstd = torch.rsqrt(ref_var + 1e-5)
    scale = torch.rand(shape[0], device=DEVICE) + 0.5
    for state, relu in itertools.product([False, True], repeat=2):
        us = (u, u_prev) if state else (None, None)
        args = (x, ref_mean, invstd, weight, bias, *us, k, scale, None, True, relu, 0.0)
        out = _op("batch_norm_lm_step_{b}", "cuda")(*args)
        ref_out = _op("batch_norm_lm_step_{b}", "reference")(*args)
        _close(out, ref_out, dtype, f"forward state={state} relu={relu}")
        assert out.stride() == ref_out.stride()
        saved_out = out if state else None  # the no-state mode recomputes the ReLU mask
        need_k = state  # (no state: u, u_prev are None)
        red = (g, x, ref_mean, invstd, weight, bias, *us, k, saved_out, scale, relu, need_k)
        sums = _op("batch_norm_lm_step_{b}_backward_reduce", "cuda")(*red)
        ref_sums = _op("batch_norm_lm_step_{b}_backward_reduce", "reference")(*red)
        for name, a, b in zip(("sum_dy", "sum_dy_xhat", "grad_k"), sums, ref_sums, strict=True):
            _close(a / x[:, 0].numel(), b / x[:, 0].numel(), torch.float32, name)
        if state:  # the mask recomputed from x, u, u_prev and k: the bits of the mask read from out
            red_recomputed = (g, x, ref_mean, invstd, weight, bias, *us, k, None, scale, relu, need_k)
            recomputed = _op("batch_norm_lm_step_{b}_backward_reduce", "cuda")(*red_recomputed)
            for name, a, b in zip(("sum_dy", "sum_dy_xhat", "grad_k"), recomputed, sums, strict=True):
                assert torch.equal(a, b), f"{name} relu={relu}: recomputed mask differs from out's"
        count = x.numel() // shape[1]
        means = (ref_sums[0] / count, ref_sums[1] / count)
        sc = shortcut if state else None
        bwd = (
            g,
            sc,
            x,
            ref_mean,
            invstd,
            weight,
            bias,
            *means,
            saved_out,
            k,
            scale,
            True,
            relu,
            True,
            state,
            state,
        )
        grads = _op("batch_norm_lm_step_{b}_backward", "cuda")(*bwd)
        ref_grads = _op("batch_norm_lm_step_{b}_backward", "reference")(*bwd)
        for name, a, b in zip(("grad_x", "grad_u", "grad_u_prev"), grads, ref_grads, strict=True):
            _close(a, b, dtype, f"{name} state={state} relu={relu}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_reduction_bits_do_not_depend_on_alignment(channels_last):
    _need_cuda()
    shape = (4, 64, 28, 28)
    x, u, u_prev, g, _, weight, bias, _ = _inputs(shape, torch.bfloat16, channels_last, seed=3)

    def shifted(t):  # the same values in a view one element into its storage (scalar loads)
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        if channels_last:
            view = flat[1:].view(shape[0], *shape[2:], shape[1]).permute(0, 3, 1, 2)
        else:
            view = flat[1:].view(shape)
        view.copy_(t)
        return view

    mean, var = _op("batch_norm_stats_{b}", "cuda")(x)
    mean2, var2 = _op("batch_norm_stats_{b}", "cuda")(shifted(x))
    assert torch.equal(mean, mean2) and torch.equal(var, var2)
    invstd = torch.rsqrt(var + 1e-5)
    red = _op("batch_norm_lm_step_{b}_backward_reduce", "cuda")
    k = torch.full((1,), 0.3, device=DEVICE)
    for relu in (False, True):  # relu: the mask recomputed with state (reads u, u_prev, k; no out)
        tail = (k, None, None, relu, True)
        a = red(g, x, mean, invstd, weight, bias, u, u_prev, *tail)
        b = red(*map(shifted, (g, x)), mean, invstd, weight, bias, *map(shifted, (u, u_prev)), *tail)
        for s, t in zip(a, b, strict=True):
            assert torch.equal(s, t)
