"""lmfused.models: the zoo, parameter counts, torchvision-compatible names, weight loading, timm registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmfused.models as zoo
from lmfused.models import create_model, list_models, lm_coefficient_keys, load_pretrained_state_dict
from lmfused.models._timm import _timm_entrypoint, register_with_timm
from lmfused.models.registry import DEFAULT_CFGS
from lmfused.nn import LMStage, LMStep, ResidualStep, linear_survival_schedule
from tests.conftest import import_or_skip

CIFAR = [
    "lm_resnet20",
    "lm_resnet32",
    "lm_resnet44",
    "lm_resnet56",
    "lm_resnet110",
    "lm_resnet164",
    "lm_resnext29_8x64d",
]
IMAGENET = [
    "lm_resnet50",
    "lm_resnet101",
    "lm_resnet152",
    "lm_resnext50_32x4d",
    "lm_resnext101_32x4d",
    "lm_resnext101_32x8d",
]
# name: (stage depths, torchvision / timm parameter count of the plain network, stage output channels)
IMAGENET_SPECS = {
    "lm_resnet50": ((3, 4, 6, 3), 25_557_032),
    "lm_resnet101": ((3, 4, 23, 3), 44_549_160),
    "lm_resnet152": ((3, 8, 36, 3), 60_192_808),
    "lm_resnext50_32x4d": ((3, 4, 6, 3), 25_028_904),
    "lm_resnext101_32x4d": ((3, 4, 23, 3), 44_177_704),
    "lm_resnext101_32x8d": ((3, 4, 23, 3), 88_791_336),
}
IMAGENET_CHANNELS = (256, 512, 1024, 2048)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """Only the structure (no memory, no initialisation cost): for counting parameters of large models."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "is_lm_block", False)]


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


def test_list_models():
    assert list_models() == CIFAR + IMAGENET


def test_unknown_model_lists_the_available_ones():
    with pytest.raises(ValueError, match="lm_resnet50") as info:
        create_model("lm_resnet18")
    assert "lm_resnet18" in str(info.value) and all(name in str(info.value) for name in list_models())


def test_builders_are_exported():
    assert all(callable(getattr(zoo, name)) and name in zoo.__all__ for name in list_models())
    assert isinstance(zoo.lm_resnet20(), zoo.LMCifarResNet)


# ----------------------------------------------------------------------------------------------------------
# Forward and backward
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_models_train_and_evaluate(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, survival_prob=0.8, noise_std=0.01).train()
    out = model(images(2, 32))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    ks = [m.k for m in model.modules() if isinstance(m, LMStep)]
    assert ks and all(k.grad is not None and torch.isfinite(k.grad).all() for k in ks)
    model.eval()
    with torch.no_grad():
        x = images(1, 32, seed=1)
        assert torch.equal(model(x), model(x))  # eval: deterministic (no mask, no noise)


@pytest.mark.parametrize("name", ["lm_resnet50", "lm_resnext50_32x4d"])
def test_imagenet_models_forward(name):
    torch.manual_seed(0)
    model = create_model(name, per_channel_k=True).eval()
    with torch.no_grad():
        assert model(images(1, 64)).shape == (1, 1000)


def test_imagenet_model_trains():
    model = create_model("lm_resnet50", num_classes=5, survival_prob=0.5, sd_mode="batch").train()
    model(images(2, 64)).sum().backward()
    assert all(m.k.grad is not None for m in model.modules() if isinstance(m, LMStep))


def test_num_classes_zero_returns_pooled_features():
    model = create_model("lm_resnet20", num_classes=0).eval()
    assert model(images(2, 32)).shape == (2, model.num_features) == (2, 64)
    model.reset_classifier(7)
    assert model(images(2, 32)).shape == (2, 7) and model.get_classifier() is model.fc


# ----------------------------------------------------------------------------------------------------------
# Structure: parameter counts, k placement, stochastic-depth schedule, names
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_parameter_counts_match_torchvision(name):
    depths, plain_count = IMAGENET_SPECS[name]
    lm_blocks = sum(depths) - len(depths)  # every block after a stage's first
    assert count(build_on_meta(name, lm=False)) == plain_count
    assert count(build_on_meta(name)) == plain_count + lm_blocks
    per_channel = sum((d - 1) * c for d, c in zip(depths, IMAGENET_CHANNELS, strict=True))
    assert count(build_on_meta(name, per_channel_k=True)) == plain_count + per_channel


