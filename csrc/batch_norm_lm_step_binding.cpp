// The batch-norm-fused LM step's torch binding (DESIGN.md 1b): validates and normalises tensors,
// then calls the torch-free launchers of batch_norm_lm_step.h. Registers CUDA kernels for the
// ops whose schemas the Python package defines (lmfused/batch_norm_step.py):
//   lmfused::batch_norm_stats_cuda(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var,
//       bool training, float momentum, float eps) -> (Tensor mean, Tensor invstd)
//   lmfused::batch_norm_lm_step_cuda(Tensor x, Tensor mean, Tensor invstd, Tensor? weight,
//       Tensor? bias, Tensor? u, Tensor? u_prev, Tensor k, Tensor? scale, Tensor? seed,
//       bool training, bool relu, float noise_std, bool write_mask) -> (Tensor out, Tensor mask)
//   lmfused::batch_norm_lm_step_cuda_backward_reduce(Tensor grad_out, Tensor? grad_handoff,
//       Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? u,
//       Tensor? u_prev, Tensor k, Tensor? mask, Tensor? scale, bool relu, bool need_k)
//       -> (Tensor, Tensor, Tensor)
//   lmfused::batch_norm_lm_step_cuda_backward(Tensor grad_out, Tensor? grad_handoff,
//       Tensor? grad_shortcut, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias,
//       Tensor sum_dy, Tensor sum_dy_xhat, Tensor? mask, Tensor k, Tensor? scale, bool training,
//       bool relu, bool need_x, bool need_u, bool need_u_prev) -> (Tensor, Tensor, Tensor)
// The output's gradient is grad_out + grad_handoff (the gradient of the output's handoff to the
// next step, lmfused/handoff.py; None: grad_out alone), added in the kernels as they read both.
// One kernel launch each (a small per-channel one for evaluation statistics), and no other
// computing op for model-layout operands (dense activations in one layout, per-channel vectors,
// k and scale in the compute type). Per-channel operands (and k, scale) of another float dtype
// are cast to the compute type (float32, float64 for float64 activations); running statistics
// of any float dtype are read and updated in place by the statistics kernel. The 1-bit mask is
// over the activations' 2-D view (lm_step.h), as lmfused._layout.plan_layout gives it: the
// forward's of u (x without state), the backward passes' of x, which is the same in every call
// the Python glue makes (x and u share their layout). Nothing here syncs with the host.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "batch_norm_lm_step.h"
#include "torch_binding.h"

