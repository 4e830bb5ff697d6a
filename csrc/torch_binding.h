// Torch-side helpers shared by the bindings (lm_step_binding.cpp, batch_norm_lm_step_binding.cpp):
// dtype mapping, argument checks, the layout normalisation that maps a tensor onto the kernels'
// two layouts (lm_step.h), the reductions' scratch, and the launch plan's mode (launch_plan.cpp):
// while the launchers record (lmfused::launch_log() set), the ops take meta tensors and make no
// CUDA call (no device guard, no stream, fake aligned data pointers, no counters buffer).
#pragma once

// The ATen and c10 headers of what the bindings use, not <torch/extension.h> (pybind11 and the whole
// C++ frontend): about 8 s of compile per file instead of 37 (g++ -O3).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
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

// The launch plan's mode: the launchers record instead of launching (launch_plan.cpp).
inline bool planning() { return lmfused::launch_log() != nullptr; }

inline void check_activation(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() >= 2, op, ": ", name, " must have rank >= 2 (N, C, *spatial), got ",
                    "shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_cuda() || (planning() && t.is_meta()), op, ": ", name,
                    " must be a CUDA tensor, got device ", t.device());
}

// A data pointer for the launchers (nullptr for an undefined tensor). While planning: a fake one,
// 256-byte aligned as the caching allocator's (the plan is of aligned, model-layout operands).
inline void* ptr(const Tensor& t) {
  if (!t.defined()) return nullptr;
  if (planning()) return reinterpret_cast<void*>(uintptr_t{1} << 20);
  return t.data_ptr();
}

// The device guard and the current stream, none while planning.
class DeviceGuard {
 public:
  explicit DeviceGuard(const Tensor& t) {
    if (!planning()) guard_.set_device(t.device());
  }

 private:
  c10::cuda::OptionalCUDAGuard guard_;
};
inline cudaStream_t current_stream() {
  return planning() ? nullptr : c10::cuda::getCurrentCUDAStream().stream();
}

// The scratch of a reduction (lm_step.h, ReductionScratch) launched on the current stream:
// the workspace from the caching allocator (any contents); the ticket counters from one zeroed
// buffer per (device, stream), which every launch leaves zero again, so the launches of one stream
// (one after another) share it and launches on other streams never do. While the stream is being
// captured into a CUDA graph, a zeroed buffer of its own per launch instead (a memset node the
// graph runs at each replay, from the graph's memory pool): replays never share counters with
// other work. `keep` holds the tensors until the launch is queued.
inline lmfused::ReductionScratch reduction_scratch(const lmfused::ReductionScratch& need,
                                                   const Tensor& ref, std::vector<Tensor>& keep) {
  lmfused::ReductionScratch s = need;
  if (need.workspace_bytes == 0 && need.counter_count == 0) return s;
  if (planning()) {  // fake pointers: nothing is launched
    s.workspace = reinterpret_cast<void*>(uintptr_t{1} << 21);
    s.counters = reinterpret_cast<unsigned*>(uintptr_t{1} << 22);
    return s;
  }
  const auto bytes = ref.options().dtype(at::kByte);
  keep.push_back(at::empty({static_cast<int64_t>(need.workspace_bytes)}, bytes));
  s.workspace = keep.back().data_ptr();
  const cudaStream_t stream = current_stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const auto ints = ref.options().dtype(at::kInt);
  const int64_t count = static_cast<int64_t>(need.counter_count);
  if (capture != cudaStreamCaptureStatusNone) {
    keep.push_back(at::zeros({count}, ints));
    s.counters = static_cast<unsigned*>(keep.back().data_ptr());
    return s;
  }
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, Tensor> buffers;
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& buffer = buffers[{static_cast<int>(ref.get_device()), stream}];
  if (!buffer.defined() || buffer.numel() < count) {  // grown in powers of two (a memset, once)
    int64_t size = 256;
    while (size < count) size *= 2;
    buffer = at::zeros({size}, ints);
  }
  s.counters = static_cast<unsigned*>(buffer.data_ptr());
  s.counter_count = static_cast<size_t>(buffer.numel());
  return s;
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
  if (!planning()) C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The ops the bindings register (lm_step_binding.cpp, batch_norm_lm_step_binding.cpp), for the
// launch plan (launch_plan.cpp), which calls them on meta tensors.
Tensor lm_step_cuda(const Tensor& u, const Tensor& u_prev, const std::optional<Tensor>& f,
                    const Tensor& k, const std::optional<Tensor>& scale,
                    const std::optional<Tensor>& seed, bool relu, double noise_std);
std::tuple<Tensor, Tensor, Tensor, Tensor> lm_step_cuda_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_shortcut,
    const std::optional<Tensor>& u, const std::optional<Tensor>& u_prev,
    const std::optional<Tensor>& out, const Tensor& k, const std::optional<Tensor>& scale,
    bool relu, bool need_u, bool need_u_prev, bool need_f, bool need_k);
std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& x,
                                                 const std::optional<Tensor>& running_mean,
                                                 const std::optional<Tensor>& running_var,
                                                 bool training, double momentum, double eps);
std::tuple<Tensor, Tensor> batch_norm_lm_step_cuda(
    const Tensor& x, const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& u,
    const std::optional<Tensor>& u_prev, const Tensor& k, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& seed, bool training, bool relu, double noise_std,
    bool write_mask);
std::tuple<Tensor, Tensor, Tensor> batch_norm_lm_step_cuda_backward_reduce(
    const Tensor& grad_out, const std::optional<Tensor>& grad_handoff, const Tensor& x,
    const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& u,
    const std::optional<Tensor>& u_prev, const Tensor& k, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& scale, bool relu, bool need_k);
std::tuple<Tensor, Tensor, Tensor> batch_norm_lm_step_cuda_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_handoff,
    const std::optional<Tensor>& grad_shortcut, const Tensor& x, const Tensor& mean,
    const Tensor& invstd, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const Tensor& sum_dy, const Tensor& sum_dy_xhat, const std::optional<Tensor>& mask,
    const Tensor& k, const std::optional<Tensor>& scale, bool training, bool relu, bool need_x,
    bool need_u, bool need_u_prev);

// lmfused._C.launch_plan (launch_plan.cpp).
std::vector<std::string> launch_plan(const std::string& op, const std::vector<int64_t>& shape,
                                     const std::string& dtype, bool channels_last,
                                     const std::map<std::string, bool>& flags);

}  // namespace binding
}  // namespace lmfused
