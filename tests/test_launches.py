"""The launch counter (bench.launches, DESIGN.md 1d) on ops whose launches are known, the CUDA launch plan
through a stand-in for lmfused._C, and the table of every junction."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch
import triton
import triton.language as tl

from bench import launches

CONTRACT_OPS = {
    "lm_step",
    "lm_step_backward",
    "batch_norm_stats",
    "batch_norm_lm_step",
    "batch_norm_lm_step_backward_reduce",
    "batch_norm_lm_step_backward",
}
BN_STEP = launches.Case("batch_norm_lm_step", "channels_last", "channel", True)
# The Triton kernels are counted on CPU tensors, through the interpreter (tests/conftest.py sets it on CPU).
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@triton.jit
def _add_one_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)


@torch.library.custom_op("lmfused_launch_probe::add_two", mutates_args=())
def add_two(x: torch.Tensor) -> torch.Tensor:
    """One Triton kernel, one torch op that computes and one cast, around ops that launch nothing on a GPU."""
    x = x.to(x.dtype).reshape(x.shape).contiguous()  # no-ops: a cast to its own dtype, a view, a layout check
    out = torch.empty_like(x)  # an allocation
    _add_one_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return out.add_(1.0).to(torch.float64)  # (a cast through a composite op, decomposed below autograd)


@interpreted
def test_counts_kernels_and_computing_ops_inside_an_op():
    """Inside an op: the Triton kernel, the add_ and the cast count; the no-op cast, the view, the contiguous
    check, the allocation and the interpreter's own argument copies do not."""
    x = torch.randn(8)
    counter = launches.LaunchCounter(namespaces=("lmfused_launch_probe",))
    with launches.triton_launches(counter), counter:
        out = add_two(x) * 2  # one more op, in the glue
    torch.testing.assert_close(out, (x.double() + 2) * 2)
    seen = [(launch.kind, launch.name, launch.inside) for launch in counter.launches]
    assert seen == [
        ("triton", "_add_one_kernel", "add_two"),
        ("torch", "aten.add_", "add_two"),
        ("torch", "aten._to_copy", "add_two"),
        ("torch", "aten.mul", None),
    ]


def test_copies_and_casts_are_told_apart():
    """A same-dtype copy (a layout change) is a copy, a dtype change a cast: both launch."""
    x = torch.randn(2, 3, 4, 5)
    counter = launches.LaunchCounter()
    with counter:
        x.contiguous(memory_format=torch.channels_last)
        x.to(torch.bfloat16)
        x.view(-1).sum()
    moves = [(launch.name, launch.moves) for launch in counter.launches]
    assert moves == [("aten.clone", "copy"), ("aten._to_copy", "cast"), ("aten.sum", None)]


def test_torchvision_junction_is_batch_norm_add_relu():
    """torchvision's Bottleneck junction: batch norm, ``out += identity``, ReLU forward; the ReLU's and the
    batch norm's backward (the identity's gradient passes through)."""
    case = launches.Case("batch_norm_lm_step", "channels_last", "channel", False)
    names = [(launch.phase, launch.name) for launch in launches.count(case, "torchvision")]
    assert names == [
        ("forward", "aten.native_batch_norm"),
        ("forward", "aten.add_"),
        ("forward", "aten.relu_"),
        ("backward", "aten.threshold_backward"),
        ("backward", "aten.native_batch_norm_backward"),
    ]


@interpreted
@pytest.mark.parametrize("layout", launches.LAYOUTS)
def test_triton_junction_counts_its_kernels(layout):
    """The Triton junction launches its kernels (statistics and forward; reduction and backward) in the
    right phases, inside the registered ops, plus the glue's torch ops (running statistics, invstd)."""
    case = launches.Case("batch_norm_lm_step", layout, "channel", True)
    counted = launches.count(case, "triton")
    kernels = [(launch.phase, launch.inside) for launch in counted if launch.kind == "triton"]
    assert {phase for phase, _ in kernels} == {"forward", "backward"}
    assert all(inside.startswith("batch_norm_") and "_triton" in inside for _, inside in kernels)


