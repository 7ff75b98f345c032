"""Initial Gaussian models: from a structure, from a map (sampled density), or
random inside a mask; neighbour pairs for the bond regulariser.

Every initial model's amplitudes are later rescaled to the particles by
:func:`.fit.calibrate_scale`, so only their relative values matter here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..io import InputError
from ..masks import radial_distance_px
from .model import GaussianModel, from_structure


def default_sigma_A(occupied_volume_A3: float, n_gaussians: int, sigma_min_A: float) -> float:
    """Initial width: half the mean spacing of ``n`` points filling the volume,
    at least 1.2 × the width floor."""
    spacing = (occupied_volume_A3 / max(n_gaussians, 1)) ** (1.0 / 3.0)
    return float(max(0.5 * spacing, 1.2 * sigma_min_A))


def _sample_voxels(weights: np.ndarray, n: int, pixel_size_A: float,
                   rng: np.random.Generator) -> np.ndarray:
    """``n`` points (Å, x y z from the box centre) drawn with probability ∝ weight
    per voxel, uniformly inside the chosen voxel."""
    box = weights.shape[-1]
    p = weights.ravel().astype(np.float64)
    p /= p.sum()
    idx = rng.choice(p.size, size=n, replace=True, p=p)
    z, y, x = np.unravel_index(idx, weights.shape)
    vox = np.stack([x, y, z], axis=1).astype(np.float64) - box // 2
    return (vox + rng.uniform(-0.5, 0.5, vox.shape)) * pixel_size_A


#: voxels above the reference density of :func:`_top_density` when the 99.9th percentile is solvent
TOP_VOXELS = 1000


def _top_density(v: np.ndarray) -> float:
    """The reference density of a map: its 99.9th percentile, unless that is
    within 4 robust standard deviations (1.4826 × the median absolute
    deviation) of the median, i.e. solvent; then the density of the
    :data:`TOP_VOXELS`-th highest voxel. A small particle in a large box (e.g.
    lysozyme, ~9,000 voxels at 1.5 Å, in a 256 px box of 16.8 M voxels) fills
    less than 0.1 % of the box."""
    flat = v.ravel()
    top = float(np.percentile(flat, 99.9))
    med = float(np.median(flat))
    if top - med > 4 * 1.4826 * float(np.median(np.abs(flat - med))) or flat.size <= TOP_VOXELS:
        return top
    return float(np.partition(flat, flat.size - TOP_VOXELS)[flat.size - TOP_VOXELS])


def from_map(volume: np.ndarray, pixel_size_A: float, n_gaussians: int, rng: np.random.Generator,
             sigma_min_A: float, sigma_A: Optional[float] = None,
             mask: Optional[np.ndarray] = None, threshold_rel: float = 0.1) -> GaussianModel:
    """Gaussians at points sampled from a map's density.

    Voxels below ``threshold_rel`` × the map's top density (:func:`_top_density`,
    inside ``mask`` if given) are ignored; the others are sampled with probability ∝
    density. Amplitudes are equal and sum to the thresholded density's voxel sum.

    Args:
        volume: ``[z, y, x]`` map (low-pass filter a noisy one first).
        sigma_A: initial width (default from the occupied volume, :func:`default_sigma_A`).
        mask: optional ``[z, y, x]`` weights in [0, 1].
    """
    v = np.asarray(volume, np.float64)
    if not np.isfinite(v).all():
        raise InputError("the initial map contains NaN or infinite values")
    if mask is not None:
        v = v * mask
    top = _top_density(v)
    if not np.isfinite(top) or top <= 0:
        raise InputError("the initial map has no positive density to sample Gaussians from")
    w = np.where(v >= threshold_rel * top, v, 0.0)
    occupied = np.count_nonzero(w) * pixel_size_A ** 3
    centres = _sample_voxels(w, n_gaussians, pixel_size_A, rng)
    sig = default_sigma_A(occupied, n_gaussians, sigma_min_A) if sigma_A is None else sigma_A
    return GaussianModel(centres, np.full(n_gaussians, w.sum() / n_gaussians), np.full(n_gaussians, sig))


def from_mask(mask: np.ndarray, pixel_size_A: float, n_gaussians: int, rng: np.random.Generator,
              sigma_min_A: float, sigma_A: Optional[float] = None) -> GaussianModel:
    """Gaussians at uniformly random points inside a mask (voxels ≥ 0.5), equal
    amplitudes (rescaled to the data later)."""
    m = np.asarray(mask, np.float64) >= 0.5
    if not m.any():
        raise InputError("the mask is empty (no voxel >= 0.5)")
    centres = _sample_voxels(m.astype(np.float64), n_gaussians, pixel_size_A, rng)
    sig = default_sigma_A(m.sum() * pixel_size_A ** 3, n_gaussians, sigma_min_A) if sigma_A is None else sigma_A
    return GaussianModel(centres, np.ones(n_gaussians), np.full(n_gaussians, sig))


def sphere_mask(box: int, radius_px: Optional[float] = None) -> np.ndarray:
    """Binary sphere ``[z, y, x]`` of ``radius_px`` (default 0.4·box) around voxel ``n//2``."""
    r = 0.4 * box if radius_px is None else radius_px
    return (radial_distance_px(box, 3) <= r).astype(np.float32)


