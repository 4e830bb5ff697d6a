"""Post-activation blocks run their last BatchNorm inside the update (lmfused.batch_norm_lm_step): the same
network as the unfused one (outputs, gradients, running statistics, state_dict), and the fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lmfused
import lmfused.nn.blocks as blocks_module
import lmfused.nn.step as step_module
from lmfused.nn.blocks import PostActBlock
from lmfused.nn.step import LMStep, fuses_batch_norm
from tests.conftest import DEVICE
from tests.helpers import backends


def _fused_calls(monkeypatch, module=step_module, name="batch_norm_lm_step") -> list[int]:
    """Count the calls of a fused op (default: the junction's) made by the modules."""
    calls = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def _run(model, x, fuse: str, monkeypatch, seed: int = 1):
    monkeypatch.setenv("LMFUSED_FUSE_BN", fuse)
    torch.manual_seed(seed)
    out = model(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    grads = torch.autograd.grad(out, list(model.parameters()), grad_out.to(out.device), allow_unused=True)
    return out, grads


@pytest.mark.parametrize("lm", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_zoo_model_fused_equals_unfused(monkeypatch, lm, training):
    """In float64, the fused network is the unfused one to round-off: output, every parameter gradient, the
    running statistics and num_batches_tracked; sample-mode stochastic depth draws the same masks."""
    torch.manual_seed(0)
    fused = lmfused.models.create_model(
        "lm_resnet50", lm=lm, survival_prob=0.8, per_channel_k=True, backend="reference"
    ).double()
    fused.train(training)
    unfused = copy.deepcopy(fused)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # layer4 at 2x2: 8 values per channel
    calls = _fused_calls(monkeypatch)
    branch_calls = _fused_calls(monkeypatch, blocks_module, "batch_norm_relu")
    out, grads = _run(fused, x, "1", monkeypatch)
    assert len(calls) == 16  # every bottleneck block
    assert len(branch_calls) == 33  # bn1 + relu, bn2 + relu of every bottleneck block, and the stem's
    want, want_grads = _run(unfused, x, "0", monkeypatch)
    assert (len(calls), len(branch_calls)) == (16, 33)  # the unfused run made no call
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    for (name, _), got, ref in zip(fused.named_parameters(), grads, want_grads, strict=True):
        assert (got is None) == (ref is None), name
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9, msg=name)
    for (name, got), (_, ref) in zip(fused.named_buffers(), unfused.named_buffers(), strict=True):
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("backend", backends())
def test_block_fused_on_every_backend(monkeypatch, backend):
    """A small LM bottleneck with per-channel k, channels_last, through each backend's fused op."""
    torch.manual_seed(0)
    block = PostActBlock.bottleneck(16, 4, step=LMStep(16, relu=True, backend=backend)).to(DEVICE)
    unfused = copy.deepcopy(block)
    u, u_prev = (
        torch.randn(2, 16, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last) for _ in "ab"
    )
    calls = _fused_calls(monkeypatch)
    monkeypatch.setenv("LMFUSED_FUSE_BN", "1")
    out, shortcut = block(u, u_prev)
    monkeypatch.setenv("LMFUSED_FUSE_BN", "0")
    want, _ = unfused(u, u_prev)
    assert len(calls) == 1 and shortcut is u
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block.bn3.running_var, unfused.bn3.running_var, rtol=1e-5, atol=1e-6)


def test_momentum_none_and_untracked_statistics(monkeypatch):
    """BatchNorm2d(momentum=None) (cumulative average) and track_running_stats=False (batch statistics in
    evaluation too) behave as nn.BatchNorm2d does."""
    for norm_kwargs in ({"momentum": None}, {"track_running_stats": False}):
        torch.manual_seed(0)
        block = PostActBlock.bottleneck(8, 2, step=LMStep(relu=True, backend="reference")).double()
        block.bn3 = nn.BatchNorm2d(8, **norm_kwargs).double()
        unfused = copy.deepcopy(block)
        for training in (True, True, False):
            block.train(training)
            unfused.train(training)
            u, u_prev = (
                torch.randn(3, 8, 4, 4, dtype=torch.float64),
                torch.randn(3, 8, 4, 4, dtype=torch.float64),
            )
            monkeypatch.setenv("LMFUSED_FUSE_BN", "1")
            out, _ = block(u, u_prev)
            monkeypatch.setenv("LMFUSED_FUSE_BN", "0")
            want, _ = unfused(u, u_prev)
            torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
        for (name, got), (_, ref) in zip(block.bn3.named_buffers(), unfused.bn3.named_buffers(), strict=True):
            torch.testing.assert_close(got, ref, msg=name)


def test_fallbacks(monkeypatch):
    """Fused only for a plain BatchNorm2d with a backend for the device; SyncBatchNorm, GroupNorm, a
    BatchNorm2d subclass, LMFUSED_FUSE_BN=0 and timm's se/drop_path after the norm take the unfused path."""
    monkeypatch.setenv("LMFUSED_FUSE_BN", "1")
    assert fuses_batch_norm(nn.BatchNorm2d(4), None, "cpu")
    assert fuses_batch_norm(nn.BatchNorm2d(4), "reference", "cpu")
    assert not fuses_batch_norm(nn.SyncBatchNorm(4), None, "cpu")
    assert not fuses_batch_norm(nn.GroupNorm(2, 4), None, "cpu")
    assert not fuses_batch_norm(type("MyNorm", (nn.BatchNorm2d,), {})(4), None, "cpu")
    assert not fuses_batch_norm(nn.BatchNorm2d(4), "cuda", "cpu")  # no such backend on CPU tensors
    monkeypatch.setenv("LMFUSED_FUSE_BN", "0")
    assert not fuses_batch_norm(nn.BatchNorm2d(4), None, "cpu")
    monkeypatch.setenv("LMFUSED_FUSE_BN", "1")
    block = PostActBlock.bottleneck(8, 2, step=LMStep(relu=True, backend="reference"))
    assert block.last_norm() is block.bn3
    block.se = nn.Identity()
    assert block.last_norm() is None
    calls = _fused_calls(monkeypatch)
    block(torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3))
    assert calls == []


