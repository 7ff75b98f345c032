"""Real-space masks for maps ``[z, y, x]`` and images ``[y, x]``."""
from __future__ import annotations

import numpy as np


def radial_distance_px(box: int, ndim: int = 3) -> np.ndarray:
    """Distance (pixels) of each voxel from the box centre (index ``box // 2``)."""
    sq = (np.arange(box, dtype=np.float64) - box // 2) ** 2
    r2 = sq
    for axis in range(1, ndim):  # (z² + y²) + x² by broadcasting: no full-size coordinate grids
        r2 = r2[..., None] + sq.reshape((1,) * axis + (box,))
    return np.sqrt(r2)


def soft_sphere(box: int, radius_px: float, edge_px: float = 3.0, ndim: int = 3) -> np.ndarray:
    """Sphere (or disc) mask: 1 inside ``radius_px``, a raised-cosine edge of
    ``edge_px`` pixels, 0 beyond (RELION's ``softMaskOutsideMap``).

    Returns:
        float32 array ``(box,)*ndim``.
    """
    t = (radial_distance_px(box, ndim) - radius_px) / max(edge_px, 1e-6)
    mask = (t <= 0).astype(np.float32)
    edge = (t > 0) & (t < 1)  # the cosine only where it is neither 1 nor 0
    mask[edge] = 0.5 + 0.5 * np.cos(np.pi * t[edge])
    return mask


def mask_from_map(vol: np.ndarray, pixel_size_A: float, lowpass_A: float = 15.0,
                  threshold: float = 0.15, dilate_A: float = 3.0, edge_A: float = 3.0) -> np.ndarray:
    """Soft mask around the density of a map (e.g. the consensus reconstruction).

    The map is low-passed to ``lowpass_A``, thresholded at ``threshold`` × its
    maximum, the largest connected region is kept, dilated by ``dilate_A`` and
    given a raised-cosine edge of ``edge_A``.

    Returns:
        float32 ``[z, y, x]`` mask in [0, 1].
    """
    from scipy import ndimage
    from .fsc import lowpass
    smooth = lowpass(vol, pixel_size_A, lowpass_A)
    binary = smooth > threshold * smooth.max()
    labels, n = ndimage.label(binary)
    if n > 1:
        sizes = ndimage.sum(binary, labels, index=np.arange(1, n + 1))
        binary = labels == (1 + int(np.argmax(sizes)))
    return _soft_dilation(binary, pixel_size_A, dilate_A, edge_A)


def mask_from_difference(diff: np.ndarray, pixel_size_A: float, lowpass_A: float = 10.0,
                         threshold: float = 0.3, dilate_A: float = 6.0, edge_A: float = 3.0) -> np.ndarray:
    """Soft mask around where a difference map (e.g. a residual eigenvolume) is strong.

    Unlike :func:`mask_from_map`, the sign does not matter and every region is
    kept: ``|lowpass(diff)|`` is thresholded at ``threshold`` × its maximum,
    dilated by ``dilate_A`` and given a raised-cosine edge of ``edge_A``. A
    moved domain leaves a positive and a negative lobe; both stay in the mask.

    Returns:
        float32 ``[z, y, x]`` mask in [0, 1] (all zero for an all-zero map).
    """
    from .fsc import lowpass
    strength = np.abs(lowpass(diff, pixel_size_A, lowpass_A))
    peak = float(strength.max())
    if not peak > 0:
        return np.zeros(strength.shape, np.float32)
    return _soft_dilation(strength > threshold * peak, pixel_size_A, dilate_A, edge_A)


def _soft_dilation(binary: np.ndarray, pixel_size_A: float, dilate_A: float, edge_A: float) -> np.ndarray:
    """``binary`` dilated by ``dilate_A`` (Å) with a raised-cosine edge ``edge_A`` (Å) wide."""
    from scipy import ndimage
    dist = ndimage.distance_transform_edt(~binary) * pixel_size_A
    t = np.clip((dist - dilate_A) / max(edge_A, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * np.cos(np.pi * t)).astype(np.float32)
