"""lmfused: fused linear multi-step (LM-ResNet / LM-ResNeXt) residual updates for PyTorch.

The LM architecture (Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks*, ICML 2018) replaces the
ResNet step u_{n+1} = u_n + f(u_n) (forward Euler) by the linear multi-step update
u_{n+1} = (1 - k_n) u_n + k_n u_{n-1} + f(u_n). ``lm_step`` fuses it, with stochastic depth, noise
injection and an optional ReLU, into one kernel forward and one backward.
"""

from lmfused import models, nn
from lmfused.batch_norm_step import batch_norm, batch_norm_lm_step, batch_norm_relu
from lmfused.convert import convert_to_lm
from lmfused.ops import available_backends, lm_step

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "available_backends",
    "batch_norm",
    "batch_norm_lm_step",
    "batch_norm_relu",
    "convert_to_lm",
    "lm_step",
    "models",
    "nn",
]
