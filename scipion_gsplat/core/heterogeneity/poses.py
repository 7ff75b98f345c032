"""Pose refinement against the consensus before the gradient PCA.

Poses from a consensus refinement carry errors of a few degrees and a fraction
of a pixel; every later stage (gradients, coordinates, refits) renders the
model at those poses, so their errors would read as heterogeneity. Two ways to
correct them, both with a Gaussian prior of σ ``sigma_ang_deg`` (degrees, per
rotation-vector component) and ``sigma_shift_A`` (Å, per origin axis):

* ``gradient``: per-particle corrections optimised jointly with the consensus
  fit (:mod:`..poses.gradient` through :func:`..splat.fit.fit`); no extra pass;
* ``search``: a local grid search of every particle against a voxel map of the
  fitted consensus (:func:`..poses.local_search.refine_poses`, posterior mean),
  on the working box.

Corrections are ``omega (M, 3)`` rad (``A' = exp([ω]×)·A``, image frame) and
``shift_A (M, 2)`` Å added to RELION's origins, in the particles' STAR order.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..distributed import World
from ..io import ImageReader, ParticleStar
from ..particle_spectra import load_spectra, noise_spectrum
from ..splat.model import GaussianModel

POSE_METHODS = ("gradient", "search")
# Grid levels of the local search (coarse grid and one finer level). Hinge set with 2° / 0.5 px errors,
# SNR 0.05, 4000 particles on the 40 px working box, 1 thread: RMS pose error 3.49° → 3.180° in 25.9 s
# with three levels, 3.180° in 17.4 s with two (the posterior mean needs no finer cells at this SNR).
SEARCH_LEVELS = 2


def search_corrections(star: ParticleStar, model: GaussianModel, work_box: int, sigma_ang_deg: float,
                       sigma_shift_A: float, device="cpu", log: Optional[Callable[[str], None]] = None,
                       workspace=None, world: Optional[World] = None) -> tuple[np.ndarray, np.ndarray]:
    """Local grid search of every particle of ``star`` against the consensus
    ``model`` voxelised at ``work_box`` pixels (σ 0 keeps that part fixed: a
    tiny σ is searched, which the prior pins to zero). ``workspace``: the
    memory budget of the spectra (:func:`..particle_spectra.load_spectra`).
    ``world``: several ranks each search their contiguous share of the
    particles (the noise spectrum is summed over all of them) and every rank
    gets all the corrections.

    Returns:
        ``(omega (M, 3) rad, shift_A (M, 2) Å)`` float64, in STAR order.
    """
    from ..poses.local_search import LocalSearch, refine_poses
    spectra = load_spectra(star, ImageReader(star), work_box, device, workspace=workspace, log=log,
                           world=world if world is not None and world.size > 1 else None)
    # the model renders images that sum to its amplitude at the working pixel (ParticleData's
    # convention, pixel values × (box/work)² after cropping); the cropped spectra keep the
    # real-space pixel values: scale the map to them
    ref = model.to_map(work_box, spectra.pixel_size_A, device=device) * (work_box / star.box_size) ** 2
    sigma2 = noise_spectrum(spectra, ref)
    search = LocalSearch(sigma_ang_deg=max(sigma_ang_deg, 1e-3), sigma_shift_A=max(sigma_shift_A, 1e-3),
                         levels=SEARCH_LEVELS)
    upd = refine_poses(spectra, ref, sigma2, search, progress=log)
    omega, _ = spectra.gather_rows(np.asarray(upd.omega, np.float64))
    shift, _ = spectra.gather_rows(np.asarray(upd.delta_origin_A, np.float64))
    omega, shift = np.array(omega, np.float64), np.array(shift, np.float64)
    if sigma_ang_deg <= 0:
        omega[:] = 0.0
    if sigma_shift_A <= 0:
        shift[:] = 0.0
    return omega, shift


def correction_summary(omega: np.ndarray, shift_A: np.ndarray, pixel_size_A: float) -> dict:
    """Median and RMS rotation change (degrees) and origin change (pixels of ``pixel_size_A``)."""
    ang = np.degrees(np.linalg.norm(omega, axis=1))
    px = np.linalg.norm(shift_A, axis=1) / pixel_size_A
    return {"median_angle_change_deg": float(np.median(ang)), "rms_angle_change_deg": float(np.sqrt(np.mean(ang ** 2))),
            "median_shift_change_px": float(np.median(px)), "rms_shift_change_px": float(np.sqrt(np.mean(px ** 2)))}
