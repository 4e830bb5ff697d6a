"""The CPU-runnable part of the benchmarks: byte counts, the op grid's rows, the report, a timed op."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import lmfused
from bench import ops, report

ROW_KEYS = {
    "provider",
    "mode",
    "shape",
    "dtype",
    "layout",
    "k",
    "scale",
    "relu",
    "median_ms",
    "gbps",
    "copy_gbps",
}


def test_minimum_bytes_follow_the_design():
    """fwd: 3 reads + 1 write; bwd: g, u, u_prev (+ out with relu) read, 3 gradients written."""
    config = ops.Config((2, 3, 4, 5), "bf16", "contiguous", "channel", True, False)
    numel = math.prod(config.shape)
    assert ops.min_bytes(config, "fwd", 2) == 4 * numel * 2
    assert ops.min_bytes(config, "bwd", 2) == 6 * numel * 2
    with_relu = dataclasses.replace(config, relu=True)
    assert ops.min_bytes(with_relu, "fwd+bwd", 4) == (4 + 7) * numel * 4


def test_eager_provider_matches_lm_step():
    u, u_prev, f = (torch.randn(2, 3, 4, 5) for _ in range(3))
    k, scale = torch.randn(3), torch.rand(2)
    want = lmfused.lm_step(u, u_prev, f, k, scale=scale, relu=True, backend="reference")
    torch.testing.assert_close(ops.eager_lm_step(u, u_prev, f, k, scale, True), want)


@pytest.fixture(scope="module")
def smoke_result():
    return ops.run("smoke", torch.device("cpu"), only=["eager", "reference"])


def test_op_grid_rows(smoke_result):
    rows = smoke_result["rows"]
    assert {r["provider"] for r in rows} == {"eager", "reference"}
    assert {r["mode"] for r in rows} == set(ops.MODES)
    for r in rows:
        assert ROW_KEYS <= r.keys()
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
    assert {"device", "torch", "triton", "cuda", "commit"} <= smoke_result["environment"].keys()


def test_report_table_and_plot(smoke_result, tmp_path):
    path = tmp_path / "ops.json"
    path.write_text(json.dumps(smoke_result))
    table = report.ops_table(smoke_result)
    assert table.count("\n| 8x32x16x16 |") == 2 * len(ops.MODES)  # one line per layout and mode
    pytest.importorskip("matplotlib")
    report.main([str(path), "--png", str(tmp_path / "ops.png")])
    assert (tmp_path / "ops.png").stat().st_size > 0


@pytest.mark.parametrize("backend", ["reference"])
def test_benchmark_lm_step_cpu(benchmark, backend):
    u, u_prev, f = (torch.randn(8, 32, 16, 16) for _ in range(3))
    k = torch.randn(32)
    out = benchmark(lambda: lmfused.lm_step(u, u_prev, f, k, relu=True, backend=backend))
    assert out.shape == u.shape


def test_gpu_grids_cover_the_issue_matrix():
    """Headline: every flag combination at 64x256x56x56 bf16 in both layouts, plus launch-bound rows; the full
    grid adds the four ResNet-50 stage shapes at batch 64 and 256, in bf16, fp16 and fp32."""
    cuda = torch.device("cuda")
    headline = ops.grid("headline", cuda)
    big = [c for c in headline if c.shape == ops.HEADLINE]
    assert len(big) == len(set(big)) == 2 * 2 * 2 * 2  # layout, k, scale, relu
    assert {c.shape for c in headline} == {ops.HEADLINE, ops.TINY}
    full = ops.grid("full", cuda)
    assert set(headline) <= set(full) and len(full) == len(set(full))
    shapes = {(c.shape, c.dtype, c.layout) for c in full}
    for batch in (64, 256):
        for stage in ops.STAGE_SHAPES:
            for dtype in ops.DTYPES:
                assert ((batch, *stage), dtype, "channels_last") in shapes
                assert ((batch, *stage), dtype, "contiguous") in shapes


def test_graph_timing_is_none_without_cuda():
    from bench.common import graph_ms

    assert graph_ms(lambda: None, torch.device("cpu")) is None


def test_profile_categories_and_cpu_smoke():
    from bench import profile

    assert profile.category("lm_step_backward_kernel") == "lm_step"
    assert profile.category("sm90_xmma_fprop_implicit_gemm_bf16") == "conv/gemm"
    assert profile.category("cudnn::bn_bw_1C11_kernel_new") == "batch_norm"
    assert profile.category("vectorized_elementwise_kernel<4, add>") == "elementwise/other"
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    result = profile.profile_fn(lambda: torch.relu(a @ b), torch.device("cpu"), 3)
    assert result["wall_ms"] > 0 and result["device_ms"] > 0
    assert abs(sum(result["by_category_ms"].values()) - result["device_ms"]) < 1e-9


def test_report_shows_kernel_time_when_measured(smoke_result):
    """With CUDA-graph times in the rows, every cell also gives the kernels' own fraction of copy."""
    rows = [dict(r, gpu_ms=r["median_ms"] / 2, gpu_frac_of_copy=0.5) for r in smoke_result["rows"]]
    table = report.ops_table(dict(smoke_result, rows=rows))
    assert "[50]" in table and "CUDA graph" in table
    assert "[" not in report.ops_table(smoke_result).split("\n", 3)[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gets")
def test_kernels_once_needs_a_gpu():
    from bench import kernels_once

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        kernels_once.main([])


def test_brief_report_ranges(smoke_result):
    lines = report.brief(smoke_result).splitlines()
    assert len(lines) == 1 + 2 * 2 * len(ops.MODES)  # header + layout x provider x mode
    assert all(line.split()[-1].split("-")[0].isdigit() for line in lines[1:])