namespace lmfused {
namespace binding {
namespace {

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

lmfused::LMStepShape shape_of(const Tensor& t, const Layout& layout) {
  return {t.size(0), t.size(1), spatial_numel(t), layout.channels_last_view};
}

// The 1-bit mask's shape over t's 2-D view: (rows, ceil(row length / 8)).
std::vector<int64_t> mask_shape(const Tensor& t, const Layout& layout) {
  const int64_t S = spatial_numel(t);
  const int64_t rows = layout.channels_last_view ? t.size(0) * S : t.size(0) * t.size(1);
  const int64_t row_length = layout.channels_last_view ? t.size(1) : S;
  return {rows, (row_length + 7) / 8};
}

// The mask a backward pass reads: uint8 of x's 2-D view, contiguous (or undefined).
Tensor mask_operand(const std::optional<Tensor>& mask, bool relu, const char* op, const Tensor& x,
                    const Layout& layout) {
  if (!relu || !mask.has_value()) return Tensor();
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kByte, op, ": mask must be uint8, got ",
                   mask->scalar_type());
  const std::vector<int64_t> want = mask_shape(x, layout);
  TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef(want), op,
                    ": mask must have the shape of x's 2-D view ", at::IntArrayRef(want), ", got ",
                    mask->sizes());
  TORCH_CHECK_VALUE(mask->device() == x.device(), op, ": mask must be on ", x.device(), ", got ",
                    mask->device());
  return mask->contiguous();
}

lmfused::DType running_dtype(const std::optional<Tensor>& t) {
  return t.has_value() ? to_dtype(t->scalar_type()) : lmfused::DType::kFloat32;
}

}  // namespace

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& x,
                                                 const std::optional<Tensor>& running_mean,
                                                 const std::optional<Tensor>& running_var,
                                                 bool training, double momentum, double eps) {
  constexpr const char* op = "lmfused::batch_norm_stats_cuda";
  check_activation(x, op, "x");
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(), op,
                    ": running_mean and running_var must both be given or both be None");
  TORCH_CHECK_VALUE(training || running_mean.has_value(), op,
                    ": running_mean and running_var are required in evaluation");
  for (const auto* r : {&running_mean, &running_var}) {
    if (!r->has_value()) continue;
    const char* name = r == &running_mean ? "running_mean" : "running_var";
    TORCH_CHECK_TYPE(is_supported_float((*r)->scalar_type()), op, ": ", name,
                     " must be a float tensor, got ", (*r)->scalar_type());
    TORCH_CHECK_VALUE((*r)->dim() == 1 && (*r)->size(0) == C && (*r)->is_contiguous(), op, ": ",
                      name, " must be a contiguous (C,) = (", C, ",) tensor, got ", (*r)->sizes());
    TORCH_CHECK_VALUE((*r)->device() == x.device(), op, ": ", name, " must be on ", x.device(),
                      ", got ", (*r)->device());
  }
  if (running_mean.has_value()) {
    TORCH_CHECK_TYPE(running_mean->scalar_type() == running_var->scalar_type(), op,
                     ": running_mean and running_var must have one dtype, got ",
                     running_mean->scalar_type(), " and ", running_var->scalar_type());
  }
  const DeviceGuard guard(x);
  const Layout layout = choose_layout(x);
  const Tensor x_n = training && x.numel() > 0 ? normalise(x, layout) : Tensor();
  const at::ScalarType acc = acc_type(x.scalar_type());
  Tensor mean = at::empty({C}, x.options().dtype(acc));
  Tensor invstd = at::empty({C}, x.options().dtype(acc));
  const lmfused::DType dtype = to_dtype(x.scalar_type());
  const lmfused::LMStepShape shape = shape_of(x, layout);
  std::vector<Tensor> keep;
  const lmfused::ReductionScratch scratch =
      training ? reduction_scratch(lmfused::batch_norm_scratch(dtype, shape), x, keep)
               : lmfused::ReductionScratch{};
  auto opt_ptr = [](const std::optional<Tensor>& t) { return t.has_value() ? ptr(*t) : nullptr; };
  check_launch(lmfused::launch_batch_norm_stats(
                   dtype, shape, ptr(x_n), training, momentum, eps, opt_ptr(running_mean),
                   opt_ptr(running_var), running_dtype(running_mean), ptr(mean), ptr(invstd),
                   scratch, current_stream()),
               op);
  return {mean, invstd};
}

