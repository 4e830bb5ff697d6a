"""ImageNet LM-ResNet / LM-ResNeXt (Lu et al., ICML 2018, section 2.2), torchvision-compatible.

ResNet/ResNeXt v1.5 (torchvision's: stride on the 3x3 conv of the bottleneck), post-activation, with the
final ReLU of every block fused into the update. Parameter and buffer names and shapes are torchvision's
(conv1, bn1, layer1..layer4 with i.conv1/bn1/conv2/bn2/conv3/bn3/downsample.0/downsample.1, fc), which timm's
ResNets share: their state_dicts load with only the k parameters new
(:func:`~lmfused.models.load_pretrained_state_dict`). With ``lm=False`` the models are exactly torchvision's
(resnet50: 25,557,032 parameters; resnext50_32x4d: 25,028,904).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch.fx
from torch import Tensor, nn

from lmfused.models.common import LMNet, zoo_cfg
from lmfused.models.registry import register_model
from lmfused.nn import MaxPool2d, PostActBlock, ResidualStep
from lmfused.nn.blocks import norm_relu
from lmfused.nn.step import has_hooks

__all__ = ["LMResNet"]

EXPANSION = 4  # bottleneck output channels / planes
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# 224 x 224 crops of images resized to 256 at evaluation (crop_pct 0.875, torchvision's and timm's ResNet
# convention); the final map is 7 x 7 (reduction 32). Five feature maps: the stem's and the four stages'.
register_imagenet_model = functools.partial(
    register_model,
    default_cfg=zoo_cfg(
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=1000,
    ),
    feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
)


class LMResNet(LMNet):
    """ImageNet ResNet/ResNeXt with LM updates: 7x7 stem, max pool, four bottleneck stages, pool, fc.

    Args:
        layers: bottlenecks per stage (ResNet-50: (3, 4, 6, 3)).
        groups: cardinality of the 3x3 convs (ResNeXt: 32).
        width_per_group: channels per group of the 3x3 convs at the first stage (ResNeXt 32x4d: 4).
        num_classes: classifier outputs.
        **kwargs: the common options of :class:`~lmfused.models.common.LMNet` (``lm``, ``survival_prob``,
            ``sd_mode``, ``noise_std``, ``per_channel_k``, ``k_init``, ``backend``, ``zero_init_residual``,
            ...).
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        groups: int = 1,
        width_per_group: int = 64,
        num_classes: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        planes = [64 * 2**i for i in range(len(layers))]

        def block(in_channels: int, stage: int, index: int, stride: int, step: ResidualStep) -> PostActBlock:
            return PostActBlock.bottleneck(
                in_channels, planes[stage], stride, groups, width_per_group, step, expansion=EXPANSION
            )

        self.conv1 = nn.Conv2d(self.in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = MaxPool2d(kernel_size=3, stride=2, padding=1)  # keeps no indices for its backward
        self._make_stages(layers, [p * EXPANSION for p in planes], 64, block, relu=True)
        self.feature_info = [dict(num_chs=64, reduction=2, module="relu")] + [
            dict(num_chs=p * EXPANSION, reduction=4 * 2**i, module=f"layer{i + 1}")
            for i, p in enumerate(planes)
        ]
        self._init_weights()

    def forward_stem(self, x: Tensor) -> Tensor:
        """7x7 conv, BatchNorm, ReLU (feature_info[0], before the max pool); the BatchNorm and ReLU as one
        fused op where the blocks fuse theirs (:func:`lmfused.nn.blocks.norm_relu`)."""
        x = self.conv1(x)
        # Replaced or hooked: called as given. Under torch.fx too, so that the graph has the node that
        # feature_info[0] names ("relu"), for FX feature extraction.
        if type(self.relu) is not nn.ReLU or has_hooks(self.relu) or isinstance(x, torch.fx.Proxy):
            return self.relu(self.bn1(x))
        return norm_relu(self.bn1, x, self._step_config["backend"])

    def forward_pre_stages(self, x: Tensor) -> Tensor:
        """The 3x3 max pool between the stem's map and the first stage."""
        return self.maxpool(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.forward_stem(x))
        for stage in self.lm_stages():
            x = stage(x)
        return x


def _build(layers: Sequence[int], kwargs: dict[str, Any], groups: int = 1, width_per_group: int = 64):
    return LMResNet(layers, groups=groups, width_per_group=width_per_group, **kwargs)


@register_imagenet_model
def lm_resnet50(**kwargs: Any) -> LMResNet:
    """LM-ResNet50 (torchvision resnet50 layout, bottlenecks (3, 4, 6, 3))."""
    return _build((3, 4, 6, 3), kwargs)


@register_imagenet_model
def lm_resnet101(**kwargs: Any) -> LMResNet:
    """LM-ResNet101 (torchvision resnet101 layout, bottlenecks (3, 4, 23, 3))."""
    return _build((3, 4, 23, 3), kwargs)


@register_imagenet_model
def lm_resnet152(**kwargs: Any) -> LMResNet:
    """LM-ResNet152 (torchvision resnet152 layout, bottlenecks (3, 8, 36, 3))."""
    return _build((3, 8, 36, 3), kwargs)


@register_imagenet_model
def lm_resnext50_32x4d(**kwargs: Any) -> LMResNet:
    """LM-ResNeXt50 32x4d (torchvision resnext50_32x4d layout)."""
    return _build((3, 4, 6, 3), kwargs, groups=32, width_per_group=4)


@register_imagenet_model
def lm_resnext101_32x4d(**kwargs: Any) -> LMResNet:
    """LM-ResNeXt101 32x4d (timm resnext101_32x4d layout)."""
    return _build((3, 4, 23, 3), kwargs, groups=32, width_per_group=4)


@register_imagenet_model
def lm_resnext101_32x8d(**kwargs: Any) -> LMResNet:
    """LM-ResNeXt101 32x8d (torchvision resnext101_32x8d layout)."""
    return _build((3, 4, 23, 3), kwargs, groups=32, width_per_group=8)
