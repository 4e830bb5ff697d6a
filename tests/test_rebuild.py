"""States a step's backward rebuilds instead of keeping (lmfused.rebuild), and the stem pooling that keeps no
indices (lmfused.nn.MaxPool2d): what autograd keeps, and gradients unchanged bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmfused
from lmfused.nn import MaxPool2d
from lmfused.nn.blocks import Projection
from lmfused.rebuild import mark
from tests.conftest import DEVICE
from tests.helpers import backends


def _saved_storages(fn):
    """Run ``fn()`` and return (its result, the storages autograd saved for the backward)."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage()._cdata)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, set(saved)


def _projection_case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 6, 5, 4)

    def rand(*s):
        return torch.randn(*s, generator=gen)

    x = (2 * rand(*shape) + 0.5).to(dtype).to(DEVICE).to(memory_format=torch.channels_last)
    u = rand(*shape).to(dtype).to(DEVICE).to(memory_format=torch.channels_last)
    branch = rand(*shape).to(dtype).to(DEVICE).to(memory_format=torch.channels_last)
    weight, bias = (1 + 0.5 * rand(6)).to(DEVICE), (0.5 * rand(6)).to(DEVICE)
    k = (0.3 * rand(6)).to(DEVICE)
    grad = rand(*shape).to(dtype).to(DEVICE)
    return x, u, branch, weight, bias, k, grad


def _step_on_projection(case, backend, step, detach_projection, pass_through=False):
    """u_prev = lmfused.batch_norm(x) (a projection shortcut), then ``step`` (lm_step or
    batch_norm_lm_step) with it; ``detach_projection``: u_prev given as a copy (kept as usual)."""
    x, u, branch, weight, bias, k, grad = case
    leaves = [t.detach().clone().requires_grad_() for t in (x, u, branch, weight, bias, k)]
    x, u, branch, weight, bias, k = leaves

    def run():
        projection = lmfused.batch_norm(x, None, None, weight, bias, training=True, backend=backend)
        if pass_through:  # the first block's step hands its u on as the next one's u_prev
            zero = torch.zeros(1, device=DEVICE)
            _, projection = lmfused.lm_step(projection, projection.detach(), branch, zero, backend=backend,
                                            return_shortcut=True)  # fmt: skip
        if detach_projection:
            projection = projection * 1  # a new tensor with the same values and gradient
        if step == "lm_step":
            return lmfused.lm_step(u, projection, branch, k, relu=True, backend=backend), projection
        out = lmfused.batch_norm_lm_step(branch, None, None, None, None, u, projection, k, training=True,
                                         relu=True, backend=backend)  # fmt: skip
        return out, projection

    (out, projection), saved = _saved_storages(run)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return out, grads, projection.untyped_storage()._cdata in saved


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("step", ["lm_step", "batch_norm_lm_step"])
@pytest.mark.parametrize("pass_through", [False, True])
def test_a_projection_taken_as_u_prev_is_rebuilt_not_kept(backend, step, pass_through):
    """A step saves no projection of lmfused.batch_norm for grad_k; its gradients are bitwise those of the
    same step given the projection's values as an ordinary tensor (kept)."""
    for dtype in (torch.bfloat16, torch.float32):
        case = _projection_case(dtype)
        out, grads, kept = _step_on_projection(case, backend, step, False, pass_through)
        ref_out, ref_grads, ref_kept = _step_on_projection(case, backend, step, True, pass_through)
        assert not kept and ref_kept
        assert torch.equal(out, ref_out)
        for name, got, ref in zip(("x", "u", "branch", "weight", "bias", "k"), grads, ref_grads, strict=True):
            assert torch.equal(got, ref), f"{name} ({dtype}, {backend}, {step})"


def test_changed_in_place_before_the_step_is_kept():
    """A tensor changed in place after it was marked is no longer its rebuild: kept, and grad_k is right."""
    x, u, branch, weight, bias, k, grad = _projection_case(torch.float32)
    k.requires_grad_()
    projection = mark(x.clone(), (x,), lambda x: x.clone())
    projection.mul_(2)
    out, saved = _saved_storages(lambda: lmfused.lm_step(u, projection, branch, k))
    assert projection.untyped_storage()._cdata in saved
    (grad_k,) = torch.autograd.grad(out, [k], grad)
    expected = (grad.double() * (projection.double() - u.double())).sum(dim=(0, 2, 3))
    torch.testing.assert_close(grad_k.double(), expected, rtol=1e-5, atol=1e-5)


def test_changed_in_place_after_the_step_raises():
    """As autograd does for a saved tensor: the rebuild would not be the value the forward used."""
    x, u, branch, weight, bias, k, grad = _projection_case(torch.float32)
    k.requires_grad_()
    projection = lmfused.batch_norm(x.requires_grad_(), None, None, weight, bias, training=True)
    out = lmfused.lm_step(u, projection, branch, k)
    with torch.no_grad():
        projection.add_(1)
    with pytest.raises(RuntimeError, match="u_prev: .*modified by an inplace operation"):
        out.backward(grad)


