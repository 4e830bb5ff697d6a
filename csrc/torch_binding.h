// Torch-side helpers shared by the bindings (lm_step_binding.cpp, batch_norm_lm_step_binding.cpp):
// dtype mapping, argument checks, and the layout normalisation that maps a tensor onto the
// kernels' two layouts (lm_step.h).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "lm_step.h"

namespace lmfused {
namespace binding {

using at::Tensor;

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline lmfused::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return lmfused::DType::kFloat16;
    case at::kBFloat16:
      return lmfused::DType::kBFloat16;
    case at::kDouble:
      return lmfused::DType::kFloat64;
    default:
      return lmfused::DType::kFloat32;
  }
}

// Compute (and grad_k) type: float32, or float64 for float64 activations.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t spatial_numel(const Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// Dense with the channel dim fastest, then the spatial dims in order, then the batch dim
// (torch's channels_last / channels_last_3d, generalised to any rank >= 3). Strides of size-1
// dims do not matter, as in torch.
inline bool is_channels_last_dense(const Tensor& t) {
  int64_t expected = 1;
  auto fits = [&](int64_t d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
    return true;
  };
  if (!fits(1)) return false;
  for (int64_t d = t.dim() - 1; d >= 2; --d)
    if (!fits(d)) return false;
  return fits(0);
}

// Channels-last-dense copy of t (t itself if it already is); works for every rank >= 3.
inline Tensor to_channels_last(const Tensor& t) {
  if (is_channels_last_dense(t)) return t;
  const int64_t r = t.dim();
  std::vector<int64_t> perm{0}, inverse(static_cast<size_t>(r));
  for (int64_t d = 2; d < r; ++d) perm.push_back(d);
  perm.push_back(1);
  for (int64_t i = 0; i < r; ++i) inverse[static_cast<size_t>(perm[i])] = i;
  return t.permute(perm).contiguous().permute(inverse);
}

struct Layout {
  bool channels_last_view;  // kernels see (N*S rows, C columns)
  bool channels_last_memory;  // buffers are channels-last-dense (else plain contiguous)
};

// Layout decision, made on one reference tensor and applied to every activation-sized tensor.
// Rank 2 and S == 1 are plain contiguous memory that is already (N, C) row-major.
inline Layout choose_layout(const Tensor& ref) {
  if (ref.dim() == 2 || spatial_numel(ref) == 1) return {true, false};
  if (is_channels_last_dense(ref) && !ref.is_contiguous()) return {true, true};
  return {false, false};
}

inline Tensor normalise(const Tensor& t, const Layout& layout) {
  return layout.channels_last_memory ? to_channels_last(t) : t.contiguous();
}

inline void check_activation(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() >= 2, op, ": ", name, " must have rank >= 2 (N, C, *spatial), got ",
                    "shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ",
                    t.device());
}

inline void check_like(const Tensor& t, const char* op, const char* name, const Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ",
                    ref_name, " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name,
                    "'s device ", ref.device(), ", got ", t.device());
}

inline void check_k(const Tensor& k, const char* op, int64_t C, const Tensor& ref) {
  // Any float k (after model.half() or model.bfloat16() k follows the model's dtype): the kernels
  // read it in the compute type, and grad_k comes back in k's dtype, as on the other backends.
  TORCH_CHECK_TYPE(at::isFloatingType(k.scalar_type()), op,
                   ": k must be a floating tensor, got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.numel() == 1 || k.numel() == C, op,
                    ": k must have 1 or C = ", C, " elements, got shape ", k.sizes());
  TORCH_CHECK_VALUE(k.device() == ref.device(), op, ": k must be on ", ref.device(), ", got ",
                    k.device());
}

inline void check_scale(const std::optional<Tensor>& scale, const char* op, int64_t N,
                 const Tensor& ref) {
  if (!scale.has_value()) return;
  const Tensor& s = *scale;
  TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), op,
                   ": scale must be a floating tensor, got ", s.scalar_type());
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == N, op, ": scale must have shape (N,) = (", N,
                    ",), got ", s.sizes());
  TORCH_CHECK_VALUE(s.device() == ref.device(), op, ": scale must be on ", ref.device(),
                    ", got ", s.device());
}

// The noise seed: a one-element int64 tensor on ref's device.
inline void check_seed(const std::optional<Tensor>& seed, const char* op, const Tensor& ref) {
  TORCH_CHECK_VALUE(seed.has_value(), op, ": noise_std != 0 needs a seed tensor");
  TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong, op, ": seed must be int64, got ",
                   seed->scalar_type());
  TORCH_CHECK_VALUE(seed->numel() >= 1 && seed->device() == ref.device(), op,
                    ": seed must be a one-element tensor on ", ref.device(), ", got shape ",
                    seed->sizes(), " on ", seed->device());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err),
              err == cudaErrorNoKernelImageForDevice
                  ? " (lmfused._C was not built for this GPU; see lmfused._C.build_info())"
                  : "");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace binding
}  // namespace lmfused
