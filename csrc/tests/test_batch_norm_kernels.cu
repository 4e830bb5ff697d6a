// Kernel tests for the batch-norm-fused launchers (csrc/batch_norm_lm_step.h) against a float64
// host reference (long double for the statistics), on fresh random data: both layouts, odd sizes
// (short units, scalar paths), shifted buffers (every vector width), every flag (state or not,
// relu with the forward's 1-bit mask or the recomputed no-state mask, scale, noise, weight/bias,
// training/evaluation, running statistics of every float dtype, grad_handoff (the output's
// gradient in two parts, also at another alignment than the other buffers), grad_shortcut,
// need_*, scalar and per-channel k), statistics with a large mean, out-of-bounds writes. The
// forward's output is bitwise the host's one-rounding-per-operation computation in torch's order
// (so its mask is the reference backend's), also on data where the pre-activation's sign hangs on
// the roundings; the mask's bits, byte layout and padding; every reduction bitwise the same in
// every CTA order the emulation can run (the last CTA merges) and at every buffer alignment, its
// ticket counters back at zero. Run from test_lm_step_kernels.cu's main (one executable).
#include <algorithm>
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

// A device copy of host values (accumulator type by default).
template <typename V>
struct DevVec {
  std::vector<V> v;
  V* dev = nullptr;
  explicit DevVec(std::vector<V> values) : v(std::move(values)) {
    CUDA_OK(cudaMalloc(&dev, (v.size() + 1) * sizeof(V)));
    CUDA_OK(cudaMemcpy(dev, v.data(), v.size() * sizeof(V), cudaMemcpyHostToDevice));
  }
  explicit DevVec(size_t n) : DevVec(std::vector<V>(n, V())) {}
  ~DevVec() { cudaFree(dev); }
  DevVec(const DevVec&) = delete;
  DevVec& operator=(const DevVec&) = delete;
  void upload() { CUDA_OK(cudaMemcpy(dev, v.data(), v.size() * sizeof(V), cudaMemcpyHostToDevice)); }
  std::vector<V> download() const {
    std::vector<V> h(v.size());
    CUDA_OK(cudaMemcpy(h.data(), dev, h.size() * sizeof(V), cudaMemcpyDeviceToHost));
    return h;
  }
};

template <typename T, typename... Args>
std::string what_of(const Case& cs, int mode, const char* fmt, Args... args) {
  char buf[240];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return describe(Traits<T>::name, cs, mode, buf);
}

// The 1-bit mask's size for a shape: rows x ceil(row length / 8).
inline size_t mask_bytes(const Case& cs) {
  const int64_t rows = cs.cl ? cs.N * cs.S : cs.N * cs.C, len = cs.cl ? cs.C : cs.S;
  return static_cast<size_t>(rows * ((len + 7) / 8));
}

// Float dtypes of the running statistics, by turns.
struct RunningType {
  DType dtype;
  const char* name;
};
const RunningType kRunningTypes[] = {{DType::kFloat32, "float32"},
                                     {DType::kFloat16, "float16"},
                                     {DType::kBFloat16, "bfloat16"},
                                     {DType::kFloat64, "float64"}};

