"""The gradient pass-through between steps (lm_step, batch_norm_lm_step with return_shortcut=True): a chain
of steps that hands each step's shortcut to the next as u_prev has the values and gradients of the plain
chain, on every backend, and its backward kernels, not autograd, add the shortcut's gradient into grad_u."""

from __future__ import annotations

import math

import pytest
import torch

import lmfused.batch_norm_step as bn_step
import lmfused.ops as ops
from bench.traffic import TrafficCounter
from lmfused.batch_norm_step import batch_norm_lm_step
from lmfused.ops import lm_step
from tests.conftest import DEVICE
from tests.helpers import DTYPES, backends, gradcheck, in_layout

ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
STEPS = 3


def _chain_inputs(shape, dtype, layout, per_channel_k, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)

    u0, u1 = (in_layout(rand(*shape), layout) for _ in "ab")
    branches = [in_layout(rand(*shape, scale=0.5), layout) for _ in range(STEPS)]
    ks = [rand(shape[1] if per_channel_k else 1, scale=0.5).float() for _ in range(STEPS)]
    return u0, u1, branches, ks


def _lm_chain(u_prev, u, branches, ks, *, shortcut: bool, relu: bool, backend=None):
    """Steps n = 1..STEPS: each takes the previous step's shortcut (or u itself) as u_prev."""
    for f, k in zip(branches, ks, strict=True):
        if shortcut:
            u, u_prev = lm_step(u, u_prev, f, k, relu=relu, backend=backend, return_shortcut=True)
        else:
            u, u_prev = lm_step(u, u_prev, f, k, relu=relu, backend=backend), u
    return u


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _recorded_shortcuts(
    monkeypatch, table: dict, backend: str, argument: str = "grad_shortcut"
) -> list[bool]:
    """Patch ``table[backend]``'s backward op to record whether each call got a ``argument`` (grad_shortcut,
    or batch_norm_lm_step's grad_handoff)."""
    seen: list[bool] = []
    ops_tuple = table[backend]
    if isinstance(ops_tuple, tuple):  # batch_norm_lm_step: (stats, forward, reduce, backward)
        original = ops_tuple[3]
        position = {"grad_handoff": 1, "grad_shortcut": 2}[argument]

        def recording(*args):
            seen.append(args[position] is not None)
            return original(*args)

        monkeypatch.setitem(table, backend, (*ops_tuple[:3], recording))
    else:
        original = ops_tuple

        def recording(*args):
            seen.append(args[1] is not None)
            return original(*args)

        monkeypatch.setitem(table, backend, recording)
    return seen


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64), ids=str)
def test_lm_chain_matches_plain_chain(monkeypatch, backend, layout, dtype):
    """Against the plain chain on the same backend and dtype (the same forward, so the same ReLU masks): the
    gradients differ only by the one rounding the pass-through saves (grad_u rounded once, not twice)."""
    for relu, per_channel_k in ((True, True), (False, False)):
        u0, u1, branches, ks = _chain_inputs((3, 5, 6, 7), dtype, layout, per_channel_k)
        grad_out = torch.randn(u0.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
        results = []
        for shortcut in (True, False):
            seen = _recorded_shortcuts(monkeypatch, ops._BACKWARD_OPS, backend)
            leaves = _leaves([u0, u1, *branches, *ks])
            out = _lm_chain(leaves[0], leaves[1], leaves[2:5], leaves[5:], shortcut=shortcut, relu=relu,
                            backend=backend)  # fmt: skip
            results.append((out, torch.autograd.grad(out, leaves, grad_out)))
            # With the pass-through every step but the last receives the next one's gradient.
            assert seen == ([False] + [True] * (STEPS - 1) if shortcut else [False] * STEPS)
            monkeypatch.undo()
        (out, grads), (want_out, want_grads) = results
        assert torch.equal(out, want_out)
        names = ["u0", "u1", "f1", "f2", "f3", "k1", "k2", "k3"]
        for name, got, want in zip(names, grads, want_grads, strict=True):
            bound = 4 * ATOL[dtype] * max(1.0, want.abs().max().item())
            if name.startswith("k"):
                bound *= math.sqrt(u0.numel())  # a sum over the elements
            err = (got.double() - want.double()).abs().max().item()
            assert err <= bound, (
                f"{name}: {err:.3g} > {bound:.3g} (relu={relu}, k per channel {per_channel_k})"
            )


@pytest.mark.parametrize("backend", backends())
def test_lm_chain_gradcheck(backend):
    u0, u1, branches, ks = _chain_inputs((2, 3, 4, 5), torch.float64, "channels_last", True)
    ks = [k.double() for k in ks]
    leaves = _leaves([u0, u1, *branches, *ks])

    def chain(*t):
        return _lm_chain(t[0], t[1], t[2:5], t[5:], shortcut=True, relu=True, backend=backend)

    assert gradcheck(chain, leaves, backend, eps=1e-6, atol=1e-5)


def _bn_chain(xs, norms, u_prev, u, ks, *, shortcut: bool, backend=None, training=True):
    for x, (rm, rv, w, b), k in zip(xs, norms, ks, strict=True):
        args = (x, rm, rv, w, b, u, u_prev, k)
        if shortcut:
            u, u_prev = batch_norm_lm_step(
                *args, training=training, relu=True, backend=backend, return_shortcut=True
            )
        else:
            u, u_prev = batch_norm_lm_step(*args, training=training, relu=True, backend=backend), u
    return u


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_chain_matches_plain_chain(monkeypatch, backend, training):
    shape = (3, 5, 6, 7)
    u0, u1, xs, ks = _chain_inputs(shape, torch.float32, "channels_last", True, seed=3)
    gen = torch.Generator().manual_seed(4)
    norms = [
        (0.1 * torch.randn(5, generator=gen), 0.5 + torch.rand(5, generator=gen),
         1 + 0.3 * torch.randn(5, generator=gen), 0.3 * torch.randn(5, generator=gen))
        for _ in range(STEPS)
    ]  # fmt: skip
    norms = [tuple(t.to(DEVICE) for t in n) for n in norms]
    seen = _recorded_shortcuts(monkeypatch, bn_step._OPS, backend)

    def run(shortcut, dtype, run_backend):
        leaves = _leaves([u0, u1, *xs, *ks], dtype)
        weights = _leaves([n[2] for n in norms], dtype)
        stats = [(n[0].to(dtype).clone(), n[1].to(dtype).clone()) for n in norms]
        biases = [n[3].to(dtype) for n in norms]
        norm_args = [(rm, rv, w, b) for (rm, rv), w, b in zip(stats, weights, biases, strict=True)]
        out = _bn_chain(leaves[2:5], norm_args, leaves[0], leaves[1], leaves[5:], shortcut=shortcut,
                        backend=run_backend, training=training)  # fmt: skip
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
        return out, torch.autograd.grad(out, leaves + weights, grad_out.to(dtype)), stats

    out, grads, stats = run(True, torch.float32, backend)
    assert seen == [False] + [True] * (STEPS - 1)
    ref, ref_grads, ref_stats = run(False, torch.float64, "reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        atol = 2e-3 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=atol)
    for (rm, rv), (ref_rm, ref_rv) in zip(stats, ref_stats, strict=True):
        torch.testing.assert_close(rm.double(), ref_rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv.double(), ref_rv, rtol=1e-5, atol=1e-6)


def test_unused_outputs():
    """The last step's shortcut unused (no gradient to add); an update whose output is unused but whose
    shortcut is: its grad_u is then the shortcut's gradient alone."""
    u, u_prev, f = (torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k = torch.full((1,), 0.3, dtype=torch.float64, requires_grad=True)
    out, shortcut = lm_step(u, u_prev, f, k, return_shortcut=True)
    (grad_u,) = torch.autograd.grad(out.sum(), u)
    torch.testing.assert_close(grad_u, torch.full_like(u, 0.7))
    out, shortcut = lm_step(u, u_prev, f, k, return_shortcut=True)
    (grad_u,) = torch.autograd.grad((3 * shortcut).sum(), u)
    torch.testing.assert_close(grad_u, torch.full_like(u, 3.0))


def test_shortcut_without_gradient_is_u_itself():
    u, u_prev, f = (torch.randn(2, 3, 4, 4) for _ in range(3))
    k = torch.zeros(1, requires_grad=True)
    out, shortcut = lm_step(u, u_prev, f, k, return_shortcut=True)
    assert shortcut is u and out.requires_grad
    with torch.no_grad():
        assert lm_step(u, u_prev, f, k, return_shortcut=True)[1] is u


def test_backward_op_opcheck_with_grad_shortcut():
    for backend in backends():
        shape = (2, 3, 4, 5)
        g, gs, u, u_prev, out = (torch.randn(shape, device=DEVICE) for _ in range(5))
        gs = gs.contiguous(memory_format=torch.channels_last)  # another layout than grad_out
        k = torch.randn(3, device=DEVICE)
        for needs in ((True, True, False, True), (True, False, True, False)):
            torch.library.opcheck(ops._BACKWARD_OPS[backend], (g, gs, u, u_prev, out, k, None, True, *needs))


def test_saves_two_block_outputs_per_step():
    """By the op-by-op byte count, the pass-through saves 2 X per chained step (X = one state): autograd's
    addition of the two gradients of u (read 2, write 1) becomes one more read in the backward kernel."""

    def traffic(shortcut: bool) -> tuple[int, int]:
        from torch._subclasses.fake_tensor import FakeTensorMode

        counter = TrafficCounter()
        with FakeTensorMode():
            u0, u1, branches, ks = _chain_inputs((8, 16, 32, 32), torch.float32, "contiguous", False)
            leaves = _leaves([u0.cpu(), u1.cpu(), *(f.cpu() for f in branches), *(k.cpu() for k in ks)])
            with counter:
                out = _lm_chain(leaves[0], leaves[1], leaves[2:5], leaves[5:], shortcut=shortcut, relu=True,
                                backend="reference")  # fmt: skip
                counter.phase = "backward"
                out.backward(torch.ones_like(out))
        adds = sum(1 for r in counter.records if r.category == "grad_accumulation")
        return sum(r.read + r.written for r in counter.records), adds

    x = 8 * 16 * 32 * 32 * 4
    (plain, plain_adds), (passed, passed_adds) = traffic(False), traffic(True)
    assert passed_adds < plain_adds
    assert plain - passed == 2 * x * (STEPS - 1)


def test_compiles_fullgraph():
    u, u_prev, f = (torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(3))
    k = torch.full((1,), 0.2, requires_grad=True)

    def chain(u, u_prev, f, k):
        out, shortcut = lm_step(u, u_prev, f, k, relu=True, return_shortcut=True)
        out, _ = lm_step(out, shortcut, f, k, relu=True, return_shortcut=True)
        return out

    compiled = torch.compile(chain, fullgraph=True, backend="aot_eager")
    want = chain(u, u_prev, f, k)
    got = compiled(u, u_prev, f, k)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), (u, k)), torch.autograd.grad(want.sum(), (u, k))
    )
