// Kernels and typed launchers of the batch-norm-fused LM step (batch_norm_lm_step.h). They walk
// the LM step's tiles (lm_step.cuh: Geometry, cursors, vector packs, Philox, per-tile partial sums
// and their fixed-order reduction), so one tile holds one channel (contiguous) or one set of
// columns (channels-last), and per-channel sums fall out of the iteration as grad_k's do.
//
// Reductions (statistics, backward_reduce) separate two widths: W, the widest vector the row
// length allows (a function of the shape only), sets the tiles and each thread's W accumulators;
// VEC <= W, the widest the buffers' alignment also allows, sets the loads (W / VEC of them per W
// elements). So the summation order, hence the bits, never depend on where the buffers are.
// The elementwise kernels (forward, backward) have no sums: there W = VEC.
// Instantiated per dtype in batch_norm_lm_step_<dtype>.cu.
#pragma once

#include "batch_norm_lm_step.h"
#include "batch_norm_lm_step_dispatch.h"
#include "lm_step.cuh"

namespace lmfused {
namespace detail {

// Rounded one by one (no fused multiply-add): the batch norm's output is then the same bits in
// every kernel that computes it (the backward's recomputed ReLU mask must match the forward's
// output), and the same as torch's unfused arithmetic. (The CPU emulation builds for a target
// without FMA, where plain operators are already rounded one by one.)
__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__device__ __forceinline__ double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// xhat = (x - mean) * invstd.
template <typename A>
__device__ __forceinline__ A bn_xhat(A x, A mean, A invstd) {
  return mul_rn(add_rn(x, -mean), invstd);
}

// The update's branch term z = s * (xhat * weight + bias): the forward adds it to the state; the
// backward recomputes it, by this same code, for the recomputed ReLU masks.
template <typename A>
__device__ __forceinline__ A bn_branch(A s, A xhat, A weight, A bias) {
  return mul_rn(s, add_rn(mul_rn(xhat, weight), bias));
}

// The noise-free pre-activation with state, ((1 - k) * u + k * u_prev) + branch, one rounding per
// operation in this order: the forward computes it by this code and the backward reduction
// recomputes it by this code for the ReLU mask with state, so both get the same bits (no fused
// multiply-add can differ between the two kernels).
template <typename A>
__device__ __forceinline__ A bn_update(A k, A u, A u_prev, A branch) {
  return add_rn(add_rn(mul_rn(add_rn(A(1), -k), u), mul_rn(k, u_prev)), branch);
}

// How the backward masks g by the ReLU.
enum : int {
  kMaskNone = 0,  // no ReLU
  kMaskOut = 1,   // 0 where the forward's output <= 0 (a NaN output passes g on)
  // Recomputed from the forward's noise-free pre-activation z: 0 where z, rounded to the
  // activation dtype, <= 0 (a NaN z passes g on). Bitwise the mask of the forward's output.
  kMaskRecompute = 2,       // no-state mode: z = branch
  kMaskRecomputeState = 3,  // with state (reduction only): z = bn_update(k, u, u_prev, branch)
};

// g through the ReLU mask. out: the forward's output (kMaskOut); k, u, u_prev: the state
// (kMaskRecomputeState). A NaN z or out passes g on, as torch's threshold_backward.
template <int MASK, typename T, typename A>
__device__ __forceinline__ A relu_mask(A g, A out, A s, A xhat, A weight, A bias, A k = A(0),
                                       A u = A(0), A u_prev = A(0)) {
  if constexpr (MASK == kMaskOut) {
    return out <= A(0) ? A(0) : g;
  } else if constexpr (MASK == kMaskRecompute) {
    const A z = to_acc(from_acc<T>(bn_branch(s, xhat, weight, bias)));
    return z <= A(0) ? A(0) : g;
  } else if constexpr (MASK == kMaskRecomputeState) {
    const A z = to_acc(from_acc<T>(bn_update(k, u, u_prev, bn_branch(s, xhat, weight, bias))));
    return z <= A(0) ? A(0) : g;
  } else {
    return g;
  }
}

// grad_x's modes.
enum : int { kGradXNone = 0, kGradXEval = 1, kGradXTrain = 2 };

template <typename T>
struct BatchNormArgs {
  using A = acc_t<T>;
  const T* x;
  const T* u;
  const T* u_prev;
  const T* out;  // the forward's output (read by the backward's mask)
  const T* grad_out;
  const T* grad_shortcut;
  const A* mean;
  const A* invstd;
  const A* weight;  // nullptr = 1
  const A* bias;    // nullptr = 0
  const A* k;
  const A* scale;  // nullptr = 1
  const A* mean_dy;
  const A* mean_dy_xhat;
  const int64_t* seed;
  T* result;  // the forward's output
  T* grad_x;
  T* grad_u;
  T* grad_u_prev;
  A* partials;
  A noise_std;
  bool k_per_channel;
};

// The per-channel values of a cursor's V elements, `fallback` where p is nullptr.
template <int V, typename Cur, typename A>
__device__ __forceinline__ void load_channel(const Cur& cur, const A* __restrict__ p, A fallback,
                                             A (&v)[V]) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = fallback;
  } else {
    load_k(cur, p, /*per_channel=*/true, v);
  }
}

