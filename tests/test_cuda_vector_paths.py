"""The CUDA kernels on their vector paths (GPU only).

The kernels pick 128-bit accesses (8 bf16/fp16 elements) when the row length (the spatial size for contiguous
tensors, C for channels-last ones) is a multiple of 8 and every buffer is 16-byte aligned, 64-bit accesses
when it is a multiple of 4 (8-byte aligned), else the scalar path. The small shapes of the other GPU tests all
take the scalar path; these take the vector ones in both layouts, against the float64 oracle, with k in every
float dtype, with noise (in distribution), and check what grad_k's bits depend on.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import lmfused
from tests.conftest import DEVICE
from tests.helpers import ATOL, backends, lm_coefficients, make_inputs, oracle, train_step_checking_k

pytestmark = pytest.mark.gpu

HALF = (torch.bfloat16, torch.float16)
FLAGS = list(itertools.product([False, True], repeat=4))  # per_channel_k, with_f, with_scale, relu

# (shape, {layout: vector width in bits for bf16/fp16})
VECTOR_SHAPES = [
    ((4, 64, 28, 28), {"contiguous": 128, "channels_last": 128}),  # rows of 784 / 64
    ((4, 256, 14, 14), {"contiguous": 64, "channels_last": 128}),  # rows of 196 / 256
    ((4, 36, 14, 14), {"contiguous": 64, "channels_last": 64}),  # rows of 196 / 36
]
HEADLINE = (64, 256, 56, 56)


def _need_cuda() -> None:
    if "cuda" not in backends():
        pytest.skip("the cuda backend is unavailable")


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def _check_against_oracle(shape, dtype, layout, flags, seed):
    per_channel_k, with_f, with_scale, relu = flags
    u, u_prev, f, k, scale = make_inputs(
        shape, dtype, layout, per_channel_k=per_channel_k, with_f=with_f, with_scale=with_scale, seed=seed
    )
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (u, u_prev, f, k)]
    out = lmfused.lm_step(*leaves, scale=scale, relu=relu, backend="cuda")
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed)).to(dtype).to(DEVICE)
    out.backward(grad_out)
    ref_out, ref_grads = oracle(u, u_prev, f, k, scale, relu, grad_out)
    eager_out, eager_grads = oracle(u, u_prev, f, k, scale, relu, grad_out, dtype=dtype)
    got = [out] + [t.grad if t is not None else None for t in leaves]
    names = ["out", "grad_u", "grad_u_prev", "grad_f", "grad_k"]
    for name, x, ref, low in zip(names, got, [ref_out, *ref_grads], [eager_out, *eager_grads], strict=True):
        if ref is None:
            assert x is None, name
            continue
        assert x is not None and x.shape == ref.shape and torch.isfinite(x).all(), name
        terms = u.numel() // k.numel() if name == "grad_k" else 1
        bound = 2 * _max_err(low, ref) + ATOL[dtype] * math.sqrt(terms)
        err = _max_err(x, ref)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (flags {flags})"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", [s for s, _ in VECTOR_SHAPES], ids=str)
def test_vector_paths_match_oracle(shape, dtype, layout):
    """Every flag combination on the 128-bit and 64-bit paths (see VECTOR_SHAPES), both layouts."""
    _need_cuda()
    for case, flags in enumerate(FLAGS):
        _check_against_oracle(shape, dtype, layout, flags, seed=case)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_headline_shape_matches_oracle(layout):
    """64x256x56x56 bf16 (the benchmark shape, 128-bit accesses, many tiles and grad_k segments)."""
    _need_cuda()
    for case, flags in enumerate(
        [(True, True, True, True), (False, False, False, False), (True, True, False, False)]
    ):
        _check_against_oracle(HEADLINE, torch.bfloat16, layout, flags, seed=case)


def _offset_copy(t: torch.Tensor, shift: int) -> torch.Tensor:
    """``t``'s values (same layout) in a view whose storage starts ``shift`` elements into a larger buffer."""
    channels_last = (
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    )
    dense = t.permute(0, 2, 3, 1).contiguous() if channels_last else t.contiguous()
    buf = torch.empty(dense.numel() + 64, dtype=t.dtype, device=t.device)
    view = buf[shift : shift + dense.numel()].view(dense.shape)
    view.copy_(dense)
    return view.permute(0, 3, 1, 2) if channels_last else view


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bits_do_not_depend_on_alignment_on_vector_paths(dtype, layout):
    """grad_k's summation order is set by the shape alone (units of the row length's widest vector; the
    buffers' alignment only narrows the loads, csrc/lm_step.h), with no copy of a misaligned operand. So the
    same values in views at storage offsets of 16, 8, 2 or 6 bytes (128-bit, 64-bit and scalar alignment)
    give bitwise the output and gradients of aligned ones."""
    _need_cuda()
    shape = (8, 64, 28, 28)
    u, u_prev, f, k, scale = make_inputs(
        shape, dtype, layout, per_channel_k=True, with_f=True, with_scale=True
    )
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    size = u.element_size()
    results = []
    for offset_bytes in (0, 16, 8, 2, 6):
        shift = offset_bytes // size
        if shift * size != offset_bytes:
            continue  # float32 cannot sit 2 or 6 bytes off
        leaves = [_offset_copy(t, shift).requires_grad_() for t in (u, u_prev, f)]
        leaves.append(k.detach().clone().requires_grad_())
        out = lmfused.lm_step(*leaves, scale=scale, relu=True, backend="cuda")
        results.append((out, *torch.autograd.grad(out, leaves, _offset_copy(grad_out, shift))))
    for other in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], other, strict=True)):
            assert torch.equal(a, b), f"output/gradient {i}"


