// Kernel specialisations for __nv_bfloat16 (one file per dtype so they compile in parallel).
#include "lm_step_impl.cuh"

LMF_INSTANTIATE_LAUNCHERS(__nv_bfloat16)
