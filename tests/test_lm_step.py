"""lm_step against the float64 oracle on every backend, layout, dtype and option flag; gradcheck; opcheck."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import lmfused
from lmfused.ops import _FORWARD_OPS
from tests.conftest import DEVICE, HAS_CUDA
from tests.helpers import ATOL, DTYPES, LAYOUTS, backends, gradcheck, make_inputs, oracle, oracle_grid

SHAPES = [(3, 5, 7, 9), (2, 3), (1, 1, 1, 1), (2, 4, 3, 5, 6), (4, 33, 17, 19)]
FLAGS = list(itertools.product([False, True], repeat=4))  # per_channel_k, with_f, with_scale, relu


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


@oracle_grid(backends(), SHAPES)
def test_matches_float64_oracle(backend, shape, layout, dtype):
    """Forward and all four gradients within 2x the eager same-precision error (+ small atol)."""
    _check_against_oracle(backend, shape, layout, dtype, FLAGS)


def _check_against_oracle(backend, shape, layout, dtype, flag_cases):
    for case, (per_channel_k, with_f, with_scale, relu) in enumerate(flag_cases):
        u, u_prev, f, k, scale = make_inputs(
            shape, dtype, layout, per_channel_k=per_channel_k, with_f=with_f, with_scale=with_scale, seed=case
        )
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (u, u_prev, f, k)]
        out = lmfused.lm_step(*leaves, scale=scale, relu=relu, backend=backend)
        assert out.shape == u.shape and out.dtype == dtype
        grad_out = (
            torch.randn(shape, generator=torch.Generator().manual_seed(100 + case)).to(dtype).to(DEVICE)
        )
        out.backward(grad_out)

        ref_out, ref_grads = oracle(u, u_prev, f, k, scale, relu, grad_out)
        eager_out, eager_grads = oracle(u, u_prev, f, k, scale, relu, grad_out, dtype=dtype)
        got = [out] + [t.grad if t is not None else None for t in leaves]
        want = [ref_out, *ref_grads]
        eager = [eager_out, *eager_grads]
        names = ["out", "grad_u", "grad_u_prev", "grad_f", "grad_k"]
        for name, x, ref, low in zip(names, got, want, eager, strict=True):
            if ref is None:
                assert x is None, name
                continue
            assert x is not None and x.shape == ref.shape, name
            assert torch.isfinite(x).all(), name
            # grad_k sums many terms: its slack grows with the number of summed elements.
            terms = u.numel() // k.numel() if name == "grad_k" else 1
            bound = 2 * _max_err(low, ref) + ATOL[dtype] * math.sqrt(terms)
            err = _max_err(x, ref)
            flags = dict(per_channel_k=per_channel_k, f=with_f, scale=with_scale, relu=relu)
            assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({flags})"
        if layout != "permuted":  # channels-last stays channels-last, contiguous stays contiguous
            memory_format = torch.channels_last if layout == "channels_last" and u.dim() == 4 else None
            if memory_format is not None:
                assert out.is_contiguous(memory_format=memory_format)


# Rows of 14x14 and 4x4 (vectors of 4 and 8 in the Triton channel walk), rows and samples longer than a
# Triton tile (4096: the compare-and-subtract row index), more channels than a tile.
WALK_SHAPES = [(2, 3, 14, 14), (3, 5, 4, 4), (2, 3, 70, 70), (1, 4100, 1, 2), (2, 5000)]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", WALK_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tiling_edges_match_float64_oracle(backend, shape, layout):
    """The oracle check on shapes that take the other branches of the kernels' index arithmetic (bf16; a
    per-channel and a scalar k, every input and the scale on: each walk of the Triton backward)."""
    _check_against_oracle(
        backend, shape, layout, torch.bfloat16, [(True, True, True, True), (False, True, True, False)]
    )


def test_triton_channels_last_grad_k_stacks_row_blocks(monkeypatch):
    """The Triton channels-last per-channel grad_k with several row blocks per program (taken at large
    shapes only, here forced), the last program running past the rows."""
    if "triton" not in backends():
        pytest.skip("triton unavailable")
    kernels = pytest.importorskip("lmfused.triton_kernels.lm_step")
    monkeypatch.setattr(kernels, "_MIN_PROGRAMS", 1)
    kernels._columns_plan.cache_clear()
    try:
        assert kernels._columns_plan(4 * 17 * 19, 33)[5] == 8  # row_iters
        _check_against_oracle(
            "triton", (4, 33, 17, 19), "channels_last", torch.float32, [(True, True, True, True)]
        )
    finally:
        kernels._columns_plan.cache_clear()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "k{}f{}s{}r{}".format(*map(int, f)))
def test_gradcheck_float64(backend, layout, flags):
    per_channel_k, with_f, with_scale, relu = flags
    u, u_prev, f, k, scale = make_inputs(
        (2, 3, 2, 3), torch.float64, layout, per_channel_k=per_channel_k, with_f=with_f, with_scale=with_scale
    )
    k = k.double()
    inputs = [t.detach().clone().requires_grad_() for t in (u, u_prev, f, k) if t is not None]

    def fn(*args):
        args = list(args)
        uu, up = args[0], args[1]
        ff = args[2] if with_f else None
        kk = args[-1]
        return lmfused.lm_step(uu, up, ff, kk, scale=scale, relu=relu, backend=backend)

    whole = layout == "channels_last" and all(flags)  # on the Triton interpreter too: every entry
    assert gradcheck(fn, inputs, backend, whole_jacobian=whole, eps=1e-6, atol=1e-8)


class _OneWrongEntry(torch.autograd.Function):
    """The identity, whose backward is 1% off in one element: one wrong column of the Jacobian."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad.view(-1)[7] *= 1.01
        return grad


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("whole_jacobian", [False, True])
def test_gradcheck_helper_catches_one_wrong_entry(backend, whole_jacobian):
    """The gradcheck the tests above use, in either mode, fails a Jacobian with one entry 1% off (gradcheck's
    rtol is 0.1%)."""
    u, u_prev, f, k, _ = make_inputs((2, 3, 2, 3), torch.float64, "contiguous", per_channel_k=True,
                                     with_f=True, with_scale=False)  # fmt: skip
    inputs = [t.detach().clone().requires_grad_() for t in (u, u_prev, f, k.double())]

    def fn(uu, up, ff, kk):
        return lmfused.lm_step(_OneWrongEntry.apply(uu), up, ff, kk, backend=backend)

    with pytest.raises(GradcheckError, match="Jacobian mismatch"):
        gradcheck(fn, inputs, backend, whole_jacobian=whole_jacobian, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("wants", [(1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 0, 1), (0, 0, 0, 1)], ids=str)
def test_eager_autograd_is_the_registered_formula(backend, wants):
    """lm_step's eager autograd path and the registered op's autograd (what torch.compile traces) save the
    same tensors and give bitwise the same gradients, for every subset of inputs that asks for one."""
    u, u_prev, f, k, scale = make_inputs(
        (2, 5, 3, 4), torch.float32, "channels_last", per_channel_k=True, with_f=True, with_scale=True
    )
    grad_out = torch.randn(u.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    grads, nodes = [], []
    for call in (
        lambda *t: lmfused.lm_step(*t, scale=scale, relu=True, backend=backend),
        lambda *t: _FORWARD_OPS[backend](*t, scale, None, True, 0.0),
    ):
        pairs = zip((u, u_prev, f, k), wants, strict=True)
        leaves = [x.detach().clone().requires_grad_(bool(w)) for x, w in pairs]
        out = call(*leaves)
        nodes.append(type(out.grad_fn).__name__)
        grads.append(torch.autograd.grad(out, [x for x in leaves if x.requires_grad], grad_out))
    assert "EagerLMStep" in nodes[0] and "EagerLMStep" not in nodes[1]  # two different paths were compared
    for eager, registered in zip(*grads, strict=True):
        assert torch.equal(eager, registered)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    op = _FORWARD_OPS[backend]
    samples = []
    for layout, (per_channel_k, with_f, with_scale, relu) in zip(
        ["contiguous", "channels_last", "permuted", "contiguous"],
        [
            (True, True, True, True),
            (False, True, False, False),
            (True, False, False, True),
            (False, True, True, False),
        ],
        strict=True,
    ):
        u, u_prev, f, k, scale = make_inputs(
            (2, 3, 4, 5),
            torch.float32,
            layout,
            per_channel_k=per_channel_k,
            with_f=with_f,
            with_scale=with_scale,
        )
        tensors = [t.requires_grad_(requires_grad) if t is not None else None for t in (u, u_prev, f, k)]
        samples.append((*tensors, scale, None, relu, 0.0))
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    u, u_prev, f, k, _ = make_inputs(
        (2, 3, 4, 5), torch.bfloat16, "contiguous", per_channel_k=True, with_f=True, with_scale=False
    )
    samples.append((u, u_prev, f, k.requires_grad_(requires_grad), None, seed, True, 0.3))
    for args in samples:
        torch.library.opcheck(op, args)


def _gradients(inputs, backend, **options) -> list[torch.Tensor]:
    """Gradients of fresh leaves copied from ``inputs`` (u, u_prev, f, k) after ``lm_step(..., **options)``
    and a backward of ones."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = lmfused.lm_step(*leaves, backend=backend, **options)
    out.backward(torch.ones_like(out))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend", backends())
def test_backward_is_deterministic(backend):
    for layout in ("contiguous", "channels_last"):
        u, u_prev, f, k, scale = make_inputs(
            (4, 33, 17, 19), torch.float32, layout, per_channel_k=True, with_f=True, with_scale=True
        )
        first, second = (_gradients((u, u_prev, f, k), backend, scale=scale, relu=True) for _ in range(2))
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)


def _at_storage_offset(t, offset: int):
    """The values of ``t`` in the same layout, in a fresh buffer at ``offset`` elements from its start (so
    the data pointer is misaligned for every vector width when offset is odd)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))  # outermost dim first
    dense = t.permute(order).contiguous()
    buf = torch.empty(offset + t.numel(), dtype=t.dtype, device=t.device)
    buf[offset:] = dense.flatten()
    view = buf[offset:].view(dense.shape).permute([order.index(d) for d in range(t.dim())])
    assert view.stride() == t.stride() and torch.equal(view, t)
    return view


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bits_do_not_depend_on_alignment(backend, layout, dtype):
    """The same values at a misaligned storage offset give bitwise the same output and gradients, grad_k
    included: tiling and summation order depend on shape, layout and flags only."""
    for per_channel_k in (True, False):
        u, u_prev, f, k, scale = make_inputs(
            (4, 33, 17, 19), dtype, layout, per_channel_k=per_channel_k, with_f=True, with_scale=True
        )
        grad_out = torch.randn(u.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
        results = []
        for offset in (0, 1, 3):
            tensors = [
                _at_storage_offset(t, offset) if offset else t.clone() for t in (u, u_prev, f, grad_out)
            ]
            leaves = [t.requires_grad_() for t in tensors[:3]] + [k.detach().clone().requires_grad_()]
            out = lmfused.lm_step(*leaves, scale=scale, relu=True, backend=backend)
            results.append((out, *torch.autograd.grad(out, leaves, tensors[3])))
        for other in results[1:]:
            for i, (a, b) in enumerate(zip(results[0], other, strict=True)):
                assert torch.equal(a, b), f"output/gradient {i} (per_channel_k={per_channel_k})"


def test_triton_backward_reads_aligned_data():
    """The Triton launcher copies misaligned views before the grad_k reduction (Triton compiles another
    variant, with another register layout and so another summation order, for a misaligned pointer)."""
    kernels = pytest.importorskip("lmfused.triton_kernels.common")
    t = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    assert kernels.aligned(t) is t
    for offset in (1, 3, 4):  # 2, 6 and 8 bytes
        view = _at_storage_offset(t, offset)
        copy = kernels.aligned(view)
        assert copy is not view and copy.storage_offset() == 0 and copy.stride() == t.stride()
        assert torch.equal(copy, t)
    assert kernels.aligned(_at_storage_offset(t, 8)).storage_offset() == 8  # 16 bytes: kept as is


@pytest.mark.parametrize("backend", backends())
def test_only_needed_gradients(backend):
    """Inputs without requires_grad get no gradient; the others still match the oracle."""
    u, u_prev, f, k, scale = make_inputs(
        (3, 5, 7, 9), torch.float32, "contiguous", per_channel_k=True, with_f=True, with_scale=True
    )
    for mask in itertools.product([False, True], repeat=4):
        if not any(mask):
            continue
        leaves = [t.detach().clone().requires_grad_(m) for t, m in zip((u, u_prev, f, k), mask, strict=True)]
        out = lmfused.lm_step(*leaves, scale=scale, relu=True, backend=backend)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        _, ref = oracle(u, u_prev, f, k, scale, True, grad_out)
        for leaf, m, r in zip(leaves, mask, ref, strict=True):
            if m:
                torch.testing.assert_close(leaf.grad.double(), r, atol=1e-4, rtol=1e-5)
            else:
                assert leaf.grad is None


@pytest.mark.parametrize("backend", backends())
def test_k_zero_is_a_resnet_step(backend):
    u, u_prev, f, k, _ = make_inputs(
        (2, 4, 3, 5), torch.float32, "contiguous", per_channel_k=False, with_f=True, with_scale=False
    )
    out = lmfused.lm_step(u, u_prev, f, torch.zeros_like(k), backend=backend)
    torch.testing.assert_close(out, u + f, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backends())
def test_k_accepts_channel_column_shape(backend):
    u, u_prev, f, k, _ = make_inputs(
        (2, 4, 3, 5), torch.float32, "contiguous", per_channel_k=True, with_f=True, with_scale=False
    )
    a = lmfused.lm_step(u, u_prev, f, k.reshape(4, 1, 1), backend=backend)
    b = lmfused.lm_step(u, u_prev, f, k, backend=backend)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------
# Noise injection
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends())
def test_noise_is_reproducible_from_torch_seed(backend):
    u, u_prev, f, k, _ = make_inputs(
        (3, 5, 7, 9), torch.float32, "contiguous", per_channel_k=True, with_f=True, with_scale=False
    )
    torch.manual_seed(7)
    a = lmfused.lm_step(u, u_prev, f, k, noise_std=0.5, backend=backend)
    torch.manual_seed(7)
    b = lmfused.lm_step(u, u_prev, f, k, noise_std=0.5, backend=backend)
    c = lmfused.lm_step(u, u_prev, f, k, noise_std=0.5, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_noise_statistics(backend, layout):
    shape = (8, 16, 24, 24)
    u, u_prev, f, k, _ = make_inputs(
        shape, torch.float32, layout, per_channel_k=True, with_f=True, with_scale=False
    )
    std = 0.3
    clean = lmfused.lm_step(u, u_prev, f, k, backend=backend)
    noisy = lmfused.lm_step(u, u_prev, f, k, noise_std=std, backend=backend)
    xi = ((noisy - clean) / std).double().flatten()
    n = xi.numel()
    assert abs(xi.mean().item()) < 5 / math.sqrt(n)
    assert abs(xi.std().item() - 1) < 5 * math.sqrt(2 / n)
    # Fourth moment of a normal is 3 (variance of x^4 is 96): catches a uniform or otherwise wrong law.
    assert abs((xi**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    # Independent across elements: neighbours, and elements 2, 3 and 4 apart in memory (one Philox call
    # gives four normals, two Box-Muller pairs that share a radius each), are uncorrelated, and so are
    # their squares (which a shared radius would correlate).
    memory_order = xi.reshape(noisy.shape).permute(*_memory_dims(noisy)).flatten()
    for lag in (1, 2, 3, 4):
        for x in (memory_order, memory_order**2):
            corr = torch.corrcoef(torch.stack([x[:-lag], x[lag:]]))[0, 1].item()
            assert abs(corr) < 5 / math.sqrt(n), (lag, corr)


def _memory_dims(t):
    """The dims of ``t`` from outermost to innermost in memory."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


@pytest.mark.parametrize("backend", backends())
def test_noise_leaves_gradients_unchanged(backend):
    u, u_prev, f, k, scale = make_inputs(
        (3, 5, 7, 9), torch.float32, "contiguous", per_channel_k=True, with_f=True, with_scale=True
    )
    quiet, noisy = (_gradients((u, u_prev, f, k), backend, scale=scale, noise_std=s) for s in (0.0, 0.7))
    for a, b in zip(quiet, noisy, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------
# Shapes at the edges
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (0, 5)], ids=str)
def test_empty_tensors(backend, shape):
    u, u_prev, f = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(3))
    k = torch.randn(shape[1], device=DEVICE, requires_grad=True)
    out = lmfused.lm_step(
        u, u_prev, f, k, scale=torch.ones(shape[0], device=DEVICE), relu=True, backend=backend
    )
    assert out.shape == shape
    out.sum().backward()
    assert u.grad.shape == shape and f.grad.shape == shape
    assert torch.equal(k.grad, torch.zeros_like(k))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("rows", [2**29 + 7, 2**29 + 8], ids=["scalar_path", "vector_path"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_more_than_2_to_the_31_elements(backend, rows, most_of_the_gpu_memory):
    """64-bit indexing: the elements past 2^31 are computed and their gradients reduced, with an odd row
    length (the CUDA scalar path) and one divisible by 8 (its 128-bit path). About 30 GB of GPU memory."""
    if backend not in backends():
        pytest.skip(f"{backend} unavailable")
    shape = (2, 2, rows, 1)  # 2^31 + 28 (or + 32) elements in bf16
    torch.manual_seed(0)
    u, u_prev, f = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k = torch.tensor([0.25, -0.5], device="cuda", requires_grad=True)
    out = lmfused.lm_step(u, u_prev, f, k, backend=backend)
    tail = (slice(None), slice(None), slice(-1000, None))
    want = lmfused.lm_step(
        u[tail].contiguous(), u_prev[tail].contiguous(), f[tail].contiguous(), k.detach(), backend="reference"
    )
    # The kernels may fuse multiply-adds that the reference rounds separately: allow one bf16 ulp.
    torch.testing.assert_close(out[tail], want, atol=1e-6, rtol=2**-7)
    out.backward(torch.ones_like(out))
    chunk = 2**26  # rows at a time: float32 copies of the whole tensors would be 8.6 GB each
    ref = sum(
        (u_prev[:, :, i : i + chunk].float() - u[:, :, i : i + chunk].float()).sum(dim=(0, 2, 3)).double()
        for i in range(0, rows, chunk)
    )
    torch.testing.assert_close(k.grad.double(), ref, rtol=1e-4, atol=1.0)


# One unit in the last place of each dtype: the two kernels may contract multiply-adds differently.
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 33, 17, 19), (4, 64, 28, 28), (4, 36, 14, 14)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_triton(layout, dtype, shape):
    """The hand-written kernels against the Triton ones, every flag, on the CUDA scalar, 128-bit and 64-bit
    paths (the shapes in that order, for 16-bit dtypes): outputs and gradients within 2 ulp, grad_k within
    float32 summation slack. The noise is compared in distribution (DESIGN.md 1c): both draw Philox integers,
    but build the normals with different maths and groupings, so the values differ."""
    if not {"cuda", "triton"} <= set(backends()):
        pytest.skip("needs both the cuda and the triton backend")
    for case, (per_channel_k, with_f, with_scale, relu) in enumerate(FLAGS):
        u, u_prev, f, k, scale = make_inputs(
            shape, dtype, layout, per_channel_k=per_channel_k, with_f=with_f, with_scale=with_scale, seed=case
        )
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(case)).to(dtype).to(DEVICE)
        results = []
        for backend in ("cuda", "triton"):
            leaves = [t.detach().clone().requires_grad_() for t in (u, u_prev, f, k) if t is not None]
            out = lmfused.lm_step(*leaves[:2], leaves[2] if with_f else None, leaves[-1], scale=scale,
                                  relu=relu, backend=backend)  # fmt: skip
            results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
        for i, (got, want) in enumerate(zip(*results, strict=True)):
            what = f"output/gradient {i}, case {case}"
            if i == len(results[0]) - 1:  # grad_k: float32 sums in different orders
                slack = 1e-4 * want.abs().max().item()
                torch.testing.assert_close(got, want, rtol=1e-4, atol=slack, msg=what)
            else:
                torch.testing.assert_close(got, want, rtol=2 * ULP[dtype], atol=ATOL[dtype], msg=what)
    # Noise: the same law on both (two-sample Kolmogorov-Smirnov at the 0.1% level, and the moments).
    zeros = make_inputs(shape, dtype, layout, per_channel_k=False, with_f=False, with_scale=False)[0].zero_()
    k0 = torch.zeros(1, device=DEVICE)
    draws = []
    for backend in ("cuda", "triton"):
        torch.manual_seed(1)
        xi = lmfused.lm_step(zeros, zeros, None, k0, noise_std=1.0, backend=backend)
        draws.append(xi.double().flatten())
    a, b = (x.sort().values for x in draws)
    n = a.numel()
    grid = torch.cat([a, b])
    cdf = [torch.searchsorted(x, grid, right=True).double() / n for x in (a, b)]
    assert (cdf[0] - cdf[1]).abs().max().item() < 1.95 * math.sqrt(2 / n)
    for x in (a, b):
        assert abs(x.mean().item()) < 5 / math.sqrt(n) + 2**-8
        assert abs(x.std().item() - 1) < 5 * math.sqrt(2 / n) + 2**-6


def _capture(fn):
    """fn() captured in a CUDA graph after a warm-up on a side stream (torch's documented recipe); returns
    (graph, fn's outputs as captured: the static tensors every replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph, static


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay(backend):
    """Forward and backward replay from a CUDA graph on new data, bitwise as an eager call; with noise, each
    replay draws a new seed on the device (no host sync), so replays differ and the noise has the set std."""
    if backend not in backends():
        pytest.skip(f"{backend} unavailable")
    torch.manual_seed(0)
    u, u_prev, f = (torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True) for _ in range(3))
    k = torch.randn(8, device="cuda", requires_grad=True)
    scale = torch.rand(4, device="cuda") + 0.5
    grad_out = torch.randn(4, 8, 6, 6, device="cuda")

    def step():
        out = lmfused.lm_step(u, u_prev, f, k, scale=scale, relu=True, backend=backend)
        return (out.detach(), *torch.autograd.grad(out, (u, u_prev, f, k), grad_out))

    graph, static = _capture(step)
    with torch.no_grad():
        for t in (u, u_prev, f, k, grad_out):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(static, step(), strict=True):
        assert torch.equal(got, want)

    noisy_graph, noisy = _capture(lambda: lmfused.lm_step(u, u_prev, f, k, noise_std=0.5, backend=backend))
    clean = lmfused.lm_step(u, u_prev, f, k, backend=backend).detach()
    noisy_graph.replay()
    first = noisy.detach().clone()
    noisy_graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, noisy)
    assert abs((first - clean).float().std().item() - 0.5) < 0.05


# ------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def block(u, u_prev, f, k, scale):
        return lmfused.lm_step(u, u_prev, torch.tanh(f), k, scale=scale, relu=True, backend=backend) * 2

    u, u_prev, f, k, scale = make_inputs(
        (2, 4, 5, 6), torch.float32, "channels_last", per_channel_k=True, with_f=True, with_scale=True
    )
    leaves = [t.detach().clone().requires_grad_() for t in (u, u_prev, f, k)]
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(*leaves, scale)
    out.sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in (u, u_prev, f, k)]
    ref = block(*ref_leaves, scale)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_with_noise_reference():
    torch._dynamo.reset()
    u, u_prev, f, k, _ = make_inputs(
        (2, 4, 5, 6), torch.float32, "contiguous", per_channel_k=True, with_f=True, with_scale=False
    )
    fn = torch.compile(lambda *a: lmfused.lm_step(*a, noise_std=0.1, backend="reference"), fullgraph=True)
    out = fn(u, u_prev, f, k)
    assert out.shape == u.shape and not torch.equal(
        out, lmfused.lm_step(u, u_prev, f, k, backend="reference")
    )


# ------------------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------------------


def test_available_backends_lists_reference_everywhere():
    assert "reference" in lmfused.available_backends("cpu")
    assert lmfused.available_backends("cpu")[-1] == "reference"


def test_unknown_backend_is_an_error():
    u = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend"):
        lmfused.lm_step(u, u, u, torch.zeros(1), backend="fastest")


def test_unavailable_backend_says_why():
    u = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="cuda.*CUDA tensors"):
        lmfused.lm_step(u, u, u, torch.zeros(1), backend="cuda")


def test_backend_from_environment(monkeypatch):
    u = torch.randn(2, 3)
    monkeypatch.setenv("LMFUSED_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        lmfused.lm_step(u, u, u, torch.zeros(1))


@pytest.mark.gpu
def test_default_backend_on_gpu_is_a_kernel():
    assert lmfused.available_backends("cuda")[0] in ("cuda", "triton")
    assert HAS_CUDA


def test_channels_last_check_matches_the_permute_rule():
    """The fast channels-last test (torch's stride flag for ranks 4 and 5) says what the permuted view's
    contiguity says, for every stride order, size-1 dims and strided slices included."""
    from lmfused.op_support import _to_last, is_channels_last_dense

    for rank, sizes in ((4, (1, 2, 3)), (5, (1, 2))):
        for shape in itertools.product(sizes, repeat=rank):
            base = torch.empty(shape)
            for order in itertools.permutations(range(rank)):
                t = base.permute(order).contiguous().permute([order.index(d) for d in range(rank)])
                for view in (t, t[..., ::2]):
                    want = _to_last(view).is_contiguous()
                    assert is_channels_last_dense(view) == want, (shape, view.stride())
