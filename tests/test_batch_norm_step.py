"""batch_norm_lm_step (DESIGN.md 1b) against F.batch_norm + the LM step in float64, on every backend, layout,
dtype and flag; running statistics; gradcheck; opcheck; determinism; errors."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from lmfused import handoff
from lmfused.batch_norm_step import _OPS, batch_norm_lm_step, mask_shape, pack_mask, unpack_mask
from lmfused.reference import lm_step_eager
from tests.conftest import DEVICE
from tests.helpers import ATOL, DTYPES, gradcheck, in_layout, oracle_grid

SHAPES = [(3, 5, 7, 9), (2, 3), (2, 4, 3, 5, 6), (4, 17, 5, 3)]
FLAGS = list(itertools.product([False, True], repeat=4))  # training, per_channel_k, with_scale, relu
GRAD_NAMES = ("x", "weight", "bias", "u", "u_prev", "k")


def backends() -> list[str]:
    import lmfused

    return [b for b in lmfused.available_backends(DEVICE) if b in _OPS]


def make_case(
    shape, dtype, layout, *, per_channel_k: bool, with_scale: bool, affine: bool = True, seed: int = 0
):
    """Fresh random inputs (never zeros); x has a non-zero mean so the statistics matter."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]

    def rand(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32)

    x = in_layout((2 * rand(*shape) + 0.5).to(dtype).to(DEVICE), layout)
    u, u_prev = (in_layout(rand(*shape).to(dtype).to(DEVICE), layout) for _ in range(2))
    weight = (1 + 0.5 * rand(channels)).to(DEVICE) if affine else None
    bias = (0.5 * rand(channels)).to(DEVICE) if affine else None
    k = (0.5 * rand(channels if per_channel_k else 1)).to(DEVICE)
    scale = (torch.rand(shape[0], generator=gen) < 0.7).float().div(0.7).to(DEVICE) if with_scale else None
    running_mean = (0.3 * rand(channels)).to(DEVICE)
    running_var = (0.5 + torch.rand(channels, generator=gen)).to(DEVICE)
    return x, running_mean, running_var, weight, bias, u, u_prev, k, scale


def oracle(case, training, relu, grad_out, momentum=0.1, eps=1e-5):
    """F.batch_norm then the eager LM step in float64: output, gradients (GRAD_NAMES), running statistics."""
    x, running_mean, running_var, weight, bias, u, u_prev, k, scale = case
    leaves = {
        name: t.detach().double().requires_grad_()
        for name, t in zip(GRAD_NAMES, (x, weight, bias, u, u_prev, k), strict=True)
        if t is not None
    }
    rm, rv = running_mean.double(), running_var.double()
    f = F.batch_norm(leaves["x"], rm, rv, leaves.get("weight"), leaves.get("bias"), training, momentum, eps)
    s = scale.double() if scale is not None else None
    out = lm_step_eager(leaves["u"], leaves["u_prev"], f, leaves["k"], scale=s, relu=relu)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.double())
    by_name = dict(zip(leaves, grads, strict=True))
    return out.detach(), [by_name.get(n) for n in GRAD_NAMES], rm, rv


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def _rounding(ref, low: torch.dtype, backend: str) -> float:
    """The largest rounding of the float64 result ``ref`` to the output dtype ``low``. Triton's interpreter
    converts float32 to bfloat16 by truncation (3.8 and 3.9), where a GPU rounds to nearest: an error of up
    to one ulp, so there at least half an ulp of the largest value (twice that in the bound)."""
    rounding = _max_err(ref.to(low), ref)
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    top = ref.abs().max().item() if ref.numel() else 0.0
    if interpreted and low == torch.bfloat16 and 0.0 < top < math.inf:
        rounding = max(rounding, 2.0 ** (math.floor(math.log2(top)) - 8))  # bf16: 8 significant bits
    return rounding


