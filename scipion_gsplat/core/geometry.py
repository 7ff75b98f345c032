"""Geometry conventions of scipion-gsplat, in one place.

Every other module takes its rotations from here, so the conventions below are
the only ones in the code base (they are pinned by tests, including a match
against ``relion_project``):

* Euler angles are RELION's ZYZ angles ``(rot, tilt, psi)`` in degrees
  (``rlnAngleRot/Tilt/Psi``); :func:`euler_to_matrix` is RELION's
  ``Euler_angles2matrix``.
* Projection of a map ``V`` with matrix ``A``: ``image(x, y) = ∫ V(Aᵀ·(x, y, z)) dz``.
  Equivalently a 3D point ``r`` (Å, origin at voxel ``n//2``) lands at image
  position ``(A·r)_xy − origin`` where ``origin`` is RELION's
  ``rlnOriginX/YAngst``.
* Arrays are images ``[y, x]`` and volumes ``[z, y, x]``; the centre of a box of
  ``n`` pixels is index ``n // 2``.
* The projection direction of a particle (the beam direction in the map frame)
  is the third row of ``A``: ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``.

Functions accept numpy arrays with any leading batch shape ``(...)``.
"""
from __future__ import annotations

import numpy as np

def euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION ``Euler_angles2matrix``.

    Args:
        rot_deg, tilt_deg, psi_deg: angles in degrees, scalars or arrays of a
            common shape ``(...)``.

    Returns:
        ``(..., 3, 3)`` float64 rotation matrices ``A``.
    """
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot_deg, tilt_deg, psi_deg))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(matrix) -> np.ndarray:
    """RELION ``Euler_matrix2angles``: rotation matrices to ZYZ angles.

    Args:
        matrix: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 3)`` array of ``(rot, tilt, psi)`` in degrees, tilt in [0, 180].
    """
    m = np.asarray(matrix, dtype=np.float64)
    abs_sb = np.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    psi = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    rot = np.arctan2(m[..., 2, 1], m[..., 2, 0])
    tilt = np.arctan2(abs_sb, m[..., 2, 2])
    # Gimbal lock (tilt 0 or 180): put everything into psi as RELION does.
    up = m[..., 2, 2] > 0
    psi_lock = np.where(up, np.arctan2(-m[..., 1, 0], m[..., 0, 0]),
                        np.arctan2(m[..., 1, 0], -m[..., 0, 0]))
    rot = np.where(regular, rot, 0.0)
    tilt = np.where(regular, tilt, np.where(up, 0.0, np.pi))
    psi = np.where(regular, psi, psi_lock)
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))


def projection_direction(rot_deg, tilt_deg) -> np.ndarray:
    """Unit beam direction in the map frame (third row of ``A``).

    Returns:
        ``(..., 3)`` unit vectors ``(x, y, z)``.
    """
    a, b = np.deg2rad(np.asarray(rot_deg, float)), np.deg2rad(np.asarray(tilt_deg, float))
    a, b = np.broadcast_arrays(a, b)
    return np.stack([np.cos(a) * np.sin(b), np.sin(a) * np.sin(b), np.cos(b)], axis=-1)


def direction_to_euler(direction) -> np.ndarray:
    """``(rot, tilt)`` in degrees of unit vectors ``(..., 3)`` (inverse of
    :func:`projection_direction`)."""
    d = np.asarray(direction, float)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    rot = np.rad2deg(np.arctan2(d[..., 1], d[..., 0]))
    tilt = np.rad2deg(np.arccos(np.clip(d[..., 2], -1.0, 1.0)))
    return np.stack([rot, tilt], axis=-1)


def rotation_angle_deg(matrix) -> np.ndarray:
    """Rotation angle (degrees, in [0, 180]) of rotation matrices ``(..., 3, 3)``."""
    m = np.asarray(matrix, float)
    cos = (np.trace(m, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def angular_distance_deg(matrix_a, matrix_b) -> np.ndarray:
    """Angle (degrees) of the relative rotation ``A·Bᵀ`` between two poses."""
    a, b = np.asarray(matrix_a, float), np.asarray(matrix_b, float)
    return rotation_angle_deg(a @ np.swapaxes(b, -1, -2))


def direction_distance_deg(dir_a, dir_b) -> np.ndarray:
    """Angle (degrees) between unit direction vectors ``(..., 3)``."""
    cos = np.sum(np.asarray(dir_a, float) * np.asarray(dir_b, float), axis=-1)
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def axis_angle_matrix(axis, angle_deg) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` of ``angle_deg`` about ``axis`` (right hand)."""
    u = np.asarray(axis, float)
    u = u / np.linalg.norm(u)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations drawn uniformly from SO(3) (uniform unit quaternions).

    Returns:
        ``(n, 3, 3)`` rotation matrices.
    """
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def swing_twist_psi_deg(matrix, reference) -> np.ndarray:
    """In-plane angle (degrees) of ``matrix`` relative to ``reference``.

    The relative rotation ``R = A·Bᵀ`` (``A`` the particle's pose, ``B`` a
    reference pose whose direction is close) is split into a twist about the
    beam axis (z of the image frame) and a swing about an in-plane axis. The
    twist is the in-plane rotation that best aligns the particle's image with
    the reference image; it uses the whole relative rotation, not ψ alone.

    Args:
        matrix: ``(..., 3, 3)`` particle poses ``A``.
        reference: ``(..., 3, 3)`` reference poses ``B`` (broadcastable).

    Returns:
        ``(...)`` twist angles in degrees, in (−180, 180], signed like ψ:
        for two poses that differ only in ψ it is ``ψ_matrix − ψ_reference``.
    """
    r = np.asarray(matrix, float) @ np.swapaxes(np.asarray(reference, float), -1, -2)
    # Quaternion of R: w = sqrt(1 + tr)/2, z = (R10 − R01)/(4w); the twist about
    # z is 2·atan2(z, w) = 2·atan2(R10 − R01, 1 + tr). RELION's ψ turns the
    # frame the other way round, hence the minus sign.
    one_plus_trace = 1.0 + np.trace(r, axis1=-2, axis2=-1)
    return -np.rad2deg(2.0 * np.arctan2(r[..., 1, 0] - r[..., 0, 1], one_plus_trace))