@pytest.mark.parametrize(
    "name, millions, depths",
    [
        ("lm_resnet20", 0.27, (3, 3, 3)),
        ("lm_resnet32", 0.47, (5, 5, 5)),
        ("lm_resnet44", 0.66, (7, 7, 7)),
        ("lm_resnet56", 0.86, (9, 9, 9)),
        ("lm_resnet110", 1.73, (18, 18, 18)),
        ("lm_resnet164", 1.70, (18, 18, 18)),
        ("lm_resnext29_8x64d", 34.4, (3, 3, 3)),
    ],
)
def test_cifar_parameter_counts(name, millions, depths):
    plain = count(build_on_meta(name, lm=False))
    assert plain / 1e6 == pytest.approx(millions, abs=0.01 * millions)  # the papers' reported sizes
    assert count(build_on_meta(name)) == plain + sum(depths) - len(depths)
    assert [len(s) for s in build_on_meta(name).lm_stages()] == list(depths)


def test_k_only_in_blocks_after_a_stages_first():
    model = build_on_meta("lm_resnet50")
    for stage in model.lm_stages():
        assert isinstance(stage, LMStage) and stage.is_lm_stage
        assert type(stage[0].step) is ResidualStep and stage[0].downsample is not None
        assert all(isinstance(block.step, LMStep) and block.step.relu for block in stage[1:])
    plain = build_on_meta("lm_resnet50", lm=False)
    assert not any(isinstance(m, LMStep) for m in plain.modules())
    assert [n for n, _ in model.named_parameters() if n.endswith(".k")] == lm_coefficient_keys(model)
    assert lm_coefficient_keys(model)[0] == "layer1.1.step.k"


