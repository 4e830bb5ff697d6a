"""The memory counter (bench.memory, DESIGN.md 1d) on ops whose memory is known, and on the LM network against
its plain twin (what the LM keeps more: the projected shortcuts)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import memory
from tests.conftest import import_or_skip

N = 1000


def test_saved_and_peak_of_known_ops():
    """relu(x * 2): the product lives until relu has run (peak 2 tensors), relu saves its own output (1
    tensor), the product is not saved; the input is the caller's (not the step's); mul by a number saves
    nothing; the backward's gradients count as gradients."""
    x = torch.randn(N, requires_grad=True)
    counter = memory.MemoryCounter(persistent={memory._key(x)})
    with counter, counter.saving():
        y = (x * 2).relu()
    assert counter.peak_bytes == 2 * N * 4
    assert counter.saved_naive == N * 4
    ((key, saved),) = counter.saved.items()
    assert key == memory._key(y) and saved.op == "aten.relu" and saved.savers == {"aten.relu"}
    assert counter.sweep() == N * 4  # the product died
    with counter:
        counter.phase = "backward"
        y.sum().backward()
    assert counter.sweep() == 2 * N * 4  # y and x.grad (the loss died with its statement)
    grads = [s for s in counter.records if s.phase == "backward"]
    assert grads and {s.role for s in grads} == {"gradients"}


def test_peak_forgets_what_died():
    """A tensor that died before the next one was made does not count at the peak."""
    x = torch.randn(N)
    counter = memory.MemoryCounter(persistent={memory._key(x)})
    with counter:
        a = x * 2
        del a
        b = x * 3
        c = b + 1
    assert counter.peak_bytes == 2 * N * 4  # b and c, never a with them
    del b, c


