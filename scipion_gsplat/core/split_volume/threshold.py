"""A user's threshold → two classes of particles (the "apply" step of the split-volume viewer).

Two kinds of threshold, on the files a split-volume run keeps per split level
(``<extra>/level<L>/``):

* **one direction** — the PCA coordinate ``ρ`` (``rlnGsplatCoordinate`` of
  ``classify/pairs.star``, arbitrary units of the eigen-image) of the particles
  assigned to that projection direction: the histogram the viewer shows. The
  classes hold only that direction's particles (a few tens to a few thousands).
* **split coordinate** (all particles of the level) — ``rlnGsplatScore`` of the
  graph split (``graph/particles.star``: each particle's per-direction
  coordinates, sign-synchronised by the max-cut and averaged over its
  directions, same units as ``ρ``; 0 separates the graph's two classes), or, in
  3D-pooled runs (no graph), the log-odds of class 1 of the 3D refinement
  (``refine/particles.star``, clipped at ±50).

Class 1 = values below the threshold, class 2 = values at or above it. Particles
are identified by ``rlnImageId`` (the Scipion particle id). No Scipion import.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..io import InputError, ParticleStar, read_particles, read_star_table, write_particles

BELOW, ABOVE = 1, 2


@dataclass
class ThresholdSplit:
    """``image_ids (N,)`` and ``labels (N,)`` (1 = below, 2 = at/above the
    threshold) of the particles the threshold applies to; ``values (N,)`` the
    thresholded quantity; ``what`` says which quantity (for labels and dialogs)."""
    image_ids: np.ndarray
    labels: np.ndarray
    values: np.ndarray
    threshold: float
    what: str

    def sizes(self) -> tuple[int, int]:
        return int((self.labels == BELOW).sum()), int((self.labels == ABOVE).sum())


def level_folder(extra: str, level: int) -> str:
    return os.path.join(extra, f"level{level}")


def level_particles_path(extra: str, level: int) -> str:
    """The particle STAR a split level classified (its ``pairs.star`` rows point into it)."""
    if level == 2:
        return os.path.join(extra, "input_particles.star")
    return os.path.join(level_folder(extra, level), "input.star")


def available_levels(extra: str) -> list:
    """Split levels with a result on disk (``level<L>/graph`` or ``level<L>/refine``)."""
    levels = []
    if os.path.isdir(extra):
        for name in os.listdir(extra):
            if name.startswith("level") and name[5:].isdigit():
                folder = os.path.join(extra, name)
                if any(os.path.exists(os.path.join(folder, sub, "particles.star")) for sub in ("graph", "refine")):
                    levels.append(int(name[5:]))
    return sorted(levels)


def _labels(values: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(np.asarray(values, float) < threshold, BELOW, ABOVE)


def direction_split(extra: str, level: int, direction: int, threshold: float) -> ThresholdSplit:
    """Threshold ``ρ`` of one direction's particles (see module docstring)."""
    folder = os.path.join(level_folder(extra, level), "classify")
    pairs = read_star_table(os.path.join(folder, "pairs.star"), "pairs")
    sel = pairs["rlnGsplatDirection"].to_numpy(int) == int(direction)
    if not sel.any():
        raise InputError(f"direction {direction} has no particles")
    rows = pairs["rlnGsplatParticle"].to_numpy(int)[sel]
    rho = pairs["rlnGsplatCoordinate"].to_numpy(float)[sel]
    ids = read_particles(level_particles_path(extra, level)).column("rlnImageId").astype(int)[rows]
    return ThresholdSplit(ids, _labels(rho, threshold), rho, float(threshold),
                          f"PCA coordinate of direction {direction}")


def split_coordinate_source(extra: str, level: int) -> tuple[str, str]:
    """``(particles.star, description)`` holding the level's split coordinate."""
    folder = level_folder(extra, level)
    graph = os.path.join(folder, "graph", "particles.star")
    if os.path.exists(graph):
        return graph, "split coordinate (synchronised PCA coordinate of the graph split)"
    refine = os.path.join(folder, "refine", "particles.star")
    if os.path.exists(refine):
        return refine, "split coordinate (log-odds of class 1 of the 3D refinement)"
    raise InputError(f"split level {level} has no result on disk")


def split_coordinate(extra: str, level: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``(image_ids, values, description)`` of the level's split coordinate."""
    path, what = split_coordinate_source(extra, level)
    table = read_particles(path).particles
    return table["rlnImageId"].to_numpy(int), table["rlnGsplatScore"].to_numpy(float), what


def coordinate_split(extra: str, level: int, threshold: float) -> ThresholdSplit:
    """Threshold the split coordinate of every particle of the level."""
    ids, values, what = split_coordinate(extra, level)
    return ThresholdSplit(ids, _labels(values, threshold), values, float(threshold), what)


def write_split_star(extra: str, level: int, split: ThresholdSplit, path: str) -> ParticleStar:
    """Write the level's particles that the split covers, with ``rlnClassNumber``
    set to the threshold classes, to ``path`` (atomic); return the written table."""
    star = read_particles(level_particles_path(extra, level))
    ids = star.column("rlnImageId").astype(int)
    where = {int(i): k for k, i in enumerate(ids)}
    rows = np.array([where[int(i)] for i in split.image_ids], int)
    sub = star.subset(rows)
    parts = sub.particles.copy()
    parts["rlnClassNumber"] = split.labels.astype(int)
    write_particles(path, sub, parts)
    return sub