template <typename A>
__device__ __forceinline__ A sample_scale(const A* __restrict__ scale, int64_t n) {
  return scale != nullptr ? scale[n] : A(1);  // a runtime flag: s = 1 is exact
}

// W elements from W / VEC loads of VEC (a reduction's logical vector, see the top).
template <typename T, int W, int VEC>
__device__ __forceinline__ Pack<T, W> load_wide(const T* __restrict__ p, int64_t off) {
  static_assert(W % VEC == 0, "the load width divides the logical width");
  Pack<T, W> r;
#pragma unroll
  for (int i = 0; i < W / VEC; ++i) {
    const Pack<T, VEC> v = load_pack<T, VEC>(p, off + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.v[i * VEC + j] = v.v[j];
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// Per-tile, per-channel partial sums of d = x - shift and d^2, shift = the channel's first
// element: partials[0 .. P) and partials[P .. 2P), P = g.num_partials.
template <typename T, int W, int VEC, bool CL>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM)
    batch_norm_stats_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  __shared__ A smem[kBlock * W];
  for (int64_t tile = blockIdx.x; tile < g.num_tiles; tile += gridDim.x) {
    Cursor<CL, W> cur(g, tile);
    A s1[W], s2[W];
#pragma unroll
    for (int j = 0; j < W; ++j) s1[j] = s2[j] = A(0);
    if (cur.ok()) {  // no early exit: the whole block must reach the partial-sum barriers
      A shift[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        shift[j] = to_acc(a.x[CL ? cur.channel(j) : cur.channel(j) * g.L]);  // (0, c, 0...)
      }
      for (; cur.ok(); cur.next(g)) {
        const Pack<T, W> px = load_wide<T, W, VEC>(a.x, cur.offset(g));
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const A d = to_acc(px.v[j]) - shift[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      }
    }
    store_tile_partials<CL, W>(s1, g, tile, true, a.partials, smem);
    store_tile_partials<CL, W>(s2, g, tile, true, a.partials + g.num_partials, smem);
  }
}

// mean, var hold the channel sums of d and d^2; turned in place into the mean and the biased
// variance (clamped at 0; NaN stays NaN).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    batch_norm_stats_finalize_kernel(const T* __restrict__ x, acc_t<T>* __restrict__ mean,
                                     acc_t<T>* __restrict__ var, int64_t C, int64_t first_stride,
                                     acc_t<T> count) {
  using A = acc_t<T>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (c >= C) return;
  const A centred_mean = mean[c] / count;
  const A v = var[c] / count - centred_mean * centred_mean;
  mean[c] = to_acc(x[c * first_stride]) + centred_mean;
  var[c] = v < A(0) ? A(0) : v;
}

template <typename T, int VEC, bool CL, bool STATE, bool RELU, bool HAS_NOISE>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM)
    batch_norm_lm_step_forward_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  uint32_t key0 = 0, key1 = 0;
  if constexpr (HAS_NOISE) {
    const uint64_t seed = static_cast<uint64_t>(*a.seed);  // on device: graph-capturable
    key0 = static_cast<uint32_t>(seed);
    key1 = static_cast<uint32_t>(seed >> 32);
  }
  for (int64_t tile = blockIdx.x; tile < g.num_tiles; tile += gridDim.x) {
    Cursor<CL, VEC> cur(g, tile);
    if (!cur.ok()) continue;
    A mean[VEC], invstd[VEC], wt[VEC], bs[VEC], kk[VEC];
    load_channel(cur, a.mean, A(0), mean);
    load_channel(cur, a.invstd, A(1), invstd);
    load_channel(cur, a.weight, A(1), wt);
    load_channel(cur, a.bias, A(0), bs);
    if constexpr (STATE) load_k(cur, a.k, a.k_per_channel, kk);
    constexpr int B = positions_per_step<VEC>();
    for (; cur.ok(); cur.next(g)) {
      int64_t off[B], sample[B];
      const int live = gather_positions<B>(cur, g, off, sample);
      Pack<T, VEC> px[B], pu[B], pp[B];
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b < live) {
          px[b] = load_pack<T, VEC>(a.x, off[b]);
          if constexpr (STATE) {
            pu[b] = load_pack<T, VEC>(a.u, off[b]);
            pp[b] = load_pack<T, VEC>(a.u_prev, off[b]);
          }
        }
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b >= live) break;
        const A s = sample_scale(a.scale, sample[b]);
        Pack<T, VEC> po;
        constexpr int G = VEC % 4 == 0 ? 4 : VEC;  // normals per Philox call used here
        float xi[G];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          A v = bn_branch(s, bn_xhat(to_acc(px[b].v[j]), mean[j], invstd[j]), wt[j], bs[j]);
          if constexpr (STATE) v = bn_update(kk[j], to_acc(pu[b].v[j]), to_acc(pp[b].v[j]), v);
          if constexpr (HAS_NOISE) {
            if (j % G == 0) philox_normals<G>(key0, key1, static_cast<uint64_t>(off[b] + j), xi);
            v += a.noise_std * static_cast<A>(xi[j % G]);
          }
          if constexpr (RELU) v = v < A(0) ? A(0) : v;  // keeps NaN, like torch.relu
          po.v[j] = from_acc<T>(v);
        }
        store_pack<T, VEC>(a.result, off[b], po);
      }
    }
  }
}

