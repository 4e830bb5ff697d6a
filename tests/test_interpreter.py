"""The interpreter speed-ups of tests/interpreter.py: nested @triton.jit helpers still compute the same and
triton.language is left as it was found after a launch; integer overflow is still caught where the
interpreter would catch it (debug on); numpy dtypes are the interpreter's own."""

from __future__ import annotations

import dataclasses
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


@triton.jit
def _index_kernel(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)  # int32
    tl.store(out_ptr + offsets, (x * scale + offsets - 7) * 3, mask=mask)


def _run_index_kernel(x, scale):
    out = torch.empty_like(x)
    _index_kernel[(triton.cdiv(x.numel(), 128),)](x, out, x.numel(), scale, BLOCK=128)
    return out


@pytest.mark.parametrize("debug", [False, True], ids=["debug_off", "debug_on"])
def test_integer_overflow_is_caught_where_the_interpreter_catches_it(debug):
    """int32 index arithmetic computes the same; an int32 overflow raises with debug on (the interpreter's
    own check runs) and wraps silently with it off, as without the skip."""
    from triton.runtime import interpreter

    check = interpreter.interpreter_semantic.binary_op_sanitize_overflow_impl
    assert getattr(check, "skips_unread", False), "tests/interpreter.py is not installed"
    builder = interpreter.interpreter_builder
    options = builder.options
    builder.options = dataclasses.replace(options, debug=debug)
    try:
        x = torch.randint(-1000, 1000, (300,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        offsets = torch.arange(300, dtype=torch.int32)
        torch.testing.assert_close(_run_index_kernel(x, 5), (x * 5 + offsets - 7) * 3, rtol=0, atol=0)
        big = torch.full((300,), 2**30, dtype=torch.int32)
        if debug:
            with pytest.raises(Exception, match="int32 overflow detected for operation mul"):  # (wrapped)
                _run_index_kernel(big, 4)
        else:
            _run_index_kernel(big, 4)  # wraps, as the interpreter does without debug
    finally:
        builder.options = options


def test_numpy_dtypes_are_the_interpreters_own():
    from triton.runtime import interpreter

    remembered = interpreter._get_np_dtype
    assert getattr(remembered, "remembers", False), "tests/interpreter.py is not installed"
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.uint16, tl.int32, tl.uint32, tl.int64, tl.uint64]
    scalars += [tl.float16, tl.bfloat16, tl.float32, tl.float64, tl.float8e5, tl.float8e4nv]
    for scalar in scalars + [tl.pointer_type(tl.float32), tl.pointer_type(tl.bfloat16)]:
        for dtype in (scalar, tl.block_type(scalar, [4, 8])):
            for _ in range(2):  # the first answer, and the one remembered
                assert remembered(dtype) == remembered.original(dtype), dtype