def _run(case, backend, training, relu, grad_out, grad_handoff=None, **kwargs):
    """batch_norm_lm_step on fresh leaves (running statistics cloned): output, gradients, running stats.
    With ``grad_handoff`` the output's handoff (lmfused.handoff) receives it: the step's backward gets the
    output's gradient in two parts."""
    x, running_mean, running_var, weight, bias, u, u_prev, k, scale = case
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None
        for t in (x, weight, bias, u, u_prev, k)
    ]
    rm, rv = running_mean.clone(), running_var.clone()
    lx, lw, lb, lu, lup, lk = leaves
    out = batch_norm_lm_step(
        lx, rm, rv, lw, lb, lu, lup, lk, training=training, scale=scale, relu=relu, backend=backend, **kwargs
    )
    present = [t for t in leaves if t is not None]
    outputs, grad_outputs = [out], [grad_out]
    if grad_handoff is not None:
        outputs.append(handoff.take(out))
        assert outputs[1] is not out and outputs[1].data_ptr() == out.data_ptr()
        grad_outputs.append(grad_handoff)
    grads = iter(torch.autograd.grad(outputs, present, grad_outputs))
    return out, [next(grads) if t is not None else None for t in leaves], rm, rv


@oracle_grid(backends(), SHAPES)
def test_matches_float64_oracle(backend, shape, layout, dtype):
    """Output and the six gradients within 2x the rounding of the float64 result to the dtype (+ atol growing
    with the number of summed terms), running statistics as F.batch_norm updates them."""
    _check_against_oracle(backend, shape, layout, dtype, FLAGS)


def _check_against_oracle(backend, shape, layout, dtype, flag_sets) -> None:
    """test_matches_float64_oracle's checks for each (training, per_channel_k, with_scale, relu); half of
    the flag sets (odd parity: each relu with every other choice somewhere) with the output's gradient in two
    parts, one through the handoff (lmfused.handoff)."""
    for index, (training, per_channel_k, with_scale, relu) in enumerate(flag_sets):
        case = make_case(shape, dtype, layout, per_channel_k=per_channel_k, with_scale=with_scale, seed=index)
        gen = torch.Generator().manual_seed(100 + index)
        grad_out = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
        grad_handoff = None
        if sum((training, per_channel_k, with_scale, relu)) % 2:
            grad_handoff = in_layout(torch.randn(shape, generator=gen).to(dtype).to(DEVICE), layout)
        out, grads, rm, rv = _run(case, backend, training, relu, grad_out, grad_handoff)
        whole = grad_out.double() + (grad_handoff.double() if grad_handoff is not None else 0)
        ref_out, ref_grads, ref_rm, ref_rv = oracle(case, training, relu, whole)
        flags = dict(training=training, per_channel_k=per_channel_k, scale=with_scale, relu=relu,
                     handoff=grad_handoff is not None)  # fmt: skip
        assert out.shape == shape and out.dtype == dtype
        count = math.prod(shape) // shape[1]
        for name, got, ref in zip(("out", *GRAD_NAMES), (out, *grads), (ref_out, *ref_grads), strict=True):
            assert got is not None and got.shape == ref.shape, name
            assert torch.isfinite(got).all(), (name, flags)
            low = got.dtype if got.dtype != torch.float64 else dtype
            rounding = _rounding(ref, low, backend)
            terms = {"weight": count, "bias": count, "k": math.prod(shape) // case[7].numel()}.get(name, 1)
            # grad_x in training subtracts two per-channel means of count terms each.
            terms = count if (name == "x" and training) else terms
            bound = 2 * rounding + ATOL[dtype] * math.sqrt(terms) * max(1.0, ref.abs().max().item() / 4)
            err = _max_err(got, ref)
            assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} ({flags})"
        torch.testing.assert_close(rm.double(), ref_rm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rv.double(), ref_rv, rtol=1e-5, atol=1e-5)
        if layout == "channels_last" and len(shape) == 4:
            assert out.is_contiguous(memory_format=torch.channels_last)


