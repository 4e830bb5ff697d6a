// Kernel tests for the batch-norm-fused launchers (csrc/batch_norm_lm_step.h) against a float64
// host reference, on fresh random data: both layouts, odd sizes (tails, scalar paths), shifted
// buffers (every vector width), every flag (state or not, relu with the forward's output or the
// recomputed mask, scale, noise, weight/bias, training/eval, grad_shortcut, need_*, scalar and
// per-channel k), statistics with a large mean, out-of-bounds writes, and bitwise determinism of
// every reduction across runs and across buffer alignments; the reduction's ReLU mask recomputed
// with state gives bitwise the sums of the forward's own output (on data where the sign of the
// pre-activation hangs on its roundings). Run from test_lm_step_kernels.cu's main (one
// executable).
#include <functional>
#include <limits>
#include <random>
#include <type_traits>

#include "../batch_norm_lm_step.h"
#include "../lm_step.cuh"
#include "test_common.h"

namespace lmf_test {
namespace {

template <typename T>
using Acc = lmfused::detail::acc_t<T>;

// x's offset (a large mean that would cancel the variance's digits without the shift): as large
// as the dtype keeps the spread of x (+-1) to 1/16 of a unit or better.
template <typename T>
double x_offset() {
  if (sizeof(T) == 8) return 1.0e6;
  if (std::is_same<T, float>::value) return 1000.0;
  if (std::is_same<T, __half>::value) return 64.0;
  return 8.0;  // bf16
}

// The accumulator-type copy of the host data the device sees.
template <typename T>
struct Channels {
  std::vector<Acc<T>> v;
  Acc<T>* dev = nullptr;
  explicit Channels(std::vector<Acc<T>> values) : v(std::move(values)) {
    CUDA_OK(cudaMalloc(&dev, (v.size() + 1) * sizeof(Acc<T>)));
    CUDA_OK(cudaMemcpy(dev, v.data(), v.size() * sizeof(Acc<T>), cudaMemcpyHostToDevice));
  }
  explicit Channels(size_t n) : Channels(std::vector<Acc<T>>(n, Acc<T>(0))) {}
  ~Channels() { cudaFree(dev); }
  Channels(const Channels&) = delete;
  Channels& operator=(const Channels&) = delete;
  std::vector<Acc<T>> download() const {
    std::vector<Acc<T>> h(v.size());
    CUDA_OK(cudaMemcpy(h.data(), dev, h.size() * sizeof(Acc<T>), cudaMemcpyDeviceToHost));
    return h;
  }
};

template <typename T, typename... Args>
std::string what_of(const Case& cs, int mode, const char* fmt, Args... args) {
  char buf[200];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return describe(Traits<T>::name, cs, mode, buf);
}

template <typename A>
bool same_bits(const std::vector<std::vector<A>>& a, const std::vector<std::vector<A>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].size() != b[i].size() ||
        std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(A)) != 0)
      return false;
  }
  return true;
}

