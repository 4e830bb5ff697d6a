// The LM-step kernels (lm_step.h) over the shared work decomposition (kernel_common.cuh):
//   forward                     elementwise, out = act((1 - k) u + k u_prev + s f + noise)
//   backward                    elementwise: grad_u, grad_u_prev, grad_f
//   backward with grad_k        a reduction: the same gradients, and grad_k's per-channel sums
//                               merged in the same launch (a scalar k: then over channels)
// Included by lm_step_impl.cuh (the typed launchers) and by the kernel tests.
#pragma once

#include "kernel_common.cuh"

namespace lmfused {
namespace detail {

template <typename T>
struct ForwardArgs {
  const T* u;
  const T* u_prev;
  const T* f;
  const acc_t<T>* k;
  const acc_t<T>* scale;
  const int64_t* seed;
  T* out;
  acc_t<T> noise_std;
  bool k_per_channel;
};

template <typename T, int VEC, bool CL, bool HAS_F, bool RELU, bool HAS_NOISE>
__global__ void __launch_bounds__(kBlock, elementwise_blocks_per_sm<T>())
    lm_step_forward_kernel(const ForwardArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  constexpr int UW = elementwise_unit<T, CL, VEC>();
  constexpr int U = elementwise_positions<T, UW, HAS_F ? 3 : 2, HAS_NOISE ? 1 : 4>();
  constexpr int SUB = UW / VEC;
  __shared__ A coef_smem[CL ? kMaxColUnits * UW : 1];
  PackNoise<HAS_NOISE, VEC> noise(a.seed);
  Coefs<CL, 1, UW, A> kc;
  auto load_k = [&](int64_t group) {
    kc.load(g, group, coef_smem, [&](int, int64_t c) { return a.k[a.k_per_channel ? c : 0]; });
  };
  elementwise_tiles<CL, UW, U>(g, load_k, [&](const Pos (&p)[U]) {
    Pack<T, VEC> pu[U][SUB], pp[U][SUB], pf[U][SUB];
    auto load = [&](int i, int q) {
      const int64_t off = p[i].off + q * VEC;
      pu[i][q] = load_pack<T, VEC>(a.u, off);
      pp[i][q] = load_pack<T, VEC>(a.u_prev, off);
      if constexpr (HAS_F) pf[i][q] = load_pack<T, VEC>(a.f, off);
    };
    constexpr bool kPreload = preload_step<T, U, SUB, VEC, HAS_F ? 3 : 2>();
    preload_packs<SUB, VEC, kPreload>(p, load);
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (!p[i].ok) continue;
      const A s = HAS_F ? sample_scale(a.scale, p[i].n) : A(1);  // s multiplies f only
      live_packs<SUB, VEC, kPreload>(p[i], i, load, [&](int q) {
        const int64_t off = p[i].off + q * VEC;
        Pack<T, VEC> po;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A kk = kc.get(0, q * VEC + j);
          A x = (A(1) - kk) * to_acc(pu[i][q].v[j]) + kk * to_acc(pp[i][q].v[j]);
          if constexpr (HAS_F) x += s * to_acc(pf[i][q].v[j]);
          if constexpr (HAS_NOISE) x += noise.at(off, j, a.noise_std);
          if constexpr (RELU) x = x < A(0) ? A(0) : x;  // keeps NaN, like torch.relu
          po.v[j] = from_acc<T>(x);
        }
        store_pack<T, VEC>(a.out, off, po);
      });
    }
  });
}

template <typename T>
struct BackwardArgs {
  const T* grad_out;
  const T* grad_shortcut;  // added into grad_u unmasked; nullptr: none
  const T* u;
  const T* u_prev;
  const T* out;
  const acc_t<T>* k;
  const acc_t<T>* scale;
  T* grad_u;
  T* grad_u_prev;
  T* grad_f;
  acc_t<T>* grad_k;  // k_numel values
  MergeScratch<acc_t<T>> merge;
  bool k_per_channel;
};

