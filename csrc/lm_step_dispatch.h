// Internal: the dtype switch, and the per-dtype launcher bodies (defined in lm_step_impl.cuh,
// explicitly instantiated in lm_step_{f32,f16,bf16,f64}.cu). Torch-free: only CUDA headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lm_step.h"

namespace lmfused {

inline bool valid_dtype(DType d) { return static_cast<int>(d) >= 0 && static_cast<int>(d) <= 3; }

inline bool empty_shape(const LMStepShape& s) { return s.N == 0 || s.C == 0 || s.S == 0; }

// detail::FN<T>(...) for the element type T of DTYPE.
#define LMF_DISPATCH_DTYPE(DTYPE, FN, ...)             \
  [&] {                                                \
    switch (DTYPE) {                                   \
      case DType::kFloat32:                            \
        return detail::FN<float>(__VA_ARGS__);         \
      case DType::kFloat16:                            \
        return detail::FN<__half>(__VA_ARGS__);        \
      case DType::kBFloat16:                           \
        return detail::FN<__nv_bfloat16>(__VA_ARGS__); \
      default:                                         \
        return detail::FN<double>(__VA_ARGS__);        \
    }                                                  \
  }()

namespace detail {

template <typename T>
cudaError_t forward_typed(const LMStepShape& sh, const void* u, const void* u_prev, const void* f,
                          const void* k, int64_t k_numel, const void* scale, const int64_t* seed,
                          double noise_std, bool relu, void* out, cudaStream_t stream);

template <typename T>
ReductionScratch scratch_typed(const LMStepShape& sh);

template <typename T>
cudaError_t backward_typed(const LMStepShape& sh, const void* grad_out, const void* grad_shortcut,
                           const void* u, const void* u_prev, const void* out, const void* k,
                           int64_t k_numel, const void* scale, bool relu, void* grad_u,
                           void* grad_u_prev, void* grad_f, void* grad_k,
                           const ReductionScratch& scratch, cudaStream_t stream);

}  // namespace detail
}  // namespace lmfused
