"""Training command for LM-ResNet / LM-ResNeXt (Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks*,
ICML 2018): ``python -m lmfused.train``, console script ``lmfused-train``, single process or torchrun (DDP).

* :mod:`~lmfused.train.config`: options, family defaults (CIFAR / ImageNet), validation.
* :mod:`~lmfused.train.data`: synthetic, digits (scikit-learn), cifar10 and imagefolder (torchvision,
  optional) sources; data order a function of (seed, epoch), checkpointed augmentation.
* :mod:`~lmfused.train.loop`: the paper's recipe, AMP, channels-last, torch.compile, DDP, metrics.jsonl,
  summary.json, SIGTERM/SIGINT handling.
* :mod:`~lmfused.train.checkpoint`: atomic, exactly resumable checkpoints.
"""

from lmfused.train.cli import main

__all__ = ["main"]
