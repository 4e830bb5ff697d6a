"""Turn benchmark JSON into the results tables of docs/results.md and a bandwidth plot.

    python -m bench.report bench/results/ops-nvidia-h100-80gb-hbm3.json [--models M.json] [--png out.png]
    python -m bench.report OPS.json --brief     # % of copy ranges per layout, provider and mode

Prints a Markdown table (paste between the RESULTS markers of docs/results.md, or pass --results-page to
replace them) of the headline shape: every provider, mode and layout, with the fraction of copy bandwidth
achieved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import ROOT

BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}"


def ops_table(payload: dict) -> str:
    """Markdown table, one line per configuration and mode, providers side by side (% of copy bandwidth,
    from wall time per call; speedups of the fastest lmfused backend over eager and the best compile)."""
    env = payload["environment"]
    rows = payload["rows"]
    providers = [p for p in ("eager", "compile", "compile-max", "triton", "cuda", "reference")
                 if any(r["provider"] == p for r in rows)]  # fmt: skip
    header = ["shape", "dtype", "layout", "k", "scale", "relu", "mode"]
    header += [f"{p} ms (% copy)" for p in providers] + ["best lmfused vs eager", "vs best compile"]
    graphed = any(r.get("gpu_frac_of_copy") is not None for r in rows)
    lines = [
        f"Op benchmark on {env['device']} (torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
        f"commit {env['commit']}); device-to-device copy {payload['copy_gbps']:.0f} GB/s.",
        "Median wall time per call (launch overhead included); % copy = DESIGN.md's minimum bytes over that "
        "time, against the copy"
        + ("; [%] = the same for the kernels alone, replayed from a CUDA graph." if graphed else "."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["shape"], r["dtype"], r["layout"], r["k"], int(r["scale"]), int(r["relu"]), r["mode"])
        groups.setdefault(key, {})[r["provider"]] = r
    for key, by_provider in groups.items():
        cells = [str(c) for c in key]
        for p in providers:
            r = by_provider.get(p)
            cell = "-" if r is None else f"{r['median_ms']:.3f} ({_percent(r['frac_of_copy'])})"
            if r is not None and r.get("gpu_frac_of_copy") is not None:
                cell += f" [{_percent(r['gpu_frac_of_copy'])}]"
            cells.append(cell)
        fused = [by_provider[p] for p in ("triton", "cuda", "reference") if p in by_provider]
        best = min(fused, key=lambda r: r["median_ms"]) if fused else None
        cells.append(_fmt(best and best.get("speedup_vs_eager"), ".2f"))
        cells.append(_fmt(best and best.get("speedup_vs_compile"), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def brief(payload: dict) -> str:
    """A few lines per shape: for each layout, provider and mode, the range of % of copy over the flag
    combinations (wall time; [kernels alone] where CUDA-graph times were measured)."""
    ranges: dict[tuple, list] = {}
    for r in payload["rows"]:
        key = (r["shape"], r["dtype"], r["layout"], r["provider"], r["mode"])
        ranges.setdefault(key, []).append(r)
    head = ("shape", "dtype", "layout", "provider", "mode")
    lines = [f"{head[0]:>14} {head[1]:>5} {head[2]:>13} {head[3]:>11} {head[4]:>7}  % copy (wall) [kernels]"]
    for (shape, dtype, layout, provider, mode), rows in ranges.items():
        wall = sorted(100 * r["frac_of_copy"] for r in rows)
        cell = f"{wall[0]:.0f}-{wall[-1]:.0f}"
        kernels = sorted(100 * r["gpu_frac_of_copy"] for r in rows if r.get("gpu_frac_of_copy") is not None)
        if kernels:
            cell += f" [{kernels[0]:.0f}-{kernels[-1]:.0f}]"
        lines.append(f"{shape:>14} {dtype:>5} {layout:>13} {provider:>11} {mode:>7}  {cell}")
    return "\n".join(lines)


def models_table(payload: dict) -> str:
    """Markdown table of the model benchmark: img/s, its ratio to eager torchvision, peak memory beside
    bench.memory's prediction of it, and why a row has no number (skipped or failed) instead of leaving it
    out. What each provider ran is said under the table, from the rows' ``ran`` where they have it."""
    env = payload["environment"]
    lines = [
        f"Training step on {env['device']} (torch {env['torch']}, Triton {env.get('triton')}, commit "
        f"{env['commit']}), {payload['image_size']}px, bf16 autocast, channels_last, SGD:",
        "",
        "| model | provider | compiled | batch | img/s | vs torchvision eager | peak GB | predicted GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ran: dict[str, str] = {}
    base = {r["model"]: r["img_per_s"] for r in payload["rows"]
            if r["provider"] == "torchvision" and not r["compiled"] and r.get("img_per_s")}  # fmt: skip
    for r in payload["rows"]:
        if r.get("vs_torchvision") is None and r.get("img_per_s") and r["model"] in base:  # older results
            r = dict(r, vs_torchvision=r["img_per_s"] / base[r["model"]])
        speed = _fmt(r.get("img_per_s"), ".0f") if r.get("img_per_s") else r.get("status", "-")
        lines.append(
            f"| {r['model']} | {r['provider']} | {int(r['compiled'])} | {r['batch']} | {speed} "
            f"| {_fmt(r.get('vs_torchvision'), '.3f')} | {_fmt(r.get('peak_mem_gb'), '.1f')} "
            f"| {_fmt(r.get('predicted_peak_gb'), '.1f')} |"
        )
        if r.get("ran") and not r["compiled"] and r["model"] == payload["rows"][0]["model"]:
            ran.setdefault(r["provider"], r["ran"])
    if ran:
        lines += ["", "What ran (first model; the others alike): " + "; ".join(
            f"`{p}`: {what}" for p, what in ran.items()) + "."]  # fmt: skip
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    """Bar chart: fraction of copy bandwidth per provider, mode and configuration (CUDA-graph time where
    measured, else wall time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "gpu_frac_of_copy" if any(r.get("gpu_frac_of_copy") for r in payload["rows"]) else "frac_of_copy"
    rows = [r for r in payload["rows"] if r.get(metric) is not None]
    keys = sorted({(r["shape"], r["layout"], r["k"], r["scale"], r["relu"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    modes = ["fwd", "bwd", "fwd+bwd"]
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8, len(keys) * 0.9), 9), sharex=True)
    width = 0.8 / len(providers)
    for ax, mode in zip(axes, modes, strict=True):
        for i, provider in enumerate(providers):
            values = []
            for key in keys:
                match = [
                    r
                    for r in rows
                    if (r["shape"], r["layout"], r["k"], r["scale"], r["relu"]) == key
                    and r["provider"] == provider
                    and r["mode"] == mode
                ]
                values.append(match[0][metric] if match else 0.0)
            ax.bar([x + i * width for x in range(len(keys))], values, width, label=provider)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(f"{mode}: {metric}")
    axes[-1].set_xticks([x + 0.4 for x in range(len(keys))])
    axes[-1].set_xticklabels(
        [f"{s}\n{lay[:6]} k={k[:4]}\ns{int(sc)} r{int(re)}" for s, lay, k, sc, re in keys], fontsize=6
    )
    axes[0].legend(ncol=len(providers), fontsize=7)
    axes[0].set_title(f"lm_step bandwidth vs copy, {payload['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ops", type=Path, help="ops JSON from bench.ops")
    parser.add_argument("--models", type=Path, help="models JSON from bench.models")
    parser.add_argument("--png", type=Path, help="write the bandwidth plot here")
    parser.add_argument(
        "--results-page", action="store_true", help="replace the generated tables of docs/results.md"
    )
    parser.add_argument("--brief", action="store_true", help="print only the % of copy ranges per provider")
    args = parser.parse_args(argv)
    if args.brief:
        print(brief(json.loads(args.ops.read_text())))
        if args.models:
            print("\n" + models_table(json.loads(args.models.read_text())))
        return
    text = ops_table(json.loads(args.ops.read_text()))
    if args.models:
        text += "\n\n" + models_table(json.loads(args.models.read_text()))
    if args.png:
        plot(json.loads(args.ops.read_text()), args.png)
    if args.results_page:
        page = ROOT / "docs" / "results.md"
        content = page.read_text()
        start, end = content.index(BEGIN) + len(BEGIN), content.index(END)
        page.write_text(content[:start] + "\n" + text + "\n" + content[end:])
    print(text)


if __name__ == "__main__":
    main()
