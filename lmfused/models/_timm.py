"""Registration of the LM models in timm's registry, so ``timm.create_model("lm_resnext50_32x4d")`` works.

Done on ``import lmfused.models`` when timm is installed; names timm already knows are left alone. Each
entrypoint builds the model as timm builds its own, through ``timm.models.build_model_with_cfg``: the
model's ``pretrained_cfg``/``default_cfg`` is the zoo's default cfg (:func:`lmfused.models.common.zoo_cfg`)
or the ``pretrained_cfg`` given, with ``pretrained_cfg_overlay`` applied; ``device`` and ``dtype`` go to the
builder (:func:`lmfused.models.registry.register_model`); ``features_only=True`` wraps the model in timm's
feature class, ``feature_cls`` "getter" by default (``forward_intermediates``; also "list", "dict", "hook"
or "fx"), every map of ``feature_info`` unless ``out_indices`` says otherwise, and the wrapper carries the
cfg as timm's do.

timm's other arguments are adapted: ``pretrained=True`` is refused (there are no LM weights to fetch; load
plain ResNet weights with ``load_pretrained_state_dict`` or convert a pretrained model with
``lmfused.convert_to_lm``), ``drop_path_rate`` becomes ``survival_prob = 1 - drop_path_rate``,
``global_pool`` goes to the model, ``cache_dir`` is not used. What the models cannot do is a ValueError
naming the argument (``drop_block_rate`` > 0, ``output_stride`` other than the network's, a pretrained tag
other than "untrained").

The models are not in timm's pretrained-cfg registry (``timm.list_models(pretrained=True)`` or
``name_matches_cfg=True`` do not list them): they have no weights, and timm's TorchScript tests select
the models listed there.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from lmfused.models.registry import DEFAULT_CFGS, FEATURE_CFGS, MODELS

__all__ = ["register_with_timm"]


def _timm_entrypoint(name: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def entrypoint(
        pretrained: bool = False,
        *,
        pretrained_cfg: str | dict[str, Any] | Any | None = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        cache_dir: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        from timm.models import build_model_with_cfg

        if pretrained:
            raise ValueError(
                f"pretrained: there are no pretrained {name} weights; load plain ResNet weights with "
                "lmfused.models.load_pretrained_state_dict or use lmfused.convert_to_lm"
            )
        default_cfg = DEFAULT_CFGS.get(name, {})
        if isinstance(pretrained_cfg, str):  # a tag, from timm.create_model("name.tag")
            if pretrained_cfg != default_cfg.get("tag"):
                raise ValueError(f"pretrained_cfg: {name} has no tag {pretrained_cfg!r} (no weights to load)")
            pretrained_cfg = None
        drop_path_rate = kwargs.pop("drop_path_rate", None)
        if drop_path_rate is not None and "survival_prob" not in kwargs:
            kwargs["survival_prob"] = 1.0 - drop_path_rate
        drop_block_rate = kwargs.pop("drop_block_rate", None)
        if drop_block_rate:
            raise ValueError(f"drop_block_rate: {name} has no DropBlock, got {drop_block_rate!r}")
        output_stride = kwargs.pop("output_stride", None)
        feature_cfg = dict(FEATURE_CFGS.get(name, {}), feature_cls="getter")

        def build(**model_kwargs: Any) -> nn.Module:
            model = builder(**model_kwargs)
            native_stride = model.feature_info[-1]["reduction"]
            if output_stride not in (None, native_stride):
                raise ValueError(
                    f"output_stride: {name} has no dilated variant; only {native_stride} is offered"
                )
            return model

        return build_model_with_cfg(
            build,
            name,
            pretrained=False,
            pretrained_cfg=pretrained_cfg or default_cfg,
            pretrained_cfg_overlay=pretrained_cfg_overlay,
            feature_cfg=feature_cfg,
            **kwargs,
        )

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
    for name, builder in MODELS.items():
        if is_model(name):
            continue
        entrypoint = _timm_entrypoint(name, builder)
        setattr(module, name, entrypoint)  # timm adds the name to this module's __all__
        register_model(entrypoint)
        registered.append(name)
    return registered