// Per-tile, per-channel partial sums of dy = s * g, dy * xhat and (NEED_K) g * (u_prev - u):
// partials[0 .. P), [P .. 2P), [2P .. 3P). kMaskRecomputeState reads u and u_prev for the mask
// (and k), the reads NEED_K makes anyway, instead of out.
template <typename T, int W, int VEC, bool CL, int MASK, bool NEED_K>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM)
    batch_norm_lm_step_backward_reduce_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  constexpr bool kRecompute = MASK == kMaskRecompute || MASK == kMaskRecomputeState;
  constexpr bool kReadState = NEED_K || MASK == kMaskRecomputeState;
  __shared__ A smem[kBlock * W];
  for (int64_t tile = blockIdx.x; tile < g.num_tiles; tile += gridDim.x) {
    Cursor<CL, W> cur(g, tile);
    A sdy[W], sdyx[W], sk[W];
#pragma unroll
    for (int j = 0; j < W; ++j) sdy[j] = sdyx[j] = sk[j] = A(0);
    if (cur.ok()) {  // no early exit: the whole block must reach the partial-sum barriers
      A mean[W], invstd[W], wt[W], bs[W], kk[W];
      load_channel(cur, a.mean, A(0), mean);
      load_channel(cur, a.invstd, A(1), invstd);
      load_channel(cur, kRecompute ? a.weight : nullptr, A(1), wt);
      load_channel(cur, kRecompute ? a.bias : nullptr, A(0), bs);
      if constexpr (MASK == kMaskRecomputeState) {
        load_k(cur, a.k, a.k_per_channel, kk);
      } else {
        load_channel(cur, static_cast<const A*>(nullptr), A(0), kk);
      }
      for (; cur.ok(); cur.next(g)) {
        const int64_t off = cur.offset(g);
        const A s = sample_scale(a.scale, cur.sample());
        const Pack<T, W> pg = load_wide<T, W, VEC>(a.grad_out, off);
        const Pack<T, W> px = load_wide<T, W, VEC>(a.x, off);
        Pack<T, W> po{}, pu{}, pp{};
        if constexpr (MASK == kMaskOut) po = load_wide<T, W, VEC>(a.out, off);
        if constexpr (kReadState) {
          pu = load_wide<T, W, VEC>(a.u, off);
          pp = load_wide<T, W, VEC>(a.u_prev, off);
        }
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const A xhat = bn_xhat(to_acc(px.v[j]), mean[j], invstd[j]);
          const A gj = relu_mask<MASK, T>(to_acc(pg.v[j]), to_acc(po.v[j]), s, xhat, wt[j], bs[j],
                                          kk[j], to_acc(pu.v[j]), to_acc(pp.v[j]));
          const A dy = s * gj;
          sdy[j] += dy;
          sdyx[j] += dy * xhat;
          if constexpr (NEED_K) sk[j] += gj * (to_acc(pp.v[j]) - to_acc(pu.v[j]));
        }
      }
    }
    store_tile_partials<CL, W>(sdy, g, tile, true, a.partials, smem);
    store_tile_partials<CL, W>(sdyx, g, tile, true, a.partials + g.num_partials, smem);
    if constexpr (NEED_K) {
      store_tile_partials<CL, W>(sk, g, tile, true, a.partials + 2 * g.num_partials, smem);
    }
  }
}

