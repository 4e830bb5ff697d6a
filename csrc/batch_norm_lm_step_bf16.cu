// Batch-norm-fused kernels for __nv_bfloat16: one file per dtype, compiled in parallel.
#include "batch_norm_lm_step.cuh"

LMF_INSTANTIATE_BATCH_NORM_LAUNCHERS(__nv_bfloat16)
