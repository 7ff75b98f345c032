"""From synchronised directions to a class, a score and a probability per particle.

Two ways, matching the two edge weights of :mod:`.maxcut`:

* ``llr`` (the thesis): a particle's score is the mean over its directions of
  ``s_i·λ_i(p)`` (a log-odds); its class is the sign of the score and its
  probability ``1 / (1 + exp(−|score|))``;
* ``coordinate`` (default): every direction's PCA coordinates are standardised
  (``z``); a direction's reliability ``r_i ≥ 0`` is its mean synchronised
  agreement with its neighbours (``Σ_j s_i s_j w_ij / Σ_j n_ij``: directions
  whose first component is noise agree with nobody); a particle's score is
  ``Σ_i r_i s_i z_i(p) / Σ_i r_i`` and a seeded two-component GMM on the scores
  gives classes and posterior probabilities (so unbalanced sets keep their
  proportions).

Class 1 is always the larger class. Particles in no direction (or only in
directions without weight) get score 0 and probability 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.mixture import GaussianMixture


@dataclass
class Partition:
    """Per-particle ``classes (N,)`` in {1, 2}, ``score (N,)`` (larger = more
    class 1), ``probability (N,)`` of the assigned class, ``n_directions (N,)``
    and ``component (N,)`` (graph component of the particle's directions, 0 =
    the largest; -1 when the particle is in no direction)."""
    classes: np.ndarray
    score: np.ndarray
    probability: np.ndarray
    n_directions: np.ndarray
    component: np.ndarray

    def class_sizes(self) -> tuple[int, int]:
        return int((self.classes == 1).sum()), int((self.classes == 2).sum())


def standardise(values: np.ndarray, pair_direction: np.ndarray, n_directions: int) -> np.ndarray:
    """Zero mean, unit variance of ``values`` within each direction."""
    count = np.bincount(pair_direction, minlength=n_directions)
    mean = np.bincount(pair_direction, values, n_directions) / np.maximum(count, 1)
    dev = values - mean[pair_direction]
    var = np.bincount(pair_direction, dev * dev, n_directions) / np.maximum(count, 1)
    return dev / np.sqrt(np.maximum(var, 1e-30))[pair_direction]


def direction_reliability(w, pair_particle: np.ndarray, pair_direction: np.ndarray,
                          signs: np.ndarray, n_particles: int) -> np.ndarray:
    """``r_i = max(0, Σ_j s_i s_j w_ij / Σ_j n_ij)``, ``n_ij`` = shared particles."""
    d = len(signs)
    ones = sp.csr_matrix((np.ones(len(pair_particle)), (pair_direction, pair_particle)),
                         shape=(d, n_particles))
    shared = (ones @ ones.T).tocsr()
    shared = shared - sp.diags(shared.diagonal())
    agree = signs * (sp.csr_matrix(w) @ signs)
    return np.clip(agree / np.maximum(np.asarray(shared.sum(1)).ravel(), 1), 0.0, None)


def _particle_component(pair_particle, pair_direction, component, n_particles):
    comp = np.full(n_particles, -1)
    comp[pair_particle] = component[pair_direction]  # directions of one particle share a component
    return comp


def partition_llr(pair_particle: np.ndarray, pair_direction: np.ndarray, llr: np.ndarray,
                  signs: np.ndarray, component: np.ndarray, n_particles: int) -> Partition:
    """The thesis' rule: mean synchronised log-likelihood ratio, class = sign."""
    total = np.bincount(pair_particle, signs[pair_direction] * llr, minlength=n_particles)
    count = np.bincount(pair_particle, minlength=n_particles)
    score = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    if (score > 0).sum() < (score < 0).sum():
        score = -score
    classes = np.where(score >= 0, 1, 2)
    prob = 1.0 / (1.0 + np.exp(-np.abs(score)))
    return Partition(classes, score, prob, count,
                     _particle_component(pair_particle, pair_direction, component, n_particles))


def partition_coordinates(pair_particle: np.ndarray, pair_direction: np.ndarray, z: np.ndarray,
                          signs: np.ndarray, reliability: np.ndarray, component: np.ndarray,
                          n_particles: int, seed: int = 0) -> Partition:
    """Reliability-weighted synchronised coordinates, then a seeded GMM."""
    r = reliability[pair_direction]
    total = np.bincount(pair_particle, r * signs[pair_direction] * z, minlength=n_particles)
    weight = np.bincount(pair_particle, r, minlength=n_particles)
    count = np.bincount(pair_particle, minlength=n_particles)
    valid = weight > 0
    score = np.where(valid, total / np.maximum(weight, 1e-30), 0.0)
    prob = np.full(n_particles, 0.5)
    classes = np.ones(n_particles, int)
    if valid.sum() >= 4:
        x = score[valid][:, None]
        gm = GaussianMixture(2, covariance_type="full", random_state=seed,
                             means_init=np.percentile(x, [25, 75])[:, None]).fit(x)
        post = gm.predict_proba(x)
        big = int(np.argmax(gm.weights_))
        cls = np.where(np.argmax(post, 1) == big, 1, 2)
        classes[valid] = cls
        prob[valid] = post.max(1)
        if gm.means_[big, 0] < gm.means_[1 - big, 0]:  # larger score = class 1
            score = -score
    return Partition(classes, score, prob, count,
                     _particle_component(pair_particle, pair_direction, component, n_particles))
