"""Projection-direction grid and the grouping of particles into direction cones.

Directions are folded twice before grouping:

* hemisphere — a projection along ``−d`` is the mirror image of a projection
  along ``d``: the pose ``F·A`` with ``F = diag(1, −1, −1)`` has direction ``−d``
  and gives the image flipped in y (``image'(x, y) = image(x, −y)``);
* symmetry — a particle with pose ``A`` is also a projection at ``A·R`` for every
  ``R`` of the point group.

Each particle therefore has ``2·|G|`` equivalent poses. The direction grid
covers one fundamental domain of that extended group (the Dirichlet cell of a
generic reference direction, as in :mod:`..symmetry`), and a particle joins
every grid direction within the cone radius of any of its equivalent
directions, keeping for each (particle, direction) pair the equivalent pose
closest to the direction. Neighbouring cones overlap, so particles are shared
between neighbouring directions: that overlap makes the graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ..io import InputError
from ..symmetry import in_asymmetric_unit, symmetry_matrices

MIRROR = np.diag([1.0, -1.0, -1.0])  # F: pose F·A views along −d, image flipped in y


def fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` near-uniform unit vectors ``(n, 3)`` (golden-angle spiral)."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def equivalent_poses(symmetry: str, hemisphere: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Left and right factors of the equivalent poses ``L·A·R``.

    Returns:
        ``(left (K, 3, 3), right (K, 3, 3))`` with ``K = |G|`` or ``2|G|``;
        ``left`` is the identity or the mirror ``F``, ``right`` a group element.
    """
    group = symmetry_matrices(symmetry)
    lefts = [np.eye(3)] + ([MIRROR] if hemisphere else [])
    left = np.array([l for l in lefts for _ in group])
    right = np.array([g for _ in lefts for g in group])
    return left, right


def direction_grid(sampling_deg: float, symmetry: str = "C1", hemisphere: bool = True) -> np.ndarray:
    """Grid directions spaced by about ``sampling_deg`` over one fundamental domain.

    Returns:
        ``(D, 3)`` unit vectors.
    """
    if not 0.5 <= sampling_deg <= 60:
        raise InputError(f"angular sampling {sampling_deg}° out of range (0.5 to 60)")
    s = np.deg2rad(sampling_deg)
    n_sphere = int(np.ceil(4 * np.pi / (np.sqrt(3) / 2 * s * s)))
    pts = fibonacci_sphere(n_sphere)
    return pts[in_asymmetric_unit(pts, symmetry, mirror=hemisphere)]


@dataclass
class DirectionGroups:
    """Particle ↔ direction memberships.

    Attributes:
        directions: ``(D, 3)`` grid directions.
        pair_particle: ``(P,)`` particle row of each (particle, direction) pair.
        pair_direction: ``(P,)`` direction index of each pair.
        pair_pose: ``(P, 3, 3)`` equivalent pose of the particle used in that
            direction (``L·A·R``).
        pair_mirror: ``(P,)`` True when that pose includes the mirror ``F``
            (the image must be flipped in y).
        pair_angle_deg: ``(P,)`` angle between the pose's direction and the
            grid direction.
    """
    directions: np.ndarray
    pair_particle: np.ndarray
    pair_direction: np.ndarray
    pair_pose: np.ndarray
    pair_mirror: np.ndarray
    pair_angle_deg: np.ndarray

    @property
    def n_directions(self) -> int:
        return len(self.directions)

    def counts(self) -> np.ndarray:
        """Particles per direction ``(D,)``."""
        return np.bincount(self.pair_direction, minlength=self.n_directions)

    def order_by_direction(self) -> np.ndarray:
        """Pair indices sorted by direction (stable), for slicing per direction."""
        return np.argsort(self.pair_direction, kind="stable")


def group_particles(poses: np.ndarray, sampling_deg: float = 7.5, cone_deg: float = None,
                    symmetry: str = "C1", hemisphere: bool = True) -> DirectionGroups:
    """Assign particles to every direction cone they fall in.

    Args:
        poses: ``(N, 3, 3)`` RELION pose matrices.
        sampling_deg: grid spacing in degrees.
        cone_deg: cone radius (default ``1.25 × sampling_deg``; 1–1.5× the
            spacing makes neighbouring cones share particles without blurring
            the views).
        symmetry: point group.
        hemisphere: fold ``d`` and ``−d`` together (mirror images).
    """
    cone = 1.25 * sampling_deg if cone_deg is None else cone_deg
    dirs = direction_grid(sampling_deg, symmetry, hemisphere)
    left, right = equivalent_poses(symmetry, hemisphere)
    poses = np.asarray(poses, float)
    k = len(left)
    eq = np.einsum("kij,njl,klm->nkim", left, poses, right)  # (N, K, 3, 3)
    eq_dirs = eq[:, :, 2, :].reshape(-1, 3)
    tree = cKDTree(dirs)
    chord = 2 * np.sin(np.deg2rad(cone) / 2)
    hits = tree.query_ball_point(eq_dirs, chord)
    lengths = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
    rows = np.repeat(np.arange(len(hits), dtype=np.int64), lengths)
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in hits]) if len(rows) else rows
    if len(rows) == 0:
        raise InputError("no particle falls in any direction cone")
    cosang = np.einsum("pi,pi->p", eq_dirs[rows], dirs[cols])
    # keep, for every (particle, direction), the equivalent pose closest to it
    particle = rows // k
    key = particle * len(dirs) + cols
    order = np.lexsort((-cosang, key))
    first = np.ones(len(order), bool)
    first[1:] = key[order][1:] != key[order][:-1]
    sel = order[first]
    part, col, flat = particle[sel], cols[sel], rows[sel]
    equiv = flat % k
    return DirectionGroups(
        directions=dirs, pair_particle=part, pair_direction=col,
        pair_pose=eq.reshape(-1, 3, 3)[flat], pair_mirror=equiv >= (k // 2 if hemisphere else k),
        pair_angle_deg=np.rad2deg(np.arccos(np.clip(cosang[sel], -1, 1))))


def direction_reference_poses(directions: np.ndarray) -> np.ndarray:
    """Reference pose (ψ = 0) of each direction, ``(D, 3, 3)``: the RELION
    matrix whose third row is the direction."""
    from ..geometry import direction_to_euler, euler_to_matrix
    rt = direction_to_euler(directions)
    return euler_to_matrix(rt[:, 0], rt[:, 1], np.zeros(len(rt)))
