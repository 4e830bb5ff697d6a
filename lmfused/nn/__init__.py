"""Modules of the LM architecture (Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks*, ICML 2018).

* :class:`LMStep` / :class:`ResidualStep`: the fused LM update (learnable k) and the plain ResNet step, both
  with stochastic depth ("sample" or "batch" mode) and noise injection; :func:`linear_survival_schedule`,
  :func:`seed_stochastic_depth`, :func:`stochastic_depth_generator`, :func:`make_step`.
* :class:`LMStage`, :class:`PreActBlock`, :class:`PostActBlock`: blocks and stages that carry two states
  (u_n, u_{n-1}); the block protocol is described in :mod:`lmfused.nn.blocks`. :class:`Projection`: a
  projection shortcut (1x1 conv + BatchNorm2d) whose output an LM block's backward rebuilds, not keeps.
* :class:`MaxPool2d`: ``nn.MaxPool2d`` that keeps no indices for its backward (the zoo's stem).
"""

from lmfused.nn.blocks import LMBlock, LMStage, PostActBlock, PreActBlock, Projection
from lmfused.nn.pool import MaxPool2d
from lmfused.nn.step import (
    LMStep,
    ResidualStep,
    linear_survival_schedule,
    make_step,
    seed_stochastic_depth,
    stochastic_depth_generator,
)

__all__ = [
    "LMBlock",
    "LMStage",
    "LMStep",
    "MaxPool2d",
    "PostActBlock",
    "PreActBlock",
    "Projection",
    "ResidualStep",
    "linear_survival_schedule",
    "make_step",
    "seed_stochastic_depth",
    "stochastic_depth_generator",
]
