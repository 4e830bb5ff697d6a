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
