"""Each lm_step kernel once per configuration: the program Nsight Compute profiles, and the Triton warm-up.

    ncu --clock-control none -k regex:lm_step python -m bench.kernels_once [--backends triton cuda]
    python -m bench.kernels_once --all-flags --shard 0/4     # compile (warm) a quarter of the headline grid

64x256x56x56 bf16, both layouts, scalar and per-channel k, scale and relu on (``--all-flags``: every
configuration of ``bench.ops``'s headline grid): one forward and one backward per backend (the backward asks
for every gradient). ncu replays each kernel from cold caches, so no warm-up is needed. Run in several
processes at once with ``--shard``, it fills Triton's on-disk kernel cache in parallel, so that the timed
benchmark that follows on the same machine does not spend its time compiling.
"""

from __future__ import annotations

import argparse

import torch

import lmfused
from bench.ops import HEADLINE, Config, grid, inputs, providers


def configs(all_flags: bool) -> list[Config]:
    """The configurations to run: the four ncu ones, or the whole headline grid."""
    if all_flags:
        return grid("headline", torch.device("cuda"))
    return [
        Config(HEADLINE, "bf16", layout, k, True, True)
        for layout in ("channels_last", "contiguous")
        for k in ("channel", "scalar")
    ]


def run_once(backends: list[str], todo: list[Config]) -> None:
    device = torch.device("cuda")
    for config in todo:
        *tensors, scale = inputs(config, device, requires_grad=True)
        grad_out = torch.randn_like(tensors[0])
        for backend in backends:
            out = lmfused.lm_step(*tensors, scale=scale, relu=config.relu, backend=backend)
            torch.autograd.grad(out, tensors, grad_out)
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None, help="default: every GPU backend available")
    parser.add_argument("--all-flags", action="store_true", help="every configuration of the headline grid")
    parser.add_argument("--shard", default="0/1", help="I/N: every N-th configuration from the I-th")
    args = parser.parse_args(argv)
    index, count = (int(part) for part in args.shard.split("/"))
    if not 0 <= index < count:
        raise SystemExit(f"--shard: expected I/N with 0 <= I < N, got {args.shard!r}")
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels_once needs a CUDA GPU")
    backends = args.backends or [p for p in providers(torch.device("cuda")) if p in ("triton", "cuda")]
    run_once(backends, configs(args.all_flags)[index::count])


if __name__ == "__main__":
    main()
