"""A step's output handed to the next step as an autograd input of its own (the gradient handoff).

In a chain of LM blocks the output u_{n+1} of one step feeds the next block twice: its branch's first
convolution and its step (as u). Given the same tensor, autograd adds the two gradients in a separate kernel
(read 2, write 1) and the step's backward then reads the sum in both of its passes. Instead, a step with
states (:func:`lmfused.batch_norm_lm_step`) returns a second tensor object over the same memory, the
*handoff*, and records it on its output; the next step (:func:`lmfused.lm_step` or batch_norm_lm_step)
takes the handoff in place of its u. The two gradients then reach the first step's backward separately
(``grad_out`` from the convolution, ``grad_handoff`` from the next step) and its kernels add them in
registers as they read them: per junction 1 X less traffic (X = the bytes of u), as ``python -m bench.traffic
--blocks`` counts. Values and gradients are those of passing the output itself.

Only eager autograd sees the record (an attribute of the tensor object); under torch.compile nothing is
handed off. Nor while saved-tensor hooks are active (activation checkpointing, offloading to the CPU): there
the memory of the backward is the point, and the two gradient parts, live at once until the step's backward
has read them, would raise its peak by one activation where autograd's addition frees one of them first.
An output changed in place after it was recorded is not handed off (the in-place op's gradient would be
skipped): the next step then takes it as it is. ``LMFUSED_GRADIENT_PASSTHROUGH=0`` turns the handoff
off, with the shortcut pass-through, to measure what both save.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmfused.op_support import passes_gradients

__all__ = ["offer", "offers", "take"]

_ATTRIBUTE = "_lmfused_handoff"


def _saved_tensor_hooks_active() -> bool:
    """Whether the tensors autograd saves now go through saved-tensor hooks (torch.utils.checkpoint without
    reentrance, torch.autograd.graph.save_on_cpu), as torch.utils.checkpoint itself asks."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def offers() -> bool:
    """Whether a step called now hands its output off: ``LMFUSED_GRADIENT_PASSTHROUGH`` not 0
    (:func:`lmfused.op_support.passes_gradients`) and no saved-tensor hooks active."""
    return passes_gradients() and not _saved_tensor_hooks_active()


def offer(out: Tensor, handoff: Tensor) -> Tensor:
    """Record on ``out`` that the next step should take ``handoff`` (the same memory and values, another
    autograd output of the same step) as its u. ``handoff`` must not refer back to ``out`` (no cycle: it is
    freed with ``out``)."""
    setattr(out, _ATTRIBUTE, (handoff, out._version))
    return out


def take(u: Tensor) -> Tensor:
    """The handoff recorded on ``u`` if there is one and ``u`` has not changed in place since, else ``u``."""
    recorded = getattr(u, _ATTRIBUTE, None)
    if recorded is None or not passes_gradients():
        return u
    handoff, version = recorded
    return handoff if u._version == version else u
