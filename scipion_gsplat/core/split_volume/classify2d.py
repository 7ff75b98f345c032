"""Per-direction classification: masked PCA of aligned images + 2-component GMM.

For every direction the aligned images (``(k, m, m)``) are restricted to a mask
(a 3D mask projected along the direction, or a disc), centred, and their first
principal component (the eigen-image) gives one coordinate ``ρ`` per particle.
A seeded two-component Gaussian mixture with a shared variance is fitted to
``ρ``; each particle's log-likelihood ratio is the posterior log-odds
``λ = log p(C+|ρ) − log p(C−|ρ)`` (clipped to ±``LAMBDA_CLIP``). Directions with
fewer than ``min_particles`` get ``λ = 0``: they carry no weight in the graph.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from .align import align_images, in_plane_angles_deg
from .directions import DirectionGroups, direction_reference_poses

LAMBDA_CLIP = 20.0


@dataclass
class DirectionResult:
    """Per-direction outputs (arrays indexed by direction) and per-pair outputs."""
    eigen_images: np.ndarray        # (D, m, m) first principal component (unit norm in the mask)
    mean_images: np.ndarray         # (D, m, m)
    side_averages: np.ndarray       # (D, 2, m, m) averages of the λ>0 and λ<0 particles
    explained: np.ndarray           # (D,) fraction of variance on PC1
    gmm_means: np.ndarray           # (D, 2)
    gmm_sigma: np.ndarray           # (D,) shared standard deviation
    gmm_weights: np.ndarray         # (D, 2)
    bimodality: np.ndarray          # (D,) balanced separation 2·√(w+ w−)·|μ+ − μ−| / σ
    n_particles: np.ndarray         # (D,)
    coordinate: np.ndarray          # (P,) ρ of each (particle, direction) pair
    llr: np.ndarray                 # (P,) λ of each pair
    in_plane_deg: np.ndarray        # (P,) twist used to align each pair
    info: dict = field(default_factory=dict)


def fit_gmm(rho: np.ndarray, seed: int) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Seeded 2-component, shared-variance GMM on 1D coordinates.

    Returns:
        ``(means (2,), sigma, weights (2,), llr (k,))`` with components ordered
        by increasing mean and ``llr = log p(2nd) − log p(1st)``.
    """
    x = np.asarray(rho, np.float64)[:, None]
    init = np.percentile(x, [25, 75])[:, None]
    with warnings.catch_warnings():  # unimodal data do not "converge": that is an answer too
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(2, covariance_type="tied", means_init=init, random_state=seed,
                             max_iter=200, tol=1e-6).fit(x)
    order = np.argsort(gm.means_[:, 0])
    means = gm.means_[order, 0]
    weights = gm.weights_[order]
    sigma = float(np.sqrt(gm.covariances_.ravel()[0]))
    logp = gm.predict_proba(x)[:, order]
    with np.errstate(divide="ignore"):
        llr = np.log(logp[:, 1]) - np.log(logp[:, 0])
    return means, sigma, weights, np.clip(np.nan_to_num(llr, posinf=LAMBDA_CLIP, neginf=-LAMBDA_CLIP),
                                          -LAMBDA_CLIP, LAMBDA_CLIP)


def disc_mask(box: int, radius_px: float) -> np.ndarray:
    """Boolean disc ``(box, box)`` of radius ``radius_px`` around ``box//2``."""
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return x * x + y * y <= radius_px * radius_px


def classify_directions(images: torch.Tensor, groups: DirectionGroups,
                        masks: Optional[np.ndarray] = None, radius_px: Optional[float] = None,
                        min_particles: int = 10, seed: int = 0,
                        progress: Optional[Callable[[int, int], None]] = None) -> DirectionResult:
    """PCA + GMM in every direction.

    Args:
        images: ``(N, m, m)`` prepared images (:func:`.align.prepare_images`).
        groups: particle ↔ direction pairs.
        masks: ``(D, m, m)`` boolean masks per direction (projected 3D mask), or None.
        radius_px: disc radius in pixels when ``masks`` is None (default ``m/2 − 1``).
        min_particles: directions with fewer particles get ``λ = 0``.
    """
    m = images.shape[-1]
    n_dir = groups.n_directions
    refs = direction_reference_poses(groups.directions)
    angles = in_plane_angles_deg(groups.pair_pose, refs[groups.pair_direction])
    disc = disc_mask(m, (m / 2 - 1) if radius_px is None else radius_px)
    res = DirectionResult(
        eigen_images=np.zeros((n_dir, m, m), np.float32), mean_images=np.zeros((n_dir, m, m), np.float32),
        side_averages=np.zeros((n_dir, 2, m, m), np.float32), explained=np.zeros(n_dir),
        gmm_means=np.zeros((n_dir, 2)), gmm_sigma=np.zeros(n_dir), gmm_weights=np.zeros((n_dir, 2)),
        bimodality=np.zeros(n_dir), n_particles=groups.counts(),
        coordinate=np.zeros(len(angles)), llr=np.zeros(len(angles)), in_plane_deg=angles)
    order = groups.order_by_direction()
    bounds = np.searchsorted(groups.pair_direction[order], np.arange(n_dir + 1))
    skipped = 0
    for d in range(n_dir):
        pairs = order[bounds[d]:bounds[d + 1]]
        if len(pairs) < max(min_particles, 3):
            skipped += 1
            continue
        aligned = align_images(images[torch.as_tensor(groups.pair_particle[pairs], device=images.device)],
                               angles[pairs], groups.pair_mirror[pairs])
        mask = disc if masks is None else masks[d]
        x = aligned[:, torch.as_tensor(mask, device=aligned.device)].double()
        mean = x.mean(0)
        xc = x - mean
        _, sv, vh = torch.linalg.svd(xc, full_matrices=False)
        pc = vh[0]
        rho = (xc @ pc).cpu().numpy()
        total = float((sv ** 2).sum())
        means, sigma, weights, llr = fit_gmm(rho, seed)
        res.coordinate[pairs], res.llr[pairs] = rho, llr
        res.explained[d] = float(sv[0] ** 2) / total if total > 0 else 0.0
        res.gmm_means[d], res.gmm_sigma[d], res.gmm_weights[d] = means, sigma, weights
        # Ashman's D weighted by the balance of the two components, so that a
        # "component" made of one or two outliers does not count as bimodal
        balance = 2.0 * np.sqrt(weights[0] * weights[1])
        res.bimodality[d] = balance * abs(means[1] - means[0]) / sigma if sigma > 0 else 0.0
        res.eigen_images[d][mask] = pc.float().cpu().numpy()
        res.mean_images[d][mask] = mean.float().cpu().numpy()
        for side, sel in enumerate((llr > 0, llr <= 0)):
            if sel.any():
                res.side_averages[d, side] = aligned[torch.as_tensor(sel)].mean(0).cpu().numpy()
        if progress:
            progress(d + 1, n_dir)
    res.info = {"skipped_directions": skipped}
    return res
