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

// Bytes of device workspace launch_lm_step_backward needs to compute grad_k (an upper bound over
// the vectorised and scalar paths; 0 for an empty tensor).
size_t lm_step_backward_workspace_bytes(DType dtype, const LMStepShape& shape);

// Backward. grad_out: activation dtype. out: required iff relu (grad is masked by out > 0).
// grad_shortcut: activation dtype, same layout, or nullptr: the gradient that reached the step's
// shortcut output (the next step's u_prev); when given, grad_u = (1 - k) * g + grad_shortcut,
// computed in the accumulator type and rounded once (not masked by the ReLU: it is a gradient of
// u itself). Ignored unless grad_u is requested.
// u, u_prev: required iff grad_k is requested. k, scale: as in the forward.
// Outputs are requested by passing non-null pointers: grad_u, grad_u_prev, grad_f (activation
// dtype, same layout) and grad_k (accumulator type, k_numel values). grad_k needs `workspace`
// of at least lm_step_backward_workspace_bytes(); it is reduced deterministically: per-tile
// partial sums, then fixed-order reduction kernels (no atomics), so identical inputs on the same
// device give bitwise identical grad_k. What its bits depend on, exactly: the values, the shape,
// the layout, k_numel, relu, and the vector width, because the tiles (hence the summation
// order) are sized in vectors. The width is the widest of 128-bit, 64-bit and scalar that
// divides the row length and that every buffer touched (grad_out, grad_shortcut if used, out if
// relu, u, u_prev, and the requested gradients) is aligned to. The same values at other addresses
// of the same alignment (16-byte aligned, or 8-byte aligned, or neither) give the same bits; across
// alignments they may differ in the last bits. The torch binding copies a misaligned operand of
// a grad_k backward to an aligned buffer, so through torch the alignment never matters.
cudaError_t launch_lm_step_backward(DType dtype, const LMStepShape& shape, const void* grad_out,
                                    const void* grad_shortcut, const void* u,
                                    const void* u_prev, const void* out, const void* k,
                                    int64_t k_numel, const void* scale, bool relu,
                                    void* grad_u, void* grad_u_prev, void* grad_f, void* grad_k,
                                    void* workspace, size_t workspace_bytes, cudaStream_t stream);

// The archs the kernels were compiled for, from nvcc's __CUDA_ARCH_LIST__ (e.g. "800,900"),
// and the CUDA runtime version they were compiled against (CUDART_VERSION).
const char* compiled_cuda_archs();
int compiled_cudart_version();

}  // namespace lmfused
