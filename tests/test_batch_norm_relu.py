"""lmfused.batch_norm_relu (the batch-norm-fused kernels without states, for the BatchNorm + ReLU pairs inside
a residual branch) and lmfused.batch_norm (the same without the ReLU, for projection shortcuts) against
(relu of) F.batch_norm(...) in float64 on every backend, layout, dtype and flag; the ReLU's mask recomputed
from x; running statistics; gradcheck; opcheck; errors; the bytes it moves."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import lmfused
from lmfused.batch_norm_step import _OPS, batch_norm_relu
from tests.conftest import DEVICE
from tests.helpers import ATOL, DTYPES, backends, gradcheck, in_layout, oracle_grid

SHAPES = [(3, 5, 7, 9), (2, 3), (4, 17, 5, 3)]


def make_case(shape, dtype, layout, *, affine: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32)

    channels = shape[1]
    x = in_layout((2 * rand(*shape) + 0.5).to(dtype).to(DEVICE), layout)
    weight = (1 + 0.5 * rand(channels)).to(DEVICE) if affine else None
    bias = (0.5 * rand(channels)).to(DEVICE) if affine else None
    running_mean = (0.3 * rand(channels)).to(DEVICE)
    running_var = (0.5 + torch.rand(channels, generator=gen)).to(DEVICE)
    return x, running_mean, running_var, weight, bias


def _run(case, training, grad_out, backend=None, dtype=None, relu=True):
    """Output, gradients (x, weight, bias) and running statistics; ``backend`` None: the float64 oracle
    relu(F.batch_norm(...)) (without ``relu``: F.batch_norm(...)) in ``dtype``."""
    x, running_mean, running_var, weight, bias = case
    leaves = [
        t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (x, weight, bias)
    ]
    rm, rv = (
        running_mean.to(dtype or running_mean.dtype).clone(),
        running_var.to(dtype or running_var.dtype).clone(),
    )
    if backend is None:
        out = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5)
        out = F.relu(out) if relu else out
    else:
        op = batch_norm_relu if relu else lmfused.batch_norm
        out = op(leaves[0], rm, rv, leaves[1], leaves[2], training=training, backend=backend)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.to(out.dtype)))
    return out, [next(grads) if t is not None else None for t in leaves], rm, rv


@oracle_grid(backends(), SHAPES)
def test_matches_float64_oracle(backend, shape, layout, dtype):
    flags = [(*both, True) for both in itertools.product([False, True], repeat=2)]
    flags += [(True, True, False), (False, True, False)]  # lmfused.batch_norm: no ReLU
    for index, (training, affine, relu) in enumerate(flags):
        case = make_case(shape, dtype, layout, affine=affine, seed=index)
        grad_out = (
            torch.randn(shape, generator=torch.Generator().manual_seed(50 + index)).to(dtype).to(DEVICE)
        )
        out, grads, rm, rv = _run(case, training, grad_out, backend, relu=relu)
        ref_out, ref_grads, ref_rm, ref_rv = _run(case, training, grad_out, None, torch.float64, relu)
        assert out.dtype == dtype and out.shape == shape
        if layout == "channels_last" and len(shape) == 4:
            assert out.is_contiguous(memory_format=torch.channels_last)
        count = math.prod(shape) // shape[1]
        # The mask is the kernel's own: where its rounded output is 0 the oracle's may be a rounding above.
        mask = out.double() > 0 if relu else torch.ones_like(out, dtype=torch.bool)
        for name, got, ref in zip(
            ("out", "x", "weight", "bias"), (out, *grads), (ref_out, *ref_grads), strict=True
        ):
            if ref is None:
                assert got is None
                continue
            terms = 1 if name == "out" else count
            low = dtype if name in ("out", "x") else got.dtype
            rounding = (ref.to(low).double() - ref).abs().max().item()
            bound = 2 * rounding + ATOL[dtype] * math.sqrt(terms) * max(1.0, ref.abs().max().item() / 4)
            err = (got.double() - ref).abs()
            if (
                name == "x" and relu
            ):  # where the kernel's and the oracle's masks agree (grad_x is elementwise)
                err = err[mask == (ref_out > 0)]
            err = err.max().item() if err.numel() else 0.0
            assert err <= bound, f"{name}: {err:.3g} > {bound:.3g} ({training=}, {affine=}, {relu=})"
        torch.testing.assert_close(rm.double(), ref_rm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rv.double(), ref_rv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_follows_the_rounded_output(backend, dtype):
    """The backward's recomputed mask is the forward's: the gradient is 0 exactly where the output is 0 (in
    x's dtype, including outputs that round to 0), and passes where it is positive."""
    shape = (4, 3, 6, 5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    x[:, 1] = x[0, 1, 0, 0]  # a constant channel: BN(x) = bias exactly 0 there
    weight = torch.tensor([1.0, 1.0, 1e-3], device=DEVICE)
    bias = torch.tensor([0.0, 0.0, 1e-6], device=DEVICE)  # channel 2: many outputs round to 0 in half types
    x = x.requires_grad_()
    out = batch_norm_relu(x, None, None, weight, bias, training=True, backend=backend)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    weight_l = weight.clone().requires_grad_()
    out2 = batch_norm_relu(x.detach(), None, None, weight_l, bias, training=True, backend=backend)
    (grad_w,) = torch.autograd.grad(out2, weight_l, grad_out)
    # grad_weight = sum over the channel of g * xhat where out > 0: recompute it from the kernel's own output.
    mean, var = x.detach().double().mean((0, 2, 3)), x.detach().double().var((0, 2, 3), unbiased=False)
    xhat = (x.detach().double() - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
    want = (grad_out.double() * xhat * (out.double() > 0)).sum((0, 2, 3))
    assert torch.allclose(
        grad_w.double(), want, rtol=1e-2, atol=1e-2 * math.sqrt(x.numel()) * ATOL[dtype] * 100
    )
    assert grad_w[1].item() == 0.0  # the constant channel: out = 0 everywhere, nothing passes


@pytest.mark.parametrize("backend", backends())
def test_gradcheck(backend):
    for training, op in ((True, batch_norm_relu), (False, batch_norm_relu), (True, lmfused.batch_norm)):
        x, running_mean, running_var, weight, bias = make_case((3, 4, 5, 2), torch.float64, "channels_last",
                                                               affine=True)  # fmt: skip
        x = x.requires_grad_()
        weight, bias = weight.double().requires_grad_(), bias.double().requires_grad_()
        rm, rv = running_mean.double(), running_var.double()

        def fn(x, weight, bias, training=training, rm=rm, rv=rv, op=op):
            return op(x, rm.clone(), rv.clone(), weight, bias, training=training, backend=backend)

        assert gradcheck(fn, (x, weight, bias), backend, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_opcheck_without_states(backend):
    """The registered ops in the no-state mode (u, u_prev None), and the backward passes without out."""
    stats_op, forward_op, reduce_op, backward_op = _OPS[backend]
    for layout, training in (("contiguous", True), ("channels_last", False)):
        x, running_mean, running_var, weight, bias = make_case(
            (2, 3, 4, 5), torch.float32, layout, affine=True
        )
        mean, invstd = stats_op(x, running_mean, running_var, training, 0.1, 1e-5)
        k = torch.zeros(1, device=DEVICE)
        args = (x, mean, invstd, weight, bias, None, None, k, None, None, training, True, 0.0, False)
        torch.library.opcheck(forward_op, args)
        grad_out = torch.randn_like(x)
        reduce_args = (grad_out, None, x, mean, invstd, weight, bias, None, None, k, None, None, True, False)
        torch.library.opcheck(reduce_op, reduce_args)
        sum_dy, sum_dy_xhat, _ = reduce_op(*reduce_args)
        backward_args = (grad_out, None, None, x, mean, invstd, weight, bias, sum_dy, sum_dy_xhat, None, k,
                         None, training, True, True, False, False)  # fmt: skip
        torch.library.opcheck(backward_op, backward_args)


def test_compiles_fullgraph():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    weight, bias = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)

    def fn(x):
        return batch_norm_relu(x, None, None, weight, bias, training=True)

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, F.relu(F.batch_norm(x, None, None, weight, bias, True)))


def test_errors_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="x:"):
        batch_norm_relu(x.numpy(), None, None, None, None, training=True)
    with pytest.raises(ValueError, match="running_mean:"):
        batch_norm_relu(x, torch.zeros(4), torch.ones(3), None, None, training=True)
    with pytest.raises(ValueError, match="weight:"):
        batch_norm_relu(x, None, None, torch.ones(2), None, training=True)
    with pytest.raises(ValueError, match="running_mean:"):
        batch_norm_relu(x, None, None, None, None, training=False)
    with pytest.raises(ValueError, match="x:"):
        batch_norm_relu(torch.randn(1, 3), None, None, None, None, training=True)
    assert lmfused.batch_norm_relu is batch_norm_relu


def test_moves_eight_passes():
    """By the op-by-op byte count one training step moves 8 passes over x's size (statistics 1, normalise 2,
    backward reduction 2, backward 3: the output is never read back), against 10 for F.batch_norm + relu."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.traffic import TrafficCounter

    def passes(fused: bool) -> float:
        counter = TrafficCounter()
        with FakeTensorMode():
            x = torch.randn(8, 16, 32, 32, requires_grad=True)
            weight, bias = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
            rm, rv, grad_out = torch.zeros(16), torch.ones(16), torch.ones_like(x)
            with counter:
                if fused:
                    out = batch_norm_relu(x, rm, rv, weight, bias, training=True, backend="reference")
                else:
                    out = F.relu(F.batch_norm(x, rm, rv, weight, bias, True))
                counter.phase = "backward"
                out.backward(grad_out)
        big = [r for r in counter.records if r.largest == x.numel()]
        return sum(r.read + r.written for r in big) / (x.numel() * 4)

    assert passes(True) == pytest.approx(8.0, abs=0.01)
    assert passes(False) >= 10.0
