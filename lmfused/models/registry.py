"""The model registry: builders register by name (timm style), ``create_model`` builds by name."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

# What register_model records, by model name (read by lmfused.models._timm): the registered builders, in
# registration order; each default_cfg given (with "architecture"); each feature_cfg given.
MODELS: dict[str, Callable[..., nn.Module]] = {}
DEFAULT_CFGS: dict[str, dict[str, Any]] = {}
FEATURE_CFGS: dict[str, dict[str, Any]] = {}
Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


def register_model(
    fn: Builder | None = None,
    *,
    default_cfg: Mapping[str, Any] | None = None,
    feature_cfg: Mapping[str, Any] | None = None,
) -> Any:
    """Decorator: register a model builder under its function name (``@register_model``, or
    ``@register_model(default_cfg=..., feature_cfg=...)``).

    The registered builder, returned in place of ``fn``, also takes timm's factory arguments ``device`` (the
    model is built there: nothing is allocated elsewhere, e.g. no weights on the CPU for a ``"meta"`` model)
    and ``dtype`` (floating parameters and buffers in that dtype, as ``model.to(dtype)`` gives), and sets the
    model's ``default_cfg`` (alias ``pretrained_cfg``, as timm's models have) to ``default_cfg`` with
    ``architecture`` set to the name. ``feature_cfg`` is what timm's ``features_only=True`` takes by default
    (``out_indices``: every map of the model's ``feature_info``).
    """

    def register(fn: Builder) -> Builder:
        name = fn.__name__
        if name in MODELS:
            raise ValueError(f"name: a model named {name!r} is already registered")
        cfg = None if default_cfg is None else {"architecture": name, **default_cfg}

        @functools.wraps(fn)
        def build(*, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs):
            if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = fn(**kwargs)
            if dtype is not None:
                model.to(dtype=dtype)
            if cfg is not None:
                model.pretrained_cfg = model.default_cfg = dict(cfg)
            return model

        MODELS[name] = build
        if cfg is not None:
            DEFAULT_CFGS[name] = cfg
        if feature_cfg is not None:
            FEATURE_CFGS[name] = dict(feature_cfg)
        return build  # type: ignore[return-value]

    return register if fn is None else register(fn)


def list_models() -> list[str]:
    """Names of the registered models, in registration order (CIFAR first, then ImageNet)."""
    return list(MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with the builder's keyword arguments.

    Every builder takes ``lm`` (False: the plain ResNet/ResNeXt), ``num_classes``, ``survival_prob`` (final
    survival probability p_L of the linear stochastic-depth schedule), ``sd_mode``, ``noise_std``,
    ``per_channel_k``, ``k_init``, ``backend``, ``zero_init_residual``, ``in_chans``, ``drop_rate`` and
    ``global_pool``, and timm's factory arguments ``device`` and ``dtype`` (see :func:`register_model`).
    """
    if name not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