// grad_x (GRAD_X), grad_u and grad_u_prev (where their pointers are set: runtime flags, as
// grad_shortcut; they add a store or a read but no arithmetic worth a specialisation).
template <typename T, int VEC, bool CL, int MASK, int GRAD_X>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM)
    batch_norm_lm_step_backward_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  constexpr bool kReadX = GRAD_X == kGradXTrain || MASK == kMaskRecompute;
  const bool need_u = a.grad_u != nullptr, need_up = a.grad_u_prev != nullptr;
  const bool shortcut = need_u && a.grad_shortcut != nullptr;
  for (int64_t tile = blockIdx.x; tile < g.num_tiles; tile += gridDim.x) {
    Cursor<CL, VEC> cur(g, tile);
    if (!cur.ok()) continue;
    A mean[VEC], invstd[VEC], wt[VEC], bs[VEC], mdy[VEC], mdyx[VEC], kk[VEC], gain[VEC];
    load_channel(cur, a.mean, A(0), mean);
    load_channel(cur, a.invstd, A(1), invstd);
    load_channel(cur, a.weight, A(1), wt);
    load_channel(cur, MASK == kMaskRecompute ? a.bias : nullptr, A(0), bs);
    load_channel(cur, GRAD_X == kGradXTrain ? a.mean_dy : nullptr, A(0), mdy);
    load_channel(cur, GRAD_X == kGradXTrain ? a.mean_dy_xhat : nullptr, A(0), mdyx);
    if (need_u || need_up) {
      load_k(cur, a.k, a.k_per_channel, kk);
    } else {
      load_channel(cur, static_cast<const A*>(nullptr), A(0), kk);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) gain[j] = invstd[j] * wt[j];
    constexpr int B = positions_per_step<VEC>();
    for (; cur.ok(); cur.next(g)) {
      int64_t off[B], sample[B];
      const int live = gather_positions<B>(cur, g, off, sample);
      Pack<T, VEC> pg[B], po[B], px[B], psc[B];
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b < live) {
          pg[b] = load_pack<T, VEC>(a.grad_out, off[b]);
          if constexpr (MASK == kMaskOut) po[b] = load_pack<T, VEC>(a.out, off[b]);
          if constexpr (kReadX) px[b] = load_pack<T, VEC>(a.x, off[b]);
          if (shortcut) psc[b] = load_pack<T, VEC>(a.grad_shortcut, off[b]);
        }
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b >= live) break;
        const A s = sample_scale(a.scale, sample[b]);
        Pack<T, VEC> gx, gu, gup;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A xhat = kReadX ? bn_xhat(to_acc(px[b].v[j]), mean[j], invstd[j]) : A(0);
          const A out = MASK == kMaskOut ? to_acc(po[b].v[j]) : A(0);
          const A gj = relu_mask<MASK, T>(to_acc(pg[b].v[j]), out, s, xhat, wt[j], bs[j]);
          if constexpr (GRAD_X != kGradXNone) {
            A dy = s * gj;
            if constexpr (GRAD_X == kGradXTrain) dy = dy - mdy[j] - xhat * mdyx[j];
            gx.v[j] = from_acc<T>(dy * gain[j]);
          }
          // The shortcut's gradient is a gradient of u itself: not masked, one rounding.
          A guj = (A(1) - kk[j]) * gj;
          if (shortcut) guj += to_acc(psc[b].v[j]);
          gu.v[j] = from_acc<T>(guj);
          gup.v[j] = from_acc<T>(kk[j] * gj);
        }
        if constexpr (GRAD_X != kGradXNone) store_pack<T, VEC>(a.grad_x, off[b], gx);
        if (need_u) store_pack<T, VEC>(a.grad_u, off[b], gu);
        if (need_up) store_pack<T, VEC>(a.grad_u_prev, off[b], gup);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Typed launchers