def test_torchvision_names():
    names = set(create_model("lm_resnext50_32x4d", lm=False).state_dict())
    assert {"conv1.weight", "bn1.running_var", "fc.weight", "fc.bias"} <= names
    assert {"layer1.0.downsample.0.weight", "layer1.0.downsample.1.num_batches_tracked"} <= names
    assert {f"layer4.2.{m}.weight" for m in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")} <= names
    assert all(
        n.split(".")[0] in {"conv1", "bn1", "fc", "layer1", "layer2", "layer3", "layer4"} for n in names
    )


def test_stochastic_depth_schedule_rises_linearly():
    model = create_model("lm_resnet56", survival_prob=0.5, sd_mode="batch", noise_std=0.1)
    steps = [block.step for block in blocks(model)]
    assert [s.survival_prob for s in steps] == pytest.approx(linear_survival_schedule(27, 0.5))
    assert all(s.mode == "batch" and s.noise_std == 0.1 and not s.relu for s in steps)


def test_batch_mode_model_skips_dropped_branches():
    model = create_model("lm_resnet20", survival_prob=0.3, sd_mode="batch").train()
    calls = []
    for block in blocks(model):
        block.conv2.register_forward_hook(lambda *_: calls.append(1))
    x = images(2, 32)
    for _ in range(3):
        model(x)
    assert len(calls) < 3 * 9
    model.eval()
    calls.clear()
    model(x)
    assert len(calls) == 9


def test_options_are_validated():
    for kwargs, argument in [
        (dict(survival_prob=0.0), "survival_prob"),
        (dict(sd_mode="layer"), "sd_mode"),
        (dict(noise_std=-1.0), "noise_std"),
        (dict(k_init=(1.0, 0.0)), "k_init"),
        (dict(drop_rate=1.0), "drop_rate"),
    ]:
        with pytest.raises(ValueError, match=argument):
            create_model("lm_resnet20", **kwargs)
    for kwargs, argument in [(dict(lm=1), "lm"), (dict(per_channel_k="yes"), "per_channel_k")]:
        with pytest.raises(TypeError, match=f"^{argument}: expected a bool"):
            create_model("lm_resnet20", **kwargs)
    with pytest.raises(TypeError):
        create_model("lm_resnet20", no_such_option=1)


def test_k_init_and_zero_init_residual():
    model = create_model("lm_resnet20", k_init=0.0, zero_init_residual=True, per_channel_k=True)
    assert all(torch.equal(m.k, torch.zeros_like(m.k)) for m in model.modules() if isinstance(m, LMStep))
    assert all(torch.equal(b.bn2.weight, torch.zeros(b.bn2.num_features)) for b in blocks(model))
    model = create_model("lm_resnet50", zero_init_residual=True)
    assert all(not b.bn3.weight.any() for b in blocks(model))


# ----------------------------------------------------------------------------------------------------------
# Loading plain weights
# ----------------------------------------------------------------------------------------------------------


def test_plain_weights_load_into_the_lm_model_with_only_k_missing():
    torch.manual_seed(0)
    plain = create_model("lm_resnet20", lm=False).eval()
    lm = create_model("lm_resnet20", k_init=0.0).eval()
    missing = load_pretrained_state_dict(lm, plain.state_dict())
    assert missing == lm_coefficient_keys(lm) and len(missing) == 6
    x = images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(lm(x), plain(x), rtol=0, atol=1e-6)  # k = 0: the same network


def test_imagenet_plain_weights_load():
    plain, lm = build_on_meta("lm_resnext50_32x4d", lm=False), build_on_meta("lm_resnext50_32x4d")
    missing = load_pretrained_state_dict(lm, plain.state_dict())
    assert missing == lm_coefficient_keys(lm) and len(missing) == 12


def test_loading_rejects_unexpected_mismatched_and_missing_keys():
    lm = create_model("lm_resnet20")
    state = create_model("lm_resnet20", lm=False).state_dict()
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        load_pretrained_state_dict(lm, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="fc.weight"):
        load_pretrained_state_dict(lm, create_model("lm_resnet20", lm=False, num_classes=100).state_dict())
    with pytest.raises(ValueError, match="missing keys.*conv1.weight"):
        load_pretrained_state_dict(lm, {k: v for k, v in state.items() if k != "conv1.weight"})
    assert load_pretrained_state_dict(lm, create_model("lm_resnet20").state_dict()) == []


# ----------------------------------------------------------------------------------------------------------
# Memory formats and precision
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size", [("lm_resnet20", 32), ("lm_resnext50_32x4d", 64)])
def test_channels_last(name, size):
    torch.manual_seed(0)
    model = create_model(name, per_channel_k=True).eval()
    x = images(2, size)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        features = model.forward_features(x.to(memory_format=torch.channels_last))
        assert features.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model.forward_head(features), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, size", [("lm_resnet20", 32), ("lm_resnet50", 64)])
def test_bf16_autocast(name, size):
    torch.manual_seed(0)
    model = create_model(name, survival_prob=0.9).train()
    x = images(2, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(m.k.grad is not None for m in model.modules() if isinstance(m, LMStep))
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).float()
    with torch.no_grad():
        high = model(x)
    assert (low - high).abs().max() <= 0.1 * high.abs().max() + 0.1


def test_autocast_with_an_fp32_shortcut():
    """A float32 input state with a bf16 branch (autocast) must not trip lm_step's dtype check."""
    model = create_model("lm_resnet20").eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.layer1(x)  # fp32 stage input, bf16 convs
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------


def test_timm_entrypoint_adapts_timm_arguments():
    entrypoint = _timm_entrypoint("lm_resnet20", zoo.lm_resnet20)
    assert entrypoint.__name__ == "lm_resnet20"
    model = entrypoint(
        pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, drop_path_rate=0.2
    )
    assert model.survival_prob == pytest.approx(0.8)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.pretrained_cfg["num_classes"] == 10
    with pytest.raises(ValueError, match="pretrained"):
        entrypoint(pretrained=True)


# The keys of every timm ResNet's pretrained_cfg (timm 1.0: the 169 resnet configs, untrained ones included),
# and those most of them add.
TIMM_RESNET_CFG_KEYS = {
    "url", "architecture", "tag", "custom_load", "input_size", "fixed_input_size", "interpolation",
    "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier", "license",
    "test_input_size", "test_crop_pct", "origin_url", "paper_ids",
}  # fmt: skip


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_default_cfg_is_true_for_every_model(name):
    """Every model carries a default_cfg (alias pretrained_cfg) with timm's ResNet keys, whose values hold:
    the final map at input_size is pool_size (and other sizes run), the named first conv and classifier
    exist, the normalisation and crop are those of lmfused.train's data pipeline."""
    from lmfused.train.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
    from lmfused.train.images import VAL_RESIZE_FRACTION

    model = create_model(name, device="meta").eval()
    cfg = model.default_cfg
    assert model.pretrained_cfg is cfg and cfg == DEFAULT_CFGS[name] and cfg is not DEFAULT_CFGS[name]
    assert TIMM_RESNET_CFG_KEYS <= set(cfg)
    assert cfg["architecture"] == name and cfg["url"] == "" and cfg["tag"] == "untrained"
    assert cfg["input_size"][0] == model.in_chans and cfg["num_classes"] == model.num_classes
    for size in (cfg["input_size"][1], 2 * cfg["input_size"][1] + 1):
        features = model.forward_features(torch.empty(1, model.in_chans, size, size, device="meta"))
        assert features.shape[1] == model.num_features
        if size == cfg["input_size"][1]:
            assert tuple(features.shape[2:]) == cfg["pool_size"]
    assert not cfg["fixed_input_size"] and cfg["test_input_size"] == cfg["input_size"]
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    cifar = name in CIFAR
    assert (cfg["mean"], cfg["std"]) == ((CIFAR_MEAN, CIFAR_STD) if cifar else (IMAGENET_MEAN, IMAGENET_STD))
    assert cfg["crop_pct"] == cfg["test_crop_pct"] == (1.0 if cifar else VAL_RESIZE_FRACTION)
    assert cfg["crop_mode"] == "center" and cfg["paper_ids"] == "arXiv:1710.10121"


def test_default_cfg_has_timm_resnet_keys():
    timm = import_or_skip("timm")
    for resnet in ("resnet50", "resnext50_32x4d", "resnet200"):  # resnet200's cfg: no weights, as ours
        theirs = set(timm.create_model(resnet, device="meta").default_cfg)
        assert theirs - {"hf_hub_id"} <= TIMM_RESNET_CFG_KEYS  # no hub weights here
    assert TIMM_RESNET_CFG_KEYS <= set(timm.create_model("lm_resnet50", device="meta").default_cfg)


def test_factory_device_and_dtype():
    """timm's factory arguments: built on the device (nothing elsewhere), parameters and buffers in dtype."""
    model = create_model("lm_resnet50", device="meta", dtype=torch.float64)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert {t.device.type for t in tensors.values()} == {"meta"}
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float64}
    assert model.layer1[0].step.zero_k.device.type == "meta"  # a non-persistent buffer too
    model = zoo.lm_resnet20(dtype=torch.float64, device="cpu").eval()  # the builders take them too
    with torch.no_grad():
        assert model(images(1, 8).double()).dtype == torch.float64
    for dtype in (torch.int32, "float32"):
        with pytest.raises(TypeError, match="dtype"):
            create_model("lm_resnet20", dtype=dtype)


