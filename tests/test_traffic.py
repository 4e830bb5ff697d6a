"""The byte counter (bench.traffic, DESIGN.md 1d) on ops whose traffic is known, and on whole networks."""

from __future__ import annotations

import pytest
import torch

import lmfused
from bench import traffic
from tests.conftest import import_or_skip

SHAPE = (2, 8, 5, 7)


def _count(fn, *args):
    counter = traffic.TrafficCounter()
    with counter:
        fn(*args)
    return counter.records


def _x(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_known_op_traffic(dtype):
    """relu reads and writes X (2 X), add reads 2 X and writes X (3 X), a view moves nothing."""
    a, b = torch.randn(SHAPE, dtype=dtype), torch.randn(SHAPE, dtype=dtype)
    x = _x(a)
    (relu,) = _count(torch.relu, a)
    assert (relu.read, relu.written, relu.category) == (x, x, "elementwise")
    (add,) = _count(torch.add, a, b)
    assert (add.read, add.written) == (2 * x, x)
    assert _count(lambda t: t.view(-1).transpose(0, 0), a) == []


def test_lm_step_forward_is_four_tensors():
    """lm_step forward: reads u, u_prev, f and writes out (4 X), plus the k vector; one op in the junction."""
    u, u_prev, f = (torch.randn(SHAPE) for _ in range(3))
    k = torch.randn(SHAPE[1])
    (op,) = _count(lambda: lmfused.lm_step(u, u_prev, f, k, backend="reference"))
    assert op.category == "lm_junction"
    assert (op.read, op.written) == (3 * _x(u) + _x(k), _x(u))


def test_backward_additions_are_gradient_accumulation():
    """A tensor used twice gets its gradients summed by autograd: an add in the backward phase."""
    assert traffic.category("aten.add", "backward") == "grad_accumulation"
    assert traffic.category("aten.add", "forward") == "elementwise"
    assert traffic.category("aten.native_batch_norm_backward", "backward") == "batch_norm"
    assert traffic.category("aten.convolution_backward", "backward") == "convolution"
    assert traffic.category("aten._to_copy", "forward") == "copy"


@pytest.mark.parametrize(
    ("fuse_batch_norm", "pass_through", "junction_x"),
    [("0", "0", 22.0), ("0", "1", 20.0), ("1", "0", 20.1875), ("1", "1", 17.1875)],
)
def test_lm_and_plain_junction_of_inner_bottleneck_blocks(
    monkeypatch, fuse_batch_norm, pass_through, junction_x
):
    """The hand count of bench/NOTES.md, plus the block's last batch norm (2 X forward, 3 X backward): an
    inner post-activation bottleneck block's junction moves 16 X in torchvision's ResNeXt-50; in the LM one,
    22 X with lm_step and nn.BatchNorm2d, 2 X less with the gradient pass-through (an addition of two
    gradients becomes one read), 1.8125 X less with the batch-norm-fused op (its forward writes the
    ReLU's 1-bit mask, 1/16 X in bf16, which the two backward passes read instead of reading out (1 X) or
    recomputing it: 3/16 X), and 1 X less with the gradient handoff (lmfused.handoff: autograd's addition of
    the block input's two gradients, read 2 write 1, becomes one more read in each backward pass): 17.1875 X
    with everything on. The whole training step is counted with
    fake tensors (no memory), at the benchmark's batch and image size, and falls below torchvision's as a
    GPU runs it with the batch-norm-fused ops (the branch's BatchNorm + ReLU pairs fused too)."""
    import_or_skip("torchvision")
    monkeypatch.setenv("LMFUSED_FUSE_BN", fuse_batch_norm)
    monkeypatch.setenv("LMFUSED_GRADIENT_PASSTHROUGH", pass_through)
    result = traffic.compare("lm_resnext50_32x4d", batch=64, size=224)
    assert result["counterpart"] == "torchvision resnext50_32x4d"
    lm = {b["block"]: b["junction_x"] for b in result["lm"]["blocks"]}
    plain = {b["block"]: b["junction_x"] for b in result["plain"]["blocks"]}
    assert len(lm) == len(plain) == 16
    # (+ a few per-channel vectors: weights, statistics)
    assert plain["layer3.2"] == pytest.approx(16.0, abs=0.01)
    assert lm["layer3.2"] == pytest.approx(junction_x, abs=0.01)
    # Convolutions move the same bytes in both networks; the difference is the junction.
    assert result["lm"]["by_category"]["convolution"] == result["plain"]["by_category"]["convolution"]
    fused = result["lm"]["by_category"]["batch_norm"] < result["plain"]["by_category"]["batch_norm"]
    assert fused == (fuse_batch_norm == "1")
    if fuse_batch_norm == "1":
        # Below torchvision's bytes as a GPU runs them (aten's batch norm charged its second passes, as
        # lmfused's are). One pass per op charges aten's batch norm one pass each way but lmfused's, now the
        # projection's too, every pass, and the price of keeping no projected shortcut (its rebuild, 2 X per
        # stage) and no pooling indices (pooled again): that count is still at most torchvision's with the
        # handoff, within 4% without it.
        with_handoff = pass_through == "1"
        assert result["gpu_ratio"] <= (0.86 if with_handoff else 0.90)
        assert result["ratio"] <= (1.0 if with_handoff else 1.04)
    else:
        assert 1.0 < result["ratio"] < 1.15


def _rereads(fn, *args):
    return [(r.op.split(".")[1], r.reread) for r in _count(fn, *args) if r.reread]


def test_second_passes_as_a_gpu_runs_them():
    """As a GPU runs them: aten's batch norm reads x again to normalise it in training (not in evaluation),
    its backward reads grad_out and x again for grad_x; a convolution backward reads grad_out for dgrad and
    again for wgrad (once when only one of them is needed); an elementwise op reads once."""
    x = torch.randn(SHAPE, requires_grad=True)
    weight, bias = torch.rand(SHAPE[1], requires_grad=True), torch.rand(SHAPE[1], requires_grad=True)
    stats = torch.zeros(SHAPE[1]), torch.ones(SHAPE[1])
    records = _count(lambda: torch.nn.functional.batch_norm(x, *stats, weight, bias, True).sum().backward())
    by_op = {r.op.split(".")[1]: r for r in records}
    assert by_op["native_batch_norm"].reread == _x(x)
    assert by_op["native_batch_norm_backward"].reread == 2 * _x(x)  # grad_out and x, both of x's size
    assert by_op["native_batch_norm"].gpu_bytes == by_op["native_batch_norm"].bytes + _x(x)
    assert _rereads(lambda: torch.nn.functional.batch_norm(x.detach(), *stats, training=False)) == []
    conv = torch.nn.Conv2d(SHAPE[1], 4, 3, padding=1, bias=False)
    grad_out_bytes = SHAPE[0] * 4 * SHAPE[2] * SHAPE[3] * 4
    assert _rereads(lambda: conv(x).sum().backward()) == [("convolution_backward", grad_out_bytes)]
    assert _rereads(lambda: conv(x.detach()).sum().backward()) == []  # wgrad only
    assert _rereads(torch.relu, x.detach()) == []


def test_whole_step_both_ways():
    """The step and the junction counted both ways: torchvision's inner junction is 3 X more as a GPU runs
    it (the batch norm's second passes: x forward, grad_out and x backward), the LM junction's lmfused ops
    are exact both ways; the convolutions add the same second reads of grad_out in both networks."""
    import_or_skip("torchvision")
    result = traffic.compare("lm_resnext50_32x4d", batch=64, size=224)
    lm, plain = result["lm"], result["plain"]
    plain_block = {b["block"]: b for b in plain["blocks"]}["layer3.2"]
    assert plain_block["gpu_junction_x"] == pytest.approx(plain_block["junction_x"] + 3.0, abs=0.01)
    lm_block = {b["block"]: b for b in lm["blocks"]}["layer3.2"]
    assert lm_block["gpu_junction_x"] == pytest.approx(lm_block["junction_x"], abs=0.01)
    conv = [net["gpu_by_category"]["convolution"] - net["by_category"]["convolution"] for net in (lm, plain)]
    assert conv[0] == conv[1] > 0
    assert lm["gpu_total_bytes"] > lm["total_bytes"] and result["gpu_ratio"] < result["ratio"]
    # The plain-PyTorch LM network is counted too, and is plain: the same convolutions, no lmfused op.
    pytorch = result["lm_pytorch"]
    assert pytorch["lmfused_ops"] == plain["lmfused_ops"] == 0 < lm["lmfused_ops"]
    assert pytorch["by_category"]["convolution"] == plain["by_category"]["convolution"]
    assert "plain PyTorch" in pytorch["ran"] and "lmfused ops" in lm["ran"]
