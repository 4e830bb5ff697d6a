"""``python -m lmfused.check``: what it says without a GPU, its CPU (interpreter) mode, and that it fails on
planted mismatches: a wrong output, and a gradient whose ReLU mask disagrees with the output's sign where
pre-activations round to zero (which only the adversarial cases can see)."""

from __future__ import annotations

import json

import pytest
import torch

import lmfused
from lmfused import check

pytestmark = pytest.mark.skipif(
    "triton" not in lmfused.available_backends("cpu"), reason="needs Triton (its interpreter on CPU)"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA is told")
def test_without_a_gpu_it_says_what_it_would_check(capsys):
    assert check.main([]) == 0
    text = capsys.readouterr().out
    assert "no CUDA device here, nothing run" in text and "cuda, triton" in text
    for case in check.CASES:
        assert case.label in text


def test_cpu_mode_runs_every_case_dtype_and_layout(capsys):
    """The whole grid through the Triton interpreter: the table has a line per case and a cell per dtype and
    layout, and everything passes; the ReLU mask is checked against out's sign."""
    assert check.main(["--cpu"]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if "  triton  " in line]
    lines = {f"{cells[0]} {cells[1]}": cells for cells in rows}
    assert set(lines) == {case.label for case in check.CASES}
    assert all(len(cells) == 3 + 6 and "FAIL" not in cells for cells in lines.values())
    checks = len(check.CASES) * 6
    assert f"{checks} checks, 0 failed" in text and " 0 flips in " in text


def _planted(monkeypatch, name: str, tamper):
    """Replace ``lmfused.<name>`` by a version whose kernel-backend outputs go through ``tamper`` (the
    reference backend, the oracle, is left alone)."""
    original = getattr(lmfused, name)

    def planted(*args, backend=None, **kwargs):
        result = original(*args, backend=backend, **kwargs)
        if backend == "reference":
            return result
        return (tamper(result[0]), result[1]) if isinstance(result, tuple) else tamper(result)

    monkeypatch.setattr(lmfused, name, planted)


def test_a_planted_wrong_output_fails(monkeypatch, capsys):
    _planted(monkeypatch, "batch_norm_lm_step", lambda out: out * (1 + 2**-6))
    argv = ["--cpu", "--cases", "bn_lm_step/block", "--dtypes", "fp32", "--layouts", "channels_last"]
    assert check.main(argv) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "Failures:" in text and "worst" in text and "in out" in text


class _MaskFromThreshold(torch.autograd.Function):
    """Identity forward; the backward drops the gradient where 0 < out < 1e-4, as a backward whose recomputed
    ReLU mask rounds differently from the forward would (out > 0 there, yet no gradient)."""

    @staticmethod
    def forward(ctx, out):
        ctx.save_for_backward(out)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.where((out > 0) & (out < 1e-4), torch.zeros_like(grad), grad)


def test_a_planted_mask_flip_fails_only_on_adversarial_data(monkeypatch, capsys):
    """Random data hardly has pre-activations at rounding level, so only the adversarial case catches a mask
    that disagrees with the output there, and it counts the flips."""
    _planted(monkeypatch, "lm_step", _MaskFromThreshold.apply)
    common = ["--cpu", "--dtypes", "bf16", "--layouts", "channels_last", "--cases"]
    assert check.main([*common, "lm_step/imagenet-sd"]) == 0
    capsys.readouterr()
    assert check.main([*common, "adversarial/lm_step"]) == 1
    text = capsys.readouterr().out
    assert "mask disagrees with out's sign" in text
    flips = int(text.split("ReLU mask against out's sign: ")[1].split()[0])
    assert flips > 0


def test_worker_processes_share_the_groups(capsys, monkeypatch):
    """--jobs runs each (dtype, layout) group in its own process (the first run on a GPU is bound by Triton
    compiling); a worker that dies is a failed row, not a lost one."""
    argv = ["--cpu", "--cases", "lm_step/cifar", "--dtypes", "fp32", "bf16", "--layouts", "contiguous"]
    assert check.main([*argv, "--jobs", "2"]) == 0
    text = capsys.readouterr().out
    assert "4 checks, 0 failed" in text and "fp32/contig" in text and "bf16/contig" in text
    monkeypatch.setattr(check.sys, "executable", "false")  # a worker that dies at once, writing nothing
    rows = check._run_in_workers(check._parse(["--cpu"])[0], ["--cpu"], 1)
    assert rows[0]["status"] == "FAIL" and "exited with status 1" in rows[0]["notes"][0]


def test_json_names_the_environment_it_ran_in(tmp_path, capsys):
    """--json: every row, and the versions and device of the run (a result file says what it measured)."""
    path = tmp_path / "check.json"
    argv = ["--cpu", "--cases", "lm_step/cifar", "--dtypes", "fp32", "--layouts", "contiguous"]
    assert check.main([*argv, "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    expected = f"lmfused {lmfused.__version__} on CPU | torch {torch.__version__}"
    assert payload["environment"].startswith(expected)
    assert {(r["backend"], r["dtype"], r["status"]) for r in payload["rows"]} == {("triton", "fp32", "ok")}


def test_a_missing_backend_is_named_with_the_reason(capsys):
    """Asked for a backend that cannot run here, the check names it and says why (no other command needed)."""
    assert check.main(["--cpu", "--backends", "cuda", "--cases", "lm_step/cifar"]) == 1
    text = capsys.readouterr().out
    assert "lmfused.check: cuda not available on cpu: the cuda backend needs CUDA tensors" in text
