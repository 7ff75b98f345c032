"""Held-out (half-set) likelihood of a two-class split, to choose between candidate splits.

A split is judged by how well class maps built from one half set predict the
particles of the other half: for each half ``h``, each class map is
reconstructed from the particles of half ``h`` only (weighted by their class
probabilities), filtered by its FSC between the halves (the Wiener factor of
one half map, its error power ``P·FSC·(1 − FSC)`` per shell) and every
particle of the other half is scored under the two-class mixture::

    log p(X) = log Σ_k π_k · L(X | V_k^h)          (π_k: class fractions in half h)

with the noise-aware likelihood of :func:`.refine.class_loglik`. The two
directions are summed. The training labels of half ``h`` must not depend on
the other half: a refinement that saw all particles fits its labels to maps
holding the scored particles (measured: a refined split of ARI 0.00 scored
above a pooled split of ARI 0.35), so candidates are scored with labels made
on each half independently (:func:`independent_refinement`, the half-set
eigenvolumes of :func:`.pooled.pooled_split`). A split that follows real structure gives class maps
that explain unseen particles better than a split that follows noise (whose
class maps differ by the noise of the particles that built them), so the
candidate with the higher held-out log likelihood is kept; unlike a fixed
threshold on half-set agreement it compares the candidates with each other.
Measured, it prefers EM-refined splits that fit noise (they win on likelihood).

Reproducibility (:func:`difference_agreement`) compares the candidates by the
measure of the eigenvolume's half-set support instead: each candidate is made
on each half set alone, each half gives a class-difference map ``V1 − V2``,
and the masked, low-passed correlation of the two halves' difference maps says
how much of the candidate's 3D difference is structure rather than the noise
of the particles it was fitted to.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from scipy.special import logsumexp

from ..particle_spectra import ParticleSpectra
from .refine import _reconstruct, class_loglik, refine_two_classes
from ..fsc import apply_shell_filter, fsc_curve, lowpass, shell_power


def heldout_loglik(class_data: Sequence[ParticleSpectra], prob: np.ndarray, sigma2: np.ndarray,
                   max_shell: Optional[int] = None) -> tuple[float, np.ndarray]:
    """Held-out log likelihood of a split.

    Args:
        class_data: the particles with each class's poses (``[data, data]`` when
            both classes share the poses); half sets from ``class_data[0].half``.
        prob: ``(N, 2)`` class probabilities (one-hot for a hard split).
        sigma2: image noise power per shell (``data.box//2 + 1``).
        max_shell: highest Fourier shell scored (default Nyquist).

    Returns:
        ``(total, per_particle (N,))``: the summed and per-particle held-out log
        likelihoods (each particle scored by the maps of the other half).
    """
    d0 = class_data[0]
    n = len(d0)
    prob = np.asarray(prob, float)
    max_shell = d0.box // 2 if max_shell is None else max_shell
    halves = [np.flatnonzero(d0.half == h) for h in (1, 2)]
    filt, errs = [[None, None], [None, None]], [[None, None], [None, None]]
    for k in range(2):
        hm = [_reconstruct(class_data[k], rows, prob[rows, k])[0] for rows in halves]
        _, f = fsc_curve(hm[0], hm[1], d0.pixel_size_A)
        f = np.clip(f, 0.0, 0.999)
        for h in range(2):
            filt[k][h] = apply_shell_filter(hm[h], f)
            errs[k][h] = shell_power(hm[h]) * f * (1 - f)
    per = np.zeros(n)
    for h, rows in enumerate(halves):
        train = halves[1 - h]  # the class fractions of half h over every rank's particles
        prior = np.clip(d0.sum_over_ranks(prob[train].sum(0)) / max(d0.sum_over_ranks(len(train)), 1), 1e-3, 1.0)
        ll = np.zeros((len(rows), 2))
        for k in range(2):
            ll[:, k] = class_loglik(class_data[k], rows, [filt[k][1 - h]], [errs[k][1 - h]], sigma2,
                                    max_shell)[0][:, 0]
        per[rows] = logsumexp(ll + np.log(prior)[None], axis=1)
    return float(d0.sum_over_ranks(per.sum())), per


def independent_refinement(data: ParticleSpectra, init_prob: np.ndarray, **options) -> np.ndarray:
    """Two-class refinement run on each half set alone (its own sub-halves for
    the FSC), started from ``init_prob``; ``options`` go to
    :func:`.refine.refine_two_classes`. Returns ``(N, 2)`` probabilities in the
    class order of ``init_prob``. Sharded ``data``: every rank refines its
    particles of each half together with the other ranks' (sub-halves by the
    position in the half set over all ranks, as with one process)."""
    init_prob = np.asarray(init_prob, float)
    out = np.array(init_prob, copy=True)
    for h in (1, 2):
        rows = np.flatnonzero(data.half == h)
        sizes, mine = data.gather_rows(np.array([len(rows)]))
        if sizes.sum() < 4:
            continue
        first = int(sizes[:mine.start].sum())  # position of this rank's first row in half h
        sub = data.subset(rows, half=((first + np.arange(len(rows))) % 2) + 1)  # a view when on disk
        q = refine_two_classes(sub, init_prob[rows], **options).probabilities
        kept = data.sum_over_ranks((np.argmax(q, 1) == np.argmax(init_prob[rows], 1)).sum())
        if kept < 0.5 * sizes.sum():
            q = q[:, ::-1]
        out[rows] = q
    return out


def half_difference_maps(data: ParticleSpectra, prob: np.ndarray, mask: np.ndarray,
                         lowpass_A: float, progress: Optional[Callable[[str], None]] = None) -> list:
    """Each half set's class-difference map ``V1 − V2`` (its two class maps
    reconstructed from that half's particles weighted by ``prob (N, 2)``),
    low-passed to ``lowpass_A`` (Å) and masked as the eigenvolume is
    (:func:`.pooled.eigenvolume`); ``[(m, m, m), (m, m, m)]``, unit norm
    (zero where a half has no difference)."""
    prob = np.asarray(prob, float)
    out = []
    for h in (1, 2):
        rows = np.flatnonzero(data.half == h)
        v = [_reconstruct(data, rows, prob[rows, k], progress=progress,
                          label=f"half set {h} class {k + 1} map")[0] for k in range(2)]
        d = lowpass(v[0] - v[1], data.pixel_size_A, lowpass_A) * mask
        norm = float(np.linalg.norm(d))
        out.append(d / norm if norm > 0 else d)
    return out


def difference_agreement(data: ParticleSpectra, prob: np.ndarray, mask: np.ndarray,
                         lowpass_A: float = 8.0, progress: Optional[Callable[[str], None]] = None) -> float:
    """Reproducibility of a split's 3D difference: the masked, low-passed
    correlation (0…1, sign ignored) of the two half sets' class-difference maps
    (:func:`half_difference_maps`), the measure of the half-set eigenvolume
    agreement of :func:`.pooled.pooled_split`. ``prob`` must be made on each
    half independently (:func:`independent_refinement`, the pooled split's
    ``half_probabilities``): labels fitted to all particles reproduce their
    noise in both halves."""
    d1, d2 = half_difference_maps(data, prob, mask, lowpass_A, progress)
    return abs(float((d1 * d2).sum()))
