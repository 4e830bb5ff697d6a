// The batch-norm-fused LM step's torch binding (DESIGN.md 1b): validates and normalises tensors,
// then calls the torch-free launchers of batch_norm_lm_step.h. Registers CUDA kernels for the
// ops whose schemas the Python package defines (lmfused/batch_norm_step.py):
//   lmfused::batch_norm_stats_cuda(Tensor x) -> (Tensor mean, Tensor var)
//   lmfused::batch_norm_lm_step_cuda(Tensor x, Tensor mean, Tensor invstd, Tensor? weight,
//       Tensor? bias, Tensor? u, Tensor? u_prev, Tensor k, Tensor? scale, Tensor? seed,
//       bool training, bool relu, float noise_std) -> Tensor
//   lmfused::batch_norm_lm_step_cuda_backward_reduce(Tensor grad_out, Tensor x, Tensor mean,
//       Tensor invstd, Tensor? weight, Tensor? bias, Tensor? u, Tensor? u_prev, Tensor k,
//       Tensor? out, Tensor? scale, bool relu, bool need_k) -> (Tensor, Tensor, Tensor)
//   lmfused::batch_norm_lm_step_cuda_backward(Tensor grad_out, Tensor? grad_shortcut, Tensor x,
//       Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor mean_dy,
//       Tensor mean_dy_xhat, Tensor? out, Tensor k, Tensor? scale, bool training, bool relu,
//       bool need_x, bool need_u, bool need_u_prev) -> (Tensor, Tensor, Tensor)
// Per-channel operands (and k, scale) may be any float dtype: the kernels read them in the
// compute type (float32, float64 for float64 activations). Nothing here syncs with the host.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "batch_norm_lm_step.h"
#include "torch_binding.h"

namespace {

using at::Tensor;
using namespace lmfused::binding;  // NOLINT: the shared checks and layout helpers

// A (C,) per-channel operand in the compute type, contiguous; undefined when absent.
Tensor channel_vector(const std::optional<Tensor>& t, const char* op, const char* name,
                      int64_t C, at::ScalarType acc, const Tensor& ref) {
  if (!t.has_value()) return Tensor();
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name,
                   " must be a floating tensor, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape (C,) = (",
                    C, ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
                    ", got ", t->device());
  return t->to(acc).contiguous();
}

const void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

lmfused::LMStepShape shape_of(const Tensor& t, const Layout& layout) {
  return {t.size(0), t.size(1), spatial_numel(t), layout.channels_last_view};
}

