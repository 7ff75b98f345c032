"""Part-aware deformations (the CryoSPIRE idea): groups of Gaussians that move rigidly.

Each part ``p`` (a set of Gaussians, centroid ``c_p``) gets per particle a
rotation ``ω_p`` (rotation vector, degrees) and a translation ``t_p`` (Å)::

    μ_i' = R(ω_p)·(μ_i − c_p) + c_p + t_p          for every Gaussian i of part p

applied after the (small, residual) linear eigen-motions. Gaussians in no part
(label −1) only follow the residual motions. Parts come from the eigen-motions
(k-means on position and displacement: neighbours that move together) or from a
user's segmentation map (integer labels ``1..P``, 0 = in no part).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..io import InputError

RIGID_DOFS = 6  # rotation vector (3, degrees) and translation (3, Å) per part


def rotation_matrices(omega_deg: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation vectors ``(..., 3)`` in degrees → matrices ``(..., 3, 3)``
    (differentiable, exact at 0)."""
    w = omega_deg * (math.pi / 180.0)
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]                     # (..., 1, 1)
    theta = torch.sqrt(theta2 + 1e-30)
    zero = torch.zeros_like(w[..., 0])
    k = torch.stack([torch.stack([zero, -w[..., 2], w[..., 1]], -1),
                     torch.stack([w[..., 2], zero, -w[..., 0]], -1),
                     torch.stack([-w[..., 1], w[..., 0], zero], -1)], -2)  # (..., 3, 3) cross-product matrix
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / (theta2 + 1e-30))
    eye = torch.eye(3, device=w.device, dtype=w.dtype).expand(k.shape)
    return eye + a * k + b * (k @ k)


def apply_rigid(centres: torch.Tensor, z_rigid: torch.Tensor, parts: torch.Tensor,
                part_centres: torch.Tensor) -> torch.Tensor:
    """Move each part rigidly.

    Args:
        centres: ``(B, N, 3)`` Å.
        z_rigid: ``(B, 6P)``: per part ``(ω_x, ω_y, ω_z)`` degrees then ``(t_x, t_y, t_z)`` Å.
        parts: ``(N,)`` part index per Gaussian, −1 for none.
        part_centres: ``(P, 3)`` rotation centres (Å).

    Returns:
        ``(B, N, 3)`` moved centres.
    """
    b, p = z_rigid.shape[0], part_centres.shape[0]
    zr = z_rigid.reshape(b, p, RIGID_DOFS)
    rot = rotation_matrices(zr[..., :3])                                    # (B, P, 3, 3)
    # index P (one past the parts) is the identity for Gaussians in no part
    rot = torch.cat([rot, torch.eye(3, device=rot.device, dtype=rot.dtype).expand(b, 1, 3, 3)], dim=1)
    trans = torch.cat([zr[..., 3:], torch.zeros(b, 1, 3, device=zr.device, dtype=zr.dtype)], dim=1)
    pc = torch.cat([part_centres, torch.zeros(1, 3, device=part_centres.device, dtype=part_centres.dtype)])
    idx = torch.where(parts < 0, torch.full_like(parts, p), parts)
    rel = centres - pc[idx]
    moved = torch.einsum("bnij,bnj->bni", rot[:, idx], rel)
    return moved + pc[idx] + trans[:, idx]


def parts_from_motions(centres_A: np.ndarray, motions_A: np.ndarray, n_parts: int, seed: int = 0) -> np.ndarray:
    """Parts by k-means on each Gaussian's position and displacement field
    (both standardised), so a part is a compact set moving together.

    Args:
        centres_A: ``(N, 3)``; motions_A: ``(K, N, 3)``.

    Returns:
        ``(N,)`` part index ``0..n_parts-1``.
    """
    from sklearn.cluster import KMeans
    if n_parts < 1 or n_parts > len(centres_A):
        raise InputError(f"--parts {n_parts}: between 1 and the number of Gaussians ({len(centres_A)})")
    pos = (centres_A - centres_A.mean(0)) / max(float(centres_A.std()), 1e-12)
    disp = np.transpose(motions_A, (1, 0, 2)).reshape(len(centres_A), -1)
    disp = disp / max(float(disp.std()), 1e-12)
    feats = np.concatenate([pos, 2.0 * disp], axis=1)
    return KMeans(n_clusters=n_parts, n_init=10, random_state=seed).fit_predict(feats).astype(np.int64)


def parts_from_map(segmentation: np.ndarray, centres_A: np.ndarray, pixel_size_A: float) -> np.ndarray:
    """Parts from an integer-labelled map ``[z, y, x]`` (labels ``1..P``, 0 =
    no part) read at each Gaussian's centre; returns ``(N,)`` in ``-1..P-1``."""
    box = segmentation.shape[-1]
    vox = np.rint(centres_A / pixel_size_A).astype(int) + box // 2           # (N, 3) x, y, z
    vox = np.clip(vox, 0, box - 1)
    labels = np.rint(segmentation[vox[:, 2], vox[:, 1], vox[:, 0]]).astype(np.int64)
    if labels.max() < 1:
        raise InputError("the segmentation labels no Gaussian (labels 1..P expected at the model's density)")
    values = np.unique(labels[labels > 0])
    remap = {v: i for i, v in enumerate(values)}
    return np.array([remap.get(v, -1) for v in labels], dtype=np.int64)


def part_centroids(centres_A: np.ndarray, parts: np.ndarray, amplitudes: Optional[np.ndarray] = None) -> np.ndarray:
    """``(P, 3)`` amplitude-weighted centroid of each part (Å)."""
    w = np.ones(len(centres_A)) if amplitudes is None else np.asarray(amplitudes, float)
    n = int(parts.max()) + 1
    return np.stack([np.average(centres_A[parts == p], axis=0, weights=w[parts == p]) for p in range(n)])


def rigid_names(n_parts: int) -> list:
    """Names of the rigid coordinates, in order."""
    return [f"part{p + 1}_{d}" for p in range(n_parts)
            for d in ("rot_x_deg", "rot_y_deg", "rot_z_deg", "shift_x_A", "shift_y_A", "shift_z_A")]
