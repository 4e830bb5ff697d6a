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
  const bool has_scale = has_f && scale != nullptr;  // s only multiplies f
  const bool has_noise = noise_std != 0.0;
  const int64_t L = sh.channels_last ? sh.C : sh.S;
  const int width = vector_width<T>(L, {u, u_prev, f, out});

  return LMF_VEC_SWITCH(T, width, VEC, [&] {
    const Geometry g = make_geometry(sh, VEC, tile_iters(sh, /*forward=*/true));
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return LMF_BOOL_SWITCH(has_f, HAS_F, [&] {
        return LMF_BOOL_SWITCH(has_scale, HAS_SCALE, [&] {
          return LMF_BOOL_SWITCH(relu, RELU, [&] {
            return LMF_BOOL_SWITCH(has_noise, HAS_NOISE, [&] {
              if constexpr (HAS_SCALE && !HAS_F) {
                return cudaErrorInvalidValue;  // unreachable: has_scale implies has_f
              } else {
                return launch_tiles(
                    lm_step_forward_kernel<T, VEC, CL, HAS_F, HAS_SCALE, RELU, HAS_NOISE>, args,
                    g, stream);
              }
            });
          });
        });
      });
    });
  });
}

template <typename T>
size_t workspace_bytes_typed(const LMStepShape& sh) {
  int64_t values = 0;  // the most any vector width needs
  for (int vec = max_vec<T>(); vec >= 1; vec /= 2) {
    const Geometry g = make_geometry(sh, vec, tile_iters(sh, /*forward=*/false));
    const int64_t v = g.num_partials + column_segment_values(g, sh);
    values = v > values ? v : values;
  }
  return static_cast<size_t>(values) * sizeof(acc_t<T>);
}

template <typename T>
cudaError_t backward_typed(const LMStepShape& sh, const void* grad_out, const void* grad_shortcut,
                           const void* u, const void* u_prev, const void* out, const void* k,
                           int64_t k_numel, const void* scale, bool relu, void* grad_u,
                           void* grad_u_prev, void* grad_f, void* grad_k, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream) {
  using A = acc_t<T>;
  const bool need_u = grad_u != nullptr, need_up = grad_u_prev != nullptr;
  const bool need_f = grad_f != nullptr, need_k = grad_k != nullptr;
  if (need_k) {
    if (u == nullptr || u_prev == nullptr || workspace == nullptr) return cudaErrorInvalidValue;
    if (workspace_bytes < workspace_bytes_typed<T>(sh)) return cudaErrorInvalidValue;
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
  args.partials = static_cast<A*>(workspace);
  args.k_per_channel = k_numel != 1;

  const bool has_scale = need_f && scale != nullptr;  // s only enters grad_f
  const int64_t L = sh.channels_last ? sh.C : sh.S;
  // Only the buffers the specialisation touches need to be aligned.
  const int width =
      vector_width<T>(L, {grad_out, args.grad_shortcut, relu ? out : nullptr, need_k ? u : nullptr,
                          need_k ? u_prev : nullptr, grad_u, grad_u_prev, grad_f});

  Geometry g{};
  cudaError_t err = LMF_VEC_SWITCH(T, width, VEC, [&] {
    g = make_geometry(sh, VEC, tile_iters(sh, /*forward=*/false));
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return LMF_BOOL_SWITCH(relu, RELU, [&] {
        return LMF_BOOL_SWITCH(need_k, NEED_K, [&] {
          return LMF_BOOL_SWITCH(need_u, NEED_U, [&] {
            return LMF_BOOL_SWITCH(need_up, NEED_UP, [&] {
              return LMF_BOOL_SWITCH(need_f, NEED_F, [&] {
                return LMF_BOOL_SWITCH(has_scale, HAS_SCALE, [&] {
                  if constexpr (HAS_SCALE && !NEED_F) {
                    return cudaErrorInvalidValue;  // unreachable: has_scale implies need_f
                  } else {
                    return launch_tiles(lm_step_backward_kernel<T, VEC, CL, RELU, HAS_SCALE,
                                                                NEED_U, NEED_UP, NEED_F, NEED_K>,
                                        args, g, stream);
                  }
                });
              });
            });
          });
        });
      });
    });
  });
  if (err != cudaSuccess || !need_k) return err;

  A* partials = static_cast<A*>(workspace);
  return reduce_tile_partials(partials, static_cast<A*>(grad_k), partials + g.num_partials, g, sh,
                              k_numel != 1, stream);
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
  template size_t workspace_bytes_typed<T>(const LMStepShape&);                             \
  template cudaError_t backward_typed<T>(const LMStepShape&, const void*, const void*,       \
                                         const void*, const void*, const void*, const void*, \
                                         int64_t,                                            \
                                         const void*, bool, void*, void*, void*, void*, void*, \
                                         size_t, cudaStream_t);                              \
  }                                                                                          \
  }
