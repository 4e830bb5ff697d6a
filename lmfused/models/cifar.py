"""CIFAR LM-ResNet / LM-ResNeXt: pre-activation networks of three stages (Lu et al., ICML 2018, section 2.2).

Depth 6n + 2 with basic blocks (LM-ResNet20..110), 9n + 2 with bottlenecks (LM-ResNet164; LM-ResNeXt29 with
grouped 3x3 convs, widths of Xie et al., 2017). Stage i (i = 0, 1, 2) halves the resolution at its start
(except i = 0); the first block of each stage takes the plain ResNet step, the others the LM step.

Against the authors' code (2prime/LM-ResNet, MResNet.py), these networks compute the same function to float32
round-off but for three documented choices: (1) the projection shortcut is a 1x1 conv of the block's own
pre-activated input relu(bn1(u)), sharing bn1 with the branch, where theirs has its own BatchNorm-ReLU-conv;
(2) stochastic depth follows :func:`~lmfused.nn.linear_survival_schedule` (Huang et al.: the first block can
be dropped too), where theirs never drops the first block; (3) noise injection is Gaussian, drawn inside the
fused update of every block, where theirs is uniform, U(0, noise_level), added after whole blocks. Their
coefficient multiplies u_n (theirs is 1 - k in eq. 5's notation, drawn from U(1, 1.1)); ours is the paper's k.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lmfused.models.common import LMNet, zoo_cfg
from lmfused.models.registry import register_model
from lmfused.nn import PreActBlock, ResidualStep
from lmfused.nn.blocks import conv3x3, norm_relu

__all__ = ["LMCifarResNet"]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# 32 x 32 images, no resize at evaluation; the final map is 8 x 8 (reduction 4). Four feature maps: the
# stem's and the three stages'.
register_cifar_model = functools.partial(
    register_model,
    default_cfg=zoo_cfg(
        input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0, mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10
    ),
    feature_cfg=dict(out_indices=(0, 1, 2, 3)),
)


class LMCifarResNet(LMNet):
    """Pre-activation CIFAR ResNet/ResNeXt with LM updates: conv3x3 stem, stages, bn-relu, pool, fc.

    Args:
        depths: blocks per stage.
        channels: output channels of each stage.
        bottleneck: bottleneck blocks (1x1, 3x3, 1x1) instead of basic ones (3x3, 3x3).
        widths: inner (3x3) widths of the bottlenecks, per stage (bottleneck only).
        groups: groups of the bottleneck 3x3 conv (the ResNeXt cardinality).
        stem_channels: output channels of the stem conv.
        num_classes: classifier outputs (10 for CIFAR-10).
        **kwargs: the common options of :class:`~lmfused.models.common.LMNet` (``lm``, ``survival_prob``,
            ``sd_mode``, ``noise_std``, ``per_channel_k``, ``k_init``, ``backend``, ...).
    """

    def __init__(
        self,
        depths: Sequence[int],
        channels: Sequence[int],
        *,
        bottleneck: bool = False,
        widths: Sequence[int] | None = None,
        groups: int = 1,
        stem_channels: int = 16,
        num_classes: int = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        if bottleneck and (widths is None or len(widths) != len(channels)):
            raise ValueError("widths: bottleneck networks need one inner width per stage")
        if not bottleneck and groups != 1:
            raise ValueError("groups: basic blocks have no grouped convolution; use bottleneck=True")

        def block(in_channels: int, stage: int, index: int, stride: int, step: ResidualStep) -> PreActBlock:
            if bottleneck:
                return PreActBlock.bottleneck(
                    in_channels, widths[stage], channels[stage], stride, groups, step
                )
            return PreActBlock.basic(in_channels, channels[stage], stride, step)

        self.conv1 = conv3x3(self.in_chans, stem_channels)
        self._make_stages(depths, channels, stem_channels, block, relu=False)
        self.bn_final = nn.BatchNorm2d(channels[-1])
        self.feature_info = [dict(num_chs=stem_channels, reduction=1, module="conv1")] + [
            dict(num_chs=c, reduction=2**i, module=f"layer{i + 1}") for i, c in enumerate(channels)
        ]
        self._init_weights()

    def forward_stem(self, x: Tensor) -> Tensor:
        """The 3x3 stem conv (pre-activation: no norm or activation after it)."""
        return self.conv1(x)

    def forward_final_norm(self, x: Tensor) -> Tensor:
        """The pre-activation network's closing BatchNorm and ReLU (none once pruned)."""
        return norm_relu(self.bn_final, x, self._step_config["backend"]) if self.bn_final is not None else x

    def _prune_final_norm(self) -> None:
        self.bn_final = None

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.forward_stem(x)
        for stage in self.lm_stages():
            x = stage(x)
        return self.forward_final_norm(x)


def _cifar_resnet(depth: int, **kwargs: Any) -> LMCifarResNet:
    """Basic-block CIFAR ResNet of ``depth`` = 6n + 2 layers, stage widths 16, 32, 64 (He et al., 2016)."""
    n = (depth - 2) // 6
    return LMCifarResNet((n, n, n), (16, 32, 64), **kwargs)


@register_cifar_model
def lm_resnet20(**kwargs: Any) -> LMCifarResNet:
    """LM-ResNet20 for CIFAR (pre-activation, 3 x 3 basic blocks)."""
    return _cifar_resnet(20, **kwargs)


@register_cifar_model
def lm_resnet32(**kwargs: Any) -> LMCifarResNet:
    """LM-ResNet32 for CIFAR (pre-activation, 3 x 5 basic blocks)."""
    return _cifar_resnet(32, **kwargs)


@register_cifar_model
def lm_resnet44(**kwargs: Any) -> LMCifarResNet:
    """LM-ResNet44 for CIFAR (pre-activation, 3 x 7 basic blocks)."""
    return _cifar_resnet(44, **kwargs)


@register_cifar_model
def lm_resnet56(**kwargs: Any) -> LMCifarResNet:
    """LM-ResNet56 for CIFAR (pre-activation, 3 x 9 basic blocks)."""
    return _cifar_resnet(56, **kwargs)


@register_cifar_model
def lm_resnet110(**kwargs: Any) -> LMCifarResNet:
    """LM-ResNet110 for CIFAR (pre-activation, 3 x 18 basic blocks)."""
    return _cifar_resnet(110, **kwargs)


@register_cifar_model
def lm_resnet164(**kwargs: Any) -> LMCifarResNet:
    """LM-ResNet164 for CIFAR (pre-activation, 3 x 18 bottlenecks, widths 16/32/64, outputs 64/128/256)."""
    return LMCifarResNet((18, 18, 18), (64, 128, 256), bottleneck=True, widths=(16, 32, 64), **kwargs)


@register_cifar_model
def lm_resnext29_8x64d(**kwargs: Any) -> LMCifarResNet:
    """LM-ResNeXt29 (8x64d) for CIFAR: 3 x 3 bottlenecks of cardinality 8, inner widths 512/1024/2048,
    outputs 256/512/1024, 64-channel stem (Xie et al., 2017), pre-activation."""
    return LMCifarResNet(
        (3, 3, 3),
        (256, 512, 1024),
        bottleneck=True,
        widths=(512, 1024, 2048),
        groups=8,
        stem_channels=64,
        **kwargs,
    )
