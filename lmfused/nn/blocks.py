"""Residual blocks and stages that carry two states (u_n, u_{n-1}) for the LM architecture.

Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks* (ICML 2018), eq. (5):
u_{n+1} = (1 - k_n) u_n + k_n u_{n-1} + f(u_n). A stage therefore carries the current state and the previous
one from block to block.

Block protocol (relied on by ``lmfused.analysis``; keep it exact): an LM block is an ``nn.Module`` with the
class attribute ``is_lm_block = True`` and ``forward(u, u_prev) -> (u_next, u_shortcut)``, where
``u_shortcut`` is the (possibly projected) input, which the next block receives as ``u_prev``. A block whose
``u_prev`` is None (a stage's first block) or which changes shape (projection shortcut) takes the plain ResNet
step; only the others hold an :class:`~lmfused.nn.LMStep` and its k. An :class:`LMStage` (``is_lm_stage =
True``) runs its blocks, giving the first one ``u_prev=None``, and returns the last state.

Two block families, both with ``step`` (the update module) as their last child:

* :class:`PreActBlock`: pre-activation (bn-relu-conv)^n, as in the paper's CIFAR networks; no ReLU after the
  update. Basic (two 3x3 convs) and bottleneck (1x1, grouped 3x3, 1x1) variants.
* :class:`PostActBlock`: post-activation (conv-bn-relu)^n with the torchvision/timm parameter names (conv1,
  bn1, ..., downsample, and timm's drop_block/aa/se/drop_path), the final ReLU fused into the update.
  Built fresh for the model zoo, or around an existing torchvision/timm block's modules by
  ``lmfused.convert_to_lm``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from lmfused.batch_norm_step import batch_norm, batch_norm_relu, is_forward_op
from lmfused.nn.step import (
    FusionChoices,
    LMStep,
    ResidualStep,
    batch_norm_call,
    decomposes_under_compile,
    device_type_of,
    fuses_batch_norm,
    has_hooks,
)

__all__ = [
    "LMBlock",
    "LMStage",
    "PostActBlock",
    "PreActBlock",
    "Projection",
    "fused_norm",
    "norm_relu",
    "set_grad_checkpointing",
]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def fused_norm(
    norm: nn.Module,
    x: Tensor,
    backend: str | None = None,
    relu: bool = False,
    owner: nn.Module | None = None,
) -> Tensor:
    """norm(x), or relu(norm(x)) with ``relu``, as one ``lmfused.batch_norm`` / ``lmfused.batch_norm_relu``
    when the blocks' last-norm fusion would apply to ``norm``: a plain nn.BatchNorm2d, a ``backend`` for the
    device, LMFUSED_FUSE_BN not 0, and not traced as plain ops under torch.compile
    (LMFUSED_COMPILE_JUNCTION=decompose); else the module (then F.relu). ``owner``: the calling module, whose
    decision (:func:`decides_fusion`) is asked instead of deciding again on every call."""
    if owner is not None:
        fuses = decides_fusion(owner, norm, backend, x)
    else:
        fuses = fuses_batch_norm(norm, backend, device_type_of(x))
    if not fuses or decomposes_under_compile():
        y = norm(x)
        return F.relu(y) if relu else y
    running_mean, running_var, training, momentum = batch_norm_call(norm)
    op = batch_norm_relu if relu else batch_norm
    return op(x, running_mean, running_var, norm.weight, norm.bias, training=training, momentum=momentum,
              eps=norm.eps, backend=backend)  # fmt: skip


def norm_relu(
    norm: nn.Module, x: Tensor, backend: str | None = None, owner: nn.Module | None = None
) -> Tensor:
    """relu(norm(x)) by :func:`fused_norm` (fused: a backward that reads only the gradient and x)."""
    return fused_norm(norm, x, backend, relu=True, owner=owner)


class Projection(nn.Sequential):
    """A projection shortcut: a 1x1 convolution then a BatchNorm2d (torchvision's ``downsample``, same
    parameter names), the norm run by :func:`fused_norm`.

    The next block takes the projection as u_prev, which its backward needs for grad_k only; lmfused's batch
    norm lets that backward rebuild it from what the norm keeps anyway (:mod:`lmfused.rebuild`), so an LM
    stage keeps no more than a plain ResNet stage. Under torch.compile a selective checkpoint asks the
    partitioner for the same: recompute the norm's output, do not keep it.
    """

    def __init__(self, conv: nn.Module, norm: nn.Module, backend: str | None = None) -> None:
        super().__init__(conv, norm)
        self.backend = backend

    @classmethod
    def of(cls, downsample: nn.Module | None, backend: str | None = None) -> nn.Module | None:
        """``downsample`` made a Projection in place when it is a plain nn.Sequential of a Conv2d and a
        BatchNorm2d: the same object, modules, parameters and hooks (a converted model reuses what it was
        given), only its forward fused; any other ``downsample`` is returned as it is."""
        if (
            type(downsample) is nn.Sequential
            and len(downsample) == 2
            and isinstance(downsample[0], nn.Conv2d)
            and isinstance(downsample[1], nn.BatchNorm2d)
        ):
            downsample.__class__ = cls
        if isinstance(downsample, cls):
            downsample.backend = backend
        return downsample

    def forward(self, u: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and torch.is_grad_enabled():
            # The rebuild mark is eager only; under torch.compile the partitioner decides what the backward
            # keeps, and a selective checkpoint tells it to recompute the norm's output from the conv output
            # and statistics (which the norm's backward keeps anyway), not to keep it.
            return torch.utils.checkpoint.checkpoint(
                self._project, u, use_reentrant=False, context_fn=_recompute_the_normalization
            )
        return self._project(u)

    def _project(self, u: Tensor) -> Tensor:
        return fused_norm(self[1], self[0](u), self.backend, owner=self)

    def extra_repr(self) -> str:
        return describe_fusion(self, {"1": self[1]})


def fusion_choices(module: nn.Module) -> FusionChoices:
    """``module``'s :class:`FusionChoices`, made on first use (a Projection may be a Sequential made one in
    place, whose __init__ did not run)."""
    choices = module.__dict__.get("_fusion_choices")
    if choices is None:
        choices = module.__dict__["_fusion_choices"] = FusionChoices()
    return choices


def decides_fusion(owner: nn.Module, norm: nn.Module, backend: str | None, x: Tensor) -> bool:
    """Whether ``norm`` runs inside an lmfused kernel on ``x``, as ``owner`` decided it (its
    :class:`FusionChoices`); while torch.compile traces, decided afresh (the module is not changed)."""
    if torch.compiler.is_compiling():
        return fuses_batch_norm(norm, backend, device_type_of(x))
    return fusion_choices(owner).fuses(norm, backend, x)


def describe_fusion(module: nn.Module, norms: dict[str, nn.Module | None]) -> str:
    """How ``module`` last ran each of ``norms`` (name -> norm), for its repr: "fused" into an lmfused kernel
    or as the "module", for which device and dtype; "undecided" before the first forward."""
    parts, places = [], []
    for name, norm in norms.items():
        decided = None if norm is None else fusion_choices(module).decided(norm)
        if decided is not None:
            parts.append(f"{name}={'fused' if decided[0] else 'module'}")
            places.append(decided[1])
    if not parts:
        return "fusion: undecided"
    where = places[0] if len(set(places)) == 1 else "; ".join(places)
    return f"fusion ({where}): " + ", ".join(parts)


def _recompute_the_normalization():
    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_RECOMPUTE if is_forward_op(op) else CheckpointPolicy.MUST_SAVE

    return create_selective_checkpoint_contexts(policy)


class LMBlock(nn.Module):
    """Base of the two-state blocks: runs ``shortcut``, the branch f (unless dropped) and the update.

    Subclasses implement :meth:`shortcut_and_branch` and register their update module with :meth:`_set_step`.
    """

    is_lm_block: ClassVar[bool] = True
    step: ResidualStep
    depth: int  # number of convs in the branch; the last norm is bn{depth}

    def _set_step(self, step: ResidualStep | None, has_projection: bool) -> None:
        step = ResidualStep() if step is None else step
        if not isinstance(step, ResidualStep):
            raise TypeError(f"step: expected a ResidualStep or LMStep, got {type(step).__name__}")
        if isinstance(step, LMStep) and has_projection:
            raise ValueError(
                "step: a block with a projection shortcut changes shape and takes the plain ResNet step; "
                "give it a ResidualStep, not an LMStep"
            )
        self.step = step

    @property
    def k(self) -> Tensor | None:
        """The LM coefficient k of this block, or None for a plain (ResNet-step) block."""
        return self.step.k if isinstance(self.step, LMStep) else None

    def shortcut_and_branch(
        self, u: Tensor, keep: bool, apply_last_norm: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """The shortcut (u or its projection) and f(u), or None for f when ``keep`` is False; with
        ``apply_last_norm=False``, f without :meth:`last_norm` applied (the update applies it)."""
        raise NotImplementedError

    def activate(self, out: Tensor) -> Tensor:
        """Activation applied after the update when it is not fused into it (default: none)."""
        return out

    def zero_init_last(self) -> None:
        """Zero the branch's last BatchNorm weight (bn{depth}; torchvision's ``zero_init_residual``): f starts
        at 0 and the block at the identity (ResNet step) or the two-term LM update."""
        nn.init.zeros_(getattr(self, f"bn{self.depth}").weight)

    def forward(self, u: Tensor, u_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One step: ``(u_next, u_shortcut)``; ``u_shortcut`` becomes the next block's ``u_prev``."""
        if isinstance(u, tuple):
            raise TypeError(
                f"u: {type(self).__name__} got another block's (u_next, u_shortcut) output as its input: "
                "two-state blocks run inside an LMStage, not one by one (as timm's own grad checkpointing, "
                "model.grad_checkpointing = True, runs them); use the model's set_grad_checkpointing(True) "
                "or lmfused.nn.blocks.set_grad_checkpointing(model, True), which checkpoint inside the stages"
            )
        if self.step.draws_on_host and isinstance(u, torch.fx.Proxy):
            raise RuntimeError(
                "sd_mode: batch-mode stochastic depth decides on the host every step, which a torch.fx graph "
                "would fix at one decision; trace in eval mode, or use sd_mode='sample'"
            )
        keep = self.step.keep_branch()
        norm = self.last_norm() if keep else None
        # The step returns its shortcut too: given to the next block as u_prev, the gradient it gets there
        # is added into this step's grad_u by its backward kernel (gradient pass-through).
        if norm is not None and decides_fusion(self, norm, self.step.backend, u):
            shortcut, x = self.shortcut_and_branch(u, keep, apply_last_norm=False)
            out, shortcut = self.step.batch_norm_update_and_shortcut(shortcut, u_prev, x, norm)
        else:
            shortcut, f = self.shortcut_and_branch(u, keep)
            out, shortcut = self.step.update_and_shortcut(shortcut, u_prev, f)
        return self.activate(out), shortcut

    def last_norm(self) -> nn.Module | None:
        """The norm whose output feeds the update directly, which the update may run itself (see
        :meth:`ResidualStep.fuses_batch_norm`); None when something sits between them (default)."""
        return None

    def norm_relu(self, norm: nn.Module, x: Tensor) -> Tensor:
        """relu(norm(x)) inside the branch, fused when it can be (:func:`norm_relu`)."""
        return norm_relu(norm, x, self.step.backend, owner=self)

    def extra_repr(self) -> str:
        """How the block last ran its norms, the junction's (its last norm, fused into the update) first."""
        last = self.last_norm()
        names = [f"bn{i}" for i in range(self.depth, 0, -1)]
        return describe_fusion(self, {("junction " if getattr(self, n) is last else "") + n: getattr(self, n)
                                      for n in names})  # fmt: skip


