"""Population prior of the coordinates by deconvolution, and posterior means.

Each particle's Gauss-Newton fit gives its coordinates as a Gaussian
likelihood in information form: precision ``H_i (D, D)`` (``JᵀJ/σ²``, singular
along motions its view cannot see) and information vector ``η_i = H_i ẑ_i``.
The population of true coordinates is modelled as a mixture of ``C`` Gaussians
and fitted to all particles at once by "extreme deconvolution" (the EM of
Bovy, Hogg & Roweis 2011, written here in information form so that singular
``H_i`` need no inverse). Each particle's coordinate is then its posterior
mean under that prior: a particle seen from a direction that shows the motion
poorly is pulled onto the population (for a motion along a curved path or
with bounded range, onto that path), instead of towards the population mean
as a single Gaussian prior does.

Shapes: ``M`` particles, ``D`` coordinates, ``C`` components.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.special import logsumexp, softmax

from ..distributed import World


@dataclass
class CoordinatePrior:
    """Mixture prior: ``weights (C,)``, ``means (C, D)``, ``covariances (C, D, D)``."""
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray


def _small_cholesky_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverses and log-determinants of a stack ``(..., D, D)`` of small
    symmetric positive-definite matrices, by a Cholesky factorisation written
    out element by element (each step one vector operation over the whole
    stack: for D ≤ 6 far faster than a LAPACK call per matrix).

    Returns:
        ``(a⁻¹ (..., D, D), log det a (...))``; a⁻¹ = L⁻ᵀL⁻¹ is exactly symmetric.

    Raises:
        np.linalg.LinAlgError: a matrix is not positive definite.
    """
    d = a.shape[-1]
    el = [[np.ascontiguousarray(a[..., i, j]) for j in range(d)] for i in range(d)]  # contiguous entries
    low = [[None] * d for _ in range(d)]
    for j in range(d):
        diag = el[j][j] - sum(low[j][k] ** 2 for k in range(j))
        if not (diag > 0).all():
            raise np.linalg.LinAlgError("matrix is not positive definite")
        low[j][j] = np.sqrt(diag)
        for i in range(j + 1, d):
            low[i][j] = (el[i][j] - sum(low[i][k] * low[j][k] for k in range(j))) / low[j][j]
    inv_low = [[None] * d for _ in range(d)]  # L⁻¹, lower triangular, by forward substitution
    for j in range(d):
        inv_low[j][j] = 1.0 / low[j][j]
        for i in range(j + 1, d):
            inv_low[i][j] = -sum(low[i][k] * inv_low[k][j] for k in range(j, i)) / low[i][i]
    inv = np.empty_like(a)
    for i in range(d):
        for j in range(i + 1):
            inv[..., i, j] = inv[..., j, i] = sum(inv_low[k][i] * inv_low[k][j] for k in range(i, d))
    return inv, 2.0 * sum(np.log(low[j][j]) for j in range(d))


def _component_posteriors(eta: np.ndarray, prec: np.ndarray, prior: CoordinatePrior):
    """Per particle and component: log evidence ``(M, C)`` (up to a constant
    per particle), posterior means ``(M, C, D)`` and covariances ``(M, C, D, D)``,
    all components at once."""
    s_inv = np.linalg.inv(prior.covariances)                                   # (C, D, D)
    s_inv_mu = np.einsum("cde,ce->cd", s_inv, prior.means)
    a = prec[:, None] + s_inv[None]                                            # (M, C, D, D) posterior precision
    b = eta[:, None] + s_inv_mu[None]                                          # (M, C, D)
    covs, logdet_a = _small_cholesky_inverse(a)
    means = np.einsum("mcde,mce->mcd", covs, b)
    _, logdet_s = np.linalg.slogdet(prior.covariances)
    # ∫ exp(ηᵀz − ½zᵀHz) N(z; μ, Σ) dz up to factors that do not depend on j
    logev = (0.5 * (b * means).sum(-1) - 0.5 * (prior.means * s_inv_mu).sum(-1) - 0.5 * logdet_s
             - 0.5 * logdet_a + np.log(np.maximum(prior.weights, 1e-300)))
    return logev, means, covs


