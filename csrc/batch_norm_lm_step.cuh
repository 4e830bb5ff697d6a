// Kernels and typed launchers of the batch-norm-fused LM step (batch_norm_lm_step.h), over the
// shared work decomposition (kernel_common.cuh):
//   batch_norm_stats_kernel                    reduction: shifted sums, merge, mean / invstd and
//                                              the running statistics finished by the last CTAs
//   batch_norm_eval_stats_kernel               per channel: evaluation statistics
//   batch_norm_lm_step_forward_kernel          elementwise, optionally writing the 1-bit mask
//   batch_norm_lm_step_backward_reduce_kernel  reduction: sum dy, sum dy xhat, grad_k (k's shape)
//   batch_norm_lm_step_backward_kernel         elementwise: grad_x, grad_u, grad_u_prev
// The reductions' units are W elements (the row length's widest vector) loaded VEC <= W at a time,
// so their sums' order depends on the shape (and the operands given), never on the alignment.
// Instantiated per dtype in batch_norm_lm_step_<dtype>.cu.
#pragma once

#include "batch_norm_lm_step.h"
#include "batch_norm_lm_step_dispatch.h"
#include "kernel_common.cuh"

namespace lmfused {
namespace detail {

// Rounded one by one (no fused multiply-add): the batch norm's output is then the same bits in
// every kernel that computes it (the backward's recomputed ReLU mask must match the forward's
// output), and the same as torch's unfused arithmetic, so the forward's output and its mask are
// bitwise the reference backend's. (The CPU emulation builds for a target without FMA, where
// plain operators are already rounded one by one.)
template <typename A>
__device__ __forceinline__ A mul_rn(A a, A b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(A) == sizeof(double)) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}
template <typename A>
__device__ __forceinline__ A add_rn(A a, A b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(A) == sizeof(double)) {
    return __dadd_rn(a, b);
  } else {
    return __fadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

// xhat = (x - mean) * invstd.
template <typename A>
__device__ __forceinline__ A bn_xhat(A x, A mean, A invstd) {
  return mul_rn(add_rn(x, -mean), invstd);
}

// The update's branch term s * (xhat * weight + bias): the forward adds it to the state; the
// no-state backward recomputes it, by this same code, for its ReLU mask.
template <typename A>
__device__ __forceinline__ A bn_branch(A s, A xhat, A weight, A bias) {
  return mul_rn(s, add_rn(mul_rn(xhat, weight), bias));
}

// The noise-free pre-activation with state, ((1 - k) * u + k * u_prev) + branch: torch's order.
template <typename A>
__device__ __forceinline__ A bn_update(A k, A u, A u_prev, A branch) {
  return add_rn(add_rn(mul_rn(add_rn(A(1), -k), u), mul_rn(k, u_prev)), branch);
}

// How the backward masks g by the ReLU.
enum : int {
  kMaskNone = 0,       // no ReLU
  kMaskBits = 1,       // the forward's 1-bit mask
  kMaskRecompute = 2,  // no-state mode: 0 where the branch term, rounded to T, is <= 0 (NaN passes)
};

// grad_x's modes: dy times the gain, written where grad_x is set (a run-time flag, as grad_u's:
// without an input gradient the kernel is the eval mode's, which then only skips the store), or in
// training with the batch statistics' terms.
enum : int { kGradXEval = 1, kGradXTrain = 2 };

// Per-channel coefficients (Coefs), in this order; each kernel reads the ones it needs.
enum : int {
  kCoefMean = 0,
  kCoefInvstd,
  kCoefWeight,
  kCoefBias,
  kCoefK,
  kCoefGain,     // weight * invstd (grad_x)
  kCoefMeanDy,   // sum_dy / count
  kCoefDyXhat,   // invstd * sum_dy_xhat / count
  kNumCoefs
};

template <typename T>
struct BatchNormArgs {
  using A = acc_t<T>;
  const T* x;
  const T* u;
  const T* u_prev;
  const T* grad_out;
  const T* grad_handoff;
  const T* grad_shortcut;
  const uint8_t* mask;  // to read
  const A* mean;
  const A* invstd;
  const A* weight;  // nullptr = 1
  const A* bias;    // nullptr = 0
  const A* k;
  const A* scale;  // nullptr = 1
  const A* sum_dy;
  const A* sum_dy_xhat;
  const int64_t* seed;
  T* result;  // the forward's output
  uint8_t* mask_out;
  T* grad_x;
  T* grad_u;
  T* grad_u_prev;
  A* out0;  // per-channel outputs
  A* out1;
  A* out2;
  void* running_mean;
  void* running_var;
  DType running_dtype;
  MergeScratch<A> merge;
  A noise_std, eps, momentum, count, unbias;
  bool k_per_channel;

  // Coefficient q of channel c (kCoef*).
  __device__ __forceinline__ A coef(int q, int64_t c) const {
    const A inv = invstd != nullptr ? invstd[c] : A(1);
    const A w = weight != nullptr ? weight[c] : A(1);
    switch (q) {
      case kCoefMean:
        return mean != nullptr ? mean[c] : A(0);
      case kCoefInvstd:
        return inv;
      case kCoefWeight:
        return w;
      case kCoefBias:
        return bias != nullptr ? bias[c] : A(0);
      case kCoefK:
        return k != nullptr ? k[k_per_channel ? c : 0] : A(0);
      case kCoefGain:
        return mul_rn(inv, w);
      case kCoefMeanDy:
        return sum_dy != nullptr ? sum_dy[c] / count : A(0);
      default:
        return sum_dy_xhat != nullptr ? inv * (sum_dy_xhat[c] / count) : A(0);
    }
  }
};

// A running statistic of any float dtype, read and written in the accumulator type.
template <typename A>
__device__ __forceinline__ A load_running(const void* p, DType d, int64_t c) {
  switch (d) {
    case DType::kFloat64:
      return static_cast<A>(static_cast<const double*>(p)[c]);
    case DType::kFloat16:
      return static_cast<A>(__half2float(static_cast<const __half*>(p)[c]));
    case DType::kBFloat16:
      return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[c]));
    default:
      return static_cast<A>(static_cast<const float*>(p)[c]);
  }
}
template <typename A>
__device__ __forceinline__ void store_running(void* p, DType d, int64_t c, A v) {
  switch (d) {
    case DType::kFloat64:
      static_cast<double*>(p)[c] = static_cast<double>(v);
      break;
    case DType::kFloat16:
      static_cast<__half*>(p)[c] = __float2half_rn(static_cast<float>(v));
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[c] = __float2bfloat16_rn(static_cast<float>(v));
      break;
    default:
      static_cast<float*>(p)[c] = static_cast<float>(v);
  }
}

