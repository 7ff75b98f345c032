"""Files exchanged by the split-volume programs (STAR tables and MRC stacks).

``gsplat_aligned_2d_classification`` writes into its output folder:

* ``directions.star`` (block ``directions``): one row per direction — its index,
  ``rlnAngleRot/Tilt`` (ψ = 0 reference view), unit vector, particle count,
  variance fraction on PC1, GMM means/σ/weights and bimodality;
* ``pairs.star`` (block ``pairs``): one row per (particle, direction) pair —
  particle row in the input STAR, direction, PCA coordinate ``ρ``,
  log-likelihood ratio ``λ``, in-plane angle, mirror flag;
* ``eigen_images.mrcs``, ``mean_images.mrcs`` (one image per direction) and
  ``side_averages.mrcs`` (two per direction: λ > 0 then λ ≤ 0).

Label names that RELION does not know start with ``rlnGsplat``; RELION 3.1 keeps
such columns and ignores them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..geometry import direction_to_euler
from ..io import InputError, read_star_table, write_stack, write_star

PAIRS = "pairs.star"
DIRECTIONS = "directions.star"


def write_classification(out_dir, groups, result, pixel_size_A: float) -> None:
    """Write the per-direction classification (see module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rt = direction_to_euler(groups.directions)
    dirs = pd.DataFrame({
        "rlnGsplatDirection": np.arange(groups.n_directions),
        "rlnAngleRot": rt[:, 0], "rlnAngleTilt": rt[:, 1],
        "rlnGsplatDirX": groups.directions[:, 0], "rlnGsplatDirY": groups.directions[:, 1],
        "rlnGsplatDirZ": groups.directions[:, 2],
        "rlnGsplatParticles": result.n_particles,
        "rlnGsplatExplainedVariance": result.explained,
        "rlnGsplatGmmMean1": result.gmm_means[:, 0], "rlnGsplatGmmMean2": result.gmm_means[:, 1],
        "rlnGsplatGmmSigma": result.gmm_sigma,
        "rlnGsplatGmmWeight1": result.gmm_weights[:, 0], "rlnGsplatGmmWeight2": result.gmm_weights[:, 1],
        "rlnGsplatBimodality": result.bimodality,
    })
    pairs = pd.DataFrame({
        "rlnGsplatParticle": groups.pair_particle, "rlnGsplatDirection": groups.pair_direction,
        "rlnGsplatCoordinate": result.coordinate, "rlnGsplatLogLikelihoodRatio": result.llr,
        "rlnGsplatInPlaneAngle": result.in_plane_deg, "rlnGsplatMirror": groups.pair_mirror.astype(int),
    })
    write_star(out / DIRECTIONS, {"directions": dirs})
    write_star(out / PAIRS, {"pairs": pairs})
    m = result.eigen_images.shape[-1]
    write_stack(out / "eigen_images.mrcs", result.eigen_images, pixel_size_A)
    write_stack(out / "mean_images.mrcs", result.mean_images, pixel_size_A)
    write_stack(out / "side_averages.mrcs", result.side_averages.reshape(-1, m, m), pixel_size_A)


def read_classification(in_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(directions, pairs)`` tables of a classification folder."""
    d = Path(in_dir)
    if not (d / PAIRS).exists() or not (d / DIRECTIONS).exists():
        raise InputError(f"{d}: not a gsplat_aligned_2d_classification output "
                         f"(needs {DIRECTIONS} and {PAIRS})")
    return read_star_table(d / DIRECTIONS, "directions"), read_star_table(d / PAIRS, "pairs")


def write_classified_particles(path, star, classes: np.ndarray, score: np.ndarray,
                               probability: np.ndarray, extra: dict = None) -> None:
    """The input particle table (same rows, same order) plus the classification.

    Adds ``rlnClassNumber`` (1 or 2), ``rlnMaxValueProbDistribution`` and
    ``rlnGsplatClassProbability`` (probability of the assigned class),
    ``rlnGsplatScore`` (larger = more class 1) and any ``extra`` columns.
    """
    if len(classes) != len(star):
        raise ValueError("one class per particle is needed")
    parts = star.particles.copy()
    parts["rlnClassNumber"] = np.asarray(classes, int)
    parts["rlnMaxValueProbDistribution"] = np.asarray(probability, float)
    parts["rlnGsplatClassProbability"] = np.asarray(probability, float)
    parts["rlnGsplatScore"] = np.asarray(score, float)
    for name, values in (extra or {}).items():
        parts[name] = values
    from ..io import write_particles
    write_particles(path, star, parts)
