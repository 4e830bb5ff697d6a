"""Model zoo of LM-ResNet / LM-ResNeXt (Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks*,
ICML 2018).

``create_model(name, **kwargs)`` / ``list_models()``: CIFAR pre-activation ``lm_resnet20/32/44/56/110/164``
and ``lm_resnext29_8x64d``; ImageNet (torchvision layout) ``lm_resnet50/101/152``, ``lm_resnext50_32x4d``,
``lm_resnext101_32x4d``, ``lm_resnext101_32x8d``. Every builder takes ``lm=False`` for the plain
ResNet/ResNeXt built from the same code. ``load_pretrained_state_dict`` loads plain (torchvision/timm)
weights into an LM model. When timm is installed, the models are also registered in timm's registry.
"""

from lmfused.models import cifar, imagenet  # noqa: F401  (registers the builders, CIFAR first)
from lmfused.models._timm import register_with_timm
from lmfused.models.cifar import (
    LMCifarResNet,
    lm_resnet20,
    lm_resnet32,
    lm_resnet44,
    lm_resnet56,
    lm_resnet110,
    lm_resnet164,
    lm_resnext29_8x64d,
)
from lmfused.models.common import LMNet, lm_coefficient_keys, load_pretrained_state_dict
from lmfused.models.imagenet import (
    LMResNet,
    lm_resnet50,
    lm_resnet101,
    lm_resnet152,
    lm_resnext50_32x4d,
    lm_resnext101_32x4d,
    lm_resnext101_32x8d,
)
from lmfused.models.registry import create_model, list_models, register_model

__all__ = [
    "LMCifarResNet",
    "LMNet",
    "LMResNet",
    "create_model",
    "list_models",
    "lm_coefficient_keys",
    "lm_resnet20",
    "lm_resnet32",
    "lm_resnet44",
    "lm_resnet50",
    "lm_resnet56",
    "lm_resnet101",
    "lm_resnet110",
    "lm_resnet152",
    "lm_resnet164",
    "lm_resnext29_8x64d",
    "lm_resnext50_32x4d",
    "lm_resnext101_32x4d",
    "lm_resnext101_32x8d",
    "load_pretrained_state_dict",
    "register_model",
]

register_with_timm()