// One step of the backward: U positions of UW-element units, VEC-wide accesses. Writes the
// requested gradients (those whose pointers are set: runtime flags, uniform over the grid; each
// adds a store, no arithmetic worth a specialisation) and (NEED_K) adds each element's g * (u_prev - u) to acc[element of the
// unit] (NA == UW) or to acc[0] (NA == 1), in position and element order (the reduction's order:
// independent of VEC).
template <typename T, int U, int UW, int VEC, bool RELU, bool NEED_K, int NA, typename KC>
__device__ __forceinline__ void lm_step_backward_step(const BackwardArgs<T>& a, const Pos (&p)[U],
                                                      const KC& kc, bool shortcut,
                                                      acc_t<T> (&acc)[NA]) {
  using A = acc_t<T>;
  constexpr int SUB = UW / VEC;
  Pack<T, VEC> pg[U][SUB], po[U][SUB], pu[U][SUB], pp[U][SUB], ps[U][SUB];
  auto load = [&](int i, int q) {
    const int64_t off = p[i].off + q * VEC;
    pg[i][q] = load_pack<T, VEC>(a.grad_out, off);
    // (With grad_k's two extra tensors the shortcut is read where it is used: registers.)
    if (!NEED_K && shortcut) ps[i][q] = load_pack<T, VEC>(a.grad_shortcut, off);
    if constexpr (RELU) po[i][q] = load_pack<T, VEC>(a.out, off);
    if constexpr (NEED_K) {
      pu[i][q] = load_pack<T, VEC>(a.u, off);
      pp[i][q] = load_pack<T, VEC>(a.u_prev, off);
    }
  };
  constexpr bool kPreload = preload_step<T, U, SUB, VEC, 1 + RELU + 2 * NEED_K>();
  preload_packs<SUB, VEC, kPreload>(p, load);
#pragma unroll
  for (int i = 0; i < U; ++i) {
    if (!p[i].ok) continue;
    live_packs<SUB, VEC, kPreload>(p[i], i, load, [&](int q) {
      const int64_t off = p[i].off + q * VEC;
      // g through the mask, then one gradient at a time (fewer registers live than all at once).
      A gj[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gj[j] = to_acc(pg[i][q].v[j]);
        // As torch.relu's backward: zero where out <= 0 (a NaN output passes g on).
        if constexpr (RELU) gj[j] = to_acc(po[i][q].v[j]) <= A(0) ? A(0) : gj[j];
        if constexpr (NEED_K) {
          acc[NA == 1 ? 0 : q * VEC + j] += gj[j] * (to_acc(pp[i][q].v[j]) - to_acc(pu[i][q].v[j]));
        }
      }
      if (a.grad_u != nullptr) {
        if (NEED_K && shortcut) ps[i][q] = load_pack<T, VEC>(a.grad_shortcut, off);
        Pack<T, VEC> gu;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          // The shortcut's gradient is a gradient of u itself: not masked, one rounding.
          A guj = (A(1) - kc.get(0, q * VEC + j)) * gj[j];
          if (shortcut) guj += to_acc(ps[i][q].v[j]);
          gu.v[j] = from_acc<T>(guj);
        }
        store_pack<T, VEC>(a.grad_u, off, gu);
      }
      if (a.grad_u_prev != nullptr) {
        Pack<T, VEC> gup;
#pragma unroll
        for (int j = 0; j < VEC; ++j) gup.v[j] = from_acc<T>(kc.get(0, q * VEC + j) * gj[j]);
        store_pack<T, VEC>(a.grad_u_prev, off, gup);
      }
      if (a.grad_f != nullptr) {
        const A s = sample_scale(a.scale, p[i].n);  // (only grad_f has the scale)
        Pack<T, VEC> gf;
#pragma unroll
        for (int j = 0; j < VEC; ++j) gf.v[j] = from_acc<T>(s * gj[j]);
        store_pack<T, VEC>(a.grad_f, off, gf);
      }
    });
  }
}

// The backward without grad_k: elementwise.
template <typename T, int VEC, bool CL, bool RELU>
__global__ void __launch_bounds__(kBlock, elementwise_blocks_per_sm<T>())
    lm_step_backward_kernel(const BackwardArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  constexpr int UW = elementwise_unit<T, CL, VEC>();
  constexpr int U = backward_positions<T, CL, VEC, RELU ? 2 : 1>();
  __shared__ A coef_smem[CL ? kMaxColUnits * UW : 1];
  // A runtime (grid-uniform) flag rather than a template one: it only adds one read to grad_u's
  // path, and a template flag would add half again as many backward specialisations.
  const bool shortcut = a.grad_u != nullptr && a.grad_shortcut != nullptr;
  const bool read_k = a.grad_u != nullptr || a.grad_u_prev != nullptr;
  Coefs<CL, 1, UW, A> kc;
  A unused[1];
  auto load_k = [&](int64_t group) {
    if (read_k) {
      kc.load(g, group, coef_smem, [&](int, int64_t c) { return a.k[a.k_per_channel ? c : 0]; });
    }
  };
  elementwise_tiles<CL, UW, U>(g, load_k, [&](const Pos (&p)[U]) {
    lm_step_backward_step<T, U, UW, VEC, RELU, false>(a, p, kc, shortcut, unused);
  });
}

// The backward with grad_k's CTAs per SM: 3 (80 registers), 2 in channels-last with 8-element units
// and relu, whose four tensors and eight accumulators need more registers (its 64 bytes of loads per
// thread still make 32 KB in flight per SM).
template <bool CL, int W, bool RELU>
__host__ __device__ constexpr int grad_k_blocks_per_sm() {
  return CL && W == 8 && RELU ? 2 : kReductionBlocksPerSM;
}

// The backward with grad_k: a reduction (one CTA per item; units of W, the row length's widest
// vector, loaded VEC at a time), its merge in the same launch. smem: kBlock * W values.
template <typename T, int W, int VEC, bool CL, bool RELU>
__global__ void __launch_bounds__(kBlock, grad_k_blocks_per_sm<CL, W, RELU>())
    lm_step_backward_grad_k_kernel(const BackwardArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  __shared__ A smem[kBlock * W];
  __shared__ A coef_smem[CL ? kMaxColUnits * W : 1];
  const bool shortcut = a.grad_u != nullptr && a.grad_shortcut != nullptr;
  const int64_t group = reduction_group(g), chunk = reduction_chunk(g);
  Coefs<CL, 1, W, A> kc;
  kc.load(g, group, coef_smem, [&](int, int64_t c) { return a.k[a.k_per_channel ? c : 0]; });
  constexpr int WA = accumulators<CL, W>();
  A acc[1][WA];
#pragma unroll
  for (int j = 0; j < WA; ++j) acc[0][j] = A(0);
  Cursor<CL, W> cur(g, group, chunk);
  for (int64_t step = 0; step < g.steps; ++step) {
    Pos p[1];
    next_positions(cur, g, p);
    lm_step_backward_step<T, 1, W, VEC, RELU, true>(a, p, kc, shortcut, acc[0]);
  }
  if (!publish_partials<1, WA>(acc, g, group, chunk, a.merge, smem)) return;
  merge_partials<1, W>(g, group, a.merge, smem, [&](int64_t c, const A (&tot)[1]) {
    if (a.k_per_channel) {
      a.grad_k[c] = tot[0];
    } else {
      a.merge.stage[c] = tot[0];
    }
  });
  if (!a.k_per_channel) merge_channels(g, a.merge, smem, a.grad_k);
}

}  // namespace detail
}  // namespace lmfused
