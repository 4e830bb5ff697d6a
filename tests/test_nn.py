"""lmfused.nn: LMStep / ResidualStep (k, stochastic depth, noise), the two-state blocks and LMStage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmfused.nn import (
    LMBlock,
    LMStage,
    LMStep,
    PostActBlock,
    PreActBlock,
    ResidualStep,
    linear_survival_schedule,
    make_step,
    seed_stochastic_depth,
)
from lmfused.reference import lm_step_eager


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# LMStep: parameters, repr, validation
# ----------------------------------------------------------------------------------------------------------


def test_k_is_a_float32_vector_initialised_uniformly():
    scalar, per_channel = LMStep(), LMStep(64)
    assert scalar.k.shape == (1,) and per_channel.k.shape == (64,)
    for step in (scalar, per_channel):
        assert step.k.dtype == torch.float32 and step.k.dim() == 1 and step.k.requires_grad
        assert [name for name, _ in step.named_parameters()] == ["k"]
        assert list(step.state_dict()) == ["k"]
    assert per_channel.k.min() >= -0.1 and per_channel.k.max() <= 0.0  # the paper's U[-0.1, 0]
    assert per_channel.k.unique().numel() > 1
    assert torch.equal(LMStep(8, k_init=0.25).k, torch.full((8,), 0.25))
    wide = LMStep(1000, k_init=(0.5, 2.0)).k
    assert wide.min() >= 0.5 and wide.max() <= 2.0 and wide.mean().item() == pytest.approx(1.25, abs=0.1)


def test_residual_step_has_no_parameters_and_no_state():
    step = ResidualStep(survival_prob=0.5, relu=True)
    assert list(step.parameters()) == [] and step.state_dict() == {}


def test_extra_repr():
    text = repr(LMStep(8, survival_prob=0.5, mode="batch", noise_std=0.1, relu=True, k_init=0.0))
    for part in (
        "channels=8",
        "k_init=0.0",
        "survival_prob=0.5",
        "mode='batch'",
        "noise_std=0.1",
        "relu=True",
    ):
        assert part in text
    assert "k_init=(-0.1, 0.0)" in repr(LMStep()) and "channels=None" in repr(LMStep())
    assert "backend='reference'" in repr(ResidualStep(backend="reference"))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(survival_prob=0.0), "survival_prob"),
        (dict(survival_prob=1.5), "survival_prob"),
        (dict(survival_prob=-0.2), "survival_prob"),
        (dict(survival_prob=math.nan), "survival_prob"),
        (dict(survival_prob=True), "survival_prob"),
        (dict(mode="layer"), "mode"),
        (dict(mode=None), "mode"),
        (dict(noise_std=-0.1), "noise_std"),
        (dict(noise_std=math.inf), "noise_std"),
        (dict(channels=0), "channels"),
        (dict(channels=-4), "channels"),
        (dict(channels=2.5), "channels"),
        (dict(channels=True), "channels"),
        (dict(k_init=(0.0, -0.1)), "k_init"),
        (dict(k_init=(0.0, 0.1, 0.2)), "k_init"),
        (dict(k_init="uniform"), "k_init"),
        (dict(k_init=math.nan), "k_init"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, argument):
    channels = kwargs.pop("channels", None)
    with pytest.raises(ValueError, match=argument):
        LMStep(channels, **kwargs)


def test_relu_must_be_a_bool():
    with pytest.raises(TypeError, match="relu"):
        ResidualStep(relu=1)


# ----------------------------------------------------------------------------------------------------------
# The update itself
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [None, 6])
@pytest.mark.parametrize("relu", [False, True])
def test_forward_and_gradients_match_the_eager_composition(channels, relu):
    step = LMStep(channels, relu=relu, k_init=(-0.5, 0.5))
    u, u_prev, f = (rand(3, 6, 4, 5, seed=s).requires_grad_() for s in range(3))
    out = step(u, u_prev, f)
    k = step.k.detach().clone().requires_grad_()
    leaves = [t.detach().clone().requires_grad_() for t in (u, u_prev, f)]
    expected = lm_step_eager(*leaves, k, relu=relu)
    torch.testing.assert_close(out, expected)
    grad = rand(*out.shape, seed=9)
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip((u, u_prev, f, step.k), (*leaves, k), strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_lm_step_with_k_zero_is_the_resnet_step():
    u, u_prev, f = (rand(2, 4, 3, 3, seed=s) for s in range(3))
    assert torch.equal(LMStep(4, k_init=0.0)(u, u_prev, f), u + f)
    assert torch.equal(LMStep(k_init=0.0, relu=True)(u, u_prev, f), F.relu(u + f))
    assert torch.equal(ResidualStep()(u, f), u + f)
    assert torch.equal(ResidualStep(relu=True)(u, f), F.relu(u + f))
    step = LMStep(k_init=(-0.1, 0.0))
    assert torch.equal(step(u, None, f), u + f)  # no previous state: the ResNet step


def test_residual_step_gives_the_input_its_whole_gradient():
    u, f = rand(2, 3, 4, 4).requires_grad_(), rand(2, 3, 4, 4, seed=1).requires_grad_()
    ResidualStep()(u, f).sum().backward()
    assert torch.equal(u.grad, torch.ones_like(u)) and torch.equal(f.grad, torch.ones_like(f))


def test_states_are_cast_to_the_branch_dtype():
    """Under autocast the branch may be bf16 while a shortcut is fp32: the update takes f's dtype."""
    step = LMStep(4, k_init=(-0.1, 0.0))
    u, u_prev = rand(2, 4, 3, 3), rand(2, 4, 3, 3, seed=1)
    f = rand(2, 4, 3, 3, seed=2).bfloat16()
    out = step(u, u_prev, f)
    assert out.dtype == torch.bfloat16
    expected = lm_step_eager(u.bfloat16().float(), u_prev.bfloat16().float(), f.float(), step.k.detach())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)
    assert step(u.bfloat16(), u_prev, None).dtype == torch.bfloat16  # dropped branch: u's dtype