// W elements from W / VEC loads of VEC (a reduction's unit, see the top).
template <typename T, int W, int VEC>
__device__ __forceinline__ Pack<T, W> load_wide(const T* __restrict__ p, int64_t off) {
  static_assert(W % VEC == 0, "the load width divides the unit");
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

// Training statistics: each CTA sums d = x - shift and d^2 over its item (4 rows or units per step
// in flight), shift = the channel's first element; the group's last CTA merges the partials and
// finishes mean, invstd and the running statistics.
template <typename T, int W, int VEC, bool CL>
__global__ void __launch_bounds__(kBlock, kReductionBlocksPerSM)
    batch_norm_stats_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  constexpr int U = 4;
  __shared__ A smem[kBlock * W];
  __shared__ A coef_smem[CL ? kMaxColUnits * W : 1];
  const int64_t group = reduction_group(g), chunk = reduction_chunk(g);
  // The shift of channel c: x at (n = 0, s = 0, c).
  auto shift_of = [&](int, int64_t c) { return to_acc(a.x[CL ? c : c * g.L]); };
  Coefs<CL, 1, W, A> shift;
  shift.load(g, group, coef_smem, shift_of);
  constexpr int WA = accumulators<CL, W>();
  A acc[2][WA];
#pragma unroll
  for (int j = 0; j < WA; ++j) acc[0][j] = acc[1][j] = A(0);
  // (The reductions keep their step loop in the kernel: as a lambda passed to a loop template, the
  // compiler keeps their sums in registers less well, down to local memory in float64.)
  Cursor<CL, W> cur(g, group, chunk);
  for (int64_t step = 0; step < g.steps; ++step) {
    Pos p[U];
    next_positions(cur, g, p);
    Pack<T, W> px[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (p[i].ok) px[i] = load_wide<T, W, VEC>(a.x, p[i].off);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!p[i].ok) continue;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const A d = to_acc(px[i].v[j]) - shift.get(0, j);
        acc[0][CL ? j : 0] += d;
        acc[1][CL ? j : 0] += d * d;
      }
    }
  }
  if (!publish_partials<2, WA>(acc, g, group, chunk, a.merge, smem)) return;
  merge_partials<2, W>(g, group, a.merge, smem, [&](int64_t c, const A (&tot)[2]) {
    const A centred = tot[0] / a.count;
    A var = tot[1] / a.count - centred * centred;
    var = var < A(0) ? A(0) : var;  // (NaN stays NaN)
    const A mean = shift_of(0, c) + centred;
    a.out0[c] = mean;
    a.out1[c] = A(1) / std::sqrt(var + a.eps);
    if (a.running_mean != nullptr) {
      const A keep = A(1) - a.momentum;
      const A rm = load_running<A>(a.running_mean, a.running_dtype, c);
      store_running(a.running_mean, a.running_dtype, c, rm * keep + a.momentum * mean);
      const A rv = load_running<A>(a.running_var, a.running_dtype, c);
      store_running(a.running_var, a.running_dtype, c, rv * keep + a.momentum * (var * a.unbias));
    }
  });
}

