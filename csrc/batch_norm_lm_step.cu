// Public entry points of the batch-norm-fused LM step (batch_norm_lm_step.h): argument checks
// and the dtype switch. The typed bodies live in batch_norm_lm_step.cuh, instantiated per dtype
// in batch_norm_lm_step_<dtype>.cu.
#include "batch_norm_lm_step.h"

#include "batch_norm_lm_step_dispatch.h"
#include "kernel_common.cuh"

namespace lmfused {
namespace {

bool valid_shape(DType dtype, const LMStepShape& s) {
  return valid_dtype(dtype) && s.N >= 0 && s.C >= 0 && s.S >= 0;
}

size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// C zeros in the accumulator type (the empty sums).
cudaError_t zero_channels(DType dtype, void* dst, int64_t count, cudaStream_t stream) {
  if (dst == nullptr || count == 0) return cudaSuccess;
  return detail::memset_async(dst, 0, static_cast<size_t>(count) * acc_size(dtype), stream);
}

bool enough(DType dtype, const LMStepShape& shape, const ReductionScratch& s) {
  const ReductionScratch need = batch_norm_scratch(dtype, shape);
  return s.workspace != nullptr && s.counters != nullptr &&
         s.workspace_bytes >= need.workspace_bytes && s.counter_count >= need.counter_count;
}

}  // namespace

ReductionScratch batch_norm_scratch(DType dtype, const LMStepShape& shape) {
  if (!valid_shape(dtype, shape) || empty_shape(shape)) return {};
  return LMF_DISPATCH_DTYPE(dtype, bn_scratch_typed, shape);
}

cudaError_t launch_batch_norm_stats(DType dtype, const LMStepShape& shape, const void* x,
                                    bool training, double momentum, double eps,
                                    void* running_mean, void* running_var, DType running_dtype,
                                    void* mean, void* invstd, const ReductionScratch& scratch,
                                    cudaStream_t stream) {
  if (!valid_shape(dtype, shape) || !valid_dtype(running_dtype)) return cudaErrorInvalidValue;
  if (shape.C == 0) return cudaSuccess;
  if (mean == nullptr || invstd == nullptr || (running_mean == nullptr) != (running_var == nullptr))
    return cudaErrorInvalidValue;
  if (!training && running_mean == nullptr) return cudaErrorInvalidValue;
  BatchNormOperands o(shape, x);
  o.with_sums(mean, invstd, nullptr, scratch);
  o.training = training && !empty_shape(shape);  // no values: the evaluation kernel's defaults
  o.momentum = momentum;
  o.eps = eps;
  o.running_mean = training ? (o.training ? running_mean : nullptr) : running_mean;
  o.running_var = training ? (o.training ? running_var : nullptr) : running_var;
  o.running_dtype = running_dtype;
  if (o.training && (x == nullptr || !enough(dtype, shape, scratch))) return cudaErrorInvalidValue;
  return LMF_DISPATCH_DTYPE(dtype, bn_stats_typed, o, stream);
}

cudaError_t launch_batch_norm_lm_step_forward(DType dtype, const LMStepShape& shape,
                                              const void* x, const void* mean, const void* invstd,
                                              const void* weight, const void* bias, const void* u,
                                              const void* u_prev, const void* k, int64_t k_numel,
                                              const void* scale, const int64_t* seed,
                                              double noise_std, bool relu, void* out, void* mask,
                                              cudaStream_t stream) {
  if (!valid_shape(dtype, shape)) return cudaErrorInvalidValue;
  const bool state = u != nullptr;
  if (state != (u_prev != nullptr)) return cudaErrorInvalidValue;
  if (state && (k == nullptr || (k_numel != 1 && k_numel != shape.C)))
    return cudaErrorInvalidValue;
  if (mask != nullptr && !(relu && state)) return cudaErrorInvalidValue;
  if (empty_shape(shape)) return cudaSuccess;
  if (x == nullptr || mean == nullptr || invstd == nullptr || out == nullptr)
    return cudaErrorInvalidValue;
  if (noise_std != 0.0 && seed == nullptr) return cudaErrorInvalidValue;
  BatchNormOperands o(shape, x);
  o.normalised_by(mean, invstd, weight, bias, scale)
      .with_state(u, u_prev, state ? k : nullptr, k_numel)
      .with_noise_and_relu(seed, noise_std, relu);
  o.result = out;
  o.mask_out = mask;
  return LMF_DISPATCH_DTYPE(dtype, bn_forward_typed, o, stream);
}

cudaError_t launch_batch_norm_lm_step_backward_reduce(
    DType dtype, const LMStepShape& shape, const void* grad_out, const void* grad_handoff,
    const void* x, const void* mean, const void* invstd, const void* weight, const void* bias,
    const void* u, const void* u_prev, const void* mask, const void* scale, bool relu,
    void* sum_dy, void* sum_dy_xhat, void* grad_k, int64_t k_numel,
    const ReductionScratch& scratch, cudaStream_t stream) {
  if (!valid_shape(dtype, shape)) return cudaErrorInvalidValue;
  if (sum_dy == nullptr || sum_dy_xhat == nullptr) return cudaErrorInvalidValue;
  const bool need_k = grad_k != nullptr;
  if (need_k && (u == nullptr || u_prev == nullptr || (k_numel != 1 && k_numel != shape.C)))
    return cudaErrorInvalidValue;
  if (relu && mask == nullptr && need_k) return cudaErrorInvalidValue;  // a state needs its mask
  if (empty_shape(shape)) {  // empty sums are 0
    cudaError_t err = zero_channels(dtype, sum_dy, shape.C, stream);
    if (err == cudaSuccess) err = zero_channels(dtype, sum_dy_xhat, shape.C, stream);
    if (err == cudaSuccess && need_k) err = zero_channels(dtype, grad_k, k_numel, stream);
    return err;
  }
  if (grad_out == nullptr || x == nullptr || mean == nullptr || invstd == nullptr ||
      !enough(dtype, shape, scratch))
    return cudaErrorInvalidValue;
  BatchNormOperands o(shape, x);
  o.normalised_by(mean, invstd, weight, bias, scale)
      .with_state(need_k ? u : nullptr, need_k ? u_prev : nullptr, nullptr, k_numel)
      .with_output_gradient(grad_out, grad_handoff, mask, relu)
      .with_sums(sum_dy, sum_dy_xhat, grad_k, scratch);
  return LMF_DISPATCH_DTYPE(dtype, bn_reduce_typed, o, stream);
}

cudaError_t launch_batch_norm_lm_step_backward(
    DType dtype, const LMStepShape& shape, const void* grad_out, const void* grad_handoff,
    const void* grad_shortcut, const void* x, const void* mean, const void* invstd,
    const void* weight, const void* bias, const void* sum_dy, const void* sum_dy_xhat,
    const void* mask, const void* k, int64_t k_numel, const void* scale, bool training, bool relu,
    void* grad_x, void* grad_u, void* grad_u_prev, cudaStream_t stream) {
  if (!valid_shape(dtype, shape)) return cudaErrorInvalidValue;
  const bool need_state = grad_u != nullptr || grad_u_prev != nullptr;
  // The recomputed mask (relu without a mask) is the no-state mode's, which has no u or u_prev.
  if (need_state && (k == nullptr || (k_numel != 1 && k_numel != shape.C) ||
                     (relu && mask == nullptr)))
    return cudaErrorInvalidValue;
  if (empty_shape(shape) || (grad_x == nullptr && !need_state)) return cudaSuccess;
  if (grad_out == nullptr) return cudaErrorInvalidValue;
  const bool recompute = relu && mask == nullptr;
  if ((grad_x != nullptr || recompute) && (x == nullptr || mean == nullptr || invstd == nullptr))
    return cudaErrorInvalidValue;
  if (grad_x != nullptr && training && (sum_dy == nullptr || sum_dy_xhat == nullptr))
    return cudaErrorInvalidValue;
  BatchNormOperands o(shape, x);
  o.normalised_by(mean, invstd, weight, bias, scale)
      .with_state(nullptr, nullptr, k, k_numel)
      .with_output_gradient(grad_out, grad_handoff, mask, relu)
      .writing_gradients(grad_x, grad_u, grad_u_prev, sum_dy, sum_dy_xhat);
  o.grad_shortcut = grad_u != nullptr ? grad_shortcut : nullptr;  // only grad_u reads it
  o.training = training;
  return LMF_DISPATCH_DTYPE(dtype, bn_backward_typed, o, stream);
}

}  // namespace lmfused
