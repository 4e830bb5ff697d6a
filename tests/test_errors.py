"""Bad input is an immediate error naming the argument (DESIGN.md section 2), before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import lmfused
from tests.helpers import backends

N, C, H, W = 2, 3, 4, 5


def _args(**overrides):
    args = dict(
        u=torch.randn(N, C, H, W),
        u_prev=torch.randn(N, C, H, W),
        f=torch.randn(N, C, H, W),
        k=torch.zeros(C),
        scale=None,
        relu=False,
        noise_std=0.0,
    )
    args.update(overrides)
    return args


def _call(**overrides):
    a = _args(**overrides)
    return lmfused.lm_step(
        a["u"], a["u_prev"], a["f"], a["k"], scale=a["scale"], relu=a["relu"], noise_std=a["noise_std"]
    )


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (dict(u=[1.0, 2.0]), TypeError, "u: expected a torch.Tensor"),
        (dict(u=torch.ones(N, C, H, W, dtype=torch.int64)), TypeError, "u: .*floating"),
        (dict(u=torch.ones(N, C, H, W, dtype=torch.complex64)), TypeError, "u: .*floating"),
        (
            dict(u=torch.randn(5), u_prev=torch.randn(5), f=torch.randn(5)),
            ValueError,
            "u: expected rank >= 2",
        ),
        (dict(u_prev=torch.randn(N, C, H, W + 1)), ValueError, "u_prev: expected shape"),
        (dict(u_prev=torch.randn(1, C, H, W)), ValueError, "u_prev: expected shape"),  # no broadcasting
        (dict(u_prev=torch.randn(N, C, H, W, dtype=torch.float64)), TypeError, "u_prev: expected dtype"),
        (dict(u_prev=torch.ones(N, C, H, W, dtype=torch.int32)), TypeError, "u_prev: .*floating"),
        (dict(f=torch.randn(N, C, H, 1)), ValueError, "f: expected shape"),
        (dict(f=torch.randn(N, C, H, W).half()), TypeError, "f: expected dtype"),
        (dict(f=torch.randn(N, C, H, W).to(torch.complex64)), TypeError, "f: .*floating"),
        (dict(k=torch.zeros(C + 1)), ValueError, "k: expected shape"),
        (dict(k=torch.zeros(())), ValueError, "k: expected shape"),
        (dict(k=torch.zeros(1, C)), ValueError, "k: expected shape"),
        (dict(k=torch.zeros(C, 2)), ValueError, "k: expected shape"),
        (dict(k=torch.zeros(C, dtype=torch.int64)), TypeError, "k: .*floating"),
        (dict(k=0.5), TypeError, "k: expected a torch.Tensor"),
        (dict(scale=torch.ones(N + 1)), ValueError, "scale: expected shape"),
        (dict(scale=torch.ones(N, 1)), ValueError, "scale: expected shape"),
        (dict(scale=torch.ones(N, dtype=torch.int64)), TypeError, "scale: .*floating"),
        (dict(relu=1), TypeError, "relu: expected a bool"),
        (dict(noise_std=-0.1), ValueError, "noise_std"),
        (dict(noise_std=float("nan")), ValueError, "noise_std"),
        (dict(noise_std="0.1"), TypeError, "noise_std"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**overrides)


def test_device_mismatch_names_the_argument():
    meta = torch.empty(N, C, H, W, device="meta")
    with pytest.raises(ValueError, match="u_prev: expected device"):
        _call(u_prev=meta)
    with pytest.raises(ValueError, match="k: expected device"):
        _call(k=torch.zeros(C, device="meta"))
    with pytest.raises(ValueError, match="scale: expected device"):
        _call(scale=torch.ones(N, device="meta"))


def test_accepted_k_shapes():
    for k in (torch.zeros(1), torch.zeros(C), torch.zeros(C, 1, 1)):
        _call(k=k)
    _call(f=None)


@pytest.mark.parametrize("backend", [b for b in backends() if b != "cuda"])  # cuda: the GPU test files
def test_backward_ops_refuse_operands_unlike_grad_out(backend):
    """The registered backward ops (reachable through torch.ops) check the operands they index as grad_out, as
    the C++ binding does: a smaller or other-dtype grad_handoff / grad_shortcut is an error naming it, never
    read past (Triton) or broadcast (reference)."""
    x, v, k = torch.randn(N, C, H, W), torch.rand(C) + 0.5, torch.full((C,), 0.3)
    ops = torch.ops.lmfused
    reduce = getattr(ops, f"batch_norm_lm_step_{backend}_backward_reduce")
    backward = getattr(ops, f"batch_norm_lm_step_{backend}_backward")
    lm_backward = getattr(ops, f"lm_step_{backend}_backward")
    smaller = (x[:1], ValueError, r"shape \(2, 3, 4, 5\) \(the shape of grad_out\)")
    wider = (x.double(), TypeError, r"dtype torch.float32 \(the dtype of grad_out\)")
    for bad, error, what in (smaller, wider):
        with pytest.raises(error, match=f"grad_handoff: expected {what}"):
            reduce(x, bad, x, v, v, v, v, x, x, k, None, None, False, True)
        with pytest.raises(error, match=f"grad_handoff: expected {what}"):
            backward(x, bad, None, x, v, v, v, v, v, v, None, k, None, True, False, True, True, True)
        with pytest.raises(error, match=f"grad_shortcut: expected {what}"):
            backward(x, None, bad, x, v, v, v, v, v, v, None, k, None, True, False, True, True, True)
        with pytest.raises(error, match=f"grad_shortcut: expected {what}"):
            lm_backward(x, bad, x, x, None, k, None, False, True, True, True, True)
    reduce(x, x, x, v, v, v, v, x, x, k, None, None, False, True)  # the same operands, well shaped, run
