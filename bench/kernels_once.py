"""Each kernel once per configuration: the program Nsight Compute profiles, and the Triton warm-up.

    ncu --clock-control none --kernel-name-base demangled -k regex:'lm_step|batch_norm|reduce_' \\
        python -m bench.kernels_once [--ops lm_step batch_norm_lm_step] [--layouts channels_last]
    python -m bench.kernels_once --all-flags --shard 0/4     # compile (warm) a quarter of the speed runs
    python -m bench.kernels_once --ncu-table ncu.csv         # the short table of `ncu --csv --page raw`

At 64x256x56x56 bf16: ``lm_step`` in both layouts (``--layouts``), scalar and per-channel k, scale and relu
on; ``batch_norm_lm_step`` and ``batch_norm_relu`` in training, channels_last (the models' layout), scalar
k and relu, as the junction benchmark runs them. One forward and one backward per backend (the backward asks
for every gradient), each inside an NVTX range naming it. ncu replays each kernel from cold caches, so no
warm-up is needed. ``--all-flags`` runs every configuration of ``bench.ops``'s headline grid and the four
stage shapes of ``bench.junction``: run in several processes at once with ``--shard``, it fills Triton's
on-disk kernel cache in parallel, so that the timed benchmarks that follow on the same machine do not
spend their time compiling.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import torch

import lmfused
from bench import junction
from bench.ops import HEADLINE, STAGE_SHAPES, Config, grid, inputs, providers

OPS = ("lm_step", "batch_norm_lm_step", "batch_norm_relu")
JUNCTION_OPS = {"batch_norm_lm_step": "junction", "batch_norm_relu": "bn_relu"}  # their bench.junction names
LAYOUTS = ("channels_last", "contiguous")
# What the ncu table shows, in this order: (metric, column, scale). Bytes in MB, time in microseconds.
NCU_COLUMNS = (
    ("gpu__time_duration.sum", "us", 1e-3),
    ("dram__bytes_read.sum", "rd MB", 1e-6),
    ("dram__bytes_write.sum", "wr MB", 1e-6),
    ("dram__bytes.sum.per_second", "GB/s", 1e-9),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "%dram", 1),
    ("l1tex__data_pipe_lsu_wavefronts.sum", "lsu wf M", 1e-6),
    ("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum", "smem wf M", 1e-6),
    ("l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum", "ld sect M", 1e-6),
    ("l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum", "ld req M", 1e-6),
    ("l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum", "local ld MB", 1e-6),
    ("l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum", "local st MB", 1e-6),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "%occ", 1),
    ("launch__registers_per_thread", "regs", 1),
)


def configs(all_flags: bool) -> list[Config]:
    """The lm_step configurations to run: the four ncu ones, or the whole headline grid."""
    if all_flags:
        return grid("headline", torch.device("cuda"))
    return [
        Config(HEADLINE, "bf16", layout, k, True, True)
        for layout in ("channels_last", "contiguous")
        for k in ("channel", "scalar")
    ]


def work(ops: list[str], layouts: list[str], all_flags: bool) -> list[tuple[str, Config]]:
    """(op, configuration) pairs: lm_step's configurations in ``layouts``, then the batch-norm ops (training,
    channels_last, scalar k, relu) at the headline shape, or with ``all_flags`` at the junction benchmark's
    four stage shapes."""
    todo = [("lm_step", c) for c in configs(all_flags) if c.layout in layouts] if "lm_step" in ops else []
    shapes = [(junction.BATCH, *stage) for stage in STAGE_SHAPES] if all_flags else [HEADLINE]
    for op in (op for op in ops if op in JUNCTION_OPS):
        todo += [(op, Config(shape, "bf16", "channels_last", "scalar", False, True)) for shape in shapes]
    return todo


def run_once(backends: list[str], todo: list[tuple[str, Config]]) -> None:
    device = torch.device("cuda")
    for op, config in todo:
        if op == "lm_step":
            *tensors, scale = inputs(config, device, requires_grad=True)
            grad_out = torch.randn_like(tensors[0])
        else:
            t = junction.inputs(config.shape, device, torch.bfloat16)
            grad_out = torch.randn_like(t["x"])
        for backend in backends:
            with torch.cuda.nvtx.range(f"{op} {backend} {'x'.join(map(str, config.shape))} {config.layout}"):
                if op == "lm_step":
                    out = lmfused.lm_step(*tensors, scale=scale, relu=config.relu, backend=backend)
                    torch.autograd.grad(out, tensors, grad_out)
                else:
                    fn, leaves = junction.function(JUNCTION_OPS[op], backend)
                    torch.autograd.grad(fn(t), [t[name] for name in leaves], grad_out)
        torch.cuda.synchronize()


def ncu_metrics(query: str) -> str:
    """The metrics of NCU_COLUMNS that ``ncu --query-metrics`` (its output: ``query``) lists by base name, as
    ncu's --metrics takes them (an unknown name would stop ncu); launch attributes are always there. All of
    them if the query says nothing recognisable."""
    known = {line.split()[0] for line in query.splitlines() if line.split()}
    wanted = [m for m, _, _ in NCU_COLUMNS if m.startswith("launch__") or m.split(".")[0] in known]
    if len(wanted) == sum(m.startswith("launch__") for m, _, _ in NCU_COLUMNS):
        wanted = [m for m, _, _ in NCU_COLUMNS]
    return ",".join(wanted)


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def ncu_table(csv_text: str) -> str:
    """The short table of ``ncu --import REPORT --csv --page raw --print-units base``: one line per kernel
    launch with the columns of NCU_COLUMNS that the report has. The backend: aten for PyTorch's own kernels,
    cuda for the other C++ ones (a demangled name has a parameter list), triton for the rest."""
    rows = [r for r in csv.DictReader(io.StringIO(csv_text)) if (r.get("ID") or "").strip().isdigit()]
    if not rows:
        return "ncu: no kernel in the report"
    columns = [(m, head, scale) for m, head, scale in NCU_COLUMNS if m in rows[0]]
    lines = [f"{'kernel':44} {'backend':7} " + " ".join(f"{head:>11}" for _, head, _ in columns)]
    for r in rows:
        name = r.get("Kernel Name", "?")
        backend = "aten" if "at::native" in name else "cuda" if "(" in name else "triton"
        short = name.split("(")[0].split("<")[0].split("::")[-1].removeprefix("void ")
        cells = []
        for metric, _, scale in columns:
            value = _number(r.get(metric, ""))
            cells.append(f"{value * scale:>11.3g}" if value is not None else f"{'-':>11}")
        lines.append(f"{short[:44]:44} {backend:7} " + " ".join(cells))
    missing = [m for m, _, _ in NCU_COLUMNS if m not in rows[0]]
    if missing:
        lines.append(f"(not in the report: {', '.join(missing)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None, help="default: every GPU backend available")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="of lm_step")
    parser.add_argument("--all-flags", action="store_true", help="every configuration the speed runs time")
    parser.add_argument("--shard", default="0/1", help="I/N: every N-th configuration from the I-th")
    parser.add_argument("--ncu-table", type=Path, help="print the short table of this ncu CSV and exit")
    parser.add_argument("--ncu-metrics", type=Path, help="print the metrics to ask of the ncu whose "
                        "--query-metrics output is in this file, and exit")  # fmt: skip
    args = parser.parse_args(argv)
    if args.ncu_table:
        print(ncu_table(args.ncu_table.read_text()))
        return
    if args.ncu_metrics:
        print(ncu_metrics(args.ncu_metrics.read_text() if args.ncu_metrics.exists() else ""))
        return
    index, count = (int(part) for part in args.shard.split("/"))
    if not 0 <= index < count:
        raise SystemExit(f"--shard: expected I/N with 0 <= I < N, got {args.shard!r}")
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels_once needs a CUDA GPU")
    backends = args.backends or [p for p in providers(torch.device("cuda")) if p in ("triton", "cuda")]
    ops = [op for op in OPS if op in args.ops]
    run_once(backends, work(ops, args.layouts, args.all_flags)[index::count])


if __name__ == "__main__":
    main()
