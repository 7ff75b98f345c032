"""Real-space masks for maps ``[z, y, x]`` and images ``[y, x]``."""
from __future__ import annotations

import numpy as np


def radial_distance_px(box: int, ndim: int = 3) -> np.ndarray:
    """Distance (pixels) of each voxel from the box centre (index ``box // 2``)."""
    axes = np.meshgrid(*([np.arange(box) - box // 2] * ndim), indexing="ij")
    return np.sqrt(sum(a.astype(np.float64) ** 2 for a in axes))


def soft_sphere(box: int, radius_px: float, edge_px: float = 3.0, ndim: int = 3) -> np.ndarray:
    """Sphere (or disc) mask: 1 inside ``radius_px``, a raised-cosine edge of
    ``edge_px`` pixels, 0 beyond (RELION's ``softMaskOutsideMap``).

    Returns:
        float32 array ``(box,)*ndim``.
    """
    r = radial_distance_px(box, ndim)
    t = np.clip((r - radius_px) / max(edge_px, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)
