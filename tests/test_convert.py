"""lmfused.convert_to_lm: torchvision/timm ResNets -> LM versions, weights kept, k = 0 equals the original.

torchvision and timm are optional: the structural tests run on stand-ins written here that reproduce their
ResNet module structure and forward (torchvision's BasicBlock/Bottleneck/ResNet, timm's blocks with act1..3,
drop_block, aa, se and drop_path); the real libraries are tested when they import.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmfused.convert import convert_to_lm
from lmfused.models import create_model, lm_coefficient_keys, load_pretrained_state_dict
from lmfused.nn import LMStage, LMStep, PostActBlock, Projection, ResidualStep, linear_survival_schedule
from tests.conftest import import_or_skip

# ----------------------------------------------------------------------------------------------------------
# Stand-ins: torchvision's ResNet structure (with a configurable base width, to keep tests small)
# ----------------------------------------------------------------------------------------------------------


def conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def projection(cin, cout, stride):
    """The downsample of torchvision's and timm's ResNets: a strided 1x1 conv and a BatchNorm."""
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


def torchvision_block_end(block, out, x):
    """What a torchvision block runs after its last batch norm: the (projected) input added, the ReLU."""
    out += x if block.downsample is None else block.downsample(x)
    return block.relu(out)


class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torchvision_block_end(self, out, x)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torchvision_block_end(self, out, x)


class TVResNet(nn.Module):
    """torchvision.models.ResNet's structure; ``base`` = 64 is torchvision's width."""

    def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64, base=64):
        super().__init__()
        self.inplanes, self.groups, self.base_width = base, groups, width_per_group
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, depth in enumerate(layers):
            self.add_module(f"layer{i + 1}", self._make_layer(block, base * 2**i, depth, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base * 2 ** (len(layers) - 1) * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = projection(self.inplanes, planes * block.expansion, stride)
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ----------------------------------------------------------------------------------------------------------
# Stand-ins: timm's block structure (act1..act3, drop_block, aa, se, drop_path), timm's forward order
# ----------------------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, max(channels // 4, 1), 1)
        self.fc2 = nn.Conv2d(max(channels // 4, 1), channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def timm_block_end(block, x, shortcut, act):
    """What a timm block runs after its last batch norm: squeeze-excite, drop path, the (projected) shortcut
    added, the final activation."""
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    x += shortcut
    return act(x)


class TimmBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, act=nn.ReLU, se=False):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = act(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes) if se else None
        self.act2 = act(inplace=True)
        self.downsample = downsample
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        return timm_block_end(self, x, shortcut, self.act2)


class TimmBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, act=nn.ReLU, se=False, cardinality=1):
        super().__init__()
        width = planes * cardinality
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = act(inplace=True)
        self.conv2 = conv3x3(width, width, stride, cardinality)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = nn.Identity()
        self.act2 = act(inplace=True)
        self.aa = nn.AvgPool2d(3, 1, 1)  # an anti-aliasing stand-in that changes values
        self.conv3 = conv1x1(width, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.se = SqueezeExcite(planes * 4) if se else None
        self.act3 = act(inplace=True)
        self.downsample = downsample
        self.drop_path = None

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        return timm_block_end(self, x, shortcut, self.act3)


class TimmLikeResNet(nn.Module):
    def __init__(self, block, layers, base=8, num_classes=10, **block_args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.act1 = nn.ReLU(inplace=True)
        self.grad_checkpointing = False
        inplanes = base
        for i, depth in enumerate(layers):
            planes, stride = base * 2**i, 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = projection(inplanes, planes * block.expansion, stride)
                blocks.append(block(inplanes, planes, stride if j == 0 else 1, downsample, **block_args))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that equivalence is a real check."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model


TINY = {
    "tv_basic": lambda: TVResNet(TVBasicBlock, [2, 1, 2, 1], base=8),
    "tv_bottleneck": lambda: TVResNet(TVBottleneck, [2, 2, 1, 2], base=8),
    "tv_resnext": lambda: TVResNet(TVBottleneck, [1, 2, 2, 1], groups=4, width_per_group=16, base=8),
    "timm_basic_se": lambda: TimmLikeResNet(TimmBasicBlock, [2, 2, 1, 1], se=True),
    "timm_bottleneck_silu": lambda: TimmLikeResNet(TimmBottleneck, [2, 1, 2, 1], act=nn.SiLU, se=True),
    "timm_resnext": lambda: TimmLikeResNet(TimmBottleneck, [1, 2, 1, 2], cardinality=2),
}


def expected_k_keys(model: nn.Module) -> list[str]:
    """Keys of the blocks that get a k: every block after a stage's first, without a projection."""
    return [
        f"layer{i}.{j}.step.k"
        for i in range(1, 5)
        for j, block in enumerate(getattr(model, f"layer{i}"))
        if j > 0 and block.downsample is None
    ]


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TINY))
def test_k_zero_conversion_computes_the_original_network(kind):
    torch.manual_seed(0)
    model = randomise(TINY[kind]()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_lm(model)
    assert converted is model  # in place
    new_keys = expected_k_keys(model)
    assert new_keys and set(model.state_dict()) == set(keys) | set(new_keys)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_conversion_reuses_the_original_modules():
    model = TVResNet(TVBottleneck, [2, 2, 1, 1], base=8)
    conv, downsample, relu = model.layer1[1].conv2, model.layer2[0].downsample, model.layer1[0].relu
    convert_to_lm(model)
    assert isinstance(model.layer1, LMStage) and all(isinstance(b, PostActBlock) for b in model.layer1)
    assert model.layer1[1].conv2 is conv and model.layer2[0].downsample is downsample
    assert isinstance(downsample, Projection)  # the same module, its batch norm fused (lmfused.rebuild)
    assert model.layer1[0].act1 is relu and model.layer1[0].fused_act  # final ReLU fused into the update
    assert type(model.layer1[0].step) is ResidualStep and isinstance(model.layer1[1].step, LMStep)


def test_timm_extras_keep_their_names_and_place():
    model = TINY["timm_bottleneck_silu"]()
    se_keys = {k for k in model.state_dict() if ".se." in k}
    convert_to_lm(model)
    assert se_keys and se_keys <= set(model.state_dict())
    block = model.layer1[1]
    assert not block.fused_act and isinstance(block.act3, nn.SiLU)  # SiLU cannot be fused: applied after
    assert isinstance(block.aa, nn.AvgPool2d) and block.se is not None


def test_k_trains_after_conversion():
    torch.manual_seed(0)
    model = convert_to_lm(TINY["tv_bottleneck"](), per_channel_k=True).train()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    steps = [m for m in model.modules() if isinstance(m, LMStep)]
    assert len(steps) == len(expected_k_keys(model))
    for step in steps:
        assert step.k.shape == (step.channels,) and step.k.grad is not None and step.k.grad.abs().sum() > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    assert any(step.k.abs().sum() > 0 for step in steps)


def test_conversion_options():
    model = convert_to_lm(
        TINY["tv_basic"](),
        (-0.1, 0.0),
        survival_prob=0.6,
        sd_mode="batch",
        noise_std=0.05,
        backend="reference",
    )
    steps = [block.step for i in range(1, 5) for block in getattr(model, f"layer{i}")]
    assert [s.survival_prob for s in steps] == pytest.approx(linear_survival_schedule(6, 0.6))
    assert all(s.mode == "batch" and s.noise_std == 0.05 and s.backend == "reference" for s in steps)
    ks = torch.cat([s.k for s in steps if isinstance(s, LMStep)])
    assert ks.min() >= -0.1 and ks.max() <= 0.0 and ks.shape == (2,)
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()


def test_conversion_rejects_what_it_cannot_convert():
    model = convert_to_lm(TINY["tv_basic"]())
    with pytest.raises(ValueError, match="already"):
        convert_to_lm(model)
    with pytest.raises(TypeError, match="layer1"):
        convert_to_lm(nn.Sequential(nn.Conv2d(3, 3, 1)))
    odd = TINY["tv_basic"]()
    odd.layer3[1].extra = nn.Conv2d(32, 32, 1)
    with pytest.raises(TypeError, match="extra"):
        convert_to_lm(odd)
    assert not isinstance(odd.layer1, LMStage)  # nothing converted when a later stage fails
    with pytest.raises(ValueError, match="sd_mode"):
        convert_to_lm(TINY["tv_basic"](), sd_mode="layer")
    with pytest.raises(ValueError, match="survival_prob"):
        convert_to_lm(TINY["tv_basic"](), survival_prob=0.0)


def test_stand_in_matches_the_zoo_layout():
    """The torchvision stand-in at full width has resnet50's parameter count and the zoo's names."""
    with torch.device("meta"):
        tv = TVResNet(TVBottleneck, [3, 4, 6, 3])
        lm = create_model("lm_resnet50")
    assert sum(p.numel() for p in tv.parameters()) == 25_557_032
    assert load_pretrained_state_dict(lm, tv.state_dict()) == lm_coefficient_keys(lm)
    with torch.device("meta"):
        converted = convert_to_lm(TVResNet(TVBottleneck, [3, 4, 6, 3]))
    assert list(converted.state_dict()) == list(lm.state_dict())


def test_converted_model_runs_channels_last_and_autocast():
    torch.manual_seed(0)
    model = convert_to_lm(randomise(TINY["tv_resnext"]()), per_channel_k=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(
            model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


# ----------------------------------------------------------------------------------------------------------
# Norms other than BatchNorm, grad checkpointing
# ----------------------------------------------------------------------------------------------------------


def group_norm_resnet() -> nn.Module:
    """The torchvision stand-in with GroupNorm everywhere (timm's resnet50_gn layout)."""
    model = TVResNet(TVBottleneck, [2, 1, 1, 1], base=8)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.GroupNorm(4, child.num_features))
    return model


def test_group_norm_blocks_convert_exactly():
    """GroupNorm has no num_features (timm resnet50_gn used to fail with a bare AttributeError)."""
    torch.manual_seed(0)
    model = group_norm_resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        converted = convert_to_lm(model, per_channel_k=True)
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
    assert converted.layer1[1].step.k.shape == (32,)  # channels from GroupNorm.num_channels


def test_a_block_whose_channels_cannot_be_told_is_a_type_error():
    class Wrapped(nn.Module):  # neither a norm with channels nor a conv
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    odd = TINY["tv_basic"]()
    odd.layer3[1].bn2 = nn.Identity()
    odd.layer3[1].conv2 = Wrapped(odd.layer3[1].conv2)
    with pytest.raises(TypeError, match=r"layer3\.1.*channels"):
        convert_to_lm(odd, per_channel_k=True)


def gradients(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_of_a_converted_model_gives_the_same_gradients():
    torch.manual_seed(0)
    model = convert_to_lm(randomise(TINY["timm_resnext"]()), (-0.1, 0.0), noise_std=0.1, survival_prob=0.7)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    expected = gradients(model, x)
    model.set_grad_checkpointing(True)
    assert model.layer1.grad_checkpointing and not model.grad_checkpointing  # timm's own path stays off
    torch.manual_seed(1)  # same masks and noise: the recomputation replays torch's random state
    got = gradients(model, x)
    assert got.keys() == expected.keys() and any(".step.k" in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    model.set_grad_checkpointing(False)
    assert not model.layer4.grad_checkpointing
    with pytest.raises(TypeError, match="enable"):
        model.set_grad_checkpointing("yes")


def test_a_model_converted_with_grad_checkpointing_on_keeps_it():
    model = TINY["timm_resnext"]()
    model.grad_checkpointing = True
    convert_to_lm(model)
    assert not model.grad_checkpointing
    assert all(getattr(model, f"layer{i}").grad_checkpointing for i in (1, 2, 3, 4))
    checkpointed = TINY["timm_resnext"]()
    checkpointed.grad_checkpointing = True
    with pytest.raises(ValueError, match="batch-mode"):
        convert_to_lm(checkpointed, sd_mode="batch", survival_prob=0.5)
    assert not isinstance(checkpointed.layer1, LMStage)  # nothing converted
    model = convert_to_lm(TINY["tv_basic"](), sd_mode="batch", survival_prob=0.5)
    with pytest.raises(ValueError, match="batch-mode"):
        model.set_grad_checkpointing(True)


def test_blocks_run_one_by_one_say_how_to_checkpoint():
    """timm's own checkpointing feeds each block the previous block's output: a clear TypeError."""
    model = convert_to_lm(TINY["tv_basic"]())
    first, second = model.layer1[0], model.layer1[1]
    with pytest.raises(TypeError, match="set_grad_checkpointing"):
        second(first(torch.randn(1, 8, 8, 8)))


def test_converted_model_compiles_without_graph_breaks():
    """fullgraph=True traces the whole converted model, training step included (aot_eager: the trace and the
    autograd graph, without Inductor's minutes of CPU code generation)."""
    torch.manual_seed(0)
    model = convert_to_lm(randomise(TINY["tv_basic"]()), (-0.1, 0.0)).train()
    x = torch.randn(2, 3, 32, 32)
    expected = gradients(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = {name.removeprefix("_orig_mod."): grad for name, grad in gradients(compiled, x).items()}
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------------
# The real libraries (CI installs them and requires them: LMFUSED_REQUIRE_LIBS)
# ----------------------------------------------------------------------------------------------------------

TORCHVISION_MODELS = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"]
TIMM_MODELS = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "seresnext26d_32x4d",
    "resnet26d",
    "ecaresnet26t",
    "resnet50d",
    "resnetrs50",
    "seresnet50",
    "resnet50_gn",
]


def check_exact_conversion(model: nn.Module, size: int = 64) -> nn.Module:
    """k = 0: the converted model computes the original one. With the blocks' last batch norm unfused the
    same ops run (equal to float32 round-off); fused into the update (the default) the arithmetic differs,
    and its error against float64 stays within twice the original float32 model's."""
    torch.manual_seed(0)
    model = randomise(model).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        exact = copy.deepcopy(model).double()(x.double())
        converted = convert_to_lm(model)
        with _fused_batch_norm("0"):
            torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
        with _fused_batch_norm("1"):
            got = converted(x)
        own_error = (expected.double() - exact).abs().max().item()
        assert (got.double() - exact).abs().max().item() <= 2 * own_error + 1e-5 * exact.abs().max().item()
    return converted


@contextlib.contextmanager
def _fused_batch_norm(value: str):
    """LMFUSED_FUSE_BN set to ``value`` for the duration (the blocks read it on every forward)."""
    previous = os.environ.get("LMFUSED_FUSE_BN")
    os.environ["LMFUSED_FUSE_BN"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LMFUSED_FUSE_BN")
        else:
            os.environ["LMFUSED_FUSE_BN"] = previous


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_conversion(name):
    models = import_or_skip("torchvision.models")
    check_exact_conversion(getattr(models, name)())


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_conversion(name):
    timm = import_or_skip("timm")
    check_exact_conversion(timm.create_model(name, pretrained=False))


def test_timm_converted_model_trains_with_timm_grad_checkpointing():
    """What timm's training script does: set_grad_checkpointing(enable=True), then train; the gradients are
    those of the model without checkpointing."""
    timm = import_or_skip("timm")
    torch.manual_seed(0)
    model = convert_to_lm(timm.create_model("resnet26d", num_classes=10), (-0.1, 0.0)).train()
    x = torch.randn(2, 3, 64, 64)
    expected = gradients(model, x)
    model.set_grad_checkpointing(enable=True)
    got = gradients(model, x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    features = model.forward_intermediates(x, intermediates_only=True)  # timm's method, stages checkpointed
    assert [f.shape[1] for f in features] == [64, 256, 512, 1024, 2048]
    model.grad_checkpointing = True  # timm's own block-by-block path: refused with a message that says why
    with pytest.raises(TypeError, match="set_grad_checkpointing"):
        model(x)