// ---------------------------------------------------------------------------------------------

template <typename T>
BatchNormArgs<T> make_args(const BatchNormOperands& o) {
  using A = acc_t<T>;
  BatchNormArgs<T> a{};
  a.x = static_cast<const T*>(o.x);
  a.u = static_cast<const T*>(o.u);
  a.u_prev = static_cast<const T*>(o.u_prev);
  a.out = static_cast<const T*>(o.out);
  a.grad_out = static_cast<const T*>(o.grad_out);
  a.grad_shortcut = static_cast<const T*>(o.grad_shortcut);
  a.mean = static_cast<const A*>(o.mean);
  a.invstd = static_cast<const A*>(o.invstd);
  a.weight = static_cast<const A*>(o.weight);
  a.bias = static_cast<const A*>(o.bias);
  a.k = static_cast<const A*>(o.k);
  a.scale = static_cast<const A*>(o.scale);
  a.mean_dy = static_cast<const A*>(o.mean_dy);
  a.mean_dy_xhat = static_cast<const A*>(o.mean_dy_xhat);
  a.seed = o.seed;
  a.result = static_cast<T*>(o.result);
  a.grad_x = static_cast<T*>(o.grad_x);
  a.grad_u = static_cast<T*>(o.grad_u);
  a.grad_u_prev = static_cast<T*>(o.grad_u_prev);
  a.partials = static_cast<A*>(o.workspace);
  a.noise_std = static_cast<A>(o.noise_std);
  a.k_per_channel = o.k_numel != 1;
  return a;
}

inline int64_t row_length(const LMStepShape& sh) { return sh.channels_last ? sh.C : sh.S; }

// The reductions' tiles: sized by the logical width W (the shape's), never the loads' width.
template <typename T>
Geometry reduction_geometry(const LMStepShape& sh) {
  return make_geometry(sh, vector_width<T>(row_length(sh), {}), tile_iters(sh, false));
}

template <typename T>
size_t bn_workspace_bytes_typed(const LMStepShape& sh) {
  const Geometry g = reduction_geometry<T>(sh);
  return static_cast<size_t>(3 * g.num_partials + column_segment_values(g, sh)) *
         sizeof(acc_t<T>);
}

// Launches KERNEL<T, W, VEC, ...> (a reduction) for the shape's W and the buffers' VEC: the
// lambda gets both as constexpr ints.
template <typename T, typename F>
cudaError_t with_reduction_widths(const LMStepShape& sh, std::initializer_list<const void*> bufs,
                                  F&& launch) {
  const int wide = vector_width<T>(row_length(sh), {});
  const int width = vector_width<T>(row_length(sh), bufs);  // <= wide, and divides it
  return LMF_VEC_SWITCH(T, wide, W, [&] {
    return LMF_VEC_SWITCH(T, width, VEC, [&] {
      if constexpr (VEC > W) {
        return cudaErrorInvalidValue;  // unreachable: width <= wide
      } else {
        return launch(std::integral_constant<int, W>{}, std::integral_constant<int, VEC>{});
      }
    });
  });
}