def test_channels_last_inputs_keep_their_layout():
    step = LMStep(8, k_init=(-0.1, 0.0))
    u, u_prev, f = (rand(2, 8, 4, 4, seed=s) for s in range(3))
    out = step(*(t.to(memory_format=torch.channels_last) for t in (u, u_prev, f)))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, step(u, u_prev, f))


# ----------------------------------------------------------------------------------------------------------
# Stochastic depth and noise
# ----------------------------------------------------------------------------------------------------------


def test_sample_mode_mask_is_unbiased_and_per_sample():
    p, n = 0.7, 20000
    step = LMStep(k_init=0.0, survival_prob=p).train()
    zeros, ones = torch.zeros(n, 1), torch.ones(n, 1)
    torch.manual_seed(0)
    scale = step(zeros, zeros, ones).squeeze(1)  # out = scale * f with u = u_prev = 0, f = 1
    assert torch.all((scale == 0) | torch.isclose(scale, torch.tensor(1 / p)))
    assert (scale > 0).float().mean().item() == pytest.approx(p, abs=0.02)
    assert scale.mean().item() == pytest.approx(1.0, abs=0.03)  # E[mask / p] = 1
    assert not torch.equal(scale, step(zeros, zeros, ones).squeeze(1))  # a fresh draw every forward
    step.eval()
    assert torch.equal(step(zeros, zeros, ones), ones)  # eval: no mask, no scaling
    assert step.keep_branch()


def test_sample_mode_keeps_the_same_autograd_graph():
    """Every parameter gets a gradient on every step (DDP needs no find_unused_parameters)."""
    block = PreActBlock.basic(4, 4, step=LMStep(survival_prob=0.2)).train()
    x, x_prev = rand(2, 4, 6, 6), rand(2, 4, 6, 6, seed=1)
    for _ in range(5):
        block.zero_grad(set_to_none=True)
        block(x, x_prev)[0].sum().backward()
        assert all(p.grad is not None for p in block.parameters())