def from_structure_file(path, level: str, sigma_min_A: float, center: str = "box",
                        box: Optional[int] = None, pixel_size_A: Optional[float] = None) -> GaussianModel:
    """One Gaussian per atom or residue of a PDB/mmCIF file.

    Args:
        level: ``atom`` or ``residue``.
        center: how the structure sits in the particles' box: ``box`` — its
            coordinates are in the frame of a map of this box with the origin at
            the corner (voxel ``n//2`` at ``(n//2)·pixel`` Å, as a model fitted
            into the consensus map); ``com`` — its centre of mass is at the box
            centre (as ``gsplat_simulate`` places it); or ``x,y,z`` in Å.
    """
    from ..structure import read_structure
    st = read_structure(path)
    if center == "com":
        centre = None
    elif center == "box":
        if box is None or pixel_size_A is None:
            raise InputError("--pdb-center box needs the box and pixel size")
        centre = np.full(3, (box // 2) * pixel_size_A)
    else:
        try:
            centre = np.array([float(x) for x in center.split(",")])
        except ValueError:
            centre = np.zeros(0)
        if centre.shape != (3,):
            raise InputError(f"structure centre '{center}': use box, com or x,y,z (Å)")
    model = from_structure(st, level, centre, extra_sigma_A=0.0)
    sig = np.maximum(model.sigmas_A, 1.2 * sigma_min_A)
    if box is not None and pixel_size_A is not None:
        outside = np.abs(model.centres_A).max(axis=1) > (box // 2 - 1) * pixel_size_A
        if outside.mean() > 0.5:
            raise InputError(f"{path}: most atoms fall outside the particle box "
                             f"(check --pdb-center: box, com or x,y,z)")
    return GaussianModel(model.centres_A, model.amplitudes, sig)


def perturb(model: GaussianModel, sigma_A: float, rng: np.random.Generator) -> GaussianModel:
    """The model with every centre moved by isotropic Gaussian noise of ``sigma_A`` Å
    per axis (independent starts for two half sets, or the noisy starts of Dräger's report)."""
    if sigma_A <= 0:
        return model
    out = model.subset(np.arange(len(model)))
    out.centres_A = out.centres_A + rng.normal(0.0, sigma_A, out.centres_A.shape)
    return out


def bond_pairs(centres_A: np.ndarray, sequential: bool, k: int = 3,
               max_length_A: Optional[float] = None) -> np.ndarray:
    """Neighbour pairs for the harmonic bond regulariser (Dräger's report).

    Args:
        centres_A: ``(N, 3)``.
        sequential: pair consecutive Gaussians (chain order, for models made
            from a structure) instead of each Gaussian's ``k`` nearest neighbours.
        max_length_A: drop pairs longer than this (default: 2 × the median pair
            length, which cuts chain breaks).

    Returns:
        ``(P, 2)`` int64 index pairs ``i < j``.
    """
    from scipy.spatial import cKDTree
    c = np.asarray(centres_A, float)
    if len(c) < 2:
        return np.zeros((0, 2), np.int64)
    if sequential:
        pairs = np.stack([np.arange(len(c) - 1), np.arange(1, len(c))], axis=1)
    else:
        _, nb = cKDTree(c).query(c, k=min(k + 1, len(c)))
        i = np.repeat(np.arange(len(c)), nb.shape[1] - 1)
        pairs = np.stack([i, nb[:, 1:].ravel()], axis=1)
        pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    length = np.linalg.norm(c[pairs[:, 0]] - c[pairs[:, 1]], axis=1)
    limit = 2.0 * np.median(length) if max_length_A is None else max_length_A
    return pairs[length <= limit].astype(np.int64)