// One shape: the host data is drawn once; every alignment mode runs on it, so the reductions'
// bits can be compared across modes. mode 0: aligned; 1: every buffer one element off (scalar
// loads); 3: every buffer 8 bytes off (64-bit loads); 2: inputs aligned, outputs one element off.
template <typename T>
void bn_case(const Case& cs, std::mt19937_64& rng) {
  using A = Acc<T>;
  using Tr = Traits<T>;
  const size_t n = static_cast<size_t>(cs.N * cs.C * cs.S);
  const size_t C = static_cast<size_t>(cs.C);
  const LMStepShape shape{cs.N, cs.C, cs.S, cs.cl};
  const double count = static_cast<double>(cs.N * cs.S);
  auto chan = [&](size_t i) -> size_t { return cs.cl ? i % C : (i / cs.S) % C; };
  auto samp = [&](size_t i) -> size_t { return i / (C * cs.S); };

  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  auto rand_vec = [&](size_t len, double offset) {
    std::vector<T> v(len);
    for (auto& x : v) x = Tr::make(offset + uni(rng));
    return v;
  };
  auto rand_acc = [&](size_t len, double lo, double hi) {
    std::vector<A> v(len);
    for (auto& x : v) x = static_cast<A>(lo + (hi - lo) * (uni(rng) + 1.0) / 2.0);
    return v;
  };
  const double offset = x_offset<T>();
  const std::vector<T> hx = rand_vec(n, offset), hu = rand_vec(n, 0);
  std::vector<T> hp = rand_vec(n, 0);  // some values set below: a pre-activation near 0
  const std::vector<T> hg = rand_vec(n, 0), hsc = rand_vec(n, 0);
  // Per-channel operands: mean near x's (so y is O(1)), positive invstd, any weight/bias/k.
  std::vector<A> mean_v = rand_acc(C, -0.25, 0.25);
  for (auto& m : mean_v) m = static_cast<A>(m + offset);
  const Channels<T> mean(mean_v), invstd(rand_acc(C, 0.5, 2.0)), weight(rand_acc(C, -1.5, 1.5)),
      bias(rand_acc(C, -0.5, 0.5)), k(rand_acc(C, -0.5, 0.5)), scale(rand_acc(cs.N, 0.5, 2.5)),
      mean_dy(rand_acc(C, -0.5, 0.5)), mean_dy_xhat(rand_acc(C, -0.5, 0.5));
  const int64_t seed_value = static_cast<int64_t>(0x0F1E2D3C4B5A6978ull);
  int64_t* dseed = nullptr;
  CUDA_OK(cudaMalloc(&dseed, sizeof(int64_t)));
  CUDA_OK(cudaMemcpy(dseed, &seed_value, sizeof seed_value, cudaMemcpyHostToDevice));
  const uint32_t key0 = static_cast<uint32_t>(seed_value),
                 key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed_value) >> 32);
  const double noise_std = 0.25;
  const size_t ws_bytes = lmfused::batch_norm_workspace_bytes(Tr::dtype, shape);
  void* dws = nullptr;
  CUDA_OK(cudaMalloc(&dws, ws_bytes + 1));

  // The forward's branch term z = s * ((x - mean) * invstd * w + b), in the accumulator type,
  // one rounding per operation in the kernels' order; then rounded to T. Its sign is the
  // no-state ReLU mask, which must match the forward bit for bit.
  auto z_rounded = [&](size_t i, bool has_s, bool has_w, bool has_b) {
    const size_t c = chan(i);
    A t = static_cast<A>(Tr::val(hx[i])) + (-mean.v[c]);
    t = t * invstd.v[c];
    t = t * (has_w ? weight.v[c] : A(1));
    t = t + (has_b ? bias.v[c] : A(0));
    t = (has_s ? scale.v[samp(i)] : A(1)) * t;
    return Tr::val(Tr::make(static_cast<double>(t)));
  };
  auto y_ref = [&](size_t i, bool has_w, bool has_b) {  // float64 reference of BN(x)
    const size_t c = chan(i);
    const double xhat = (Tr::val(hx[i]) - mean.v[c]) * static_cast<double>(invstd.v[c]);
    return xhat * (has_w ? weight.v[c] : 1.0) + (has_b ? bias.v[c] : 0.0);
  };
  // Every other element: u_prev such that the noise-free pre-activation with state,
  // (1 - k) u + k u_prev + s y, is 0 up to u_prev's rounding, for one of the eight (scale, per-
  // channel k, weight and bias) settings by turns. In float and double its sign is then set by
  // the roundings of the arithmetic, so a mask recomputed in another operation order than the
  // forward's differs from the forward's output somewhere.
  for (size_t i = 1; i < n; i += 2) {
    const size_t cfg = (i / 2) % 8, c = chan(i);
    const bool has_s = cfg & 1, per_ch = cfg & 2, wb = cfg & 4;
    const double kk = k.v[per_ch ? c : 0];
    if (std::fabs(kk) < 0.25) continue;  // keeps u_prev O(10)
    const double branch = (has_s ? scale.v[samp(i)] : 1.0) * y_ref(i, wb, wb);
    hp[i] = Tr::make(-(branch + (1.0 - kk) * Tr::val(hu[i])) / kk);
  }

  // ---- statistics: two-pass reference, summed in long double (a float64 sum of values near 1e6
  // would be off by more than the kernels' double result), tolerance of the accumulator type
  std::vector<long double> sum_x(C, 0.0L), sum_d2(C, 0.0L);
  for (size_t i = 0; i < n; ++i) sum_x[chan(i)] += Tr::val(hx[i]);
  std::vector<double> ref_mean(C, 0.0), ref_var(C, 0.0);
  for (size_t c = 0; c < C; ++c) ref_mean[c] = static_cast<double>(sum_x[c] / count);
  for (size_t i = 0; i < n; ++i) {
    const long double d = Tr::val(hx[i]) - sum_x[chan(i)] / count;
    sum_d2[chan(i)] += d * d;
  }
  for (size_t c = 0; c < C; ++c) ref_var[c] = static_cast<double>(sum_d2[c] / count);
  const double acc_eps = sizeof(A) == 8 ? 1e-13 : 1e-5;

  std::vector<std::vector<A>> sums_mode0;  // every reduction's bits in mode 0
  for (int mode : {0, 1, 2, 3}) {
    const size_t half_vector = 8 / sizeof(T);
    const size_t in_shift = mode == 1 ? 1 : mode == 3 ? half_vector : 0;
    const size_t out_shift = mode == 3 ? half_vector : mode >= 1 ? 1 : 0;
    DevBuf<T> dx(n, in_shift), du(n, in_shift), dp(n, in_shift), dg(n, in_shift),
        dsc(n, in_shift), dout(n, in_shift), dres(n, out_shift), dgx(n, out_shift),
        dgu(n, out_shift), dgp(n, out_shift);
    dx.upload(hx);
    du.upload(hu);
    dp.upload(hp);
    dg.upload(hg);
    dsc.upload(hsc);
    std::vector<std::vector<A>> sums;  // this mode's reductions, in a fixed order

    // -- statistics
    {
      Channels<T> m(C), v(C);
      CUDA_OK(lmfused::launch_batch_norm_stats(Tr::dtype, shape, dx.data(), m.dev, v.dev, dws,
                                               ws_bytes, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const std::vector<A> gm = m.download(), gv = v.download();
      ++g_checks;
      for (size_t c = 0; c < C; ++c) {
        // the mean: a few roundings of its own size, plus the sums' error
        const double mean_tol = 4 * std::numeric_limits<A>::epsilon() * std::fabs(ref_mean[c]) +
                                acc_eps * (std::sqrt(ref_var[c]) + 1.0);
        if (!(std::fabs(gm[c] - ref_mean[c]) <= mean_tol) ||
            !(std::fabs(gv[c] - ref_var[c]) <= acc_eps * (ref_var[c] + 1e-3))) {
          fail(what_of<T>(cs, mode, "stats [%zu]: mean off by %.3g, var off by %.3g (var %.6g)", c,
                          gm[c] - ref_mean[c], gv[c] - ref_var[c], ref_var[c]));
          break;
        }
      }
      sums.push_back(gm);
      sums.push_back(gv);
    }

    // -- forward: STATE, HAS_SCALE, RELU, HAS_NOISE, per-channel k, weight, bias
    std::vector<T> hout;  // with state, scale, relu, weight, bias: the backward's out mask
    for (int bits = 0; bits < 128; ++bits) {
      const bool state = bits & 1, has_s = bits & 2, relu = bits & 4, noise = bits & 8,
                 per_ch = bits & 16, has_w = bits & 32, has_b = bits & 64;
      if (per_ch && !state) continue;  // k is not read without state
      dres.poison();
      CUDA_OK(lmfused::launch_batch_norm_lm_step_forward(
          Tr::dtype, shape, dx.data(), mean.dev, invstd.dev, has_w ? weight.dev : nullptr,
          has_b ? bias.dev : nullptr, state ? du.data() : nullptr, state ? dp.data() : nullptr,
          k.dev, per_ch ? cs.C : 1, has_s ? scale.dev : nullptr, noise ? dseed : nullptr,
          noise ? noise_std : 0.0, relu, dres.data(), nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const std::vector<T> ho = dres.download();
      ++g_checks;
      const double tol = Tr::tol + (noise && Tr::tol < 1e-6 ? 1e-6 : 0.0);
      for (size_t i = 0; i < n; ++i) {
        const double kk = state ? k.v[per_ch ? chan(i) : 0] : 0.0;
        double x = (has_s ? scale.v[samp(i)] : 1.0) * y_ref(i, has_w, has_b);
        if (state) x += (1.0 - kk) * Tr::val(hu[i]) + kk * Tr::val(hp[i]);
        if (noise) x += noise_std * lmfused::detail::philox_normal(key0, key1, i);
        if (relu) x = x < 0 ? 0 : x;
        bool ok = close(Tr::val(ho[i]), x, tol);
        // No state, no noise: exactly zero where the recomputed z <= 0, positive elsewhere.
        if (ok && relu && !state && !noise) {
          ok = (z_rounded(i, has_s, has_w, has_b) <= 0) == (Tr::val(ho[i]) <= 0);
        }
        if (!ok) {
          fail(what_of<T>(cs, mode, "forward bits=%d %s at %zu: got %.9g want %.9g", bits, "out",
                          i, Tr::val(ho[i]), x));
          break;
        }
      }
      if (!dres.guards_intact()) fail(describe(Tr::name, cs, mode, "forward out of bounds"));
      if (bits == (1 | 2 | 4 | 16 | 32 | 64)) hout = ho;
    }
    dout.upload(hout);

    // g through the mask: 0 none, 1 the forward's out, 2 recomputed (weight and bias given)
    auto masked = [&](int mask, bool has_s, size_t i) {
      const double g = Tr::val(hg[i]);
      if (mask == 1) return Tr::val(hout[i]) <= 0 ? 0.0 : g;
      if (mask == 2) return z_rounded(i, has_s, true, true) <= 0 ? 0.0 : g;
      return g;
    };

    // -- backward_reduce: mask, scale, need_k (with state), and weight/bias given or not when
    // the mask does not read them
    for (int bits = 0; bits < 24; ++bits) {
      const int mask = bits % 3;
      const bool has_s = (bits / 3) & 1, need_k = (bits / 6) & 1, wb = (bits / 12) & 1;
      if (mask == 2 && (need_k || !wb)) continue;  // no state (state: below); z needs w, b here
      Channels<T> sdy(C), sdyx(C), sk(C);
      auto launch = [&] {
        return lmfused::launch_batch_norm_lm_step_backward_reduce(
            Tr::dtype, shape, dg.data(), dx.data(), mean.dev, invstd.dev,
            wb ? weight.dev : nullptr, wb ? bias.dev : nullptr, need_k ? du.data() : nullptr,
            need_k ? dp.data() : nullptr, k.dev, 1, mask == 1 ? dout.data() : nullptr,
            has_s ? scale.dev : nullptr, mask != 0, sdy.dev, sdyx.dev, need_k ? sk.dev : nullptr,
            dws, ws_bytes, nullptr);
      };
      CUDA_OK(launch());
      CUDA_OK(cudaDeviceSynchronize());
      const std::vector<A> a1 = sdy.download(), a2 = sdyx.download(), a3 = sk.download();
      CUDA_OK(launch());  // a second run: the same bits
      CUDA_OK(cudaDeviceSynchronize());
      ++g_checks;
      if (!same_bits<A>({a1, a2, a3}, {sdy.download(), sdyx.download(), sk.download()}))
        fail(what_of<T>(cs, mode, "reduce bits=%d: not deterministic", bits));
      std::vector<double> r1(C, 0.0), r2(C, 0.0), r3(C, 0.0), m1(C, 0.0), m2(C, 0.0), m3(C, 0.0);
      for (size_t i = 0; i < n; ++i) {
        const size_t c = chan(i);
        const double g = masked(mask, has_s, i), dy = (has_s ? scale.v[samp(i)] : 1.0) * g;
        const double xhat = (Tr::val(hx[i]) - mean.v[c]) * static_cast<double>(invstd.v[c]);
        const double t = g * (Tr::val(hp[i]) - Tr::val(hu[i]));
        r1[c] += dy;
        m1[c] += std::fabs(dy);
        r2[c] += dy * xhat;
        m2[c] += std::fabs(dy * xhat);
        r3[c] += t;
        m3[c] += std::fabs(t);
      }
      for (size_t c = 0; c < C; ++c) {
        const bool bad = !(std::fabs(a1[c] - r1[c]) <= acc_eps * (m1[c] + 1.0)) ||
                         !(std::fabs(a2[c] - r2[c]) <= acc_eps * (m2[c] + 1.0)) ||
                         (need_k && !(std::fabs(a3[c] - r3[c]) <= acc_eps * (m3[c] + 1.0)));
        if (bad) {
          fail(what_of<T>(cs, mode, "reduce bits=%d [%zu]: sums off by %.3g, %.3g, %.3g", bits,
                          c, a1[c] - r1[c], a2[c] - r2[c], a3[c] - r3[c]));
          break;
        }
      }
      sums.push_back(a1);
      sums.push_back(a2);
      if (need_k) sums.push_back(a3);
    }

    // -- backward_reduce with relu, no out and state: the mask recomputed from x, u, u_prev and k
    // gives bitwise the sums of the mask read from the forward's own output (noise-free), for
    // scale, scalar or per-channel k, weight and bias, need_k; out sits one element off in modes
    // 1 and 2, so the two reductions also load at different widths.
    for (int bits = 0; bits < 16; ++bits) {
      const bool has_s = bits & 1, per_ch = bits & 2, wb = bits & 4, need_k = bits & 8;
      const int64_t k_numel = per_ch ? cs.C : 1;
      const Acc<T>* w = wb ? weight.dev : nullptr;
      const Acc<T>* b = wb ? bias.dev : nullptr;
      const Acc<T>* sp = has_s ? scale.dev : nullptr;
      dres.poison();
      CUDA_OK(lmfused::launch_batch_norm_lm_step_forward(
          Tr::dtype, shape, dx.data(), mean.dev, invstd.dev, w, b, du.data(), dp.data(), k.dev,
          k_numel, sp, nullptr, 0.0, /*relu=*/true, dres.data(), nullptr));
      std::vector<std::vector<A>> with_out, recomputed;
      for (bool from_out : {true, false}) {
        Channels<T> sdy(C), sdyx(C), sk(C);
        CUDA_OK(lmfused::launch_batch_norm_lm_step_backward_reduce(
            Tr::dtype, shape, dg.data(), dx.data(), mean.dev, invstd.dev, w, b, du.data(),
            dp.data(), from_out ? nullptr : k.dev, k_numel, from_out ? dres.data() : nullptr, sp,
            /*relu=*/true, sdy.dev, sdyx.dev, need_k ? sk.dev : nullptr, dws, ws_bytes, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        auto& dst = from_out ? with_out : recomputed;
        dst = {sdy.download(), sdyx.download()};
        if (need_k) dst.push_back(sk.download());
      }
      ++g_checks;
      if (!same_bits(recomputed, with_out)) {
        size_t c = 0;
        while (c < C && recomputed[0][c] == with_out[0][c] && recomputed[1][c] == with_out[1][c])
          ++c;
        fail(what_of<T>(cs, mode, "reduce, mask with state bits=%d: sums differ from out's "
                        "(first at channel %zu)", bits, c));
      }
      for (auto& v : recomputed) sums.push_back(v);
    }

    // -- backward: mask, scale, training, grad_x, grad_u (with or without grad_shortcut),
    // grad_u_prev, per-channel k
    for (int bits = 0; bits < 288; ++bits) {
      const int mask = bits % 3, umode = (bits / 3) % 3;
      const bool has_s = (bits / 9) & 1, training = (bits / 18) & 1, nx = (bits / 36) & 1,
                 nup = (bits / 72) & 1, per_ch = (bits / 144) & 1;
      const bool nu = umode != 0, sc = umode == 2;
      if (mask == 2 && (nu || nup)) continue;     // no state: no grad_u, grad_u_prev
      if (!nx && !nu && !nup) continue;           // nothing to do
      if (!nx && training) continue;              // training only changes grad_x
      if (!nu && !nup && per_ch) continue;        // k only enters grad_u, grad_u_prev
      dgx.poison();
      dgu.poison();
      dgp.poison();
      CUDA_OK(lmfused::launch_batch_norm_lm_step_backward(
          Tr::dtype, shape, dg.data(), sc ? dsc.data() : nullptr, dx.data(), mean.dev,
          invstd.dev, weight.dev, bias.dev, mean_dy.dev, mean_dy_xhat.dev,
          mask == 1 ? dout.data() : nullptr, k.dev, per_ch ? cs.C : 1,
          has_s ? scale.dev : nullptr, training, mask != 0, nx ? dgx.data() : nullptr,
          nu ? dgu.data() : nullptr, nup ? dgp.data() : nullptr, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      ++g_checks;
      auto check = [&](const DevBuf<T>& buf, bool needed, const char* name, auto ref_of) {
        const std::vector<T> h = buf.download();
        if (!needed) {  // never written: still fully poisoned
          std::vector<unsigned char> ff(n * sizeof(T), 0xFF);
          if (std::memcmp(h.data(), ff.data(), n * sizeof(T)) != 0)
            fail(what_of<T>(cs, mode, "backward bits=%d wrote %s", bits, name));
          return;
        }
        for (size_t i = 0; i < n; ++i) {
          const double want = ref_of(i);
          if (!close(Tr::val(h[i]), want, Tr::tol)) {
            fail(what_of<T>(cs, mode, "backward bits=%d %s at %zu: got %.9g want %.9g", bits,
                            name, i, Tr::val(h[i]), want));
            break;
          }
        }
        if (!buf.guards_intact())
          fail(what_of<T>(cs, mode, "backward bits=%d %s out of bounds", bits, name));
      };
      auto kk = [&](size_t i) { return static_cast<double>(k.v[per_ch ? chan(i) : 0]); };
      check(dgx, nx, "grad_x", [&](size_t i) {
        const size_t c = chan(i);
        double dy = (has_s ? scale.v[samp(i)] : 1.0) * masked(mask, has_s, i);
        if (training) {
          const double xhat = (Tr::val(hx[i]) - mean.v[c]) * static_cast<double>(invstd.v[c]);
          dy = dy - mean_dy.v[c] - xhat * mean_dy_xhat.v[c];
        }
        return dy * static_cast<double>(invstd.v[c]) * weight.v[c];
      });
      check(dgu, nu, "grad_u", [&](size_t i) {  // the shortcut's gradient is not masked
        return (1.0 - kk(i)) * masked(mask, has_s, i) + (sc ? Tr::val(hsc[i]) : 0.0);
      });
      check(dgp, nup, "grad_u_prev", [&](size_t i) { return kk(i) * masked(mask, has_s, i); });
    }

    // The reductions' bits do not depend on the buffers' alignment.
    ++g_checks;
    if (mode == 0) {
      sums_mode0 = sums;
    } else if (!same_bits(sums, sums_mode0)) {
      fail(describe(Tr::name, cs, mode, "reduction bits differ from the aligned run's"));
    }
  }
  cudaFree(dseed);
  cudaFree(dws);
}

// Channels-last statistics over more than 256 row tiles: the column sums run in two segments
// (reduce_columns_kernel's scratch after the three partial arrays).
void bn_many_row_tiles(std::mt19937_64& rng) {
  const LMStepShape shape{2, 2, 140000, true};
  const size_t n = 2 * 2 * 140000;
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::vector<float> hx(n);
  for (auto& x : hx) x = static_cast<float>(100.0 + uni(rng));
  DevBuf<float> dx(n, 0);
  dx.upload(hx);
  const size_t ws_bytes = lmfused::batch_norm_workspace_bytes(DType::kFloat32, shape);
  void* dws = nullptr;
  float* dstat = nullptr;
  CUDA_OK(cudaMalloc(&dws, ws_bytes));
  CUDA_OK(cudaMalloc(&dstat, 4 * sizeof(float)));
  CUDA_OK(lmfused::launch_batch_norm_stats(DType::kFloat32, shape, dx.data(), dstat, dstat + 2,
                                           dws, ws_bytes, nullptr));
  float got[4];
  CUDA_OK(cudaMemcpy(got, dstat, sizeof got, cudaMemcpyDeviceToHost));
  double mean[2] = {0, 0}, var[2] = {0, 0};
  for (size_t i = 0; i < n; ++i) mean[i % 2] += hx[i];
  for (double& m : mean) m /= n / 2;
  for (size_t i = 0; i < n; ++i) var[i % 2] += (hx[i] - mean[i % 2]) * (hx[i] - mean[i % 2]);
  for (double& v : var) v /= n / 2;
  ++g_checks;
  for (int c = 0; c < 2; ++c) {
    if (!(std::fabs(got[c] - mean[c]) <= 2e-5 && std::fabs(got[2 + c] - var[c]) <= 1e-5))
      fail("float32 many row tiles: statistics of channel " + std::to_string(c) + " off");
  }
  cudaFree(dws);
  cudaFree(dstat);
}

// Argument checks and empty shapes.
void bn_api_edges() {
  ++g_checks;
  float* buf = nullptr;
  CUDA_OK(cudaMalloc(&buf, 64 * sizeof(float)));
  const LMStepShape empty{0, 3, 4, false}, s{2, 3, 4, false};
  CUDA_OK(cudaMemset(buf, 0, 64 * sizeof(float)));
  if (lmfused::launch_batch_norm_stats(DType::kFloat32, empty, nullptr, buf, buf + 3, nullptr, 0,
                                       nullptr) != cudaSuccess)
    fail("empty statistics should succeed");
  float h[6];
  CUDA_OK(cudaMemcpy(h, buf, sizeof h, cudaMemcpyDeviceToHost));
  for (float v : h)
    if (!std::isnan(v)) fail("empty statistics: NaN expected");
  CUDA_OK(cudaMemset(buf, 0xFF, 9 * sizeof(float)));
  if (lmfused::launch_batch_norm_lm_step_backward_reduce(
          DType::kFloat32, empty, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, buf, buf,
          nullptr, 1, nullptr, nullptr, false, buf, buf + 3, buf + 6, nullptr, 0,
          nullptr) != cudaSuccess)
    fail("empty backward_reduce should succeed");
  CUDA_OK(cudaMemcpy(h, buf, sizeof h, cudaMemcpyDeviceToHost));
  for (float v : h)
    if (v != 0.f) fail("empty backward_reduce: zero sums expected");
  if (lmfused::launch_batch_norm_lm_step_forward(DType::kFloat32, s, buf, buf, buf, nullptr,
                                                 nullptr, buf, nullptr, buf, 1, nullptr, nullptr,
                                                 0.0, false, buf, nullptr) != cudaErrorInvalidValue)
    fail("forward with u but no u_prev must be rejected");
  if (lmfused::launch_batch_norm_stats(DType::kFloat32, s, buf, buf, buf, buf, 0, nullptr) !=
      cudaErrorInvalidValue)
    fail("statistics with too small a workspace must be rejected");
  if (lmfused::launch_batch_norm_lm_step_backward(
          DType::kFloat32, s, buf, nullptr, buf, buf, buf, nullptr, nullptr, nullptr, nullptr,
          nullptr, buf, 1, nullptr, false, true, nullptr, buf, nullptr,
          nullptr) != cudaErrorInvalidValue)
    fail("grad_u with a recomputed (no-state) mask must be rejected");
  // The reduction's mask recomputed with state needs u, u_prev and k (1 or C values).
  const size_t ws = lmfused::batch_norm_workspace_bytes(DType::kFloat32, s);
  void* dws = nullptr;
  CUDA_OK(cudaMalloc(&dws, ws));
  auto reduce = [&](const float* u, const float* up, const float* k, int64_t k_numel) {
    return lmfused::launch_batch_norm_lm_step_backward_reduce(
        DType::kFloat32, s, buf, buf, buf, buf, nullptr, nullptr, u, up, k, k_numel, nullptr,
        nullptr, true, buf + 40, buf + 44, nullptr, dws, ws, nullptr);
  };
  if (reduce(buf, nullptr, buf, 1) != cudaErrorInvalidValue)
    fail("reduce, recomputed mask with u but no u_prev must be rejected");
  if (reduce(buf, buf, nullptr, 1) != cudaErrorInvalidValue)
    fail("reduce, recomputed mask with state but no k must be rejected");
  if (reduce(buf, buf, buf, 2) != cudaErrorInvalidValue)
    fail("reduce, recomputed mask with state and a k of 2 values (C = 3) must be rejected");
  CUDA_OK(cudaMemset(buf, 0, 64 * sizeof(float)));
  if (reduce(buf, buf, buf, 3) != cudaSuccess || reduce(nullptr, nullptr, nullptr, 1) != cudaSuccess)
    fail("reduce, recomputed mask with or without state should succeed");
  CUDA_OK(cudaDeviceSynchronize());
  cudaFree(dws);
  cudaFree(buf);
}

template <typename T>
void bn_dtype(std::mt19937_64& rng) {
  const Case cases[] = {
      {2, 3, 5, false},     // odd row length: scalar path
      {3, 2, 16, false},    // vector path for every dtype
      {3, 2, 1030, false},  // several tiles per channel, a 64-bit width for 16-bit types
      {2, 3, 196, false},   // 14x14
      {2, 12, 5, true},     // channels-last, C = 12
      {3, 40, 30, true},    // several row tiles; C not a multiple of 16 bytes for 16-bit types
      {2, 264, 3, true},    // several column tiles, a partial last one
      {5, 7, 1, true},      // rank-2 (N, C), odd C
  };
  for (const Case& c : cases) bn_case<T>(c, rng);
  std::printf("%-8s batch norm: %d failures after %d checks\n", Traits<T>::name, g_failures,
              g_checks);
}

}  // namespace

void run_batch_norm_tests(std::mt19937_64& rng, const std::function<bool(const char*)>& wanted) {
  bn_api_edges();
  if (wanted("float")) {
    bn_many_row_tiles(rng);
    bn_dtype<float>(rng);
  }
  if (wanted("bf16")) bn_dtype<__nv_bfloat16>(rng);
  if (wanted("half")) bn_dtype<__half>(rng);
  if (wanted("double")) bn_dtype<double>(rng);
}

}  // namespace lmf_test