// The per-channel totals of `count` partial arrays (see the kernels) into outs[0 .. count).
template <typename A>
cudaError_t reduce_channel_sums(A* partials, A* const* outs, int count, const Geometry& g,
                                const LMStepShape& sh, cudaStream_t stream) {
  for (int i = 0; i < count; ++i) {
    const cudaError_t err = reduce_tile_partials<A>(partials + i * g.num_partials, outs[i],
                                                    partials + 3 * g.num_partials, g, sh,
                                                    /*per_channel=*/true, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t bn_stats_typed(const BatchNormOperands& o, cudaStream_t stream) {
  using A = acc_t<T>;
  const LMStepShape& sh = o.shape;
  const BatchNormArgs<T> args = make_args<T>(o);
  const Geometry g = reduction_geometry<T>(sh);
  cudaError_t err = with_reduction_widths<T>(sh, {o.x}, [&](auto w, auto v) {
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return launch_tiles(batch_norm_stats_kernel<T, decltype(w)::value, decltype(v)::value, CL>,
                          args, g, stream);
    });
  });
  if (err != cudaSuccess) return err;
  A* outs[2] = {static_cast<A*>(o.sum0), static_cast<A*>(o.sum1)};
  err = reduce_channel_sums<A>(args.partials, outs, 2, g, sh, stream);
  if (err != cudaSuccess) return err;
  LMF_LAUNCH(batch_norm_stats_finalize_kernel<T>, static_cast<unsigned>(ceil_div(sh.C, kBlock)),
             kBlock, stream, args.x, outs[0], outs[1], sh.C, sh.channels_last ? int64_t{1} : sh.S,
             static_cast<A>(sh.N * sh.S));
  return cudaGetLastError();
}

template <typename T>
cudaError_t bn_forward_typed(const BatchNormOperands& o, cudaStream_t stream) {
  const LMStepShape& sh = o.shape;
  const BatchNormArgs<T> args = make_args<T>(o);
  const bool state = o.u != nullptr;
  const int width = vector_width<T>(row_length(sh), {o.x, o.u, o.u_prev, o.result});
  return LMF_VEC_SWITCH(T, width, VEC, [&] {
    const Geometry g = make_geometry(sh, VEC, tile_iters(sh, /*forward=*/true));
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return LMF_BOOL_SWITCH(state, STATE, [&] {
        return LMF_BOOL_SWITCH(o.relu, RELU, [&] {
          return LMF_BOOL_SWITCH(o.noise_std != 0.0, HAS_NOISE, [&] {
            return launch_tiles(
                batch_norm_lm_step_forward_kernel<T, VEC, CL, STATE, RELU, HAS_NOISE>, args, g,
                stream);
          });
        });
      });
    });
  });
}

// The mask from the operands: the recomputed one with state when u is given (the reduction's
// launcher passes u only when it is read; the backward's never with a recomputed mask).
inline int mask_mode(const BatchNormOperands& o) {
  if (!o.relu) return kMaskNone;
  if (o.out != nullptr) return kMaskOut;
  return o.u != nullptr ? kMaskRecomputeState : kMaskRecompute;
}

// Expands __VA_ARGS__ (a lambda) with NAME a constexpr int equal to VALUE, one of 0, 1, 2.
#define LMF_INT3_SWITCH(VALUE, NAME, ...) \
  [&] {                                   \
    if ((VALUE) == 0) {                   \
      constexpr int NAME = 0;             \
      return __VA_ARGS__();               \
    } else if ((VALUE) == 1) {            \
      constexpr int NAME = 1;             \
      return __VA_ARGS__();               \
    } else {                              \
      constexpr int NAME = 2;             \
      return __VA_ARGS__();               \
    }                                     \
  }()

// The same for 0, 1, 2, 3.
#define LMF_INT4_SWITCH(VALUE, NAME, ...)                \
  [&] {                                                  \
    if ((VALUE) == 3) {                                  \
      constexpr int NAME = 3;                            \
      return __VA_ARGS__();                              \
    } else {                                             \
      return LMF_INT3_SWITCH(VALUE, NAME, __VA_ARGS__);  \
    }                                                    \
  }()

