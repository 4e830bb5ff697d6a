// Device code of the LM-step kernels (no torch headers): types, Philox, tile geometry, kernels.
// Included by lm_step_impl.cuh (the typed launchers) and by the kernel tests
// (for the host Philox reference and the tile geometry).
//
// Work decomposition ("tiles"), the same in forward and backward so that the grad_k reduction
// falls out of the iteration (tile lengths: tile_iters):
//  * contiguous (M = N*C rows of L = S): tile = (channel c, chunk p) of channel c's N*L elements,
//    viewed as one virtual array v = n*L + l. One tile never mixes channels, so the backward
//    reduces a tile to one partial sum: partial[c*P + p].
//  * channels-last (M = N*S rows of L = C): tile = (row chunk rt, column chunk ct). A thread owns
//    one (vector-)column for the whole tile, so it accumulates per-column sums in registers; the
//    block folds them over its rows: partial[rt*L + column]. A scalar k needs no columns: the
//    block folds the whole tile, partial[tile], as in the contiguous case.
// Tiles depend only on the shape and the vector width (never on the grid or the SM count), and
// every sum runs in a fixed order, which is what makes grad_k bitwise reproducible.
// Vector path: VEC elements per access, 128-bit (VEC = 16 / sizeof(T)) or else 64-bit (half of
// that, e.g. bf16 rows of 14x14 = 196 elements); it needs L % VEC == 0 (so a vector never crosses
// a row, hence never a channel or a sample) and buffers aligned to VEC * sizeof(T); otherwise the
// same code runs with VEC = 1. Because of that no vector ever straddles the end of a row or of
// the tensor, so no separate tail loop is needed.
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
#include <type_traits>
#include <utility>

#include "lm_step.h"

