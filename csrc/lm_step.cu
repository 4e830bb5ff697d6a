// Public entry points (lm_step.h): argument checks and the dtype switch. The typed bodies live
// in lm_step_impl.cuh and are instantiated per dtype in lm_step_<dtype>.cu.
#include "lm_step.h"

#include "kernel_common.cuh"
#include "lm_step_dispatch.h"

namespace lmfused {

cudaError_t launch_lm_step_forward(DType dtype, const LMStepShape& shape, const void* u,
                                   const void* u_prev, const void* f, const void* k,
                                   int64_t k_numel, const void* scale, const int64_t* seed,
                                   double noise_std, bool relu, void* out, cudaStream_t stream) {
  if (!valid_dtype(dtype) || shape.N < 0 || shape.C < 0 || shape.S < 0)
    return cudaErrorInvalidValue;
  if (empty_shape(shape)) return cudaSuccess;  // nothing to launch
  if (u == nullptr || u_prev == nullptr || k == nullptr || out == nullptr)
    return cudaErrorInvalidValue;
  if (k_numel != 1 && k_numel != shape.C) return cudaErrorInvalidValue;
  if (noise_std != 0.0 && seed == nullptr) return cudaErrorInvalidValue;
  return LMF_DISPATCH_DTYPE(dtype, forward_typed, shape, u, u_prev, f, k, k_numel, scale, seed,
                            noise_std, relu, out, stream);
}

ReductionScratch lm_step_backward_scratch(DType dtype, const LMStepShape& shape) {
  if (!valid_dtype(dtype) || empty_shape(shape) || shape.N < 0 || shape.C < 0 || shape.S < 0)
    return {};
  return LMF_DISPATCH_DTYPE(dtype, scratch_typed, shape);
}

cudaError_t launch_lm_step_backward(DType dtype, const LMStepShape& shape, const void* grad_out,
                                    const void* grad_shortcut, const void* u,
                                    const void* u_prev, const void* out, const void* k,
                                    int64_t k_numel, const void* scale, bool relu,
                                    void* grad_u, void* grad_u_prev, void* grad_f, void* grad_k,
                                    const ReductionScratch& scratch, cudaStream_t stream) {
  if (!valid_dtype(dtype) || shape.N < 0 || shape.C < 0 || shape.S < 0)
    return cudaErrorInvalidValue;
  if (k_numel != 1 && k_numel != shape.C) return cudaErrorInvalidValue;
  if (empty_shape(shape)) {  // grad_k of an empty sum is 0
    if (grad_k == nullptr) return cudaSuccess;
    const size_t acc = dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
    return detail::memset_async(grad_k, 0, static_cast<size_t>(k_numel) * acc, stream);
  }
  if (grad_out == nullptr || k == nullptr || (relu && out == nullptr))
    return cudaErrorInvalidValue;
  return LMF_DISPATCH_DTYPE(dtype, backward_typed, shape, grad_out, grad_shortcut, u, u_prev, out,
                            k, k_numel, scale, relu, grad_u, grad_u_prev, grad_f, grad_k, scratch,
                            stream);
}

namespace {
thread_local std::vector<std::string>* g_launch_log = nullptr;
}  // namespace

void set_launch_log(std::vector<std::string>* log) { g_launch_log = log; }
std::vector<std::string>* launch_log() { return g_launch_log; }

#define LMF_STR2(...) #__VA_ARGS__  // variadic: the list holds commas
#define LMF_STR(...) LMF_STR2(__VA_ARGS__)

const char* compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return LMF_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int compiled_cudart_version() { return CUDART_VERSION; }

}  // namespace lmfused
