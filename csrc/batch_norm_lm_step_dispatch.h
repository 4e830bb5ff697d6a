// Internal: the operands of the batch-norm-fused launchers (batch_norm_lm_step.h) and their
// per-dtype bodies (defined in batch_norm_lm_step.cuh, explicitly instantiated in
// batch_norm_lm_step_{f32,f16,bf16,f64}.cu). Torch-free; includes only CUDA headers.
#pragma once

#include "lm_step_dispatch.h"

namespace lmfused {

// Every operand of the four launchers; each reads the ones its entry point documents, and an
// unused or absent one is nullptr.
struct BatchNormOperands {
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