class SpyBlock(LMBlock):
    """A two-state block whose branch is f(u) = 2u, counting how often the branch is computed."""

    def __init__(self, step):
        super().__init__()
        self.depth, self.bn1, self.calls = 1, nn.BatchNorm2d(1), 0
        self._set_step(step, has_projection=False)

    def shortcut_and_branch(self, u, keep):
        if not keep:
            return u, None
        self.calls += 1
        return u, 2 * u


def test_batch_mode_skips_the_dropped_branch_and_runs_the_two_term_update():
    p, steps = 0.6, 400
    block = SpyBlock(LMStep(3, survival_prob=p, mode="batch", k_init=(-0.5, 0.5))).train()
    k = block.step.k.detach().view(1, 3, 1, 1)
    u, u_prev = rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1)
    two_term = (1 - k) * u + k * u_prev
    kept = 0
    for _ in range(steps):
        before = block.calls
        out, shortcut = block(u, u_prev)
        assert shortcut is u
        if block.calls == before:  # dropped: f not computed, two-term update
            torch.testing.assert_close(out, two_term)
        else:  # kept: inverted scaling, f / p
            kept += 1
            torch.testing.assert_close(out, two_term + 2 * u / p)
    assert kept == block.calls
    assert kept / steps == pytest.approx(p, abs=0.08)
    block.eval()
    before = block.calls
    torch.testing.assert_close(block(u, u_prev)[0], two_term + 2 * u)  # eval: always kept, not scaled
    assert block.calls == before + 1


def test_batch_mode_real_block_skips_its_convolutions():
    block = PreActBlock.basic(4, 4, step=LMStep(survival_prob=0.5, mode="batch")).train()
    calls = []
    for module in (block.bn1, block.conv1, block.conv2):
        module.register_forward_hook(lambda *_: calls.append(1))
    x, x_prev = rand(2, 4, 6, 6), rand(2, 4, 6, 6, seed=1)
    for _ in range(100):
        block(x, x_prev)
    assert 0 < len(calls) < 300 and len(calls) % 3 == 0  # all three modules, or none


def test_batch_mode_decisions_follow_the_shared_seeded_generator():
    steps = [ResidualStep(survival_prob=0.5, mode="batch").train() for _ in range(3)]

    def decisions():
        return [step.keep_branch() for _ in range(40) for step in steps]

    seed_stochastic_depth(1234)
    first = decisions()
    torch.manual_seed(99)  # torch's own generator does not matter
    seed_stochastic_depth(1234)
    assert decisions() == first
    assert 0 < sum(first) < len(first)
    assert all(ResidualStep(survival_prob=0.5, mode="sample").train().keep_branch() for _ in range(20))
    assert all(steps[0].eval().keep_branch() for _ in range(20))
    assert all(ResidualStep(mode="batch").train().keep_branch() for _ in range(20))  # p = 1


def test_noise_is_injected_in_training_only():
    sigma = 0.5
    step = LMStep(k_init=0.0, noise_std=sigma)
    u, u_prev, f = (torch.zeros(4, 8, 16, 16) for _ in range(3))
    torch.manual_seed(0)
    noisy = step.train()(u, u_prev, f)
    assert noisy.std().item() == pytest.approx(sigma, rel=0.1)
    torch.manual_seed(0)
    assert torch.equal(step(u, u_prev, f), noisy)  # torch.manual_seed reproduces it
    assert torch.equal(step.eval()(u, u_prev, f), u)
    assert torch.equal(ResidualStep(noise_std=sigma).eval()(u, f), u)


def test_linear_survival_schedule():
    assert linear_survival_schedule(4, 0.5) == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert linear_survival_schedule(3, 1.0) == [1.0, 1.0, 1.0]
    assert linear_survival_schedule(0, 0.5) == []
    with pytest.raises(ValueError, match="final_survival_prob"):
        linear_survival_schedule(3, 0.0)
    with pytest.raises(ValueError, match="num_blocks"):
        linear_survival_schedule(-1, 0.5)


def test_make_step():
    assert type(make_step(lm=False, channels=8)) is ResidualStep
    step = make_step(lm=True, channels=8, per_channel_k=True, k_init=0.0, survival_prob=0.9, relu=True)
    assert isinstance(step, LMStep) and step.k.shape == (8,) and step.relu and step.survival_prob == 0.9
    assert make_step(lm=True, channels=8).k.shape == (1,)