// Evaluation statistics (and a training batch without values): mean = running_mean (0 without),
// invstd = 1 / sqrt(running_var + eps) (running_var 1 without).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    batch_norm_eval_stats_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (c >= g.C) return;
  const bool running = a.running_mean != nullptr;
  const A var = running ? load_running<A>(a.running_var, a.running_dtype, c) : A(1);
  a.out0[c] = running ? load_running<A>(a.running_mean, a.running_dtype, c) : A(0);
  a.out1[c] = A(1) / std::sqrt(var + a.eps);
}

template <typename T, int VEC, bool CL, bool STATE, bool RELU, bool HAS_NOISE, bool MASK>
__global__ void __launch_bounds__(kBlock, elementwise_blocks_per_sm<T>())
    batch_norm_lm_step_forward_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  constexpr int UW = elementwise_unit<T, CL, VEC, MASK>();
  constexpr int U = elementwise_positions<T, UW, STATE ? 3 : 1, HAS_NOISE ? 1 : 4>();
  constexpr int SUB = UW / VEC, NC = kCoefK + 1;
  static_assert(!MASK || (STATE && RELU), "the mask is written with state and relu");
  __shared__ A coef_smem[CL ? NC * kMaxColUnits * UW : 1];
  PackNoise<HAS_NOISE, VEC> noise(a.seed);
  Coefs<CL, NC, UW, A> cf;
  auto load_coefs = [&](int64_t group) {
    cf.load(g, group, coef_smem, [&](int q, int64_t c) { return a.coef(q, c); });
  };
  elementwise_tiles<CL, UW, U>(g, load_coefs, [&](const Pos (&p)[U]) {
    Pack<T, VEC> px[U][SUB], pu[U][SUB], pp[U][SUB];
    // Every sub-vector's loads first (preload_step), except with noise (Philox's registers):
    // then each one's just before its use.
    auto load = [&](int i, int q) {
      const int64_t off = p[i].off + q * VEC;
      px[i][q] = load_pack<T, VEC>(a.x, off);
      if constexpr (STATE) {
        pu[i][q] = load_pack<T, VEC>(a.u, off);
        pp[i][q] = load_pack<T, VEC>(a.u_prev, off);
      }
    };
    constexpr bool kPreload = !HAS_NOISE && preload_step<T, U, SUB, VEC, STATE ? 3 : 1>();
    preload_packs<SUB, VEC, kPreload>(p, load);
#pragma unroll
    for (int i = 0; i < U; ++i) {
      unsigned bits = 0;
      if (p[i].ok) {
        const A s = sample_scale(a.scale, p[i].n);
        live_packs<SUB, VEC, kPreload>(p[i], i, load, [&](int q) {
          const int64_t off = p[i].off + q * VEC;
          Pack<T, VEC> po;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int e = q * VEC + j;
            const A xhat =
                bn_xhat(to_acc(px[i][q].v[j]), cf.get(kCoefMean, e), cf.get(kCoefInvstd, e));
            A v = bn_branch(s, xhat, cf.get(kCoefWeight, e), cf.get(kCoefBias, e));
            if constexpr (STATE) {
              v = bn_update(cf.get(kCoefK, e), to_acc(pu[i][q].v[j]), to_acc(pp[i][q].v[j]), v);
            }
            if constexpr (HAS_NOISE) v += noise.at(off, j, a.noise_std);
            if constexpr (RELU) v = v < A(0) ? A(0) : v;  // keeps NaN, like torch.relu
            po.v[j] = from_acc<T>(v);
            // The gradient passes where the stored output is not <= 0.
            if constexpr (MASK) bits |= (to_acc(po.v[j]) <= A(0) ? 0u : 1u) << e;
          }
          store_pack<T, VEC>(a.result, off, po);
        });
      }
      if constexpr (MASK) store_mask<UW>(a.mask_out, p[i], bits, p[i].ok);
    }
  });
}

