"""Transport analysis of LM networks: the flow of states through the blocks, and the learned k_n.

Two readings of a residual network as a discretised ODE:

- Sonoda & Murata, *Transport analysis of infinitely deep neural network* (JMLR 2019): the network is a
  broken-line (Euler) approximation of a flow dx/dt = v_t(x) that transports the data distribution;
  :class:`FlowRecorder` captures the states u_n block by block and :func:`transport_metrics` measures each
  step (displacement, kinetic energy, straightness, entropy of the feature distribution, W2 distance). The
  deep Gaussian denoising autoencoder, whose transport lowers entropy, has closed forms here
  (:func:`gaussian_dae_map`, :func:`gaussian_dae_entropy_drop`) and a demo:
  ``python -m lmfused.analysis.dae``.
- Lu, Zhong, Li & Dong, *Beyond Finite Layer Neural Networks* (ICML 2018): the LM step is a second-order
  discretisation of the modified equation (1 + k) u' + (1 - k) (dt/2) u'' = f(u); :func:`lm_coefficients`
  reports each block's k_n with that reading.

``python -m lmfused.analyze --model NAME`` runs all of it on a model of the zoo and writes a table, JSON and
plots.
"""

from lmfused.analysis import blocks, flow, gaussian, lm
from lmfused.analysis.blocks import *  # noqa: F403
from lmfused.analysis.flow import *  # noqa: F403
from lmfused.analysis.gaussian import *  # noqa: F403
from lmfused.analysis.lm import *  # noqa: F403

# The package exports what each submodule exports (the demo ``dae`` stays a submodule of its own).
__all__ = sorted([*blocks.__all__, *flow.__all__, *gaussian.__all__, *lm.__all__])