class PreActBlock(LMBlock):
    """Pre-activation residual block (He et al., 2016): f = conv_n(relu(bn_n(... conv_1(relu(bn_1(u)))))).

    The CIFAR block of the LM-ResNet paper (Lu et al., ICML 2018, section 2.2: "bn-relu-conv-bn-relu-conv"),
    with no activation after the update. The projection shortcut (when the shape changes) is a 1x1 conv of
    the pre-activated input. Build it with :meth:`basic` or :meth:`bottleneck`.

    Args:
        norms: the BatchNorms before each conv (registered as bn1, bn2, ...).
        convs: the convolutions (conv1, conv2, ...).
        downsample: the projection shortcut or None for the identity.
        step: the update (:class:`ResidualStep` by default, :class:`LMStep` for an LM block).
    """

    def __init__(
        self,
        norms: Sequence[nn.Module],
        convs: Sequence[nn.Module],
        downsample: nn.Module | None = None,
        step: ResidualStep | None = None,
    ) -> None:
        super().__init__()
        if len(norms) != len(convs) or not convs:
            raise ValueError("norms, convs: expected the same, non-zero number of norms and convs")
        self.depth = len(convs)
        for i, (norm, conv) in enumerate(zip(norms, convs, strict=True), start=1):
            self.add_module(f"bn{i}", norm)
            self.add_module(f"conv{i}", conv)
        self.downsample = downsample
        self._set_step(step, downsample is not None)

    @classmethod
    def basic(cls, in_channels: int, out_channels: int, stride: int = 1, step: ResidualStep | None = None):
        """Two 3x3 convs (stride on the first), as in the CIFAR LM-ResNet20..110."""
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = conv1x1(in_channels, out_channels, stride)
        return cls(
            [nn.BatchNorm2d(in_channels), nn.BatchNorm2d(out_channels)],
            [conv3x3(in_channels, out_channels, stride), conv3x3(out_channels, out_channels)],
            downsample,
            step,
        )

    @classmethod
    def bottleneck(
        cls,
        in_channels: int,
        width: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        step: ResidualStep | None = None,
    ):
        """1x1 (to ``width``), grouped 3x3 (stride), 1x1 (to ``out_channels``): ResNet-164, ResNeXt-29."""
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = conv1x1(in_channels, out_channels, stride)
        return cls(
            [nn.BatchNorm2d(in_channels), nn.BatchNorm2d(width), nn.BatchNorm2d(width)],
            [
                conv1x1(in_channels, width),
                conv3x3(width, width, stride, groups),
                conv1x1(width, out_channels),
            ],
            downsample,
            step,
        )

    def shortcut_and_branch(
        self, u: Tensor, keep: bool, apply_last_norm: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        if not keep and self.downsample is None:
            return u, None  # dropped: not even the pre-activation is computed
        h = self.norm_relu(self.bn1, u)
        shortcut = u if self.downsample is None else self.downsample(h)
        if not keep:
            return shortcut, None
        x = self.conv1(h)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"conv{i}")(self.norm_relu(getattr(self, f"bn{i}"), x))
        return shortcut, x


