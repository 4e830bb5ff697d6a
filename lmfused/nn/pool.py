"""A max pooling that keeps no indices for its backward.

``nn.MaxPool2d`` in training keeps its input and an int64 index per output element for the backward: in a
ResNet stem at batch 64 and 224 px, 102.8 MB of indices beside the 102.8 MB input. The input alone
determines them, so :class:`MaxPool2d` keeps only the input and its backward finds them again by the same
pooling (bitwise the same indices, so bitwise the same gradient), for as long as the backward needs them.
It is the zoo's stem pooling: what lets an LM network keep no more than torchvision's plain twin, whose
1-bit ReLU masks it pays for here.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaxPool2d"]


class _MaxPoolFindingIndices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, pool: tuple) -> Tensor:
        ctx.save_for_backward(x)
        ctx.pool = pool
        return F.max_pool2d(x, *pool)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.pool
        with torch.no_grad():
            _, indices = F.max_pool2d(x, *ctx.pool, return_indices=True)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out, x, kernel_size, stride, padding, dilation, ceil_mode, indices
        )
        return grad_x, None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments and results) whose training step keeps its input only, not the
    indices of the maxima: its backward pools the input again for them.

    Under torch.fx tracing and torch.compile it is ``nn.MaxPool2d`` itself (the compiler chooses what to
    keep), and so it is with ``return_indices=True``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.return_indices
            or isinstance(x, torch.fx.Proxy)
            or torch.compiler.is_compiling()
            or not (torch.is_grad_enabled() and x.requires_grad)
        ):
            return super().forward(x)
        pool = (self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return _MaxPoolFindingIndices.apply(x, pool)