// The reductions' scratch memory, in compute-type elements.
Tensor workspace_for(lmfused::DType dtype, const lmfused::LMStepShape& shape, const Tensor& ref,
                     at::ScalarType acc, size_t& bytes) {
  bytes = lmfused::batch_norm_workspace_bytes(dtype, shape);
  const int64_t elems = static_cast<int64_t>(bytes) / (acc == at::kDouble ? 8 : 4);
  return at::empty({elems > 0 ? elems : 1}, ref.options().dtype(acc));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& x) {
  constexpr const char* op = "lmfused::batch_norm_stats_cuda";
  check_activation(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = choose_layout(x);
  const Tensor x_n = normalise(x, layout);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t C = x.size(1);
  Tensor mean = at::empty({C}, x.options().dtype(acc));
  Tensor var = at::empty({C}, x.options().dtype(acc));
  const lmfused::DType dtype = to_dtype(x.scalar_type());
  const lmfused::LMStepShape shape = shape_of(x, layout);
  size_t ws_bytes = 0;
  const Tensor workspace = workspace_for(dtype, shape, x, acc, ws_bytes);
  check_launch(lmfused::launch_batch_norm_stats(dtype, shape, ptr(x_n), mean.data_ptr(),
                                                var.data_ptr(), workspace.data_ptr(), ws_bytes,
                                                stream()),
               op);
  return {mean, var};
}

Tensor batch_norm_lm_step_cuda(const Tensor& x, const Tensor& mean, const Tensor& invstd,
                               const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, const std::optional<Tensor>& u,
                               const std::optional<Tensor>& u_prev, const Tensor& k,
                               const std::optional<Tensor>& scale,
                               const std::optional<Tensor>& seed, bool training, bool relu,
                               double noise_std) {
  (void)training;  // mean and invstd are the statistics to use, batch or running
  constexpr const char* op = "lmfused::batch_norm_lm_step_cuda";
  check_activation(x, op, "x");
  TORCH_CHECK_VALUE(u.has_value() == u_prev.has_value(), op,
                    ": u and u_prev must both be given (the LM update) or both be None (no-state "
                    "mode)");
  const bool state = u.has_value();
  if (state) {
    check_like(*u, op, "u", x, "x");
    check_like(*u_prev, op, "u_prev", x, "x");
  }
  const int64_t N = x.size(0), C = x.size(1);
  check_k(k, op, C, x);
  check_scale(scale, op, N, x);
  const bool has_noise = noise_std != 0.0;
  if (has_noise) check_seed(seed, op, x);

  const c10::cuda::CUDAGuard guard(x.device());
  // The output takes u's layout (x's in the no-state mode), as the fake implementation does.
  const Layout layout = choose_layout(state ? *u : x);
  const Tensor ref_n = normalise(state ? *u : x, layout);
  Tensor out = at::empty_like(ref_n);  // dense: empty_like keeps its exact strides
  if (x.numel() == 0) return out;
  const Tensor x_n = normalise(x, layout);
  const Tensor u_n = state ? normalise(*u, layout) : Tensor();
  const Tensor up_n = state ? normalise(*u_prev, layout) : Tensor();
  const at::ScalarType acc = acc_type(x.scalar_type());
  const Tensor mean_a = channel_vector(mean, op, "mean", C, acc, x);
  const Tensor invstd_a = channel_vector(invstd, op, "invstd", C, acc, x);
  const Tensor weight_a = channel_vector(weight, op, "weight", C, acc, x);
  const Tensor bias_a = channel_vector(bias, op, "bias", C, acc, x);
  const Tensor k_acc = k.reshape({-1}).to(acc).contiguous();
  const Tensor s_acc = scale.has_value() ? scale->to(acc).contiguous() : Tensor();
  const Tensor seed_c = has_noise ? seed->contiguous() : Tensor();
  check_launch(lmfused::launch_batch_norm_lm_step_forward(
                   to_dtype(x.scalar_type()), shape_of(x, layout), x_n.data_ptr(), ptr(mean_a),
                   ptr(invstd_a), ptr(weight_a), ptr(bias_a), ptr(u_n), ptr(up_n), ptr(k_acc),
                   k_acc.numel(), ptr(s_acc),
                   has_noise ? seed_c.data_ptr<int64_t>() : nullptr, noise_std, relu,
                   out.data_ptr(), stream()),
               op);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_lm_step_cuda_backward_reduce(
    const Tensor& grad_out, const Tensor& x, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& u, const std::optional<Tensor>& u_prev, const Tensor& k,
    const std::optional<Tensor>& out, const std::optional<Tensor>& scale, bool relu,
    bool need_k) {
  constexpr const char* op = "lmfused::batch_norm_lm_step_cuda_backward_reduce";
  check_activation(grad_out, op, "grad_out");
  check_like(x, op, "x", grad_out, "grad_out");
  if (need_k) {
    TORCH_CHECK_VALUE(u.has_value() && u_prev.has_value(), op,
                      ": u and u_prev are required when need_k");
  }
  const bool mask_from_out = relu && out.has_value();
  // Without out, relu recomputes the forward's pre-activation for the mask: with state when u and
  // u_prev are given (then k is read too), else s * BN(x).
  const bool recompute_state = relu && !out.has_value() && u.has_value();
  if (relu && !out.has_value()) {
    TORCH_CHECK_VALUE(u.has_value() == u_prev.has_value(), op,
                      ": u and u_prev must both be given or both be None when relu and out is "
                      "None (the recomputed ReLU mask)");
  }
  const bool read_state = need_k || recompute_state;
  if (read_state) {
    check_like(*u, op, "u", grad_out, "grad_out");
    check_like(*u_prev, op, "u_prev", grad_out, "grad_out");
  }
  if (mask_from_out) check_like(*out, op, "out", grad_out, "grad_out");
  const int64_t N = x.size(0), C = x.size(1);
  if (recompute_state) check_k(k, op, C, x);  // k is read only by the mask with state
  check_scale(scale, op, N, x);

  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = choose_layout(x);
  const at::ScalarType acc = acc_type(grad_out.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  Tensor sum_dy = at::empty({C}, acc_options), sum_dy_xhat = at::empty({C}, acc_options);
  Tensor grad_k = at::empty({need_k ? C : 0}, acc_options);
  const Tensor g_n = normalise(grad_out, layout), x_n = normalise(x, layout);
  const Tensor u_n = read_state ? normalise(*u, layout) : Tensor();
  const Tensor up_n = read_state ? normalise(*u_prev, layout) : Tensor();
  const Tensor out_n = mask_from_out ? normalise(*out, layout) : Tensor();
  const Tensor mean_a = channel_vector(mean, op, "mean", C, acc, x);
  const Tensor invstd_a = channel_vector(invstd, op, "invstd", C, acc, x);
  const Tensor weight_a = channel_vector(weight, op, "weight", C, acc, x);
  const Tensor bias_a = channel_vector(bias, op, "bias", C, acc, x);
  const Tensor k_acc = recompute_state ? k.reshape({-1}).to(acc).contiguous() : Tensor();
  const Tensor s_acc = scale.has_value() ? scale->to(acc).contiguous() : Tensor();
  const lmfused::DType dtype = to_dtype(grad_out.scalar_type());
  const lmfused::LMStepShape shape = shape_of(x, layout);
  size_t ws_bytes = 0;
  const Tensor workspace = workspace_for(dtype, shape, x, acc, ws_bytes);
  check_launch(lmfused::launch_batch_norm_lm_step_backward_reduce(
                   dtype, shape, ptr(g_n), ptr(x_n), ptr(mean_a), ptr(invstd_a), ptr(weight_a),
                   ptr(bias_a), ptr(u_n), ptr(up_n), ptr(k_acc),
                   k_acc.defined() ? k_acc.numel() : 1, ptr(out_n), ptr(s_acc), relu,
                   sum_dy.data_ptr(), sum_dy_xhat.data_ptr(), need_k ? grad_k.data_ptr() : nullptr,
                   workspace.data_ptr(), ws_bytes, stream()),
               op);
  return {sum_dy, sum_dy_xhat, grad_k};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_lm_step_cuda_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_shortcut, const Tensor& x,
    const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const Tensor& mean_dy, const Tensor& mean_dy_xhat,
    const std::optional<Tensor>& out, const Tensor& k, const std::optional<Tensor>& scale,
    bool training, bool relu, bool need_x, bool need_u, bool need_u_prev) {
  constexpr const char* op = "lmfused::batch_norm_lm_step_cuda_backward";
  check_activation(grad_out, op, "grad_out");
  check_like(x, op, "x", grad_out, "grad_out");
  const bool has_shortcut = need_u && grad_shortcut.has_value();  // ignored without grad_u
  if (has_shortcut) check_like(*grad_shortcut, op, "grad_shortcut", grad_out, "grad_out");
  const bool mask_from_out = relu && out.has_value();
  if (mask_from_out) check_like(*out, op, "out", grad_out, "grad_out");
  TORCH_CHECK_VALUE(!relu || mask_from_out || !(need_u || need_u_prev), op,
                    ": out is required when relu and need_u or need_u_prev (the recomputed ReLU "
                    "mask is the no-state mode's, which has no u or u_prev)");
  const int64_t N = x.size(0), C = x.size(1);
  check_k(k, op, C, x);
  check_scale(scale, op, N, x);

  const c10::cuda::CUDAGuard guard(x.device());
  const Layout layout = choose_layout(x);  // the gradients take x's layout (the fake's too)
  const Tensor x_n = normalise(x, layout);
  auto grad_like = [&](bool needed) {  // unneeded: distinct (non-aliasing) empty tensors
    return needed ? at::empty_like(x_n, grad_out.options()) : at::empty({0}, grad_out.options());
  };
  Tensor grad_x = grad_like(need_x), grad_u = grad_like(need_u), grad_up = grad_like(need_u_prev);
  if (grad_out.numel() == 0 || !(need_x || need_u || need_u_prev)) {
    return {grad_x, grad_u, grad_up};
  }
  const at::ScalarType acc = acc_type(grad_out.scalar_type());
  const Tensor g_n = normalise(grad_out, layout);
  const Tensor sc_n = has_shortcut ? normalise(*grad_shortcut, layout) : Tensor();
  const Tensor out_n = mask_from_out ? normalise(*out, layout) : Tensor();
  const Tensor mean_a = channel_vector(mean, op, "mean", C, acc, x);
  const Tensor invstd_a = channel_vector(invstd, op, "invstd", C, acc, x);
  const Tensor weight_a = channel_vector(weight, op, "weight", C, acc, x);
  const Tensor bias_a = channel_vector(bias, op, "bias", C, acc, x);
  const Tensor mdy_a = channel_vector(mean_dy, op, "mean_dy", C, acc, x);
  const Tensor mdyx_a = channel_vector(mean_dy_xhat, op, "mean_dy_xhat", C, acc, x);
  const Tensor k_acc = k.reshape({-1}).to(acc).contiguous();
  const Tensor s_acc = scale.has_value() ? scale->to(acc).contiguous() : Tensor();
  check_launch(lmfused::launch_batch_norm_lm_step_backward(
                   to_dtype(grad_out.scalar_type()), shape_of(x, layout), ptr(g_n), ptr(sc_n),
                   ptr(x_n), ptr(mean_a), ptr(invstd_a), ptr(weight_a), ptr(bias_a), ptr(mdy_a),
                   ptr(mdyx_a), ptr(out_n), ptr(k_acc), k_acc.numel(), ptr(s_acc), training,
                   relu, need_x ? grad_x.data_ptr() : nullptr,
                   need_u ? grad_u.data_ptr() : nullptr, need_u_prev ? grad_up.data_ptr() : nullptr,
                   stream()),
               op);
  return {grad_x, grad_u, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(lmfused, CUDA, m) {
  m.impl("batch_norm_stats_cuda", TORCH_FN(batch_norm_stats_cuda));
  m.impl("batch_norm_lm_step_cuda", TORCH_FN(batch_norm_lm_step_cuda));
  m.impl("batch_norm_lm_step_cuda_backward_reduce",
         TORCH_FN(batch_norm_lm_step_cuda_backward_reduce));
  m.impl("batch_norm_lm_step_cuda_backward", TORCH_FN(batch_norm_lm_step_cuda_backward));
}
