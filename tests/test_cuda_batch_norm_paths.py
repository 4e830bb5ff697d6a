"""The CUDA batch-norm-fused kernels on their vector and scalar paths (GPU only).

Each of the four registered CUDA ops (statistics with the running statistics, forward with the 1-bit ReLU
mask, backward reduction and backward, with the output's gradient in two parts: grad_out and grad_handoff)
against the reference backend's op on the same inputs, in both layouts,
on shapes whose rows take 128-bit, 64-bit and scalar accesses, with and without state; the forward's output
bitwise the reference's (one rounding per operation, torch's order: no fused multiply-add), so its mask is
the reference's, also on data where the sign hangs on the roundings; the mask's format (bits over the planned
2-D view, padding 0); the reductions' bits across misaligned views (their order is the shape's).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lmfused.op_support import plan_layout
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

    return act(3.0), act(), act(), act(), act(), vec(-1.5, 1.5), vec(-0.5, 0.5), vec(-0.5, 0.5), act()


def _close(got, want, dtype, what):
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = 1.0 + want.double().abs().max().item() if want.numel() else 1.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err}"


def _packed_mask(out):
    """The spec's mask of ``out``: bit j % 8 of byte [r, j // 8] over plan_layout(out)'s 2-D view is 1 iff
    NOT (out <= 0); padding bits 0."""
    plan = plan_layout(out)
    if plan.channels_last:
        view = out.permute(0, *range(2, out.dim()), 1).reshape(plan.rows, plan.row_len)
    else:
        view = out.reshape(plan.rows, plan.row_len)
    passes = ~(view <= 0)
    pad = (-plan.row_len) % 8
    passes = torch.nn.functional.pad(passes.to(torch.uint8), (0, pad)).reshape(plan.rows, -1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=out.device)
    return (passes * weights).sum(-1, dtype=torch.uint8)


CASES = list(itertools.product(SHAPES, [torch.float32, torch.bfloat16], [False, True]))


@pytest.mark.parametrize(("shape", "dtype", "channels_last"), CASES)
def test_ops_match_reference(shape, dtype, channels_last):
    _need_cuda()
    x, u, u_prev, g, shortcut, weight, bias, k, handoff = _inputs(shape, dtype, channels_last, seed=7)
    stats = {}
    for backend in ("cuda", "reference"):
        running = (torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE))
        mean, invstd = _op("batch_norm_stats_{b}", backend)(x, *running, True, 0.1, 1e-5)
        stats[backend] = (mean, invstd, *running)
    for name, a, b in zip(("mean", "invstd", "running_mean", "running_var"), *stats.values(), strict=True):
        _close(a, b, torch.float32, name)
    mean, invstd = stats["reference"][:2]
    scale = torch.rand(shape[0], device=DEVICE) + 0.5
    count = x.numel() // shape[1]
    for state, relu in itertools.product([False, True], repeat=2):
        us = (u, u_prev) if state else (None, None)
        write_mask = state and relu
        args = (x, mean, invstd, weight, bias, *us, k, scale, None, True, relu, 0.0, write_mask)
        out, mask = _op("batch_norm_lm_step_{b}", "cuda")(*args)
        ref_out, ref_mask = _op("batch_norm_lm_step_{b}", "reference")(*args)
        assert torch.equal(out, ref_out), f"forward state={state} relu={relu}: not the reference's bits"
        assert out.stride() == ref_out.stride()
        if write_mask:
            assert mask.dtype == torch.uint8 and torch.equal(mask, _packed_mask(out))
            assert torch.equal(mask, ref_mask)
        else:
            assert mask.numel() == 0
        mask_arg = mask if write_mask else None
        need_k = state  # (no state: u, u_prev are None)
        h = handoff if state else None  # (the handoff is of a step with state)
        red = (g, h, x, mean, invstd, weight, bias, *us, k, mask_arg, scale, relu, need_k)
        sums = _op("batch_norm_lm_step_{b}_backward_reduce", "cuda")(*red)
        ref_sums = _op("batch_norm_lm_step_{b}_backward_reduce", "reference")(*red)
        for name, a, b in zip(("sum_dy", "sum_dy_xhat", "grad_k"), sums, ref_sums, strict=True):
            assert a.shape == b.shape, name
            _close(a / count, b / count, torch.float32, name)
        sc = shortcut if state else None
        bwd = (g, h, sc, x, mean, invstd, weight, bias, *ref_sums[:2], mask_arg, k, scale, True, relu, True,
               state, state)  # fmt: skip
        grads = _op("batch_norm_lm_step_{b}_backward", "cuda")(*bwd)
        ref_grads = _op("batch_norm_lm_step_{b}_backward", "reference")(*bwd)
        for name, a, b in zip(("grad_x", "grad_u", "grad_u_prev"), grads, ref_grads, strict=True):
            _close(a, b, dtype, f"{name} state={state} relu={relu}")


@pytest.mark.parametrize("per_channel_k", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_on_adversarial_data_is_the_reference(dtype, channels_last, per_channel_k):
    """u_prev chosen so that (1 - k) u + k u_prev + s BN(x) is 0 up to u_prev's rounding: the output's sign
    then hangs on every rounding, and a fused multiply-add anywhere would flip some of them. The forward's
    output (and so its mask) must be bitwise the reference backend's."""
    _need_cuda()
    shape = (8, 64, 14, 14)
    x, u, _, _, _, weight, bias, _, _ = _inputs(shape, dtype, channels_last, seed=5)
    k = torch.full((shape[1] if per_channel_k else 1,), 0.375, device=DEVICE)
    mean, invstd = _op("batch_norm_stats_{b}", "reference")(x, None, None, True, 0.1, 1e-5)
    scale = torch.rand(shape[0], device=DEVICE) + 0.5
    view = (1, -1, 1, 1)
    y = ((x.float() - mean.view(view)) * invstd.view(view)) * weight.view(view) + bias.view(view)
    kk = k.view(view) if per_channel_k else k
    u_prev = (-(scale.view(-1, 1, 1, 1) * y + (1 - kk) * u.float()) / kk).to(dtype)
    args = (x, mean, invstd, weight, bias, u, u_prev, k, scale, None, True, True, 0.0, True)
    out, mask = _op("batch_norm_lm_step_{b}", "cuda")(*args)
    ref_out, ref_mask = _op("batch_norm_lm_step_{b}", "reference")(*args)
    assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)
    assert 0 < int((out > 0).sum()) < out.numel()  # the data does sit on the edge


