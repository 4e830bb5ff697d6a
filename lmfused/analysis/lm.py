"""The learned LM coefficients k_n and their modified-equation reading (Lu, Zhong, Li & Dong, ICML 2018).

The LM architecture steps u_{n+1} = (1 - k_n) u_n + k_n u_{n-1} + dt f(u_n) (in a network the residual
branch is dt f, so dt = 1 in network units). Expanding u_{n+1} = u(t + dt) and u_{n-1} = u(t - dt) about
t = t_n in Taylor series:

    u_{n+1} - (1 - k) u_n - k u_{n-1} = (1 + k) dt u' + (1 - k) dt^2/2 u'' + (1 + k) dt^3/6 u''' + O(dt^4),

so, dividing by dt, the scheme is a second-order accurate discretisation of the *modified equation*
(Lu et al., section on modified equations)

    (1 + k) u' + (1 - k) (dt / 2) u'' = f(u),  i.e.  u' + c u'' = f(u) / (1 + k),  c = (1-k) dt / (2 (1+k)),

while it approximates the plain ODE (1 + k) u' = f(u) only to first order (its local error is
(1 - k) dt^2/2 u''). Two readings follow, reported per block by :func:`lm_coefficients`:

- ``dt_eff = dt / (1 + k)``: to first order each block moves the state by dt_eff f(u_n), a forward-Euler step
  of u' = f with step dt_eff: k < 0 lengthens the step (fewer blocks cover the same time: the compression
  Lu et al. observe), k > 0 shortens it;
- ``inertia = c = (1 - k) dt / (2 (1 + k))``: the weight of the second-order term, the mass in the damped
  dynamics c u'' + u' = f / (1 + k) (plain ResNet, k = 0, has c = dt / 2).

The scheme is zero-stable (its homogeneous recursion stays bounded) iff the roots of
rho(z) = z^2 - (1 - k) z - k = (z - 1)(z + k) satisfy the root condition, i.e. -1 < k <= 1.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from lmfused.analysis.blocks import find_lm_blocks

__all__ = ["block_lm_coefficient", "lm_coefficients", "modified_equation_coefficients"]


def modified_equation_coefficients(
    k: float | Tensor, dt: float = 1.0
) -> tuple[float | Tensor, float | Tensor]:
    """``(dt_eff, inertia) = (dt / (1 + k), (1 - k) dt / (2 (1 + k)))`` for an LM coefficient k.

    The LM step with coefficient k is a second-order discretisation of u' + inertia * u'' = f(u) / (1 + k),
    the modified equation of Lu et al. (ICML 2018) divided by (1 + k); see the module docstring. ``k`` may
    be a number (floats returned) or a tensor (float64 tensors returned, elementwise); k = -1 gives inf.

    Raises:
        ValueError: ``dt`` is not a finite positive number.
    """
    if isinstance(dt, bool) or not isinstance(dt, Real) or not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt: expected a finite number > 0, got {dt!r}")
    kk = torch.as_tensor(k.detach() if isinstance(k, Tensor) else k, dtype=torch.float64)
    dt_eff = dt / (1.0 + kk)  # 1 + k = 0 divides to inf, as it should
    inertia = (1.0 - kk) * dt / (2.0 * (1.0 + kk))
    if isinstance(k, Tensor):
        return dt_eff, inertia
    return float(dt_eff), float(inertia)


def block_lm_coefficient(block: nn.Module) -> nn.Parameter | None:
    """The LM coefficient parameter ``k`` of a block (held by its LMStep submodule), or None (plain block)."""
    for module in block.modules():
        k = getattr(module, "k", None)
        if isinstance(k, nn.Parameter):
            return k
    return None


def lm_coefficients(model: nn.Module, *, dt: float = 1.0) -> list[dict[str, Any]]:
    """The learned k_n of every LM block of ``model`` and its modified-equation reading (Lu et al., 2018).

    One dict per block (order and indices as in :func:`~lmfused.analysis.FlowRecorder`): ``name``, ``stage``,
    ``block``, ``channels`` (1 for a scalar k, C for a per-channel k), the summary ``k`` (mean), ``k_std``,
    ``k_min``, ``k_max``, and, per channel then averaged, ``dt_eff = dt / (1 + k)`` and
    ``inertia = (1 - k) dt / (2 (1 + k))`` (see :func:`modified_equation_coefficients`), and ``zero_stable``
    (every channel has -1 < k <= 1). Blocks without a k (plain ResNet blocks) report None for all of these.
    ``dt`` is the step the residual branch stands for: 1 in network units.
    """
    rows = []
    for info in find_lm_blocks(model):
        row: dict[str, Any] = {"name": info.name, "stage": info.stage, "block": info.index}
        param = block_lm_coefficient(info.module)
        if param is None:
            keys = ("channels", "k", "k_std", "k_min", "k_max", "dt_eff", "inertia", "zero_stable")
            row.update(dict.fromkeys(keys))
        else:
            k = param.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            dt_eff, inertia = modified_equation_coefficients(k, dt)
            row.update(
                channels=k.numel(),
                k=float(k.mean()),
                k_std=float(k.std(unbiased=False)),
                k_min=float(k.min()),
                k_max=float(k.max()),
                dt_eff=float(dt_eff.mean()),
                inertia=float(inertia.mean()),
                zero_stable=bool(((k > -1) & (k <= 1)).all()),
            )
        rows.append(row)
    return rows
