"""Figures of a splat reconstruction: FSC, loss curves, the model in three views.

Pure matplotlib on figures/axes handed in by the caller (``matplotlib.figure.Figure``
for PNG files, a Scipion plotter's figure in the GUI); no pyplot state.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..fsc import resolution_at
from .model import GaussianModel


def plot_fsc(ax, frequency: np.ndarray, curves: dict, threshold: float = 0.143) -> None:
    """FSC curves against spatial frequency (1/Å) with the threshold and, per
    curve, its resolution at the threshold in the legend.

    Args:
        curves: label → FSC values ``(n//2+1,)``.
    """
    for label, fsc in curves.items():
        res = resolution_at(frequency, fsc, threshold)
        line, = ax.plot(frequency, fsc, label=f"{label}: {res:.2f} Å at {threshold:g}")
        if np.isfinite(res) and res > 0:  # where the curve crosses the threshold
            ax.plot([1.0 / res], [threshold], marker="o", color=line.get_color(), ms=5)
            ax.annotate(f"{res:.2f} Å", (1.0 / res, threshold), textcoords="offset points", xytext=(6, 6),
                        color=line.get_color(), fontsize=9)
    ax.axhline(threshold, color="grey", ls="--", lw=0.8)
    ax.text(0.01 * float(frequency[-1]), threshold, f"FSC = {threshold:g}", color="grey", fontsize=8,
            ha="left", va="bottom")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlim(0, float(frequency[-1]))
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Fourier shell correlation")


def plot_loss(ax, histories: dict) -> None:
    """Loss per epoch, one line per fit (label → list of ``{'epoch', 'loss'}``)."""
    for label, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["loss"] for h in hist], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (residual / data variance)")
    ax.set_title("Loss")
    if histories:
        ax.legend(fontsize=8)


def plot_model_views(axes: Sequence, model: GaussianModel, extent_A: Optional[float] = None,
                     fig=None) -> None:
    """The centres seen along z, y and x (three axes), coloured by amplitude,
    marker area ∝ σ².

    Args:
        axes: three matplotlib axes.
        extent_A: half width of the views (default: from the model).
        fig: figure for the colour bar (optional).
    """
    c, a = model.centres_A, model.amplitudes
    order = np.argsort(a)  # strongest drawn last, on top
    size = np.clip(12.0 * (model.sigmas_A / max(float(np.median(model.sigmas_A)), 1e-6)) ** 2, 2.0, 80.0)
    vmin, vmax = (np.percentile(a, [2, 98]) if len(a) else (0.0, 1.0))
    if extent_A:
        lim = float(extent_A)
    else:
        lim = float(np.abs(c).max() + 2 * model.sigmas_A.max()) if len(c) else 1.0
    sc = None
    for ax, (i, j, view) in zip(axes, ((0, 1, "z"), (0, 2, "y"), (1, 2, "x"))):
        sc = ax.scatter(c[order, i], c[order, j], c=a[order], s=size[order], cmap="viridis",
                        vmin=vmin, vmax=vmax, edgecolors="none", alpha=0.8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("xyz"[i] + " (Å)")
        ax.set_ylabel("xyz"[j] + " (Å)")
        ax.set_title(f"{len(a)} Gaussians, view along {view}")
    if fig is not None and sc is not None:
        fig.colorbar(sc, ax=list(axes), shrink=0.8, label="amplitude")


def report_figure(model: GaussianModel, histories: dict, frequency: Optional[np.ndarray] = None,
                  curves: Optional[dict] = None):
    """One figure: FSC (if any) and loss on top, the model's three views below.

    Returns:
        a ``matplotlib.figure.Figure`` (no pyplot, safe without a display).
    """
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 8), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 3)
    if curves:
        plot_fsc(fig.add_subplot(grid[0, :2]), frequency, curves)
    plot_loss(fig.add_subplot(grid[0, 2] if curves else grid[0, :]), histories)
    plot_model_views([fig.add_subplot(grid[1, k]) for k in range(3)], model, fig=fig)
    return fig


def save_report(path, model: GaussianModel, histories: dict, frequency=None, curves=None) -> None:
    """Write :func:`report_figure` as a PNG (atomically)."""
    from ..io import atomic_path
    fig = report_figure(model, histories, frequency, curves)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def read_outputs(folder) -> dict:
    """What the figures need from a ``gsplat_reconstruct_splat`` output folder.

    Returns:
        dict with ``model`` (:class:`GaussianModel`), ``histories`` (label →
        list of ``{'epoch', 'loss'}``), and when half sets were fitted
        ``frequency`` and ``curves`` (``{'half maps': fsc}``), else None.
    """
    from pathlib import Path

    from ..io import InputError, read_star_table
    folder = Path(folder)
    model = GaussianModel.load(folder / "model.npz")
    histories = {}
    if (folder / "loss.star").exists():
        table = read_star_table(folder / "loss.star", "loss")
        for half, rows in table.groupby("gsplatHalf", sort=True):
            label = f"half {half}" if half else "all"
            histories[label] = [{"epoch": int(e), "loss": float(v)}
                                for e, v in zip(rows["gsplatEpoch"], rows["gsplatLoss"])]
    frequency = curves = None
    if (folder / "fsc.star").exists():
        try:
            fsc = read_star_table(folder / "fsc.star", "fsc")
        except InputError:
            fsc = None
        if fsc is not None:
            frequency = fsc["rlnResolution"].to_numpy(float)
            curves = {"half maps": fsc["rlnFourierShellCorrelation"].to_numpy(float)}
    return {"model": model, "histories": histories, "frequency": frequency, "curves": curves}
