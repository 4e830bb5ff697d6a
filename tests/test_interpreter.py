"""The interpreter speed-up of tests/interpreter.py: nested @triton.jit helpers still compute the same, and
triton.language is left as it was found after a launch."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the kernel through Triton's interpreter (CPU tensors)", allow_module_level=True)


@triton.jit
def _scaled(x, factor):
    return tl.where(x > 0, x * factor, x)


@triton.jit
def _twice_scaled(x, factor):
    return _scaled(_scaled(x, factor), factor)


@triton.jit
def _kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, _twice_scaled(x, factor), mask=mask)


def test_nested_helpers_compute_and_the_language_is_restored():
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "skips_nested", False), "tests/interpreter.py is not installed"
    originals = (tl.where, tl.load, tl.tensor.__add__, tl.math.exp)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)
    _kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), 3.0, BLOCK=256)
    torch.testing.assert_close(out, torch.where(x > 0, x * 3.0 * 3.0, x), rtol=0, atol=0)
    assert (tl.where, tl.load, tl.tensor.__add__, tl.math.exp) == originals