namespace lmfused {
namespace detail {

constexpr int kBlock = 256;        // threads per block (vectors per thread per tile: tile_iters)
constexpr int kMaxColVecs = 32;    // channels-last: vector-columns per tile (one warp wide)
constexpr int kMinBlocksPerSM = 4; // caps registers at 64/thread: >= 1024 threads/SM in flight

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
// the store instructions and L2 write requests of the 128-bit loads); csrc/check_sass.py checks
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

// ---------------------------------------------------------------------------------------------
// Tile geometry (host-built, passed by value to the kernels)
// ---------------------------------------------------------------------------------------------
struct Geometry {
  int64_t N, C, S;  // batch, channels, prod(spatial)
  int64_t M, L;     // rows x row length of the normalised layout
  int64_t num_tiles, num_partials;
  int64_t step_q, step_r;  // a thread's stride (kBlock*VEC elements | TY rows) divmod (L | S)
  int64_t V, CH, P;        // contiguous: per-channel length N*L, tile length, tiles per channel
  int64_t LV, CT, RC, RT;  // channels-last: vector-columns, column tiles, rows per tile, row tiles
  int TX, TY;              // channels-last: threads along columns, thread rows per step
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Vectors per thread per tile. A grid-stride loop runs whole tiles, so its last round leaves most
// blocks idle; shorter tiles make that round a smaller fraction of the work (64x256x56x56
// contiguous, 528 resident blocks: 12.1 rounds of 4-vector tiles take 13, 23.8 rounds of 2-vector
// tiles take 24). The channels-last backward keeps 4: its grad_k partials are one per column and
// tile, so shorter tiles would double them (and its tile count already divides well).
inline int tile_iters(const LMStepShape& sh, bool forward) {
  return forward || !sh.channels_last ? 2 : 4;
}

inline Geometry make_geometry(const LMStepShape& sh, int vec, int iters) {
  Geometry g{};
  g.N = sh.N;
  g.C = sh.C;
  g.S = sh.S;
  if (sh.N <= 0 || sh.C <= 0 || sh.S <= 0) return g;  // empty: nothing to launch
  if (!sh.channels_last) {
    g.M = sh.N * sh.C;
    g.L = sh.S;
    g.V = sh.N * sh.S;
    g.CH = static_cast<int64_t>(kBlock) * vec * iters;
    g.P = ceil_div(g.V, g.CH);
    g.num_tiles = sh.C * g.P;
    g.num_partials = g.num_tiles;
    const int64_t step = static_cast<int64_t>(kBlock) * vec;
    g.step_q = step / g.L;
    g.step_r = step % g.L;
  } else {
    g.M = sh.N * sh.S;
    g.L = sh.C;
    g.LV = ceil_div(g.L, vec);
    g.TX = static_cast<int>(g.LV < kMaxColVecs ? g.LV : kMaxColVecs);
    g.TY = kBlock / g.TX;
    g.CT = ceil_div(g.LV, g.TX);
    g.RC = static_cast<int64_t>(g.TY) * iters;
    g.RT = ceil_div(g.M, g.RC);
    g.num_tiles = g.RT * g.CT;
    g.num_partials = g.RT * g.L;
    g.step_q = g.TY / g.S;
    g.step_r = g.TY % g.S;
  }
  return g;
}

// Per-thread walk over one tile. Both cursors expose the same interface:
//   ok()          more vectors to visit;  next(g)   advance by one thread stride
//   offset(g)     linear memory offset of the vector's first element
//   sample()      batch index n of the vector (all VEC elements share it)
//   channel(j)    channel of element j of the vector
// The (n, l) / (n, row-in-sample) pair is advanced incrementally: no division in the loop.
template <int VEC>
struct ContigCursor {
  int64_t c, v, vend, n, l;
  __device__ __forceinline__ ContigCursor(const Geometry& g, int64_t tile) {
    c = tile / g.P;
    const int64_t start = (tile - c * g.P) * g.CH;
    v = start + static_cast<int64_t>(threadIdx.x) * VEC;
    vend = start + g.CH < g.V ? start + g.CH : g.V;
    n = v / g.L;
    l = v - n * g.L;
  }
  __device__ __forceinline__ bool ok() const { return v < vend; }
  __device__ __forceinline__ int64_t offset(const Geometry& g) const {
    return (n * g.C + c) * g.L + l;
  }
  __device__ __forceinline__ int64_t sample() const { return n; }
  __device__ __forceinline__ int64_t channel(int) const { return c; }
  __device__ __forceinline__ void next(const Geometry& g) {
    v += static_cast<int64_t>(kBlock) * VEC;
    l += g.step_r;
    n += g.step_q;
    if (l >= g.L) {
      l -= g.L;
      ++n;
    }
  }
};

template <int VEC>
struct ChannelsLastCursor {
  int64_t r, rend, n, rem, col;
  bool active;
  __device__ __forceinline__ ChannelsLastCursor(const Geometry& g, int64_t tile) {
    const int64_t rt = tile / g.CT;
    const int64_t ct = tile - rt * g.CT;
    const int tx = static_cast<int>(threadIdx.x) % g.TX;
    const int ty = static_cast<int>(threadIdx.x) / g.TX;
    const int64_t vc = ct * g.TX + tx;
    active = ty < g.TY && vc < g.LV;  // kBlock % TX leftovers and the last column tile idle
    col = vc * VEC;
    r = rt * g.RC + ty;
    rend = rt * g.RC + g.RC < g.M ? rt * g.RC + g.RC : g.M;
    n = r / g.S;
    rem = r - n * g.S;
  }
  __device__ __forceinline__ bool ok() const { return active && r < rend; }
  __device__ __forceinline__ int64_t offset(const Geometry& g) const { return r * g.L + col; }
  __device__ __forceinline__ int64_t sample() const { return n; }
  __device__ __forceinline__ int64_t channel(int j) const { return col + j; }
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

template <bool CL, int VEC>
using Cursor = std::conditional_t<CL, ChannelsLastCursor<VEC>, ContigCursor<VEC>>;

// k for the VEC elements of the cursor's vectors (fixed for the whole tile, so loaded once).
template <int VEC, typename Cur, typename A>
__device__ __forceinline__ void load_k(const Cur& cur, const A* __restrict__ k, bool per_channel,
                                       A (&kk)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) kk[j] = k[per_channel ? cur.channel(j) : 0];
}

// Deterministic block sum (fixed shuffle tree, then warp sums in order); result in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous tile's reads of smem are done
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  A s = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kBlock / 32; ++w) s += smem[w];
  }
  return s;
}