# ----------------------------------------------------------------------------------------------------------
# Blocks and stages
# ----------------------------------------------------------------------------------------------------------


class RecordingBlock(nn.Module):
    is_lm_block = True

    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, u, u_prev):
        self.seen = u_prev
        shortcut = u * 10
        return shortcut + 1, shortcut


def test_stage_carries_two_states():
    stage = LMStage(RecordingBlock(), RecordingBlock(), RecordingBlock())
    assert stage.is_lm_stage and isinstance(stage, nn.Sequential)
    out = stage(torch.ones(1, 1))
    assert stage[0].seen is None
    assert torch.equal(stage[1].seen, torch.full((1, 1), 10.0))  # block 0's shortcut
    assert torch.equal(stage[2].seen, torch.full((1, 1), 110.0))
    assert torch.equal(out, torch.full((1, 1), 1111.0))


def test_preact_block_computes_the_paper_update():
    block = PreActBlock.basic(4, 4, step=LMStep(k_init=(-0.5, 0.5))).eval()
    assert block.is_lm_block and block.k is block.step.k
    u, u_prev = rand(2, 4, 5, 5), rand(2, 4, 5, 5, seed=1)
    f = block.conv2(F.relu(block.bn2(block.conv1(F.relu(block.bn1(u))))))
    out, shortcut = block(u, u_prev)
    assert shortcut is u
    torch.testing.assert_close(out, (1 - block.k) * u + block.k * u_prev + f)
    torch.testing.assert_close(block(u, None)[0], u + f)  # stage's first block: ResNet step


def test_projection_blocks_take_the_resnet_step():
    block = PreActBlock.bottleneck(4, 2, 8, stride=2, groups=2).eval()
    assert type(block.step) is ResidualStep and block.k is None
    u = rand(2, 4, 6, 6)
    out, shortcut = block(u, rand(2, 4, 6, 6, seed=1))
    assert out.shape == shortcut.shape == (2, 8, 3, 3)
    h = F.relu(block.bn1(u))
    torch.testing.assert_close(shortcut, block.downsample(h))  # projection of the pre-activation
    with pytest.raises(ValueError, match="step"):
        PreActBlock.basic(4, 8, step=LMStep())


def test_post_act_block_fuses_the_final_relu():
    block = PostActBlock.bottleneck(16, 4, step=make_step(lm=True, channels=16, relu=True, k_init=0.0)).eval()
    assert block.fused_act
    u = F.relu(rand(2, 16, 5, 5))
    x = block.act1(block.bn1(block.conv1(u)))
    f = block.bn3(block.conv3(block.act2(block.bn2(block.conv2(x)))))
    out, shortcut = block(u, rand(2, 16, 5, 5, seed=1))
    torch.testing.assert_close(out, F.relu(u + f))
    assert shortcut is u and out.min() >= 0


def test_post_act_block_applies_a_non_relu_final_activation_after_the_update():
    def convs():
        return [nn.Conv2d(3, 3, 1, bias=False), nn.Conv2d(3, 3, 3, padding=1, bias=False)]

    norms = [nn.BatchNorm2d(3), nn.BatchNorm2d(3)]
    block = PostActBlock(convs(), norms, [nn.GELU()], nn.GELU(), step=ResidualStep()).eval()
    u = rand(1, 3, 4, 4)
    f = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(u)))))
    torch.testing.assert_close(block(u)[0], F.gelu(u + f))
    with pytest.raises(ValueError, match="relu"):
        PostActBlock(convs(), norms, [nn.GELU()], nn.GELU(), step=ResidualStep(relu=True))


def test_zero_init_last_makes_the_block_an_identity():
    for block in (PreActBlock.basic(4, 4), PostActBlock.bottleneck(16, 4, step=ResidualStep(relu=True))):
        block.zero_init_last()
        u = F.relu(rand(2, block.bn1.num_features if isinstance(block, PreActBlock) else 16, 4, 4))
        torch.testing.assert_close(block.eval()(u)[0], u)
