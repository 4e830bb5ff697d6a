"""The model registry: builders register by name (timm style), ``create_model`` builds by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


def register_model(fn: Builder) -> Builder:
    """Decorator: register a model builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"name: a model named {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered models, in registration order (CIFAR first, then ImageNet)."""
    return list(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with the builder's keyword arguments.

    Every builder takes ``lm`` (False: the plain ResNet/ResNeXt), ``num_classes``, ``survival_prob`` (final
    survival probability p_L of the linear stochastic-depth schedule), ``sd_mode``, ``noise_std``,
    ``per_channel_k``, ``k_init``, ``backend``, ``zero_init_residual``, ``in_chans`` and ``drop_rate``.
    """
    if name not in _MODELS:
        raise ValueError(f"name: unknown model {name!r}; available: {', '.join(_MODELS)}")
    return _MODELS[name](**kwargs)
