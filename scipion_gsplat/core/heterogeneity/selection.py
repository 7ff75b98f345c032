"""Regions of the heterogeneity coordinate space: which particles lie inside a
polygon (a lasso) or a rectangle drawn on the scatter of two coordinates.

Pure numpy, no GUI: the interactive selector window and the tests share these
functions, so a selection made with the mouse and one made from a list of
vertices give the same particles. Coordinates are in Å (RMS displacement along
an eigen-motion), as in ``heterogeneity.npz`` and the particles' STAR columns.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def points_in_polygon(xy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Which points lie inside a closed polygon (even-odd rule).

    Args:
        xy: ``(N, 2)`` points (x, y).
        vertices: ``(V, 2)`` polygon vertices in order, V ≥ 3; the polygon is
            closed from the last vertex back to the first (a repeated first
            vertex at the end is harmless).

    Returns:
        ``(N,)`` boolean mask. A polygon with fewer than 3 distinct vertices
        (a click without a drag) selects nothing.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros(len(xy), dtype=bool)
    if len(np.unique(v, axis=0)) < 3:
        return inside
    x, y = xy[:, 0], xy[:, 1]
    # A horizontal ray from each point to +x crosses the edges that straddle its
    # y; with the points sorted by y, the points an edge can cross are one slice
    # (a lasso of many short edges then costs ~N, not N × edges).
    order = np.argsort(y, kind="stable")
    ys = y[order]
    x1, y1 = v[:, 0], v[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for ax, ay, bx, by in zip(x1, y1, x2, y2):
        if ay == by:  # a horizontal edge never crosses the horizontal ray
            continue
        # (ay > y) != (by > y)  ⇔  min(ay, by) <= y < max(ay, by)
        lo, hi = np.searchsorted(ys, [min(ay, by), max(ay, by)], side="left")
        idx = order[lo:hi]
        x_cross = ax + (y[idx] - ay) * (bx - ax) / (by - ay)
        inside[idx] ^= x[idx] < x_cross
    return inside


def points_in_rectangle(xy: np.ndarray, corner1: Sequence[float], corner2: Sequence[float]) -> np.ndarray:
    """Which points lie inside the axis-aligned rectangle spanned by two opposite
    corners ``(x, y)`` (edges included); ``(N,)`` boolean mask."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    (xa, ya), (xb, yb) = corner1, corner2
    x0, x1 = sorted((float(xa), float(xb)))
    y0, y1 = sorted((float(ya), float(yb)))
    return (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)


def points_in_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Which coordinates lie in ``[low, high]`` (a range along one motion)."""
    values = np.asarray(values, dtype=np.float64)
    return (values >= low) & (values <= high)


def reconstruct_selection(star, mask: np.ndarray, path, progress=None):
    """Fourier reconstruction (CTF, half sets as in ``gsplat_reconstruct_fourier``)
    of the particles selected by ``mask``, written atomically to ``path`` (MRC).

    Args:
        star: the run's :class:`~scipion_gsplat.core.io.ParticleStar` (poses,
            CTF, coordinates), one row per entry of ``mask``.
        mask: ``(N,)`` boolean selection.
        path: output map; never one of the inputs.
        progress: optional ``progress(done, total)`` callback.

    Returns:
        the :class:`~scipion_gsplat.core.reconstruct.Reconstruction` (map
        ``[z, y, x]`` of the particles' box, pixel size in Å).

    Raises:
        InputError: fewer than two particles, or a half set left empty.
    """
    from ..io import InputError, write_map
    from ..reconstruct import reconstruct_particles
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (len(star),):
        raise InputError(f"the selection has {mask.size} entries for {len(star)} particles")
    rows = np.flatnonzero(mask)
    if len(rows) < 2:
        raise InputError(f"{len(rows)} particle(s) selected: a map needs at least two (one per half set)")
    rec = reconstruct_particles(star, rows=rows, progress=progress)
    write_map(path, rec.full, rec.pixel_size_A)
    return rec


def coordinate_plane(z: np.ndarray, motions: Sequence[int]) -> np.ndarray:
    """The ``(N, 2)`` plane of two coordinates of ``z (N, K)``; ``motions`` are
    1-based motion numbers ``(mx, my)``.

    Raises:
        ValueError: a motion number outside 1..K.
    """
    z = np.asarray(z)
    k = z.shape[1]
    bad = [m for m in motions if not 1 <= int(m) <= k]
    if bad:
        raise ValueError(f"motion {bad[0]} does not exist: this run has motions 1 to {k}")
    return np.stack([z[:, int(motions[0]) - 1], z[:, int(motions[1]) - 1]], axis=1)


__all__ = ["coordinate_plane", "points_in_polygon", "points_in_range", "points_in_rectangle",
           "reconstruct_selection"]