// The output's gradient at element j of a pack: grad_out's, plus (HANDOFF) grad_handoff's, added
// in the accumulator type before the ReLU's mask (the sum autograd would otherwise write).
template <bool HANDOFF, typename T, int V>
__device__ __forceinline__ acc_t<T> output_gradient(const Pack<T, V>& g, const Pack<T, V>& h,
                                                    int j) {
  if constexpr (HANDOFF) {
    return to_acc(g.v[j]) + to_acc(h.v[j]);
  } else {
    return to_acc(g.v[j]);
  }
}

// g through the ReLU (MASK) for element e of a unit: `bits` are the unit's mask bits; the
// recomputed mask needs the branch term's operands.
template <int MASK, typename T, typename A, typename CF>
__device__ __forceinline__ A relu_gradient(A g, unsigned bits, int e, A s, A x, const CF& cf) {
  if constexpr (MASK == kMaskBits) {
    return (bits >> e) & 1u ? g : A(0);
  } else if constexpr (MASK == kMaskRecompute) {
    const A xhat = bn_xhat(x, cf.get(kCoefMean, e), cf.get(kCoefInvstd, e));
    const A z = to_acc(from_acc<T>(bn_branch(s, xhat, cf.get(kCoefWeight, e), cf.get(kCoefBias, e))));
    return z <= A(0) ? A(0) : g;
  } else {
    return g;
  }
}

// The backward reduction's rows or units per step: two (grad_out, x: at least four 128-bit loads
// in flight per thread), one with grad_k (four tensors) or with grad_handoff on 128-bit units
// (three; two positions of them would take more registers than 80 in channels-last).
template <typename T>
__host__ __device__ constexpr int reduce_positions(int w, bool need_k, bool handoff) {
  return need_k || (handoff && w * static_cast<int>(sizeof(T)) == 16) ? 1 : 2;
}
// Its CTAs per SM: 3 (80 registers), 2 in channels-last with 8-element units, grad_k and the
// handoff, whose five tensors and 3 x 8 accumulators need more registers (80 bytes of loads per
// thread: 40 KB in flight per SM).
template <bool CL, int W, bool NEED_K, bool HANDOFF>
__host__ __device__ constexpr int reduce_blocks_per_sm() {
  return CL && W == 8 && NEED_K && HANDOFF ? 2 : kReductionBlocksPerSM;
}

// Per-channel sums of dy = s * g, dy * (x - mean) (times invstd when finished: sum dy xhat) and
// (NEED_K) g * (u_prev - u), g = grad_out (+ grad_handoff with HANDOFF).
template <typename T, int W, int VEC, bool CL, int MASK, bool NEED_K, bool HANDOFF>
__global__ void __launch_bounds__(kBlock, reduce_blocks_per_sm<CL, W, NEED_K, HANDOFF>())
    batch_norm_lm_step_backward_reduce_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  constexpr int U = reduce_positions<T>(W, NEED_K, HANDOFF), NS = NEED_K ? 3 : 2;
  constexpr int NC = MASK == kMaskRecompute ? kCoefBias + 1 : kCoefMean + 1;
  __shared__ A smem[kBlock * W];
  __shared__ A coef_smem[CL ? NC * kMaxColUnits * W : 1];
  const int64_t group = reduction_group(g), chunk = reduction_chunk(g);
  Coefs<CL, NC, W, A> cf;
  cf.load(g, group, coef_smem, [&](int q, int64_t c) { return a.coef(q, c); });
  constexpr int WA = accumulators<CL, W>();
  A acc[NS][WA];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