@pytest.mark.parametrize("channels_last", [False, True])
def test_reduction_bits_do_not_depend_on_alignment(channels_last):
    _need_cuda()
    shape = (4, 64, 28, 28)
    x, u, u_prev, g, _, weight, bias, _, h = _inputs(shape, torch.bfloat16, channels_last, seed=3)

    def shifted(t):  # the same values in a view one element into its storage (scalar loads)
        if t is None:
            return None
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        if channels_last:
            view = flat[1:].view(shape[0], *shape[2:], shape[1]).permute(0, 3, 1, 2)
        else:
            view = flat[1:].view(shape)
        view.copy_(t)
        return view

    stats = _op("batch_norm_stats_{b}", "cuda")
    mean, invstd = stats(x, None, None, True, 0.1, 1e-5)
    again = stats(shifted(x), None, None, True, 0.1, 1e-5)
    assert torch.equal(mean, again[0]) and torch.equal(invstd, again[1])
    red = _op("batch_norm_lm_step_{b}_backward_reduce", "cuda")
    for k in (torch.full((1,), 0.3, device=DEVICE), torch.full((shape[1],), 0.3, device=DEVICE)):
        _, mask = _op("batch_norm_lm_step_{b}", "cuda")(
            x, mean, invstd, weight, bias, u, u_prev, k, None, None, True, True, 0.0, True
        )
        tail = (k, mask, None, True, True)
        for handoff in (None, h):
            bn = (mean, invstd, weight, bias)
            a = red(g, handoff, x, *bn, u, u_prev, *tail)
            b = red(*map(shifted, (g, handoff, x)), *bn, *map(shifted, (u, u_prev)), *tail)
            c = red(g, shifted(handoff), x, *bn, u, u_prev, *tail)  # only the handoff misaligned
            assert a[2].shape == k.shape
            for s, t, v in zip(a, b, c, strict=True):
                assert torch.equal(s, t) and torch.equal(s, v)