// Writes the tile's grad_k partial sums (see the layout notes at the top): one per tile for
// contiguous tiles (one channel each) and for a scalar k, else one per column. smem: kBlock*VEC.
template <bool CL, int VEC, typename A>
__device__ __forceinline__ void store_tile_partials(const A (&acc)[VEC], const Geometry& g,
                                                    int64_t tile, bool per_channel,
                                                    A* __restrict__ partials, A* smem) {
  if (!CL || !per_channel) {
    A t = 0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) t += acc[j];
    t = block_sum(t, smem);
    if (threadIdx.x == 0) partials[tile] = t;
  } else {
    __syncthreads();
#pragma unroll
    for (int j = 0; j < VEC; ++j) smem[threadIdx.x * VEC + j] = acc[j];  // [ty][tx][j]
    __syncthreads();
    const int width = g.TX * VEC;
    if (static_cast<int>(threadIdx.x) < width) {
      const int64_t rt = tile / g.CT;
      const int64_t col = (tile - rt * g.CT) * width + threadIdx.x;
      if (col < g.L) {
        A t = 0;
        for (int ty = 0; ty < g.TY; ++ty) t += smem[ty * width + threadIdx.x];
        partials[rt * g.L + col] = t;
      }
    }
  }
}

// Positions a thread takes per step of its loop. The scalar path gathers several, so that all
// their loads are in flight before the first store: the compiler may not move a load above a
// store through a pointer it cannot prove distinct, and one 2- or 4-byte load per thread at a
// time leaves the memory system starved. The vector paths move 16 or 8 bytes per load already.
template <int VEC>
__host__ __device__ constexpr int positions_per_step() {
  return VEC == 1 ? 4 : 1;
}

// The cursor's position and up to B - 1 following ones: memory offsets and samples. Leaves the
// cursor on the last of them (the loop's next() moves past it) and returns how many there were.
// With B = 1 this is just the current position.
template <int B, typename Cur>
__device__ __forceinline__ int gather_positions(Cur& cur, const Geometry& g, int64_t (&off)[B],
                                                int64_t (&sample)[B]) {
  off[0] = cur.offset(g);
  sample[0] = cur.sample();
  int live = 1;
#pragma unroll
  for (int b = 1; b < B; ++b) {
    Cur probe = cur;
    probe.next(g);
    if (live == b && probe.ok()) {
      cur = probe;
      off[b] = cur.offset(g);
      sample[b] = cur.sample();
      live = b + 1;
    }
  }
  return live;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
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

template <typename T, int VEC, bool CL, bool HAS_F, bool HAS_SCALE, bool RELU, bool HAS_NOISE>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM)
    lm_step_forward_kernel(const ForwardArgs<T> a, const Geometry g) {
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
    A kk[VEC];
    load_k(cur, a.k, a.k_per_channel, kk);
    constexpr int B = positions_per_step<VEC>();
    for (; cur.ok(); cur.next(g)) {
      int64_t off[B], sample[B];
      const int live = gather_positions<B>(cur, g, off, sample);
      Pack<T, VEC> pu[B], pp[B], pf[B];
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b < live) {
          pu[b] = load_pack<T, VEC>(a.u, off[b]);
          pp[b] = load_pack<T, VEC>(a.u_prev, off[b]);
          if constexpr (HAS_F) pf[b] = load_pack<T, VEC>(a.f, off[b]);
        }
      }