def test_state_dict_names_do_not_change():
    """bn3.weight, bn3.running_mean, ... stay where torchvision has them: loading works both ways."""
    model = lmfused.models.create_model("lm_resnet50")
    keys = set(model.state_dict())
    assert {"layer1.1.bn3.weight", "layer1.1.bn3.running_mean", "layer1.1.bn3.num_batches_tracked"} <= keys
    copy.deepcopy(model).load_state_dict(model.state_dict())


@pytest.mark.parametrize("mode", ["op", "decompose"])
def test_compile_traces_the_op_or_its_decomposition(monkeypatch, mode):
    """Under torch.compile, LMFUSED_COMPILE_JUNCTION=op traces the registered lmfused ops and =decompose the
    plain PyTorch ops Inductor can fuse; both give the eager result, running statistics included."""
    monkeypatch.setenv("LMFUSED_COMPILE_JUNCTION", mode)
    monkeypatch.setenv("LMFUSED_FUSE_BN", "1")
    torch.manual_seed(0)
    block = PostActBlock.bottleneck(8, 2, step=LMStep(8, relu=True, backend="reference")).double()
    eager = copy.deepcopy(block)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    u, u_prev = torch.randn(3, 8, 4, 4, dtype=torch.float64), torch.randn(3, 8, 4, 4, dtype=torch.float64)
    out, _ = torch.compile(block, fullgraph=True, backend=capture)(u, u_prev)
    want, _ = eager(u, u_prev)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block.bn3.running_var, eager.bn3.running_var, rtol=1e-12, atol=1e-12)
    traced_ops = "lmfused.batch_norm_lm_step" in graphs[0]
    assert traced_ops == (mode == "op")
    assert ("batch_norm" in graphs[0]) and (mode == "op" or "lmfused" not in graphs[0])