def test_grad_handoff_unlike_grad_out_is_an_error():
    """grad_handoff must have grad_out's shape and dtype: both backward ops say so, naming it."""
    _need_cuda()
    shape = (2, 8, 4, 4)
    x, u, u_prev, g, _, weight, bias, k, h = _inputs(shape, torch.float32, False, seed=11)
    mean, invstd = _op("batch_norm_stats_{b}", "cuda")(x, None, None, True, 0.1, 1e-5)
    red = _op("batch_norm_lm_step_{b}_backward_reduce", "cuda")
    bwd = _op("batch_norm_lm_step_{b}_backward", "cuda")
    for bad, error in ((h[:1], ValueError), (h.double(), TypeError)):
        with pytest.raises(error, match="grad_handoff"):
            red(g, bad, x, mean, invstd, weight, bias, u, u_prev, k, None, None, False, True)
        with pytest.raises(error, match="grad_handoff"):
            bwd(g, bad, None, x, mean, invstd, weight, bias, mean, invstd, None, k, None, True, False, True,
                True, True)  # fmt: skip


def test_statistics_in_evaluation_and_empty_batch():
    """Evaluation: the running statistics as mean and 1 / sqrt(var + eps), nothing mutated; a training batch
    without values: mean 0, invstd 1 / sqrt(1 + eps), running statistics untouched."""
    _need_cuda()
    stats = _op("batch_norm_stats_{b}", "cuda")
    rm, rv = torch.randn(8, device=DEVICE), torch.rand(8, device=DEVICE) + 0.5
    x = torch.randn(4, 8, 3, 3, device=DEVICE)
    mean, invstd = stats(x, rm, rv, False, 0.1, 1e-3)
    assert torch.equal(mean, rm)
    torch.testing.assert_close(invstd, torch.rsqrt(rv + 1e-3))
    rm0, rv0 = rm.clone(), rv.clone()
    mean, invstd = stats(x[:0], rm, rv, True, 0.1, 1e-3)
    assert torch.equal(mean, torch.zeros(8, device=DEVICE))
    torch.testing.assert_close(invstd, torch.full((8,), (1 + 1e-3) ** -0.5, device=DEVICE))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize(
    "running_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
def test_running_statistics_of_any_float_dtype(running_dtype):
    """The statistics kernel updates running statistics of the model's dtype in place (model.half())."""
    _need_cuda()
    x = torch.randn(8, 16, 5, 5, device=DEVICE) * 2 + 1
    outs = {}
    for backend in ("cuda", "reference"):
        rm = torch.zeros(16, device=DEVICE, dtype=running_dtype)
        rv = torch.ones(16, device=DEVICE, dtype=running_dtype)
        _op("batch_norm_stats_{b}", backend)(x, rm, rv, True, 0.25, 1e-5)
        outs[backend] = (rm, rv)
    # Both backends compute the statistics of float32 x in float32: float64 running statistics hold float32
    # values, rounded differently (summation order), so they compare at float32's tolerance.
    half, float32 = {"rtol": 1e-2, "atol": 1e-2}, {"rtol": 1.3e-6, "atol": 1e-5}
    tol = {torch.float16: half, torch.bfloat16: half, torch.float64: float32}.get(running_dtype, {})
    for a, b in zip(*outs.values(), strict=True):
        torch.testing.assert_close(a, b, **tol)
