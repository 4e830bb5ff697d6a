"""lmfused._C.launch_plan: the launches of each CUDA op, counted without a GPU (runs wherever the extension is
built, CI included).

launch_plan runs the binding's own host code on meta tensors while the launchers record instead of launching,
and records the computing aten ops the binding calls. A batch_norm_lm_step junction in the models' layout
(bf16 channels-last, per-channel vectors in float32) is four launches, forward and backward: statistics,
forward, backward reduction, backward, each one kernel (their merges inside), no aten op.
"""

from __future__ import annotations

import importlib

import pytest

SHAPE = [64, 256, 56, 56]


def _plan_module():
    try:
        module = importlib.import_module("lmfused._C")
    except (ImportError, OSError, RuntimeError) as err:  # not built, or built for other schemas
        pytest.skip(f"lmfused._C is not importable: {err}")
    if not hasattr(module, "launch_plan"):
        pytest.skip("lmfused._C has no launch_plan")
    return module


def _plan(op, flags, shape=SHAPE, dtype="bfloat16", channels_last=True):
    return list(_plan_module().launch_plan(op, shape, dtype, channels_last, flags))


JUNCTION = {
    "batch_norm_stats": {"training": True, "has_running_stats": True},
    "batch_norm_lm_step": {"training": True, "relu": True, "has_state": True, "has_weight": True,
                           "has_bias": True, "per_channel_k": True, "write_mask": True},
    "batch_norm_lm_step_backward_reduce": {"relu": True, "has_weight": True, "has_bias": True,
                                           "has_mask": True, "need_k": True, "per_channel_k": True},
    "batch_norm_lm_step_backward": {"training": True, "relu": True, "has_weight": True, "has_bias": True,
                                    "has_mask": True, "has_shortcut": True, "per_channel_k": True,
                                    "need_x": True, "need_u": True, "need_u_prev": True},
}  # fmt: skip
KERNEL = {
    "batch_norm_stats": "batch_norm_stats_kernel",
    "batch_norm_lm_step": "batch_norm_lm_step_forward_kernel",
    "batch_norm_lm_step_backward_reduce": "batch_norm_lm_step_backward_reduce_kernel",
    "batch_norm_lm_step_backward": "batch_norm_lm_step_backward_kernel",
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("op", list(JUNCTION))
def test_junction_ops_are_one_kernel_each(op, channels_last, dtype):
    plan = _plan(op, JUNCTION[op], dtype=dtype, channels_last=channels_last)
    assert len(plan) == 1 and plan[0].startswith(KERNEL[op]), plan


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("op", ["batch_norm_lm_step_backward_reduce", "batch_norm_lm_step_backward"])
def test_handoff_is_read_by_the_same_one_kernel(op, channels_last, dtype):
    """With grad_handoff (the gradient of the output's handoff to the next step) each backward pass is still
    one kernel and no aten op (no addition of the two gradients): the kernel's HANDOFF variant, its last
    template argument."""
    flags = JUNCTION[op]
    without = _plan(op, flags, dtype=dtype, channels_last=channels_last)
    plan = _plan(op, {**flags, "has_handoff": True}, dtype=dtype, channels_last=channels_last)
    assert len(plan) == 1 and plan[0].startswith(KERNEL[op]) and plan[0].endswith(", true>"), plan
    assert without[0].endswith(", false>") and without[0][: -len("false>")] == plan[0][: -len("true>")]


def test_junction_is_four_launches():
    plans = [_plan(op, flags) for op, flags in JUNCTION.items()]
    assert sum(len(p) for p in plans) == 4
    assert not any(name.startswith("aten::") for p in plans for name in p)
    # the model path: 128-bit units in channels-last, the forward writing the mask
    assert ", 8, 8, true>" in plans[0][0]  # batch_norm_stats_kernel<bf16, W=8, VEC=8, CL>
    assert plans[1][0].endswith(", true, true, true, false, true>")  # STATE, RELU, no noise, MASK


@pytest.mark.parametrize(
    ("op", "flags", "kernels"),
    [
        (
            "batch_norm_stats",
            {"training": False, "has_running_stats": True},
            ["batch_norm_eval_stats_kernel"],
        ),
        (
            "batch_norm_lm_step",
            {"training": True, "relu": True, "noise": True},
            ["batch_norm_lm_step_forward"],
        ),
        ("batch_norm_lm_step_backward_reduce", {"relu": True}, ["batch_norm_lm_step_backward_reduce"]),
        (
            "batch_norm_lm_step_backward",
            {"relu": True, "need_x": True},
            ["batch_norm_lm_step_backward_kernel"],
        ),
        ("lm_step", {"relu": True, "has_scale": True, "per_channel_k": True}, ["lm_step_forward_kernel"]),
        (
            "lm_step_backward",
            {"relu": True, "need_u": True, "need_k": True},
            ["lm_step_backward_grad_k_kernel"],
        ),
        ("lm_step_backward", {"need_u": True, "need_u_prev": True}, ["lm_step_backward_kernel"]),
        ("lm_step_backward", {}, []),
    ],
)
def test_other_configurations(op, flags, kernels):
    plan = _plan(op, flags)
    assert len(plan) == len(kernels) and all(p.startswith(k) for p, k in zip(plan, kernels, strict=True)), (
        plan
    )


def test_a_reduction_is_one_launch_at_every_shape():
    """Small and odd shapes too: the merge is in the reduction's launch, whatever the number of partials."""
    for shape in ([2, 3, 5], [64, 2048, 7, 7], [3, 7], [1, 1, 1, 1]):
        for op in ("batch_norm_stats", "batch_norm_lm_step_backward_reduce"):
            flags = {"training": True, "need_k": True, "has_mask": True, "relu": True}
            flags = {k: v for k, v in flags.items() if op != "batch_norm_stats" or k == "training"}
            assert len(_plan(op, flags, shape=shape, channels_last=len(shape) > 2)) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown flag"):
        _plan("lm_step", {"relux": True})
    with pytest.raises(ValueError, match="unknown op"):
        _plan("lm_stepp", {})
    with pytest.raises(ValueError, match="dtype"):
        _plan("lm_step", {}, dtype="int8")