def test_a_saved_view_counts_its_storage_once():
    """Two views of one storage saved by two ops: naive counts both, each storage once counts it once."""
    x = torch.randn(4, N // 4, requires_grad=True)
    counter = memory.MemoryCounter(persistent={memory._key(x)})
    with counter, counter.saving():
        y = x.exp()  # saves its output
        (y[:2] * y[2:]).sum()  # mul saves both halves: views of y
    assert counter.saved_naive == 2 * N * 4
    assert sum(s.nbytes for s in counter.saved.values()) == N * 4


def _junction_output_bytes(batch: int, size: int) -> tuple[int, int]:
    """(all, the last) block outputs of a ResNet-50 in bf16: 3, 4, 6, 3 blocks of 256 .. 2048 channels at
    1/4 .. 1/32 of the image."""
    stages = [(3, 256, 4), (4, 512, 8), (6, 1024, 16), (3, 2048, 32)]
    each = [batch * channels * (size // stride) ** 2 * 2 for _, channels, stride in stages]
    return sum(n * b for (n, _, _), b in zip(stages, each, strict=True)), each[-1]


@pytest.fixture(scope="module")
def resnet50_rows():
    import_or_skip("torchvision")
    rows = {}
    for row in memory.rows_for("resnet50"):
        if row.name in ("torchvision", "lm", "lm=False"):
            rows[row.name] = memory.measure(row, batch=2, size=64)
    return rows


def test_lm_keeps_no_more_than_its_plain_twin(resnet50_rows):
    """The LM-ResNet-50 keeps what lm=False keeps: the projected shortcut its stages' second blocks take as
    u_prev is rebuilt in their backward (lmfused.rebuild), not kept. Against torchvision: the same
    convolution and batch-norm inputs and weight casts; in place of the output ReLU keeps, a 1-bit mask per
    junction (the last block's output, which nothing else keeps, is not kept); no max-pool indices (the stem
    pooling finds them again, lmfused.nn.MaxPool2d). In all, no more saved bytes than torchvision."""
    tv, lm, plain = (resnet50_rows[name] for name in ("torchvision", "lm", "lm=False"))
    assert lm["saved_by_role"] == plain["saved_by_role"] and lm["saved_bytes"] == plain["saved_bytes"]
    assert lm["saved_by_role"]["projected shortcuts"] == tv["saved_by_role"]["projected shortcuts"] == 0
    for role in ("BatchNorm inputs", "conv inputs", "weight casts", "stem, pooling and head"):
        assert lm["saved_by_role"][role] == tv["saved_by_role"][role] > 0
    outputs, last = _junction_output_bytes(2, 64)
    assert lm["saved_by_role"]["masks"] == outputs // 16 and tv["saved_by_role"]["masks"] == 0
    assert tv["saved_by_role"]["block outputs"] - lm["saved_by_role"]["block outputs"] == last
    assert lm["saved_by_role"]["indices"] == 0 < tv["saved_by_role"]["indices"]
    assert lm["saved_bytes"] <= tv["saved_bytes"]
    assert lm["peak_bytes"] <= 1.01 * tv["peak_bytes"]
    for result in resnet50_rows.values():
        assert result["saved_naive_bytes"] >= result["saved_bytes"]
        assert result["peak_bytes"] >= result["saved_bytes"] - result["saved_state_bytes"]
        assert sum(result["saved_by_role"].values()) == result["saved_bytes"]
        state = 2 * result["parameter_bytes"] + result["buffer_bytes"] + result["input_bytes"]
        assert memory.predicted_peak_bytes(result) == result["peak_bytes"] + state
        assert result["input_bytes"] == 2 * 3 * 64 * 64 * 4 + 2 * 8  # the batch: float32 images, int64 labels


def test_stochastic_depth_and_noise_keep_nothing_more(resnet50_rows):
    """Sample-mode stochastic depth and noise: the per-sample scales (N floats per block) and a seed are all
    the step keeps beyond the default LM network; still no more than torchvision."""
    import lmfused

    build = lambda: lmfused.models.create_model("lm_resnet50", survival_prob=0.8, noise_std=0.05)  # noqa: E731
    result = memory.measure_step(build, batch=2, size=64)
    tv, lm = resnet50_rows["torchvision"], resnet50_rows["lm"]
    assert 0 < result["saved_bytes"] - lm["saved_bytes"] <= 16 * (2 * 4 + 8)  # 16 blocks: 2 scales, a seed
    assert result["saved_bytes"] <= tv["saved_bytes"]


def test_checkpointed_lm_keeps_no_projection():
    """With every block checkpointed (torchvision's blocks one by one, the LM stages by
    set_grad_checkpointing: a projection block with the next), the LM network keeps what lm=False keeps and
    less than torchvision (no pooling indices). Its peak falls in the backward, where the LM step's second
    gradient (grad_u_prev, 1 X) is alive beside grad_u: at most 10% above torchvision's (8.6% at ResNeXt-50,
    batch 64, 224 px)."""
    import_or_skip("torchvision")
    rows = {}
    for row in memory.rows_for("resnet50"):
        if row.checkpointing:
            rows[row.network] = memory.measure(row, batch=32, size=160)
    assert set(rows) == {"torchvision", "lm", "lm=False"}
    tv, lm, plain = rows["torchvision"], rows["lm"], rows["lm=False"]
    assert lm["saved_bytes"] == plain["saved_bytes"] < tv["saved_bytes"]
    assert lm["saved_by_role"]["projected shortcuts"] == 0
    assert plain["peak_bytes"] <= tv["peak_bytes"] < lm["peak_bytes"] <= 1.10 * tv["peak_bytes"]
    unchecked = memory.measure(memory.Row("resnet50", "lm"), batch=32, size=160)
    assert lm["peak_bytes"] < 0.6 * unchecked["peak_bytes"]  # what checkpointing is for


def test_provider_rows():
    """A bench.models provider's memory row: every lmfused backend is the LM network (same autograd code),
    a variant its LMFUSED_* setting."""
    assert memory.provider_row("resnet50", "cuda") == memory.provider_row("resnet50", "triton")
    assert memory.provider_row("resnet50", "cuda+unfused-bn").settings == (("LMFUSED_FUSE_BN", "0"),)
    assert memory.provider_row("resnet50", "plain-pytorch").network == "plain-pytorch"
    names = [row.name for row in memory.rows_for("resnext50_32x4d")]
    assert {"torchvision", "lm", "plain-pytorch", "lm=False", "LMFUSED_FUSE_BN=0"} <= set(names)


def test_cli_table_and_json(tmp_path, monkeypatch, capsys):
    import_or_skip("torchvision")
    monkeypatch.setattr(memory, "rows_for", lambda model: [memory.Row(model, "torchvision"),
                                                            memory.Row(model, "plain-pytorch")])  # fmt: skip
    memory.main(["--models", "resnet50", "--batch", "2", "--size", "32", "--roles", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "memory.json").read_text())
    assert [r["row"] for r in payload["rows"]] == ["torchvision", "plain-pytorch"]
    assert all(r["ran"] and r["saved_bytes"] > 0 for r in payload["rows"])
    assert "saved_by_role" in capsys.readouterr().out