@pytest.mark.parametrize("k_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_k_in_any_float_dtype(k_dtype, dtype, layout):
    """The binding takes k in any float dtype (after model.half() / model.bfloat16()); grad_k comes back in
    k's dtype and matches the reference backend."""
    _need_cuda()
    shape = (4, 64, 28, 28)
    u, u_prev, f, k, scale = make_inputs(
        shape, dtype, layout, per_channel_k=True, with_f=True, with_scale=True
    )
    k = k.to(k_dtype)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype).to(DEVICE)
    grads = {}
    for backend in ("cuda", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (u, u_prev, f, k)]
        out = lmfused.lm_step(*leaves, scale=scale, relu=True, backend=backend)
        out.backward(grad_out)
        grads[backend] = (out, leaves[3].grad)
    (out, gk), (ref_out, ref_gk) = grads["cuda"], grads["reference"]
    assert out.dtype == dtype and gk.dtype == k_dtype and gk.shape == k.shape
    torch.testing.assert_close(out, ref_out, rtol=2 * 2**-7, atol=ATOL[dtype])
    slack = 1e-4 * ref_gk.double().abs().max().item()
    torch.testing.assert_close(gk.double(), ref_gk.double(), rtol=2**-7, atol=slack)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_model_cast_to_half_trains_on_cuda(dtype):
    """A ResNet built from LMStep modules, cast with .to(dtype), trains on the cuda backend (channels-last
    activations with 16 or 32 channels: the vector paths): k stays in dtype, gets finite gradients, moves."""
    _need_cuda()
    from lmfused.models.cifar import LMCifarResNet

    torch.manual_seed(0)
    model = LMCifarResNet(
        (2, 2), (16, 32), stem_channels=16, per_channel_k=True, survival_prob=0.8, backend="cuda"
    )
    model = model.to(device=DEVICE, dtype=dtype, memory_format=torch.channels_last)
    ks = lm_coefficients(model)
    assert ks and all(k.dtype == dtype for k in ks)
    x = torch.randn(8, 3, 16, 16, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8, device=DEVICE) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        before = train_step_checking_k(model, opt, x, y, ks, dtype)
        assert any(not torch.equal(k.detach(), b) for k, b in zip(ks, before, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 64, 28, 28), (8, 16, 5, 6), (8, 15, 7, 7)], ids=str)
def test_noise_distribution_on_every_path(shape, dtype):
    """Four normals per Philox call: N(0, 1), uncorrelated neighbours (which share a call), reproducible from
    torch's seed, on the 128-bit, 64-bit and scalar paths. bf16 rounds u + sigma*xi, so it is checked with
    sigma large against u = 0."""
    _need_cuda()
    u = torch.zeros(shape, dtype=dtype, device=DEVICE)
    k = torch.zeros(1, device=DEVICE)
    torch.manual_seed(11)
    xi = lmfused.lm_step(u, u, None, k, noise_std=1.0, backend="cuda")
    torch.manual_seed(11)
    assert torch.equal(xi, lmfused.lm_step(u, u, None, k, noise_std=1.0, backend="cuda"))
    xi = xi.double().flatten()
    n = xi.numel()
    tol = 5 / math.sqrt(n) + (2**-8 if dtype == torch.bfloat16 else 0.0)
    assert abs(xi.mean().item()) < tol
    assert abs(xi.std().item() - 1) < 5 * math.sqrt(2 / n) + 4 * tol
    assert abs((xi**4).mean().item() - 3) < 5 * math.sqrt(96 / n) + 40 * tol
    for lag in (1, 2, 3, 4):
        assert abs(torch.corrcoef(torch.stack([xi[:-lag], xi[lag:]]))[0, 1].item()) < tol