# Contiguous rows that are not a multiple of the 16-byte vector (7x7, 14x14, odd C): the Triton forward and
# backward read tiles of whole rows as one flat stream (vectors cross row boundaries); several tiles per
# tensor and a last one cut short.
SPAN_SHAPES = [(3, 5, 7, 7), (2, 3, 14, 14), (8, 5, 7, 7), (3, 7, 14, 14)]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("shape", SPAN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_span_tiles_across_rows(backend, shape, dtype):
    """Tiles spanning rows (several per tensor, with a tail) against the float64 oracle, ReLU mask too."""
    rows, row_len = shape[0] * shape[1], math.prod(shape[2:])
    if backend == "triton" and row_len * dtype.itemsize % 16:
        from lmfused.triton_kernels.batch_norm_lm_step import span_shape

        span = span_shape(False, rows, row_len, dtype.itemsize)
        assert span is not None and (span.num_programs > 1 or rows < span.tile_rows)
    # The last two with the output's gradient in two parts (odd parity, _check_against_oracle).
    flag_sets = [(True, True, True, True), (True, False, False, True), (False, True, True, False),
                 (True, True, False, True), (False, False, True, False)]  # fmt: skip
    _check_against_oracle(backend, shape, "contiguous", dtype, flag_sets)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("training", [False, True])
def test_without_affine_or_running_statistics(backend, training):
    """weight/bias None (affine=False); in training, running statistics None (track_running_stats=False)."""
    case = make_case(
        (3, 4, 5, 6), torch.float32, "contiguous", per_channel_k=True, with_scale=True, affine=False
    )
    grad_out = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads, _, _ = _run(case, backend, training, True, grad_out)
    ref_out, ref_grads, _, _ = oracle(case, training, True, grad_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for name, got, ref in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert (got is None) == (ref is None), name
        if ref is not None:
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
    if training:
        x, _, _, _, _, u, u_prev, k, scale = case
        out = batch_norm_lm_step(x, None, None, None, None, u, u_prev, k, training=True, backend=backend)
        f = F.batch_norm(x.double(), None, None, None, None, True)
        want = lm_step_eager(u.double(), u_prev.double(), f, k.double())
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_running_statistics_momentum_and_eps(backend):
    case = make_case((4, 6, 3, 5), torch.float32, "channels_last", per_channel_k=False, with_scale=False)
    grad_out = torch.randn(4, 6, 3, 5).to(DEVICE)
    for momentum, eps in ((0.1, 1e-5), (0.5, 1e-3), (1.0, 0.1)):
        out, _, rm, rv = _run(case, backend, True, False, grad_out, momentum=momentum, eps=eps)
        ref_out, _, ref_rm, ref_rv = oracle(case, True, False, grad_out, momentum=momentum, eps=eps)
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm.double(), ref_rm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rv.double(), ref_rv, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backends())
def test_statistics_of_a_large_mean(backend):
    """A channel whose mean dwarfs its spread (1000 +- 0.01): the variance keeps its digits."""
    x = (1000 + 0.01 * torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))).to(DEVICE)
    mean, invstd = _OPS[backend][0](x, None, None, True, 0.1, 1e-5)
    want = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd.double().pow(-2) - 1e-5, want, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), x.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "t{}k{}s{}r{}".format(*map(int, f)))
def test_gradcheck_float64(backend, layout, flags):
    training, per_channel_k, with_scale, relu = flags
    case = make_case((2, 3, 2, 3), torch.float64, layout, per_channel_k=per_channel_k, with_scale=with_scale)
    x, running_mean, running_var, weight, bias, u, u_prev, k, scale = case
    inputs = [t.detach().double().clone().requires_grad_() for t in (x, weight, bias, u, u_prev, k)]

    def fn(x, weight, bias, u, u_prev, k):
        # Fresh copies of the running statistics per call: gradcheck calls many times.
        rm, rv = running_mean.double().clone(), running_var.double().clone()
        return batch_norm_lm_step(
            x, rm, rv, weight, bias, u, u_prev, k, training=training, scale=scale, relu=relu, backend=backend
        )

    whole = layout == "channels_last" and all(flags)  # on the Triton interpreter too: every entry
    assert gradcheck(fn, inputs, backend, whole_jacobian=whole, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backends())