def test_zoo_stage_keeps_no_projection():
    """In an LM-ResNet-50 stage the first block's downsample is a Projection and the second block's step
    keeps no projected shortcut; the model's gradients match those with the downsample as a plain
    nn.Sequential (torch's batch norm, the shortcut kept), in float64."""
    torch.manual_seed(0)
    model = lmfused.models.create_model("lm_resnet50").to(DEVICE, torch.float64).train()
    plain = copy.deepcopy(model)
    for stage in (plain.layer1, plain.layer2, plain.layer3, plain.layer4):
        stage[0].downsample = nn.Sequential(*stage[0].downsample)
    assert isinstance(model.layer1[0].downsample, Projection)
    assert {"downsample.0.weight", "downsample.1.weight"} <= set(model.layer1[0].state_dict())
    images = torch.randn(2, 3, 64, 64, device=DEVICE, dtype=torch.float64)
    shortcuts = []
    handle = model.layer2[0].downsample.register_forward_hook(lambda m, a, out: shortcuts.append(out))
    (loss, saved) = _saved_storages(lambda: model(images).square().mean())
    handle.remove()
    assert shortcuts[0].untyped_storage()._cdata not in saved
    loss.backward()
    plain(images).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("options", [{}, dict(survival_prob=0.7, noise_std=0.05)], ids=["plain", "sd+noise"])
def test_grad_checkpointing_keeps_no_projection(options):
    """A checkpoint keeps its inputs: a stage recomputes a block with a projection shortcut together with the
    next block (LMStage.checkpoint_segments), so no projection outlives the forward, and the gradients are
    those without checkpointing (stochastic depth and noise replayed), in float64."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from lmfused.nn.blocks import set_grad_checkpointing

    torch.manual_seed(0)
    model = lmfused.models.create_model("lm_resnet50", **options).to(DEVICE, torch.float64).train()
    checkpointed = copy.deepcopy(model)
    set_grad_checkpointing(checkpointed)
    assert [len(s) for s in checkpointed.layer1.checkpoint_segments()] == [2, 1]
    images = torch.randn(2, 3, 64, 64, device=DEVICE, dtype=torch.float64)
    projections = []
    for stage in (checkpointed.layer1, checkpointed.layer2, checkpointed.layer3, checkpointed.layer4):
        stage[0].downsample.register_forward_hook(
            lambda m, a, out: projections.append(StorageWeakRef(out.untyped_storage()))
        )
    torch.manual_seed(1)
    loss = checkpointed(images).square().mean()
    assert len(projections) == 4 and all(ref.expired() for ref in projections)
    loss.backward()
    torch.manual_seed(1)
    model(images).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_compiled_stage_keeps_no_projection():
    """Under torch.compile the partitioner decides what is kept: a Projection asks it (selective
    checkpointing) to recompute its norm's output. The compiled step keeps what lm=False keeps, and gives
    the eager gradients and running statistics (updated once), in float64."""
    from bench.memory import compiled_saved_bytes

    def build(**options):
        return lambda: lmfused.models.create_model("lm_resnet50", backend="reference", **options)

    kept = compiled_saved_bytes(build(), batch=2, size=64)["compiled_saved_bytes"]
    assert kept == compiled_saved_bytes(build(lm=False), batch=2, size=64)["compiled_saved_bytes"] > 0

    torch.manual_seed(0)
    model = build()().to(DEVICE, torch.float64).train()
    eager = copy.deepcopy(model)
    images = torch.randn(2, 3, 64, 64, device=DEVICE, dtype=torch.float64)
    torch.compile(model, backend="aot_eager")(images).square().mean().backward()
    torch._dynamo.reset()
    eager(images).square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, b), c in zip(eager.named_buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=name)


POOLS = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=2, stride=2),
    dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True),
]


@pytest.mark.parametrize("pool", POOLS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_gradient_is_nn_max_pool2d_bitwise(pool, dtype, channels_last):
    """Ties included (small integers): the indices found again are the ones nn.MaxPool2d kept."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (2, 5, 11, 9), generator=gen).to(dtype).to(DEVICE)
    x = x + 0.25 * torch.randn(x.shape, generator=gen).to(dtype).to(DEVICE) * (x > 2)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(nn.MaxPool2d(**pool)(x).shape, generator=gen).to(dtype).to(DEVICE)
    results = []
    for module in (MaxPool2d(**pool), nn.MaxPool2d(**pool)):
        leaf = x.detach().clone().requires_grad_()
        out, saved = _saved_storages(lambda leaf=leaf, module=module: module(leaf))
        (grad_x,) = torch.autograd.grad(out, [leaf], grad)
        results.append((out, grad_x, saved, leaf))
    (out, grad_x, saved, leaf), (ref_out, ref_grad_x, ref_saved, _) = results
    assert torch.equal(out, ref_out) and torch.equal(grad_x, ref_grad_x)
    assert saved == {leaf.untyped_storage()._cdata}  # the input only
    assert len(ref_saved) == 2  # nn.MaxPool2d: the input and the indices


def test_max_pool_is_nn_max_pool2d_where_it_cannot_help():
    pool = MaxPool2d(3, 2, 1)
    assert isinstance(pool, nn.MaxPool2d)
    x = torch.randn(1, 2, 6, 6, device=DEVICE)
    assert torch.equal(pool(x), F.max_pool2d(x, 3, 2, 1))  # no gradient: no autograd Function
    out, indices = MaxPool2d(3, 2, 1, return_indices=True)(x.requires_grad_())
    assert indices.dtype == torch.int64
    graph = torch.fx.symbolic_trace(nn.Sequential(pool))
    assert any(node.op == "call_function" or node.op == "call_module" for node in graph.graph.nodes)
    compiled = torch.compile(pool, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), F.max_pool2d(x, 3, 2, 1))
