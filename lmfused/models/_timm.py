"""Registration of the LM models in timm's registry, so ``timm.create_model("lm_resnext50_32x4d")`` works.

Done on ``import lmfused.models`` when timm is installed; names timm already knows are left alone. Each timm
entrypoint adapts timm's keyword arguments: ``pretrained=True`` is refused (there are no LM weights to fetch;
load plain ResNet weights with ``load_pretrained_state_dict`` or convert a pretrained model with
``lmfused.convert_to_lm``), ``drop_path_rate`` becomes ``survival_prob = 1 - drop_path_rate``,
``global_pool`` ("avg", "max", "avgmax", "catavgmax") goes to the model, ``features_only=True`` (with
``out_indices``, default all five maps for ImageNet models, all four for CIFAR ones) returns timm's
``FeatureGetterNet`` around the model's ``forward_intermediates``, and the pretrained-weight arguments
(pretrained_cfg, pretrained_cfg_overlay, cache_dir) are dropped. What the models cannot do is a ValueError
naming the argument (``drop_block_rate`` > 0, ``output_stride`` other than the network's, a
``feature_cls`` other than "getter").
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from lmfused.models.cifar import LMCifarResNet
from lmfused.models.registry import _MODELS

__all__ = ["register_with_timm"]

# Arguments timm's create_model passes for its own pretrained-weight machinery.
_FACTORY_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _data_config(name: str, model: nn.Module) -> dict[str, Any]:
    """A timm pretrained_cfg-like dict describing the model's expected input (used by timm's data helpers)."""
    cifar = isinstance(model, LMCifarResNet)
    size = 32 if cifar else 224
    return dict(
        architecture=name,
        num_classes=getattr(model, "num_classes", 0),
        input_size=(getattr(model, "in_chans", 3), size, size),
        interpolation="bilinear",
        crop_pct=1.0 if cifar else 0.875,
        mean=_CIFAR_MEAN if cifar else _IMAGENET_MEAN,
        std=_CIFAR_STD if cifar else _IMAGENET_STD,
        first_conv="conv1",
        classifier="fc",
    )


def _timm_entrypoint(name: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"pretrained: there are no pretrained {name} weights; load plain ResNet weights with "
                "lmfused.models.load_pretrained_state_dict or use lmfused.convert_to_lm"
            )
        for key in _FACTORY_ONLY:
            kwargs.pop(key, None)
        drop_path_rate = kwargs.pop("drop_path_rate", None)
        if drop_path_rate is not None and "survival_prob" not in kwargs:
            kwargs["survival_prob"] = 1.0 - drop_path_rate
        drop_block_rate = kwargs.pop("drop_block_rate", None)
        if drop_block_rate:
            raise ValueError(f"drop_block_rate: {name} has no DropBlock, got {drop_block_rate!r}")
        features_only = kwargs.pop("features_only", False)
        out_indices = kwargs.pop("out_indices", None)
        feature_cls = kwargs.pop("feature_cls", None)
        output_stride = kwargs.pop("output_stride", None)
        if feature_cls not in (None, "getter"):
            raise ValueError(f"feature_cls: {name} offers only 'getter' features, got {feature_cls!r}")
        model = builder(**kwargs)
        native_stride = model.feature_info[-1]["reduction"]
        if output_stride not in (None, native_stride):
            raise ValueError(f"output_stride: {name} has no dilated variant; only {native_stride} is offered")
        model.pretrained_cfg = model.default_cfg = _data_config(name, model)
        if features_only:
            from timm.models._features import FeatureGetterNet

            indices = tuple(range(len(model.feature_info))) if out_indices is None else out_indices
            return FeatureGetterNet(model, out_indices=indices)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = builder.__doc__
    return entrypoint


def register_with_timm() -> list[str]:
    """Register every lmfused model timm does not know yet; returns the names registered.

    Does nothing when timm is not installed; warns (and registers nothing) when timm fails to import.
    """
    if importlib.util.find_spec("timm") is None:
        return []
    try:
        from timm.models import is_model, register_model
    except Exception as error:  # e.g. a torchvision that does not match the installed torch
        warnings.warn(f"lmfused: timm could not be imported, LM models not registered: {error}", stacklevel=2)
        return []
    module = sys.modules[__name__]
    registered = []
    for name, builder in _MODELS.items():
        if is_model(name):
            continue
        entrypoint = _timm_entrypoint(name, builder)
        setattr(module, name, entrypoint)  # timm adds the name to this module's __all__
        register_model(entrypoint)
        registered.append(name)
    return registered
