"""What the CIFAR and ImageNet model families share: stage building, initialisation, the classifier head,
and loading plain ResNet/ResNeXt weights into an LM model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmfused.nn import LMStage, LMStep, ResidualStep, linear_survival_schedule, make_step
from lmfused.nn.blocks import set_grad_checkpointing as _set_stage_checkpointing
from lmfused.nn.step import (
    DEFAULT_K_INIT,
    check_bool,
    check_k_init,
    check_mode,
    check_noise_std,
    check_survival_prob,
)

__all__ = ["GLOBAL_POOLS", "LMNet", "load_pretrained_state_dict", "lm_coefficient_keys", "zoo_cfg"]

# timm's names: average, max, their mean, their concatenation (doubles the classifier's input), and "" for
# none (the unpooled map; a classifier then classifies every position).
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax", "")


def zoo_cfg(
    *,
    input_size: tuple[int, int, int],
    pool_size: tuple[int, int],
    crop_pct: float,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    num_classes: int,
) -> dict[str, Any]:
    """A model family's default_cfg: the keys of timm's ResNet ``pretrained_cfg`` (timm's data helpers and
    tests read them), with what is true of the zoo.

    No pretrained weights (``url`` "", ``tag`` "untrained", as timm tags its models without weights); any
    input size (fully convolutional); evaluated at the training size (``test_*`` equal the training values)
    with a bilinear resize and a central crop (``crop_pct``, as :mod:`lmfused.train.images` does);
    ``pool_size`` is the final map at ``input_size``; the stem conv and classifier are ``conv1`` and ``fc``;
    the paper is Lu et al., ICML 2018 (arXiv:1710.10121), its authors' code the origin of the architecture.
    """
    return dict(
        url="",
        tag="untrained",
        custom_load=False,
        input_size=input_size,
        test_input_size=input_size,
        fixed_input_size=False,
        interpolation="bilinear",
        crop_pct=crop_pct,
        test_crop_pct=crop_pct,
        crop_mode="center",
        mean=mean,
        std=std,
        num_classes=num_classes,
        pool_size=pool_size,
        first_conv="conv1",
        classifier="fc",
        license="bsd-3-clause",
        origin_url="https://github.com/2prime/LM-ResNet",
        paper_name="Beyond Finite Layer Neural Networks: Bridging Deep Architectures and Numerical "
        "Differential Equations",
        paper_ids="arXiv:1710.10121",
    )


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
        global_pool: the pooling before the classifier: "avg" (default), "max", "avgmax" (their mean),
            "catavgmax" (their concatenation, doubling the classifier's input), or "" for none, as in timm:
            ``forward`` then returns the final map, or with a classifier the logits of every position
            (N, num_classes, H, W).

    timm's model API is there too: ``forward_features``/``forward_head``, ``forward_intermediates`` (with
    ``feature_info``; ``timm.create_model(..., features_only=True)`` uses both), ``set_grad_checkpointing``,
    ``prune_intermediate_layers``, ``group_matcher``, ``get_classifier``/``reset_classifier``.
    """

    feature_info: list[dict[str, Any]]

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
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        check_bool(lm, "lm")
        check_bool(per_channel_k, "per_channel_k")
        check_k_init(k_init)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate: expected a probability in [0, 1), got {drop_rate!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.lm = lm
        self.survival_prob = check_survival_prob(survival_prob)
        self.drop_rate = float(drop_rate)
        self.global_pool = _check_global_pool(global_pool)
        self.zero_init_residual = zero_init_residual
        self.grad_checkpointing = False
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
        self._make_head()

    def _make_head(self) -> None:
        """The classifier for ``num_classes`` over the pooled features (identity when 0)."""
        self.head_hidden_size = self.num_features * (2 if self.global_pool == "catavgmax" else 1)
        classes = self.num_classes
        self.fc = nn.Linear(self.head_hidden_size, classes) if classes > 0 else nn.Identity()

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

    def forward_stem(self, x: Tensor) -> Tensor:
        """The stem: images (N, in_chans, H, W) to the first stage's input (feature_info[0])."""
        raise NotImplementedError

    def forward_pre_stages(self, x: Tensor) -> Tensor:
        """What runs between the stem's map and the first stage (identity unless the family pools there)."""
        return x

    def forward_final_norm(self, x: Tensor) -> Tensor:
        """What follows the last stage in :meth:`forward_features` (identity unless the family has a norm)."""
        return x

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The feature maps of the stem and of each stage (timm's API; ``feature_info`` describes them).

        Args:
            x: images (N, in_chans, H, W).
            indices: which of the ``len(feature_info)`` maps (0 = stem, i = stage i): None for all, an int n
                for the last n, or a sequence of indices (negative ones count from the end).
            norm: apply the final norm of a pre-activation network (CIFAR models) to the last stage's map.
            stop_early: stop after the last map asked for (then the final features are that map).
            output_fmt: "NCHW" (the only layout offered).
            intermediates_only: return only the list of maps.

        Returns:
            The maps, or ``(final features, maps)``; the final features are what ``forward_features`` gives.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: only 'NCHW' is supported, got {output_fmt!r}")
        take, last = self._take_indices(indices)
        intermediates = []
        x = self.forward_stem(x)
        if 0 in take:
            intermediates.append(x)
        x = self.forward_pre_stages(x)
        stages = self.lm_stages()
        for index, stage in enumerate(stages[:last] if stop_early else stages, start=1):
            x = stage(x)
            if index in take:
                intermediates.append(self.forward_final_norm(x) if norm and index == len(stages) else x)
        if intermediates_only:
            return intermediates
        if not stop_early or last == len(stages):  # every stage ran: the features forward_features gives
            x = self.forward_final_norm(x)
        return x, intermediates

    def _take_indices(self, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
        """timm's feature_take_indices: the sorted indices asked for and the largest one."""
        count = len(self.feature_info)
        if indices is None:
            take = list(range(count))
        elif isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 < indices <= count:
                raise ValueError(f"indices: expected 1..{count} maps (the last n), got {indices}")
            take = list(range(count - indices, count))
        else:
            take = []
            for i in indices:
                if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
                    raise ValueError(f"indices: expected indices in [-{count}, {count}), got {list(indices)}")
                take.append(i % count)
            if not take:
                raise ValueError("indices: expected at least one index")
        return sorted(set(take)), max(take)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last map in ``indices`` (and the head); returns the indices kept
        (timm's API, used by ``features_only=True``)."""
        take, last = self._take_indices(indices)
        stages = self.lm_stages()
        for index in range(last + 1, len(stages) + 1):
            setattr(self, f"layer{index}", LMStage())  # empty: returns its input
        if prune_norm or last < len(stages):
            self._prune_final_norm()
        if last < len(stages):
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or last < len(stages):
            self.reset_classifier(0)
        return take

    def _prune_final_norm(self) -> None:
        """Remove the norm :meth:`forward_final_norm` applies (nothing to remove by default)."""

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global pooling (``global_pool``), dropout and the classifier (skipped with ``pre_logits``; without
        pooling, applied at every position: (N, C, H, W) -> (N, num_classes, H, W))."""
        x = _pool(x, self.global_pool)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        if pre_logits:
            return x
        return self.fc(x) if self.global_pool else self.fc(x.movedim(1, -1)).movedim(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) of the images x (N, in_chans, H, W)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm API)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0: none) and, if given, the
        pooling (timm API)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
        pool = self.global_pool if global_pool is None else _check_global_pool(global_pool)
        self.num_classes, self.global_pool = num_classes, pool
        self._make_head()
        reference = next(self.parameters(), None)  # the new head joins the model's device, dtype and mode
        if reference is not None:
            self.fc.to(device=reference.device, dtype=reference.dtype)
        self.fc.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in the backward instead of storing them (timm API; see
        :func:`lmfused.nn.blocks.set_grad_checkpointing`, which refuses batch-mode stochastic depth)."""
        _set_stage_checkpointing(self, enable)
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for layer-wise learning rates (timm API): the stem, then stages or blocks."""
        blocks = r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        return {"stem": r"^conv1|^bn1|^maxpool", "blocks": blocks}


def _check_global_pool(value: object) -> str:
    if value not in GLOBAL_POOLS:
        raise ValueError(f"global_pool: expected one of {', '.join(map(repr, GLOBAL_POOLS))}, got {value!r}")
    return str(value)


def _pool(x: Tensor, kind: str) -> Tensor:
    """Global pooling of (N, C, H, W) to (N, C) (or (N, 2C) for "catavgmax"; "" leaves the map)."""
    if kind == "":
        return x
    if kind == "avg":
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    high = torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
    if kind == "max":
        return high
    mean = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return 0.5 * (mean + high) if kind == "avgmax" else torch.cat((mean, high), dim=1)


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