def _stand_in(calls: list) -> types.ModuleType:
    """A stand-in for lmfused._C: one kernel per op, and an aten op after each backward reduction."""

    def launch_plan(op, shape, dtype, channels_last, flags):
        calls.append((op, tuple(shape), dtype, channels_last, flags))
        return [f"{op}_kernel"] + (["aten::sum"] if op.endswith("reduce") else [])

    module = types.ModuleType("lmfused._C")
    module.launch_plan = launch_plan
    return module


def test_cuda_rows_come_from_the_launch_plan():
    """The CUDA count: the binding's plan for each op it dispatches (op names of the contract, the flags of
    the call, the model-size shape), plus the same Python glue as the other backends'."""
    calls: list = []
    counted = launches.count(BN_STEP, "cuda", plan_module=_stand_in(calls), plan_shape=(64, 256, 56, 56))
    assert calls and {op for op, *_ in calls} <= CONTRACT_OPS
    assert all(shape == (64, 256, 56, 56) and dtype == "bfloat16" and cl for _, shape, dtype, cl, _ in calls)
    flags = {op: f for op, _, _, _, f in calls}
    assert set(flags["batch_norm_lm_step"]) == set(launches.PLAN_FLAGS)
    forward = flags["batch_norm_lm_step"]
    assert forward["training"] and forward["relu"] and forward["has_state"] and forward["per_channel_k"]
    assert forward["has_scale"] and forward["has_weight"] and forward["has_bias"] and not forward["noise"]
    assert flags["batch_norm_lm_step_backward"]["has_shortcut"]  # the pass-through's gradient
    planned = [launch for launch in counted if launch.inside is not None]
    assert [launch.kind for launch in planned].count("cuda") == len(calls)
    assert [launch.name for launch in planned if launch.kind == "torch"] == ["aten.sum"] * sum(
        op.endswith("reduce") for op, *_ in calls
    )
    glue = [launch.name for launch in counted if launch.inside is None]
    reference_glue = [launch.name for launch in launches.count(BN_STEP, "reference") if launch.inside is None]
    assert glue == reference_glue


def test_cuda_rows_say_why_they_are_missing(monkeypatch):
    without_plan = types.ModuleType("lmfused._C")
    monkeypatch.setitem(sys.modules, "lmfused._C", without_plan)
    module, reason = launches.cuda_plan_module()
    assert module is None and "launch_plan" in reason
    result = launches.measure(("cuda",), [BN_STEP], plan_source=(None, "not built here"))
    assert result["rows"][0]["status"] == "skipped: not built here"
    assert result["goal"]["cuda"]["met"] is None


def test_goal_needs_few_launches_and_no_copy_in_the_models_layout():
    def row(backend, total, copies, layout="channels_last"):
        return {"backend": backend, "op": "batch_norm_lm_step", "layout": layout, "status": "ok",
                "total": total, "copies": copies}  # fmt: skip

    assert launches.goal([row("triton", 6, 0), row("cuda", 5, 0)])["cuda"]["met"] is True
    assert launches.goal([row("triton", 7, 0)])["triton"]["met"] is False
    assert launches.goal([row("triton", 4, 1)])["triton"]["met"] is False
    assert launches.goal([row("triton", 4, 0), row("triton", 4, 1, "contiguous")])["triton"]["met"] is True


@interpreted
def test_table_of_every_junction(tmp_path, capsys):
    """The CLI: every op, layout and backend, written to JSON, with the goal stated."""
    result = launches.main(["--out", str(tmp_path)])
    payload = json.loads((tmp_path / "launches.json").read_text())
    assert payload["rows"] == json.loads(json.dumps(result["rows"]))
    ops = {(r["op"], r["backend"]) for r in payload["rows"] if r["status"] == "ok"}
    for op in ("batch_norm_lm_step", "batch_norm_relu", "lm_step"):
        assert {(op, "reference"), (op, "triton")} <= ops
    assert "Goal: at most 6 launches" in capsys.readouterr().out