def test_backward_is_deterministic(backend):
    case = make_case((4, 8, 6, 5), torch.bfloat16, "channels_last", per_channel_k=True, with_scale=True)
    grad_out = torch.randn(4, 8, 6, 5).to(torch.bfloat16).to(DEVICE)
    first = _run(case, backend, True, True, grad_out)
    second = _run(case, backend, True, True, grad_out)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    """The four registered ops through torch.library.opcheck (schema, fake, autograd registration), the
    statistics op with its mutable running statistics in training and evaluation."""
    stats_op, forward_op, reduce_op, backward_op = _OPS[backend]
    samples = []
    for layout, training, relu, affine in (
        ("contiguous", True, True, True),
        ("channels_last", False, False, True),
        ("permuted", True, False, False),
        ("channels_last", True, True, False),
    ):
        case = make_case(
            (2, 3, 4, 5), torch.float32, layout, per_channel_k=training, with_scale=relu, affine=affine
        )
        x, running_mean, running_var, weight, bias, u, u_prev, k, scale = case
        for running in ((running_mean, running_var), (None, None)):
            if training or running[0] is not None:
                torch.library.opcheck(stats_op, (x, *running, training, 0.1, 1e-5))
        mean, invstd = stats_op(x, running_mean.clone(), running_var.clone(), training, 0.1, 1e-5)
        tensors = [
            t.requires_grad_(requires_grad) if t is not None else None
            for t in (x, weight, bias, u, u_prev, k)
        ]
        x, weight, bias, u, u_prev, k = tensors
        samples.append((x, mean, invstd, weight, bias, u, u_prev, k, scale, None, training, relu, 0.0, relu))
    for args in samples:
        torch.library.opcheck(forward_op, args)
        x, mean, invstd, weight, bias, u, u_prev, k, scale, _, training, relu, _, _ = args
        out, mask = forward_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        assert mask.dtype == torch.uint8 and mask.shape == (mask_shape(out) if relu else (0,))
        grad_out = torch.randn_like(out)
        x, weight, bias, u, u_prev, k = (
            t.detach() if t is not None else None for t in (x, weight, bias, u, u_prev, k)
        )
        mask = mask if relu else None
        for part in (None, torch.randn_like(out)):  # the output's gradient in one part or two
            reduce_args = (grad_out, part, x, mean, invstd, weight, bias, u, u_prev, k, mask, scale, relu,
                           True)  # fmt: skip
            torch.library.opcheck(reduce_op, reduce_args)
            torch.library.opcheck(reduce_op, (*reduce_args[:-1], False))
            sum_dy, sum_dy_xhat, grad_k = reduce_op(*reduce_args)
            assert grad_k.shape == k.shape
            for needs in ((True, True, True), (True, False, True), (False, True, False)):
                backward_args = (grad_out, part, grad_out.flip(0), x, mean, invstd, weight, bias, sum_dy,
                                 sum_dy_xhat, mask, k, scale, training, relu, *needs)  # fmt: skip
                torch.library.opcheck(backward_op, backward_args)


@pytest.mark.parametrize("backend", backends())
def test_empty_batch(backend):
    """As F.batch_norm: an empty batch gives an empty result and leaves the running statistics alone."""
    case = make_case((2, 3, 4, 4), torch.float32, "contiguous", per_channel_k=True, with_scale=False)
    x, running_mean, running_var, weight, bias, u, u_prev, k, _ = case
    before = running_mean.clone(), running_var.clone()
    empty = [t[:0] for t in (x, u, u_prev)]
    out = batch_norm_lm_step(
        empty[0],
        running_mean,
        running_var,
        weight,
        bias,
        empty[1],
        empty[2],
        k,
        training=True,
        backend=backend,
    )
    assert out.shape == (0, 3, 4, 4)
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


