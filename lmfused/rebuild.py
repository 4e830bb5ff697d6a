"""States a step's backward rebuilds instead of keeping them from the forward.

An LM step's backward needs u and u_prev only for grad_k = sum g (u_prev - u). In a stage's second block,
u_prev is the first block's projected shortcut: the downsample BatchNorm's output, which nothing else keeps
for the backward (a plain ResNet does not keep it at all). The downsample BatchNorm keeps its input and
statistics for its own backward anyway, and its output is an elementwise function of them. So lmfused's
batch norm (:func:`lmfused.batch_norm_step.batch_norm`) marks its output with a :class:`Rebuild`: the
tensors it is computed from and the function that recomputes it by the same kernel (bitwise the same
values). A step that would save a marked u_prev saves those tensors instead (the same storages the batch
norm already keeps: nothing new is held) and rebuilds u_prev when its backward runs, for as long as its
reduction needs it.

Only eager autograd sees the mark (an attribute of the tensor object); under torch.compile the partitioner
decides what is saved. A tensor changed in place after it was marked is not rebuilt: it is saved as usual.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Rebuild", "carry", "mark", "save_state", "saved_state"]

_ATTRIBUTE = "_lmfused_rebuild"


@dataclass(frozen=True)
class Rebuild:
    """How to recompute a tensor: ``run(*tensors)``, bitwise the value it was marked with."""

    tensors: tuple[Tensor | None, ...]
    run: Callable[..., Tensor]
    version: int  # the marked tensor's version counter when marked


def mark(t: Tensor, tensors: tuple[Tensor | None, ...], run: Callable[..., Tensor]) -> Tensor:
    """Record on ``t`` that ``run(*tensors)`` recomputes it (``run`` must hold no tensor itself)."""
    setattr(t, _ATTRIBUTE, Rebuild(tensors, run, t._version))
    return t


def carry(source: Tensor, alias: Tensor) -> Tensor:
    """Give ``alias`` (a view of ``source`` with the same values, such as a step's shortcut output) the
    rebuild of ``source``, if it has one."""
    rebuild = getattr(source, _ATTRIBUTE, None)
    if rebuild is not None:
        setattr(alias, _ATTRIBUTE, rebuild)
    return alias


def _rebuild_of(t: Tensor) -> Rebuild | None:
    rebuild = getattr(t, _ATTRIBUTE, None)
    if rebuild is None or t._version != rebuild.version:  # changed in place since: keep it as it is
        return None
    return rebuild


def save_state(ctx, t: Tensor | None) -> tuple[Tensor | None, ...]:
    """What a step's autograd context saves for the state ``t``: ``(t,)``, or the tensors of its rebuild
    (then :func:`saved_state` recomputes it). Pass the result to ``ctx.save_for_backward`` last."""
    rebuild = None if t is None else _rebuild_of(t)
    if rebuild is None:
        ctx.state_rebuild = None
        return (t,)
    ctx.state_rebuild = (rebuild.run, weakref.ref(t), rebuild.version)
    return rebuild.tensors


def saved_state(ctx, saved: tuple[Tensor | None, ...]) -> Tensor | None:
    """The state :func:`save_state` saved as ``saved`` (the tail of ``ctx.saved_tensors``), rebuilt if it
    was not kept."""
    if ctx.state_rebuild is None:
        return saved[0]
    run, marked, version = ctx.state_rebuild
    alive = marked()
    if alive is not None and alive._version != version:
        raise RuntimeError(
            "u_prev: one of the variables needed for gradient computation has been modified by an inplace "
            f"operation (a projected shortcut at version {alive._version}, expected {version})"
        )
    with torch.no_grad():
        return run(*saved)
