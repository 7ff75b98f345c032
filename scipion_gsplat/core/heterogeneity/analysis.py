"""What users look at after a run: frames along each motion, particle subsets.

* frames: coordinate vectors spread over a motion's range (percentiles of the
  particles' coordinates, other motions at their mean), the deformed models
  there, their maps and a multi-model PDB/mmCIF trajectory; with parts, along
  the principal axes of all (rigid and residual) coordinates;
* subsets: k-means clusters in coordinate space, or equal-width bins along one
  coordinate, each with the model deformed to the cluster's mean coordinate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..io import InputError, write_map
from .motion_model import MotionModel

SUBSET_METHODS = ("kmeans", "bins")


def principal_coordinates(z: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal axes of coordinates of mixed units (rigid degrees and Å, residual Å).

    The coordinates are standardised per column, then ``z ≈ mean + u·axes``.

    Returns:
        ``(u (M, n) principal coordinates, mean (D,), axes (n, D) in z units)``.
    """
    mean = z.mean(axis=0)
    std = z.std(axis=0) + 1e-12
    zs = (z - mean) / std
    n = int(min(n, zs.shape[1]))
    _, _, vt = np.linalg.svd(zs, full_matrices=False)
    vt = vt[:n] * np.sign(vt[:n, [0]] + 1e-300)  # deterministic signs
    return zs @ vt.T, mean, vt * std


def frame_coordinates(u: np.ndarray, k: int, n_frames: int, mean: np.ndarray, axes: np.ndarray,
                      low_pct: float = 5.0, high_pct: float = 95.0) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of ``n_frames`` frames along axis ``k``: from the
    ``low_pct`` to the ``high_pct`` percentile of ``u[:, k]``, other axes at
    their mean. Returns ``(values (F,), z (F, D))``."""
    lo, hi = np.percentile(u[:, k], [low_pct, high_pct])
    values = np.linspace(lo, hi, n_frames) if n_frames > 1 else np.array([0.5 * (lo + hi)])
    return values, mean[None, :] + values[:, None] * axes[k][None, :]


def user_coordinates(mm: MotionModel, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``K`` coordinates shown to users and their frame axes: the residual
    coordinates themselves (axes = unit vectors), or with parts the ``K``
    principal coordinates of all (rigid + residual) coordinates.

    Returns:
        ``(u (M, K), mean (D,), axes (K, D))`` with ``z ≈ mean + u·axes``.
    """
    if not mm.n_rigid:
        return z.copy(), np.zeros(z.shape[1]), np.eye(z.shape[1])
    return principal_coordinates(z, mm.n_motions)


def write_motion_frames(mm: MotionModel, z: np.ndarray, outdir, box: int, pixel_size_A: float,
                        n_frames: int = 10, structure_suffix: str = ".pdb", device="cpu") -> list:
    """For each user coordinate ``k`` (:func:`user_coordinates`) write
    ``motion<k>_frame<f>.mrc`` maps and a ``motion<k>.pdb`` trajectory (one
    model per frame).

    Args:
        z: ``(M, D)`` all coordinates of the particles (as :attr:`MotionModel.deformed` takes them).

    Returns:
        a list of dicts (``motion``, ``maps``, ``trajectory``, ``coordinates``).
    """
    outdir = Path(outdir)
    origin = np.full(3, (box // 2) * pixel_size_A)
    u, mean, axes = user_coordinates(mm, z)
    written = []
    for k in range(u.shape[1]):
        values, coords = frame_coordinates(u, k, n_frames, mean, axes)
        models = [mm.frame(c) for c in coords]
        maps = []
        for f, model in enumerate(models):
            path = outdir / f"motion{k + 1:02d}_frame{f + 1:02d}.mrc"
            write_map(path, model.to_map(box, pixel_size_A, device=device), pixel_size_A)
            maps.append(str(path))
        traj = outdir / f"motion{k + 1:02d}{structure_suffix}"
        models[0].write_structure(traj, origin, box * pixel_size_A, frames=[m.centres_A for m in models])
        written.append({"motion": k + 1, "maps": maps, "trajectory": str(traj), "coordinates": values.tolist()})
    return written


def subsets(z: np.ndarray, n_classes: int, method: str = "kmeans", motion: int = 0,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Particle subsets in coordinate space.

    Args:
        z: ``(M, K)`` coordinates.
        method: ``kmeans`` (all coordinates) or ``bins`` (equal-width bins of
            coordinate ``motion`` between its 2nd and 98th percentiles).

    Returns:
        ``(labels (M,) in 1..C, centres (C, K) mean coordinates of each subset)``.
    """
    if n_classes < 1:
        raise InputError("the number of classes must be at least 1")
    if method not in SUBSET_METHODS:
        raise InputError(f"unknown subset method '{method}' ({', '.join(SUBSET_METHODS)})")
    if len(z) < n_classes:
        raise InputError(f"{len(z)} particles cannot make {n_classes} classes")
    if method == "kmeans":
        from sklearn.cluster import KMeans
        km = KMeans(n_clusters=n_classes, n_init=10, random_state=seed).fit(z)
        order = np.argsort(km.cluster_centers_[:, 0])  # classes numbered along motion 1
        rank = np.empty(n_classes, int)
        rank[order] = np.arange(n_classes)
        labels = rank[km.labels_] + 1
    else:
        if not 0 <= motion < z.shape[1]:
            raise InputError(f"motion {motion + 1} does not exist ({z.shape[1]} motions)")
        lo, hi = np.percentile(z[:, motion], [2.0, 98.0])
        edges = np.linspace(lo, hi, n_classes + 1)[1:-1]
        labels = np.digitize(z[:, motion], edges) + 1
    centres = np.stack([z[labels == c].mean(axis=0) if np.any(labels == c) else np.zeros(z.shape[1])
                        for c in range(1, n_classes + 1)])
    return labels.astype(int), centres


def write_subset_maps(mm: MotionModel, centres: np.ndarray, outdir, box: int, pixel_size_A: float,
                      device="cpu") -> list:
    """``class<c>.mrc``: the model deformed to each subset's mean coordinate."""
    paths = []
    for c, zc in enumerate(centres):
        path = Path(outdir) / f"class{c + 1:02d}.mrc"
        write_map(path, mm.frame(zc).to_map(box, pixel_size_A, device=device), pixel_size_A)
        paths.append(str(path))
    return paths


def explained_table(explained: np.ndarray, n_show: Optional[int] = None) -> str:
    """One line per motion: ``motion k: x.x % of the gradient variance``."""
    rows = explained[:n_show] if n_show else explained
    return "\n".join(f"motion {k + 1}: {100 * e:.1f} % of the gradient variance" for k, e in enumerate(rows))