#pragma unroll
      for (int b = 0; b < B; ++b) {
        if (b >= live) break;
        A s = A(1);
        if constexpr (HAS_SCALE) s = a.scale[sample[b]];
        Pack<T, VEC> po;
        constexpr int G = VEC % 4 == 0 ? 4 : VEC;  // normals per Philox call used here
        float xi[G];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          A x = (A(1) - kk[j]) * to_acc(pu[b].v[j]) + kk[j] * to_acc(pp[b].v[j]);
          if constexpr (HAS_F) x += HAS_SCALE ? s * to_acc(pf[b].v[j]) : to_acc(pf[b].v[j]);
          if constexpr (HAS_NOISE) {
            if (j % G == 0) philox_normals<G>(key0, key1, static_cast<uint64_t>(off[b] + j), xi);
            x += a.noise_std * static_cast<A>(xi[j % G]);
          }
          if constexpr (RELU) x = x < A(0) ? A(0) : x;  // keeps NaN, like torch.relu
          po.v[j] = from_acc<T>(x);
        }
        store_pack<T, VEC>(a.out, off[b], po);
      }
    }
  }
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
  acc_t<T>* partials;
  bool k_per_channel;
};

template <typename T, int VEC, bool CL, bool RELU, bool HAS_SCALE, bool NEED_U, bool NEED_UP,
          bool NEED_F, bool NEED_K>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM)
    lm_step_backward_kernel(const BackwardArgs<T> a, const Geometry g) {
  using A = acc_t<T>;
  __shared__ A smem[NEED_K ? kBlock * VEC : 1];
  // A runtime (grid-uniform) flag rather than a template one: it only adds one read to grad_u's
  // path, and a template flag would add half again as many backward specialisations.
  const bool shortcut = NEED_U && a.grad_shortcut != nullptr;
  for (int64_t tile = blockIdx.x; tile < g.num_tiles; tile += gridDim.x) {
    Cursor<CL, VEC> cur(g, tile);
    A acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = A(0);
    if (cur.ok()) {  // no early exit: the whole block must reach the partial-sum barrier
      A kk[VEC];
      if constexpr (NEED_U || NEED_UP) load_k(cur, a.k, a.k_per_channel, kk);
      constexpr int B = positions_per_step<VEC>();
      for (; cur.ok(); cur.next(g)) {
        int64_t off[B], sample[B];
        const int live = gather_positions<B>(cur, g, off, sample);
        Pack<T, VEC> pg[B], po[B], pu[B], pp[B], ps[B];
#pragma unroll
        for (int b = 0; b < B; ++b) {
          if (b < live) {
            pg[b] = load_pack<T, VEC>(a.grad_out, off[b]);
            if (shortcut) ps[b] = load_pack<T, VEC>(a.grad_shortcut, off[b]);
            if constexpr (RELU) po[b] = load_pack<T, VEC>(a.out, off[b]);
            if constexpr (NEED_K) {
              pu[b] = load_pack<T, VEC>(a.u, off[b]);
              pp[b] = load_pack<T, VEC>(a.u_prev, off[b]);
            }
          }
        }
#pragma unroll
        for (int b = 0; b < B; ++b) {  // in position order: grad_k's sums keep their order
          if (b >= live) break;
          A s = A(1);
          if constexpr (NEED_F && HAS_SCALE) s = a.scale[sample[b]];
          Pack<T, VEC> gu, gup, gf;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            A gj = to_acc(pg[b].v[j]);
            // As torch.relu's backward: zero where out <= 0 (a NaN output passes g on).
            if constexpr (RELU) gj = to_acc(po[b].v[j]) <= A(0) ? A(0) : gj;
            if constexpr (NEED_U) {
              // The shortcut's gradient is a gradient of u itself: not masked, one rounding.
              A guj = (A(1) - kk[j]) * gj;
              if (shortcut) guj += to_acc(ps[b].v[j]);
              gu.v[j] = from_acc<T>(guj);
            }
            if constexpr (NEED_UP) gup.v[j] = from_acc<T>(kk[j] * gj);
            if constexpr (NEED_F) gf.v[j] = from_acc<T>(HAS_SCALE ? s * gj : gj);
            if constexpr (NEED_K) acc[j] += gj * (to_acc(pp[b].v[j]) - to_acc(pu[b].v[j]));
          }
          if constexpr (NEED_U) store_pack<T, VEC>(a.grad_u, off[b], gu);
          if constexpr (NEED_UP) store_pack<T, VEC>(a.grad_u_prev, off[b], gup);
          if constexpr (NEED_F) store_pack<T, VEC>(a.grad_f, off[b], gf);
        }
      }
    }
    if constexpr (NEED_K) {
      store_tile_partials<CL, VEC>(acc, g, tile, a.k_per_channel, a.partials, smem);
    }
  }
}