#pragma unroll
    for (int j = 0; j < WA; ++j) acc[s][j] = A(0);
  }
  Cursor<CL, W> cur(g, group, chunk);
  for (int64_t step = 0; step < g.steps; ++step) {
    Pos p[U];
    next_positions(cur, g, p);
    Pack<T, W> pg[U], ph[U], px[U], pu[U], pp[U];
    unsigned bits[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      bits[i] = 0;
      if (p[i].ok) {
        pg[i] = load_wide<T, W, VEC>(a.grad_out, p[i].off);
        if constexpr (HANDOFF) ph[i] = load_wide<T, W, VEC>(a.grad_handoff, p[i].off);
        px[i] = load_wide<T, W, VEC>(a.x, p[i].off);
        if constexpr (NEED_K) {
          pu[i] = load_wide<T, W, VEC>(a.u, p[i].off);
          pp[i] = load_wide<T, W, VEC>(a.u_prev, p[i].off);
        }
        if constexpr (MASK == kMaskBits) bits[i] = load_mask<W>(a.mask, p[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!p[i].ok) continue;
      const A s = sample_scale(a.scale, p[i].n);
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const A x = to_acc(px[i].v[j]);
        const A gj = relu_gradient<MASK, T>(output_gradient<HANDOFF>(pg[i], ph[i], j), bits[i], j,
                                            s, x, cf);
        const A dy = s * gj;
        const int t = CL ? j : 0;
        acc[0][t] += dy;
        acc[1][t] += dy * (x - cf.get(kCoefMean, j));
        if constexpr (NEED_K) acc[NS - 1][t] += gj * (to_acc(pp[i].v[j]) - to_acc(pu[i].v[j]));
      }
    }
  }
  if (!publish_partials<NS, WA>(acc, g, group, chunk, a.merge, smem)) return;
  merge_partials<NS, W>(g, group, a.merge, smem, [&](int64_t c, const A (&tot)[NS]) {
    a.out0[c] = tot[0];
    a.out1[c] = tot[1] * a.invstd[c];
    if constexpr (NEED_K) {
      if (a.k_per_channel) {
        a.out2[c] = tot[NS - 1];
      } else {
        a.merge.stage[c] = tot[NS - 1];
      }
    }
  });
  if (NEED_K && !a.k_per_channel) merge_channels(g, a.merge, smem, a.out2);
}

// The backward reads x for grad_x in training and for the recomputed mask.
template <int MASK, int GRAD_X>
__host__ __device__ constexpr bool backward_reads_x() {
  return GRAD_X == kGradXTrain || MASK == kMaskRecompute;
}
// The backward's CTAs per SM: with the handoff 3 (80 registers, as float64's), whose loads take
// the registers of one more tensor.
template <typename T, bool HANDOFF>
__host__ __device__ constexpr int backward_blocks_per_sm() {
  return HANDOFF ? 3 : elementwise_blocks_per_sm<T>();
}

