"""Recording the flow of states through an LM network, and per-block transport metrics.

Sonoda & Murata (*Transport analysis of infinitely deep neural network*, JMLR 2019) read a residual network
as a broken-line (Euler) approximation of a flow dx/dt = v_t(x): block n moves every sample from u_n to
u_{n+1}, with velocity v_n = u_{n+1} - u_n, and pushes the data distribution forward. :class:`FlowRecorder`
captures the states u_n of a batch, stage by stage, with forward hooks; :func:`transport_metrics` turns them
into the quantities that reading is about: how far each block moves the samples, with how much kinetic
energy, how straight the path is, how the entropy of the (Gaussian-fitted) feature distribution changes,
and the Wasserstein distance each block transports it over.

The model protocol (lmfused.nn and lmfused.models, and converted torchvision/timm ResNets): every block is a
module with ``is_lm_block = True`` whose ``forward(u, u_prev)`` returns ``(u_next, u_shortcut)``; stages are
modules with ``is_lm_stage = True`` that contain the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmfused.analysis.blocks import BlockInfo, find_lm_blocks
from lmfused.analysis.gaussian import Shrinkage, gaussian_entropy_of_cov, gaussian_fit, gaussian_w2
from lmfused.analysis.lm import lm_coefficients

__all__ = [
    "FlowRecorder",
    "FlowState",
    "analyze_flow",
    "group_trajectories",
    "pooled_features",
    "transport_metrics",
]


@dataclass(frozen=True)
class FlowState:
    """One recorded state of a batch: the input of a stage (``is_input``) or the output of a block.

    ``index`` is the block's 0-based index within its stage (0 for the stage input, which is recorded as the
    input of the stage's first block and carries that block's name); ``depth`` is the position along the
    stage's trajectory: 0 for the stage input, ``index + 1`` after block ``index``. ``pass_index`` counts
    the model's forward calls inside the recorder, so several batches can be told apart.
    """

    name: str
    stage: int
    index: int
    is_input: bool
    tensor: Tensor
    pass_index: int

    @property
    def depth(self) -> int:
        """Position along the stage's trajectory: 0 = the stage input, n = after the n-th block."""
        return 0 if self.is_input else self.index + 1