// grad_k[o] = sum_i partials[o*stride_o + i*stride_i], i < count, in a fixed order.
template <typename A>
__global__ void __launch_bounds__(kBlock)
    reduce_partials_kernel(const A* __restrict__ partials, A* __restrict__ grad_k,
                           int64_t stride_o, int64_t stride_i, int64_t count) {
  __shared__ A smem[kBlock / 32];
  const int64_t o = blockIdx.x;
  A t = 0;
  // Unrolled so that several loads are in flight (the adds stay in order: same result).
#pragma unroll 8
  for (int64_t i = threadIdx.x; i < count; i += kBlock) t += partials[o * stride_o + i * stride_i];
  t = block_sum(t, smem);
  if (threadIdx.x == 0) grad_k[o] = t;
}

// Channels-last, per-channel k: the partials form an (RT rows x L columns) row-major array, one
// row per row tile. Reading a column with one thread per row (reduce_partials_kernel) makes every
// warp load touch 32 sectors for 4 bytes each. Here a block sums kColGroup adjacent columns over
// one segment of kSegRows rows: lane tx takes column tx, warp ty the rows ty, ty + 8, ... of the
// segment, so each warp load is 32 adjacent values (one 128-byte line); the 8 warp sums are then
// added in warp order. One segment per block keeps the grid wide (at 64x256x56x56: 25 segments x
// 8 column groups); out[seg * L + c] holds the segment sums, which reduce_partials_kernel adds in
// segment order (or out is grad_k itself when there is one segment). Fixed order throughout, and
// the segments depend only on the shape: deterministic.
constexpr int kColGroup = 32;
constexpr int64_t kSegRows = 256;

inline int64_t column_segments(int64_t rows) { return ceil_div(rows, kSegRows); }

