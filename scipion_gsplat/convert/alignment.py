"""Scipion projection alignment (4×4 matrix) ↔ RELION angles and origin.

Scipion stores a particle's 3D projection alignment as the inverse transform,
shifts in pixels; RELION stores ZYZ angles and the origin. The mapping is the
one every Scipion EM plugin uses (scipion-em-relion's ``geometryFromMatrix``)::

    Minv = inv(M);  origin = −translation(Minv);  angles = −euler_from_matrix(Minv, 'szyz')

Angles are returned in RELION's canonical form (tilt in [0, 180]) through
:mod:`scipion_gsplat.core.geometry`, so a STAR → Scipion → STAR round trip
gives the same numbers back.
"""
from __future__ import annotations

import numpy as np
from pwem.convert.transformations import euler_from_matrix, euler_matrix, translation_from_matrix

from ..core.geometry import euler_to_matrix, matrix_to_euler


def relion_to_matrix(rot_deg: float, tilt_deg: float, psi_deg: float,
                     origin_x_px: float, origin_y_px: float) -> np.ndarray:
    """Scipion 4×4 projection-alignment matrix from RELION angles and origin (pixels)."""
    m = euler_matrix(*(-np.deg2rad([rot_deg, tilt_deg, psi_deg])), axes="szyz")
    m[:3, 3] = [-origin_x_px, -origin_y_px, 0.0]
    return np.linalg.inv(m)


def matrix_to_relion(matrix: np.ndarray) -> tuple[float, float, float, float, float]:
    """``(rot, tilt, psi, origin_x_px, origin_y_px)`` of a Scipion 4×4 projection matrix."""
    inv = np.linalg.inv(np.asarray(matrix, dtype=np.float64))
    shifts = -translation_from_matrix(inv)
    angles = -np.rad2deg(euler_from_matrix(inv, axes="szyz"))
    rot, tilt, psi = matrix_to_euler(euler_to_matrix(*angles))
    return float(rot), float(tilt), float(psi), float(shifts[0]), float(shifts[1])
