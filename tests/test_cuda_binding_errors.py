"""An argument error raised in lmfused._C's registered CUDA kernels reaches Python as the exception its check
names (ValueError, TypeError), through the dispatcher, wherever the extension is built (CI included): the
kernels are called directly through their CUDA dispatch key with CPU tensors, which the binding's first check
refuses. (On a GPU, tests/test_cuda_batch_norm_paths.py reaches the checks after that one.)"""

from __future__ import annotations

import importlib

import pytest
import torch

import lmfused  # noqa: F401  (defines the ops' schemas)


@pytest.fixture(scope="module")
def cuda_key():
    try:
        importlib.import_module("lmfused._C")
    except (ImportError, OSError, RuntimeError) as err:  # not built, or built for other schemas
        pytest.skip(f"lmfused._C is not importable: {err}")
    return torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def test_batch_norm_kernels_refuse_cpu_tensors_with_an_error_naming_the_argument(cuda_key):
    x = torch.randn(2, 8, 4, 4)
    vec, k = torch.rand(8) + 0.5, torch.full((8,), 0.3)
    stats = torch.ops.lmfused.batch_norm_stats_cuda.default
    with pytest.raises(ValueError, match="batch_norm_stats_cuda: x must be a CUDA tensor, got device cpu"):
        stats.redispatch(cuda_key, x, None, None, True, 0.1, 1e-5)
    reduce = torch.ops.lmfused.batch_norm_lm_step_cuda_backward_reduce.default
    for _ in range(2):  # a second error in the same process too
        with pytest.raises(ValueError, match="grad_out must be a CUDA tensor"):
            reduce.redispatch(cuda_key, x, x[:1], x, vec, vec, vec, vec, x, x, k, None, None, False, True)


def test_lm_step_kernel_refuses_cpu_tensors_with_an_error_naming_the_argument(cuda_key):
    u, k = torch.randn(2, 8, 4, 4), torch.full((1,), 0.3)
    forward = torch.ops.lmfused.lm_step_cuda.default  # (u, u_prev, f, k, scale, seed, relu, noise_std)
    with pytest.raises(ValueError, match="lm_step_cuda: u must be a CUDA tensor"):
        forward.redispatch(cuda_key, u, u, u, k, None, None, False, 0.0)


def test_error_messages_print_their_numbers(cuda_key):
    """The shape in a message is printed whole. A _C linked with a copy of the C++ runtime of its own
    (g++ -static-libstdc++) cannot format a number through the process's streams: here its message stopped at
    "got shape [", and on an H200 (g++ 13) the same call ended the process with SIGSEGV in
    std::ostream::_M_insert<long> inside _C."""
    x = torch.randn(2, 8, 4, 4)
    vec, k = torch.rand(8) + 0.5, torch.full((8,), 0.3)
    reduce = torch.ops.lmfused.batch_norm_lm_step_cuda_backward_reduce.default
    with pytest.raises(
        ValueError, match=r"grad_out must have rank >= 2 \(N, C, \*spatial\), got shape \[5\]$"
    ):
        reduce.redispatch(
            cuda_key, torch.randn(5), None, x, vec, vec, vec, vec, x, x, k, None, None, False, True
        )
