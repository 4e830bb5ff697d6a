"""op_support.call_op: eager passes of the Python backends run their functions without the dispatcher's
Python layers, and everything that must see the registered ops still does (dispatch modes, the profiler's op
events, selective checkpointing); in-place arguments count as modified either way."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lmfused
from tests.conftest import DEVICE

BACKENDS = [b for b in ("reference", "triton") if b in lmfused.available_backends(DEVICE)]


class _LmfusedOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lmfused":
            self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _junction(backend: str):
    """A junction's forward and backward, its weights as a module holds them (parameters)."""
    torch.manual_seed(0)
    shape = (4, 8, 3, 5)
    x, u, u_prev = (torch.randn(shape, device=DEVICE, requires_grad=True) for _ in range(3))
    weight = torch.nn.Parameter(torch.rand(8, device=DEVICE) + 0.5)
    bias, k = (torch.nn.Parameter(torch.randn(8, device=DEVICE)) for _ in range(2))
    running = (torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE))

    def step():
        out = lmfused.batch_norm_lm_step(
            x, *running, weight, bias, u, u_prev, k, training=True, relu=True, backend=backend
        )
        return out, torch.autograd.grad(out, (x, u, u_prev, weight, bias, k), torch.ones_like(out))

    return step, running


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_passes_skip_the_dispatcher_and_modes_see_the_ops(backend):
    step, _ = _junction(backend)
    out, grads = step()
    with _LmfusedOps() as mode:
        out_seen, grads_seen = step()
    # Under a dispatch mode every pass is the registered op, with the same results.
    suffix = f"batch_norm_lm_step_{backend}"
    assert mode.names == [
        f"lmfused::batch_norm_stats_{backend}",
        f"lmfused::{suffix}",
        f"lmfused::{suffix}_backward_reduce",
        f"lmfused::{suffix}_backward",
    ]
    torch.testing.assert_close(out_seen, out, rtol=0, atol=0)
    for a, b in zip(grads_seen, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Outside any mode the profiler records no dispatch of an lmfused op: the functions ran directly.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = {e.name for e in prof.events()}
    assert not {n for n in names if n.startswith("lmfused::")}, names


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_statistics_count_as_modified(backend):
    """The statistics pass updates running_mean and running_var in place: their version counters move, as
    the op's in-place registration makes them move, so autograd still catches a saved one that changed."""
    step, (running_mean, running_var) = _junction(backend)
    before = running_mean._version, running_var._version
    step()
    assert running_mean._version > before[0] and running_var._version > before[1]


def test_grad_mode_on_goes_through_the_op():
    """With grad mode on the op is called (a pass has no gradient formula: the op, not its function behind
    autograd's back, is the one to say so)."""
    from lmfused.batch_norm_step import _OPS
    from lmfused.op_support import call_op

    x = torch.randn(4, 8, 3, 5, device=DEVICE)
    running = (torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE))
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.enable_grad(), torch.profiler.profile(activities=cpu) as prof:
        call_op(_OPS["reference"][0], x, *running, True, 0.1, 1e-5)
    assert "lmfused::batch_norm_stats_reference" in {e.name for e in prof.events()}
