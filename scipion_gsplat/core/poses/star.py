"""Refined poses into a particle table (one place for every program that refines poses)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..geometry import angular_distance_deg, matrix_to_euler
from ..io import ParticleStar


def with_poses(star: ParticleStar, poses: np.ndarray, origins_A: np.ndarray,
               angle_change: bool = True) -> ParticleStar:
    """A copy of ``star`` whose particles have the poses ``(N, 3, 3)`` (RELION
    matrices, written as ``rlnAngleRot/Tilt/Psi``) and origins ``(N, 2)`` in Å
    (``rlnOriginX/YAngst``); every other column is kept. With ``angle_change``
    the rotation from the input pose is added as ``rlnGsplatAngleChange``
    (degrees). The input ``star`` is not modified."""
    parts = star.particles.copy()
    euler = matrix_to_euler(poses)
    for k, col in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
        parts[col] = euler[:, k]
    origins_A = np.asarray(origins_A, float)
    parts["rlnOriginXAngst"], parts["rlnOriginYAngst"] = origins_A[:, 0], origins_A[:, 1]
    if angle_change:
        parts["rlnGsplatAngleChange"] = angular_distance_deg(star.poses(), poses)
    return replace(star, particles=parts)
