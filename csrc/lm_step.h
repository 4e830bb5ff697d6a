// Torch-free host API of the hand-written CUDA LM-step kernels.
//
// out = act((1 - k) * u + k * u_prev + s * f + noise_std * xi)   (Lu et al., ICML 2018, eq. 7 + noise)
//
// Every tensor is a dense buffer in one of two normalised layouts (the binding, or any other caller,
// does the normalisation):
//   contiguous    (N, C, S) row-major: M = N*C rows of L = S elements; row m has channel m % C.
//   channels-last (N, S, C) row-major: M = N*S rows of L = C elements; column l is channel l.
// S = prod(spatial) (1 for rank-2 input, which callers pass as channels-last).
// Optional operands are passed as nullptr, and the kernels specialise on which are present.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

namespace lmfused {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct LMStepShape {
  int64_t N = 0;               // batch
  int64_t C = 0;               // channels
  int64_t S = 0;               // prod(spatial); 1 for rank-2 tensors
  bool channels_last = false;  // layout of every activation-sized buffer, see above
};

// Forward. u, u_prev, out: activation dtype. f: activation dtype or nullptr (two-term update).
// k: accumulator type (float, or double for kFloat64), k_numel values, k_numel == 1 or C.
// scale: accumulator type, N values, or nullptr (= 1); only used when f is given.
// seed: device pointer to one int64 (read on the device), required iff noise_std != 0.
cudaError_t launch_lm_step_forward(DType dtype, const LMStepShape& shape, const void* u,
                                   const void* u_prev, const void* f, const void* k,
                                   int64_t k_numel, const void* scale, const int64_t* seed,
                                   double noise_std, bool relu, void* out, cudaStream_t stream);

// The scratch memory of a reduction (launch_lm_step_backward with grad_k, and the batch-norm
// reductions, batch_norm_lm_step.h), which merges its partial sums in the same launch: the group
// of CTAs that finishes last (an atomic ticket per group) sums the others' partial sums in a fixed
// order. `workspace`: device memory, any contents. `counters`: device unsigned ints, all zero at
// launch; the launch leaves them zero again (each group's last CTA resets its ticket), so one
// zeroed buffer serves any number of launches that run one after another (one stream). Launches
// that may run at the same time (on other streams, or concurrent CUDA-graph replays) each need
// their own counters. The size functions return the bytes and count needed (pointers null).
struct ReductionScratch {
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  unsigned* counters = nullptr;
  size_t counter_count = 0;
};

ReductionScratch lm_step_backward_scratch(DType dtype, const LMStepShape& shape);

// Backward. grad_out: activation dtype. out: required iff relu (grad is masked by out > 0).
// grad_shortcut: activation dtype, same layout, or nullptr: the gradient that reached the step's
// shortcut output (the next step's u_prev); when given, grad_u = (1 - k) * g + grad_shortcut,
// computed in the accumulator type and rounded once (not masked by the ReLU: it is a gradient of
// u itself). Ignored unless grad_u is requested.
// u, u_prev: required iff grad_k is requested. k, scale: as in the forward.
// Outputs are requested by passing non-null pointers: grad_u, grad_u_prev, grad_f (activation
// dtype, same layout) and grad_k (accumulator type, k_numel values, reduced to k's shape in the
// kernel). grad_k needs `scratch` (lm_step_backward_scratch). It is deterministic: its partial
// sums run in an order set by the shape alone (units of the widest vector the row length allows,
// whatever the buffers' alignment, which only narrows the loads), merged in a fixed order, so the
// same values give bitwise the same grad_k at any address and in any CTA order.
cudaError_t launch_lm_step_backward(DType dtype, const LMStepShape& shape, const void* grad_out,
                                    const void* grad_shortcut, const void* u,
                                    const void* u_prev, const void* out, const void* k,
                                    int64_t k_numel, const void* scale, bool relu,
                                    void* grad_u, void* grad_u_prev, void* grad_f, void* grad_k,
                                    const ReductionScratch& scratch, cudaStream_t stream);

// Launch recording (lmfused._C.launch_plan counts what a call launches, without a GPU): while a
// log is installed on the calling thread, the launchers make no CUDA call at all; they append the
// name of each kernel they would launch (with its template arguments) and "cudaMemsetAsync" for
// each memset. nullptr uninstalls it.
void set_launch_log(std::vector<std::string>* log);
std::vector<std::string>* launch_log();

// The archs the kernels were compiled for, from nvcc's __CUDA_ARCH_LIST__ (e.g. "800,900"),
// and the CUDA runtime version they were compiled against (CUDART_VERSION).
const char* compiled_cuda_archs();
int compiled_cudart_version();

}  // namespace lmfused
