// Kernel specialisations for __half (one file per dtype so they compile in parallel).
#include "lm_step_impl.cuh"

LMF_INSTANTIATE_LAUNCHERS(__half)
