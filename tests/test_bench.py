"""The CPU-runnable part of the benchmarks: byte counts, the op grid's rows, the report, a timed op."""

from __future__ import annotations

import dataclasses
import json
import math
import os

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


def test_op_grid_reports_progress_after_each_configuration():
    """A run cut by a time limit keeps its rows: the payload so far is handed out after each configuration."""
    seen = []
    result = ops.run(
        "smoke", torch.device("cpu"), only=["eager"], on_progress=lambda p: seen.append(len(p["rows"]))
    )
    per_config = len(ops.MODES)
    assert seen == [per_config * (i + 1) for i in range(len(ops.grid("smoke", torch.device("cpu"))))]
    assert result["complete"] and len(result["rows"]) == seen[-1]


def test_model_rows_run_eager_first_then_the_needed_compiled_rows():
    """Every eager row first (plus the fastest backend with its BatchNorms unfused, and without the gradient
    pass-through), then the compiled ones in
    priority order (torchvision, the plain-PyTorch LM update, the fastest fused backend with the registered
    ops, then decomposed for Inductor), so a time limit cuts only the least needed rows."""
    from bench import models

    names = ["torchvision", "plain-pytorch", "cuda", "triton"]
    compiled = models.default_compile_providers(names, torch.device("cuda"))
    assert compiled == ["torchvision", "plain-pytorch", "cuda", "cuda+decomposed", "triton"]
    assert models.default_compile_providers(names, torch.device("cpu")) == []
    rows = models.plan(["resnext50_32x4d", "resnet50"], names, compiled[:4])
    eager = [*names, "cuda+unfused-bn", "cuda+no-passthrough"]
    assert rows[:6] == [("resnext50_32x4d", p, False) for p in eager]
    assert rows[6:10] == [("resnext50_32x4d", p, True) for p in compiled[:4]]
    assert rows[10:] == [("resnet50", p, False) for p in eager] + [
        ("resnet50", p, True) for p in compiled[:4]
    ]


def test_model_variants_set_their_environment(monkeypatch):
    from bench import models

    monkeypatch.delenv("LMFUSED_COMPILE_JUNCTION", raising=False)
    with models.variant_environment("cuda+decomposed"):
        assert os.environ["LMFUSED_COMPILE_JUNCTION"] == "decompose"
    assert "LMFUSED_COMPILE_JUNCTION" not in os.environ
    monkeypatch.setenv("LMFUSED_FUSE_BN", "1")
    with models.eager_updates():  # bench.profile's context: nothing the plain-PyTorch provider needs now
        assert os.environ["LMFUSED_FUSE_BN"] == "0"
    assert os.environ["LMFUSED_FUSE_BN"] == "1"


ZOO_STEPS = [
    ("lm_resnext50_32x4d", 64, {}),
    ("lm_resnet20", 32, {"survival_prob": 0.8, "noise_std": 0.1, "per_channel_k": True}),
]


