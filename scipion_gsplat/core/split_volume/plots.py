"""Figures of the split-volume classification (matplotlib; no Scipion import).

* :func:`direction_figure` — one direction: histogram of the PCA coordinate with
  the two GMM components and a threshold line, the particle counts on each
  side, the eigen-image, the mean image, the image at the threshold
  (``mean + t·eigen``) and the averages of the two GMM sides.
* :func:`graph_figure` — the directions as points on a sphere coloured by their
  sign, edges coloured by the sign of their weight and as wide as its size.
* :func:`interactive_direction_viewer` — the direction figure with sliders for
  the direction and the threshold (interactive in a GUI backend).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import mrcfile
import numpy as np

from .files import read_classification


def _load(cls_dir):
    dirs, pairs = read_classification(cls_dir)
    stacks = {name: mrcfile.read(os.path.join(cls_dir, f"{name}.mrcs"))
              for name in ("eigen_images", "mean_images", "side_averages")}
    return dirs, pairs, stacks


def plot_histogram(ax, rho: np.ndarray, means, sigma: float, weights, threshold: Optional[float] = None):
    """Histogram of ``rho`` with the GMM components and the threshold line."""
    counts, edges, _ = ax.hist(rho, bins=max(10, len(rho) // 5), color="0.75", edgecolor="0.5")
    if sigma > 0:
        x = np.linspace(edges[0], edges[-1], 300)
        width = edges[1] - edges[0]
        for mu, w, color in zip(means, weights, ("tab:blue", "tab:orange")):
            ax.plot(x, len(rho) * w * width * np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi)),
                    color=color, lw=2)
    if threshold is not None:
        ax.axvline(threshold, color="gold", lw=2.5)
        left, right = int((rho < threshold).sum()), int((rho >= threshold).sum())
        ax.set_title(f"PC1 coordinate: {left} | {right} particles")
    ax.set_xlabel("coordinate on the eigen-image")
    ax.set_ylabel("particles")


def _show(ax, img, title):
    ax.imshow(img, cmap="gray", origin="lower")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def default_threshold(means) -> float:
    return float(np.mean(means))


def draw_direction(fig, cls_dir, direction: int, threshold: Optional[float] = None, data=None):
    """Draw one direction's panels into ``fig`` (cleared first)."""
    dirs, pairs, stacks = data or _load(cls_dir)
    if not 0 <= direction < len(dirs):
        raise ValueError(f"direction {direction} out of range (0-{len(dirs) - 1})")
    row = dirs.iloc[direction]
    sel = pairs["rlnGsplatDirection"].to_numpy(int) == direction
    rho = pairs["rlnGsplatCoordinate"].to_numpy(float)[sel]
    means = (row["rlnGsplatGmmMean1"], row["rlnGsplatGmmMean2"])
    weights = (row["rlnGsplatGmmWeight1"], row["rlnGsplatGmmWeight2"])
    t = default_threshold(means) if threshold is None else threshold
    fig.clf()
    grid = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(grid[:, :2])
    plot_histogram(ax, rho, means, float(row["rlnGsplatGmmSigma"]), weights, t)
    fig.suptitle(f"direction {direction}: rot {row['rlnAngleRot']:.1f}°, tilt {row['rlnAngleTilt']:.1f}°, "
                 f"{len(rho)} particles, bimodality {row['rlnGsplatBimodality']:.2f}, "
                 f"PC1 {100 * row['rlnGsplatExplainedVariance']:.1f}% of variance", fontsize=10)
    eig, mean = stacks["eigen_images"][direction], stacks["mean_images"][direction]
    _show(fig.add_subplot(grid[0, 2]), eig, "eigen-image")
    _show(fig.add_subplot(grid[0, 3]), mean + t * eig, f"mean + {t:.3g}·eigen")
    _show(fig.add_subplot(grid[1, 2]), stacks["side_averages"][2 * direction], "average, λ > 0")
    _show(fig.add_subplot(grid[1, 3]), stacks["side_averages"][2 * direction + 1], "average, λ ≤ 0")
    return fig


def direction_figure(cls_dir, direction: int, threshold: Optional[float] = None):
    """A new figure for one direction (see :func:`draw_direction`)."""
    import matplotlib.pyplot as plt
    return draw_direction(plt.figure(figsize=(12, 5)), cls_dir, direction, threshold)