// grad_x (in GRAD_X's mode), grad_u and grad_u_prev (where their pointers are set: runtime flags,
// as grad_shortcut; they add a store or a read but no arithmetic worth a specialisation), from
// g = grad_out (+ grad_handoff with HANDOFF). The positions per step and the choice to preload
// count grad_out and x only: grad_handoff loads beside grad_out, as grad_shortcut does, in the
// registers that backward_blocks_per_sm leaves it.
template <typename T, int VEC, bool CL, int MASK, int GRAD_X, bool HANDOFF>
__global__ void __launch_bounds__(kBlock, backward_blocks_per_sm<T, HANDOFF>())
    batch_norm_lm_step_backward_kernel(const BatchNormArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  constexpr bool kReadX = backward_reads_x<MASK, GRAD_X>();
  constexpr int UW = elementwise_unit<T, CL, VEC>(), U = backward_positions<T, CL, VEC, 1 + kReadX>();
  constexpr int SUB = UW / VEC;
  __shared__ A coef_smem[CL ? kNumCoefs * kMaxColUnits * UW : 1];
  const bool need_x = GRAD_X == kGradXTrain || a.grad_x != nullptr;  // (training always writes it)
  const bool need_u = a.grad_u != nullptr, need_up = a.grad_u_prev != nullptr;
  const bool shortcut = need_u && a.grad_shortcut != nullptr;
  Coefs<CL, kNumCoefs, UW, A> cf;
  auto load_coefs = [&](int64_t group) {
    cf.load(g, group, coef_smem, [&](int q, int64_t c) { return a.coef(q, c); });
  };
  elementwise_tiles<CL, UW, U>(g, load_coefs, [&](const Pos (&p)[U]) {
    Pack<T, VEC> pg[U][SUB], ph[U][SUB], px[U][SUB], psc[U][SUB];
    unsigned bits[U];
    auto load = [&](int i, int q) {
      const int64_t off = p[i].off + q * VEC;
      pg[i][q] = load_pack<T, VEC>(a.grad_out, off);
      if constexpr (HANDOFF) ph[i][q] = load_pack<T, VEC>(a.grad_handoff, off);
      if constexpr (kReadX) px[i][q] = load_pack<T, VEC>(a.x, off);
      if (shortcut) psc[i][q] = load_pack<T, VEC>(a.grad_shortcut, off);
    };
    constexpr bool kPreload = preload_step<T, U, SUB, VEC, 1 + kReadX>();
#pragma unroll
    for (int i = 0; i < U; ++i) {
      bits[i] = 0;
      if constexpr (MASK == kMaskBits) {
        if (p[i].ok) bits[i] = load_mask<UW>(a.mask, p[i]);
      }
    }
    preload_packs<SUB, VEC, kPreload>(p, load);
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!p[i].ok) continue;
      const A s = sample_scale(a.scale, p[i].n);
      live_packs<SUB, VEC, kPreload>(p[i], i, load, [&](int q) {
        const int64_t off = p[i].off + q * VEC;
        // One gradient at a time (fewer registers live than all three at once).
        A gj[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A x = kReadX ? to_acc(px[i][q].v[j]) : A(0);
          gj[j] = relu_gradient<MASK, T>(output_gradient<HANDOFF>(pg[i][q], ph[i][q], j), bits[i],
                                         q * VEC + j, s, x, cf);
        }
        if (need_x) {
          Pack<T, VEC> gx;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int e = q * VEC + j;
            A dy = s * gj[j];
            if constexpr (GRAD_X == kGradXTrain) {
              const A xc = to_acc(px[i][q].v[j]) - cf.get(kCoefMean, e);
              dy = dy - cf.get(kCoefMeanDy, e) - xc * cf.get(kCoefDyXhat, e);
            }
            gx.v[j] = from_acc<T>(dy * cf.get(kCoefGain, e));
          }
          store_pack<T, VEC>(a.grad_x, off, gx);
        }
        if (need_u) {
          Pack<T, VEC> gu;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            // The shortcut's gradient is a gradient of u itself: not masked, one rounding.
            A guj = (A(1) - cf.get(kCoefK, q * VEC + j)) * gj[j];
            if (shortcut) guj += to_acc(psc[i][q].v[j]);
            gu.v[j] = from_acc<T>(guj);
          }
          store_pack<T, VEC>(a.grad_u, off, gu);
        }
        if (need_up) {
          Pack<T, VEC> gup;
#pragma unroll
          for (int j = 0; j < VEC; ++j) gup.v[j] = from_acc<T>(cf.get(kCoefK, q * VEC + j) * gj[j]);
          store_pack<T, VEC>(a.grad_u_prev, off, gup);
        }
      });
    }
  });
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
  a.grad_out = static_cast<const T*>(o.grad_out);
  a.grad_handoff = static_cast<const T*>(o.grad_handoff);
  a.grad_shortcut = static_cast<const T*>(o.grad_shortcut);
  a.mask = static_cast<const uint8_t*>(o.mask);
  a.mean = static_cast<const A*>(o.mean);
  a.invstd = static_cast<const A*>(o.invstd);
  a.weight = static_cast<const A*>(o.weight);
  a.bias = static_cast<const A*>(o.bias);
  a.k = static_cast<const A*>(o.k);
  a.scale = static_cast<const A*>(o.scale);
  a.sum_dy = static_cast<const A*>(o.sum_dy);
  a.sum_dy_xhat = static_cast<const A*>(o.sum_dy_xhat);
  a.seed = o.seed;
  a.result = static_cast<T*>(o.result);
  a.mask_out = static_cast<uint8_t*>(o.mask_out);
  a.grad_x = static_cast<T*>(o.grad_x);
  a.grad_u = static_cast<T*>(o.grad_u);
  a.grad_u_prev = static_cast<T*>(o.grad_u_prev);
  a.out0 = static_cast<A*>(o.out0);
  a.out1 = static_cast<A*>(o.out1);
  a.out2 = static_cast<A*>(o.out2);
  a.running_mean = o.running_mean;
  a.running_var = o.running_var;
  a.running_dtype = o.running_dtype;
  a.noise_std = static_cast<A>(o.noise_std);
  a.eps = static_cast<A>(o.eps);
  a.momentum = static_cast<A>(o.momentum);
  const int64_t count = o.shape.N * o.shape.S;
  a.count = static_cast<A>(count);
  a.unbias = static_cast<A>(static_cast<double>(count) / static_cast<double>(count - 1));
  a.k_per_channel = o.k_numel != 1;
  return a;
}