@pytest.mark.parametrize(("name", "size", "options"), ZOO_STEPS)
def test_plain_pytorch_training_step_dispatches_no_lmfused_op(name, size, options):
    """The plain-PyTorch LM provider is plain: a whole training step (fake tensors, bf16 autocast,
    channels_last) dispatches no lmfused op, where the zoo's own network dispatches them in every block."""
    from bench import models, traffic

    def ops(build):
        return {r.op for r in traffic.count_training_step(build, batch=2, size=size)[0]}

    plain = ops(lambda: models.plain_pytorch_lm(lmfused.models.create_model(name, **options)))
    assert not {op for op in plain if op.startswith("lmfused.")}
    assert {"aten.native_batch_norm", "aten.relu"} <= plain
    fused = ops(lambda: lmfused.models.create_model(name, **options))
    assert {op for op in fused if op.startswith("lmfused.")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k_shape", [(1,), (3,), None])
@pytest.mark.parametrize("with_scale", [False, True])
def test_plain_update_rounds_as_the_fused_op(dtype, k_shape, with_scale):
    """The plain update's numerics are the fused op's: float32 arithmetic, one rounding (bitwise equal to
    the reference backend); without k it is the ResNet step u + s f."""
    from bench import models

    u, u_prev, f = (torch.randn(2, 3, 4, 5).to(dtype) for _ in range(3))
    k = torch.rand(k_shape) - 0.5 if k_shape else None
    scale = torch.tensor([0.0, 1.25]) if with_scale else None
    got = models.plain_update(u, u_prev if k is not None else None, f, k, scale, True, 0.0)
    want = lmfused.lm_step(u, u if k is None else u_prev, f, torch.zeros(1) if k is None else k, scale=scale,
                           relu=True, backend="reference")  # fmt: skip
    assert got.dtype == dtype and torch.equal(got, want)


def test_plain_pytorch_lm_trains_as_the_fused_network():
    """Same weights, same batch, same stochastic-depth draws: the plain-PyTorch network's logits and
    gradients are the zoo network's (float64, where the batch norms' different summation orders do not
    show; in float32 a batch norm's backward amplifies them)."""
    from bench import models

    options = {"per_channel_k": True, "survival_prob": 0.8}
    fused = lmfused.models.create_model("lm_resnet20", k_init=(-0.3, 0.3), **options).double()
    plain = models.plain_pytorch_lm(lmfused.models.create_model("lm_resnet20", **options)).double()
    plain.load_state_dict(fused.state_dict())
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fused.named_parameters()]
    images, labels = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.arange(8)
    logits = []
    for model in (fused, plain):
        torch.manual_seed(1)  # the same per-sample masks in both
        logits.append(model(images))
        torch.nn.functional.cross_entropy(logits[-1], labels).backward()
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_model_table_ratios_and_skipped_rows():
    from bench import models

    rows = [
        {"model": "m", "provider": "torchvision", "compiled": False, "batch": 2, "img_per_s": 100.0},
        {
            "model": "m",
            "provider": "cuda",
            "compiled": False,
            "batch": 2,
            "img_per_s": 97.0,
            "peak_mem_gb": 8.23,
            "predicted_peak_gb": 8.1,
            "ran": "lm_m, lmfused ops on the cuda backend",
        },
        {"model": "m", "provider": "cuda", "compiled": True, "batch": 2, "status": "skipped (time budget)"},
    ]
    models.add_ratios(rows)
    assert rows[0]["vs_torchvision"] == 1.0 and rows[1]["vs_torchvision"] == 0.97
    assert rows[2]["vs_torchvision"] is None
    env = {"device": "cpu", "torch": "x", "triton": None, "commit": "c"}
    table = report.models_table({"environment": env, "image_size": 8, "rows": rows})
    assert "| m | cuda | 0 | 2 | 97 | 0.970 |" in table
    assert "skipped (time budget)" in table  # a row without a number is shown, never dropped
    assert "| 8.2 | 8.1 |" in table and "`cuda`: lm_m, lmfused ops on the cuda backend" in table  # what ran


def test_model_benchmark_cpu_smoke(tmp_path):
    """One tiny eager row per provider on CPU, written to JSON with the environment stamp; each row says
    what ran and how many lmfused ops one step dispatched (none for the plain-PyTorch LM)."""
    from bench import models

    arguments = ["--models", "resnet50", "--batch", "2", "--size", "32", "--steps", "1"]
    models.main([*arguments, "--out", str(tmp_path), "--no-memory-prediction"])
    (path,) = tmp_path.glob("models-*.json")
    payload = json.loads(path.read_text())
    assert {r["status"] for r in payload["rows"]} == {"ok"}
    rows = {r["provider"]: r for r in payload["rows"]}
    assert {"plain-pytorch", "reference"} <= rows.keys()
    assert all(r["img_per_s"] > 0 and r["ran"] for r in payload["rows"])
    assert rows["plain-pytorch"]["lmfused_ops"] == 0 and "plain PyTorch" in rows["plain-pytorch"]["ran"]
    assert rows["reference"]["lmfused_ops"] > 0


def test_model_rows_get_the_memory_prediction(monkeypatch):
    """Every row that ran gets bench.memory's prediction of its peak, counted once per network and setting
    (the lmfused backends keep the same tensors); rows that did not run get none."""
    from bench import memory, models

    counted = []

    def measure(row, batch, size):
        counted.append((row.name, batch, size))
        return {"peak_bytes": 10**9, "parameter_bytes": 10**8, "buffer_bytes": 0, "input_bytes": 0}

    monkeypatch.setattr(memory, "measure", measure)
    rows = [{"model": "resnet50", "provider": p, "batch": 8, "status": "ok"}
            for p in ("torchvision", "cuda", "triton", "cuda+unfused-bn")]  # fmt: skip
    rows.append(
        {"model": "resnet50", "provider": "plain-pytorch", "batch": 8, "status": "skipped (time budget)"}
    )
    models.add_memory_predictions(rows, size=64)
    assert counted == [("torchvision", 8, 64), ("lm", 8, 64), ("LMFUSED_FUSE_BN=0", 8, 64)]
    assert [r.get("predicted_peak_gb") for r in rows] == [1.2, 1.2, 1.2, 1.2, None]


def test_kernels_once_shards_cover_the_headline_grid():
    from bench import kernels_once

    everything = kernels_once.configs(all_flags=True)
    assert everything == ops.grid("headline", torch.device("cuda"))
    shards = [everything[i::4] for i in range(4)]
    assert sorted(map(str, sum(shards, []))) == sorted(map(str, everything))
    with pytest.raises(SystemExit, match="--shard"):
        kernels_once.main(["--shard", "4/4"])
