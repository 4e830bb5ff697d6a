// Batch-norm-fused kernels for float: one file per dtype, compiled in parallel.
#include "batch_norm_lm_step.cuh"

LMF_INSTANTIATE_BATCH_NORM_LAUNCHERS(float)
