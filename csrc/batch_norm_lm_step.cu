// Public entry points of the batch-norm-fused LM step (batch_norm_lm_step.h): argument checks
// and the dtype switch. The typed bodies live in batch_norm_lm_step.cuh, instantiated per dtype
// in batch_norm_lm_step_<dtype>.cu.
#include "batch_norm_lm_step.h"

#include "batch_norm_lm_step_dispatch.h"

namespace lmfused {
namespace {

bool valid_shape(DType dtype, const LMStepShape& s) {
  return valid_dtype(dtype) && s.N >= 0 && s.C >= 0 && s.S >= 0;
}

size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// C zeros, or C NaNs (0xFF bytes are a NaN in float and double), in the accumulator type.
cudaError_t fill_channels(DType dtype, void* dst, int64_t C, bool nan, cudaStream_t stream) {
  if (dst == nullptr || C == 0) return cudaSuccess;
  return cudaMemsetAsync(dst, nan ? 0xFF : 0, static_cast<size_t>(C) * acc_size(dtype), stream);
}

bool enough(const LMStepShape& shape, DType dtype, const void* workspace, size_t bytes) {
  return workspace != nullptr && bytes >= batch_norm_workspace_bytes(dtype, shape);
}

}  // namespace

size_t batch_norm_workspace_bytes(DType dtype, const LMStepShape& shape) {
  if (!valid_shape(dtype, shape) || empty_shape(shape)) return 0;
  return LMF_DISPATCH_DTYPE(dtype, bn_workspace_bytes_typed, shape);
}

cudaError_t launch_batch_norm_stats(DType dtype, const LMStepShape& shape, const void* x,
                                    void* mean, void* var, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream) {
  if (!valid_shape(dtype, shape)) return cudaErrorInvalidValue;
  if (shape.C == 0) return cudaSuccess;
  if (mean == nullptr || var == nullptr) return cudaErrorInvalidValue;
  if (empty_shape(shape)) {  // no values: the mean of nothing is NaN, as in torch
    const cudaError_t err = fill_channels(dtype, mean, shape.C, true, stream);
    return err != cudaSuccess ? err : fill_channels(dtype, var, shape.C, true, stream);
  }
  if (x == nullptr || !enough(shape, dtype, workspace, workspace_bytes))
    return cudaErrorInvalidValue;
  BatchNormOperands o;
  o.shape = shape;
  o.x = x;
  o.sum0 = mean;
  o.sum1 = var;
  o.workspace = workspace;
  return LMF_DISPATCH_DTYPE(dtype, bn_stats_typed, o, stream);
}

cudaError_t launch_batch_norm_lm_step_forward(DType dtype, const LMStepShape& shape,
                                              const void* x, const void* mean, const void* invstd,
                                              const void* weight, const void* bias, const void* u,
                                              const void* u_prev, const void* k, int64_t k_numel,
                                              const void* scale, const int64_t* seed,
                                              double noise_std, bool relu, void* out,
                                              cudaStream_t stream) {
  if (!valid_shape(dtype, shape)) return cudaErrorInvalidValue;
  if (empty_shape(shape)) return cudaSuccess;
  const bool state = u != nullptr;
  if (x == nullptr || mean == nullptr || invstd == nullptr || out == nullptr ||
      state != (u_prev != nullptr))
    return cudaErrorInvalidValue;
  if (state && (k == nullptr || (k_numel != 1 && k_numel != shape.C)))
    return cudaErrorInvalidValue;
  if (noise_std != 0.0 && seed == nullptr) return cudaErrorInvalidValue;
  BatchNormOperands o;
  o.shape = shape;
  o.x = x;
  o.mean = mean;
  o.invstd = invstd;
  o.weight = weight;
  o.bias = bias;
  o.u = u;
  o.u_prev = u_prev;
  o.k = state ? k : nullptr;
  o.k_numel = k_numel;
  o.scale = scale;
  o.seed = seed;
  o.noise_std = noise_std;
  o.relu = relu;
  o.result = out;
  return LMF_DISPATCH_DTYPE(dtype, bn_forward_typed, o, stream);
}

cudaError_t launch_batch_norm_lm_step_backward_reduce(
    DType dtype, const LMStepShape& shape, const void* grad_out, const void* x, const void* mean,
    const void* invstd, const void* weight, const void* bias, const void* u, const void* u_prev,
    const void* k, int64_t k_numel, const void* out, const void* scale, bool relu, void* sum_dy,
    void* sum_dy_xhat, void* grad_k_per_channel, void* workspace, size_t workspace_bytes,
    cudaStream_t stream) {
  if (!valid_shape(dtype, shape)) return cudaErrorInvalidValue;
  if (sum_dy == nullptr || sum_dy_xhat == nullptr) return cudaErrorInvalidValue;
  const bool need_k = grad_k_per_channel != nullptr;
  if (need_k && (u == nullptr || u_prev == nullptr)) return cudaErrorInvalidValue;
  // The recomputed mask: with state when u and u_prev are given (k then too), else without.
  const bool recompute = relu && out == nullptr;
  const bool recompute_state = recompute && u != nullptr;
  if (recompute && (u == nullptr) != (u_prev == nullptr)) return cudaErrorInvalidValue;
  if (recompute_state && (k == nullptr || (k_numel != 1 && k_numel != shape.C)))
    return cudaErrorInvalidValue;
  if (empty_shape(shape)) {  // empty sums are 0
    cudaError_t err = fill_channels(dtype, sum_dy, shape.C, false, stream);
    if (err == cudaSuccess) err = fill_channels(dtype, sum_dy_xhat, shape.C, false, stream);
    if (err == cudaSuccess) err = fill_channels(dtype, grad_k_per_channel, shape.C, false, stream);
    return err;
  }
  if (grad_out == nullptr || x == nullptr || mean == nullptr || invstd == nullptr ||
      !enough(shape, dtype, workspace, workspace_bytes))
    return cudaErrorInvalidValue;
  const bool read_state = need_k || recompute_state;
  BatchNormOperands o;
  o.shape = shape;
  o.grad_out = grad_out;
  o.x = x;
  o.mean = mean;
  o.invstd = invstd;
  o.weight = weight;
  o.bias = bias;
  o.u = read_state ? u : nullptr;  // with relu and no out, u selects the mask with state
  o.u_prev = read_state ? u_prev : nullptr;
  o.k = recompute_state ? k : nullptr;
  o.k_numel = k_numel;
  o.out = relu ? out : nullptr;
  o.scale = scale;
  o.relu = relu;
  o.sum0 = sum_dy;
  o.sum1 = sum_dy_xhat;
  o.sum2 = grad_k_per_channel;
  o.workspace = workspace;
  return LMF_DISPATCH_DTYPE(dtype, bn_reduce_typed, o, stream);
}

cudaError_t launch_batch_norm_lm_step_backward(
    DType dtype, const LMStepShape& shape, const void* grad_out, const void* grad_shortcut,
    const void* x, const void* mean, const void* invstd, const void* weight, const void* bias,
    const void* mean_dy, const void* mean_dy_xhat, const void* out, const void* k,
    int64_t k_numel, const void* scale, bool training, bool relu, void* grad_x, void* grad_u,
    void* grad_u_prev, cudaStream_t stream) {
  if (!valid_shape(dtype, shape)) return cudaErrorInvalidValue;
  const bool need_state = grad_u != nullptr || grad_u_prev != nullptr;
  // The recomputed mask (relu without out) is the no-state mode's, which has no u or u_prev.
  if (need_state && (k == nullptr || (k_numel != 1 && k_numel != shape.C) ||
                     (relu && out == nullptr)))
    return cudaErrorInvalidValue;
  if (empty_shape(shape) || (grad_x == nullptr && !need_state)) return cudaSuccess;
  if (grad_out == nullptr) return cudaErrorInvalidValue;
  const bool recompute = relu && out == nullptr;
  if ((grad_x != nullptr || recompute) && (x == nullptr || mean == nullptr || invstd == nullptr))
    return cudaErrorInvalidValue;
  if (grad_x != nullptr && training && (mean_dy == nullptr || mean_dy_xhat == nullptr))
    return cudaErrorInvalidValue;
  BatchNormOperands o;
  o.shape = shape;
  o.grad_out = grad_out;
  o.grad_shortcut = grad_shortcut;
  o.x = x;
  o.mean = mean;
  o.invstd = invstd;
  o.weight = weight;
  o.bias = bias;
  o.mean_dy = mean_dy;
  o.mean_dy_xhat = mean_dy_xhat;
  o.out = relu ? out : nullptr;
  o.k = k;
  o.k_numel = k_numel;
  o.scale = scale;
  o.training = training;
  o.relu = relu;
  o.grad_x = grad_x;
  o.grad_u = grad_u;
  o.grad_u_prev = grad_u_prev;
  return LMF_DISPATCH_DTYPE(dtype, bn_backward_typed, o, stream);
}

}  // namespace lmfused