std::tuple<Tensor, Tensor> batch_norm_lm_step_cuda(
    const Tensor& x, const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& u,
    const std::optional<Tensor>& u_prev, const Tensor& k, const std::optional<Tensor>& scale,
    const std::optional<Tensor>& seed, bool training, bool relu, double noise_std,
    bool write_mask) {
  constexpr const char* op = "lmfused::batch_norm_lm_step_cuda";
  (void)training;  // for the autograd formula only: mean and invstd are the statistics to use
  check_activation(x, op, "x");
  TORCH_CHECK_VALUE(u.has_value() == u_prev.has_value(), op,
                    ": u and u_prev must both be given (the LM update) or both be None (no-state "
                    "mode)");
  const bool state = u.has_value();
  TORCH_CHECK_VALUE(!write_mask || (relu && state), op,
                    ": write_mask needs relu and the state (u, u_prev)");
  if (state) {
    check_like(*u, op, "u", x, "x");
    check_like(*u_prev, op, "u_prev", x, "x");
  }
  const int64_t N = x.size(0), C = x.size(1);
  check_k(k, op, C, x);
  check_scale(scale, op, N, x);
  const bool has_noise = noise_std != 0.0;
  if (has_noise) check_seed(seed, op, x);

  const DeviceGuard guard(x);
  // The output and the mask take u's layout (x's in the no-state mode), as the fake does.
  const Tensor& like = state ? *u : x;
  const Layout layout = choose_layout(like);
  const Tensor ref_n = normalise(like, layout);
  Tensor out = at::empty_like(ref_n);  // dense: empty_like keeps its exact strides
  Tensor mask = write_mask ? at::empty(mask_shape(like, layout), x.options().dtype(at::kByte))
                           : at::empty({0}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return {out, mask};
  const Tensor x_n = normalise(x, layout);
  const Tensor u_n = state ? ref_n : Tensor();
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
                   to_dtype(x.scalar_type()), shape_of(x, layout), ptr(x_n), ptr(mean_a),
                   ptr(invstd_a), ptr(weight_a), ptr(bias_a), ptr(u_n), ptr(up_n), ptr(k_acc),
                   k_acc.numel(), ptr(s_acc), static_cast<const int64_t*>(ptr(seed_c)),
                   noise_std, relu, ptr(out), write_mask ? ptr(mask) : nullptr,
                   current_stream()),
               op);
  return {out, mask};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_lm_step_cuda_backward_reduce(
    const Tensor& grad_out, const std::optional<Tensor>& grad_handoff, const Tensor& x,
    const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& u,
    const std::optional<Tensor>& u_prev, const Tensor& k, const std::optional<Tensor>& mask,
    const std::optional<Tensor>& scale, bool relu, bool need_k) {
  constexpr const char* op = "lmfused::batch_norm_lm_step_cuda_backward_reduce";
  check_activation(grad_out, op, "grad_out");
  if (grad_handoff.has_value()) check_like(*grad_handoff, op, "grad_handoff", grad_out, "grad_out");
  check_like(x, op, "x", grad_out, "grad_out");
  if (need_k) {
    TORCH_CHECK_VALUE(u.has_value() && u_prev.has_value(), op,
                      ": u and u_prev are required when need_k");
    check_like(*u, op, "u", grad_out, "grad_out");
    check_like(*u_prev, op, "u_prev", grad_out, "grad_out");
    TORCH_CHECK_VALUE(!relu || mask.has_value(), op,
                      ": mask is required with relu and need_k (the recomputed ReLU mask is the "
                      "no-state mode's)");
  }
  const int64_t N = x.size(0), C = x.size(1);
  if (need_k) check_k(k, op, C, x);
  check_scale(scale, op, N, x);

  const DeviceGuard guard(x);
  const Layout layout = choose_layout(x);
  const Tensor mask_c = mask_operand(mask, relu, op, x, layout);
  const at::ScalarType acc = acc_type(grad_out.scalar_type());
  const auto acc_options = x.options().dtype(acc);
  Tensor sum_dy = at::empty({C}, acc_options), sum_dy_xhat = at::empty({C}, acc_options);
  const int64_t k_numel = k.numel();
  Tensor grad_k = at::empty({need_k ? k_numel : 0}, acc_options);
  const Tensor g_n = normalise(grad_out, layout), x_n = normalise(x, layout);
  const Tensor h_n = grad_handoff.has_value() ? normalise(*grad_handoff, layout) : Tensor();
  const Tensor u_n = need_k ? normalise(*u, layout) : Tensor();
  const Tensor up_n = need_k ? normalise(*u_prev, layout) : Tensor();
  const bool recompute = relu && !mask_c.defined();  // the no-state mask reads weight and bias
  const Tensor mean_a = channel_vector(mean, op, "mean", C, acc, x);
  const Tensor invstd_a = channel_vector(invstd, op, "invstd", C, acc, x);
  const Tensor weight_a = recompute ? channel_vector(weight, op, "weight", C, acc, x) : Tensor();
  const Tensor bias_a = recompute ? channel_vector(bias, op, "bias", C, acc, x) : Tensor();
  const Tensor s_acc = scale.has_value() ? scale->to(acc).contiguous() : Tensor();
  const lmfused::DType dtype = to_dtype(grad_out.scalar_type());
  const lmfused::LMStepShape shape = shape_of(x, layout);
  std::vector<Tensor> keep;
  const lmfused::ReductionScratch scratch =
      reduction_scratch(lmfused::batch_norm_scratch(dtype, shape), x, keep);
  check_launch(lmfused::launch_batch_norm_lm_step_backward_reduce(
                   dtype, shape, ptr(g_n), ptr(h_n), ptr(x_n), ptr(mean_a), ptr(invstd_a),
                   ptr(weight_a), ptr(bias_a), ptr(u_n), ptr(up_n), ptr(mask_c), ptr(s_acc), relu,
                   ptr(sum_dy), ptr(sum_dy_xhat), need_k ? ptr(grad_k) : nullptr, k_numel,
                   scratch, current_stream()),
               op);
  return {sum_dy, sum_dy_xhat, grad_k};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_lm_step_cuda_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_handoff,
    const std::optional<Tensor>& grad_shortcut, const Tensor& x, const Tensor& mean,
    const Tensor& invstd, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const Tensor& sum_dy, const Tensor& sum_dy_xhat, const std::optional<Tensor>& mask,
    const Tensor& k, const std::optional<Tensor>& scale, bool training, bool relu, bool need_x,
    bool need_u, bool need_u_prev) {
  constexpr const char* op = "lmfused::batch_norm_lm_step_cuda_backward";
  check_activation(grad_out, op, "grad_out");
  if (grad_handoff.has_value()) check_like(*grad_handoff, op, "grad_handoff", grad_out, "grad_out");
  check_like(x, op, "x", grad_out, "grad_out");
  const bool has_shortcut = need_u && grad_shortcut.has_value();  // ignored without grad_u
  if (has_shortcut) check_like(*grad_shortcut, op, "grad_shortcut", grad_out, "grad_out");
  TORCH_CHECK_VALUE(!relu || mask.has_value() || !(need_u || need_u_prev), op,
                    ": mask is required when relu and need_u or need_u_prev (the recomputed ReLU "
                    "mask is the no-state mode's, which has no u or u_prev)");
  const int64_t N = x.size(0), C = x.size(1);
  check_k(k, op, C, x);
  check_scale(scale, op, N, x);

  const DeviceGuard guard(x);
  const Layout layout = choose_layout(x);  // the gradients take x's layout (the fake's too)
  const Tensor x_n = normalise(x, layout);
  auto grad_like = [&](bool needed) {  // unneeded: distinct (non-aliasing) empty tensors
    return needed ? at::empty_like(x_n, grad_out.options()) : at::empty({0}, grad_out.options());
  };
  Tensor grad_x = grad_like(need_x), grad_u = grad_like(need_u), grad_up = grad_like(need_u_prev);
  if (grad_out.numel() == 0 || !(need_x || need_u || need_u_prev)) {
    return {grad_x, grad_u, grad_up};
  }
  const Tensor mask_c = mask_operand(mask, relu, op, x, layout);
  const at::ScalarType acc = acc_type(grad_out.scalar_type());
  const Tensor g_n = normalise(grad_out, layout);
  const Tensor h_n = grad_handoff.has_value() ? normalise(*grad_handoff, layout) : Tensor();
  const Tensor sc_n = has_shortcut ? normalise(*grad_shortcut, layout) : Tensor();
  const Tensor mean_a = channel_vector(mean, op, "mean", C, acc, x);
  const Tensor invstd_a = channel_vector(invstd, op, "invstd", C, acc, x);
  const Tensor weight_a = channel_vector(weight, op, "weight", C, acc, x);
  const Tensor bias_a = relu && !mask_c.defined() ? channel_vector(bias, op, "bias", C, acc, x)
                                                  : Tensor();
  const bool sums = need_x && training;
  const Tensor sdy_a = sums ? channel_vector(sum_dy, op, "sum_dy", C, acc, x) : Tensor();
  const Tensor sdyx_a = sums ? channel_vector(sum_dy_xhat, op, "sum_dy_xhat", C, acc, x) : Tensor();
  const Tensor k_acc = k.reshape({-1}).to(acc).contiguous();
  const Tensor s_acc = scale.has_value() ? scale->to(acc).contiguous() : Tensor();
  check_launch(lmfused::launch_batch_norm_lm_step_backward(
                   to_dtype(grad_out.scalar_type()), shape_of(x, layout), ptr(g_n), ptr(h_n),
                   ptr(sc_n), ptr(x_n), ptr(mean_a), ptr(invstd_a), ptr(weight_a), ptr(bias_a),
                   ptr(sdy_a), ptr(sdyx_a), ptr(mask_c), ptr(k_acc), k_acc.numel(), ptr(s_acc),
                   training, relu, need_x ? ptr(grad_x) : nullptr,
                   need_u ? ptr(grad_u) : nullptr, need_u_prev ? ptr(grad_up) : nullptr,
                   current_stream()),
               op);
  return {grad_x, grad_u, grad_up};
}

}  // namespace binding
}  // namespace lmfused

TORCH_LIBRARY_IMPL(lmfused, CUDA, m) {
  using namespace lmfused::binding;  // NOLINT
  m.impl("batch_norm_stats_cuda", TORCH_FN(batch_norm_stats_cuda));
  m.impl("batch_norm_lm_step_cuda", TORCH_FN(batch_norm_lm_step_cuda));
  m.impl("batch_norm_lm_step_cuda_backward_reduce",
         TORCH_FN(batch_norm_lm_step_cuda_backward_reduce));
  m.impl("batch_norm_lm_step_cuda_backward", TORCH_FN(batch_norm_lm_step_cuda_backward));
}
