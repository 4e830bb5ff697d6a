"""The GPU check as far as a CPU can take it: bench/device_check.sh's plan and its output files, the junction
benchmark's rows, and the helpers of bench.kernels_once (its work list and the Nsight Compute table)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import junction, kernels_once, ops

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "device_check.sh"


def _run_script(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True, env=environment, timeout=240
    )


def _plan(out: Path, command: str) -> tuple[list[tuple[str, int, bool]], str]:
    """[(step, limit in seconds, not on the clock: beside the others, or only without _C)] of a dry run,
    and its whole output."""
    result = _run_script(out, command, DRY_RUN="1")
    assert result.returncode == 0, result.stderr
    steps = re.findall(r"^(\S+) +limit +(-?\d+)s (\([^)]*\))?", result.stdout, flags=re.M)
    return [(name, int(limit), bool(beside)) for name, limit, beside in steps], result.stdout


def test_correctness_builds_alone_then_runs_the_check_first_and_the_tests_most_needed_first(tmp_path):
    plan, text = _plan(tmp_path, "correctness")
    names = [name for name, _, _ in plan]
    foreground = [name for name, _, beside in plan if not beside]
    # The in-place build alone first (three builds side by side finished none in 120 s on the H200), then
    # what needs only that build; nothing beside the build but what runs after it.
    assert names[0] == "setup-build"
    assert foreground[:6] == ["setup-build", "info", "check", "toolchain", "errors-plain", "errors"]
    tests = ["gpu-tests", "op-tests"]
    if (ROOT / "tests" / "test_mask_adversarial.py").exists():
        tests.insert(0, "mask")
    else:
        assert re.search(r"^mask +skipped: no tests/test_mask_adversarial.py", text, flags=re.M)
    assert foreground[6:] == tests
    assert {"ctest", "memcheck", "racecheck", "warm-0", "warm-3"} <= set(names)
    assert "jit-build" not in names  # an extra step: a second build of the same kernels
    # Limits as if every step used all of its own: the tests get what is left, nothing in that worst case.
    assert sum(limit for _, limit, beside in plan if not beside) <= 420
    assert all(limit > 0 for name, limit, _ in plan if name not in tests)


def test_python_steps_never_wait_on_a_jit_build():
    text = SCRIPT.read_text()
    assert text.index("export LMFUSED_NO_JIT=1") < text.index("run_step info")
    assert "env -u LMFUSED_NO_JIT LMFUSED_FORCE_JIT=1" in text  # only the jit step builds that way


def test_speed_fits_its_deadline_in_priority_order(tmp_path):
    plan, _ = _plan(tmp_path, "speed")
    assert [name for name, _, _ in plan] == ["setup-build", "junction", "ops", "models", "ncu"]
    # On a warm machine (_C built by the correctness command) the timed steps share the 300 s deadline, the
    # model table taking what junction and ops leave but ncu's share.
    timed = {name: limit for name, limit, beside in plan if not beside}
    assert set(timed) == {"junction", "ops", "models", "ncu"} and sum(timed.values()) <= 300
    assert timed["models"] >= 100


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this step runs the whole check")
def test_a_real_step_writes_log_and_summary_as_it_ends(tmp_path):
    result = _run_script(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"^check +ok +\d+s", summary, flags=re.M)
    assert "no CUDA device here, nothing run" in summary  # the check's own output, in the short tables
    assert "==== check (ok)" in (tmp_path / "log.txt").read_text()
    assert result.stdout.endswith(summary)  # the short table is what the command prints last


def test_junction_rows_run_eager_first_at_the_stage_shapes():
    cuda = torch.device("cuda")
    rows = junction.plan(cuda, compile_rows=True)
    compiled = [i for i, (_, _, p) in enumerate(rows) if p.endswith("+compile")]
    assert compiled and min(compiled) > max(i for i, (_, _, p) in enumerate(rows) if "+" not in p)
    assert {shape for _, shape, _ in rows} == {(64, *stage) for stage in ops.STAGE_SHAPES}
    for op in junction.OPS:
        providers = {p for o, _, p in rows if o == op}
        assert {"torchvision", "torchvision+compile"} <= providers
        assert ({"plain-lm", "plain-lm+compile"} <= providers) == (op == "junction")


def test_junction_cpu_smoke(tmp_path, capsys):
    junction.main(["--out", str(tmp_path), "--no-compile"])
    (path,) = tmp_path.glob("junction-*.json")
    payload = json.loads(path.read_text())
    assert {r["status"] for r in payload["rows"]} == {"ok"}
    assert {(r["op"], r["provider"]) for r in payload["rows"]} == {
        ("junction", "torchvision"), ("junction", "plain-lm"), ("junction", "reference"),
        ("bn_relu", "torchvision"), ("bn_relu", "reference"),
    }  # fmt: skip
    assert all(r["wall_ms"] > 0 and r["vs_torchvision"] > 0 and r["x_at_copy"] > 0 for r in payload["rows"])
    text = junction.report(payload)
    assert "target batch_norm_lm_step no slower than torchvision eager at 4x16x8x8" in text


def test_kernels_once_runs_the_batch_norm_ops_as_the_junction_rows_do():
    everything = kernels_once.work(list(kernels_once.OPS), list(kernels_once.LAYOUTS), all_flags=True)
    assert [c for op, c in everything if op == "lm_step"] == kernels_once.configs(all_flags=True)
    for op in ("batch_norm_lm_step", "batch_norm_relu"):
        shapes = [c.shape for o, c in everything if o == op]
        assert shapes == [(64, *stage) for stage in ops.STAGE_SHAPES]
    profiled = kernels_once.work(list(kernels_once.OPS), ["channels_last"], all_flags=False)
    assert {(op, c.shape, c.layout) for op, c in profiled} == {
        (op, ops.HEADLINE, "channels_last") for op in kernels_once.OPS
    }


def test_ncu_metrics_are_those_ncu_knows():
    query = "Device H200\nMetric Name  Description\ndram__bytes_read  bytes\ngpu__time_duration  ns\n"
    asked = kernels_once.ncu_metrics(query).split(",")
    assert asked == ["gpu__time_duration.sum", "dram__bytes_read.sum", "launch__registers_per_thread"]
    everything = kernels_once.ncu_metrics("").split(",")  # no answer from ncu: ask for all of them
    assert len(everything) == len(kernels_once.NCU_COLUMNS)


def test_ncu_table_reads_the_raw_csv():
    rows = [
        ["ID", "Kernel Name", "gpu__time_duration.sum", "dram__bytes_read.sum",
         "launch__registers_per_thread"],
        ["", "", "nsecond", "byte", "register/thread"],  # the units row
        ["0", "void lmfused::lm_step_forward_kernel<__nv_bfloat16, true>(lmfused::ForwardArgs)", "12,500",
         "51,380,224", "40"],
        ["1", "batch_norm_lm_step_forward_kernel", "30,000", "1,000,000", "64"],
        ["2", "void at::native::reduce_kernel<512, 1>(at::native::ReduceOp<float>)", "1,000", "8", "32"],
    ]  # fmt: skip
    table = kernels_once.ncu_table("\n".join(",".join(f'"{cell}"' for cell in row) for row in rows))
    lines = table.splitlines()
    assert lines[1].split()[:5] == ["lm_step_forward_kernel", "cuda", "12.5", "51.4", "40"]
    assert lines[2].split()[:5] == ["batch_norm_lm_step_forward_kernel", "triton", "30", "1", "64"]
    assert lines[3].split()[:2] == ["reduce_kernel", "aten"]
    assert "not in the report" in lines[-1]
