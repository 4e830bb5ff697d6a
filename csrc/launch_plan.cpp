// lmfused._C.launch_plan: what one CUDA op launches for a configuration, counted without a GPU.
// It runs the binding's own host code (the registered op's function: checks, layout normalisation,
// casts, scratch, the launchers' dispatch down to the kernel template) on meta tensors, while the
// launchers record instead of launching (lm_step.h, set_launch_log: no CUDA call at all) and an
// aten RecordFunction observer records every computing aten op the binding calls. So the count is
// of the code that launches, not of a hand-kept copy of its logic.
//
//   launch_plan(op, shape, dtype, channels_last, flags) -> [launch, ...]
// op: lm_step, lm_step_backward, batch_norm_stats, batch_norm_lm_step,
//     batch_norm_lm_step_backward_reduce, batch_norm_lm_step_backward.
// shape: the activation shape (N, C, *spatial); dtype: float16 | bfloat16 | float32 | float64.
// flags (missing: false): training, relu, has_state, has_weight, has_bias, has_scale, noise,
//     per_channel_k, has_shortcut, has_handoff (the batch-norm backward passes' grad_handoff),
//     write_mask, has_mask, has_running_stats, need_x, need_u, need_u_prev, need_f, need_k, and
//     has_f (lm_step's f; without it the two-term update).
// Operands are in the models' layout: dense activations in one layout, 256-byte aligned,
// per-channel vectors, running statistics, k and scale in the compute type.
// Returns one entry per launch, in order: a kernel's name with its template arguments,
// "cudaMemsetAsync", or "aten::<op>" for a computing aten op (allocations and views are not
// launches). A reduction's ticket counters are zeroed once per stream, not per call: not counted.
#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "torch_binding.h"

namespace lmfused {
namespace binding {
namespace {

// aten ops that allocate, view or only dispatch to other ops (which are recorded themselves).
bool computes(const char* name) {
  static const std::set<std::string> kNot = {
      "aten::empty", "aten::empty.memory_format", "aten::empty_strided", "aten::empty_like",
      "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::permute", "aten::as_strided",
      "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::alias",
      "aten::detach", "aten::expand", "aten::select", "aten::slice", "aten::squeeze",
      "aten::unsqueeze", "aten::t", "aten::transpose", "aten::lift_fresh", "aten::resize_",
      "aten::zeros", "aten::zeros_like", "aten::full", "aten::ones", "aten::new_empty",
      "aten::new_empty_strided", "aten::empty_permuted", "aten::movedim", "aten::_unsafe_view",
      "aten::set_", "aten::view_as", "aten::expand_as", "aten::narrow"};
  return kNot.count(name) == 0;
}

thread_local std::vector<std::string>* g_recording = nullptr;

// Records the aten ops, and the launchers' launches, of one call on this thread.
class Recorder {
 public:
  explicit Recorder(std::vector<std::string>* log) {
    g_recording = log;
    lmfused::set_launch_log(log);
    handle_ = at::addThreadLocalCallback(
        at::RecordFunctionCallback(
            [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
              if (g_recording != nullptr && computes(fn.name())) g_recording->push_back(fn.name());
              return nullptr;
            })
            .scopes({at::RecordScope::FUNCTION}));
  }
  ~Recorder() {
    at::removeCallback(handle_);
    lmfused::set_launch_log(nullptr);
    g_recording = nullptr;
  }
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

