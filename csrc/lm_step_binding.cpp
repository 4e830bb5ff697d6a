// The LM step's torch binding (batch_norm_lm_step_binding.cpp is the fused batch norm's; both
// share torch_binding.h): validates and normalises tensors, then calls the torch-free launchers
// of lm_step.h. Registers CUDA kernels for the ops whose schemas the Python
// package defines (lmfused/ops.py):
//   lmfused::lm_step_cuda(Tensor u, Tensor u_prev, Tensor? f, Tensor k, Tensor? scale,
//                         Tensor? seed, bool relu, float noise_std) -> Tensor
//   lmfused::lm_step_cuda_backward(Tensor grad_out, Tensor? grad_shortcut, Tensor? u,
//                         Tensor? u_prev, Tensor? out, Tensor k, Tensor? scale, bool relu,
//                         bool need_u, bool need_u_prev, bool need_f, bool need_k)
//                         -> (Tensor, Tensor, Tensor, Tensor)
// and a pybind11 helper build_info(). Nothing here syncs with the host, so both ops can be
// captured in CUDA graphs (the noise seed is read by the kernel from device memory).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE)
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "lm_step.h"
#include "torch_binding.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

using at::Tensor;
using namespace lmfused::binding;  // NOLINT: the shared checks and layout helpers

