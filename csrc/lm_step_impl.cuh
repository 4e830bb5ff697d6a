// Typed launcher bodies: pick the vector width and the compile-time flags, then launch.
// Instantiated once per dtype in lm_step_<dtype>.cu, so the (many) kernel specialisations
// compile in parallel.
#pragma once

#include "lm_step.cuh"
#include "lm_step_dispatch.h"

namespace lmfused {
namespace detail {

template <typename T>
cudaError_t forward_typed(const LMStepShape& sh, const void* u, const void* u_prev, const void* f,
                          const void* k, int64_t k_numel, const void* scale, const int64_t* seed,
                          double noise_std, bool relu, void* out, cudaStream_t stream) {
  using A = acc_t<T>;
  ForwardArgs<T> args{};
  args.u = static_cast<const T*>(u);
  args.u_prev = static_cast<const T*>(u_prev);
  args.f = static_cast<const T*>(f);
  args.k = static_cast<const A*>(k);
  args.scale = static_cast<const A*>(scale);
  args.seed = seed;
  args.out = static_cast<T*>(out);
  args.noise_std = static_cast<A>(noise_std);
  args.k_per_channel = k_numel != 1;

  const bool has_f = f != nullptr;
  const bool has_noise = noise_std != 0.0;
  const int64_t L = sh.channels_last ? sh.C : sh.S;
  const int width = vector_width<T>(L, {u, u_prev, f, out});

  return LMF_ACCESS_SWITCH(T, width, VEC, [&] {
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return LMF_BOOL_SWITCH(has_f, HAS_F, [&] {
        return LMF_BOOL_SWITCH(relu, RELU, [&] {
          return LMF_BOOL_SWITCH(has_noise, HAS_NOISE, [&] {
            constexpr int UW = elementwise_unit<T, CL, VEC>();
            const Geometry g = elementwise_geometry(
                sh, UW, elementwise_positions<T, UW, HAS_F ? 3 : 2, HAS_NOISE ? 1 : 4>());
            return launch_elementwise<lm_step_forward_kernel<T, VEC, CL, HAS_F, RELU, HAS_NOISE>>(
                g, stream, args);
          });
        });
      });
    });
  });
}

// grad_k's geometry: units of the row length's widest vector, one position per step.
template <typename T>
Geometry grad_k_geometry(const LMStepShape& sh) {
  const int w = vector_width<T>(sh.channels_last ? sh.C : sh.S, {});
  return reduction_geometry(sh, w, 1, sizeof(T));
}

template <typename T>
ReductionScratch scratch_typed(const LMStepShape& sh) {
  const Geometry g = grad_k_geometry<T>(sh);
  ReductionScratch s;
  s.workspace_bytes = static_cast<size_t>(merge_values(g, 1, true)) * sizeof(acc_t<T>);
  s.counter_count = static_cast<size_t>(merge_counters(g));
  return s;
}

template <typename T>
cudaError_t backward_typed(const LMStepShape& sh, const void* grad_out, const void* grad_shortcut,
                           const void* u, const void* u_prev, const void* out, const void* k,
                           int64_t k_numel, const void* scale, bool relu, void* grad_u,
                           void* grad_u_prev, void* grad_f, void* grad_k,
                           const ReductionScratch& scratch, cudaStream_t stream) {
  using A = acc_t<T>;
  const bool need_u = grad_u != nullptr, need_up = grad_u_prev != nullptr;
  const bool need_f = grad_f != nullptr, need_k = grad_k != nullptr;
  if (need_k) {
    const ReductionScratch need = scratch_typed<T>(sh);
    if (u == nullptr || u_prev == nullptr || scratch.workspace == nullptr ||
        scratch.counters == nullptr || scratch.workspace_bytes < need.workspace_bytes ||
        scratch.counter_count < need.counter_count)
      return cudaErrorInvalidValue;
  }
  if (!(need_u || need_up || need_f || need_k)) return cudaSuccess;

  BackwardArgs<T> args{};
  args.grad_out = static_cast<const T*>(grad_out);
  args.grad_shortcut = need_u ? static_cast<const T*>(grad_shortcut) : nullptr;
  args.u = static_cast<const T*>(u);
  args.u_prev = static_cast<const T*>(u_prev);
  args.out = static_cast<const T*>(out);
  args.k = static_cast<const A*>(k);
  args.scale = static_cast<const A*>(scale);
  args.grad_u = static_cast<T*>(grad_u);
  args.grad_u_prev = static_cast<T*>(grad_u_prev);
  args.grad_f = static_cast<T*>(grad_f);
  args.grad_k = static_cast<A*>(grad_k);
  if (need_k) {
    const Geometry g = grad_k_geometry<T>(sh);
    A* values = static_cast<A*>(scratch.workspace);
    args.merge = {values, scratch.counters, values + merge_values(g, 1, false)};
  }
  args.k_per_channel = k_numel != 1;

  const int64_t L = sh.channels_last ? sh.C : sh.S;
  // Only the buffers the specialisation touches need to be aligned.
  const std::initializer_list<const void*> buffers = {
      grad_out, args.grad_shortcut, relu ? out : nullptr, need_k ? u : nullptr,
      need_k ? u_prev : nullptr, grad_u, grad_u_prev, grad_f};
  auto flags = [&](auto&& launch) {
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return LMF_BOOL_SWITCH(relu, RELU, [&] {
        return launch(std::bool_constant<CL>{}, std::bool_constant<RELU>{});
      });
    });
  };
  if (need_k) {
    const Geometry g = grad_k_geometry<T>(sh);
    return with_reduction_widths<T>(L, buffers, [&](auto w, auto v) {
      return flags([&](auto cl, auto relu_) {
        return launch_reduction<lm_step_backward_grad_k_kernel<
            T, decltype(w)::value, decltype(v)::value, decltype(cl)::value, decltype(relu_)::value>>(
            g, stream, args);
      });
    });
  }
  const int width = vector_width<T>(L, buffers);
  return LMF_ACCESS_SWITCH(T, width, VEC, [&] {
    return flags([&](auto cl, auto relu_) {
      constexpr bool CL = decltype(cl)::value, RELU = decltype(relu_)::value;
      const Geometry g = elementwise_geometry(sh, elementwise_unit<T, CL, VEC>(),
                                              backward_positions<T, CL, VEC, RELU ? 2 : 1>());
      return launch_elementwise<lm_step_backward_kernel<T, VEC, CL, RELU>>(g, stream, args);
    });
  });
}

}  // namespace detail
}  // namespace lmfused

// Explicit instantiation of the three typed bodies for one dtype (used at global scope).
#define LMF_INSTANTIATE_LAUNCHERS(T)                                                          \
  namespace lmfused {                                                                        \
  namespace detail {                                                                         \
  template cudaError_t forward_typed<T>(const LMStepShape&, const void*, const void*,        \
                                        const void*, const void*, int64_t, const void*,      \
                                        const int64_t*, double, bool, void*, cudaStream_t);  \
  template ReductionScratch scratch_typed<T>(const LMStepShape&);                           \
  template cudaError_t backward_typed<T>(const LMStepShape&, const void*, const void*,       \
                                         const void*, const void*, const void*, const void*, \
                                         int64_t, const void*, bool, void*, void*, void*,    \
                                         void*, const ReductionScratch&, cudaStream_t);      \
  }                                                                                          \
  }