template <typename T>
cudaError_t bn_reduce_typed(const BatchNormOperands& o, cudaStream_t stream) {
  using A = acc_t<T>;
  const LMStepShape& sh = o.shape;
  const BatchNormArgs<T> args = make_args<T>(o);
  const bool need_k = o.sum2 != nullptr;
  const int mask = mask_mode(o);
  const bool read_state = need_k || mask == kMaskRecomputeState;
  const Geometry g = reduction_geometry<T>(sh);
  cudaError_t err = with_reduction_widths<T>(
      sh,
      {o.grad_out, o.x, mask == kMaskOut ? o.out : nullptr, read_state ? o.u : nullptr,
       read_state ? o.u_prev : nullptr},
      [&](auto w, auto v) {
        constexpr int W = decltype(w)::value, VEC = decltype(v)::value;
        return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
          return LMF_INT4_SWITCH(mask, MASK, [&] {
            return LMF_BOOL_SWITCH(need_k, NEED_K, [&] {
              if constexpr (MASK == kMaskRecompute && NEED_K) {
                return cudaErrorInvalidValue;  // rejected by the caller: no state, no k
              } else {
                return launch_tiles(
                    batch_norm_lm_step_backward_reduce_kernel<T, W, VEC, CL, MASK, NEED_K>, args,
                    g, stream);
              }
            });
          });
        });
      });
  if (err != cudaSuccess) return err;
  A* outs[3] = {static_cast<A*>(o.sum0), static_cast<A*>(o.sum1), static_cast<A*>(o.sum2)};
  return reduce_channel_sums<A>(args.partials, outs, need_k ? 3 : 2, g, sh, stream);
}

template <typename T>
cudaError_t bn_backward_typed(const BatchNormOperands& o, cudaStream_t stream) {
  const LMStepShape& sh = o.shape;
  BatchNormArgs<T> args = make_args<T>(o);
  if (o.grad_u == nullptr) args.grad_shortcut = nullptr;  // only grad_u reads it
  const int mask = mask_mode(o);
  if (mask == kMaskRecomputeState) return cudaErrorInvalidValue;  // the launcher passes no u
  const int grad_x = o.grad_x == nullptr ? kGradXNone : o.training ? kGradXTrain : kGradXEval;
  const bool read_x = grad_x == kGradXTrain || mask == kMaskRecompute;
  const int width = vector_width<T>(
      row_length(sh), {o.grad_out, args.grad_shortcut, mask == kMaskOut ? o.out : nullptr,
                       read_x ? o.x : nullptr, o.grad_x, o.grad_u, o.grad_u_prev});
  return LMF_VEC_SWITCH(T, width, VEC, [&] {
    const Geometry g = make_geometry(sh, VEC, tile_iters(sh, /*forward=*/true));
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return LMF_INT3_SWITCH(mask, MASK, [&] {
        return LMF_INT3_SWITCH(grad_x, GRAD_X, [&] {
          return launch_tiles(batch_norm_lm_step_backward_kernel<T, VEC, CL, MASK, GRAD_X>, args,
                              g, stream);
        });
      });
    });
  });
}

}  // namespace detail
}  // namespace lmfused

// Explicit instantiation of the typed launchers for one dtype (used at global scope).
#define LMF_INSTANTIATE_BATCH_NORM_LAUNCHERS(T)                                               \
  namespace lmfused {                                                                        \
  namespace detail {                                                                         \
  template size_t bn_workspace_bytes_typed<T>(const LMStepShape&);                          \
  template cudaError_t bn_stats_typed<T>(const BatchNormOperands&, cudaStream_t);            \
  template cudaError_t bn_forward_typed<T>(const BatchNormOperands&, cudaStream_t);          \
  template cudaError_t bn_reduce_typed<T>(const BatchNormOperands&, cudaStream_t);           \
  template cudaError_t bn_backward_typed<T>(const BatchNormOperands&, cudaStream_t);         \
  }                                                                                          \
  }