def test_timm_create_model_takes_timm_arguments():
    timm = import_or_skip("timm")
    model = timm.create_model("lm_resnet50", device="meta", dtype=torch.float32, num_classes=0)
    assert next(model.parameters()).device.type == "meta" and model.num_classes == 0
    overlay = dict(input_size=(3, 256, 256), num_classes=5, crop_pct=0.95)
    model = timm.create_model("lm_resnet20", pretrained_cfg_overlay=overlay)
    assert model.num_classes == 5  # timm takes num_classes from the cfg, as for its own models
    config = timm.data.resolve_data_config(model=model)
    assert (config["input_size"], config["crop_pct"]) == ((3, 256, 256), 0.95)
    assert config["mean"] == model.pretrained_cfg["mean"] == (0.4914, 0.4822, 0.4465)
    own = dict(model.pretrained_cfg, input_size=(3, 64, 64))
    assert timm.create_model("lm_resnet20", pretrained_cfg=own).pretrained_cfg["input_size"] == (3, 64, 64)
    assert timm.create_model("lm_resnet20.untrained").pretrained_cfg["tag"] == "untrained"
    with pytest.raises(ValueError, match="pretrained_cfg"):
        timm.create_model("lm_resnet20.in1k")
    with pytest.raises(TypeError):
        timm.create_model("lm_resnet20", not_a_model_argument=1)
    features = timm.create_model("lm_resnet20", features_only=True, drop_path_rate=0.1)
    assert features.feature_info.channels() == [16, 16, 32, 64]  # every map by default
    cfg = features.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and "classifier" not in cfg  # timm's cfg of features models


