// Torch-free host API of the batch-norm-fused LM step (DESIGN.md 1b):
//
//   y   = (x - mean) * invstd * weight + bias                        (per channel; F.batch_norm)
//   out = act((1 - k) * u + k * u_prev + s * y + noise_std * xi)     (with state: u, u_prev)
//   out = act(s * y + noise_std * xi)                                (no-state: u, u_prev null)
//
// Buffers, layouts and dtypes as in lm_step.h: every activation-sized buffer (x, u, u_prev, out,
// grad_out, grad_shortcut, and the gradients) is dense in the normalised layout of `shape`, in
// one activation dtype. Per-channel vectors (mean, invstd, weight, bias, k, mean_dy,
// mean_dy_xhat, and the per-channel outputs) and scale (N values) are in the accumulator type
// (float, double for kFloat64); nullptr for an optional one (weight = 1, bias = 0, scale = 1).
//
// Reductions (statistics, backward sums) are deterministic and independent of the buffers'
// alignment: per-tile partial sums over tiles that depend only on the shape, then fixed-order
// reduction kernels (no atomics). A misaligned buffer is read with narrower loads, but the
// summation order stays that of the widest vector the row length allows, so identical values
// give bitwise identical sums at any address.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "lm_step.h"

namespace lmfused {

// Bytes of device workspace the two reductions (statistics, backward_reduce) need (0 if empty).
size_t batch_norm_workspace_bytes(DType dtype, const LMStepShape& shape);

// Per-channel mean and biased variance of x over (N, spatial), in the accumulator type. The sums
// are taken of x - x[n = 0, s = 0, c] (the channel's first element), so a large mean does not
// cancel the variance's digits: mean = shift + sum(d) / count, var = sum(d^2) / count - (sum(d)
// / count)^2, clamped at 0. An empty channel (N * S == 0) gives NaN for both.
cudaError_t launch_batch_norm_stats(DType dtype, const LMStepShape& shape, const void* x,
                                    void* mean, void* var, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream);

// Forward. u and u_prev both given (with state) or both nullptr (no-state mode: k is not read).
// k: k_numel (1 or C) values. seed: device int64, required iff noise_std != 0.
cudaError_t launch_batch_norm_lm_step_forward(DType dtype, const LMStepShape& shape,
                                              const void* x, const void* mean, const void* invstd,
                                              const void* weight, const void* bias, const void* u,
                                              const void* u_prev, const void* k, int64_t k_numel,
                                              const void* scale, const int64_t* seed,
                                              double noise_std, bool relu, void* out,
                                              cudaStream_t stream);

// First backward pass: per-channel sums (C values each, accumulator type) of dy = s * g and of
// dy * xhat, xhat = (x - mean) * invstd, and, when grad_k_per_channel is given, of
// g * (u_prev - u) (u, u_prev required then). g = grad_out through the ReLU mask when relu:
// 0 where out <= 0 if out is given (a NaN out passes g on, as torch's threshold_backward), else
// (noise-free steps) 0 where the forward's pre-activation z, recomputed exactly as the forward
// computes it and rounded to the activation dtype, is <= 0: z = s * y without state (u, u_prev
// nullptr), z = (1 - k) * u + k * u_prev + s * y with state (u, u_prev and k: k_numel = 1 or C
// values). The mask is then bitwise the one out gives, and the pass reads g, x (u, u_prev), never
// out. k is read only for that mask with state.
cudaError_t launch_batch_norm_lm_step_backward_reduce(
    DType dtype, const LMStepShape& shape, const void* grad_out, const void* x, const void* mean,
    const void* invstd, const void* weight, const void* bias, const void* u, const void* u_prev,
    const void* k, int64_t k_numel, const void* out, const void* scale, bool relu, void* sum_dy,
    void* sum_dy_xhat, void* grad_k_per_channel, void* workspace, size_t workspace_bytes,
    cudaStream_t stream);

// Second backward pass, writing the requested (non-null) gradients:
//   grad_x      = weight * invstd * (dy - mean_dy - xhat * mean_dy_xhat)   (training)
//               = weight * invstd * dy                                     (evaluation)
//   grad_u      = (1 - k) * g + grad_shortcut    (grad_shortcut optional, not masked)
//   grad_u_prev = k * g
// g as in backward_reduce (bias and scale enter the recomputed mask), except that the recomputed
// mask is only the no-state one: with grad_u or grad_u_prev and relu, out is required.
// mean_dy, mean_dy_xhat: C values, read only for grad_x in training.
cudaError_t launch_batch_norm_lm_step_backward(
    DType dtype, const LMStepShape& shape, const void* grad_out, const void* grad_shortcut,
    const void* x, const void* mean, const void* invstd, const void* weight, const void* bias,
    const void* mean_dy, const void* mean_dy_xhat, const void* out, const void* k,
    int64_t k_numel, const void* scale, bool training, bool relu, void* grad_x, void* grad_u,
    void* grad_u_prev, cudaStream_t stream);

}  // namespace lmfused
