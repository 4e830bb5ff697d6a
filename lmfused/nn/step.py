"""Residual and linear multi-step update modules, with stochastic depth and noise injection.

The LM architecture of Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks* (ICML 2018), eq. (5):

    u_{n+1} = (1 - k_n) u_n + k_n u_{n-1} + f(u_n),

with k_n learnable (initialised U[-0.1, 0] in the paper), generalises the ResNet step
u_{n+1} = u_n + f(u_n) (forward Euler; k_n = 0). Their section 3 adds stochastic training: stochastic
depth (the residual branch kept with probability p_n, the survival probability) and noise injection.
Both modules below run the whole update, including the per-sample stochastic-depth multiplier, the noise and
an optional ReLU, as one fused ``lmfused.lm_step``.

Stochastic depth convention (both modes): *inverted* scaling. In training the kept branch is multiplied by
1 / p (so the update is unbiased); at evaluation the branch is used as is (no mask, no scaling, no noise). The
original stochastic-depth paper (Huang et al., 2016) instead multiplies by p at evaluation; the two are the
same network up to that reparametrisation of f.

* ``mode="sample"``: a Bernoulli(p) mask per sample, drawn every training forward from torch's generator,
  divided by p and fused into the update as its ``scale``. The branch is always computed, so the autograd
  graph is the same every step (DDP needs no ``find_unused_parameters``).
* ``mode="batch"``: one Bernoulli(p) draw per step for the whole batch (Huang et al.; the LM-ResNet code). A
  block asks :meth:`ResidualStep.keep_branch` *before* computing its branch and skips it when dropped (real
  compute saved); the update then runs without f (the two-term update (1 - k) u_n + k u_{n-1}). A dropped
  block leaves its branch parameters without gradients, so DDP needs ``find_unused_parameters=True``.
  The draw comes from one dedicated CPU generator shared by all modules (seed it with
  :func:`seed_stochastic_depth`; its default seed is fixed), so every DDP rank that seeds it alike and runs
  the same forwards takes the same decisions, with no communication and no device sync. Recomputing a
  forward (activation checkpointing) draws again and is therefore not supported in batch mode.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral, Real

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from lmfused.batch_norm_step import batch_norm_lm_step, has_backend
from lmfused.ops import lm_step
from lmfused.reference import compute_dtype

# The update is a leaf for torch.fx: symbolic tracing (torch.fx.symbolic_trace, torchvision's
# create_feature_extractor, timm's FX feature extraction) records each call as one graph node instead of
# running the op's argument checks on proxies (the checks stay as they are: they run when the graph runs).
# A call that returns (out, shortcut) is one node; the steps below take it apart by indexing. The
# batch-norm ops need no such entry: while tracing, the norms stay modules (see fuses_batch_norm).
torch.fx.wrap("lm_step")

__all__ = [
    "FusionChoices",
    "LMStep",
    "ResidualStep",
    "linear_survival_schedule",
    "make_step",
    "seed_stochastic_depth",
    "stochastic_depth_generator",
]

MODES = ("sample", "batch")
DEFAULT_K_INIT = (-0.1, 0.0)  # the paper's U[-0.1, 0] initialisation of k_n
_BATCH_DROP_SEED = 0
_batch_drop_generator = torch.Generator().manual_seed(_BATCH_DROP_SEED)


# ----------------------------------------------------------------------------------------------------------
# Argument checks: every error names the argument (as the caller spells it) and says what was expected.
# ----------------------------------------------------------------------------------------------------------


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_survival_prob(value: object, name: str = "survival_prob") -> float:
    """``value`` as a float in (0, 1], else ValueError naming ``name``."""
    if not (_is_real(value) and 0.0 < float(value) <= 1.0):
        raise ValueError(f"{name}: expected a survival probability in (0, 1], got {value!r}")
    return float(value)


def check_mode(value: object, name: str = "mode") -> str:
    """``value`` if it is a stochastic-depth mode ("sample" or "batch"), else ValueError naming ``name``."""
    if value not in MODES:
        raise ValueError(f"{name}: expected one of {', '.join(repr(m) for m in MODES)}, got {value!r}")
    return str(value)


def check_noise_std(value: object, name: str = "noise_std") -> float:
    """``value`` as a finite float >= 0, else ValueError naming ``name``."""
    if not (_is_real(value) and math.isfinite(float(value)) and float(value) >= 0.0):
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def check_k_init(value: object, name: str = "k_init") -> tuple[float, float]:
    """``value`` (a number c, or bounds (low, high) with low <= high) as bounds; c becomes (c, c)."""
    if _is_real(value) and math.isfinite(float(value)):
        return float(value), float(value)
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(_is_real(v) and math.isfinite(float(v)) for v in value)
        and float(value[0]) <= float(value[1])
    ):
        return float(value[0]), float(value[1])
    raise ValueError(f"{name}: expected a number or bounds (low, high) with low <= high, got {value!r}")


def _check_channels(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"channels: expected a positive int or None, got {value!r}")
    return int(value)


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is a bool, else TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Schedules and the batch-mode generator
# ----------------------------------------------------------------------------------------------------------


def linear_survival_schedule(num_blocks: int, final_survival_prob: float) -> list[float]:
    """Linearly decaying survival probabilities p_l = 1 - l / L * (1 - p_L), l = 1..L.

    The "linear decay rule" of stochastic depth as Huang et al. (2016) write it: the first block is dropped
    with probability (1 - p_L) / L, the last one kept with p_L. The stochastic LM-ResNet of Lu et al. (ICML
    2018, section 3.2) follows the same rule in spirit, but the authors' code (2prime/LM-ResNet, MResNet.py)
    spaces the drop rates over l = 0..L-1, d_l = l / (L - 1) * (1 - p_L), so that their first block is never
    dropped; this schedule is Huang et al.'s, not theirs.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, Integral) or num_blocks < 0:
        raise ValueError(f"num_blocks: expected an int >= 0, got {num_blocks!r}")
    p_final = check_survival_prob(final_survival_prob, "final_survival_prob")
    return [1.0 - (index / num_blocks) * (1.0 - p_final) for index in range(1, num_blocks + 1)]