@pytest.mark.parametrize("backend", backends())
def test_noise_is_reproducible_from_torch_seed(backend):
    case = make_case((2, 3, 4, 4), torch.float32, "contiguous", per_channel_k=False, with_scale=False)
    x, running_mean, running_var, weight, bias, u, u_prev, k, _ = case
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(
            batch_norm_lm_step(
                x, None, None, weight, bias, u, u_prev, k, training=True, noise_std=0.5, backend=backend
            )
        )
    quiet = batch_norm_lm_step(x, None, None, weight, bias, u, u_prev, k, training=True, backend=backend)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    noise = (outs[0] - quiet).double()
    assert 0.3 < noise.std().item() < 0.7


def test_torch_compile_fullgraph():
    """The reference op traces without graph breaks, running-statistics update included."""
    case = make_case((2, 3, 4, 5), torch.float32, "channels_last", per_channel_k=True, with_scale=True)
    x, running_mean, running_var, weight, bias, u, u_prev, k, scale = case

    def step(x, rm, rv, weight, bias, u, u_prev, k):
        return batch_norm_lm_step(
            x, rm, rv, weight, bias, u, u_prev, k, training=True, scale=scale, relu=True, backend="reference"
        )

    rm_eager, rv_eager = running_mean.clone(), running_var.clone()
    want = step(x, rm_eager, rv_eager, weight, bias, u, u_prev, k)
    rm, rv = running_mean.clone(), running_var.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, rm, rv, weight, bias, u, u_prev, k)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(rm, rm_eager)
    torch.testing.assert_close(rv, rv_eager)


def _error_case():
    return list(make_case((2, 3, 4, 5), torch.float32, "contiguous", per_channel_k=True, with_scale=False))


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "match"),
    [
        (lambda c: c.__setitem__(0, c[0][:, :2]), {}, ValueError, "x: expected shape"),
        (lambda c: c.__setitem__(0, c[0].double()), {}, TypeError, "x: expected dtype"),
        (lambda c: c.__setitem__(1, c[1][:2]), {}, ValueError, "running_mean: expected shape"),
        (lambda c: c.__setitem__(2, None), {}, ValueError, "running_mean, running_var"),
        (lambda c: c.__setitem__(3, c[3][:2]), {}, ValueError, "weight: expected shape"),
        (lambda c: c.__setitem__(4, c[4].long()), {}, TypeError, "bias: expected a floating-point"),
        (lambda c: c.__setitem__(7, c[7][:2]), {}, ValueError, "k: expected shape"),
        (lambda c: None, {"momentum": True}, TypeError, "momentum"),
        (lambda c: None, {"eps": 0.0}, ValueError, "eps"),
        (lambda c: None, {"training": 1}, TypeError, "training"),
        (lambda c: None, {"scale": torch.ones(3)}, ValueError, "scale: expected shape"),
    ],
)
def test_bad_input_names_the_argument(change, kwargs, error, match):
    case = _error_case()
    change(case)
    x, running_mean, running_var, weight, bias, u, u_prev, k, _ = case
    options = {"training": True, **kwargs}
    with pytest.raises(error, match=match):
        batch_norm_lm_step(
            x, running_mean, running_var, weight, bias, u, u_prev, k, backend="reference", **options
        )


def test_evaluation_needs_running_statistics_and_training_more_than_one_value():
    x, _, _, weight, bias, u, u_prev, k, _ = _error_case()
    with pytest.raises(ValueError, match="running_mean: required in evaluation"):
        batch_norm_lm_step(x, None, None, weight, bias, u, u_prev, k, training=False, backend="reference")
    one = [t[:1, :, :1, :1] for t in (x, u, u_prev)]
    with pytest.raises(ValueError, match="x: expected more than 1 value per channel"):
        batch_norm_lm_step(
            one[0], None, None, weight, bias, one[1], one[2], k, training=True, backend="reference"
        )