inline int64_t row_length(const LMStepShape& sh) { return sh.channels_last ? sh.C : sh.S; }

// The reductions' geometries: units of the row length's widest vector (a function of the shape).
template <typename T>
Geometry stats_geometry(const LMStepShape& sh) {
  return reduction_geometry(sh, vector_width<T>(row_length(sh), {}), 4, sizeof(T));
}
template <typename T>
Geometry reduce_geometry(const LMStepShape& sh, bool need_k, bool handoff) {
  const int w = vector_width<T>(row_length(sh), {});
  return reduction_geometry(sh, w, reduce_positions<T>(w, need_k, handoff), sizeof(T));
}

template <typename T>
MergeScratch<acc_t<T>> merge_scratch(const Geometry& g, int sums, const ReductionScratch& s) {
  acc_t<T>* values = static_cast<acc_t<T>*>(s.workspace);
  return {values, s.counters, values + merge_values(g, sums, false)};
}

template <typename T>
ReductionScratch bn_scratch_typed(const LMStepShape& sh) {
  int64_t values = 0, counters = 0;
  for (const Geometry& g : {stats_geometry<T>(sh), reduce_geometry<T>(sh, false, false),
                            reduce_geometry<T>(sh, true, false)}) {  // (positions 2 and 1)
    const int64_t v = merge_values(g, 3, true), c = merge_counters(g);
    values = v > values ? v : values;
    counters = c > counters ? c : counters;
  }
  ReductionScratch s;
  s.workspace_bytes = static_cast<size_t>(values) * sizeof(acc_t<T>);
  s.counter_count = static_cast<size_t>(counters);
  return s;
}

template <typename T>
cudaError_t bn_stats_typed(const BatchNormOperands& o, cudaStream_t stream) {
  const LMStepShape& sh = o.shape;
  BatchNormArgs<T> args = make_args<T>(o);
  if (!o.training) {
    Geometry g{};
    g.C = sh.C;
    return launch_kernel<batch_norm_eval_stats_kernel<T>>(ceil_div(sh.C, kBlock), stream, args, g);
  }
  const Geometry g = stats_geometry<T>(sh);
  args.merge = merge_scratch<T>(g, 2, o.scratch);
  return with_reduction_widths<T>(row_length(sh), {o.x}, [&](auto w, auto v) {
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return launch_reduction<
          batch_norm_stats_kernel<T, decltype(w)::value, decltype(v)::value, CL>>(g, stream,
                                                                                  args);
    });
  });
}

template <typename T>
cudaError_t bn_forward_typed(const BatchNormOperands& o, cudaStream_t stream) {
  const LMStepShape& sh = o.shape;
  const BatchNormArgs<T> args = make_args<T>(o);
  const bool state = o.u != nullptr;
  const int width = vector_width<T>(row_length(sh), {o.x, o.u, o.u_prev, o.result});
  return LMF_ACCESS_SWITCH(T, width, VEC, [&] {
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return LMF_BOOL_SWITCH(state, STATE, [&] {
        return LMF_BOOL_SWITCH(o.relu, RELU, [&] {
          return LMF_BOOL_SWITCH(o.noise_std != 0.0, HAS_NOISE, [&] {
            return LMF_BOOL_SWITCH(o.mask_out != nullptr, MASK, [&] {
              if constexpr (MASK && !(STATE && RELU)) {
                return cudaErrorInvalidValue;  // rejected by the caller
              } else {
                constexpr int UW = elementwise_unit<T, CL, VEC, MASK>();
                const Geometry g = elementwise_geometry(
                    sh, UW, elementwise_positions<T, UW, STATE ? 3 : 1, HAS_NOISE ? 1 : 4>());
                return launch_elementwise<batch_norm_lm_step_forward_kernel<
                    T, VEC, CL, STATE, RELU, HAS_NOISE, MASK>>(g, stream, args);
              }
            });
          });
        });
      });
    });
  });
}

