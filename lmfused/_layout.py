"""How an activation tensor is laid out in memory, seen as the 2-D row-major matrix the kernels walk.

Every backend views a dense (N, C, *spatial) tensor as M rows of L contiguous elements:

* channels-first (plain contiguous): M = N * C rows of L = prod(spatial); row m is channel m % C;
* channels-last (NHWC-like, and rank-2 (N, C)): M = N * prod(spatial) rows of L = C; column l is channel l.

A contiguous tensor with no spatial extent (N, C, 1, 1) is read as channels-last, its natural 2-D shape.
Channels-last tensors are read in place; any other strides are copied to contiguous first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Plan", "empty_in_layout", "is_channels_last_dense", "plan_layout", "to_layout"]


class Plan(NamedTuple):
    """The 2-D view of an activation: rows, row length, channels and rows per sample."""

    channels_last: bool
    rows: int  # M
    row_len: int  # L
    channels: int  # C
    rows_per_sample: int  # C (channels-first) or prod(spatial) (channels-last)


def _to_last(t: Tensor) -> Tensor:
    return t.permute(0, *range(2, t.dim()), 1)


def _from_last(t: Tensor) -> Tensor:
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def is_channels_last_dense(t: Tensor) -> bool:
    """True if ``t`` is dense with the channel dim (1) fastest: NHWC, NDHWC, ... (rank >= 3)."""
    # torch keeps this flag for ranks 4 and 5 (the same rule: size-1 dims are skipped), so no view is made.
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return t.dim() >= 3 and _to_last(t).is_contiguous()


def _spatial(shape: torch.Size) -> int:
    return math.prod(shape[2:])


def plan_layout(u: Tensor) -> Plan:
    """Choose the 2-D view for ``u``: channels-last if it already is (read in place), else channels-first."""
    n, c = u.shape[0], u.shape[1]
    spatial = _spatial(u.shape)
    if u.dim() == 2 or spatial == 1:
        channels_last = True
    elif u.is_contiguous():
        channels_last = False
    else:
        channels_last = is_channels_last_dense(u)
    if channels_last:
        return Plan(True, n * spatial, c, c, spatial)
    return Plan(False, n * c, spatial, c, c)


def to_layout(t: Tensor, channels_last: bool) -> Tensor:
    """``t`` in the planned layout: returned as is when it already is, copied otherwise."""
    if not channels_last or t.dim() == 2:
        return t.contiguous()
    if is_channels_last_dense(t):
        return t
    return _from_last(_to_last(t).contiguous())


def empty_in_layout(shape: torch.Size, channels_last: bool, *, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised tensor of ``shape`` in the planned layout."""
    if not channels_last or len(shape) == 2:
        return torch.empty(shape, dtype=dtype, device=device)
    last = (shape[0], *shape[2:], shape[1])
    return _from_last(torch.empty(last, dtype=dtype, device=device))
