// Stand-ins for the typed launcher bodies of one dtype (-DLMF_STUB_T=<element type>), linked by
// tools/run_emulated.sh in place of that dtype's kernel files when a build tests other dtypes only: the
// kernel files are most of the build's time. Each returns cudaErrorNotSupported.
#include "../batch_norm_lm_step_dispatch.h"

#ifndef LMF_STUB_T
#error "LMF_STUB_T: the element type to stub (float, __half, __nv_bfloat16, double)"
#endif

namespace lmfused {
namespace detail {

template <>
cudaError_t forward_typed<LMF_STUB_T>(const LMStepShape&, const void*, const void*, const void*,
                                      const void*, int64_t, const void*, const int64_t*, double,
                                      bool, void*, cudaStream_t) {
  return cudaErrorNotSupported;
}
template <>
ReductionScratch scratch_typed<LMF_STUB_T>(const LMStepShape&) {
  return {};
}
template <>
cudaError_t backward_typed<LMF_STUB_T>(const LMStepShape&, const void*, const void*, const void*,
                                       const void*, const void*, const void*, int64_t,
                                       const void*, bool, void*, void*, void*, void*,
                                       const ReductionScratch&, cudaStream_t) {
  return cudaErrorNotSupported;
}
template <>
ReductionScratch bn_scratch_typed<LMF_STUB_T>(const LMStepShape&) {
  return {};
}
// The batch-norm launchers all take the operands and a stream.
#define LMF_BATCH_NORM_STUB(NAME)                                                      \
  template <>                                                                          \
  cudaError_t NAME<LMF_STUB_T>(const BatchNormOperands&, cudaStream_t) {               \
    return cudaErrorNotSupported;                                                      \
  }
LMF_BATCH_NORM_STUB(bn_stats_typed)
LMF_BATCH_NORM_STUB(bn_forward_typed)
LMF_BATCH_NORM_STUB(bn_reduce_typed)
LMF_BATCH_NORM_STUB(bn_backward_typed)

}  // namespace detail
}  // namespace lmfused
