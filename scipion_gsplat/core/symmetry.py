"""Point-group symmetry (RELION/Xmipp conventions) and asymmetric units.

Groups: ``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I`` (= ``I2``), ``I1``–``I4``.
Axes follow RELION: ``Cn`` about z; ``Dn`` adds a 2-fold about x; ``T`` a 3-fold
about z and a 2-fold in the yz plane; ``O`` a 4-fold about z; ``I2`` 2-folds on
x, y, z with a 5-fold in the xz plane.

A symmetric map satisfies ``V(R·r) = V(r)`` for every ``R`` of the group, so a
particle with pose ``A`` is also a projection at every pose ``A·R``
(:func:`expand_poses`).

The asymmetric unit of projection directions used here is the Dirichlet
(Voronoi) cell of a fixed generic reference direction: ``d`` belongs to it when
it is at least as close to the reference as any of its symmetry mates ``R·d``.
It is a true fundamental domain for every group, which is all the classification
code needs; its shape differs from RELION's hand-drawn units.
"""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from .geometry import axis_angle_matrix
from .io import InputError

_PHI = (1 + 5 ** 0.5) / 2
# Generators as (fold, axis). Closure of the generators gives the group.
_GENERATORS = {
    "T": [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))],
    "O": [(3, (1, 1, 1)), (4, (0, 0, 1))],
    "I1": [(2, (1, 0, 0)), (5, (_PHI, 0, -1))],
    "I2": [(2, (0, 0, 1)), (5, (1, 0, _PHI))],
    "I3": [(2, (-1, 0, _PHI)), (5, (0, 0, 1))],
    "I4": [(2, (1, 0, _PHI)), (5, (0, 0, 1))],
}
# A generic direction (no symmetry axis or mirror plane passes through it).
REFERENCE_DIRECTION = np.array([0.1071, 0.0472, 0.9931])
REFERENCE_DIRECTION = REFERENCE_DIRECTION / np.linalg.norm(REFERENCE_DIRECTION)


def normalize_symmetry_name(name: str) -> str:
    """Canonical upper-case name (``c1`` → ``C1``, ``i`` → ``I2``).

    Raises:
        InputError: on names that are not a supported point group.
    """
    s = str(name).strip().upper()
    if s == "I":
        s = "I2"
    if re.fullmatch(r"[CD][1-9][0-9]*", s) or s in _GENERATORS:
        return s
    raise InputError(f"unsupported symmetry '{name}' (use Cn, Dn, T, O, I, I1-I4)")


def _closure(generators: list[np.ndarray]) -> np.ndarray:
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                m = h @ g
                if not any(np.allclose(m, x, atol=1e-5) for x in group):
                    group.append(m)
                    new.append(m)
        frontier = new
        if len(group) > 120:
            raise RuntimeError("symmetry generators do not close into a point group")
    return np.array(group)


@lru_cache(maxsize=None)
def _matrices_cached(name: str) -> np.ndarray:
    kind = name[0]
    if kind in "CD":
        n = int(name[1:])
        gens = [axis_angle_matrix((0, 0, 1), 360.0 / n)]
        if kind == "D":
            gens.append(axis_angle_matrix((1, 0, 0), 180.0))
    else:
        gens = [axis_angle_matrix(axis, 360.0 / fold) for fold, axis in _GENERATORS[name]]
    mats = _closure(gens)
    mats[np.abs(mats) < 1e-12] = 0.0
    return mats


def symmetry_matrices(name: str) -> np.ndarray:
    """Rotation matrices of a point group, identity first.

    Returns:
        ``(G, 3, 3)`` float64 array (G = 1, n, 2n, 12, 24 or 60).
    """
    return _matrices_cached(normalize_symmetry_name(name)).copy()


def expand_poses(matrices: np.ndarray, symmetry: str) -> np.ndarray:
    """All symmetry-equivalent poses ``A·R`` of each pose ``A``.

    Args:
        matrices: ``(N, 3, 3)`` particle poses.

    Returns:
        ``(N, G, 3, 3)`` poses.
    """
    group = symmetry_matrices(symmetry)
    return np.einsum("nij,gjk->ngik", np.asarray(matrices, float), group)


def _mates(directions: np.ndarray, symmetry: str, mirror: bool) -> np.ndarray:
    """All equivalent directions ``(N, K, 3)``: ``Rᵀ·d`` (and ``−Rᵀ·d`` with ``mirror``)."""
    group = symmetry_matrices(symmetry)
    d = np.asarray(directions, float)
    mates = np.einsum("gji,nj->ngi", group, d)
    return np.concatenate([mates, -mates], axis=1) if mirror else mates


def to_asymmetric_unit(directions: np.ndarray, symmetry: str,
                       mirror: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Map directions to their symmetry mate inside the asymmetric unit.

    A particle viewed along ``d`` with pose ``A`` is equivalent to the pose
    ``A·R`` (direction ``Rᵀ·d``), so the mates of ``d`` are ``Rᵀ·d``. With
    ``mirror`` the mirror views ``−Rᵀ·d`` count as mates too (projections along
    opposite directions are mirror images).

    Args:
        directions: ``(N, 3)`` unit vectors.

    Returns:
        ``(folded (N, 3), op_index (N,))``; ``op_index`` indexes the group
        matrices, offset by ``|G|`` for mirrored mates.
    """
    mates = _mates(directions, symmetry, mirror)
    op = np.argmax(mates @ REFERENCE_DIRECTION, axis=1)
    return mates[np.arange(len(mates)), op], op


def in_asymmetric_unit(directions: np.ndarray, symmetry: str, mirror: bool = False,
                       tol: float = 1e-9) -> np.ndarray:
    """Boolean ``(N,)``: whether each direction lies in the asymmetric unit
    (of the group, or of the group with mirror views when ``mirror``)."""
    d = np.asarray(directions, float)
    best = (_mates(d, symmetry, mirror) @ REFERENCE_DIRECTION).max(axis=1)
    return d @ REFERENCE_DIRECTION >= best - tol
