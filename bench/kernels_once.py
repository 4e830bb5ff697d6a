"""Each lm_step kernel once per configuration: the program Nsight Compute profiles.

    ncu --clock-control none -k regex:lm_step python -m bench.kernels_once [--backends triton cuda]

64x256x56x56 bf16, both layouts, scalar and per-channel k, scale and relu on: one forward and one backward per
backend (the backward asks for every gradient). ncu replays each kernel from cold caches, so no warm-up is
needed.
"""

from __future__ import annotations

import argparse

import torch

import lmfused
from bench.ops import HEADLINE, Config, inputs, providers


def run_once(backends: list[str]) -> None:
    device = torch.device("cuda")
    for layout in ("channels_last", "contiguous"):
        for k in ("channel", "scalar"):
            config = Config(HEADLINE, "bf16", layout, k, True, True)
            *tensors, scale = inputs(config, device, requires_grad=True)
            grad_out = torch.randn_like(tensors[0])
            for backend in backends:
                out = lmfused.lm_step(*tensors, scale=scale, relu=True, backend=backend)
                torch.autograd.grad(out, tensors, grad_out)
            torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", nargs="+", default=None, help="default: every GPU backend available")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.kernels_once needs a CUDA GPU")
    backends = args.backends or [p for p in providers(torch.device("cuda")) if p in ("triton", "cuda")]
    run_once(backends)


if __name__ == "__main__":
    main()