def test_global_pool_none_leaves_the_map():
    """timm's global_pool="": forward gives the final map, or with a classifier the logits of every position;
    reset_classifier keeps the pooling and puts the new head on the model's device, dtype and mode."""
    torch.manual_seed(0)
    model = create_model("lm_resnet20", num_classes=0, global_pool="").eval()
    x = images(2, 16)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model(x), features, rtol=0, atol=0)
        assert model.head_hidden_size == model.num_features == features.shape[1]
        model.reset_classifier(3)
        assert model.global_pool == ""
        expected = torch.einsum("nchw,kc->nkhw", features, model.fc.weight) + model.fc.bias[:, None, None]
        torch.testing.assert_close(model(x), expected)
    model.double()
    model.reset_classifier(4, "avg")
    assert model.fc.weight.dtype == torch.float64 and not model.fc.training
    with torch.no_grad():
        assert model(x.double()).shape == (2, 4)


def test_timm_registration():
    timm = import_or_skip("timm")
    register_with_timm()  # idempotent: names already known are left alone
    assert "lm_resnext50_32x4d" in timm.list_models("lm_*")
    model = timm.create_model("lm_resnext50_32x4d", num_classes=10)
    assert isinstance(model, zoo.LMResNet) and model.num_classes == 10
    plain = timm.create_model("resnext50_32x4d")
    assert load_pretrained_state_dict(create_model("lm_resnext50_32x4d"), plain.state_dict()) == (
        lm_coefficient_keys(model)
    )


def test_torchvision_state_dict_loads():
    models = import_or_skip("torchvision.models")
    for tv, name in ((models.resnet50, "lm_resnet50"), (models.resnext50_32x4d, "lm_resnext50_32x4d")):
        reference = tv()
        plain = create_model(name, lm=False)
        own = plain.state_dict()
        assert {k: v.shape for k, v in reference.state_dict().items()} == {k: v.shape for k, v in own.items()}
        lm = create_model(name)
        assert load_pretrained_state_dict(lm, reference.state_dict()) == lm_coefficient_keys(lm)


# ----------------------------------------------------------------------------------------------------------
# timm's model API: global_pool, forward_intermediates, features_only, set_grad_checkpointing
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax"])
def test_global_pool(pool):
    torch.manual_seed(0)
    model = create_model("lm_resnet20", global_pool=pool).eval()
    x = images(2, 16)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        mean, high = features.mean((2, 3)), features.amax((2, 3))
        both = torch.cat((mean, high), 1)
        expected = {"avg": mean, "max": high, "avgmax": (mean + high) / 2, "catavgmax": both}
        torch.testing.assert_close(pooled, expected[pool])
        assert model(x).shape == (2, 10) and model.fc.in_features == pooled.shape[1] == model.head_hidden_size


def test_global_pool_and_classifier_errors_name_the_argument():
    with pytest.raises(ValueError, match="global_pool"):
        create_model("lm_resnet20", global_pool="sum")
    model = create_model("lm_resnet20")
    model.reset_classifier(5, "catavgmax")
    assert model.fc.in_features == 128 and model(images(1, 16)).shape == (1, 5)
    model.reset_classifier(0)
    assert model(images(1, 16)).shape == (1, 128)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


