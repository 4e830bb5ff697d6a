"""Gaussian summaries of feature distributions: fits, entropy, the W2 distance and the Gaussian DAE map.

Sonoda & Murata (*Transport analysis of infinitely deep neural network*, JMLR 2019) read a deep network as a
transport map that pushes the data distribution forward block by block, and analyse it in Wasserstein
geometry; a deep Gaussian denoising autoencoder (DAE) transports mass so that the Shannon entropy of the data
distribution falls. The closed forms below are what that analysis needs for Gaussian (or Gaussian-fitted)
distributions. Everything is computed in float64 on the CPU: these are small (D x D) problems whose answers
are reported, not differentiated.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Shrinkage",
    "deep_gaussian_dae_covariances",
    "gaussian_dae_entropy_drop",
    "gaussian_dae_map",
    "gaussian_entropy",
    "gaussian_entropy_of_cov",
    "gaussian_fit",
    "gaussian_w2",
    "psd_sqrtm",
]

ArrayLike = Tensor | np.ndarray
Shrinkage = str | float | None
"""``"ledoit-wolf"`` (estimated intensity), a fixed intensity in [0, 1], or None / 0 (no shrinkage)."""

_LOG_2_PI_E = math.log(2 * math.pi * math.e)


def _as_float64(name: str, x: object) -> Tensor:
    """``x`` as a float64 CPU tensor; TypeError naming ``name`` for anything that is not numeric."""
    if isinstance(x, Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray | list | tuple | Real):
        t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    else:
        raise TypeError(f"{name}: expected a tensor or array, got {type(x).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected real numbers, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.float64)


def _check_cov(name: str, cov: object) -> Tensor:
    """A (D, D) float64 covariance, symmetrised (eigh reads one triangle; averaging keeps both honest)."""
    c = _as_float64(name, cov)
    if c.dim() != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise ValueError(f"{name}: expected a square (D, D) covariance matrix, got shape {tuple(c.shape)}")
    return 0.5 * (c + c.T)


def _shrinkage_intensity(centered: Tensor, cov: Tensor, shrinkage: Shrinkage) -> float:
    """The weight delta of the scaled identity in (1 - delta) * S + delta * (tr S / D) * I."""
    if shrinkage is None:
        return 0.0
    if isinstance(shrinkage, str):
        if shrinkage != "ledoit-wolf":
            raise ValueError(
                f"shrinkage: expected 'ledoit-wolf', a number in [0, 1] or None, got {shrinkage!r}"
            )
        # Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance matrices":
        # delta = min(b2, d2) / d2 with d2 = ||S - m I||_F^2 and b2 = (1/M^2) sum_i ||x_i x_i^T - S||_F^2.
        # The sum expands to sum_i ||x_i||^4 - M ||S||_F^2, so no (M, D, D) tensor is formed. b2 is O(1/M),
        # so delta -> 0 and the estimate converges to the sample covariance as M grows.
        m, d = centered.shape
        target = torch.trace(cov) / d
        d2 = float(((cov - target * torch.eye(d, dtype=cov.dtype)) ** 2).sum())
        if d2 == 0.0:  # S is already a multiple of the identity: nothing to shrink
            return 0.0
        b2 = float((centered.pow(2).sum(1).pow(2).sum() - m * (cov**2).sum()) / m**2)
        return min(max(b2, 0.0), d2) / d2
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, Real) or not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage: expected 'ledoit-wolf', a number in [0, 1] or None, got {shrinkage!r}")
    return float(shrinkage)


def gaussian_fit(x: ArrayLike, *, shrinkage: Shrinkage = "ledoit-wolf") -> tuple[Tensor, Tensor]:
    """Mean and (shrunk) covariance of samples ``x`` of shape (M, D), in float64.

    The covariance is ``(1 - delta) * S + delta * (tr S / D) * I`` with S the maximum-likelihood sample
    covariance (divided by M): shrinkage toward a scaled identity, which keeps the estimate well conditioned
    when M is not much larger than D (pooled network features: a batch of 64 samples of 64 channels). With
    ``shrinkage="ledoit-wolf"`` delta is the Ledoit-Wolf (2004) estimate, which tends to 0 as M grows, so
    the fit converges to the true covariance; a number fixes delta; None (or 0) disables shrinkage.

    Raises:
        ValueError: ``x`` is not 2-D with at least two samples, or ``shrinkage`` is not understood.
    """
    x = _as_float64("x", x)
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] == 0:
        raise ValueError(f"x: expected samples of shape (M, D) with M >= 2 and D >= 1, got {tuple(x.shape)}")
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / x.shape[0]
    delta = _shrinkage_intensity(centered, cov, shrinkage)
    if delta > 0.0:
        target = torch.trace(cov) / x.shape[1]
        cov = (1.0 - delta) * cov + delta * target * torch.eye(x.shape[1], dtype=cov.dtype)
    return mean, cov


def gaussian_entropy_of_cov(cov: ArrayLike) -> float:
    """Differential entropy (nats) of N(mu, cov): ``0.5 * logdet(2 pi e cov)``; -inf if cov is singular."""
    c = _check_cov("cov", cov)
    eigenvalues = torch.linalg.eigvalsh(c)
    if float(eigenvalues.min()) <= 0.0:
        return -math.inf
    return 0.5 * (c.shape[0] * _LOG_2_PI_E + float(torch.log(eigenvalues).sum()))


def gaussian_entropy(x: ArrayLike, *, shrinkage: Shrinkage = "ledoit-wolf") -> float:
    """Entropy (nats) of the Gaussian fitted to samples ``x`` of shape (M, D): ``0.5 * logdet(2 pi e Sigma)``.

    Sigma is the shrunk covariance of :func:`gaussian_fit` (Ledoit-Wolf by default, see there), computed in
    float64; for Gaussian data it converges to the analytic entropy as M grows. It is the quantity a deep
    Gaussian DAE decreases (Sonoda & Murata, JMLR 2019): for non-Gaussian data it is an upper bound on the
    true entropy (the Gaussian has the largest entropy for a given covariance), used here as a tractable
    summary of how spread out the features are. Degenerate data (zero covariance) gives -inf.

    Raises:
        ValueError: ``x`` is not 2-D with at least two samples, or ``shrinkage`` is not understood.
    """
    return gaussian_entropy_of_cov(gaussian_fit(x, shrinkage=shrinkage)[1])


def psd_sqrtm(a: ArrayLike) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix, via ``eigh`` with eigenvalues clamped at 0.

    Clamping makes round-off (tiny negative eigenvalues of a PSD matrix) harmless; the result is symmetric
    PSD, in float64.
    """
    c = _check_cov("a", a)
    eigenvalues, vectors = torch.linalg.eigh(c)
    return (vectors * eigenvalues.clamp(min=0.0).sqrt()) @ vectors.T


