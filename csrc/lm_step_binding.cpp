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
// and the pybind11 helpers build_info() and launch_plan() (launch_plan.cpp). Nothing here syncs
// with the host, so both ops can be captured in CUDA graphs (the noise seed is read by the kernel
// from device memory). A grad_k backward is one launch, its merge inside (lm_step.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE)
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // build_info's and launch_plan's strings, vectors and map
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

namespace lmfused {
namespace binding {

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

  const DeviceGuard guard(u);
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
  check_launch(lmfused::launch_lm_step_forward(
                   to_dtype(u.scalar_type()), shape, ptr(u_n), ptr(up_n), ptr(f_n), ptr(k_acc),
                   k_acc.numel(), ptr(s_acc), static_cast<const int64_t*>(ptr(seed_c)),
                   noise_std, relu, ptr(out), current_stream()),
               op);
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

  const DeviceGuard guard(grad_out);
  // Gradients take u's normalised layout (grad_out's when u is not passed), as the fake impl does.
  const Layout layout = choose_layout(need_k ? *u : grad_out);
  const Tensor g_n = normalise(grad_out, layout);
  const at::ScalarType acc = acc_type(grad_out.scalar_type());
  // Placeholders for gradients not asked for: distinct (non-aliasing) empty tensors.
  auto grad_like = [&](bool needed) {
    return needed ? at::empty_like(g_n) : at::empty({0}, grad_out.options());
  };
  Tensor grad_u = grad_like(need_u), grad_up = grad_like(need_u_prev), grad_f = grad_like(need_f);
  // grad_k is reduced in the compute type, to k's shape, in the kernel; copied only when k's
  // dtype differs.
  const bool write_direct = need_k && k.scalar_type() == acc && k.is_contiguous();
  Tensor grad_k = need_k ? at::empty_like(k, at::MemoryFormat::Contiguous)
                         : at::empty({0}, k.options());
  if (grad_out.numel() == 0 || !(need_u || need_u_prev || need_f || need_k)) {
    if (need_k) grad_k.zero_();  // an empty sum
    return {grad_u, grad_up, grad_f, grad_k};
  }

  const Tensor u_n = need_k ? normalise(*u, layout) : Tensor();
  const Tensor up_n = need_k ? normalise(*u_prev, layout) : Tensor();
  const Tensor out_n = relu ? normalise(*out, layout) : Tensor();
  const Tensor shortcut_n = has_shortcut ? normalise(*grad_shortcut, layout) : Tensor();
  const Tensor k_acc = k.reshape({-1}).to(acc).contiguous();
  const Tensor s_acc = scale.has_value() && need_f ? scale->to(acc).contiguous() : Tensor();
  Tensor grad_k_acc = !need_k        ? Tensor()
                      : write_direct ? grad_k
                                     : at::empty({k.numel()}, k.options().dtype(acc));
  const lmfused::DType dtype = to_dtype(grad_out.scalar_type());
  const lmfused::LMStepShape shape{N, C, S, layout.channels_last_view};
  std::vector<Tensor> keep;
  const lmfused::ReductionScratch scratch =
      need_k ? reduction_scratch(lmfused::lm_step_backward_scratch(dtype, shape), grad_out, keep)
             : lmfused::ReductionScratch{};
  check_launch(lmfused::launch_lm_step_backward(
                   dtype, shape, ptr(g_n), ptr(shortcut_n), ptr(u_n), ptr(up_n), ptr(out_n),
                   ptr(k_acc), k_acc.numel(), ptr(s_acc), relu, need_u ? ptr(grad_u) : nullptr,
                   need_u_prev ? ptr(grad_up) : nullptr, need_f ? ptr(grad_f) : nullptr,
                   ptr(grad_k_acc), scratch, current_stream()),
               op);
  if (need_k && !write_direct) grad_k.copy_(grad_k_acc.view(k.sizes()));
  return {grad_u, grad_up, grad_f, grad_k};
}

}  // namespace binding
}  // namespace lmfused

namespace {

#define LMF_STR2(...) #__VA_ARGS__
#define LMF_STR(...) LMF_STR2(__VA_ARGS__)

std::string cuda_version_string(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace

TORCH_LIBRARY_IMPL(lmfused, CUDA, m) {
  using namespace lmfused::binding;  // NOLINT
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
  m.def("launch_plan", &lmfused::binding::launch_plan, pybind11::arg("op"),
        pybind11::arg("shape"), pybind11::arg("dtype"), pybind11::arg("channels_last"),
        pybind11::arg("flags") = std::map<std::string, bool>{},
        "The launches (kernels with their template arguments, memsets, computing aten ops) that "
        "the CUDA op `op` makes for the given activation shape, dtype, layout and flags, recorded "
        "by running the binding's own host code on meta tensors with the launchers recording "
        "instead of launching: no CUDA call, no GPU needed.");
}