// Running statistics of one dtype on the device (C values each), as doubles on the host.
struct Running {
  DType dtype;
  size_t C;
  void* mean = nullptr;
  void* var = nullptr;
  Running(DType d, const std::vector<double>& m, const std::vector<double>& v) : dtype(d), C(m.size()) {
    CUDA_OK(cudaMalloc(&mean, C * 8 + 8));
    CUDA_OK(cudaMalloc(&var, C * 8 + 8));
    reset(m, v);
  }
  void reset(const std::vector<double>& m, const std::vector<double>& v) {
    upload(mean, m);
    upload(var, v);
  }
  ~Running() {
    cudaFree(mean);
    cudaFree(var);
  }
  Running(const Running&) = delete;
  Running& operator=(const Running&) = delete;
  size_t elem() const { return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2; }
  void upload(void* d, const std::vector<double>& h) {
    std::vector<unsigned char> bytes(C * elem());
    for (size_t c = 0; c < C; ++c) {
      if (dtype == DType::kFloat64) {
        std::memcpy(&bytes[c * 8], &h[c], 8);
      } else if (dtype == DType::kFloat32) {
        const float f = static_cast<float>(h[c]);
        std::memcpy(&bytes[c * 4], &f, 4);
      } else if (dtype == DType::kFloat16) {
        const __half f = __float2half_rn(static_cast<float>(h[c]));
        std::memcpy(&bytes[c * 2], &f, 2);
      } else {
        const __nv_bfloat16 f = __float2bfloat16_rn(static_cast<float>(h[c]));
        std::memcpy(&bytes[c * 2], &f, 2);
      }
    }
    CUDA_OK(cudaMemcpy(d, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  }
  std::vector<double> download(const void* d) const {
    std::vector<unsigned char> bytes(C * elem());
    CUDA_OK(cudaMemcpy(bytes.data(), d, bytes.size(), cudaMemcpyDeviceToHost));
    std::vector<double> h(C);
    for (size_t c = 0; c < C; ++c) {
      if (dtype == DType::kFloat64) {
        std::memcpy(&h[c], &bytes[c * 8], 8);
      } else if (dtype == DType::kFloat32) {
        float f;
        std::memcpy(&f, &bytes[c * 4], 4);
        h[c] = f;
      } else if (dtype == DType::kFloat16) {
        __half f;
        std::memcpy(&f, &bytes[c * 2], 2);
        h[c] = __half2float(f);
      } else {
        __nv_bfloat16 f;
        std::memcpy(&f, &bytes[c * 2], 2);
        h[c] = __bfloat162float(f);
      }
    }
    return h;
  }
  // The tolerance of a value rounded to this dtype.
  double tol() const {
    return dtype == DType::kFloat64 ? 1e-12 : dtype == DType::kFloat32 ? 2e-6
           : dtype == DType::kFloat16 ? 1e-3 : 8e-3;
  }
};

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
  const int64_t L = cs.cl ? cs.C : cs.S;
  const size_t Bm = static_cast<size_t>((L + 7) / 8), nmask = mask_bytes(cs);
  auto chan = [&](size_t i) -> size_t { return cs.cl ? i % C : (i / cs.S) % C; };
  auto samp = [&](size_t i) -> size_t { return i / (C * cs.S); };
  auto mask_pos = [&](size_t i, size_t& byte, int& bit) {  // element i's bit in the 2-D view
    const size_t row = i / static_cast<size_t>(L), col = i % static_cast<size_t>(L);
    byte = row * Bm + col / 8;
    bit = static_cast<int>(col % 8);
  };

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
  const std::vector<T> hg = rand_vec(n, 0), hh = rand_vec(n, 0), hsc = rand_vec(n, 0);
  // Per-channel operands: mean near x's (so y is O(1)), positive invstd, any weight/bias/k.
  std::vector<A> mean_v = rand_acc(C, -0.25, 0.25);
  for (auto& m : mean_v) m = static_cast<A>(m + offset);
  const DevVec<A> mean(mean_v), invstd(rand_acc(C, 0.5, 2.0)), weight(rand_acc(C, -1.5, 1.5)),
      bias(rand_acc(C, -0.5, 0.5)), k(rand_acc(C, -0.5, 0.5)), scale(rand_acc(cs.N, 0.5, 2.5)),
      sum_dy(rand_acc(C, -0.5 * count, 0.5 * count)), sum_dy_xhat(rand_acc(C, -0.5 * count, 0.5 * count));
  const int64_t seed_value = static_cast<int64_t>(0x0F1E2D3C4B5A6978ull);
  const DevVec<int64_t> dseed(std::vector<int64_t>{seed_value});
  const uint32_t key0 = static_cast<uint32_t>(seed_value),
                 key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed_value) >> 32);
  const double noise_std = 0.25, momentum = 0.125, eps = 1e-5;
  const Scratch scratch(lmfused::batch_norm_scratch(Tr::dtype, shape));

  // The forward's pre-activation on the host, one rounding per operation in the kernels' (and
  // torch's) order, noise-free: ((1 - k) u + k u_prev) + s ((x - mean) invstd w + b) with state,
  // s ((x - mean) invstd w + b) without (w, b, s absent: 1, 0, 1, as exact as torch skipping them).
  auto pre_host = [&](size_t i, bool state, bool per_ch, bool has_s, bool has_w, bool has_b) {
    const size_t c = chan(i);
    A t = static_cast<A>(Tr::val(hx[i])) + (-mean.v[c]);
    t = t * invstd.v[c];
    t = t * (has_w ? weight.v[c] : A(1));
    t = t + (has_b ? bias.v[c] : A(0));
    t = (has_s ? scale.v[samp(i)] : A(1)) * t;
    if (state) {
      const A kk = k.v[per_ch ? c : 0];
      t = ((A(1) + (-kk)) * static_cast<A>(Tr::val(hu[i])) + kk * static_cast<A>(Tr::val(hp[i]))) + t;
    }
    return t;
  };
  auto y_ref = [&](size_t i, bool has_w, bool has_b) {  // float64 reference of BN(x)
    const size_t c = chan(i);
    const double xhat = (Tr::val(hx[i]) - mean.v[c]) * static_cast<double>(invstd.v[c]);
    return xhat * (has_w ? weight.v[c] : 1.0) + (has_b ? bias.v[c] : 0.0);
  };
  // Every other element: u_prev such that the noise-free pre-activation with state is 0 up to
  // u_prev's rounding, for one of the eight (scale, per-channel k, weight and bias) settings by
  // turns: its sign then hangs on the arithmetic's roundings, which the forward must do in the
  // host's (torch's) order, one rounding each.
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
  std::vector<double> run_mean0(C), run_var0(C);
  for (size_t c = 0; c < C; ++c) {
    run_mean0[c] = offset + uni(rng);
    run_var0[c] = 0.5 + (uni(rng) + 1.0);
  }

  std::vector<std::string> sums_mode0;  // every reduction's bits in mode 0
  for (int mode : {0, 1, 2, 3}) {
    const size_t half_vector = 8 / sizeof(T);
    const size_t in_shift = mode == 1 ? 1 : mode == 3 ? half_vector : 0;
    const size_t out_shift = mode == 3 ? half_vector : mode >= 1 ? 1 : 0;
    // grad_handoff at the inputs' alignment (dh), and one element further (dh_off: the vector
    // width must follow it alone).
    DevBuf<T> dx(n, in_shift), du(n, in_shift), dp(n, in_shift), dg(n, in_shift),
        dh(n, in_shift), dh_off(n, in_shift + 1), dsc(n, in_shift), dres(n, out_shift),
        dgx(n, out_shift), dgu(n, out_shift), dgp(n, out_shift);
    DevBuf<uint8_t> dmask(nmask, out_shift);
    dx.upload(hx);
    du.upload(hu);
    dp.upload(hp);
    dg.upload(hg);
    dh.upload(hh);
    dh_off.upload(hh);
    dsc.upload(hsc);
    std::vector<std::string> sums;  // this mode's reductions, in a fixed order
    auto reduction_ok = [&](bool same_orders, const char* what) {
      ++g_checks;
      if (!same_orders) fail(what_of<T>(cs, mode, "%s: bits depend on the CTA order", what));
      if (!scratch.counters_zero())
        fail(what_of<T>(cs, mode, "%s: left a ticket counter non-zero", what));
    };

    // -- statistics, training, with running statistics of each dtype (and none)
    for (int r = 0; r < 5; ++r) {
      const bool with_running = r < 4;
      const RunningType rt = kRunningTypes[r % 4];
      if (with_running && rt.dtype == DType::kFloat16 && offset > 1e4) continue;  // past fp16's range
      Running running(rt.dtype, run_mean0, run_var0);
      // The initial values as stored (rounded to the dtype).
      const std::vector<double> rm0 = running.download(running.mean),
                                rv0 = running.download(running.var);
      DevVec<A> m(C), inv(C);
      auto launch = [&] {
        running.reset(run_mean0, run_var0);
        CUDA_OK(lmfused::launch_batch_norm_stats(
            Tr::dtype, shape, dx.data(), true, momentum, eps,
            with_running ? running.mean : nullptr, with_running ? running.var : nullptr,
            rt.dtype, m.dev, inv.dev, scratch.s, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        return bytes_of(m.download()) + bytes_of(inv.download()) +
               (with_running ? bytes_of(running.download(running.mean)) +
                                   bytes_of(running.download(running.var))
                             : std::string());
      };
      std::string first;
      reduction_ok(same_in_every_block_order(launch, &first), "stats");
      const std::vector<A> gm = m.download(), gi = inv.download();
      for (size_t c = 0; c < C; ++c) {
        // the mean: a few roundings of its own size, plus the sums' error
        const double mean_tol = 4 * std::numeric_limits<A>::epsilon() * std::fabs(ref_mean[c]) +
                                acc_eps * (std::sqrt(ref_var[c]) + 1.0);
        const double want_inv = 1.0 / std::sqrt(ref_var[c] + eps);
        if (!(std::fabs(gm[c] - ref_mean[c]) <= mean_tol) ||
            !(std::fabs(gi[c] - want_inv) <= acc_eps * want_inv * (1.0 + 1e-3 / (ref_var[c] + eps)))) {
          fail(what_of<T>(cs, mode, "stats [%zu]: mean off by %.3g, invstd off by %.3g", c,
                          gm[c] - ref_mean[c], gi[c] - want_inv));
          break;
        }
      }
      if (with_running) {
        const std::vector<double> rm = running.download(running.mean),
                                  rv = running.download(running.var);
        for (size_t c = 0; c < C; ++c) {
          const double want_m = rm0[c] * (1 - momentum) + momentum * ref_mean[c];
          const double want_v =
              rv0[c] * (1 - momentum) + momentum * ref_var[c] * count / (count - 1);
          if (!close(rm[c], want_m, running.tol() + acc_eps) ||
              !close(rv[c], want_v, running.tol() + acc_eps)) {
            fail(what_of<T>(cs, mode, "running statistics (%s) [%zu]: %.9g %.9g want %.9g %.9g",
                            rt.name, c, rm[c], rv[c], want_m, want_v));
            break;
          }
        }
      }
      sums.push_back(first);
    }

    // -- statistics, evaluation: the running statistics, nothing mutated, x not read
    {
      Running running(DType::kFloat32, run_mean0, run_var0);
      DevVec<A> m(C), inv(C);
      CUDA_OK(lmfused::launch_batch_norm_stats(Tr::dtype, shape, nullptr, false, momentum, eps,
                                               running.mean, running.var, DType::kFloat32, m.dev,
                                               inv.dev, lmfused::ReductionScratch{}, nullptr));
      const std::vector<A> gm = m.download(), gi = inv.download();
      const std::vector<double> rm = running.download(running.mean), rv = running.download(running.var);
      ++g_checks;
      for (size_t c = 0; c < C; ++c) {
        const double rv0 = static_cast<float>(run_var0[c]), rm0 = static_cast<float>(run_mean0[c]);
        if (gm[c] != static_cast<A>(rm0) || !close(gi[c], 1.0 / std::sqrt(rv0 + eps), acc_eps) ||
            rm[c] != rm0 || rv[c] != rv0) {
          fail(what_of<T>(cs, mode, "evaluation statistics [%zu] off", c));
          break;
        }
      }
    }

    // -- forward: state, scale, relu, noise, per-channel k, weight, bias, mask (state and relu)
    std::vector<T> hout;     // with state, scale, relu, weight, bias: the backward's mask source
    std::vector<uint8_t> hmask;
    for (int bits = 0; bits < 256; ++bits) {
      const bool state = bits & 1, has_s = bits & 2, relu = bits & 4, noise = bits & 8,
                 per_ch = bits & 16, has_w = bits & 32, has_b = bits & 64, with_mask = bits & 128;
      if (per_ch && !state) continue;  // k is not read without state
      if (with_mask && !(state && relu)) continue;
      dres.poison();
      dmask.poison();
      CUDA_OK(lmfused::launch_batch_norm_lm_step_forward(
          Tr::dtype, shape, dx.data(), mean.dev, invstd.dev, has_w ? weight.dev : nullptr,
          has_b ? bias.dev : nullptr, state ? du.data() : nullptr, state ? dp.data() : nullptr,
          k.dev, per_ch ? cs.C : 1, has_s ? scale.dev : nullptr, noise ? dseed.dev : nullptr,
          noise ? noise_std : 0.0, relu, dres.data(), with_mask ? dmask.data() : nullptr,
          nullptr));
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
        if (ok && !noise) {  // bitwise (as values) the host's torch-order computation
          A h = pre_host(i, state, per_ch, has_s, has_w, has_b);
          if (relu) h = h < A(0) ? A(0) : h;
          ok = Tr::val(ho[i]) == Tr::val(Tr::make(static_cast<double>(h)));
        }
        if (!ok) {
          fail(what_of<T>(cs, mode, "forward bits=%d out at %zu: got %.9g want %.9g", bits, i,
                          Tr::val(ho[i]), x));
          break;
        }
      }
      if (!dres.guards_intact()) fail(describe(Tr::name, cs, mode, "forward out of bounds"));
      if (with_mask) {  // bit = NOT (out <= 0) of the stored value; padding bits 0
        const std::vector<uint8_t> hm = dmask.download();
        std::vector<uint8_t> want(nmask, 0);
        for (size_t i = 0; i < n; ++i) {
          size_t byte;
          int bit;
          mask_pos(i, byte, bit);
          if (!(Tr::val(ho[i]) <= 0)) want[byte] |= static_cast<uint8_t>(1u << bit);
        }
        if (hm != want) {
          size_t b = 0;
          while (hm[b] == want[b]) ++b;
          fail(what_of<T>(cs, mode, "forward bits=%d mask byte %zu: %02x want %02x", bits, b,
                          hm[b], want[b]));
        }
        if (!dmask.guards_intact()) fail(describe(Tr::name, cs, mode, "mask out of bounds"));
      } else {  // no mask asked: none written
        const std::vector<uint8_t> hm = dmask.download();
        if (std::any_of(hm.begin(), hm.end(), [](uint8_t b) { return b != 0xFF; }))
          fail(what_of<T>(cs, mode, "forward bits=%d wrote a mask it was not asked for", bits));
      }
      if (bits == (1 | 2 | 4 | 16 | 32 | 64 | 128)) {
        hout = ho;
        hmask = dmask.download();
      }
    }
    dmask.upload(hmask);

    // The output's gradient, grad_out + grad_handoff (handoff), through the mask: 0 none, 1 the
    // forward's mask (of hout), 2 recomputed (no state: the forward's branch term rounded to T;
    // weight and bias given).
    auto masked = [&](int mask, bool has_s, bool handoff, size_t i) {
      const double g = Tr::val(hg[i]) + (handoff ? Tr::val(hh[i]) : 0.0);
      if (mask == 1) return Tr::val(hout[i]) <= 0 ? 0.0 : g;
      if (mask == 2) {
        const A z = pre_host(i, false, false, has_s, true, true);
        return Tr::val(Tr::make(static_cast<double>(z))) <= 0 ? 0.0 : g;
      }
      return g;
    };

    // The grad_handoff buffer of handoff mode h: 0 none, 1 dh, 2 dh_off (with scale and weight/bias
    // only: an alignment check).
    auto handoff_buf = [&](int h) { return h == 0 ? nullptr : h == 1 ? dh.data() : dh_off.data(); };

    // -- backward_reduce: mask, scale, need_k (scalar or per-channel k), weight/bias given or not,
    // grad_handoff (none, aligned as the inputs, one element off: the same bits as aligned)
    std::vector<std::string> reduce_bits(36);  // with the aligned grad_handoff, by bits % 36
    for (int bits = 0; bits < 108; ++bits) {
      const int mask = bits % 3, kmode = (bits / 3) % 3;  // kmode: no grad_k, scalar, per channel
      const bool has_s = (bits / 9) & 1, wb = (bits / 18) & 1;
      const int h = bits / 36;
      const bool need_k = kmode != 0, handoff = h != 0;
      if (mask == 2 && (need_k || !wb)) continue;  // no state; the recomputed z needs w, b here
      if (h == 2 && !(has_s && wb)) continue;
      const int64_t k_numel = kmode == 2 ? cs.C : 1;
      DevVec<A> sdy(C), sdyx(C), sk(C);
      auto launch = [&] {
        CUDA_OK(lmfused::launch_batch_norm_lm_step_backward_reduce(
            Tr::dtype, shape, dg.data(), handoff_buf(h), dx.data(), mean.dev, invstd.dev,
            wb ? weight.dev : nullptr, wb ? bias.dev : nullptr, need_k ? du.data() : nullptr,
            need_k ? dp.data() : nullptr, mask == 1 ? dmask.data() : nullptr,
            has_s ? scale.dev : nullptr, mask != 0, sdy.dev, sdyx.dev, need_k ? sk.dev : nullptr,
            k_numel, scratch.s, nullptr));
        CUDA_OK(cudaDeviceSynchronize());
        return bytes_of(sdy.download()) + bytes_of(sdyx.download()) +
               (need_k ? bytes_of(sk.download()) : std::string());
      };
      std::string first;
      reduction_ok(same_in_every_block_order(launch, &first), "reduce");
      if (h == 1) reduce_bits[bits % 36] = first;
      if (h == 2 && first != reduce_bits[bits % 36])
        fail(what_of<T>(cs, mode, "reduce bits=%d: bits depend on grad_handoff's alignment", bits));
      const std::vector<A> a1 = sdy.download(), a2 = sdyx.download(), a3 = sk.download();
      std::vector<double> r1(C, 0.0), r2(C, 0.0), r3(C, 0.0), m1(C, 0.0), m2(C, 0.0), m3(C, 0.0);
      for (size_t i = 0; i < n; ++i) {
        const size_t c = chan(i);
        const double g = masked(mask, has_s, handoff, i), dy = (has_s ? scale.v[samp(i)] : 1.0) * g;
        const double xhat = (Tr::val(hx[i]) - mean.v[c]) * static_cast<double>(invstd.v[c]);
        const double t = g * (Tr::val(hp[i]) - Tr::val(hu[i]));
        r1[c] += dy;
        m1[c] += std::fabs(dy);
        r2[c] += dy * xhat;
        m2[c] += std::fabs(dy * xhat);
        r3[c] += t;
        m3[c] += std::fabs(t);
      }
      if (kmode == 1) {  // a scalar k: one total
        for (size_t c = 1; c < C; ++c) {
          r3[0] += r3[c];
          m3[0] += m3[c];
        }
      }
      for (size_t c = 0; c < C; ++c) {
        const bool k_bad = need_k && (kmode == 2 || c == 0) &&
                           !(std::fabs(a3[c] - r3[c]) <= acc_eps * (m3[c] + 1.0));
        const bool bad = !(std::fabs(a1[c] - r1[c]) <= acc_eps * (m1[c] + 1.0)) ||
                         !(std::fabs(a2[c] - r2[c]) <= acc_eps * (m2[c] + 1.0)) || k_bad;
        if (bad) {
          fail(what_of<T>(cs, mode, "reduce bits=%d [%zu]: sums off by %.3g, %.3g, %.3g", bits,
                          c, a1[c] - r1[c], a2[c] - r2[c], a3[c] - r3[c]));
          break;
        }
      }
      sums.push_back(first);
    }

    // -- backward: mask, scale, training, grad_x, grad_u (with or without grad_shortcut),
    // grad_u_prev, per-channel k, grad_handoff (none, aligned, one element off)
    for (int bits = 0; bits < 864; ++bits) {
      const int mask = bits % 3, umode = (bits / 3) % 3, h = bits / 288;
      const bool has_s = (bits / 9) & 1, training = (bits / 18) & 1, nx = (bits / 36) & 1,
                 nup = (bits / 72) & 1, per_ch = (bits / 144) & 1;
      const bool nu = umode != 0, sc = umode == 2, handoff = h != 0;
      if (h == 2 && !(has_s && per_ch == (mask != 2))) continue;  // alignment: a few suffice
      if (mask == 2 && (nu || nup)) continue;     // no state: no grad_u, grad_u_prev
      if (!nx && !nu && !nup) continue;           // nothing to do
      if (!nx && training) continue;              // training only changes grad_x
      if (!nu && !nup && per_ch) continue;        // k only enters grad_u, grad_u_prev
      dgx.poison();
      dgu.poison();
      dgp.poison();
      CUDA_OK(lmfused::launch_batch_norm_lm_step_backward(
          Tr::dtype, shape, dg.data(), handoff_buf(h), sc ? dsc.data() : nullptr, dx.data(),
          mean.dev, invstd.dev, weight.dev, bias.dev, sum_dy.dev, sum_dy_xhat.dev,
          mask == 1 ? dmask.data() : nullptr, k.dev, per_ch ? cs.C : 1,
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
        double dy = (has_s ? scale.v[samp(i)] : 1.0) * masked(mask, has_s, handoff, i);
        if (training) {
          const double xhat = (Tr::val(hx[i]) - mean.v[c]) * static_cast<double>(invstd.v[c]);
          dy = dy - sum_dy.v[c] / count - xhat * sum_dy_xhat.v[c] / count;
        }
        return dy * static_cast<double>(invstd.v[c]) * weight.v[c];
      });
      check(dgu, nu, "grad_u", [&](size_t i) {  // the shortcut's gradient is not masked
        return (1.0 - kk(i)) * masked(mask, has_s, handoff, i) + (sc ? Tr::val(hsc[i]) : 0.0);
      });
      check(dgp, nup, "grad_u_prev",
            [&](size_t i) { return kk(i) * masked(mask, has_s, handoff, i); });
    }

    // The reductions' bits do not depend on the buffers' alignment.
    ++g_checks;
    if (mode == 0) {
      sums_mode0 = sums;
    } else if (sums != sums_mode0) {
      fail(describe(Tr::name, cs, mode, "reduction bits differ from the aligned run's"));
    }
  }
}