def _check_mean(name: str, mu: object, dim: int) -> Tensor:
    m = _as_float64(name, mu)
    if m.shape != (dim,):
        raise ValueError(f"{name}: expected a mean vector of shape ({dim},), got {tuple(m.shape)}")
    return m


def gaussian_w2(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """2-Wasserstein distance between N(mu1, cov1) and N(mu2, cov2), in closed form (float64).

    ``W2^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S2^{1/2} S1 S2^{1/2})^{1/2})`` (Dowson & Landau 1982; Givens &
    Shortt 1984): the Wasserstein geometry in which Sonoda & Murata (JMLR 2019) read a deep network as a
    flow of distributions. Matrix square roots go through :func:`psd_sqrtm`; the squared distance is clamped
    at 0 against round-off before the square root is taken.

    Raises:
        ValueError: a covariance is not square, or the means and covariances disagree in dimension.
    """
    c1 = _check_cov("cov1", cov1)
    c2 = _check_cov("cov2", cov2)
    if c2.shape != c1.shape:
        raise ValueError(f"cov2: expected shape {tuple(c1.shape)} (the shape of cov1), got {tuple(c2.shape)}")
    dim = c1.shape[0]
    m1 = _check_mean("mu1", mu1, dim)
    m2 = _check_mean("mu2", mu2, dim)
    root2 = psd_sqrtm(c2)
    middle = root2 @ c1 @ root2
    # tr((S2^1/2 S1 S2^1/2)^1/2) is the sum of the square roots of that PSD matrix's eigenvalues.
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp(min=0.0).sqrt().sum()
    squared = float(((m1 - m2) ** 2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross)
    return math.sqrt(max(squared, 0.0))


def _check_sigma(sigma: object) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, Real) or not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma: expected a finite number >= 0, got {sigma!r}")
    return float(sigma)


def gaussian_dae_map(cov: ArrayLike, sigma: float) -> Tensor:
    """The optimal DAE for zero-mean Gaussian data N(0, cov) with noise sigma: cov (cov + sigma^2 I)^-1.

    Minimising E||g(x + sigma * eps) - x||^2 over all maps g gives the posterior mean E[x | x + sigma * eps],
    which for Gaussian data is this linear shrinkage. Applied to the data themselves it is the transport map
    of the shallow Gaussian DAE, x -> x + sigma^2 grad log(p * N(0, sigma^2 I))(x) (Sonoda & Murata, JMLR
    2019). For data with mean mu, apply it to x - mu and add mu back.

    Raises:
        ValueError: ``cov`` is not square, or ``sigma`` is negative or not finite.
    """
    c = _check_cov("cov", cov)
    s = _check_sigma(sigma)
    # cov and (cov + s^2 I)^-1 commute; solve() avoids forming the inverse.
    return torch.linalg.solve(c + s * s * torch.eye(c.shape[0], dtype=c.dtype), c)


def gaussian_dae_entropy_drop(cov: ArrayLike, sigma: float) -> float:
    """How much the shallow Gaussian DAE lowers the entropy of N(mu, cov): ``sum_i log(1 + sigma^2 / l_i)``.

    A linear map A changes entropy by ``log|det A|``; for A = cov (cov + sigma^2 I)^-1 (see
    :func:`gaussian_dae_map`) that is ``sum_i log(l_i / (l_i + sigma^2))`` over the eigenvalues l_i of cov, so
    the entropy after the map is ``H - drop``. The drop is >= 0 (Sonoda & Murata, JMLR 2019: the Gaussian DAE
    transports mass so that the entropy falls); it is +inf for a singular cov and sigma > 0.

    Raises:
        ValueError: ``cov`` is not square, or ``sigma`` is negative or not finite.
    """
    c = _check_cov("cov", cov)
    s = _check_sigma(sigma)
    eigenvalues = torch.linalg.eigvalsh(c)
    if s == 0.0:
        return 0.0
    if float(eigenvalues.min()) <= 0.0:
        return math.inf
    return float(torch.log1p(s * s / eigenvalues).sum())


def deep_gaussian_dae_covariances(cov: ArrayLike, sigma: float, steps: int) -> list[Tensor]:
    """Covariances along the deep Gaussian DAE: ``steps`` DAE maps with noise sigma / sqrt(steps) each.

    Sonoda & Murata (JMLR 2019) compose DAEs, each one fitted to the distribution the previous ones
    transported the data to; with noise variance sigma^2 / T per step the composition tends, as T grows, to
    the flow dx/dt = grad log p_t(x) (a backward heat equation, cov_t = cov - 2 t I in the Gaussian case).
    For Gaussian data each step is the linear map A_t = C_t (C_t + (sigma^2/T) I)^-1, so
    C_{t+1} = A_t C_t A_t^T. Returns [C_0, C_1, ..., C_T] in float64.

    Raises:
        ValueError: ``cov`` is not square, ``sigma`` is negative, or ``steps`` < 1.
    """
    c = _check_cov("cov", cov)
    s = _check_sigma(sigma)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    covariances = [c]
    for _ in range(steps):
        a = gaussian_dae_map(covariances[-1], s / math.sqrt(steps))
        nxt = a @ covariances[-1] @ a.T
        covariances.append(0.5 * (nxt + nxt.T))
    return covariances