def fit_prior(eta: np.ndarray, prec: np.ndarray, start: np.ndarray, n_components: int = 8,
              n_iter: int = 60, tol: float = 1e-6, seed: int = 0, floor: float = 1e-4,
              world: Optional[World] = None) -> CoordinatePrior:
    """Extreme deconvolution: the mixture prior that best explains all
    particles' likelihoods ``exp(ηᵢᵀz − ½ zᵀHᵢz)``.

    Args:
        eta: ``(M, D)`` information vectors ``η_i``.
        prec: ``(M, D, D)`` likelihood precisions ``H_i`` (symmetric, positive semi-definite).
        start: ``(M, D)`` point estimates (e.g. MAP coordinates) for the k-means start
            and the covariance scale.
        n_components: mixture components ``C``.
        floor: covariance floor, as a fraction of the (robust) variance of ``start`` per coordinate.
        world: ranks sharing the EM (:mod:`..distributed`): each computes the
            posteriors of its share of the particles and the sums that make the
            new prior are added over ranks; the k-means start is rank 0's.
    """
    from sklearn.cluster import KMeans
    z = np.asarray(start, float)
    eta = np.asarray(eta, float)
    prec = np.asarray(prec, float)
    m, d = z.shape
    c = int(min(n_components, max(1, m // 20)))
    # robust scale and a clipped start: an estimate without a prior can be wild
    # for a view that does not see a motion
    centre = np.median(z, axis=0)
    sd = 1.4826 * np.median(np.abs(z - centre), axis=0) + 1e-12
    z = np.clip(z, centre - 5 * sd, centre + 5 * sd)
    spread = sd ** 2
    world = world or World()
    means = None
    if world.is_main:
        labels = KMeans(c, n_init=3, random_state=seed).fit_predict(z) if c > 1 else np.zeros(m, int)
        means = np.stack([z[labels == j].mean(0) if (labels == j).any() else z.mean(0) for j in range(c)])
    means = world.broadcast_array(means)  # one start for every rank
    covs = np.stack([np.diag(spread) / c] * c)
    prior = CoordinatePrior(np.full(c, 1.0 / c), means, covs)
    mine = world.shard(m)  # this rank's particles (all of them with one rank)
    if world.size > 1:
        eta, prec = eta[mine], prec[mine]
    prev = -np.inf
    for _ in range(n_iter):
        logev, pm, pc = _component_posteriors(eta, prec, prior)
        r = softmax(logev, axis=1)
        total, nk, first = world.sum_arrays(logsumexp(logev, axis=1).sum(), r.sum(0),
                                            np.einsum("mc,mcd->cd", r, pm))
        total, nk = float(total), nk + 1e-12
        means = first / nk[:, None]
        dev = pm - means[None]
        second, = world.sum_arrays(np.einsum("mc,mcd,mce->cde", r, dev, dev) + np.einsum("mc,mcde->cde", r, pc))
        covs = second / nk[:, None, None]
        covs = covs + np.diag(floor * spread)[None]
        prior = CoordinatePrior(nk / m, means, covs)
        if total - prev < tol * abs(total):
            break
        prev = total
    return prior


def posterior_moments(eta: np.ndarray, prec: np.ndarray, prior: CoordinatePrior,
                      world: Optional[World] = None) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means ``(M, D)`` and covariances ``(M, D, D)`` of the
    coordinates under ``prior`` (moments of each particle's posterior mixture);
    with several ranks (``world``) each computes its share of the particles
    and every rank gets all rows."""
    eta = np.asarray(eta, float)
    prec = np.asarray(prec, float)
    world = world or World()
    if world.size > 1:
        mine = world.shard(len(eta))
        mean, cov = posterior_moments(eta[mine], prec[mine], prior)
        return world.gather_rows(mean), world.gather_rows(cov)
    logev, pm, pc = _component_posteriors(eta, prec, prior)
    r = softmax(logev, axis=1)
    mean = np.einsum("mc,mcd->md", r, pm)
    dev = pm - mean[:, None]
    cov = np.einsum("mc,mcde->mde", r, pc) + np.einsum("mc,mcd,mce->mde", r, dev, dev)
    return mean, cov


def deconvolved_coordinates(eta: np.ndarray, prec: np.ndarray, start: np.ndarray, n_components: int = 8,
                            seed: int = 0, prior: Optional[CoordinatePrior] = None,
                            world: Optional[World] = None) -> tuple[np.ndarray, np.ndarray, CoordinatePrior]:
    """Fit the population prior (unless given) and return ``(posterior means
    (M, D), posterior covariances (M, D, D), prior)``; ``world``: ranks sharing
    the particles (every rank gets the same result)."""
    prior = prior or fit_prior(eta, prec, start, n_components, seed=seed, world=world)
    return (*posterior_moments(eta, prec, prior, world), prior)