// Channels-last statistics over the most chunks a reduction takes: the merge of 128 partial sums
// per channel by the last CTA, in every CTA order.
void bn_many_chunks(std::mt19937_64& rng) {
  const LMStepShape shape{2, 2, 140000, true};
  const size_t n = 2 * 2 * 140000;
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  std::vector<float> hx(n);
  for (auto& x : hx) x = static_cast<float>(100.0 + uni(rng));
  DevBuf<float> dx(n, 0);
  dx.upload(hx);
  const Scratch scratch(lmfused::batch_norm_scratch(DType::kFloat32, shape));
  DevVec<float> stat(4);
  auto launch = [&] {
    CUDA_OK(lmfused::launch_batch_norm_stats(DType::kFloat32, shape, dx.data(), true, 0.1, 0.0,
                                             nullptr, nullptr, DType::kFloat32, stat.dev,
                                             stat.dev + 2, scratch.s, nullptr));
    return bytes_of(stat.download());
  };
  ++g_checks;
  if (!same_in_every_block_order(launch)) fail("float32 many chunks: statistics depend on the CTA order");
  const std::vector<float> got = stat.download();
  double mean[2] = {0, 0}, var[2] = {0, 0};
  for (size_t i = 0; i < n; ++i) mean[i % 2] += hx[i];
  for (double& m : mean) m /= n / 2;
  for (size_t i = 0; i < n; ++i) var[i % 2] += (hx[i] - mean[i % 2]) * (hx[i] - mean[i % 2]);
  for (double& v : var) v /= n / 2;
  for (int c = 0; c < 2; ++c) {
    if (!(std::fabs(got[c] - mean[c]) <= 2e-5 && close(got[2 + c], 1.0 / std::sqrt(var[c]), 1e-5)))
      fail("float32 many chunks: statistics of channel " + std::to_string(c) + " off");
  }
  if (!scratch.counters_zero()) fail("float32 many chunks: counters left set");
}

