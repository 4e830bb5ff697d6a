// Kernel tests for the torch-free LM-step launchers (csrc/lm_step.h), against a float64 CPU
// reference. Covers every flag combination, both layouts, float/half/bf16/double, odd sizes
// (scalar path), multi-chunk reductions, misaligned buffers, out-of-bounds writes, grad_k
// determinism, and the Philox noise (golden integers from triton.language.random, statistics,
// reproducibility); its main also runs the batch-norm-fused kernels' tests
// (test_batch_norm_kernels.cu). Exits 0 with "skipped: no CUDA device" when there is no GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../lm_step.cuh"
#include "../lm_step.h"
#include "test_common.h"

namespace lmf_test {
// test_batch_norm_kernels.cu
void run_batch_norm_tests(std::mt19937_64& rng, const std::function<bool(const char*)>& wanted);
}  // namespace lmf_test

namespace {

using namespace lmf_test;  // NOLINT: the shared test helpers

// ----- one (dtype, shape, alignment mode): every forward and backward flag combination --------
// mode 0: all buffers aligned; 1: every buffer shifted by one element; 2: only outputs shifted;
// 3: every buffer shifted by 8 bytes (64-bit vectors allowed, 128-bit not). The data come from
// `data_seed`, the same for every mode; returns grad_k's bits of each grad_k backward, in order (they
// must not depend on the mode: the sums' order is the shape's).
template <typename T>
std::vector<std::string> run_case(const Case& cs, int mode, uint64_t data_seed) {
  using A = lmfused::detail::acc_t<T>;
  using Tr = Traits<T>;
  std::mt19937_64 rng(data_seed);
  std::vector<std::string> grad_k_bits;
  const int64_t numel = cs.N * cs.C * cs.S;
  const size_t n = static_cast<size_t>(numel);
  const LMStepShape shape{cs.N, cs.C, cs.S, cs.cl};
  const size_t half_vector = 8 / sizeof(T);  // elements in 8 bytes
  const size_t in_shift = mode == 1 ? 1 : mode == 3 ? half_vector : 0;
  const size_t out_shift = mode == 3 ? half_vector : mode >= 1 ? 1 : 0;

  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  auto rand_vec = [&](size_t len) {
    std::vector<T> v(len);
    for (auto& x : v) x = Tr::make(uni(rng));
    return v;
  };
  const std::vector<T> hu = rand_vec(n), hp = rand_vec(n), hf = rand_vec(n), hg = rand_vec(n);
  const std::vector<T> hsc = rand_vec(n);  // grad_shortcut
  std::vector<A> hk(static_cast<size_t>(cs.C)), hs(static_cast<size_t>(cs.N));
  for (auto& x : hk) x = static_cast<A>(uni(rng) * 0.5);
  for (auto& x : hs) x = static_cast<A>(uni(rng) + 1.5);
  const int64_t seed = static_cast<int64_t>(0x123456789ABCDEF0ull);
  const double noise_std = 0.25;

  DevBuf<T> du(n, in_shift), dp(n, in_shift), df(n, in_shift), dg(n, in_shift), dout(n, out_shift);
  DevBuf<T> dsc(n, in_shift);
  DevBuf<T> dgu(n, out_shift), dgp(n, out_shift), dgf(n, out_shift);
  du.upload(hu);
  dp.upload(hp);
  df.upload(hf);
  dg.upload(hg);
  dsc.upload(hsc);
  A *dk = nullptr, *ds = nullptr, *dgk = nullptr;
  int64_t* dseed = nullptr;
  CUDA_OK(cudaMalloc(&dk, hk.size() * sizeof(A)));
  CUDA_OK(cudaMalloc(&ds, hs.size() * sizeof(A)));
  CUDA_OK(cudaMalloc(&dgk, hk.size() * sizeof(A)));
  CUDA_OK(cudaMalloc(&dseed, sizeof(int64_t)));
  CUDA_OK(cudaMemcpy(dk, hk.data(), hk.size() * sizeof(A), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(ds, hs.data(), hs.size() * sizeof(A), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dseed, &seed, sizeof seed, cudaMemcpyHostToDevice));
  const Scratch scratch(lmfused::lm_step_backward_scratch(Tr::dtype, shape));

  // Channel and sample of the element at memory offset i of the normalised layout.
  auto chan = [&](size_t i) -> size_t {
    return cs.cl ? i % cs.C : (i / cs.S) % cs.C;
  };
  auto samp = [&](size_t i) -> size_t { return i / (cs.C * cs.S); };  // either layout
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t key0 = static_cast<uint32_t>(useed), key1 = static_cast<uint32_t>(useed >> 32);

  // ---- forward: HAS_F, scale, RELU, HAS_NOISE, PER_CHANNEL_K
  for (int bits = 0; bits < 32; ++bits) {
    const bool has_f = bits & 1, has_s = bits & 2, relu = bits & 4, noise = bits & 8,
               per_ch = bits & 16;
    const int64_t k_numel = per_ch ? cs.C : 1;
    dout.poison();
    CUDA_OK(lmfused::launch_lm_step_forward(Tr::dtype, shape, du.data(), dp.data(),
                                            has_f ? df.data() : nullptr, dk, k_numel,
                                            has_s ? ds : nullptr, noise ? dseed : nullptr,
                                            noise ? noise_std : 0.0, relu, dout.data(), nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<T> ho = dout.download();
    ++g_checks;
    // noise: float Box-Muller on host vs device may differ by an ulp of float
    const double tol = Tr::tol + (noise && Tr::tol < 1e-6 ? 1e-6 : 0.0);
    bool ok = dout.guards_intact();
    for (size_t i = 0; i < n && ok; ++i) {
      const double k = hk[per_ch ? chan(i) : 0];
      double x = (1.0 - k) * Tr::val(hu[i]) + k * Tr::val(hp[i]);
      if (has_f) x += (has_s ? static_cast<double>(hs[samp(i)]) : 1.0) * Tr::val(hf[i]);
      if (noise) x += noise_std * lmfused::detail::philox_normal(key0, key1, i);
      if (relu) x = x < 0 ? 0 : x;
      if (!close(Tr::val(ho[i]), x, tol)) {
        char what[160];
        std::snprintf(what, sizeof what, "forward bits=%d at %zu: got %.9g want %.9g", bits, i,
                      Tr::val(ho[i]), x);
        fail(describe(Tr::name, cs, mode, what));
        ok = false;
      }
    }
    if (!dout.guards_intact()) fail(describe(Tr::name, cs, mode, "forward wrote out of bounds"));
  }

  // forward output with f, scale, relu (no noise) feeds the relu mask of the backward
  CUDA_OK(lmfused::launch_lm_step_forward(Tr::dtype, shape, du.data(), dp.data(), df.data(), dk,
                                          cs.C, ds, nullptr, 0.0, true, dout.data(), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<T> hout = dout.download();

  // ---- backward: RELU, scale, PER_CHANNEL_K, NEED_U, NEED_UP, NEED_F, NEED_K, and
  // grad_shortcut (only with NEED_U: the launcher ignores it otherwise)
  for (int bits = 0; bits < 256; ++bits) {
    const bool relu = bits & 1, has_s = bits & 2, per_ch = bits & 4, nu = bits & 8,
               nup = bits & 16, nf = bits & 32, nk = bits & 64, sc = bits & 128;
    if (sc && !nu) continue;
    const int64_t k_numel = per_ch ? cs.C : 1;
    dgu.poison();
    dgp.poison();
    dgf.poison();
    auto launch = [&] {
      CUDA_OK(lmfused::launch_lm_step_backward(
          Tr::dtype, shape, dg.data(), sc ? dsc.data() : nullptr, nk ? du.data() : nullptr,
          nk ? dp.data() : nullptr, relu ? dout.data() : nullptr, dk, k_numel,
          has_s ? ds : nullptr, relu,
          nu ? dgu.data() : nullptr, nup ? dgp.data() : nullptr, nf ? dgf.data() : nullptr,
          nk ? dgk : nullptr, scratch.s, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<A> got(hk.size());
      CUDA_OK(cudaMemcpy(got.data(), dgk, got.size() * sizeof(A), cudaMemcpyDeviceToHost));
      return bytes_of(got);
    };
    // grad_k: the same bits whichever CTA finishes last (every CTA order the emulation can run)
    bool same_bits = true;
    if (nk) {
      same_bits = same_in_every_block_order(launch);
    } else {
      launch();
    }
    CUDA_OK(cudaDeviceSynchronize());
    ++g_checks;
    char what[200];
    std::vector<double> gm(n);
    for (size_t i = 0; i < n; ++i)
      gm[i] = relu && Tr::val(hout[i]) <= 0 ? 0.0 : Tr::val(hg[i]);  // NaN passes, as in torch
    auto check_elem = [&](const DevBuf<T>& buf, bool needed, const char* nm, auto ref_of) {
      if (!needed) {  // never written: still fully poisoned
        std::vector<T> h = buf.download();
        std::vector<unsigned char> ff(n * sizeof(T), 0xFF);
        if (n && std::memcmp(h.data(), ff.data(), n * sizeof(T)) != 0) {
          std::snprintf(what, sizeof what, "backward bits=%d wrote unrequested %s", bits, nm);
          fail(describe(Tr::name, cs, mode, what));
        }
        return;
      }
      const std::vector<T> h = buf.download();
      for (size_t i = 0; i < n; ++i) {
        const double want = ref_of(i);
        if (!close(Tr::val(h[i]), want, Tr::tol)) {
          std::snprintf(what, sizeof what, "backward bits=%d %s at %zu: got %.9g want %.9g",
                        bits, nm, i, Tr::val(h[i]), want);
          fail(describe(Tr::name, cs, mode, what));
          break;
        }
      }
      if (!buf.guards_intact()) {
        std::snprintf(what, sizeof what, "backward bits=%d %s out of bounds", bits, nm);
        fail(describe(Tr::name, cs, mode, what));
      }
    };
    auto kk = [&](size_t i) { return static_cast<double>(hk[per_ch ? chan(i) : 0]); };
    check_elem(dgu, nu, "grad_u", [&](size_t i) {  // the shortcut's gradient is not masked
      return (1.0 - kk(i)) * gm[i] + (sc ? Tr::val(hsc[i]) : 0.0);
    });
    check_elem(dgp, nup, "grad_u_prev", [&](size_t i) { return kk(i) * gm[i]; });
    check_elem(dgf, nf, "grad_f", [&](size_t i) {
      return (has_s ? static_cast<double>(hs[samp(i)]) : 1.0) * gm[i];
    });
    if (nk) {
      std::vector<double> ref(static_cast<size_t>(k_numel), 0.0), mag(ref.size(), 0.0);
      for (size_t i = 0; i < n; ++i) {
        const double t = gm[i] * (Tr::val(hp[i]) - Tr::val(hu[i]));
        ref[per_ch ? chan(i) : 0] += t;
        mag[per_ch ? chan(i) : 0] += std::fabs(t);
      }
      std::vector<A> got(ref.size());
      CUDA_OK(cudaMemcpy(got.data(), dgk, got.size() * sizeof(A), cudaMemcpyDeviceToHost));
      const double acc_eps = sizeof(A) == 8 ? 1e-13 : 1e-5;  // accumulation in float / double
      for (size_t c = 0; c < ref.size(); ++c) {
        if (!(std::fabs(got[c] - ref[c]) <= acc_eps * (mag[c] + 1.0))) {
          std::snprintf(what, sizeof what, "backward bits=%d grad_k[%zu]: got %.12g want %.12g",
                        bits, c, static_cast<double>(got[c]), ref[c]);
          fail(describe(Tr::name, cs, mode, what));
          break;
        }
      }
      if (!same_bits) {
        std::snprintf(what, sizeof what, "backward bits=%d grad_k depends on the CTA order",
                      bits);
        fail(describe(Tr::name, cs, mode, what));
      }
      if (!scratch.counters_zero()) {
        std::snprintf(what, sizeof what, "backward bits=%d left a ticket counter non-zero", bits);
        fail(describe(Tr::name, cs, mode, what));
      }
      grad_k_bits.push_back(bytes_of(got));
    }
  }
  cudaFree(dk);
  cudaFree(ds);
  cudaFree(dgk);
  cudaFree(dseed);
  return grad_k_bits;
}

// ----- Philox: the integers bit-exact against triton.language.random (values from its
// interpreter: randint4x's first two outputs for the counter idx); the normals, built with the
// GPU's fast maths, within float error of the host reference -------------------------------------
struct Golden {
  long long seed, idx;
  uint32_t i1, i2;
};
const Golden kGolden[] = {
    {0LL, 0LL, 0x6627e8d5u, 0xe169c58du},
    {0LL, 2147483647LL, 0x5fb3fbfeu, 0xbfca5ed6u},
    {0LL, 4294967303LL, 0x5fb3d869u, 0x0e2fe67cu},
    {1234LL, 1LL, 0x9eeede35u, 0x1cbe137cu},
    {1234LL, 1000LL, 0xae7bc85bu, 0x83510badu},
    {1234LL, 42949672963LL, 0xe9c12521u, 0x256f0992u},
    {1311768467463790320LL, 0LL, 0x092c9b44u, 0x78384bc0u},
    {1311768467463790320LL, 2LL, 0x85099817u, 0x3153794fu},
    {1311768467463790320LL, 4294967303LL, 0x6ff46a4eu, 0xe69fe888u},
    {-5LL, 0LL, 0xc8537de9u, 0xdff1e040u},
    {-5LL, 123456789LL, 0x5643da48u, 0x7a1baca7u},
};
constexpr int kNumGolden = sizeof(kGolden) / sizeof(kGolden[0]);

// Per golden: the first two Philox outputs for counter idx, and the four normals of offsets
// 4*idx .. 4*idx+3 through each entry point (the group of 4, pairs, single offsets).
__global__ void philox_probe(const Golden* g, uint32_t* ints, float* normals, int count) {
  const int i = threadIdx.x;
  if (i >= count) return;
  const uint64_t s = static_cast<uint64_t>(g[i].seed);
  const auto k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
  uint32_t c[4];
  lmfused::detail::philox_4x(k0, k1, static_cast<uint64_t>(g[i].idx), c);
  ints[2 * i] = c[0];
  ints[2 * i + 1] = c[1];
  const uint64_t base = 4 * static_cast<uint64_t>(g[i].idx);
  float n4[4], n2[2], n1[1];
  lmfused::detail::philox_normals<4>(k0, k1, base, n4);
  for (int j = 0; j < 4; ++j) normals[12 * i + j] = n4[j];
  for (int h = 0; h < 2; ++h) {
    lmfused::detail::philox_normals<2>(k0, k1, base + 2 * h, n2);
    normals[12 * i + 4 + 2 * h] = n2[0];
    normals[12 * i + 5 + 2 * h] = n2[1];
  }
  for (int j = 0; j < 4; ++j) {
    lmfused::detail::philox_normals<1>(k0, k1, base + j, n1);
    normals[12 * i + 8 + j] = n1[0];
  }
}

void test_philox_golden() {
  Golden* dg = nullptr;
  uint32_t* di = nullptr;
  float* dn = nullptr;
  CUDA_OK(cudaMalloc(&dg, sizeof kGolden));
  CUDA_OK(cudaMalloc(&di, 2 * kNumGolden * sizeof(uint32_t)));
  CUDA_OK(cudaMalloc(&dn, 12 * kNumGolden * sizeof(float)));
  CUDA_OK(cudaMemcpy(dg, kGolden, sizeof kGolden, cudaMemcpyHostToDevice));
  LMF_LAUNCH(philox_probe, 1, 64, nullptr, dg, di, dn, kNumGolden);
  CUDA_OK(cudaGetLastError());
  uint32_t ints[2 * kNumGolden];
  float normals[12 * kNumGolden];
  CUDA_OK(cudaMemcpy(ints, di, sizeof ints, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(normals, dn, sizeof normals, cudaMemcpyDeviceToHost));
  for (int i = 0; i < kNumGolden; ++i) {
    ++g_checks;
    const Golden& g = kGolden[i];
    const uint64_t s = static_cast<uint64_t>(g.seed);
    const auto k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
    uint32_t h[4];
    lmfused::detail::philox_4x(k0, k1, static_cast<uint64_t>(g.idx), h);
    if (ints[2 * i] != g.i1 || ints[2 * i + 1] != g.i2 || h[0] != g.i1 || h[1] != g.i2)
      fail("philox ints differ from triton for golden #" + std::to_string(i));
    for (int j = 0; j < 12; ++j) {
      // the host reference (host libm) against the device's fast sin/cos: ~2^-21 absolute
      const float want =
          lmfused::detail::philox_normal(k0, k1, 4 * static_cast<uint64_t>(g.idx) + j % 4);
      if (!(std::fabs(normals[12 * i + j] - want) <= 1e-5f * (1.0f + std::fabs(want))))
        fail("philox normal " + std::to_string(j) + " differs from the host for golden #" +
             std::to_string(i));
    }
  }
  cudaFree(dg);
  cudaFree(di);
  cudaFree(dn);
}

// ----- noise statistics and reproducibility through the real forward kernel --------------------
void test_noise_stats() {
  const LMStepShape shape{4, 16, 128 * 128, false};  // 1M elements, vector path
  const size_t n = 4 * 16 * 128 * 128;
  float *u = nullptr, *out = nullptr, *out2 = nullptr, *k = nullptr;
  int64_t* seed = nullptr;
  CUDA_OK(cudaMalloc(&u, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&out, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&out2, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&k, sizeof(float)));
  CUDA_OK(cudaMalloc(&seed, sizeof(int64_t)));
  CUDA_OK(cudaMemset(u, 0, n * sizeof(float)));
  CUDA_OK(cudaMemset(k, 0, sizeof(float)));
  auto run = [&](int64_t s, float* dst) {
    CUDA_OK(cudaMemcpy(seed, &s, sizeof s, cudaMemcpyHostToDevice));
    CUDA_OK(lmfused::launch_lm_step_forward(DType::kFloat32, shape, u, u, nullptr, k, 1, nullptr,
                                            seed, 1.0, false, dst, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
  };
  std::vector<float> a(n), b(n);
  run(42, out);
  run(42, out2);
  CUDA_OK(cudaMemcpy(a.data(), out, n * sizeof(float), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(b.data(), out2, n * sizeof(float), cudaMemcpyDeviceToHost));
  ++g_checks;
  if (std::memcmp(a.data(), b.data(), n * sizeof(float)) != 0)
    fail("noise: same seed gave different values");
  double mean = 0, sq = 0;
  for (float x : a) mean += x;
  mean /= n;
  for (float x : a) sq += (x - mean) * (x - mean);
  const double sd = std::sqrt(sq / (n - 1));
  std::printf("noise: mean %.5f std %.5f over %zu samples\n", mean, sd, n);
  if (std::fabs(mean) > 0.005 || std::fabs(sd - 1.0) > 0.005) fail("noise: not ~N(0, 1)");
  // Neighbours share a Philox call (four normals per call, cos and sin of two angles): they
  // must still be uncorrelated, as must the 4th moment be that of a normal (3).
  double lag[4] = {0, 0, 0, 0}, m4 = 0;
  for (size_t i = 0; i + 4 < n; ++i)
    for (int d = 1; d <= 4; ++d) lag[d - 1] += (a[i] - mean) * (a[i + d] - mean);
  for (float x : a) m4 += std::pow((x - mean) / sd, 4);
  m4 /= n;
  const double var = sd * sd;
  std::printf("noise: lag-1..4 correlation %.5f %.5f %.5f %.5f, kurtosis %.4f\n", lag[0] / n / var,
              lag[1] / n / var, lag[2] / n / var, lag[3] / n / var, m4);
  for (double l : lag)
    if (std::fabs(l / n / (sd * sd)) > 0.005) fail("noise: neighbouring values are correlated");
  if (std::fabs(m4 - 3.0) > 0.03) fail("noise: 4th moment is not that of a normal");
  run(43, out2);
  CUDA_OK(cudaMemcpy(b.data(), out2, n * sizeof(float), cudaMemcpyDeviceToHost));
  size_t same = 0;
  for (size_t i = 0; i < n; ++i) same += a[i] == b[i];
  if (same > n / 1000) fail("noise: a different seed gave (mostly) the same values");
  cudaFree(u);
  cudaFree(out);
  cudaFree(out2);
  cudaFree(k);
  cudaFree(seed);
}

// ----- channels-last grad_k over the most chunks a reduction takes (kMaxPartials per group), merged
// by the last CTA, and what its bits depend on: nothing but the values and the shape (the same
// values at addresses that allow 128-bit, 64-bit and scalar loads give the same bits) ---------------
template <typename T>
void test_many_chunks(int64_t C, std::mt19937_64& rng) {
  using A = lmfused::detail::acc_t<T>;
  using Tr = Traits<T>;
  const LMStepShape shape{2, C, 4200, true};  // 8400 rows of C
  const size_t n = static_cast<size_t>(2 * C * 4200);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::vector<T> hu(n), hp(n), hg(n);
  for (size_t i = 0; i < n; ++i) {
    hu[i] = Tr::make(uni(rng));
    hp[i] = Tr::make(uni(rng));
    hg[i] = Tr::make(uni(rng));
  }
  std::vector<A> hk(static_cast<size_t>(C), A(0.25));
  A *dk = nullptr, *dgk = nullptr;
  CUDA_OK(cudaMalloc(&dk, C * sizeof(A)));
  CUDA_OK(cudaMalloc(&dgk, C * sizeof(A)));
  CUDA_OK(cudaMemcpy(dk, hk.data(), C * sizeof(A), cudaMemcpyHostToDevice));
  const Scratch scratch(lmfused::lm_step_backward_scratch(Tr::dtype, shape));
  std::vector<double> ref(static_cast<size_t>(C), 0.0), mag(ref.size(), 0.0);
  for (size_t i = 0; i < n; ++i) {
    const double t = Tr::val(hg[i]) * (Tr::val(hp[i]) - Tr::val(hu[i]));
    ref[i % C] += t;
    mag[i % C] += std::fabs(t);
  }
  std::vector<std::vector<A>> bits;
  const size_t elems16 = 16 / sizeof(T);
  for (size_t shift : {size_t{0}, elems16, elems16 / 2, size_t{1}}) {
    DevBuf<T> du(n, shift), dp(n, shift), dg(n, shift);
    du.upload(hu);
    dp.upload(hp);
    dg.upload(hg);
    CUDA_OK(lmfused::launch_lm_step_backward(Tr::dtype, shape, dg.data(), nullptr, du.data(),
                                             dp.data(), nullptr, dk, C, nullptr, false, nullptr,
                                             nullptr, nullptr, dgk, scratch.s, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<A> got(static_cast<size_t>(C));
    CUDA_OK(cudaMemcpy(got.data(), dgk, C * sizeof(A), cudaMemcpyDeviceToHost));
    ++g_checks;
    for (size_t c = 0; c < got.size(); ++c) {
      if (!(std::fabs(got[c] - ref[c]) <= 1e-5 * (mag[c] + 1.0))) {
        char what[160];
        std::snprintf(what, sizeof what,
                      "many chunks, C=%lld shift=%zu: grad_k[%zu] %.9g want %.9g",
                      static_cast<long long>(C), shift, c, static_cast<double>(got[c]), ref[c]);
        fail(std::string(Tr::name) + " " + what);
        break;
      }
    }
    if (!scratch.counters_zero()) fail(std::string(Tr::name) + " many chunks: counters left set");
    bits.push_back(got);
  }
  ++g_checks;
  for (size_t i = 1; i < bits.size(); ++i) {
    if (std::memcmp(bits[0].data(), bits[i].data(), C * sizeof(A)) != 0)
      fail(std::string(Tr::name) + " many chunks: grad_k bits changed with the alignment");
  }
  cudaFree(dk);
  cudaFree(dgk);
}

// ----- argument validation and empty tensors ---------------------------------------------------
void test_api_edges() {
  ++g_checks;
  float* buf = nullptr;
  CUDA_OK(cudaMalloc(&buf, 64 * sizeof(float)));
  const LMStepShape empty{0, 3, 4, false};
  if (lmfused::launch_lm_step_forward(DType::kFloat32, empty, buf, buf, nullptr, buf, 1, nullptr,
                                      nullptr, 0.0, false, buf, nullptr) != cudaSuccess)
    fail("empty forward should be a no-op");
  CUDA_OK(cudaMemset(buf, 0xFF, 3 * sizeof(float)));
  if (lmfused::launch_lm_step_backward(DType::kFloat32, empty, buf, nullptr, buf, buf, nullptr,
                                       buf, 3, nullptr, false, nullptr, nullptr, nullptr, buf,
                                       lmfused::ReductionScratch{}, nullptr) != cudaSuccess)
    fail("empty backward should succeed");
  float h[3];
  CUDA_OK(cudaMemcpy(h, buf, sizeof h, cudaMemcpyDeviceToHost));
  if (h[0] != 0.f || h[1] != 0.f || h[2] != 0.f) fail("empty backward: grad_k must be zeros");
  const LMStepShape s{2, 3, 4, false};
  if (lmfused::launch_lm_step_forward(DType::kFloat32, s, buf, buf, nullptr, buf, 2, nullptr,
                                      nullptr, 0.0, false, buf, nullptr) != cudaErrorInvalidValue)
    fail("k_numel not in {1, C} must be rejected");
  if (lmfused::launch_lm_step_forward(DType::kFloat32, s, buf, buf, nullptr, buf, 1, nullptr,
                                      nullptr, 0.5, false, buf, nullptr) != cudaErrorInvalidValue)
    fail("noise without a seed must be rejected");
  lmfused::ReductionScratch small = lmfused::lm_step_backward_scratch(DType::kFloat32, s);
  small.workspace = buf;
  small.counters = reinterpret_cast<unsigned*>(buf);
  small.counter_count -= 1;
  if (lmfused::launch_lm_step_backward(DType::kFloat32, s, buf, nullptr, buf, buf, nullptr,
                                       buf, 1, nullptr, false, nullptr, nullptr, nullptr, buf,
                                       small, nullptr) != cudaErrorInvalidValue)
    fail("too few ticket counters must be rejected");
  cudaGetLastError();
  cudaFree(buf);
}

template <typename T>
void run_dtype(std::mt19937_64& rng) {
  const Case cases[] = {
      {2, 3, 5, false},     // tiny, odd row length: scalar path
      {3, 4, 16, false},    // vector path for every dtype
      {4, 3, 2053, false},  // several chunks per channel, scalar path
      {4, 3, 2056, false},  // several chunks per channel, vector path
      {2, 1, 33, false},    // one channel
      {2, 3, 196, false},   // 14x14: 64-bit vectors for half/bf16, 128-bit for float
      {3, 2, 6, false},     // 64-bit vectors for float (and double's 128-bit), scalar for half/bf16
      {2, 12, 5, true},     // channels-last, C = 12: 64-bit vectors for half/bf16
      {2, 264, 9, true},    // channels-last, several column groups, partial last one
      {3, 300, 7, true},    // channels-last, C not a multiple of 8
      {4, 8, 1100, true},   // channels-last, several row chunks
      {5, 7, 1, true},      // rank-2 (N, C)
      {1, 1, 1, true},      // a single element
  };
  for (const Case& c : cases) {
    const uint64_t seed = rng();
    const std::vector<std::string> aligned = run_case<T>(c, 0, seed);
    for (int mode = 1; mode < 4; ++mode) {
      ++g_checks;
      if (run_case<T>(c, mode, seed) != aligned)
        fail(describe(Traits<T>::name, c, mode, "grad_k bits differ from the aligned run's"));
    }
  }
  std::printf("%-8s ok so far: %d failures after %d checks\n", Traits<T>::name, g_failures,
              g_checks);
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("skipped: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d); kernels built for %s\n", prop.name, prop.major, prop.minor,
              lmfused::compiled_cuda_archs());
  std::mt19937_64 rng(20180710);
  // LMFUSED_KERNEL_TESTS_OPS=lm_step,batch_norm (either; default both) picks the ops' tests.
  const char* ops_env = std::getenv("LMFUSED_KERNEL_TESTS_OPS");
  const std::string ops =
      std::string(",") + (ops_env != nullptr ? ops_env : "lm_step,batch_norm") + ",";
  const bool lm_step_tests = ops.find(",lm_step,") != std::string::npos;
  const bool batch_norm_tests = ops.find(",batch_norm,") != std::string::npos;
  // compute-sanitizer is slow, so the dtypes can be split over several runs:
  // LMFUSED_KERNEL_TESTS_DTYPES=float,bf16,half,double (any subset; default all), and
  // LMFUSED_KERNEL_TESTS_QUICK=1 is short for float,bf16.
  const char* dtypes_env = std::getenv("LMFUSED_KERNEL_TESTS_DTYPES");
  const char* quick_env = std::getenv("LMFUSED_KERNEL_TESTS_QUICK");
  std::string dtypes = dtypes_env != nullptr ? dtypes_env : "float,bf16,half,double";
  if (dtypes_env == nullptr && quick_env != nullptr && std::strcmp(quick_env, "1") == 0)
    dtypes = "float,bf16";
  const std::string list = "," + dtypes + ",";
  auto wanted = [&](const char* name) {
    return list.find(std::string(",") + name + ",") != std::string::npos;
  };
  if (lm_step_tests) {
    if (wanted("float")) {  // (the dtype-independent tests run with float's)
      test_philox_golden();
      test_api_edges();
      test_noise_stats();
      test_many_chunks<float>(128, rng);  // 128-bit units
      test_many_chunks<float>(33, rng);   // scalar units
      run_dtype<float>(rng);
    }
    if (wanted("bf16")) run_dtype<__nv_bfloat16>(rng);
    if (wanted("half")) run_dtype<__half>(rng);
    if (wanted("double")) run_dtype<double>(rng);
  }
  if (batch_norm_tests) lmf_test::run_batch_norm_tests(rng, wanted);
  if (g_failures) {
    std::printf("FAILED: %d failures in %d checks\n", g_failures, g_checks);
    return 1;
  }
  std::printf("passed: %d checks\n", g_checks);
  return 0;
}
