"""Convert a torchvision or timm ResNet/ResNeXt into its LM version, keeping its weights.

The LM architecture (Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks*, ICML 2018, eq. 5) turns
each residual update u_{n+1} = u_n + f(u_n) after a stage's first block into
u_{n+1} = (1 - k_n) u_n + k_n u_{n-1} + f(u_n). With k = 0 (the default ``k_init``) the converted network
computes exactly what the original did; the k then train with the rest of the network.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

from torch import nn

from lmfused.nn import LMStage, PostActBlock, linear_survival_schedule, make_step
from lmfused.nn.blocks import refuse_batch_mode
from lmfused.nn.blocks import set_grad_checkpointing as _set_stage_checkpointing
from lmfused.nn.step import check_k_init, check_mode, check_noise_std, check_survival_prob

__all__ = ["convert_to_lm"]

# Children a torchvision/timm BasicBlock or Bottleneck may have; anything else has a forward we do not know.
_KNOWN_CHILDREN = {
    *(f"{kind}{i}" for kind in ("conv", "bn", "act") for i in (1, 2, 3)),
    "relu",
    "downsample",
    "drop_block",
    "aa",
    "se",
    "drop_path",
}


def _stages(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """layer1, layer2, ... of ``model``, in order, as long as they exist."""
    index = 1
    while isinstance(getattr(model, f"layer{index}", None), nn.Module):
        yield f"layer{index}", getattr(model, f"layer{index}")
        index += 1


def _branch_channels(block: nn.Module, depth: int, where: str) -> int:
    """Output channels of the branch: its last norm's (BatchNorm ``num_features``, GroupNorm
    ``num_channels``), else its last conv's ``out_channels``."""
    norm, conv = getattr(block, f"bn{depth}"), getattr(block, f"conv{depth}")
    for owner, attribute in ((norm, "num_features"), (norm, "num_channels"), (conv, "out_channels")):
        value = getattr(owner, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise TypeError(
        f"model: {where} ({type(block).__name__}): cannot tell the branch's channels from bn{depth} "
        f"({type(norm).__name__}) or conv{depth} ({type(conv).__name__}); expected a BatchNorm/GroupNorm "
        "or a convolution"
    )


def _set_grad_checkpointing(self: nn.Module, enable: bool = True) -> None:
    """Activation checkpointing of every block, done inside the LM stages (timm's own runs the blocks one by
    one, which two-state blocks cannot do): see :func:`lmfused.nn.blocks.set_grad_checkpointing`."""
    _set_stage_checkpointing(self, enable)
    if hasattr(self, "grad_checkpointing"):
        self.grad_checkpointing = False  # timm's forward then calls the stages, which checkpoint


def _wrap_block(block: nn.Module, where: str, step_args: dict, *, first: bool, survival_prob: float):
    """A :class:`PostActBlock` reusing ``block``'s modules (same names), with the LM update."""
    unknown = sorted(set(dict(block.named_children())) - _KNOWN_CHILDREN)
    depth = 3 if hasattr(block, "conv3") else 2
    needed = [f"{kind}{i}" for i in range(1, depth + 1) for kind in ("conv", "bn")]
    missing = [name for name in needed if not isinstance(getattr(block, name, None), nn.Module)]
    if hasattr(block, "act1"):  # timm: act1, act2 (, act3), the last one after the addition
        acts = [getattr(block, f"act{i}", None) for i in range(1, depth + 1)]
    else:  # torchvision: one ReLU module used everywhere
        acts = [getattr(block, "relu", None)] * depth
    if unknown or missing or any(act is None for act in acts):
        raise TypeError(
            f"model: {where} ({type(block).__name__}) is not a torchvision/timm BasicBlock or Bottleneck"
            + (f"; unknown submodules {unknown}" if unknown else "")
            + (f"; missing {missing}" if missing else "")
            + ("; no activation modules (relu or act1..)" if any(act is None for act in acts) else "")
        )
    downsample = getattr(block, "downsample", None)
    parameter = next(block.parameters(), None)
    step = make_step(
        lm=not first and downsample is None,
        channels=_branch_channels(block, depth, where),
        survival_prob=survival_prob,
        relu=type(acts[-1]) is nn.ReLU,
        **step_args,
    )
    if parameter is not None:
        step.to(parameter.device)
    wrapped = PostActBlock(
        [getattr(block, f"conv{i}") for i in range(1, depth + 1)],
        [getattr(block, f"bn{i}") for i in range(1, depth + 1)],
        acts[:-1],
        acts[-1],
        downsample,
        drop_block=getattr(block, "drop_block", None),
        aa=getattr(block, "aa", None),
        se=getattr(block, "se", None),
        drop_path=getattr(block, "drop_path", None),
        step=step,
    )
    wrapped.training = step.training = block.training
    return wrapped


def convert_to_lm(
    model: nn.Module,
    k_init: float | tuple[float, float] = 0.0,
    *,
    per_channel_k: bool = False,
    survival_prob: float = 1.0,
    sd_mode: str = "sample",
    noise_std: float = 0.0,
    backend: str | None = None,
) -> nn.Module:
    """Give a torchvision or timm ResNet/ResNeXt LM updates, keeping its weights. Converts **in place**.

    Duck-typed: ``model`` has stages ``layer1``, ``layer2``, ... (``nn.Sequential``) of torchvision/timm
    ``BasicBlock``/``Bottleneck`` blocks (conv1/bn1/conv2/bn2[/conv3/bn3], optional downsample; timm's
    act1/act2/act3, drop_block, aa, se and drop_path are kept and run where timm runs them). Each stage is
    replaced by an :class:`~lmfused.nn.LMStage` of :class:`~lmfused.nn.PostActBlock` wrappers that reuse the
    original submodules, so the state_dict keys stay the same, plus ``layerN.i.step.k`` for every block after
    a stage's first (those without a projection shortcut). The final ReLU is fused into the update.

    Args:
        model: the network; modified in place and returned.
        k_init: initial k: a number (0.0, the default: the converted network computes exactly what the
            original did) or uniform bounds (low, high) (the paper's (-0.1, 0.0)).
        per_channel_k: one k per channel instead of one per block.
        survival_prob: survival probability p_L of the last block for stochastic depth with the linear decay
            rule (1.0: none). timm's own ``drop_path`` modules, if any, are kept in addition.
        sd_mode: "sample" or "batch" stochastic depth (see :mod:`lmfused.nn.step`).
        noise_std: noise injected in each update in training.
        backend: the lm_step backend (None: automatic).

    Returns:
        ``model`` itself. Its ``set_grad_checkpointing(enable=True)`` (timm's name; added to torchvision
        models too) checkpoints every block inside the LM stages; a timm model converted with grad
        checkpointing on keeps it that way. timm's own mechanism (``grad_checkpointing = True``) runs blocks
        one by one, which the two-state blocks refuse with a TypeError saying so.

    Raises:
        TypeError: ``model`` has no layer1 or its blocks are not torchvision/timm residual blocks.
        ValueError: ``model`` was already converted, an option is out of range, or grad checkpointing is on
            with batch-mode stochastic depth (recomputing a block would draw again).
    """
    check_k_init(k_init)
    check_survival_prob(survival_prob)
    step_args = dict(
        per_channel_k=per_channel_k,
        k_init=k_init,
        mode=check_mode(sd_mode, "sd_mode"),
        noise_std=check_noise_std(noise_std),
        backend=backend,
    )
    stages = list(_stages(model))
    if not stages:
        raise TypeError(f"model: {type(model).__name__} has no layer1; expected a torchvision/timm ResNet")
    for name, stage in stages:
        if getattr(stage, "is_lm_stage", False):
            raise ValueError(f"model: {name} is already an LMStage (model already converted)")
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            raise TypeError(f"model: {name} is not a non-empty nn.Sequential of residual blocks")
    checkpointing = bool(getattr(model, "grad_checkpointing", False))
    survival = iter(linear_survival_schedule(sum(len(stage) for _, stage in stages), survival_prob))
    new_stages = {}
    for name, stage in stages:
        blocks = [
            _wrap_block(block, f"{name}.{i}", step_args, first=i == 0, survival_prob=next(survival))
            for i, block in enumerate(stage)
        ]
        new_stage = LMStage(*blocks)
        new_stage.training = stage.training
        new_stages[name] = new_stage
    if checkpointing:
        refuse_batch_mode(m for stage in new_stages.values() for m in stage)
    for name, new_stage in new_stages.items():  # only once every block converted: no half-converted model
        setattr(model, name, new_stage)
    # An instance attribute, so that timm's method (which turns on its block-by-block checkpointing) is not
    # the one called; pickling the whole model keeps the class's method, state_dicts are unaffected.
    model.set_grad_checkpointing = types.MethodType(_set_grad_checkpointing, model)
    if checkpointing:
        model.set_grad_checkpointing(True)
    return model
