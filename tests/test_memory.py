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


def _projected_shortcut_bytes(batch: int, size: int) -> int:
    """The four stages' projected shortcuts of a (Res|ResNe)Xt-50 in bf16: 256, 512, 1024, 2048 channels at
    1/4 .. 1/32 of the image."""
    return sum(batch * channels * (size // stride) ** 2 * 2 for channels, stride in
               ((256, 4), (512, 8), (1024, 16), (2048, 32)))  # fmt: skip


@pytest.fixture(scope="module")
def resnet50_rows():
    import_or_skip("torchvision")
    rows = {}
    for row in memory.rows_for("resnet50"):
        if row.name in ("torchvision", "lm", "lm=False"):
            rows[row.name] = memory.measure(row, batch=2, size=64)
    return rows


def test_lm_keeps_the_projected_shortcuts_more(resnet50_rows):
    """What the LM-ResNet-50 keeps for its backward beyond its plain twin is each stage's projected
    shortcut (kept as u_prev for grad_k): exactly their bytes; the convolutions' inputs, the batch norms'
    inputs and the block outputs are the same as torchvision's."""
    tv, lm, plain = (resnet50_rows[name] for name in ("torchvision", "lm", "lm=False"))
    shortcuts = _projected_shortcut_bytes(2, 64)
    assert lm["saved_by_role"]["projected shortcuts"] == shortcuts
    assert tv["saved_by_role"]["projected shortcuts"] == plain["saved_by_role"]["projected shortcuts"] == 0
    assert lm["saved_bytes"] - plain["saved_bytes"] == shortcuts
    for role in ("BatchNorm inputs", "conv inputs", "block outputs", "weight casts", "indices"):
        assert lm["saved_by_role"][role] == tv["saved_by_role"][role] == plain["saved_by_role"][role] > 0
    for result in resnet50_rows.values():
        assert result["saved_naive_bytes"] >= result["saved_bytes"]
        assert result["peak_bytes"] >= result["saved_bytes"] - result["saved_state_bytes"]
        assert sum(result["saved_by_role"].values()) == result["saved_bytes"]
        state = 2 * result["parameter_bytes"] + result["buffer_bytes"] + result["input_bytes"]
        assert memory.predicted_peak_bytes(result) == result["peak_bytes"] + state
        assert result["input_bytes"] == 2 * 3 * 64 * 64 * 4 + 2 * 8  # the batch: float32 images, int64 labels


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