class FlowRecorder:
    """Records the state after every LM block (and each stage's input) while ``model`` runs a batch.

    Usage::

        with FlowRecorder(model) as rec:
            logits = model(x)                    # the outputs are exactly those without the recorder
        rec.states                               # list[FlowState], in execution order
        rec.trajectories()                       # {stage: [input, after block 0, after block 1, ...]}

    Forward hooks on every block record ``output[0]`` (u_{n+1}; blocks return ``(u_next, u_shortcut)``) and
    a pre-hook records ``u`` entering each stage's first block. Recorded tensors are detached copies (later
    in-place operations cannot change them), optionally moved to ``device`` (e.g. "cpu" to spare GPU memory).
    The hooks return nothing, so the computation is untouched; they are removed on exit.

    Raises:
        ValueError: ``model`` has no module with ``is_lm_block``.
    """

    def __init__(self, model: nn.Module, *, device: torch.device | str | None = None) -> None:
        self.model = model
        self.blocks = find_lm_blocks(model)
        if not self.blocks:
            raise ValueError(
                "model: no module with is_lm_block = True (expected an lmfused model or converted ResNet)"
            )
        self.device = torch.device(device) if device is not None else None
        self.states: list[FlowState] = []
        self._pass = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _keep(self, t: Tensor) -> Tensor:
        return t.detach().to(device=self.device or t.device, copy=True)

    def _record(self, info: BlockInfo, tensor: object, *, is_input: bool) -> None:
        if isinstance(tensor, Tensor):
            state = FlowState(info.name, info.stage, info.index, is_input, self._keep(tensor), self._pass)
            self.states.append(state)

    def _output_hook(self, info: BlockInfo):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._record(info, output[0] if isinstance(output, tuple | list) else output, is_input=False)

        return hook

    def _input_hook(self, info: BlockInfo):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._record(info, args[0] if args else kwargs.get("u"), is_input=True)

        return hook

    def _count_pass(self, module: nn.Module, args: tuple) -> None:
        self._pass += 1

    def __enter__(self) -> FlowRecorder:
        if self._handles:
            raise RuntimeError("FlowRecorder: already recording (the context manager is not re-entrant)")
        self._handles.append(self.model.register_forward_pre_hook(self._count_pass))
        for info in self.blocks:
            self._handles.append(info.module.register_forward_hook(self._output_hook(info)))
            if info.index == 0:
                hook = self._input_hook(info)
                self._handles.append(info.module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (done on exit from the ``with`` block)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget the recorded states (e.g. between batches)."""
        self.states.clear()

    def trajectories(self, pass_index: int = -1) -> dict[int, list[FlowState]]:
        """The states of one forward pass grouped per stage, ordered by depth (:func:`group_trajectories`)."""
        return group_trajectories(self.states, pass_index)


def group_trajectories(states: Sequence[FlowState], pass_index: int = -1) -> dict[int, list[FlowState]]:
    """Group recorded states per stage, ordered by depth (stage input first).

    Only states of one forward pass are kept: ``pass_index`` indexes the passes recorded, in order (0: the
    first, -1 (default): the last). A state recorded twice in that pass (a block called twice) keeps its
    last value.

    Raises:
        IndexError: ``pass_index`` is out of range for the passes recorded.
    """
    if not states:
        return {}
    passes = sorted({s.pass_index for s in states})
    if not -len(passes) <= pass_index < len(passes):
        raise IndexError(f"pass_index: {pass_index} is out of range for the {len(passes)} passes recorded")
    chosen = passes[pass_index]
    by_position: dict[tuple[int, int], FlowState] = {}
    for s in states:
        if s.pass_index == chosen:
            by_position[(s.stage, s.depth)] = s
    grouped: dict[int, list[FlowState]] = {}
    for stage, depth in sorted(by_position):
        grouped.setdefault(stage, []).append(by_position[(stage, depth)])
    return grouped


def pooled_features(x: Tensor) -> Tensor:
    """Global average pool over the spatial dims: (N, C, *spatial) -> (N, C) samples of the channels."""
    return x.flatten(2).mean(-1) if x.dim() > 2 else x.reshape(x.shape[0], -1)


def _velocity_stats(velocity: Tensor) -> tuple[float, float]:
    """(mean over samples of ||v||_2 / sqrt(D), 0.5 * mean of v^2): dimension-free step size and energy."""
    v = velocity.flatten(1).double()
    squared = v.pow(2).mean(1)  # ||v_i||^2 / D per sample
    return float(squared.sqrt().mean()), 0.5 * float(squared.mean())


def _mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over samples of cos(a_i, b_i); a sample with a zero vector contributes 0."""
    return float(nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean())


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def transport_metrics(
    source: FlowRecorder | Sequence[FlowState] | Mapping[int, Sequence[FlowState]],
    *,
    shrinkage: Shrinkage = "ledoit-wolf",
    pass_index: int = -1,
) -> list[dict[str, Any]]:
    """Per-block transport metrics of a recorded forward pass (Sonoda & Murata, JMLR 2019).

    Block n of a stage moves the batch from u_n to u_{n+1} with velocity v_n = u_{n+1} - u_n (one Euler step
    of the flow the network approximates). For each block, one dict with:

    - ``name``, ``stage``, ``block`` (index in the stage), ``depth`` (0-based index over all blocks),
      ``shape`` (of u_{n+1}, without the batch dim);
    - ``displacement``: mean over samples of ||v_n||_2 / sqrt(D) (D = elements per sample), a step size that
      does not grow with the feature size;
    - ``kinetic_energy``: 0.5 * mean of v_n^2 over samples and elements (0.5 |v|^2 per dimension);
    - ``cosine``: mean over samples of cos(v_n, v_{n-1}): 1 for a straight path, < 0 for a path that turns
      back;
    - ``entropy``: entropy (nats) of the Gaussian fitted to the pooled features of u_{n+1} (global average
      pool -> (M, C) samples, :func:`~lmfused.analysis.gaussian_entropy`);
    - ``w2``: 2-Wasserstein distance between the Gaussian fits of the pooled u_n and u_{n+1}
      (:func:`~lmfused.analysis.gaussian_w2`), i.e. how far the block transports the feature distribution.

    Velocities need u_n and u_{n+1} of the same shape: a block that changes the shape (the first of a stage,
    with stride or a projection) gets None for the displacement, energy and cosine; W2 likewise needs equal
    channel counts; a cosine needs the previous velocity in the same stage. Non-finite values become None.
    The input of each stage's first block must have been recorded for that block's velocity; without it the
    block's velocity metrics are None.

    Args:
        source: a :class:`FlowRecorder` after a forward pass, its ``states``, or trajectories as returned by
            :func:`group_trajectories`.
        shrinkage: covariance shrinkage of the entropy and W2 fits (:func:`~lmfused.analysis.gaussian_fit`).
        pass_index: which recorded forward pass to analyse when given a recorder or states (-1: the last).
    """
    if isinstance(source, FlowRecorder):
        trajectories = source.trajectories(pass_index)
    elif isinstance(source, Mapping):
        trajectories = {stage: list(states) for stage, states in source.items()}
    else:
        trajectories = group_trajectories(list(source), pass_index)
    rows: list[dict[str, Any]] = []
    for stage in sorted(trajectories):
        previous: FlowState | None = None
        previous_velocity: Tensor | None = None
        previous_fit: tuple[Tensor, Tensor] | None = None
        for state in trajectories[stage]:
            fit = gaussian_fit(pooled_features(state.tensor), shrinkage=shrinkage)
            if state.is_input:
                previous, previous_velocity, previous_fit = state, None, fit
                continue
            # Steps are only measured between adjacent states (a missing stage input leaves a gap).
            adjacent = previous is not None and previous.depth == state.depth - 1
            velocity = None
            if adjacent and previous.tensor.shape == state.tensor.shape:
                velocity = state.tensor - previous.tensor
            displacement = energy = cosine = w2 = None
            if velocity is not None:
                displacement, energy = _velocity_stats(velocity)
                if previous_velocity is not None:
                    cosine = _mean_cosine(velocity, previous_velocity)
            if adjacent and previous_fit[0].shape == fit[0].shape:
                w2 = gaussian_w2(previous_fit[0], previous_fit[1], fit[0], fit[1])
            rows.append(
                {
                    "name": state.name,
                    "stage": state.stage,
                    "block": state.index,
                    "depth": len(rows),
                    "shape": list(state.tensor.shape[1:]),
                    "displacement": displacement,
                    "kinetic_energy": energy,
                    "cosine": cosine,
                    "entropy": _finite_or_none(gaussian_entropy_of_cov(fit[1])),
                    "w2": w2,
                }
            )
            previous, previous_velocity, previous_fit = state, velocity, fit
    return rows


def analyze_flow(
    model: nn.Module,
    x: Tensor,
    *,
    shrinkage: Shrinkage = "ledoit-wolf",
    dt: float = 1.0,
) -> list[dict[str, Any]]:
    """Run ``model`` on the batch ``x`` (without gradients) and return per-block transport metrics and k_n.

    The rows of :func:`transport_metrics`, each merged with its block's row of
    :func:`~lmfused.analysis.lm_coefficients` (the learned k_n and its modified-equation reading; None for
    blocks without a k). The model's train/eval mode is left as it is: call ``model.eval()`` first to
    analyse inference behaviour.
    """
    with torch.no_grad(), FlowRecorder(model) as recorder:
        model(x)
    coefficients = {row["name"]: row for row in lm_coefficients(model, dt=dt)}
    rows = transport_metrics(recorder, shrinkage=shrinkage)
    for row in rows:
        extra = coefficients.get(row["name"], {})
        row.update({key: value for key, value in extra.items() if key not in row})
    return rows
