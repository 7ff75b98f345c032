"""Small rotations and the pose-correction convention.

A pose is RELION's matrix ``A`` (see :mod:`..geometry`): a map point ``r``
lands at image position ``(A·r)_xy − origin``. A correction is a rotation
vector ``ω`` (axis × angle, radians) **in the image frame**::

    A' = exp([ω]×) · A

so ``ω_z`` is an in-plane rotation and ``ω_x, ω_y`` tilt the viewing
direction; a shift correction ``d`` (Å) is added to RELION's origin
(``origin' = origin + d``). Every module that corrects poses uses
:func:`compose` so corrections from different methods mean the same thing.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..geometry import angular_distance_deg


def rotvec_to_matrix(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, differentiable and exact near ``ω = 0``.

    Args:
        omega: ``(..., 3)`` rotation vectors in radians.

    Returns:
        ``(..., 3, 3)`` rotation matrices.
    """
    theta2 = (omega * omega).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    theta = torch.sqrt(theta2.clamp(min=1e-30))
    small = theta2 < 1e-8
    # sin θ/θ and (1 − cos θ)/θ² with their Taylor series near 0
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp(min=1e-30))
    x, y, z = omega[..., 0], omega[..., 1], omega[..., 2]
    zero = torch.zeros_like(x)
    k = torch.stack([torch.stack([zero, -z, y], -1),
                     torch.stack([z, zero, -x], -1),
                     torch.stack([-y, x, zero], -1)], -2)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(k.shape)
    return eye + a * k + b * (k @ k)


def rotvec_to_matrix_np(omega) -> np.ndarray:
    """:func:`rotvec_to_matrix` for numpy arrays (float64)."""
    return rotvec_to_matrix(torch.as_tensor(np.asarray(omega, np.float64))).numpy()


def compose(poses, omega):
    """Corrected poses ``exp([ω]×)·A``.

    Args:
        poses: ``(..., 3, 3)`` RELION matrices (numpy or torch).
        omega: ``(..., 3)`` corrections in radians, same type as ``poses``.
    """
    if torch.is_tensor(poses):
        return rotvec_to_matrix(omega.to(poses.dtype)) @ poses
    return rotvec_to_matrix_np(omega) @ np.asarray(poses, np.float64)


def local_rotation_grid(range_deg: float, step_deg: float) -> np.ndarray:
    """Rotation vectors on a cubic grid of spacing ``step_deg`` inside a ball of
    radius ``range_deg`` (the identity included, first).

    Returns:
        ``(J, 3)`` float64 rotation vectors in radians; ``J ≈ 4.2·(range/step)³``.
    """
    if not (step_deg > 0 and range_deg >= 0):
        raise ValueError(f"bad rotation grid: range {range_deg}°, step {step_deg}°")
    n = int(np.floor(range_deg / step_deg + 1e-9))
    ax = np.arange(-n, n + 1) * step_deg
    g = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    g = g[np.linalg.norm(g, axis=1) <= range_deg + 1e-9]
    g = g[np.argsort(np.linalg.norm(g, axis=1), kind="stable")]
    return np.deg2rad(g)


def shift_grid(range_A: float, step_A: float) -> np.ndarray:
    """Shift corrections (x, y) in Å on a square grid inside a disc of radius
    ``range_A`` (zero first). Returns ``(T, 2)`` float64."""
    if not (step_A > 0 and range_A >= 0):
        raise ValueError(f"bad shift grid: range {range_A} Å, step {step_A} Å")
    n = int(np.floor(range_A / step_A + 1e-9))
    ax = np.arange(-n, n + 1) * step_A
    g = np.stack(np.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)[:, ::-1]
    g = g[np.linalg.norm(g, axis=1) <= range_A + 1e-9]
    return g[np.argsort(np.linalg.norm(g, axis=1), kind="stable")]


def pose_errors(poses, true_poses, origins_A: Optional[np.ndarray] = None,
                true_origins_A: Optional[np.ndarray] = None, pixel_size_A: float = 1.0) -> dict:
    """Pose-error figures against the truth.

    Args:
        poses, true_poses: ``(N, 3, 3)`` RELION matrices.
        origins_A, true_origins_A: ``(N, 2)`` RELION origins in Å (optional).
        pixel_size_A: to report shift errors in pixels.

    Returns:
        ``{"rms_angle_deg", "median_angle_deg"}`` and, with origins,
        ``{"rms_shift_px"}`` (RMS of the 2D origin error, pixels).
    """
    ang = angular_distance_deg(poses, true_poses)
    out = {"rms_angle_deg": float(np.sqrt(np.mean(ang ** 2))), "median_angle_deg": float(np.median(ang))}
    if origins_A is not None and true_origins_A is not None:
        d = (np.asarray(origins_A) - np.asarray(true_origins_A)) / pixel_size_A
        out["rms_shift_px"] = float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))
    return out