// The mask mode of a backward pass's operands.
inline int mask_mode(const BatchNormOperands& o) {
  if (!o.relu) return kMaskNone;
  return o.mask != nullptr ? kMaskBits : kMaskRecompute;
}

template <typename T>
cudaError_t bn_reduce_typed(const BatchNormOperands& o, cudaStream_t stream) {
  const LMStepShape& sh = o.shape;
  BatchNormArgs<T> args = make_args<T>(o);
  const bool need_k = o.out2 != nullptr;
  const int mask = mask_mode(o);
  const Geometry g = reduce_geometry<T>(sh, need_k, o.grad_handoff != nullptr);
  args.merge = merge_scratch<T>(g, need_k ? 3 : 2, o.scratch);
  return with_reduction_widths<T>(
      row_length(sh), {o.grad_out, o.grad_handoff, o.x, o.u, o.u_prev}, [&](auto w, auto v) {
        constexpr int W = decltype(w)::value, VEC = decltype(v)::value;
        return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
          return LMF_INT_SWITCH3(mask, MASK, kMaskNone, kMaskBits, kMaskRecompute, [&] {
            return LMF_BOOL_SWITCH(need_k, NEED_K, [&] {
              if constexpr (MASK == kMaskRecompute && NEED_K) {
                return cudaErrorInvalidValue;  // rejected by the caller: no state, no k
              } else {
                return LMF_BOOL_SWITCH(o.grad_handoff != nullptr, HANDOFF, [&] {
                  return launch_reduction<batch_norm_lm_step_backward_reduce_kernel<
                      T, W, VEC, CL, MASK, NEED_K, HANDOFF>>(g, stream, args);
                });
              }
            });
          });
        });
      });
}

template <typename T>
cudaError_t bn_backward_typed(const BatchNormOperands& o, cudaStream_t stream) {
  const LMStepShape& sh = o.shape;
  const BatchNormArgs<T> args = make_args<T>(o);
  const int mask = mask_mode(o);
  const bool train_x = o.grad_x != nullptr && o.training;
  const bool read_x = train_x || mask == kMaskRecompute;
  const int width = vector_width<T>(
      row_length(sh), {o.grad_out, o.grad_handoff, o.grad_shortcut, read_x ? o.x : nullptr,
                       o.grad_x, o.grad_u, o.grad_u_prev});
  return LMF_ACCESS_SWITCH(T, width, VEC, [&] {
    return LMF_BOOL_SWITCH(sh.channels_last, CL, [&] {
      return LMF_INT_SWITCH3(mask, MASK, kMaskNone, kMaskBits, kMaskRecompute, [&] {
        return LMF_BOOL_SWITCH(train_x, TRAIN_X, [&] {
          constexpr int GRAD_X = TRAIN_X ? kGradXTrain : kGradXEval;
          const Geometry g = elementwise_geometry(
              sh, elementwise_unit<T, CL, VEC>(),
              backward_positions<T, CL, VEC, 1 + backward_reads_x<MASK, GRAD_X>()>());
          return LMF_BOOL_SWITCH(o.grad_handoff != nullptr, HANDOFF, [&] {
            return launch_elementwise<
                batch_norm_lm_step_backward_kernel<T, VEC, CL, MASK, GRAD_X, HANDOFF>>(g, stream,
                                                                                      args);
          });
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
  template ReductionScratch bn_scratch_typed<T>(const LMStepShape&);                        \
  template cudaError_t bn_stats_typed<T>(const BatchNormOperands&, cudaStream_t);            \
  template cudaError_t bn_forward_typed<T>(const BatchNormOperands&, cudaStream_t);          \
  template cudaError_t bn_reduce_typed<T>(const BatchNormOperands&, cudaStream_t);           \
  template cudaError_t bn_backward_typed<T>(const BatchNormOperands&, cudaStream_t);         \
  }                                                                                          \
  }
