"""What the CIFAR and ImageNet model families share: stage building, initialisation, the classifier head,
and loading plain ResNet/ResNeXt weights into an LM model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmfused.nn import LMStage, LMStep, ResidualStep, linear_survival_schedule, make_step
from lmfused.nn.step import DEFAULT_K_INIT, check_k_init, check_mode, check_noise_std, check_survival_prob

__all__ = ["LMNet", "load_pretrained_state_dict", "lm_coefficient_keys"]

# (in_channels, stage index, block index in stage, stride, step) -> block
BlockFactory = Callable[[int, int, int, int, ResidualStep], nn.Module]


class LMNet(nn.Module):
    """Base of the LM model families: configuration, stages of two-state blocks, and a linear head.

    Subclasses build a stem, call :meth:`_make_stages`, and define :meth:`forward_features`.

    Args:
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input channels.
        lm: True for the LM architecture (Lu et al., ICML 2018: an LMStep with learnable k in every block
            after a stage's first), False for the plain ResNet/ResNeXt from the same code (no k).
        survival_prob: survival probability p_L of the last block; block l of L keeps its branch with
            p_l = 1 - l / L (1 - p_L) (linear decay rule of stochastic depth). 1.0: no stochastic depth.
        sd_mode: stochastic depth per "sample" (fused mask) or per "batch" (dropped branch skipped); see
            :mod:`lmfused.nn.step`.
        noise_std: standard deviation of the noise injected in each update in training (section 3.1).
        per_channel_k: one k per channel instead of one per block.
        k_init: U(low, high) bounds of k's initialisation (paper: (-0.1, 0)), or a constant.
        backend: the lm_step backend (None: automatic).
        zero_init_residual: zero each block's last BatchNorm weight, so every branch starts at f = 0.
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_chans: int = 3,
        lm: bool = True,
        survival_prob: float = 1.0,
        sd_mode: str = "sample",
        noise_std: float = 0.0,
        per_channel_k: bool = False,
        k_init: float | tuple[float, float] = DEFAULT_K_INIT,
        backend: str | None = None,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("lm", lm), ("per_channel_k", per_channel_k)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        check_k_init(k_init)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate: expected a probability in [0, 1), got {drop_rate!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.lm = lm
        self.survival_prob = check_survival_prob(survival_prob)
        self.drop_rate = float(drop_rate)
        self.zero_init_residual = zero_init_residual
        self._step_config = dict(
            per_channel_k=per_channel_k,
            k_init=k_init,
            mode=check_mode(sd_mode, "sd_mode"),
            noise_std=check_noise_std(noise_std),
            backend=backend,
        )

    def _make_stages(
        self,
        depths: Sequence[int],
        out_channels: Sequence[int],
        in_channels: int,
        block: BlockFactory,
        *,
        relu: bool,
    ) -> None:
        """Register stages layer1, layer2, ... of ``depths[i]`` blocks; stride 2 at each later stage's start.

        Survival probabilities follow :func:`linear_survival_schedule` over all blocks; a stage's first block
        takes the plain ResNet step, the others an LMStep when ``self.lm``.
        """
        survival = iter(linear_survival_schedule(sum(depths), self.survival_prob))
        for stage, (depth, channels) in enumerate(zip(depths, out_channels, strict=True)):
            blocks = []
            for index in range(depth):
                step = make_step(
                    lm=self.lm and index > 0,
                    channels=channels,
                    survival_prob=next(survival),
                    relu=relu,
                    **self._step_config,
                )
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(in_channels, stage, index, stride, step))
                in_channels = channels
            self.add_module(f"layer{stage + 1}", LMStage(*blocks))
        self.num_features = in_channels
        self.fc = nn.Linear(in_channels, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        """He (fan-out) initialisation of convs, BatchNorm at (1, 0); LMStep keeps its k_init draw."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.zero_init_residual:
            for m in self.modules():
                if getattr(m, "is_lm_block", False):
                    m.zero_init_last()

    def lm_stages(self) -> list[LMStage]:
        """The model's stages (layer1, layer2, ...), in order."""
        return [m for m in self.children() if getattr(m, "is_lm_stage", False)]

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and stages: the final feature map (N, num_features, H, W)."""
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling, dropout and the classifier (skipped with ``pre_logits``)."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) of the images x (N, in_chans, H, W)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm API)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none; timm API)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def lm_coefficient_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of the LM coefficients k in ``model`` (one per :class:`~lmfused.nn.LMStep`)."""
    return [f"{name}.k" if name else "k" for name, m in model.named_modules() if isinstance(m, LMStep)]


def load_pretrained_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load a plain ResNet/ResNeXt state_dict (torchvision, timm or ``lm=False``) into an LM model.

    Checks everything before loading anything: every key of ``state_dict`` must exist in ``model`` with the
    same shape, and only LM coefficients k may be missing (they keep their initialisation; build the model
    with ``k_init=0.0`` to start from exactly the pretrained network).

    Returns:
        The missing keys, all of them k keys, in model order.

    Raises:
        ValueError: on unexpected keys, shape mismatches, or missing keys other than k.
    """
    own = model.state_dict()
    unexpected = [key for key in state_dict if key not in own]
    if unexpected:
        raise ValueError(f"state_dict: unexpected keys {unexpected}")
    mismatched = [
        f"{key}: {tuple(value.shape)} given, {tuple(own[key].shape)} expected"
        for key, value in state_dict.items()
        if tuple(value.shape) != tuple(own[key].shape)
    ]
    if mismatched:
        raise ValueError(f"state_dict: shape mismatches: {'; '.join(mismatched)}")
    k_keys = set(lm_coefficient_keys(model))
    missing = [key for key in own if key not in state_dict]
    not_k = [key for key in missing if key not in k_keys]
    if not_k:
        raise ValueError(f"state_dict: missing keys other than the LM coefficients k: {not_k}")
    model.load_state_dict(state_dict, strict=False)
    return missing
