// Internal: the operands of the batch-norm-fused launchers (batch_norm_lm_step.h) and their
// per-dtype bodies (defined in batch_norm_lm_step.cuh, explicitly instantiated in
// batch_norm_lm_step_{f32,f16,bf16,f64}.cu). Torch-free; includes only CUDA headers.
#pragma once

#include "lm_step_dispatch.h"

namespace lmfused {

// Every operand of the four launchers; each reads the ones its entry point documents, and an
// unused or absent one is nullptr. Built one way by every entry point (batch_norm_lm_step.cu): the
// shape and x, then the groups below, then what only that pass has.
struct BatchNormOperands {
  BatchNormOperands(const LMStepShape& shape_, const void* x_) : shape(shape_), x(x_) {}

  // x's normalisation (per-channel statistics and affine parameters) and the per-sample scale.
  BatchNormOperands& normalised_by(const void* mean_, const void* invstd_, const void* weight_,
                                   const void* bias_, const void* scale_) {
    mean = mean_;
    invstd = invstd_;
    weight = weight_;
    bias = bias_;
    scale = scale_;
    return *this;
  }
  // The LM step's state and its coefficient k (k_numel values).
  BatchNormOperands& with_state(const void* u_, const void* u_prev_, const void* k_,
                                int64_t k_numel_) {
    u = u_;
    u_prev = u_prev_;
    k = k_;
    k_numel = k_numel_;
    return *this;
  }
  // A backward pass's output gradient: grad_out (+ grad_handoff), through the ReLU's mask (read
  // only with relu).
  BatchNormOperands& with_output_gradient(const void* grad_out_, const void* grad_handoff_,
                                          const void* mask_, bool relu_) {
    grad_out = grad_out_;
    grad_handoff = grad_handoff_;
    mask = relu_ ? mask_ : nullptr;
    relu = relu_;
    return *this;
  }
  // The forward's noise (seed required iff noise_std != 0) and activation.
  BatchNormOperands& with_noise_and_relu(const int64_t* seed_, double noise_std_, bool relu_) {
    seed = seed_;
    noise_std = noise_std_;
    relu = relu_;
    return *this;
  }
  // The second backward pass's gradients to write (nullptr: not needed) and the sums grad_x reads.
  BatchNormOperands& writing_gradients(void* grad_x_, void* grad_u_, void* grad_u_prev_,
                                       const void* sum_dy_, const void* sum_dy_xhat_) {
    grad_x = grad_x_;
    grad_u = grad_u_;
    grad_u_prev = grad_u_prev_;
    sum_dy = sum_dy_;
    sum_dy_xhat = sum_dy_xhat_;
    return *this;
  }
  // A reduction's per-channel outputs and its scratch.
  BatchNormOperands& with_sums(void* out0_, void* out1_, void* out2_,
                               const ReductionScratch& scratch_) {
    out0 = out0_;
    out1 = out1_;
    out2 = out2_;
    scratch = scratch_;
    return *this;
  }

  LMStepShape shape;
  const void* x = nullptr;  // activations (one dtype, the normalised layout of `shape`)
  const void* u = nullptr;
  const void* u_prev = nullptr;
  const void* grad_out = nullptr;
  const void* grad_handoff = nullptr;  // the output's other gradient part (nullptr: none)
  const void* grad_shortcut = nullptr;
  const void* mask = nullptr;  // the 1-bit ReLU mask to read
  const void* mean = nullptr;  // accumulator type: C values (scale: N)
  const void* invstd = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* k = nullptr;
  const void* scale = nullptr;
  const void* sum_dy = nullptr;
  const void* sum_dy_xhat = nullptr;
  const int64_t* seed = nullptr;
  int64_t k_numel = 1;
  double noise_std = 0.0;
  double momentum = 0.0;
  double eps = 0.0;
  bool relu = false;
  bool training = false;
  void* running_mean = nullptr;  // running statistics (running_dtype), updated in place
  void* running_var = nullptr;
  DType running_dtype = DType::kFloat32;
  void* result = nullptr;  // the forward's output
  void* mask_out = nullptr;  // the forward's 1-bit mask
  void* grad_x = nullptr;
  void* grad_u = nullptr;
  void* grad_u_prev = nullptr;
  void* out0 = nullptr;  // per-channel outputs: mean, invstd | sum_dy, sum_dy_xhat, grad_k
  void* out1 = nullptr;
  void* out2 = nullptr;
  ReductionScratch scratch;
};

namespace detail {

template <typename T>
ReductionScratch bn_scratch_typed(const LMStepShape& sh);
template <typename T>
cudaError_t bn_stats_typed(const BatchNormOperands& o, cudaStream_t stream);
template <typename T>
cudaError_t bn_forward_typed(const BatchNormOperands& o, cudaStream_t stream);
template <typename T>
cudaError_t bn_reduce_typed(const BatchNormOperands& o, cudaStream_t stream);
template <typename T>
cudaError_t bn_backward_typed(const BatchNormOperands& o, cudaStream_t stream);

}  // namespace detail
}  // namespace lmfused