@pytest.mark.parametrize("fuse", ["1", "0"])
def test_gradient_pass_through_in_the_zoo(monkeypatch, fuse):
    """A zoo model with the gradient pass-through (default) is the model without it
    (LMFUSED_GRADIENT_PASSTHROUGH=0) to round-off, and its steps' backward kernels get the next block's
    u_prev gradient: every block whose shortcut the next block takes, i.e. all but each stage's last. With
    the fused batch norm they also get the gradient of their output's handoff (lmfused.handoff) from the
    next block's step, the same blocks (a stage's first block takes its projection, not its input)."""
    import lmfused.batch_norm_step as bn_step
    import lmfused.ops as ops

    torch.manual_seed(0)
    model = lmfused.models.create_model("lm_resnet50", per_channel_k=True, backend="reference").double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    received, handed = [], []

    def recording(original, shortcut_at, handoff_at=None):
        def backward(*args):
            received.append(args[shortcut_at] is not None)
            handed.append(handoff_at is not None and args[handoff_at] is not None)
            return original(*args)

        return backward

    monkeypatch.setitem(ops._BACKWARD_OPS, "reference", recording(ops._BACKWARD_OPS["reference"], 1))
    stats, forward, reduce, backward = bn_step._OPS["reference"]
    monkeypatch.setitem(bn_step._OPS, "reference", (stats, forward, reduce, recording(backward, 2, 1)))
    results = []
    for passes in ("1", "0"):
        monkeypatch.setenv("LMFUSED_GRADIENT_PASSTHROUGH", passes)
        received.clear()
        handed.clear()
        results.append(_run(model, x, fuse, monkeypatch))
        blocks_with_a_successor = 16 - 4
        assert sum(received) == (blocks_with_a_successor if passes == "1" else 0)
        assert sum(handed) == (blocks_with_a_successor if passes == "1" and fuse == "1" else 0)
    (out, grads), (want, want_grads) = results
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-11)
    for got, ref in zip(grads, want_grads, strict=True):
        assert (got is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


def test_hooked_modules_are_called_not_fused(monkeypatch):
    """A BatchNorm (or a branch ReLU) with a forward hook is called as a module, so its hook runs; the other
    norms of the block stay fused."""
    torch.manual_seed(0)
    block = PostActBlock.bottleneck(16, 4, step=LMStep(16, relu=True, backend="reference"))
    seen = []
    block.bn2.register_forward_hook(lambda *_: seen.append("bn2"))
    block.act1.register_forward_hook(lambda *_: seen.append("act1"))
    block.bn3.register_forward_pre_hook(lambda *_: seen.append("bn3"))
    calls = _fused_calls(monkeypatch, blocks_module, "batch_norm_relu")
    block(torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5))
    assert seen == ["act1", "bn2", "bn3"] and calls == []  # bn1 + act1: act1 hooked; bn2: hooked


def test_a_block_decides_its_fusion_once_and_shows_it(monkeypatch):
    """The block asks whether its norms fuse on the first forward only, again when a setting, a hook or the
    dtype changes; its repr shows the choice (issue: a block decides once)."""
    torch.manual_seed(0)
    block = PostActBlock.bottleneck(16, 4, step=LMStep(16, relu=True, backend="reference"))
    asked = []
    original = step_module.fuses_batch_norm

    def asking(norm, backend, device_type):
        asked.append(norm)
        return original(norm, backend, device_type)

    monkeypatch.setattr(step_module, "fuses_batch_norm", asking)
    u = torch.randn(2, 16, 5, 5)
    assert "fusion: undecided" in repr(block)
    for _ in range(3):
        block(u, u)
    assert len(asked) == 3  # bn1, bn2 (with their ReLU) and bn3 (the junction), once each
    assert "fusion (cpu float32): junction bn3=fused, bn2=fused, bn1=fused" in repr(block)
    monkeypatch.setenv("LMFUSED_FUSE_BN", "0")
    block(u, u)
    assert len(asked) == 6 and "junction bn3=module, bn2=module, bn1=module" in repr(block)
    monkeypatch.delenv("LMFUSED_FUSE_BN")
    handle = block.bn2.register_forward_hook(lambda *_: None)
    block(u, u)
    assert len(asked) == 9 and "junction bn3=fused, bn2=module, bn1=fused" in repr(block)
    handle.remove()
    block.double()(u.double(), u.double())
    assert len(asked) == 12 and "fusion (cpu float64): junction bn3=fused, bn2=fused" in repr(block)