def interactive_direction_viewer(cls_dir):
    """Direction figure with sliders: pick a direction, drag the threshold."""
    import matplotlib.pyplot as plt
    from matplotlib.widgets import Slider
    data = _load(cls_dir)
    dirs, pairs, _ = data
    fig = plt.figure(figsize=(12, 6))
    state = {"direction": int(np.argmax(dirs["rlnGsplatBimodality"].to_numpy())), "threshold": None}
    holder = {}

    def redraw(_=None):
        d = int(holder["dir"].val) if "dir" in holder else state["direction"]
        t = holder["thr"].val if "thr" in holder and state.get("direction") == d else None
        state["direction"] = d
        draw_direction(fig, cls_dir, d, t, data)
        fig.subplots_adjust(bottom=0.2)
        rho = pairs["rlnGsplatCoordinate"].to_numpy(float)[pairs["rlnGsplatDirection"].to_numpy(int) == d]
        lo, hi = (float(rho.min()), float(rho.max())) if len(rho) else (-1.0, 1.0)
        ax_d = fig.add_axes([0.15, 0.07, 0.3, 0.03])
        ax_t = fig.add_axes([0.6, 0.07, 0.3, 0.03])
        holder["dir"] = Slider(ax_d, "direction", 0, len(dirs) - 1, valinit=d, valstep=1)
        row = dirs.iloc[d]
        init = default_threshold((row["rlnGsplatGmmMean1"], row["rlnGsplatGmmMean2"])) if t is None else t
        holder["thr"] = Slider(ax_t, "threshold", lo, hi if hi > lo else lo + 1, valinit=init)
        holder["dir"].on_changed(redraw)
        holder["thr"].on_changed(redraw)
        fig.canvas.draw_idle()

    redraw()
    return fig


def draw_graph(ax, directions: np.ndarray, signs: np.ndarray, w, max_edges: int = 4000):
    """Directions on the unit sphere (colour = sign) and the graph edges
    (blue: positive weight, red: negative; width ∝ |weight|)."""
    import scipy.sparse as sp
    u, v = np.mgrid[0:2 * np.pi:40j, 0:np.pi:20j]
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.9", lw=0.5)
    coo = sp.triu(sp.csr_matrix(w), k=1).tocoo()
    if coo.nnz:
        order = np.argsort(-np.abs(coo.data))[:max_edges]
        top = np.abs(coo.data[order]).max()
        for i, j, val in zip(coo.row[order], coo.col[order], coo.data[order]):
            p, q = directions[i], directions[j]
            ax.plot([p[0], q[0]], [p[1], q[1]], [p[2], q[2]], color="tab:blue" if val > 0 else "tab:red",
                    lw=0.3 + 2.5 * abs(val) / top, alpha=0.7)
    colors = np.where(np.asarray(signs) > 0, "tab:green", "tab:purple")
    ax.scatter(directions[:, 0], directions[:, 1], directions[:, 2], c=colors, s=12, depthshade=False)
    ax.set_box_aspect((1, 1, 1))
    ax.set_title(f"{len(directions)} directions: green/purple = sign; edges blue > 0, red < 0")


def graph_figure(cls_dir, graph_dir):
    """Figure of the direction graph of a classification and its max-cut."""
    import matplotlib.pyplot as plt
    import scipy.sparse as sp
    from ..io import read_star_table
    dirs, _ = read_classification(cls_dir)
    xyz = dirs[["rlnGsplatDirX", "rlnGsplatDirY", "rlnGsplatDirZ"]].to_numpy(float)
    signs = read_star_table(Path(graph_dir) / "directions_signs.star", "directions")["rlnGsplatSign"].to_numpy()
    w = sp.load_npz(Path(graph_dir) / "graph.npz")
    fig = plt.figure(figsize=(7, 7))
    draw_graph(fig.add_subplot(111, projection="3d"), xyz, signs, w)
    return fig


def save_pngs(cls_dir, graph_dir, out_dir, n_directions: int = 4) -> list:
    """Headless: the graph and the most bimodal directions as PNG files."""
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig = graph_figure(cls_dir, graph_dir)
    paths.append(os.path.join(out_dir, "direction_graph.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    dirs, _ = read_classification(cls_dir)
    for d in np.argsort(-dirs["rlnGsplatBimodality"].to_numpy())[:n_directions]:
        fig = direction_figure(cls_dir, int(d))
        paths.append(os.path.join(out_dir, f"direction_{int(d):04d}.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths
