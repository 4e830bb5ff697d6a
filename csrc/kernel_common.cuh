// Device code shared by the LM-step and the batch-norm-fused kernels (no torch headers): element
// types and vector packs, Philox noise, the work decomposition (geometry and cursors), per-channel
// coefficients, the reductions' one-launch fixed-order merge, and the host launch helpers.
//
// Work decomposition. Every kernel walks the 2-D view of lm_step.h: M rows of L elements, each row
// one channel (contiguous) or one position of every channel (channels-last). A thread's unit is
// UW consecutive elements of one row, read and written as UW / VEC vectors of VEC elements (VEC:
// 128-bit, 64-bit or scalar, as the row length and the buffers' alignment allow). A row holds
// B = ceil(L / UW) units; the last one has only L - (B - 1) * UW live elements when UW does not
// divide L. The units (and so the work) are split into items:
//  * contiguous: group = channel c, whose N rows of L form N * B units in (n, b) order; chunk p =
//    units [p * CH, (p + 1) * CH) of them; a CTA's thread t takes units t, t + kBlock, ...
//  * channels-last: group = TX adjacent unit-columns; chunk p = rows [p * CH, (p + 1) * CH); thread
//    (tx, ty) = (t % TX, t / TX) takes unit-column tx of rows ty, ty + TY, ...
// An item is one (group, chunk). Every thread of a CTA runs the same number of steps per item, U
// positions per step (loaded together: U independent loads per tensor in flight), and checks
// each position's validity: the loops stay block-uniform, as barriers and shuffles need.
//
// Elementwise kernels (a grid-stride loop over items, as many CTAs as fit on the device): in
// channels-last UW = VEC and the grid is a multiple of the groups, so a CTA keeps one group for all
// its items (its per-channel coefficients are computed once, into shared memory); in the
// contiguous layout UW = 8 (a unit owns one byte of the 1-bit ReLU mask) and a CTA takes a range
// of channel-major items, so its channel changes a few times at most.
//
// Reductions (one CTA per item, one launch): UW = W, the widest vector that divides L (set by the
// shape alone; loads may be narrower, W / VEC of them per unit), at most kMaxPartials chunks per
// group. Each CTA sums its item in a fixed order, writes its partial sums, and takes its group's
// ticket (an atomic counter, after a release fence); the group's last CTA sums the partials in
// chunk order and finishes the result. The order of every sum depends on the shape alone, never
// on the buffers' alignment, the grid or the order in which CTAs run: bitwise reproducible.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "lm_step.h"

namespace lmfused {
namespace detail {

constexpr int kBlock = 256;         // threads per CTA
constexpr int kMaxColUnits = 32;    // channels-last: unit-columns per CTA (one warp wide)
constexpr int kMinBlocksPerSM = 4;  // caps registers at 64/thread: >= 1024 threads/SM in flight
// Elementwise kernels of T: float64 values take two registers each, so 80 registers/thread and
// 768 threads/SM (its units still hold 48 bytes or more of loads per thread).
template <typename T>
__host__ __device__ constexpr int elementwise_blocks_per_sm() {
  return sizeof(T) == 8 ? 3 : kMinBlocksPerSM;
}
// Reductions hold a unit's accumulators for each sum (channels-last: 8 x 3 for bf16): 80
// registers/thread, 768 threads/SM, each with four or more 128-bit loads in flight.
constexpr int kReductionBlocksPerSM = 3;
constexpr int kElementwiseSteps = 4;      // steps per item of an elementwise kernel
constexpr int64_t kMaxPartials = 128;     // a reduction's chunks per group (partial sums staged)
constexpr int64_t kReductionCtas = 1024;  // channels-last reductions narrow their groups to fill this

// A kernel launch. The kernel tests' CPU emulation (csrc/tests/cuda_emulator.h) defines its own.
#ifndef LMF_LAUNCH
#define LMF_LAUNCH(KERNEL, GRID, BLOCK, STREAM, ...) \
  KERNEL<<<GRID, BLOCK, 0, STREAM>>>(__VA_ARGS__)
#endif

// Expands __VA_ARGS__ (a lambda) twice, with NAME a constexpr bool: flags become template
// parameters at launch, never branches in the inner loop.
#define LMF_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                  \
    if (COND) {                          \
      constexpr bool NAME = true;        \
      return __VA_ARGS__();              \
    } else {                             \
      constexpr bool NAME = false;       \
      return __VA_ARGS__();              \
    }                                    \
  }()

// Expands __VA_ARGS__ (a lambda) three times, with NAME a constexpr int: V0 where VALUE == V0, V1
// where VALUE == V1, else V2 (a mode of three, or a vector width).
#define LMF_INT_SWITCH3(VALUE, NAME, V0, V1, V2, ...) \
  [&] {                                               \
    if ((VALUE) == (V0)) {                            \
      constexpr int NAME = (V0);                      \
      return __VA_ARGS__();                           \
    } else if ((VALUE) == (V1)) {                     \
      constexpr int NAME = (V1);                      \
      return __VA_ARGS__();                           \
    } else {                                          \
      constexpr int NAME = (V2);                      \
      return __VA_ARGS__();                           \
    }                                                 \
  }()

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------
template <typename T>
struct AccType {
  using type = float;  // float, half, bf16 compute in float32
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// VEC elements moved as one access (128-bit for VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p, int64_t off) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p + off);
}

// The 32-bit words of a 64- or 128-bit access.
template <int BYTES>
using RawWords = std::conditional_t<BYTES == 16, uint4, uint2>;

// One global store of a whole 128- or 64-bit vector. Copying the Pack struct instead lets the
// compiler split the store per element or per pair (16- and 32-bit stores: four to eight times
// the store instructions and L2 write requests of the 128-bit loads); tools/check_sass.py checks
// the SASS for it. The words are stored with one PTX st.global.v4/v2.b32, which the compiler
// cannot split; the CPU emulation stores the same words with a plain copy.
__device__ __forceinline__ void store_words(uint4* p, const uint4& w) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z),
               "r"(w.w)
               : "memory");
#else
  *p = w;
#endif
}
__device__ __forceinline__ void store_words(uint2* p, const uint2& w) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y) : "memory");
#else
  *p = w;
#endif
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t off, const Pack<T, VEC>& x) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * VEC;
  if constexpr (kBytes == 16 || kBytes == 8) {
    RawWords<kBytes> w;
    static_assert(sizeof(w) == sizeof(x), "a vector is 8 or 16 bytes");
    memcpy(&w, &x, sizeof(w));  // a bit copy (register moves): packs 16-bit elements in pairs
    store_words(reinterpret_cast<RawWords<kBytes>*>(p + off), w);
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p + off) = x;  // the scalar path: one element
  }
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 normal noise: key = (seed_lo, seed_hi), counter = (q_lo, q_hi, 0, 0) for the group
// q = idx / 4 of four consecutive memory offsets. One Philox call gives the group's four normals:
// Box-Muller on (c0, c1) and on (c2, c3), cos and sin of each (the structure of triton's randn4x);
// element idx takes normal idx % 4. The integers are Philox4x32-10 bit for bit (the kernel tests
// check them against triton.language.random); the normals use the GPU's fast sin/cos and an
// approximate square root, so the values are not bitwise those of another backend: the backends
// agree in distribution, and each reproduces its own noise from the seed (DESIGN.md 1c).
// __host__ too, so the kernel tests can build the reference (with the host's maths library).
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

__host__ __device__ __forceinline__ uint32_t umulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four outputs of Philox4x32-10 for the counter (ctr_lo, ctr_hi, 0, 0); mirrors triton's
// philox_impl round.
__host__ __device__ __forceinline__ void philox_4x(uint32_t k0, uint32_t k1, uint64_t ctr,
                                                  uint32_t (&c)[4]) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = umulhi32(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = umulhi32(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  c[0] = c0;
  c[1] = c1;
  c[2] = c2;
  c[3] = c3;
}

// triton's uint_to_uniform_float for 32-bit inputs: [0, 1].
__host__ __device__ __forceinline__ float philox_uniform(uint32_t x) {
  int32_t i = static_cast<int32_t>(x);
  if (i < 0) i = ~i;  // == -i - 1, keeps the map symmetric without overflow
  return static_cast<float>(i) * 4.6566127342e-10f;
}

// Box-Muller on one pair of integers: two independent N(0, 1) values. The angle is taken in
// [-pi, pi) (the same circle, so the same distribution), where the fast __sincosf is accurate
// (absolute error ~2^-21.4) and has no slow path; r = t * rsqrt(t) is exact at t = 0.
__host__ __device__ __forceinline__ void box_muller(uint32_t a, uint32_t b, float& n0, float& n1) {
  const float u1 = fmaxf(1.0e-7f, philox_uniform(a));
  const float theta = 6.283185307179586f * philox_uniform(b) - 3.141592653589793f;
  const float t = -2.0f * logf(u1);  // >= 0: u1 <= 1
  float s, c;
#ifdef __CUDA_ARCH__
  const float r = t * rsqrtf(fmaxf(t, 1.0e-30f));
  __sincosf(theta, &s, &c);
#else
  const float r = sqrtf(t);
  s = sinf(theta);
  c = cosf(theta);
#endif
  n0 = r * c;
  n1 = r * s;
}

// The normals of the V consecutive memory offsets idx, ..., idx + V - 1 (V = 1, 2 or a multiple of
// 4, idx a multiple of V): one Philox call per group of four, one Box-Muller per pair needed.
template <int V>
__host__ __device__ __forceinline__ void philox_normals(uint32_t k0, uint32_t k1, uint64_t idx,
                                                       float (&n)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      uint32_t c[4];
      philox_4x(k0, k1, (idx >> 2) + q, c);
      box_muller(c[0], c[1], n[4 * q], n[4 * q + 1]);
      box_muller(c[2], c[3], n[4 * q + 2], n[4 * q + 3]);
    }
  } else {
    static_assert(V == 1 || V == 2, "V: 1, 2 or a multiple of 4");
    uint32_t c[4];
    philox_4x(k0, k1, idx >> 2, c);
    const bool high = (idx & 2) != 0;  // normals 2, 3 of the group: the second pair
    float a, b;
    box_muller(high ? c[2] : c[0], high ? c[3] : c[1], a, b);
    if constexpr (V == 2) {
      n[0] = a;
      n[1] = b;
    } else {
      n[0] = (idx & 1) != 0 ? b : a;
    }
  }
}

// The normal of memory offset idx (the kernel tests' reference).
__host__ __device__ __forceinline__ float philox_normal(uint32_t k0, uint32_t k1, uint64_t idx) {
  float n[1];
  philox_normals<1>(k0, k1, idx, n);
  return n[0];
}

// The noise of an elementwise forward, a pack of VEC elements at a time: the key from the seed (read
// on device: graph-capturable), then at(off, j, std) = std times element off + j's normal, for
// j = 0, 1, ... in order (one Philox call draws the normals of G elements at j % G == 0).
template <bool HAS_NOISE, int VEC>
struct PackNoise {
  static constexpr int G = VEC % 4 == 0 ? 4 : VEC;  // normals per Philox call used here
  uint32_t key0 = 0, key1 = 0;
  float xi[G];
  __device__ __forceinline__ explicit PackNoise(const int64_t* seed) {
    if constexpr (HAS_NOISE) {
      const uint64_t s = static_cast<uint64_t>(*seed);
      key0 = static_cast<uint32_t>(s);
      key1 = static_cast<uint32_t>(s >> 32);
    }
  }
  template <typename A>
  __device__ __forceinline__ A at(int64_t off, int j, A noise_std) {
    if (j % G == 0) philox_normals<G>(key0, key1, static_cast<uint64_t>(off + j), xi);
    return noise_std * static_cast<A>(xi[j % G]);
  }
};


// ---------------------------------------------------------------------------------------------
// Division by a divisor fixed at launch
// ---------------------------------------------------------------------------------------------
// n / d for 0 <= n < 2^63 as a multiply-high and a shift (Granlund & Montgomery, "Division by
// invariant integers using multiplication", 1994): m = ceil(2^(63 + l) / d), l = ceil(log2 d),
// then n / d = umulhi(n, m) >> (l - 1), exact because m * d - 2^(63 + l) < d <= 2^l. The kernels
// divide 64-bit indices by the geometry's sizes this way: a 64-bit division is a call to a slow
// routine, whose calling convention gives the kernel a stack frame (local memory).
struct FastDiv {
  uint64_t m;
  int shift;
  int64_t d;
};

inline FastDiv make_fast_div(int64_t d) {
  FastDiv f{0, 0, d};
  if (d <= 1) return f;  // 1: the identity
  int l = 0;
  while ((int64_t{1} << l) < d) ++l;
  const unsigned __int128 num = static_cast<unsigned __int128>(1) << (63 + l);
  f.m = static_cast<uint64_t>((num + static_cast<uint64_t>(d) - 1) / static_cast<uint64_t>(d));
  f.shift = l - 1;
  return f;
}

__host__ __device__ __forceinline__ uint64_t umulhi64(uint64_t a, uint64_t b) {
#ifdef __CUDA_ARCH__
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

__host__ __device__ __forceinline__ int64_t operator/(int64_t n, const FastDiv& f) {
  return f.d == 1 ? n : static_cast<int64_t>(umulhi64(static_cast<uint64_t>(n), f.m) >> f.shift);
}

// ---------------------------------------------------------------------------------------------
// Work decomposition (see the top): host-built Geometry, passed by value to the kernels
// ---------------------------------------------------------------------------------------------
struct Geometry {
  int64_t N, C, S;    // batch, channels, prod(spatial)
  int64_t M, L;       // rows x row length of the 2-D view
  int64_t B;          // units per row: ceil(L / UW)
  int64_t Bm;         // bytes per row of the 1-bit mask: ceil(L / 8)
  int64_t G, P, CH;   // groups, chunks per group, units (contiguous) or rows (channels-last) per chunk
  int64_t steps;      // steps per item (U positions each)
  int64_t step_q, step_r;  // a thread's stride (kBlock units | TY rows) divmod (B | S)
  int TX, TY;         // channels-last: unit-columns per CTA (a power of two), thread rows
  int uw, U;          // the kernel's UW and U (host-side copies)
  bool cl;
  int64_t items_per_cta;  // contiguous elementwise kernels: a CTA's range of items (set at launch)
  FastDiv by_B, by_S, by_G, by_P;
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

inline Geometry base_geometry(const LMStepShape& sh, int uw, int positions) {
  Geometry g{};
  g.N = sh.N;
  g.C = sh.C;
  g.S = sh.S;
  g.cl = sh.channels_last;
  g.uw = uw;
  g.U = positions;
  if (sh.N <= 0 || sh.C <= 0 || sh.S <= 0) return g;  // empty: nothing to launch
  g.M = g.cl ? sh.N * sh.S : sh.N * sh.C;
  g.L = g.cl ? sh.C : sh.S;
  g.B = ceil_div(g.L, uw);
  g.Bm = ceil_div(g.L, 8);
  g.by_B = make_fast_div(g.B);
  g.by_S = make_fast_div(g.S);
  return g;
}

// Channels-last: TX unit-columns per CTA.
inline void split_columns(Geometry& g, int tx) {
  g.TX = tx;
  g.TY = kBlock / tx;
  g.G = ceil_div(g.B, tx);
  g.step_q = g.TY / g.S;
  g.step_r = g.TY % g.S;
}

// At most `chunks` chunks per group, each a whole number of steps.
inline void split_chunks(Geometry& g, int64_t chunks) {
  const int64_t total = g.cl ? g.M : g.N * g.B;  // rows | units of a group
  const int64_t per_step = (g.cl ? g.TY : kBlock) * static_cast<int64_t>(g.U);
  const int64_t most = ceil_div(total, per_step);
  chunks = chunks < 1 ? 1 : chunks > most ? most : chunks;
  g.CH = ceil_div(ceil_div(total, chunks), per_step) * per_step;
  g.P = ceil_div(total, g.CH);
  g.steps = g.CH / per_step;
  if (!g.cl) {
    g.G = g.C;
    g.step_q = kBlock / g.B;
    g.step_r = kBlock % g.B;
  }
  g.by_G = make_fast_div(g.G);
  g.by_P = make_fast_div(g.P);
}

// Elementwise kernels: units of uw elements (lanes_per_byte adjacent lanes share a mask byte in
// channels-last, so TX is a multiple of it), kElementwiseSteps steps per item.
inline Geometry elementwise_geometry(const LMStepShape& sh, int uw, int positions) {
  Geometry g = base_geometry(sh, uw, positions);
  if (g.L == 0) return g;
  if (g.cl) split_columns(g, pow2_at_least(g.B < 8 / uw ? 8 / uw : g.B, kMaxColUnits));
  const int64_t total = g.cl ? g.M : g.N * g.B;
  const int64_t per_step = (g.cl ? g.TY : kBlock) * static_cast<int64_t>(positions);
  split_chunks(g, ceil_div(total, per_step * kElementwiseSteps));
  return g;
}

// Reductions: units of w elements (w divides L). Channels-last groups narrow (down to 32 bytes of
// a row) until the groups times kMaxPartials reach kReductionCtas, so small C still fills the device.
inline Geometry reduction_geometry(const LMStepShape& sh, int w, int positions, int elem_bytes) {
  Geometry g = base_geometry(sh, w, positions);
  if (g.L == 0) return g;
  if (g.cl) {
    int tx = pow2_at_least(g.B, kMaxColUnits);
    while (tx > 1 && ceil_div(g.B, tx) * kMaxPartials < kReductionCtas &&
           (tx / 2) * w * elem_bytes >= 32)
      tx /= 2;
    split_columns(g, tx);
    split_chunks(g, ceil_div(g.M, static_cast<int64_t>(g.TY) * positions * 2));
  } else {
    split_chunks(g, ceil_div(g.N * g.B, static_cast<int64_t>(kBlock) * positions * 2));
  }
  if (g.P > kMaxPartials) split_chunks(g, kMaxPartials);
  return g;
}

// One position of a thread's walk: the unit's memory offset, its sample n, the row column of its
// first element, the mask byte that holds that element, its live elements, and whether it exists.
struct Pos {
  int64_t off, n, col, mbyte;
  int live;
  bool ok;
};

template <int UW>
struct ContigCursor {
  int64_t c, v, vend, n, b;
  __device__ __forceinline__ ContigCursor(const Geometry& g, int64_t group, int64_t chunk) {
    c = group;
    const int64_t start = chunk * g.CH, total = g.N * g.B;
    v = start + threadIdx.x;
    vend = start + g.CH < total ? start + g.CH : total;
    n = v / g.by_B;
    b = v - n * g.B;
  }
  __device__ __forceinline__ Pos pos(const Geometry& g) const {
    Pos p;
    p.ok = v < vend;
    p.n = n;
    p.col = b * UW;
    const int64_t row = n * g.C + c;
    p.off = row * g.L + p.col;
    p.mbyte = row * g.Bm + (p.col >> 3);
    const int64_t rest = g.L - p.col;
    p.live = rest < UW ? static_cast<int>(rest) : UW;
    return p;
  }
  __device__ __forceinline__ void next(const Geometry& g) {
    v += kBlock;
    b += g.step_r;
    n += g.step_q;
    if (b >= g.B) {
      b -= g.B;
      ++n;
    }
  }
};

template <int UW>
struct ChannelsLastCursor {
  int64_t r, rend, n, rem, col;
  bool active;
  __device__ __forceinline__ ChannelsLastCursor(const Geometry& g, int64_t group, int64_t chunk) {
    const int tx = static_cast<int>(threadIdx.x) % g.TX;
    const int ty = static_cast<int>(threadIdx.x) / g.TX;
    const int64_t uc = group * g.TX + tx;
    active = uc < g.B;  // the last group's leftover columns idle
    col = uc * UW;
    r = chunk * g.CH + ty;
    rend = chunk * g.CH + g.CH < g.M ? chunk * g.CH + g.CH : g.M;
    n = r / g.by_S;
    rem = r - n * g.S;
  }
  __device__ __forceinline__ Pos pos(const Geometry& g) const {
    Pos p;
    p.ok = active && r < rend;
    p.n = n;
    p.col = col;
    p.off = r * g.L + col;
    p.mbyte = r * g.Bm + (col >> 3);
    const int64_t rest = g.L - col;
    p.live = rest < UW ? static_cast<int>(rest) : UW;
    return p;
  }
  __device__ __forceinline__ void next(const Geometry& g) {
    r += g.TY;
    rem += g.step_r;
    n += g.step_q;
    if (rem >= g.S) {
      rem -= g.S;
      ++n;
    }
  }
};

template <bool CL, int UW>
using Cursor = std::conditional_t<CL, ChannelsLastCursor<UW>, ContigCursor<UW>>;

// The next U positions of a cursor (it moves past them).
template <int U, typename Cur>
__device__ __forceinline__ void next_positions(Cur& cur, const Geometry& g, Pos (&p)[U]) {
#pragma unroll
  for (int i = 0; i < U; ++i) {
    p[i] = cur.pos(g);
    cur.next(g);
  }
}

// Elementwise kernels: channels-last units are one vector; contiguous units are 8 elements, so that
// a unit owns one byte of the 1-bit mask (BYTES: the kernel writes it), whatever the dtype; float64
// ones are 2 elements (one 128-bit vector) unless BYTES: eight doubles of each tensor would hold
// more registers than the kernels have.
template <typename T, bool CL, int VEC, bool BYTES = false>
__host__ __device__ constexpr int elementwise_unit() {
  return CL ? VEC : BYTES || sizeof(T) < 8 ? 8 : 2;
}
// Positions per step of an elementwise kernel with units of UW elements that reads TENSORS
// activation tensors: enough for 32 bytes of loads in flight per thread (32 KB per SM at 1024
// threads), at most MOST.
template <typename T, int UW, int TENSORS, int MOST = 4>
__host__ __device__ constexpr int elementwise_positions() {
  const int bytes = TENSORS * UW * static_cast<int>(sizeof(T));
  int u = 1;
  while (u < MOST && u * bytes < 32) u *= 2;
  return u;
}
// A backward kernel's positions: one (it holds more values per position than a forward; it reads
// 32 bytes per thread or more on the 128-bit paths whenever it reads two tensors), two on the
// channels-last scalar path.
template <typename T, bool CL, int VEC, int TENSORS>
__host__ __device__ constexpr int backward_positions() {
  return elementwise_positions<T, elementwise_unit<T, CL, VEC>(), TENSORS, CL && VEC == 1 ? 2 : 1>();
}

// Whether a step loads all its U positions' SUB sub-vectors of TENSORS tensors before computing
// (up to 64 bytes per thread), or each sub-vector just before its use: wide units (fp32, fp64 in
// the contiguous layout) would otherwise hold more registers than the kernels have.
template <typename T, int U, int SUB, int VEC, int TENSORS>
__host__ __device__ constexpr bool preload_step() {
  return SUB == 1 || U * SUB * TENSORS * VEC * static_cast<int>(sizeof(T)) <= 64;
}

// Sub-vector q of a unit exists (the first always does: live >= VEC).
template <int VEC>
__device__ __forceinline__ bool sub_live(int q, int live) {
  return q == 0 || q * VEC < live;
}

// The items of this CTA: channels-last, every grid-th item, chunk-major (item = chunk * G +
// group), so with a grid that is a multiple of G the CTA's group never changes; contiguous, a
// range of items_per_cta channel-major items (item = c * P + p), so its channel changes a few
// times at most.
struct ItemRange {
  int64_t begin, end, stride;
};
__device__ __forceinline__ ItemRange cta_items(const Geometry& g) {
  const int64_t items = g.G * g.P;
  if (g.cl) return {static_cast<int64_t>(blockIdx.x), items, static_cast<int64_t>(gridDim.x)};
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * g.items_per_cta;
  return {begin, begin + g.items_per_cta < items ? begin + g.items_per_cta : items, 1};
}
__device__ __forceinline__ int64_t item_group(const Geometry& g, int64_t item) {
  return g.cl ? item - (item / g.by_G) * g.G : item / g.by_P;
}
__device__ __forceinline__ int64_t item_chunk(const Geometry& g, int64_t item) {
  return g.cl ? item / g.by_G : item - (item / g.by_P) * g.P;
}
// A reduction's CTA is one item: channels-last group-major (CTAs that run together cover whole
// rows), contiguous chunk-major (they walk one channel's memory in order).
__device__ __forceinline__ int64_t reduction_group(const Geometry& g) {
  return g.cl ? item_group(g, blockIdx.x) : static_cast<int64_t>(blockIdx.x) / g.by_P;
}
__device__ __forceinline__ int64_t reduction_chunk(const Geometry& g) {
  return g.cl ? item_chunk(g, blockIdx.x)
              : static_cast<int64_t>(blockIdx.x) - (static_cast<int64_t>(blockIdx.x) / g.by_P) * g.P;
}

// ---------------------------------------------------------------------------------------------
// Tile loops: how the elementwise kernels of both op families walk their positions
// ---------------------------------------------------------------------------------------------
// An elementwise kernel: this CTA's items (cta_items); on_group(group) when an item's group is not
// the previous item's (the kernel loads the group's coefficients there), then on_step(p) for each
// step's U positions of UW-element units.
template <bool CL, int UW, int U, typename OnGroup, typename OnStep>
__device__ __forceinline__ void elementwise_tiles(const Geometry& g, OnGroup&& on_group,
                                                  OnStep&& on_step) {
  const ItemRange items = cta_items(g);
  int64_t loaded = -1;
  for (int64_t item = items.begin; item < items.end; item += items.stride) {
    const int64_t group = item_group(g, item);
    if (group != loaded) {
      on_group(group);
      loaded = group;
    }
    Cursor<CL, UW> cur(g, group, item_chunk(g, item));
    for (int64_t step = 0; step < g.steps; ++step) {
      Pos p[U];
      next_positions(cur, g, p);
      on_step(p);
    }
  }
}

// An elementwise step's loads, load(i, q) for sub-vector q of position i: with PRELOAD
// (preload_step) all of them here, before any use; otherwise none, and live_packs issues each just
// before its use.
template <int SUB, int VEC, bool PRELOAD, int U, typename Load>
__device__ __forceinline__ void preload_packs(const Pos (&p)[U], Load&& load) {
  if constexpr (PRELOAD) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
#pragma unroll
      for (int q = 0; q < SUB; ++q) {
        if (p[i].ok && sub_live<VEC>(q, p[i].live)) load(i, q);
      }
    }
  }
}

// body(q) for each live sub-vector q of position i (valid: p.ok), after its load(i, q) when the
// step did not preload.
template <int SUB, int VEC, bool PRELOAD, typename Load, typename Body>
__device__ __forceinline__ void live_packs(const Pos& p, int i, Load&& load, Body&& body) {
#pragma unroll
  for (int q = 0; q < SUB; ++q) {
    if (!sub_live<VEC>(q, p.live)) break;
    if constexpr (!PRELOAD) load(i, q);
    body(q);
  }
}

// ---------------------------------------------------------------------------------------------
// Per-channel coefficients
// ---------------------------------------------------------------------------------------------
// NC values per channel, coef(q, c) for q < NC, computed once per group: channels-last, for the
// CTA's TX * UW channels into shared memory (NC * kMaxColUnits * UW values; one barrier; a CTA
// keeps its group), read per element; contiguous, NC scalars of the item's channel in registers.
template <bool CL, int NC, int UW, typename A>
struct Coefs;

template <int NC, int UW, typename A>
struct Coefs<true, NC, UW, A> {
  // Read through a volatile pointer: each use is a shared-memory load at its point of use, so the
  // compiler cannot hoist the NC * UW values out of the row loop into registers (their whole point
  // is not to hold registers across the loop, where they would spill).
  // Stored [q][j][column] with a pitch of kMaxColUnits: for one (q, j) the lanes of a warp, which
  // hold consecutive columns, read consecutive words (one wavefront, no bank conflict). Stored
  // [q][column][j], lanes UW words apart shared banks and every load was replayed up to UW times:
  // on an H200 the channels-last batch-norm kernels then spent their time in shared memory.
  static constexpr int kPitch = kMaxColUnits;
  const volatile A* s = nullptr;
  template <typename F>
  __device__ __forceinline__ void load(const Geometry& g, int64_t group, A* smem, F&& coef) {
    const int64_t first = group * g.TX * UW;  // the group's first channel
    __syncthreads();  // readers of a previous fill are done
    for (int i = threadIdx.x; i < NC * UW * kPitch; i += kBlock) {
      const int q = i / (UW * kPitch), j = i / kPitch % UW, column = i % kPitch;
      const int64_t c = first + column * UW + j;
      smem[i] = column < g.TX && c < g.L ? coef(q, c) : A(0);
    }
    __syncthreads();
    s = smem + static_cast<int>(threadIdx.x) % g.TX;
  }
  __device__ __forceinline__ A get(int q, int j) const { return s[(q * UW + j) * kPitch]; }
};

template <int NC, int UW, typename A>
struct Coefs<false, NC, UW, A> {
  A v[NC];
  template <typename F>
  __device__ __forceinline__ void load(const Geometry&, int64_t c, A*, F&& coef) {
#pragma unroll
    for (int q = 0; q < NC; ++q) v[q] = coef(q, c);
  }
  __device__ __forceinline__ A get(int q, int) const { return v[q]; }
};

// ---------------------------------------------------------------------------------------------
// The 1-bit ReLU mask: over the 2-D view, row-major, Bm = ceil(L / 8) bytes per row; bit j % 8
// of byte [r, j / 8] is 1 where the gradient passes at (r, j); padding bits 0.
// ---------------------------------------------------------------------------------------------
// Stores a unit's bits (bit j: element j). A byte holds 8 / UW units: with UW < 8 (channels-last)
// they belong to 8 / UW adjacent lanes of one warp (TX is a multiple of that, and a group starts
// on a byte), which OR their bits by shuffles, and the first of them stores the byte. Every lane
// of the CTA calls this at the same point (valid = false: no bits, no store).
template <int UW>
__device__ __forceinline__ void store_mask(uint8_t* __restrict__ mask, const Pos& p, unsigned bits,
                                           bool valid) {
  unsigned v = valid ? bits << (p.col & 7) : 0u;
  if constexpr (UW < 8) {
#pragma unroll
    for (int d = 1; d < 8 / UW; d *= 2) v |= __shfl_xor_sync(0xffffffffu, v, d);
  }
  if (valid && (p.col & 7) == 0) mask[p.mbyte] = static_cast<uint8_t>(v);
}

// A unit's UW bits (UW divides 8 and the unit starts on a multiple of UW: one byte holds them).
template <int UW>
__device__ __forceinline__ unsigned load_mask(const uint8_t* __restrict__ mask, const Pos& p) {
  return (static_cast<unsigned>(mask[p.mbyte]) >> (p.col & 7)) & ((1u << UW) - 1u);
}

// ---------------------------------------------------------------------------------------------
// Reductions: block sums, partial sums, tickets and the fixed-order merge
// ---------------------------------------------------------------------------------------------
// Deterministic block sum (fixed shuffle tree, then warp sums in order); result in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // earlier readers of smem are done
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  A s = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kBlock / 32; ++w) s += smem[w];
  }
  return s;
}

// The merge's scratch: partial sums (NS sums x C channels x P chunks, see partial_index), one
// ticket counter per group plus one (zero at launch; each last CTA puts its counter back to zero),
// and C staged values for a scalar total over channels.
template <typename A>
struct MergeScratch {
  A* partials;
  unsigned* counters;
  A* stage;
};

// Values and counters a reduction over g needs (NS sums; `scalar`: a total over channels too).
inline int64_t merge_values(const Geometry& g, int sums, bool scalar) {
  return sums * g.C * g.P + (scalar ? g.C : 0);
}
inline int64_t merge_counters(const Geometry& g) { return g.G + 1; }

__host__ __device__ inline int64_t partial_index(const Geometry& g, int s, int64_t c, int64_t p) {
  return s * g.C * g.P + (g.cl ? p * g.C + c : c * g.P + p);
}

// A reduction thread's accumulators per sum: one per element of its unit in channels-last (W
// channels), one in all in the contiguous layout (a unit is one channel; its elements are added
// in order, so the order still depends on the shape alone).
template <bool CL, int W>
__host__ __device__ constexpr int accumulators() {
  return CL ? W : 1;
}

// Takes one of `count` tickets of *counter after a release fence; true (in every thread) in the
// CTA that takes the last one. count == 1: no atomic, always last.
__device__ __forceinline__ bool take_ticket(unsigned* counter, int64_t count) {
  __shared__ unsigned last;
  if (count == 1) return true;
  __threadfence();  // this CTA's writes are visible device-wide before its ticket
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == static_cast<unsigned>(count - 1);
  __syncthreads();
  const bool is_last = last != 0;
  if (is_last) __threadfence();  // acquire: the other CTAs' writes (read through L2 below)
  return is_last;
}

// Writes this CTA's partial sums of its item (each thread's W accumulators per sum, see
// accumulators(); contiguous: all one channel, one block sum; channels-last: one sum per column
// over the thread rows in order), then takes its group's ticket. smem: kBlock * W values.
template <int NS, int W, typename A>
__device__ __forceinline__ bool publish_partials(const A (&acc)[NS][W], const Geometry& g,
                                                 int64_t group, int64_t chunk,
                                                 const MergeScratch<A>& m, A* smem) {
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (!g.cl) {
      A t = 0;
#pragma unroll
      for (int j = 0; j < W; ++j) t += acc[s][j];
      t = block_sum(t, smem);
      if (threadIdx.x == 0) m.partials[partial_index(g, s, group, chunk)] = t;
    } else {
      const int width = g.TX * W;
      __syncthreads();
#pragma unroll
      for (int j = 0; j < W; ++j) smem[threadIdx.x * W + j] = acc[s][j];  // [ty][tx * W + j]
      __syncthreads();
      const int64_t c = group * width + threadIdx.x;
      if (static_cast<int>(threadIdx.x) < width && c < g.L) {
        A t = 0;
        for (int ty = 0; ty < g.TY; ++ty) t += smem[ty * width + threadIdx.x];
        m.partials[partial_index(g, s, c, chunk)] = t;
      }
    }
  }
  return take_ticket(&m.counters[group], g.P);
}

// The group's totals over its P chunks, in chunk order (the last CTA, after publish_partials):
// finish(c, tot) once per channel c of the group, by one thread (contiguous: thread 0; channels-
// last: thread i for the group's i-th channel, which then lie in a row: one per thread). Puts the
// group's counter back to zero.
template <int NS, int W, typename A, typename F>
__device__ __forceinline__ void merge_partials(const Geometry& g, int64_t group,
                                               const MergeScratch<A>& m, A* smem, F&& finish) {
  A tot[NS];
  if (!g.cl) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const A v = threadIdx.x < g.P ? __ldcg(m.partials + partial_index(g, s, group, threadIdx.x))
                                    : A(0);
      tot[s] = block_sum(v, smem);  // P <= kMaxPartials <= kBlock: one value per thread
    }
    if (threadIdx.x == 0) finish(group, tot);
  } else {
    // Column i of the group summed by `phases` threads over chunks i, i + phases, ..., then
    // the phases in order.
    const int width = g.TX * W, phases = kBlock / width;
    const int col = static_cast<int>(threadIdx.x) % width, phase = static_cast<int>(threadIdx.x) / width;
    const int64_t c = group * width + col;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      A v = 0;
      if (c < g.L) {
#pragma unroll 4
        for (int64_t p = phase; p < g.P; p += phases) v += __ldcg(m.partials + partial_index(g, s, c, p));
      }
      __syncthreads();
      smem[threadIdx.x] = v;
      __syncthreads();
      tot[s] = 0;
      if (static_cast<int>(threadIdx.x) < width) {
        for (int q = 0; q < phases; ++q) tot[s] += smem[q * width + threadIdx.x];
      }
    }
    if (static_cast<int>(threadIdx.x) < width && c < g.L) finish(c, tot);
  }
  if (threadIdx.x == 0 && g.P > 1) m.counters[group] = 0u;  // ready for the next launch
}

// A total over channels: every group's last CTA has staged its channels' values (m.stage[c]) and
// calls this; the last of them sums the C staged values in channel order into *out.
template <typename A>
__device__ __forceinline__ void merge_channels(const Geometry& g, const MergeScratch<A>& m, A* smem,
                                               A* __restrict__ out) {
  if (!take_ticket(&m.counters[g.G], g.G)) return;
  A v = 0;
  for (int64_t c = threadIdx.x; c < g.C; c += kBlock) v += __ldcg(m.stage + c);
  v = block_sum(v, smem);
  if (threadIdx.x == 0) {
    *out = v;
    if (g.G > 1) m.counters[g.G] = 0u;
  }
}

// The sample's stochastic-depth scale s (nullptr: 1). A run-time flag, not a template one: s = 1
// multiplies exactly, so the result is the same bits as without it.
template <typename A>
__device__ __forceinline__ A sample_scale(const A* __restrict__ scale, int64_t n) {
  return scale != nullptr ? scale[n] : A(1);
}

// ---------------------------------------------------------------------------------------------
// Host launch helpers
// ---------------------------------------------------------------------------------------------
template <typename T>
constexpr int max_vec() {
  return static_cast<int>(16 / sizeof(T));
}

// The vector width (elements per access) for rows of L elements: 128-bit, else 64-bit, else
// scalar, the widest that divides L and that every given buffer (nullptr = unused) is aligned to.
// Only these three widths are compiled, to bound the number of kernel specialisations (and of
// them, for accesses, only max_access_vec's: LMF_ACCESS_SWITCH).
template <typename T>
inline int vector_width(int64_t L, std::initializer_list<const void*> buffers) {
  for (int vec = max_vec<T>(); vec >= max_vec<T>() / 2 && vec > 1; vec /= 2) {
    bool ok = L % vec == 0;
    for (const void* p : buffers) {
      ok = ok && (p == nullptr || reinterpret_cast<uintptr_t>(p) % (vec * sizeof(T)) == 0);
    }
    if (ok) return vec;
  }
  return 1;
}

// Expands __VA_ARGS__ (a lambda) with NAME a constexpr int equal to WIDTH, one of the widths
// vector_width<T> returns.
#define LMF_VEC_SWITCH(T, WIDTH, NAME, ...)                                    \
  LMF_INT_SWITCH3(WIDTH, NAME, ::lmfused::detail::max_vec<T>(),                \
                  ::lmfused::detail::max_vec<T>() / 2, 1, __VA_ARGS__)

// The widest access the kernels are compiled for, in elements: 128 bits, except for float64, whose
// kernels load and store one element at a time (float64 serves gradient checks, not speed: one access
// width instead of two halves its kernels). A reduction's unit W, which sets its sums' order, is
// max_vec wide for every dtype.
template <typename T>
constexpr int max_access_vec() {
  return sizeof(T) == 8 ? 1 : max_vec<T>();
}

// LMF_VEC_SWITCH for an access width (vector_width with the buffers): NAME is 1 where
// max_access_vec is.
#define LMF_ACCESS_SWITCH(T, WIDTH, NAME, ...)                   \
  [&] {                                                          \
    if constexpr (::lmfused::detail::max_access_vec<T>() == 1) { \
      constexpr int NAME = 1;                                    \
      return __VA_ARGS__();                                      \
    } else {                                                     \
      return LMF_VEC_SWITCH(T, WIDTH, NAME, __VA_ARGS__);        \
    }                                                            \
  }()

// Launches KERNEL<..., W, VEC, ...> (a reduction) for the row length's W and the buffers' VEC:
// the lambda gets both as integral constants.
template <typename T, typename F>
cudaError_t with_reduction_widths(int64_t row_length, std::initializer_list<const void*> bufs,
                                  F&& launch) {
  const int wide = vector_width<T>(row_length, {});
  const int width = vector_width<T>(row_length, bufs);  // <= wide, and divides it
  return LMF_VEC_SWITCH(T, wide, W, [&] {
    return LMF_ACCESS_SWITCH(T, width, VEC, [&] {
      if constexpr (VEC > W) {
        return cudaErrorInvalidValue;  // unreachable: width <= wide
      } else {
        return launch(std::integral_constant<int, W>{}, std::integral_constant<int, VEC>{});
      }
    });
  });
}

// Blocks of `kernel` that fit on the device at once (SM count x occupancy). The occupancy query
// costs microseconds of host time and its answer is fixed per kernel and device: cached. While a
// launch log is recording (no CUDA call may be made) a nominal 132 SMs x kMinBlocksPerSM.
inline cudaError_t resident_blocks(const void* kernel, int64_t& resident) {
  if (launch_log() != nullptr) {
    resident = 132 * kMinBlocksPerSM;
    return cudaSuccess;
  }
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  const auto hit = cache.find(key);
  if (hit != cache.end()) {
    resident = hit->second;
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0);
  if (err != cudaSuccess) return err;
  resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  cache.emplace(key, resident);
  return cudaSuccess;
}

// The kernel's name with its template arguments, from the compiler's signature of this function.
template <auto Kernel>
const char* kernel_name() {
  static const std::string name = [] {
    std::string s = __PRETTY_FUNCTION__;
    size_t at = s.find("Kernel = ");  // g++: "... [with auto Kernel = k<...>]"
    if (at != std::string::npos) {
      s = s.substr(at + 9);
      s = s.substr(0, s.find_first_of(";]"));
    } else if ((at = s.find("kernel_name<")) != std::string::npos) {  // "kernel_name<k<...> >()"
      s = s.substr(at + 12);
      int depth = 0;
      size_t end = 0;
      while (end < s.size() && (depth > 0 || s[end] != '>')) {
        depth += s[end] == '<' ? 1 : s[end] == '>' ? -1 : 0;
        ++end;
      }
      s = s.substr(0, end);
    }
    for (const char* prefix : {"&", "lmfused::detail::"}) {
      if (s.rfind(prefix, 0) == 0) s = s.substr(std::strlen(prefix));
    }
    while (!s.empty() && s.back() == ' ') s.pop_back();
    return s;
  }();
  return name.c_str();
}

// Every kernel launch goes through here: recorded instead while a launch log is installed.
template <auto Kernel, typename... Args>
cudaError_t launch_kernel(int64_t grid, cudaStream_t stream, const Args&... args) {
  if (std::vector<std::string>* log = launch_log()) {
    log->emplace_back(kernel_name<Kernel>());
    return cudaSuccess;
  }
  if (grid <= 0) return cudaSuccess;
  LMF_LAUNCH(Kernel, static_cast<unsigned>(grid), kBlock, stream, args...);
  return cudaGetLastError();
}

// An elementwise kernel: as many CTAs as fit at once, at most one per item; in channels-last a
// multiple of the groups (each CTA keeps one group, see cta_items).
template <auto Kernel, typename Args>
cudaError_t launch_elementwise(const Geometry& g, cudaStream_t stream, const Args& args) {
  int64_t resident = 0;
  const cudaError_t err = resident_blocks(reinterpret_cast<const void*>(Kernel), resident);
  if (err != cudaSuccess) return err;
  const int64_t items = g.G * g.P;
  int64_t grid = items < resident ? items : resident;
  if (g.cl && grid > g.G) grid -= grid % g.G;
  if (g.cl && grid < g.G) grid = g.G;
  Geometry launched = g;
  launched.items_per_cta = ceil_div(items, grid);
  return launch_kernel<Kernel>(grid, stream, args, launched);
}

// A reduction: one CTA per item.
template <auto Kernel, typename Args>
cudaError_t launch_reduction(const Geometry& g, cudaStream_t stream, const Args& args) {
  return launch_kernel<Kernel>(g.G * g.P, stream, args, g);
}

// cudaMemsetAsync, recorded while a launch log is installed.
inline cudaError_t memset_async(void* dst, int value, size_t bytes, cudaStream_t stream) {
  if (std::vector<std::string>* log = launch_log()) {
    log->emplace_back("cudaMemsetAsync");
    return cudaSuccess;
  }
  return bytes == 0 ? cudaSuccess : cudaMemsetAsync(dst, value, bytes, stream);
}

}  // namespace detail
}  // namespace lmfused