// Argument checks and empty shapes.
void bn_api_edges() {
  ++g_checks;
  float* buf = nullptr;
  CUDA_OK(cudaMalloc(&buf, 64 * sizeof(float)));
  const LMStepShape empty{0, 3, 4, false}, s{2, 3, 4, false};
  const lmfused::ReductionScratch none{};
  CUDA_OK(cudaMemset(buf, 0, 64 * sizeof(float)));
  // A training batch without values: mean 0, invstd 1 / sqrt(1 + eps), nothing else touched.
  if (lmfused::launch_batch_norm_stats(DType::kFloat32, empty, nullptr, true, 0.1, 0.25, buf + 10,
                                       buf + 13, DType::kFloat32, buf, buf + 3, none,
                                       nullptr) != cudaSuccess)
    fail("empty statistics should succeed");
  float h[16];
  CUDA_OK(cudaMemcpy(h, buf, sizeof h, cudaMemcpyDeviceToHost));
  for (int c = 0; c < 3; ++c) {
    if (h[c] != 0.f || h[3 + c] != static_cast<float>(1.0 / std::sqrt(1.25)) || h[10 + c] != 0.f ||
        h[13 + c] != 0.f)
      fail("empty statistics: mean 0, invstd 1 / sqrt(1 + eps), running untouched expected");
  }
  CUDA_OK(cudaMemset(buf, 0xFF, 9 * sizeof(float)));
  if (lmfused::launch_batch_norm_lm_step_backward_reduce(
          DType::kFloat32, empty, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
          buf, buf, nullptr, nullptr, false, buf, buf + 3, buf + 6, 3, none,
          nullptr) != cudaSuccess)
    fail("empty backward_reduce should succeed");
  CUDA_OK(cudaMemcpy(h, buf, 9 * sizeof(float), cudaMemcpyDeviceToHost));
  for (int i = 0; i < 9; ++i)
    if (h[i] != 0.f) fail("empty backward_reduce: zero sums expected");
  if (lmfused::launch_batch_norm_lm_step_forward(DType::kFloat32, s, buf, buf, buf, nullptr,
                                                 nullptr, buf, nullptr, buf, 1, nullptr, nullptr,
                                                 0.0, false, buf, nullptr,
                                                 nullptr) != cudaErrorInvalidValue)
    fail("forward with u but no u_prev must be rejected");
  if (lmfused::launch_batch_norm_lm_step_forward(DType::kFloat32, s, buf, buf, buf, nullptr,
                                                 nullptr, nullptr, nullptr, buf, 1, nullptr,
                                                 nullptr, 0.0, true, buf, buf,
                                                 nullptr) != cudaErrorInvalidValue)
    fail("a mask without state must be rejected");
  if (lmfused::launch_batch_norm_stats(DType::kFloat32, s, buf, true, 0.1, 1e-5, nullptr, nullptr,
                                       DType::kFloat32, buf, buf, none,
                                       nullptr) != cudaErrorInvalidValue)
    fail("statistics without scratch must be rejected");
  if (lmfused::launch_batch_norm_stats(DType::kFloat32, s, buf, false, 0.1, 1e-5, nullptr, nullptr,
                                       DType::kFloat32, buf, buf, none,
                                       nullptr) != cudaErrorInvalidValue)
    fail("evaluation statistics without running statistics must be rejected");
  if (lmfused::launch_batch_norm_lm_step_backward(
          DType::kFloat32, s, buf, nullptr, nullptr, buf, buf, buf, nullptr, nullptr, nullptr,
          nullptr, nullptr, buf, 1, nullptr, false, true, nullptr, buf, nullptr,
          nullptr) != cudaErrorInvalidValue)
    fail("grad_u with a recomputed (no-state) mask must be rejected");
  const Scratch scratch(lmfused::batch_norm_scratch(DType::kFloat32, s));
  if (lmfused::launch_batch_norm_lm_step_backward_reduce(
          DType::kFloat32, s, buf, nullptr, buf, buf, buf, nullptr, nullptr, buf, buf, nullptr,
          nullptr, true, buf + 40, buf + 44, buf + 48, 1, scratch.s,
          nullptr) != cudaErrorInvalidValue)
    fail("reduce with grad_k and relu but no mask must be rejected");
  if (lmfused::launch_batch_norm_lm_step_backward_reduce(
          DType::kFloat32, s, buf, nullptr, buf, buf, buf, nullptr, nullptr, buf, buf, nullptr,
          nullptr, false, buf + 40, buf + 44, buf + 48, 2, scratch.s,
          nullptr) != cudaErrorInvalidValue)
    fail("reduce with a k of 2 values (C = 3) must be rejected");
  CUDA_OK(cudaDeviceSynchronize());
  cudaFree(buf);
}

