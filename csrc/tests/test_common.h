// Helpers shared by the kernel tests (test_lm_step_kernels.cu, test_batch_norm_kernels.cu): the
// failure counters, dtype traits, guarded device buffers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../lm_step.h"

namespace lmf_test {

using lmfused::DType;
using lmfused::LMStepShape;


inline int g_failures = 0;
inline int g_checks = 0;

#define CUDA_OK(expr)                                                                   \
  do {                                                                                  \
    cudaError_t e_ = (expr);                                                            \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #expr,              \
                   cudaGetErrorString(e_));                                             \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

inline void fail(const std::string& what) {
  if (++g_failures <= 30) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// ----- dtype traits ---------------------------------------------------------------------------
template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr DType dtype = DType::kFloat32;
  static constexpr const char* name = "float32";
  static constexpr double tol = 1e-5;  // float32 arithmetic on O(1) values
  static float make(double x) { return static_cast<float>(x); }
  static double val(float x) { return x; }
};
template <>
struct Traits<double> {
  static constexpr DType dtype = DType::kFloat64;
  static constexpr const char* name = "float64";
  static constexpr double tol = 1e-12;
  static double make(double x) { return x; }
  static double val(double x) { return x; }
};
template <>
struct Traits<__half> {
  static constexpr DType dtype = DType::kFloat16;
  static constexpr const char* name = "float16";
  static constexpr double tol = 1e-3;  // one rounding to half (2^-11 relative) plus float math
  static __half make(double x) { return __float2half_rn(static_cast<float>(x)); }
  static double val(__half x) { return __half2float(x); }
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr DType dtype = DType::kBFloat16;
  static constexpr const char* name = "bfloat16";
  static constexpr double tol = 8e-3;  // one rounding to bf16 (2^-8 relative)
  static __nv_bfloat16 make(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
  static double val(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Device buffer of T with `pad` guard elements either side of the data, all pre-filled with 0xFF
// bytes (NaN for every float type) so unwritten or out-of-bounds elements are detectable.
template <typename T>
struct DevBuf {
  T* base = nullptr;
  size_t n = 0, shift = 0;
  static constexpr size_t kPad = 16;
  DevBuf(size_t n_, size_t shift_) : n(n_), shift(shift_) {
    CUDA_OK(cudaMalloc(&base, (n + 2 * kPad) * sizeof(T)));
    poison();
  }
  ~DevBuf() { cudaFree(base); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  T* data() const { return base + kPad + shift; }  // shift = 1 -> not 16-byte aligned
  void poison() { CUDA_OK(cudaMemset(base, 0xFF, (n + 2 * kPad) * sizeof(T))); }
  void upload(const std::vector<T>& h) {
    CUDA_OK(cudaMemcpy(data(), h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    CUDA_OK(cudaMemcpy(h.data(), data(), n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  bool guards_intact() const {  // nothing written outside [data(), data() + n)
    std::vector<unsigned char> all((n + 2 * kPad) * sizeof(T));
    CUDA_OK(cudaMemcpy(all.data(), base, all.size(), cudaMemcpyDeviceToHost));
    const size_t lo = (kPad + shift) * sizeof(T), hi = lo + n * sizeof(T);
    for (size_t i = 0; i < all.size(); ++i)
      if ((i < lo || i >= hi) && all[i] != 0xFF) return false;
    return true;
  }
};

// A reduction's scratch (lm_step.h): the workspace poisoned (0xFF: it may hold anything), the
// counters zeroed, as the launchers require; every launch must leave the counters zero again.
struct Scratch {
  lmfused::ReductionScratch s;
  explicit Scratch(const lmfused::ReductionScratch& need) : s(need) {
    CUDA_OK(cudaMalloc(&s.workspace, s.workspace_bytes + 16));
    CUDA_OK(cudaMemset(s.workspace, 0xFF, s.workspace_bytes + 16));
    CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&s.counters), (s.counter_count + 1) * sizeof(unsigned)));
    CUDA_OK(cudaMemset(s.counters, 0, (s.counter_count + 1) * sizeof(unsigned)));
  }
  ~Scratch() {
    cudaFree(s.workspace);
    cudaFree(s.counters);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  bool counters_zero() const {
    std::vector<unsigned> h(s.counter_count + 1);
    CUDA_OK(cudaMemcpy(h.data(), s.counters, h.size() * sizeof(unsigned), cudaMemcpyDeviceToHost));
    for (unsigned v : h)
      if (v != 0) return false;
    return true;
  }
};

// Runs `launch` (a reduction, then its results' download into a byte string) once per order of
// the CTAs the emulation can impose (blockIdx order, reverse, shuffled; on a GPU, the hardware's
// order twice) and returns true if every run gives the same bytes: the merge's result must not
// depend on which CTA finishes last. `first` receives the first run's bytes.
template <typename F>
bool same_in_every_block_order(F&& launch, std::string* first = nullptr) {
  std::vector<std::string> results;
#ifdef LMF_CUDA_EMULATION
  using lmf_emu::BlockOrder;
  for (BlockOrder order : {BlockOrder::kForward, BlockOrder::kReverse, BlockOrder::kShuffled}) {
    lmf_emu::set_block_order(order);
    results.push_back(launch());
  }
  lmf_emu::set_block_order(BlockOrder::kForward);
#else
  results.push_back(launch());
  results.push_back(launch());
#endif
  if (first != nullptr) *first = results[0];
  for (const std::string& r : results)
    if (r != results[0]) return false;
  return true;
}

template <typename A>
std::string bytes_of(const std::vector<A>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(A));
}

struct Case {
  int64_t N, C, S;
  bool cl;
};

inline std::string describe(const char* dt, const Case& c, int mode, const char* what) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s N=%lld C=%lld S=%lld %s align-mode=%d: %s", dt,
                static_cast<long long>(c.N), static_cast<long long>(c.C),
                static_cast<long long>(c.S), c.cl ? "channels-last" : "contiguous", mode, what);
  return buf;
}

inline bool close(double got, double ref, double tol) {
  return std::fabs(got - ref) <= tol * (1.0 + std::fabs(ref));  // NaN fails
}

}  // namespace lmf_test
