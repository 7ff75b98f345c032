"""Figures of a heterogeneity run: coordinate histograms, a hexbin of the first
two coordinates, the explained variance of the eigen-motions.

Functions draw on axes handed in by the caller (a PNG figure headless, a
Scipion plotter in the GUI); :func:`save_report` writes the standard PNG.
"""
from __future__ import annotations

import numpy as np


def plot_histograms(ax, z: np.ndarray, bins: int = 60) -> None:
    """Histogram of each coordinate (Å RMS displacement), one outline per motion."""
    for k in range(z.shape[1]):
        ax.hist(z[:, k], bins=bins, histtype="step", label=f"motion {k + 1}")
    ax.set_xlabel("coordinate (Å RMS displacement)")
    ax.set_ylabel("particles")
    ax.legend(fontsize=7)


def plot_hexbin(ax, z: np.ndarray, i: int = 0, j: int = 1, gridsize: int = 40) -> None:
    """Density of particles in the plane of coordinates ``i`` and ``j``."""
    if z.shape[1] <= j:
        ax.hist(z[:, i], bins=gridsize)
        ax.set_xlabel(f"coordinate {i + 1} (Å)")
        return
    ax.hexbin(z[:, i], z[:, j], gridsize=gridsize, cmap="viridis", mincnt=1)
    ax.set_xlabel(f"coordinate {i + 1} (Å)")
    ax.set_ylabel(f"coordinate {j + 1} (Å)")


def plot_explained(ax, explained: np.ndarray) -> None:
    """Bar chart: percentage of the gradient variance of each eigen-motion."""
    k = np.arange(1, len(explained) + 1)
    ax.bar(k, 100 * np.asarray(explained))
    ax.set_xticks(k)
    ax.set_xlabel("eigen-motion")
    ax.set_ylabel("% of gradient variance")


def save_report(path, z: np.ndarray, explained: np.ndarray) -> None:
    """Three panels (histograms, hexbin of motions 1-2, explained variance) as a PNG."""
    from matplotlib.figure import Figure
    from ..io import atomic_path
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    plot_histograms(axes[0], z)
    plot_hexbin(axes[1], z)
    plot_explained(axes[2], explained)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def plot_motion_arrows(axes, model, motion_A: np.ndarray, spread_A: float, fig=None, max_arrows: int = 400) -> None:
    """The consensus model in three views with one eigen-motion drawn as arrows.

    Args:
        axes: three matplotlib axes (views along z, y, x).
        model: consensus :class:`~scipion_gsplat.core.splat.model.GaussianModel`.
        motion_A: ``(N, 3)`` displacement per unit coordinate (Å).
        spread_A: arrows show the displacement at this coordinate (e.g. 2 × the
            coordinate's standard deviation).
    """
    from ..splat.plots import plot_model_views
    plot_model_views(axes, model, fig=fig)
    d = motion_A * spread_A
    big = np.argsort(-np.linalg.norm(d, axis=1))[:max_arrows]
    c = model.centres_A
    for ax, (i, j) in zip(axes, ((0, 1), (0, 2), (1, 2))):
        ax.quiver(c[big, i], c[big, j], d[big, i], d[big, j], angles="xy", scale_units="xy", scale=1.0,
                  color="crimson", width=0.004)


def read_outputs(folder) -> dict:
    """What the figures need from a ``gsplat_gmm_heterogeneity`` output folder:
    ``model`` (consensus), ``motions (K, N, 3)``, ``coordinates (M, K)`` (the
    user coordinates) and ``explained (K,)``."""
    from pathlib import Path

    from ..splat.model import GaussianModel
    folder = Path(folder)
    with np.load(folder / "heterogeneity.npz") as d:
        out = {"model": GaussianModel(d["centres_A"], d["amplitudes"], d["sigmas_A"]),
               "motions": d["motions_A"], "explained": d["explained"],
               "coordinates": d["user_coordinates"] if "user_coordinates" in d else d["coordinates"]}
    return out