@pytest.mark.parametrize("name, size, channels, reductions", [
    ("lm_resnet20", 16, [16, 16, 32, 64], [1, 1, 2, 4]),
    ("lm_resnet50", 64, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
])  # fmt: skip
def test_forward_intermediates(name, size, channels, reductions):
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert [i["num_chs"] for i in model.feature_info] == channels
    assert [i["reduction"] for i in model.feature_info] == reductions
    x = images(1, size)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [m.shape[1] for m in maps] == channels
        assert [size // m.shape[-1] for m in maps] == reductions
        torch.testing.assert_close(final, model.forward_features(x))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last_two] == channels[-2:]
        torch.testing.assert_close(last_two[-1], maps[-1])
        early, firsts = model.forward_intermediates(x, indices=[0, 1 - len(channels)], stop_early=True)
        assert [m.shape[1] for m in firsts] == channels[:2]  # a negative index counts from the end
        torch.testing.assert_close(early, maps[1])
    for bad in (0, len(channels) + 1, [len(channels)], [], ["1"]):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_cifar_intermediates_norm_applies_the_closing_bn_relu():
    model = create_model("lm_resnet20").eval()
    x = images(1, 16)
    with torch.no_grad():
        raw = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(normed, model.forward_features(x))
        assert not torch.equal(raw, normed)


def test_prune_intermediate_layers():
    model = create_model("lm_resnet50").eval()
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    assert len(model.layer3) == len(model.layer4) == 0 and model.num_classes == 0
    assert model.num_features == 512
    with torch.no_grad():
        assert model(images(1, 64)).shape == (1, 512)


def test_zoo_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_model("lm_resnet20", survival_prob=0.8, noise_std=0.05).train()
    x = images(4, 16)

    def grads():
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(1)
    expected = grads()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and all(stage.grad_checkpointing for stage in model.lm_stages())
    torch.manual_seed(1)
    got = grads()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    model.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in model.lm_stages())
    with pytest.raises(ValueError, match="batch-mode"):
        create_model("lm_resnet20", survival_prob=0.8, sd_mode="batch").set_grad_checkpointing(True)
    assert model.group_matcher()["blocks"] == r"^layer(\d+)\.(\d+)"


def test_timm_entrypoint_global_pool_and_refusals():
    entrypoint = _timm_entrypoint("lm_resnet20", zoo.lm_resnet20)
    model = entrypoint(global_pool="max", drop_block_rate=0.0)
    assert model.global_pool == "max"
    with pytest.raises(ValueError, match="drop_block_rate"):
        entrypoint(drop_block_rate=0.1)
    with pytest.raises(ValueError, match="output_stride"):
        entrypoint(output_stride=2)
    assert entrypoint(output_stride=4).feature_info[-1]["reduction"] == 4


def test_timm_features_only_and_training_api():
    timm = import_or_skip("timm")
    features = timm.create_model("lm_resnet50", features_only=True, out_indices=(1, 2, 3, 4))
    assert features.feature_info.channels() == [256, 512, 1024, 2048]
    maps = features(images(1, 64))
    assert [m.shape[1] for m in maps] == [256, 512, 1024, 2048] and maps[-1].shape[-1] == 2
    model = timm.create_model("lm_resnet20", global_pool="avgmax", drop_path_rate=0.1, num_classes=3)
    model.set_grad_checkpointing(enable=True)  # what timm's train.py does with --grad-checkpointing
    model.train()(images(2, 16)).sum().backward()
    assert all(m.k.grad is not None for m in model.modules() if isinstance(m, LMStep))


def test_survival_schedule_is_huang_et_al_not_the_authors_code():
    """Ours can drop the first block; the LM-ResNet authors' code never does (their d_l = l / (L-1) (1 - p_L),
    l = 0..L-1). The docstring must not claim ours is theirs."""
    from lmfused.nn import step

    ours = linear_survival_schedule(9, 0.5)
    authors = [1.0 - index / 8 * 0.5 for index in range(9)]
    assert ours[0] == pytest.approx(1 - 0.5 / 9) and authors[0] == 1.0 and ours[-1] == authors[-1] == 0.5
    doc = " ".join(step.linear_survival_schedule.__doc__.split())
    assert "never dropped" in doc and "not theirs" in doc
