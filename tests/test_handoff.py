"""The gradient handoff (lmfused.handoff): a batch_norm_lm_step output feeds the next block twice (its branch
and its step); the step takes the handoff, so the two gradients reach the first step's backward apart and its
kernels add them. Values and gradients are those of the plain chain, on every backend; in-place changes,
saved-tensor hooks and the switch turn it off; no reference cycle keeps an output alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import lmfused.batch_norm_step as bn_step
from bench.traffic import TrafficCounter
from lmfused import handoff
from lmfused.batch_norm_step import batch_norm_lm_step
from lmfused.ops import lm_step
from tests.conftest import DEVICE
from tests.helpers import backends, in_layout
from tests.test_shortcut_gradient import _recorded_shortcuts

STEPS = 3
SHAPE = (3, 4, 5, 6)


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)

    u0, u1, x0 = (in_layout(rand(*SHAPE), "channels_last") for _ in range(3))
    convs = [rand(SHAPE[1], SHAPE[1], 1, 1, scale=0.5) for _ in range(STEPS - 1)]
    ks = [rand(SHAPE[1], scale=0.5).float() for _ in range(STEPS)]
    norms = [(1 + 0.3 * rand(SHAPE[1]).float(), 0.3 * rand(SHAPE[1]).float()) for _ in range(STEPS)]
    return [u0, u1, x0, *convs, *ks], norms


def _blocks(leaves, norms, backend):
    """Post-activation blocks as the zoo chains them: block n's branch is a convolution of u_n, its step
    batch_norm_lm_step(branch, u_n, u_{n-1}) with the pass-through shortcut."""
    u_prev, u, x = leaves[:3]
    convs, ks = leaves[3 : 3 + STEPS - 1], leaves[3 + STEPS - 1 :]
    for n in range(STEPS):
        if n > 0:
            x = F.conv2d(u, convs[n - 1])
        weight, bias = norms[n]
        u, u_prev = batch_norm_lm_step(
            x,
            None,
            None,
            weight,
            bias,
            u,
            u_prev,
            ks[n],
            training=True,
            relu=True,
            backend=backend,
            return_shortcut=True,
        )
    return u


def _run(leaves, norms, backend, grad_seed=9):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = _blocks(leaves, norms, backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    return out, torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("backend", backends())
def test_chain_of_blocks_matches_the_plain_chain(monkeypatch, backend):
    """Every step but the last gets its output's gradient in two parts; output and every gradient as the
    float64 chain without handoff (the reference backend, LMFUSED_GRADIENT_PASSTHROUGH=0)."""
    leaves, norms = _inputs(torch.float32)
    seen = _recorded_shortcuts(monkeypatch, bn_step._OPS, backend, "grad_handoff")
    out, grads = _run(leaves, norms, backend)
    assert seen == [False] + [True] * (STEPS - 1)  # backward order: the last step first
    monkeypatch.undo()
    monkeypatch.setenv("LMFUSED_GRADIENT_PASSTHROUGH", "0")
    seen = _recorded_shortcuts(monkeypatch, bn_step._OPS, "reference", "grad_handoff")
    ref, ref_grads = _run([t.double() for t in leaves], norms, "reference")
    assert seen == [False] * STEPS
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=2e-3 * max(1.0, want.abs().max()))


def test_gradcheck_float64():
    leaves, norms = _inputs(torch.float64)
    norms = [(w.double(), b.double()) for w, b in norms]
    leaves = [t.double().requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(lambda *t: _blocks(t, norms, "reference"), leaves, eps=1e-6, atol=1e-5)


def _step(u, x, u_prev=None, k=0.3):
    k = torch.full((1,), k, dtype=u.dtype, requires_grad=True)
    u_prev = u.detach() if u_prev is None else u_prev
    return batch_norm_lm_step(x, None, None, None, None, u, u_prev, k, training=True, relu=True)


def test_the_next_step_takes_the_handoff(monkeypatch):
    """batch_norm_lm_step and lm_step take the handoff of their u: the same memory, values and graph node;
    the gradient through the output and the handoff together is the plain one."""
    u, x, x2 = (torch.randn(SHAPE, dtype=torch.float64, requires_grad=True) for _ in range(3))
    f = torch.randn(SHAPE, dtype=torch.float64)
    k = torch.full((1,), 0.2, dtype=torch.float64)

    def chain():
        out = _step(u, x)
        taken = handoff.take(out)
        loss = lm_step(out, u.detach(), f, k).sum() + _step(out, x2).sum() + (out * f).sum()
        return taken, out, torch.autograd.grad(loss, (u, x, x2))

    taken, out, got = chain()
    assert taken is not out and taken.data_ptr() == out.data_ptr() and taken.grad_fn is out.grad_fn
    assert torch.equal(taken, out)
    monkeypatch.setenv("LMFUSED_GRADIENT_PASSTHROUGH", "0")
    taken, out, want = chain()
    assert taken is out
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_changed_in_place_is_not_handed_off():
    """An output changed in place after the step (e.g. by a forward hook) goes to the next step as it is, so
    the in-place op's gradient is not skipped."""
    u, x, x2 = (torch.randn(SHAPE, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def chain(scale_in_place: bool):
        out = _step(u, x)
        if scale_in_place:
            out = out.mul_(3)
            assert handoff.take(out) is out
        return _step(out, x2).sum()

    got = torch.autograd.grad(chain(True), (u, x, x2))
    out = _step(u, x) * 3
    want = torch.autograd.grad(_step(out, x2).sum(), (u, x, x2))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_switched_off_and_under_saved_tensor_hooks():
    u, x = (torch.randn(SHAPE, requires_grad=True) for _ in range(2))
    assert handoff.take(_step(u, x)) is not _step(u, x)  # on by default
    with torch.autograd.graph.save_on_cpu():
        out = _step(u, x)
    assert handoff.take(out) is out
    checkpointed = torch.utils.checkpoint.checkpoint(_step, u, x, use_reentrant=False)
    assert handoff.take(checkpointed) is checkpointed
    with torch.no_grad():
        out = _step(u, x)
    assert handoff.take(out) is out


def test_switch(monkeypatch):
    monkeypatch.setenv("LMFUSED_GRADIENT_PASSTHROUGH", "0")
    u, x = (torch.randn(SHAPE, requires_grad=True) for _ in range(2))
    out = _step(u, x)
    assert handoff.take(out) is out


def test_no_reference_cycle_keeps_an_output_alive():
    u, x = (torch.randn(SHAPE, requires_grad=True) for _ in range(2))
    gc.disable()
    try:
        out = _step(u, x)
        taken = weakref.ref(handoff.take(out))
        alive = weakref.ref(out)
        del out
        assert alive() is None and taken() is None
    finally:
        gc.enable()


def test_saves_one_activation_per_inner_block():
    """By the op-by-op byte count: autograd's addition of the two gradients of a block input (read 2, write
    1) becomes one more read in each of the step's two backward passes, 1 X less per handed-off step."""

    def traffic(on: bool, monkeypatch) -> tuple[int, int]:
        from torch._subclasses.fake_tensor import FakeTensorMode

        monkeypatch.setenv("LMFUSED_GRADIENT_PASSTHROUGH", "1" if on else "0")
        counter = TrafficCounter()
        with FakeTensorMode():
            leaves, norms = _inputs(torch.float32)
            leaves = [t.cpu().detach().requires_grad_() for t in leaves]
            norms = [(w.cpu(), b.cpu()) for w, b in norms]
            with counter:
                out = _blocks(leaves, norms, "reference")
                counter.phase = "backward"
                out.backward(torch.ones_like(out))
        adds = sum(1 for r in counter.records if r.category == "grad_accumulation")
        return sum(r.read + r.written for r in counter.records), adds

    x = 4 * torch.Size(SHAPE).numel()
    with pytest.MonkeyPatch.context() as mp:
        (on, on_adds), (off, off_adds) = traffic(True, mp), traffic(False, mp)
    assert on_adds < off_adds
    # The switch turns the shortcut pass-through off too: 2 X more per chained step.
    assert off - on == (1 + 2) * x * (STEPS - 1)