 private:
  at::CallbackHandle handle_;
};

const std::set<std::string> kFlags = {
    "training", "relu", "has_state", "has_weight", "has_bias", "has_scale", "noise",
    "per_channel_k", "has_shortcut", "has_handoff", "write_mask", "has_mask",
    "has_running_stats", "need_x", "need_u", "need_u_prev", "need_f", "need_k", "has_f"};

at::ScalarType parse_dtype(const std::string& d) {
  if (d == "float32") return at::kFloat;
  if (d == "float16") return at::kHalf;
  if (d == "bfloat16") return at::kBFloat16;
  if (d == "float64") return at::kDouble;
  TORCH_CHECK_VALUE(false, "launch_plan: dtype must be float16, bfloat16, float32 or float64, got ",
                    d);
}

}  // namespace

std::vector<std::string> launch_plan(const std::string& op, const std::vector<int64_t>& shape,
                                     const std::string& dtype, bool channels_last,
                                     const std::map<std::string, bool>& flags) {
  TORCH_CHECK_VALUE(shape.size() >= 2, "launch_plan: shape must be (N, C, *spatial), got rank ",
                    shape.size());
  for (const auto& kv : flags) {
    TORCH_CHECK_VALUE(kFlags.count(kv.first) == 1, "launch_plan: unknown flag ", kv.first);
  }
  auto flag = [&](const char* name) {
    const auto it = flags.find(name);
    return it != flags.end() && it->second;
  };
  const at::ScalarType dt = parse_dtype(dtype);
  const at::ScalarType acc = acc_type(dt);
  const auto meta = at::TensorOptions().device(at::kMeta);
  const int64_t N = shape[0], C = shape[1];
  auto act = [&] {  // an activation in the requested layout
    if (!channels_last || shape.size() == 2) return at::empty(shape, meta.dtype(dt));
    std::vector<int64_t> last{N};
    last.insert(last.end(), shape.begin() + 2, shape.end());
    last.push_back(C);
    return to_channels_last(at::empty(last, meta.dtype(dt))  // (N, *spatial, C) dense
                                .movedim(-1, 1));
  };
  auto vec = [&](int64_t n) { return at::empty({n}, meta.dtype(acc)); };
  auto opt = [&](bool present, const std::function<Tensor()>& make) {
    return present ? std::optional<Tensor>(make()) : std::nullopt;
  };
  const Tensor x = act();
  const Tensor k = vec(flag("per_channel_k") ? C : 1);
  const auto weight = opt(flag("has_weight"), [&] { return vec(C); });
  const auto bias = opt(flag("has_bias"), [&] { return vec(C); });
  const auto scale = opt(flag("has_scale"), [&] { return vec(N); });
  const auto seed = opt(flag("noise"), [&] { return at::empty({1}, meta.dtype(at::kLong)); });
  const double noise_std = flag("noise") ? 0.1 : 0.0;
  auto mask = [&] {  // the 1-bit mask of x's 2-D view (lmfused._layout.plan_layout)
    const int64_t S = spatial_numel(x);
    const bool view_cl = shape.size() == 2 || S == 1 || channels_last;
    const int64_t rows = view_cl ? N * S : N * C, length = view_cl ? C : S;
    return at::empty({rows, (length + 7) / 8}, meta.dtype(at::kByte));
  };

  // Every operand first: only the op's own work is recorded.
  const bool state = flag("has_state"), need_k = flag("need_k"), running = flag("has_running_stats");
  const Tensor grad_out = act(), u = act(), u_prev = act(), sum_dy = vec(C),
               sum_dy_xhat = vec(C), mean = vec(C), invstd = vec(C);
  const auto f = opt(flag("has_f"), act);
  const auto shortcut = opt(flag("has_shortcut"), act);
  const auto handoff = opt(flag("has_handoff"), act);
  const auto out = opt(flag("relu"), act);
  const auto mask_t = opt(flag("has_mask"), mask);
  const auto running_mean = opt(running, [&] { return vec(C); });
  const auto running_var = opt(running, [&] { return vec(C); });
  const auto u_opt = opt(op == "batch_norm_lm_step" ? state : need_k, [&] { return u; });
  const auto up_opt = opt(op == "batch_norm_lm_step" ? state : need_k, [&] { return u_prev; });

  std::vector<std::string> log;
  const Recorder recorder(&log);
  if (op == "lm_step") {
    lm_step_cuda(u, u_prev, f, k, scale, seed, flag("relu"), noise_std);
  } else if (op == "lm_step_backward") {
    lm_step_cuda_backward(grad_out, shortcut, u_opt, up_opt, out, k, scale, flag("relu"),
                          flag("need_u"), flag("need_u_prev"), flag("need_f"), need_k);
  } else if (op == "batch_norm_stats") {
    batch_norm_stats_cuda(x, running_mean, running_var, flag("training"), 0.1, 1e-5);
  } else if (op == "batch_norm_lm_step") {
    batch_norm_lm_step_cuda(x, mean, invstd, weight, bias, u_opt, up_opt, k, scale, seed,
                            flag("training"), flag("relu"), noise_std, flag("write_mask"));
  } else if (op == "batch_norm_lm_step_backward_reduce") {
    batch_norm_lm_step_cuda_backward_reduce(grad_out, handoff, x, mean, invstd, weight, bias, u_opt,
                                            up_opt, k, mask_t, scale, flag("relu"), need_k);
  } else if (op == "batch_norm_lm_step_backward") {
    batch_norm_lm_step_cuda_backward(grad_out, handoff, shortcut, x, mean, invstd, weight, bias,
                                     sum_dy, sum_dy_xhat, mask_t, k, scale, flag("training"),
                                     flag("relu"), flag("need_x"), flag("need_u"),
                                     flag("need_u_prev"));
  } else {
    TORCH_CHECK_VALUE(false, "launch_plan: unknown op ", op,
                      " (lm_step, lm_step_backward, batch_norm_stats, batch_norm_lm_step, "
                      "batch_norm_lm_step_backward_reduce, batch_norm_lm_step_backward)");
  }
  return log;
}

}  // namespace binding
}  // namespace lmfused