def seed_stochastic_depth(seed: int) -> None:
    """Seed the CPU generator behind every batch-mode drop decision (:meth:`ResidualStep.keep_branch`).

    Under DDP, call it with the same seed on every rank (the default seed is fixed, so unseeded ranks agree
    too): all ranks then drop the same blocks on the same steps without any communication.
    """
    _batch_drop_generator.manual_seed(int(seed))


def stochastic_depth_generator() -> torch.Generator:
    """The CPU generator behind every batch-mode drop decision, e.g. to checkpoint its state for an exact
    resume (``get_state`` / ``set_state``)."""
    return _batch_drop_generator


def batch_norm_call(norm: nn.BatchNorm2d) -> tuple[Tensor | None, Tensor | None, bool, float]:
    """(running_mean, running_var, training, momentum) as ``nn.BatchNorm2d.forward`` passes them to
    F.batch_norm, advancing ``num_batches_tracked`` as it does (momentum None: the cumulative average)."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    batch_statistics = norm.training or (norm.running_mean is None and norm.running_var is None)
    tracked = not norm.training or norm.track_running_stats
    running_mean = norm.running_mean if tracked else None
    running_var = norm.running_var if tracked else None
    return running_mean, running_var, batch_statistics, momentum


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward hooks (its own or global ones): a fused kernel that does
    the module's work without calling it would silently skip them."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or torch.nn.modules.module._global_forward_hooks
        or torch.nn.modules.module._global_forward_pre_hooks
    )


def device_type_of(x: Tensor) -> str | None:
    """``x.device.type``, or None while torch.fx traces (``x`` a Proxy: the device is known when the graph
    runs)."""
    return None if isinstance(x, torch.fx.Proxy) else x.device.type


def fuses_batch_norm(norm: nn.Module, backend: str | None, device_type: str | None) -> bool:
    """Whether a block's norm can run inside an lmfused kernel (``batch_norm_lm_step``, ``batch_norm_relu``):
    a plain ``nn.BatchNorm2d`` (not SyncBatchNorm, GroupNorm or a subclass) without forward hooks, a backend
    of that op for the device, and ``LMFUSED_FUSE_BN`` not set to 0.

    Never while torch.fx traces (``device_type`` None, see :func:`device_type_of`): the norm then stays a
    module, a leaf of the graph. In training the fused call advances ``num_batches_tracked`` on the host,
    which a graph would not repeat; and with the norms as modules in both modes, the train and eval graphs
    have the same nodes (torchvision's feature extraction warns when they differ)."""
    return (
        device_type is not None
        and type(norm) is nn.BatchNorm2d
        and not has_hooks(norm)
        and os.environ.get("LMFUSED_FUSE_BN", "1") != "0"
        and has_backend(backend, device_type)
    )


class FusionChoices:
    """A module's decisions whether each of its norms runs inside an lmfused kernel
    (:func:`fuses_batch_norm`), made on a norm's first use and again only when something the answer depends
    on changes: the input's device and dtype, the norm's type and hooks (and global hooks), the backend and
    the settings (LMFUSED_FUSE_BN, LMFUSED_BACKEND, TRITON_INTERPRET). (Not asked while torch.compile
    traces: see lmfused.nn.blocks.decides_fusion.)"""

    def __init__(self) -> None:
        self._decided: dict[int, tuple[tuple, bool]] = {}  # id(norm) -> (what it depended on, answer)

    @staticmethod
    def _key(norm: nn.Module, backend: str | None, x: Tensor) -> tuple:
        device_type = device_type_of(x)
        environment = tuple(
            os.environ.get(v) for v in ("LMFUSED_FUSE_BN", "LMFUSED_BACKEND", "TRITON_INTERPRET")
        )
        dtype = None if device_type is None else x.dtype
        return device_type, dtype, type(norm), has_hooks(norm), backend, environment

    def fuses(self, norm: nn.Module, backend: str | None, x: Tensor) -> bool:
        """Whether ``norm`` runs inside an lmfused kernel on ``x`` (see :func:`fuses_batch_norm`)."""
        key = self._key(norm, backend, x)
        decided = self._decided.get(id(norm))
        if decided is None or decided[0] != key:
            decided = key, fuses_batch_norm(norm, backend, key[0])
            self._decided[id(norm)] = decided
        return decided[1]

    def decided(self, norm: nn.Module) -> tuple[bool, str] | None:
        """(the answer, where it was decided: "device dtype") for ``norm``, or None before its first use."""
        decided = self._decided.get(id(norm))
        if decided is None:
            return None
        (device_type, dtype, *_), fused = decided
        where = str(device_type) if dtype is None else f"{device_type} {str(dtype).removeprefix('torch.')}"
        return fused, where


def decomposes_under_compile() -> bool:
    """True while torch.compile traces with ``LMFUSED_COMPILE_JUNCTION=decompose``: the junction is then
    traced as plain PyTorch ops (F.batch_norm and the update's composition, float32 arithmetic), which
    Inductor fuses with its neighbours itself. The default, ``op``, traces the registered lmfused ops,
    which Inductor keeps as they are (docs/ops.md: which is faster where is for a GPU run to say)."""
    return torch.compiler.is_compiling() and os.environ.get("LMFUSED_COMPILE_JUNCTION", "op") == "decompose"


def _out_and_shortcut(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(out, shortcut) of a ``return_shortcut=True`` call, taken apart by indexing: under torch.fx the call is
    one node, not a tuple. The shortcut is taken first, so that out is the block's last node: torchvision's
    feature extraction takes a module's last node as its output."""
    shortcut = pair[1]
    return pair[0], shortcut


def plain_update(
    u: Tensor, u_prev: Tensor | None, f: Tensor | None, k: Tensor | None, scale: Tensor | None, relu: bool,
    noise_std: float,
) -> Tensor:  # fmt: skip
    """The LM update (Lu et al., ICML 2018, eq. 5) as plain PyTorch ops, with the fused op's numerics: what
    torch.compile traces with ``LMFUSED_COMPILE_JUNCTION=decompose`` and what bench.models' plain-PyTorch
    network runs. k is viewed as (1, C or 1, 1, 1) in the compute dtype (float32; float64 for float64
    states), so type promotion computes every term in it from the bf16 states (exact upcasts, nothing cast
    in memory) and the sum is rounded once to the states' dtype, before the ReLU (which commutes with
    rounding: the same bits, and the ReLU keeps its output in the states' dtype for its backward, not in
    float32). ``k`` None: the ResNet step ``act(u + s f + noise)``, which without scale or noise is the
    states' own addition, rounded once, as torchvision's ``out += identity``."""
    out = u
    if k is not None:
        kc = k.reshape((1, -1) + (1,) * (u.dim() - 2)).to(compute_dtype(u.dtype))
        out = (1 - kc) * u + kc * u_prev
    if f is not None:
        out = out + (f if scale is None else scale.reshape((-1,) + (1,) * (u.dim() - 1)) * f)
    if noise_std > 0:
        dtype = torch.promote_types(u.dtype, torch.float32)
        out = out + noise_std * torch.randn(u.shape, dtype=dtype, device=u.device)
    out = out.to(u.dtype)
    return torch.relu(out) if relu else out


# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


class ResidualStep(nn.Module):
    """The ResNet step ``act(u + s * f + noise_std * xi)`` with stochastic depth and noise injection.

    The plain (forward Euler) update of Lu et al. (ICML 2018, section 2), used by the blocks that carry no
    LM coefficient: a stage's first block, blocks that change shape, and every block of a plain ResNet.
    It is the LM step with k = 0, run as one fused ``lmfused.lm_step`` (ReLU, scale and noise included).

    Args:
        survival_prob: probability p of keeping the residual branch in training (1 = no stochastic depth).
        mode: "sample" (per-sample mask, fused) or "batch" (one draw per step, dropped branch not computed;
            DDP then needs ``find_unused_parameters=True``). See the module docstring.
        noise_std: standard deviation of the Gaussian noise added in training (Lu et al., section 3.1).
        relu: apply ReLU after the update (post-activation blocks), fused into the same kernel.
        backend: lm_step backend ("cuda", "triton", "reference"); None chooses automatically.
    """

    def __init__(
        self,
        *,
        survival_prob: float = 1.0,
        mode: str = "sample",
        noise_std: float = 0.0,
        relu: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.survival_prob = check_survival_prob(survival_prob)
        self.mode = check_mode(mode)
        self.noise_std = check_noise_std(noise_std)
        self.relu = check_bool(relu, "relu")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend: expected a str or None, got {type(backend).__name__}")
        self.backend = backend
        # k = 0 as a non-persistent buffer: follows .to(device), adds no state_dict key and no parameter.
        self.register_buffer("zero_k", torch.zeros(1), persistent=False)

    @property
    def stochastic(self) -> bool:
        """True if this module currently drops branches (training with survival_prob < 1)."""
        return self.training and self.survival_prob < 1.0

    @property
    def draws_on_host(self) -> bool:
        """True if :meth:`keep_branch` draws this forward (training, batch mode, survival_prob < 1): a host
        decision, which a torch.fx graph would fix at the draw made while tracing."""
        return self.mode == "batch" and self.stochastic

    def keep_branch(self) -> bool:
        """Whether the block should compute its residual branch this forward.

        Always True except in training, batch mode, survival_prob < 1, where it is one Bernoulli(p) draw from
        the shared batch-mode generator (see :func:`seed_stochastic_depth`). Blocks call it once per forward,
        before computing the branch, and pass ``f=None`` to the update when it returns False.
        """
        if not self.draws_on_host:
            return True
        return bool(torch.rand((), generator=_batch_drop_generator).item() < self.survival_prob)

    def _scale(self, u: Tensor, f: Tensor | None) -> Tensor | None:
        """The per-sample branch multiplier (N,) for this forward, or None for 1."""
        if f is None or not self.stochastic:
            return None
        p = self.survival_prob
        if self.mode == "sample":
            return torch.empty(u.shape[0], device=u.device).bernoulli_(p).div_(p)
        return torch.full((u.shape[0],), 1.0 / p, device=u.device)  # batch mode, branch kept

    def _update(self, u: Tensor, u_prev: Tensor, f: Tensor | None, k: Tensor) -> tuple[Tensor, Tensor]:
        """Run the fused update, after casting the states to the branch's dtype; returns (out, shortcut),
        the shortcut being u for the next step's u_prev (gradient pass-through, see
        :func:`lmfused.lm_step`).

        Under autocast the branch (conv/BN outputs) may be in bf16/fp16 while a shortcut is fp32; like
        torchvision's in-place ``out += identity``, the result takes the branch's dtype.
        """
        dtype = f.dtype if f is not None else u.dtype
        u, u_prev = u.to(dtype), u_prev.to(dtype)
        noise_std = self.noise_std if self.training else 0.0
        if decomposes_under_compile():
            return plain_update(u, u_prev, f, k, self._scale(u, f), self.relu, noise_std), u
        pair = lm_step(
            u,
            u_prev,
            f,
            k,
            scale=self._scale(u, f),
            relu=self.relu,
            noise_std=noise_std,
            backend=self.backend,
            return_shortcut=True,
        )
        return _out_and_shortcut(pair)

    def _batch_norm_update(
        self, u: Tensor, u_prev: Tensor, x: Tensor, norm: nn.BatchNorm2d, k: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The update with f = norm(x) computed inside it (DESIGN.md 1b); the states take x's dtype.
        Returns (out, shortcut) as :meth:`_update`."""
        u, u_prev = u.to(x.dtype), u_prev.to(x.dtype)
        running_mean, running_var, training, momentum = batch_norm_call(norm)
        if decomposes_under_compile():
            f = F.batch_norm(
                x, running_mean, running_var, norm.weight, norm.bias, training, momentum, norm.eps
            )
            noise_std = self.noise_std if self.training else 0.0
            return plain_update(u, u_prev, f, k, self._scale(u, f), self.relu, noise_std), u
        pair = batch_norm_lm_step(
            x,
            running_mean,
            running_var,
            norm.weight,
            norm.bias,
            u,
            u_prev,
            k,
            training=training,
            momentum=momentum,
            eps=norm.eps,
            scale=self._scale(u, x),
            relu=self.relu,
            noise_std=self.noise_std if self.training else 0.0,
            backend=self.backend,
            return_shortcut=True,
        )
        return _out_and_shortcut(pair)

    def fuses_batch_norm(self, norm: nn.Module, x: Tensor) -> bool:
        """Whether :meth:`batch_norm_update` can run ``norm`` on ``x`` inside the update."""
        return fuses_batch_norm(norm, self.backend, device_type_of(x))

    def batch_norm_update(self, u: Tensor, u_prev: Tensor | None, x: Tensor, norm: nn.BatchNorm2d) -> Tensor:
        """``act(u + s * norm(x) + noise)`` with the branch's last BatchNorm fused in: its output f and f's
        gradient are never written. ``u_prev`` is not used by the ResNet step (same signature as LMStep's)."""
        return self.batch_norm_update_and_shortcut(u, u_prev, x, norm)[0]

    def batch_norm_update_and_shortcut(
        self, u: Tensor, u_prev: Tensor | None, x: Tensor, norm: nn.BatchNorm2d
    ) -> tuple[Tensor, Tensor]:
        """(:meth:`batch_norm_update`, the shortcut for the next step's u_prev): see
        :meth:`update_and_shortcut`."""
        return self._batch_norm_update(u, u.detach(), x, norm, self.zero_k)

    def residual_update(self, u: Tensor, f: Tensor | None) -> Tensor:
        """``act(u + s * f + noise)``: the ResNet step (``f=None``: the branch was dropped)."""
        return self.update_and_shortcut(u, None, f)[0]

    def update_and_shortcut(
        self, u: Tensor, u_prev: Tensor | None, f: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(the update, the shortcut): the shortcut is u (in the update's dtype), for the next step's u_prev.

        Given to the next step, its gradient comes back into this step's backward kernel, which adds it into
        grad_u (gradient pass-through, :func:`lmfused.lm_step`): the same values and
        gradients as passing u itself, without autograd's separate addition. ``u_prev`` is not used by the
        ResNet step (same signature as LMStep's).
        """
        # u_prev = u.detach() contributes k * u_prev = 0 and, being detached, asks for no extra gradient.
        return self._update(u, u.detach(), f, self.zero_k)

    def forward(self, u: Tensor, f: Tensor | None) -> Tensor:
        """The ResNet step u + f(u) (with stochastic depth, noise and ReLU as configured)."""
        return self.residual_update(u, f)

    def extra_repr(self) -> str:
        parts = [f"survival_prob={self.survival_prob}", f"mode={self.mode!r}", f"noise_std={self.noise_std}"]
        parts.append(f"relu={self.relu}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class LMStep(ResidualStep):
    """The linear multi-step update of Lu et al. (ICML 2018, eq. 5), holding the learnable coefficient k.

    ``forward(u, u_prev, f) = act((1 - k) * u + k * u_prev + s * f + noise_std * xi)``, fused into one
    ``lmfused.lm_step``; s is the stochastic-depth multiplier (see :class:`ResidualStep` and the module
    docstring). With ``u_prev=None`` (no previous state) it is the ResNet step u + f. In batch mode a block
    calls :meth:`keep_branch` first and passes ``f=None`` when dropped; under DDP this leaves the branch's
    parameters without gradients on that step, so wrap the model with ``find_unused_parameters=True``
    (sample mode needs no such flag: the graph is the same every step).

    Args:
        channels: None for one scalar k (shape (1,)), or C for one k per channel (shape (C,)). k is never
            0-dim (FSDP rejects 0-dim parameters) and always float32.
        survival_prob, mode, noise_std, relu, backend: as for :class:`ResidualStep`.
        k_init: bounds (low, high) of the uniform initialisation of k (the paper's U[-0.1, 0] by default),
            or a number for a constant initialisation (0.0 starts from exactly the ResNet step).
    """

    def __init__(
        self,
        channels: int | None = None,
        *,
        survival_prob: float = 1.0,
        mode: str = "sample",
        noise_std: float = 0.0,
        relu: bool = False,
        k_init: float | tuple[float, float] = DEFAULT_K_INIT,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            survival_prob=survival_prob, mode=mode, noise_std=noise_std, relu=relu, backend=backend
        )
        self.channels = _check_channels(channels)
        self.k_init = check_k_init(k_init)
        self.k = nn.Parameter(torch.empty(self.channels or 1, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw k from U(k_init) (a constant when both bounds are equal)."""
        low, high = self.k_init
        with torch.no_grad():
            if low == high:
                self.k.fill_(low)
            else:
                self.k.uniform_(low, high)

    def forward(self, u: Tensor, u_prev: Tensor | None, f: Tensor | None) -> Tensor:
        """The LM update (``f=None``: two-term update of a dropped branch; ``u_prev=None``: ResNet step)."""
        return self.update_and_shortcut(u, u_prev, f)[0]

    def update_and_shortcut(
        self, u: Tensor, u_prev: Tensor | None, f: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(:meth:`forward`, the shortcut for the next step's u_prev), see
        :meth:`ResidualStep.update_and_shortcut`."""
        if u_prev is None:
            return super().update_and_shortcut(u, None, f)
        return self._update(u, u_prev, f, self.k)

    def batch_norm_update_and_shortcut(
        self, u: Tensor, u_prev: Tensor | None, x: Tensor, norm: nn.BatchNorm2d
    ) -> tuple[Tensor, Tensor]:
        """The LM update with f = norm(x), the branch's last BatchNorm, fused in (``u_prev=None``: the
        ResNet step), and the shortcut for the next step's u_prev."""
        if u_prev is None:
            return super().batch_norm_update_and_shortcut(u, None, x, norm)
        return self._batch_norm_update(u, u_prev, x, norm, self.k)

    def extra_repr(self) -> str:
        low, high = self.k_init
        k_init = low if low == high else (low, high)
        return f"channels={self.channels}, k_init={k_init}, " + super().extra_repr()


def make_step(
    *,
    lm: bool,
    channels: int,
    per_channel_k: bool = False,
    k_init: float | tuple[float, float] = DEFAULT_K_INIT,
    survival_prob: float = 1.0,
    mode: str = "sample",
    noise_std: float = 0.0,
    relu: bool = False,
    backend: str | None = None,
) -> ResidualStep:
    """An :class:`LMStep` (``lm=True``; per-channel k over ``channels`` if ``per_channel_k``) or a
    :class:`ResidualStep`, configured alike: the one place models and the converter build updates."""
    common = dict(survival_prob=survival_prob, mode=mode, noise_std=noise_std, relu=relu, backend=backend)
    if lm:
        return LMStep(channels if per_channel_k else None, k_init=k_init, **common)
    return ResidualStep(**common)