template <typename T>
void bn_dtype(std::mt19937_64& rng) {
  const Case cases[] = {
      {2, 3, 5, false},     // odd row length: scalar path, one short unit per row
      {3, 2, 16, false},    // vector path for every dtype
      {3, 2, 1030, false},  // several chunks per channel, 64-bit units for 16-bit types
      {2, 3, 196, false},   // 14x14: rows of 24.5 mask bytes
      {2, 12, 5, true},     // channels-last, C = 12
      {3, 40, 30, true},    // several row chunks; C not a multiple of 16 bytes for 16-bit types
      {2, 264, 3, true},    // several column groups, a partial last one
      {5, 7, 1, true},      // rank-2 (N, C), odd C
  };
  for (const Case& c : cases) bn_case<T>(c, rng);
  std::printf("%-8s batch norm: %d failures after %d checks\n", Traits<T>::name, g_failures,
              g_checks);
}

}  // namespace

void run_batch_norm_tests(std::mt19937_64& rng, const std::function<bool(const char*)>& wanted) {
  if (wanted("float")) {  // (the dtype-independent tests run with float's)
    bn_api_edges();
    bn_many_chunks(rng);
    bn_dtype<float>(rng);
  }
  if (wanted("bf16")) bn_dtype<__nv_bfloat16>(rng);
  if (wanted("half")) bn_dtype<__half>(rng);
  if (wanted("double")) bn_dtype<double>(rng);
}

}  // namespace lmf_test
