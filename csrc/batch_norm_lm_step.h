// Torch-free host API of the batch-norm-fused LM step (DESIGN.md 1b):
//
//   y   = (x - mean) * invstd * weight + bias                        (per channel; F.batch_norm)
//   out = act((1 - k) * u + k * u_prev + s * y + noise_std * xi)     (with state: u, u_prev)
//   out = act(s * y + noise_std * xi)                                (no-state: u, u_prev null)
//
// Buffers, layouts and dtypes as in lm_step.h: every activation-sized buffer (x, u, u_prev, out,
// grad_out, grad_handoff, grad_shortcut, and the gradients) is dense in the normalised layout of
// `shape`, in one activation dtype. Per-channel vectors (mean, invstd, weight, bias, k, sum_dy,
// sum_dy_xhat, and the per-channel outputs) and scale (N values) are in the accumulator type
// (float, double for kFloat64); nullptr for an optional one (weight = 1, bias = 0, scale = 1).
//
// The 1-bit ReLU mask: uint8, over the 2-D view of lm_step.h (M rows of L), row-major with
// ceil(L / 8) bytes per row; bit j % 8 of byte [r, j / 8] is 1 iff the gradient passes at element
// (r, j), i.e. NOT (out <= 0) on the value stored in out (out > 0, or NaN); padding bits 0.
//
// Each reduction (statistics, backward_reduce) is one launch: per-CTA partial sums in an order
// set by the shape and the operands given (never by the buffers' alignment, which only narrows
// the loads), merged
// in a fixed order by the last CTA of each group (lm_step.h, ReductionScratch): the same inputs
// give bitwise the same results at any address and in any CTA order.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "lm_step.h"

namespace lmfused {

// The scratch (lm_step.h) any of the two reductions needs for this shape.
ReductionScratch batch_norm_scratch(DType dtype, const LMStepShape& shape);

// Per-channel mean and invstd = 1 / sqrt(var + eps) (accumulator type, C values each).
// training: of x over (N, spatial), var biased; the sums are taken of x - x[n = 0, s = 0, c] (the
// channel's first element), so a large mean does not cancel the variance's digits. running_mean
// and running_var (C values of running_dtype, or both nullptr) are updated in place as
// F.batch_norm does: r = (1 - momentum) r + momentum * stat, with the unbiased variance
// var * count / (count - 1). One launch, its merge and the finishing inside (scratch required).
// Evaluation: mean = running_mean, invstd = 1 / sqrt(running_var + eps) (both required), x not
// read, nothing mutated: one small per-channel launch. A training batch without values (N * S ==
// 0): mean 0, invstd 1 / sqrt(1 + eps), running statistics untouched (the same small launch).
cudaError_t launch_batch_norm_stats(DType dtype, const LMStepShape& shape, const void* x,
                                    bool training, double momentum, double eps,
                                    void* running_mean, void* running_var, DType running_dtype,
                                    void* mean, void* invstd, const ReductionScratch& scratch,
                                    cudaStream_t stream);

// Forward. u and u_prev both given (with state) or both nullptr (no-state mode: k is not read).
// k: k_numel (1 or C) values. seed: device int64, required iff noise_std != 0. mask: nullptr, or
// (relu with state only) the 1-bit mask of out to write, M * ceil(L / 8) bytes.
cudaError_t launch_batch_norm_lm_step_forward(DType dtype, const LMStepShape& shape,
                                              const void* x, const void* mean, const void* invstd,
                                              const void* weight, const void* bias, const void* u,
                                              const void* u_prev, const void* k, int64_t k_numel,
                                              const void* scale, const int64_t* seed,
                                              double noise_std, bool relu, void* out, void* mask,
                                              cudaStream_t stream);

// The output's gradient comes in one or two parts: grad_out, and grad_handoff (nullptr: none), the
// gradient of the output handed to the next step as a tensor of its own (lmfused/handoff.py). Both
// backward passes read the two and add them in the accumulator type, before the ReLU's mask.
//
// First backward pass: per-channel sums (C values each, accumulator type) of dy = s * g and of
// dy * xhat, xhat = (x - mean) * invstd, and, when grad_k is given, of g * (u_prev - u) reduced to
// k's shape (k_numel = 1: the sum over channels too, in a fixed order; C: per channel); u and
// u_prev are read only then. g = grad_out (+ grad_handoff) through the ReLU when relu: 0 where the
// mask's bit is 0;
// without a mask (only the no-state mode, so not with grad_k), 0 where the forward's no-state
// pre-activation s * y, recomputed by the forward's own code and rounded to the activation dtype,
// is <= 0 (a NaN passes g on). One launch, its merge inside (scratch required).
cudaError_t launch_batch_norm_lm_step_backward_reduce(
    DType dtype, const LMStepShape& shape, const void* grad_out, const void* grad_handoff,
    const void* x, const void* mean, const void* invstd, const void* weight, const void* bias,
    const void* u, const void* u_prev, const void* mask, const void* scale, bool relu,
    void* sum_dy, void* sum_dy_xhat, void* grad_k, int64_t k_numel,
    const ReductionScratch& scratch, cudaStream_t stream);

// Second backward pass, writing the requested (non-null) gradients:
//   grad_x      = weight * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)  (training)
//               = weight * invstd * dy                                               (evaluation)
//   grad_u      = (1 - k) * g + grad_shortcut    (grad_shortcut optional, not masked)
//   grad_u_prev = k * g
// count = N * S. g (grad_out + grad_handoff) as in backward_reduce: with grad_u or grad_u_prev
// and relu the mask is required (the recomputed mask is the no-state one). sum_dy, sum_dy_xhat:
// C values, read only for grad_x in training.
cudaError_t launch_batch_norm_lm_step_backward(
    DType dtype, const LMStepShape& shape, const void* grad_out, const void* grad_handoff,
    const void* grad_shortcut, const void* x, const void* mean, const void* invstd,
    const void* weight, const void* bias, const void* sum_dy, const void* sum_dy_xhat,
    const void* mask, const void* k, int64_t k_numel, const void* scale, bool training, bool relu,
    void* grad_x, void* grad_u, void* grad_u_prev, cudaStream_t stream);

}  // namespace lmfused
