"""Refined poses into a particle table (one place for every program that refines poses)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..geometry import angular_distance_deg, matrix_to_euler
from ..io import ParticleStar


def pose_columns(star: ParticleStar, poses: np.ndarray, origins_A: np.ndarray) -> dict:
    """RELION pose columns of refined poses ``(N, 3, 3)`` and origins ``(N, 2)`` (Å):
    ``rlnAngleRot/Tilt/Psi`` (degrees), ``rlnOriginX/YAngst`` and
    ``rlnGsplatAngleChange`` (degrees from the poses of ``star``)."""
    euler = matrix_to_euler(poses)
    origins_A = np.asarray(origins_A, float)
    return {"rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
            "rlnOriginXAngst": origins_A[:, 0], "rlnOriginYAngst": origins_A[:, 1],
            "rlnGsplatAngleChange": angular_distance_deg(star.poses(), poses)}


def with_poses(star: ParticleStar, poses: np.ndarray, origins_A: np.ndarray,
               angle_change: bool = True) -> ParticleStar:
    """A copy of ``star`` whose particles have the poses ``(N, 3, 3)`` (RELION
    matrices, written as ``rlnAngleRot/Tilt/Psi``) and origins ``(N, 2)`` in Å
    (``rlnOriginX/YAngst``); every other column is kept. With ``angle_change``
    the rotation from the input pose is added as ``rlnGsplatAngleChange``
    (degrees). The input ``star`` is not modified."""
    cols = pose_columns(star, poses, origins_A)
    if not angle_change:
        del cols["rlnGsplatAngleChange"]
    return replace(star, particles=star.particles.assign(**cols))