// grad_k's summation order follows the tiles, whose size follows the vector width, which the
// launcher picks from the row length and the alignment of every buffer (lm_step.h). So that
// through torch grad_k's bits depend on the values, shape, layout and flags only, a grad_k
// backward copies an operand whose data pointer is not 16-byte aligned (a view at a storage
// offset; fresh tensors are always aligned) to a fresh buffer when its rows could take a vector
// path: one extra pass over that tensor, in a rare case.
Tensor aligned_for_grad_k(const Tensor& t, bool need_k, int64_t row_length) {
  if (!need_k || !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
  const int64_t elem = static_cast<int64_t>(t.element_size());
  const int64_t narrowest_vector = elem == 8 ? 2 : 8 / elem;  // 64-bit (128-bit for double)
  if (row_length % narrowest_vector != 0) return t;            // the scalar path in any case
  return t.clone();  // preserve_format: a dense tensor keeps its strides
}

Tensor lm_step_cuda(const Tensor& u, const Tensor& u_prev, const std::optional<Tensor>& f,
                    const Tensor& k, const std::optional<Tensor>& scale,
                    const std::optional<Tensor>& seed, bool relu, double noise_std) {
  constexpr const char* op = "lmfused::lm_step_cuda";
  check_activation(u, op, "u");
  check_like(u_prev, op, "u_prev", u, "u");
  if (f.has_value()) check_like(*f, op, "f", u, "u");
  const int64_t N = u.size(0), C = u.size(1), S = spatial_numel(u);
  check_k(k, op, C, u);
  check_scale(scale, op, N, u);
  const bool has_noise = noise_std != 0.0;
  if (has_noise) check_seed(seed, op, u);

  const c10::cuda::CUDAGuard guard(u.device());
  const Layout layout = choose_layout(u);
  const Tensor u_n = normalise(u, layout);
  Tensor out = at::empty_like(u_n);  // dense input: empty_like keeps its exact strides
  if (u.numel() == 0) return out;
  const Tensor up_n = normalise(u_prev, layout);
  const Tensor f_n = f.has_value() ? normalise(*f, layout) : Tensor();
  const at::ScalarType acc = acc_type(u.scalar_type());
  const Tensor k_acc = k.reshape({-1}).to(acc).contiguous();
  const Tensor s_acc = scale.has_value() ? scale->to(acc).contiguous() : Tensor();
  const Tensor seed_c = has_noise ? seed->contiguous() : Tensor();

  const lmfused::LMStepShape shape{N, C, S, layout.channels_last_view};
  const cudaError_t err = lmfused::launch_lm_step_forward(
      to_dtype(u.scalar_type()), shape, u_n.data_ptr(), up_n.data_ptr(),
      f_n.defined() ? f_n.data_ptr() : nullptr, k_acc.data_ptr(), k_acc.numel(),
      s_acc.defined() ? s_acc.data_ptr() : nullptr,
      has_noise ? seed_c.data_ptr<int64_t>() : nullptr, noise_std, relu, out.data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, op);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lm_step_cuda_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_shortcut,
    const std::optional<Tensor>& u, const std::optional<Tensor>& u_prev,
    const std::optional<Tensor>& out, const Tensor& k, const std::optional<Tensor>& scale,
    bool relu, bool need_u, bool need_u_prev, bool need_f, bool need_k) {
  constexpr const char* op = "lmfused::lm_step_cuda_backward";
  check_activation(grad_out, op, "grad_out");
  const bool has_shortcut = need_u && grad_shortcut.has_value();  // ignored without grad_u
  if (has_shortcut) check_like(*grad_shortcut, op, "grad_shortcut", grad_out, "grad_out");
  if (need_k) {
    TORCH_CHECK_VALUE(u.has_value() && u_prev.has_value(), op,
                      ": u and u_prev are required when need_k");
    check_like(*u, op, "u", grad_out, "grad_out");
    check_like(*u_prev, op, "u_prev", grad_out, "grad_out");
  }
  if (relu) {
    TORCH_CHECK_VALUE(out.has_value(), op, ": out is required when relu");
    check_like(*out, op, "out", grad_out, "grad_out");
  }
  const int64_t N = grad_out.size(0), C = grad_out.size(1), S = spatial_numel(grad_out);
  check_k(k, op, C, grad_out);
  check_scale(scale, op, N, grad_out);

  const c10::cuda::CUDAGuard guard(grad_out.device());
  // Gradients take u's normalised layout (grad_out's when u is not passed), as the fake impl does.
  const Layout layout = choose_layout(need_k ? *u : grad_out);
  const int64_t row_length = layout.channels_last_view ? C : S;
  const Tensor g_n = aligned_for_grad_k(normalise(grad_out, layout), need_k, row_length);
  const at::ScalarType acc = acc_type(grad_out.scalar_type());
  // Placeholders for gradients not asked for: distinct (non-aliasing) empty tensors.
  auto grad_like = [&](bool needed) {
    return needed ? at::empty_like(g_n) : at::empty({0}, grad_out.options());
  };
  Tensor grad_u = grad_like(need_u), grad_up = grad_like(need_u_prev), grad_f = grad_like(need_f);
  Tensor grad_k = need_k ? at::empty_like(k) : at::empty({0}, k.options());
  if (grad_out.numel() == 0 || !(need_u || need_u_prev || need_f || need_k)) {
    if (need_k) grad_k.zero_();  // an empty sum
    return {grad_u, grad_up, grad_f, grad_k};
  }

  const Tensor u_n =
      need_k ? aligned_for_grad_k(normalise(*u, layout), true, row_length) : Tensor();
  const Tensor up_n =
      need_k ? aligned_for_grad_k(normalise(*u_prev, layout), true, row_length) : Tensor();
  const Tensor out_n =
      relu ? aligned_for_grad_k(normalise(*out, layout), need_k, row_length) : Tensor();
  const Tensor shortcut_n =
      has_shortcut ? aligned_for_grad_k(normalise(*grad_shortcut, layout), need_k, row_length)
                   : Tensor();
  const Tensor k_acc = k.reshape({-1}).to(acc).contiguous();
  const Tensor s_acc = scale.has_value() && need_f ? scale->to(acc).contiguous() : Tensor();
  // grad_k is reduced in the compute type into a flat buffer, then copied if k differs in either.
  const bool write_direct = need_k && k.scalar_type() == acc && grad_k.is_contiguous();
  Tensor grad_k_acc = !need_k      ? Tensor()
                      : write_direct ? grad_k
                                     : at::empty({k.numel()}, k.options().dtype(acc));
  const lmfused::DType dtype = to_dtype(grad_out.scalar_type());
  const lmfused::LMStepShape shape{N, C, S, layout.channels_last_view};
  const size_t ws_bytes = need_k ? lmfused::lm_step_backward_workspace_bytes(dtype, shape) : 0;
  const int64_t acc_size = acc == at::kDouble ? 8 : 4;
  const Tensor workspace =
      need_k ? at::empty({static_cast<int64_t>(ws_bytes) / acc_size}, k_acc.options())
             : Tensor();

  const cudaError_t err = lmfused::launch_lm_step_backward(
      dtype, shape, g_n.data_ptr(), has_shortcut ? shortcut_n.data_ptr() : nullptr,
      need_k ? u_n.data_ptr() : nullptr,
      need_k ? up_n.data_ptr() : nullptr, relu ? out_n.data_ptr() : nullptr, k_acc.data_ptr(),
      k_acc.numel(), s_acc.defined() ? s_acc.data_ptr() : nullptr, relu,
      need_u ? grad_u.data_ptr() : nullptr, need_u_prev ? grad_up.data_ptr() : nullptr,
      need_f ? grad_f.data_ptr() : nullptr, need_k ? grad_k_acc.data_ptr() : nullptr,
      need_k ? workspace.data_ptr() : nullptr, ws_bytes, c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, op);
  if (need_k && !grad_k_acc.is_same(grad_k)) grad_k.copy_(grad_k_acc.view(k.sizes()));
  return {grad_u, grad_up, grad_f, grad_k};
}

#define LMF_STR2(...) #__VA_ARGS__
#define LMF_STR(...) LMF_STR2(__VA_ARGS__)

std::string cuda_version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace

TORCH_LIBRARY_IMPL(lmfused, CUDA, m) {
  m.impl("lm_step_cuda", TORCH_FN(lm_step_cuda));
  m.impl("lm_step_cuda_backward", TORCH_FN(lm_step_cuda_backward));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lmfused CUDA backend: registers lmfused::lm_step_cuda(_backward) for CUDA tensors.";
  m.def(
      "build_info",
      []() {
        pybind11::dict d;
#ifdef LMFUSED_CUDA_ARCHS  // unquoted, comma-separated (e.g. 8.0,9.0): shell-safe in build files
        d["cuda_archs"] = std::string(LMF_STR(LMFUSED_CUDA_ARCHS));  // as requested by the build
#else
        d["cuda_archs"] = std::string(lmfused::compiled_cuda_archs());
#endif
        d["cuda_arch_list"] = std::string(lmfused::compiled_cuda_archs());  // nvcc's, e.g. 800,900
        d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                             std::to_string(TORCH_VERSION_MINOR) + "." +
                             std::to_string(TORCH_VERSION_PATCH);
        d["cuda_version"] = cuda_version_string(lmfused::compiled_cudart_version());
        d["cudart_version"] = lmfused::compiled_cudart_version();
        return d;
      },
      "Archs, torch and CUDA versions this extension was compiled for.");
}