class PostActBlock(LMBlock):
    """Post-activation residual block, torchvision/timm style: f = bn_n(conv_n(... act_1(bn_1(conv_1(u))))).

    ResNet/ResNeXt v1.5 (stride on the 3x3 conv, which is the second-to-last conv), with the update followed
    by the final activation, fused into the update when the step has ``relu=True`` (then the final activation
    must be a ReLU). Parameter names match torchvision's and timm's: conv1/bn1/.../downsample, and timm's
    optional ``drop_block`` and ``aa`` (after the 3x3 conv's norm / activation), ``se`` and ``drop_path``
    (applied to the branch output). Activations are registered as act1, act2, ... (no parameters).

    Args:
        convs, norms: the convolutions and their norms (conv1/bn1, conv2/bn2[, conv3/bn3]).
        acts: the activations after each norm but the last (one module per conv but the last).
        final_act: the activation after the update (None: none).
        downsample: the projection shortcut or None for the identity.
        drop_block, aa, se, drop_path: timm's optional extras (None: absent).
        step: the update (:class:`ResidualStep` by default, :class:`LMStep` for an LM block).
    """

    def __init__(
        self,
        convs: Sequence[nn.Module],
        norms: Sequence[nn.Module],
        acts: Sequence[nn.Module],
        final_act: nn.Module | None = None,
        downsample: nn.Module | None = None,
        *,
        drop_block: nn.Module | None = None,
        aa: nn.Module | None = None,
        se: nn.Module | None = None,
        drop_path: nn.Module | None = None,
        step: ResidualStep | None = None,
    ) -> None:
        super().__init__()
        if len(convs) < 2 or len(norms) != len(convs) or len(acts) != len(convs) - 1:
            raise ValueError("convs, norms, acts: expected n >= 2 convs, n norms and n - 1 activations")
        self.depth = len(convs)
        for i, (conv, norm) in enumerate(zip(convs, norms, strict=True), start=1):
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", norm)
        for i, act in enumerate([*acts, final_act], start=1):
            self.add_module(f"act{i}", act)
        self.downsample = Projection.of(downsample, getattr(step, "backend", None))
        self.drop_block, self.aa, self.se, self.drop_path = drop_block, aa, se, drop_path
        self._set_step(step, downsample is not None)
        if self.step.relu and final_act is not None and type(final_act) is not nn.ReLU:
            raise ValueError(f"step: relu=True fuses a ReLU, but the final activation is {final_act}")
        self.fused_act = self.step.relu

    @classmethod
    def bottleneck(
        cls,
        in_channels: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 64,
        step: ResidualStep | None = None,
        expansion: int = 4,
    ):
        """torchvision's Bottleneck (v1.5): width = planes * width_per_group / 64 * groups, out = 4 * planes.

        Give it a step with ``relu=True`` to fuse the final ReLU into the update.
        """
        width = int(planes * (width_per_group / 64.0)) * groups
        out_channels = planes * expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        return cls(
            [
                conv1x1(in_channels, width),
                conv3x3(width, width, stride, groups),
                conv1x1(width, out_channels),
            ],
            [nn.BatchNorm2d(width), nn.BatchNorm2d(width), nn.BatchNorm2d(out_channels)],
            [nn.ReLU(inplace=True), nn.ReLU(inplace=True)],
            nn.ReLU(inplace=True),
            downsample,
            step=step,
        )

    def last_norm(self) -> nn.Module | None:
        """bn{depth}, whose output is the update's f, unless timm's ``se`` or ``drop_path`` come between."""
        if self.se is not None or self.drop_path is not None:
            return None
        return getattr(self, f"bn{self.depth}")

    def shortcut_and_branch(
        self, u: Tensor, keep: bool, apply_last_norm: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        shortcut = u if self.downsample is None else self.downsample(u)
        if not keep:
            return shortcut, None
        x = u
        strided = self.depth - 2  # index of the 3x3 conv, where timm puts drop_block and aa
        for i in range(self.depth):
            x = getattr(self, f"conv{i + 1}")(x)
            if i == self.depth - 1:
                x = getattr(self, f"bn{i + 1}")(x) if apply_last_norm else x
                break
            norm, act = getattr(self, f"bn{i + 1}"), getattr(self, f"act{i + 1}")
            if (
                type(act) is nn.ReLU
                and not has_hooks(act)
                and not (i == strided and self.drop_block is not None)
            ):
                x = self.norm_relu(norm, x)
            else:
                x = norm(x)
                if i == strided and self.drop_block is not None:
                    x = self.drop_block(x)
                x = act(x)
            if i == strided and self.aa is not None:
                x = self.aa(x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        return shortcut, x

    def activate(self, out: Tensor) -> Tensor:
        final_act = getattr(self, f"act{self.depth}")
        return out if self.fused_act or final_act is None else final_act(out)


class LMStage(nn.Sequential):
    """A stage of two-state blocks: carries (u_n, u_{n-1}) through them and returns the last state.

    The first block gets ``u_prev=None`` (plain ResNet step); each block's shortcut is the next block's
    ``u_prev`` (Lu et al., ICML 2018, eq. 5). A subclass of ``nn.Sequential``, so parameter names stay
    "layer1.0.conv1.weight" etc.
    """

    is_lm_stage: ClassVar[bool] = True
    grad_checkpointing: bool = False  # set by set_grad_checkpointing: recompute each block in the backward

    def forward(self, u: Tensor) -> Tensor:
        """Run the blocks on ``u``; returns the stage's output state."""
        u_prev: Tensor | None = None
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            for block in self:
                u, u_prev = block(u, u_prev)
            return u
        for segment in self.checkpoint_segments():
            u, u_prev = torch.utils.checkpoint.checkpoint(
                _run_blocks, segment, u, u_prev, use_reentrant=False
            )
        return u

    def checkpoint_segments(self) -> list[tuple[nn.Module, ...]]:
        """The blocks as grad checkpointing recomputes them: one by one, except that a block with a projection
        shortcut goes with the next block, whose u_prev the projection is. A checkpoint keeps its inputs, so
        apart the projection (a full-size state that no plain ResNet keeps: the next block's backward rebuilds
        it, :mod:`lmfused.rebuild`) would be kept as that block's input; together, each segment keeps what a
        checkpointed plain ResNet keeps, its input u (and u_prev, the previous block's input, kept anyway)."""
        segments: list[tuple[nn.Module, ...]] = []
        blocks = list(self)
        while blocks:
            take = 2 if getattr(blocks[0], "downsample", None) is not None and len(blocks) > 1 else 1
            segments.append(tuple(blocks[:take]))
            blocks = blocks[take:]
        return segments


def _run_blocks(blocks: tuple[nn.Module, ...], u: Tensor, u_prev: Tensor | None) -> tuple[Tensor, Tensor]:
    for i, block in enumerate(blocks):
        if i < len(blocks) - 1:  # checkpointed again: the segment's recompute holds one block at a time
            u, u_prev = torch.utils.checkpoint.checkpoint(block, u, u_prev, use_reentrant=False)
        else:
            u, u_prev = block(u, u_prev)
    return u, u_prev


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> list[LMStage]:
    """Turn activation checkpointing of the blocks in every LMStage of ``model`` on or off.

    Each block's activations are recomputed in the backward instead of stored (timm's
    ``set_grad_checkpointing``, done inside the stages, where the two states (u_n, u_{n-1}) travel). The
    recomputation replays torch's random state, so sample-mode stochastic depth and noise draw the same
    values; batch-mode stochastic depth draws from its own generator and is refused.

    Returns:
        The stages changed.

    Raises:
        TypeError: ``enable`` is not a bool.
        ValueError: ``enable`` with a batch-mode stochastic-depth step, or ``model`` has no LMStage.
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable: expected a bool, got {type(enable).__name__}")
    stages = [m for m in model.modules() if getattr(m, "is_lm_stage", False)]
    if not stages:
        raise ValueError(f"model: {type(model).__name__} has no LMStage to checkpoint")
    if enable:
        refuse_batch_mode(m for stage in stages for m in stage.modules())
    for stage in stages:
        stage.grad_checkpointing = enable
    return stages


def refuse_batch_mode(modules: Iterable[nn.Module]) -> None:
    """Raise ValueError if a block among ``modules`` has a batch-mode stochastic-depth step that can drop its
    branch: grad checkpointing (:func:`set_grad_checkpointing`, ``lmfused.convert_to_lm``) cannot take it."""
    for m in modules:
        if isinstance(getattr(m, "step", None), nn.Module) and getattr(m.step, "mode", None) == "batch":
            if m.step.survival_prob < 1.0:
                raise ValueError(
                    "enable: grad checkpointing recomputes each block, and batch-mode stochastic depth would "
                    "draw again (another branch dropped); use sd_mode='sample' or survival_prob=1.0"
                )