def test_unknown_backend_for_this_op_says_which_it_has():
    x, running_mean, running_var, weight, bias, u, u_prev, k, _ = _error_case()
    if DEVICE.type != "cpu":
        pytest.skip("checks the CPU message")
    with pytest.raises(RuntimeError, match="backend"):
        batch_norm_lm_step(
            x, running_mean, running_var, weight, bias, u, u_prev, k, training=True, backend="cuda"
        )


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("offset", [1, 3])
def test_bits_do_not_depend_on_storage_offset(backend, offset):
    """The same values in a view at a storage offset (a misaligned pointer) give bitwise the same output and
    gradients: the reductions' order depends only on the shape, layout and flags."""
    case = make_case((2, 8, 4, 6), torch.float16, "contiguous", per_channel_k=True, with_scale=True)
    grad_out = torch.randn(2, 8, 4, 6).to(torch.float16).to(DEVICE)
    shifted = list(case)
    for index in (0, 5, 6):  # x, u, u_prev at a storage offset
        t = case[index]
        storage = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
        shifted[index] = storage[offset:].view(t.shape).copy_(t)
    first, second = _run(case, backend, True, True, grad_out), _run(shifted, backend, True, True, grad_out)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
def test_mask_is_the_sign_of_the_stored_output(backend, dtype):
    """The forward's 1-bit mask has bit (r, j) set exactly where the stored output is not <= 0 (out > 0 or
    NaN), padding bits 0, in both layouts, odd row lengths, scalar and per-channel k, scale, affine, noise;
    and the backward passes given that mask equal those given the mask of out itself."""
    stats_op, forward_op, reduce_op, backward_op = _OPS[backend]
    shapes = ((3, 6, 5, 7), (2, 12, 3, 3), (4, 9))
    for index, (layout, per_channel_k, with_scale, affine) in enumerate(
        itertools.product(("contiguous", "channels_last"), (False, True), (False, True), (False, True))
    ):
        shape = shapes[index % len(shapes)]
        case = make_case(shape, dtype, layout, per_channel_k=per_channel_k, with_scale=with_scale,
                         affine=affine, seed=index)  # fmt: skip
        x, _, _, weight, bias, u, u_prev, k, scale = case
        mean, invstd = stats_op(x, None, None, True, 0.1, 1e-5)
        noise = 0.5 if index % 3 == 0 else 0.0
        seed = torch.tensor([index], device=DEVICE) if noise else None
        out, mask = forward_op(x, mean, invstd, weight, bias, u, u_prev, k, scale, seed, True, True, noise,
                               True)  # fmt: skip
        assert (out == 0).any() and (out > 0).any()
        want = pack_mask(~(out <= 0))
        assert mask.shape == mask_shape(out) and torch.equal(mask, want), (layout, index)
        assert torch.equal(unpack_mask(mask, out), out > 0)
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(index)).to(dtype).to(DEVICE)
        state = (u, u_prev, k)
        sums = reduce_op(grad_out, None, x, mean, invstd, weight, bias, *state, mask, scale, True, True)
        ref = _OPS["reference"][2](grad_out, None, x, mean, invstd, weight, bias, *state, want, scale, True,
                                   True)  # fmt: skip
        for got, ref_sum in zip(sums, ref, strict=True):
            torch.testing.assert_close(got, ref_sum, rtol=1e-4, atol=1e-4 * math.sqrt(x.numel()))
        grads = backward_op(grad_out, None, None, x, mean, invstd, weight, bias, *sums[:2], mask, k, scale,
                            True, True, True, True, True)  # fmt: skip
        ref = _OPS["reference"][3](grad_out, None, None, x, mean, invstd, weight, bias, *sums[:2], want, k,
                                   scale, True, True, True, True, True)  # fmt: skip
        for got, ref_grad in zip(grads, ref, strict=True):
            torch.testing.assert_close(got, ref_grad, rtol=1e-2, atol=1e-2)