template <typename A>
__global__ void __launch_bounds__(kBlock)
    reduce_columns_kernel(const A* __restrict__ partials, A* __restrict__ out, int64_t L,
                          int64_t rows) {
  __shared__ A smem[kBlock];
  const int64_t groups = ceil_div(L, kColGroup);
  const int64_t seg = blockIdx.x / groups;
  const int tx = static_cast<int>(threadIdx.x) % kColGroup;
  const int ty = static_cast<int>(threadIdx.x) / kColGroup;
  const int64_t c = (blockIdx.x - seg * groups) * kColGroup + tx;
  const int64_t end = seg * kSegRows + kSegRows < rows ? seg * kSegRows + kSegRows : rows;
  A t = 0;
  if (c < L) {
#pragma unroll 8
    for (int64_t r = seg * kSegRows + ty; r < end; r += kBlock / kColGroup) {
      t += partials[r * L + c];
    }
  }
  smem[threadIdx.x] = t;
  __syncthreads();
  if (ty == 0 && c < L) {
    A s = 0;
    for (int w = 0; w < kBlock / kColGroup; ++w) s += smem[w * kColGroup + tx];
    out[seg * L + c] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Host launch helpers shared by the forward and backward launchers
// ---------------------------------------------------------------------------------------------
template <typename T>
constexpr int max_vec() {
  return static_cast<int>(16 / sizeof(T));
}

// The vector width (elements per access) for rows of L elements: 128-bit, else 64-bit, else
// scalar, the widest that divides L and that every given buffer (nullptr = unused) is aligned to.
// Only these three widths are compiled, to bound the number of kernel specialisations.
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
#define LMF_VEC_SWITCH(T, WIDTH, NAME, ...)                          \
  [&] {                                                              \
    if ((WIDTH) == ::lmfused::detail::max_vec<T>()) {                \
      constexpr int NAME = ::lmfused::detail::max_vec<T>();          \
      return __VA_ARGS__();                                          \
    } else if ((WIDTH) == ::lmfused::detail::max_vec<T>() / 2) {     \
      constexpr int NAME = ::lmfused::detail::max_vec<T>() / 2;      \
      return __VA_ARGS__();                                          \
    } else {                                                         \
      constexpr int NAME = 1;                                        \
      return __VA_ARGS__();                                          \
    }                                                                \
  }()

// Blocks of `kernel` that fit on the device at once (SM count x occupancy). The occupancy query
// costs microseconds of host time and its answer is fixed per kernel and device: cached.
inline cudaError_t resident_blocks(const void* kernel, int64_t& resident) {
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

// Where the partials of output channel o live: partials[o*stride_o + i*stride_i], i < count.
struct PartialsLayout {
  int64_t num_out, stride_o, stride_i, count;
};

inline PartialsLayout partials_layout(const Geometry& g, bool per_channel) {
  if (!per_channel) return {1, 0, 1, g.num_tiles};  // scalar k: one partial per tile, in order
  return {g.C, g.P, 1, g.P};  // contiguous: partial[c*P + p]; channels-last: reduce_columns_kernel
}

// Channels-last, per channel: the segment sums of reduce_columns_kernel, kept after the partials
// (none when one segment covers every row tile: it writes the result directly).
inline int64_t column_segment_values(const Geometry& g, const LMStepShape& sh) {
  if (!sh.channels_last) return 0;
  const int64_t segs = column_segments(g.RT);
  return segs > 1 ? segs * g.L : 0;
}

// out = the fixed-order sums of the per-tile partials that store_tile_partials wrote: one value
// per channel (per_channel), else one in all. scratch: column_segment_values(g, sh) values.
template <typename A>
inline cudaError_t reduce_tile_partials(const A* partials, A* out, A* scratch, const Geometry& g,
                                        const LMStepShape& sh, bool per_channel,
                                        cudaStream_t stream) {
  if (sh.channels_last && per_channel) {  // coalesced column sums (see reduce_columns_kernel)
    const int64_t segs = column_segments(g.RT);
    A* sums = segs > 1 ? scratch : out;
    LMF_LAUNCH(reduce_columns_kernel<A>, static_cast<unsigned>(segs * ceil_div(g.L, kColGroup)),
               kBlock, stream, partials, sums, g.L, g.RT);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || segs == 1) return err;
    LMF_LAUNCH(reduce_partials_kernel<A>, static_cast<unsigned>(g.L), kBlock, stream,
               static_cast<const A*>(sums), out, int64_t{1}, g.L, segs);
    return cudaGetLastError();
  }
  const PartialsLayout p = partials_layout(g, per_channel);
  LMF_LAUNCH(reduce_partials_kernel<A>, static_cast<unsigned>(p.num_out), kBlock, stream,
             partials, out, p.stride_o, p.stride_i, p.count);
  return cudaGetLastError();
}

// Grid-stride launch: as many blocks as can be resident at once, capped at the number of tiles.
// The result does not depend on the grid, only the speed.
template <typename Args>
inline cudaError_t launch_tiles(void (*kernel)(Args, Geometry), const Args& args,
                                const Geometry& g, cudaStream_t stream) {
  int64_t resident = 0;
  const cudaError_t err = resident_blocks(reinterpret_cast<const void*>(kernel), resident);
  if (err != cudaSuccess) return err;
  const int64_t grid = g.num_tiles < resident ? g.num_tiles : resident;
  LMF_LAUNCH(kernel, static_cast<unsigned>(grid), kBlock, stream, args, g);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace lmfused