def test_mask_packing_layout():
    """pack_mask's layout by hand: channels-first rows are (n, c) planes, channels-last rows positions."""
    passes = torch.zeros(2, 3, 2, 5, dtype=torch.bool)
    passes[1, 2, 1, 4] = True  # channels-first: row 1 * 3 + 2 = 5, element 1 * 5 + 4 = 9: byte 1, bit 1
    mask = pack_mask(passes)
    assert mask.shape == (6, 2) and mask[5, 1].item() == 2 and mask.sum().item() == 2
    last = passes.contiguous(memory_format=torch.channels_last)  # row (1 * 2 + 1) * 5 + 4 = 19, column 2
    mask = pack_mask(last)
    assert mask.shape == (20, 1) and mask[19, 0].item() == 4 and mask.sum().item() == 4
    assert torch.equal(unpack_mask(mask, last), passes)


@pytest.mark.skipif("triton" not in backends(), reason="the Triton backend is not available")
@pytest.mark.parametrize(
    "layout, shape, span",
    [("contiguous", (2, 8, 150, 163), False), ("channels_last", (2, 8, 150, 163), False),
     ("contiguous", (600, 3, 7, 7), True), ("contiguous", (530, 9, 7, 9), True)],
)  # fmt: skip
def test_statistics_when_programs_walk_many_tiles(layout, shape, span):
    """The Triton statistics load STATS_ITEMS tiles per step: a shape where every program takes more than
    one step and the last step runs past the tiles (masked) gives the float64 statistics and running
    statistics (the small shapes above give each program at most one tile); also for span tiles (rows of
    whole channels: 7x7, and 7x9 with the last channel block cut short at 9 channels)."""
    from lmfused.triton_kernels import batch_norm_lm_step as bn

    from lmfused.op_support import plan_layout

    gen = torch.Generator().manual_seed(3)
    x = in_layout(3 + 2 * torch.randn(*shape, generator=gen), layout).to(DEVICE)
    stats = bn.stats_shape(plan_layout(x), 4)
    num_items, programs = stats.num_items, stats.grid[0]
    assert stats.is_span == span
    step = bn.STATS_ITEMS * programs
    assert num_items > step and num_items % step, (num_items, programs)  # two steps, a masked tail
    dims = (0, 2, 3)
    running_mean, running_var = (torch.rand(shape[1], generator=gen).to(DEVICE) for _ in range(2))
    want_mean = 0.9 * running_mean.double() + 0.1 * x.double().mean(dim=dims)
    want_var = 0.9 * running_var.double() + 0.1 * x.double().var(dim=dims)
    mean, invstd = _OPS["triton"][0](x, running_mean, running_var, True, 0.1, 1e-5)
    torch.testing.assert_close(mean.double(), x.double().mean(dim=dims), rtol=1e-6, atol=1e-6)
    var = x.double().var(dim=dims, unbiased=False)
    torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(running_mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(running_var.double(), want_var, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("triton" not in backends(), reason="the Triton backend is not available")
@pytest.mark.parametrize(
    "layout, shape, dtype, span, per_channel_k",
    [("contiguous", (5, 8, 30, 33), torch.float32, False, True),
     ("channels_last", (2, 8, 72, 72), torch.float32, False, False),
     ("contiguous", (150, 5, 7, 7), torch.bfloat16, True, True)],
)  # fmt: skip
def test_backward_when_programs_walk_many_tiles(layout, shape, dtype, span, per_channel_k):
    """The Triton backward reduction with programs that sum more than one tile each (the small shapes above
    give each at most one), 2-D tiles in both layouts and span tiles (7x7), against the float64 oracle in
    training with the ReLU and the output's gradient in two parts (the handoff)."""
    from lmfused.triton_kernels import batch_norm_lm_step as bn

    from lmfused.op_support import plan_layout

    plan = plan_layout(in_layout(torch.empty(shape, dtype=dtype), layout))
    tiles = bn.backward_reduction_shape(plan, dtype.itemsize)
    assert tiles.is_span == span and tiles.num_items > tiles.grid[0], tiles
    flags = (True, per_channel_k, not per_channel_k, True)  # odd parity: with the handoff
    _check_against_oracle("triton", shape, layout, dtype, [flags])
