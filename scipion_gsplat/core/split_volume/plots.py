"""Figures of the split-volume classification (matplotlib; no Scipion import).

* :func:`direction_figure` — one direction: histogram of the PCA coordinate with
  the two GMM components and a threshold line, the particle counts on each
  side, the eigen-image, the mean image, the image at the threshold
  (``mean + t·eigen``) and the averages of the two GMM sides.
* :func:`graph_figure` — the directions as points on a sphere coloured by their
  sign, edges coloured by the sign of their weight and as wide as its size.
* :class:`DirectionBrowser` (:func:`interactive_direction_viewer`) — the
  direction figure with sliders for the direction and the threshold, updated in
  place (a drag is followed), and an optional "Apply" button.
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
    counts, edges, _ = ax.hist(rho, bins=int(np.clip(len(rho) // 5, 10, 120)), color="0.75", edgecolor="0.5")
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


class DirectionBrowser:
    """One direction's histogram and images in ``fig``, with a direction slider,
    a threshold slider and (with ``on_apply``) an "Apply" button.

    The sliders are made once; moving them updates the artists in place (the
    histogram axes are redrawn only when the direction changes), so a drag is
    followed to its end. Panels: the histogram of ``ρ`` with the GMM and the
    threshold line; the eigen-image; ``mean + t·eigen`` (the image at the
    threshold); the PC1 model of the averages of the particles below and above
    the threshold (``mean + ρ̄·eigen``, ``ρ̄`` the mean coordinate of each side);
    the measured averages of the two GMM sides (λ > 0, λ ≤ 0).

    Args:
        fig: an empty matplotlib figure.
        cls_dir: a ``gsplat_aligned_2d_classification`` output folder.
        direction: first direction shown (None: the most bimodal one).
        on_apply: ``on_apply(direction, threshold)`` called by the Apply button.
    """

    def __init__(self, fig, cls_dir, direction: Optional[int] = None, on_apply=None, data=None):
        from matplotlib.widgets import Button, Slider
        self.fig, self.on_apply = fig, on_apply
        self.dirs, pairs, self.stacks = data or _load(cls_dir)
        self._pair_dir = pairs["rlnGsplatDirection"].to_numpy(int)
        self._pair_rho = pairs["rlnGsplatCoordinate"].to_numpy(float)
        n = len(self.dirs)
        if direction is None or not 0 <= direction < n:
            direction = int(np.argmax(self.dirs["rlnGsplatBimodality"].to_numpy()))
        grid = fig.add_gridspec(2, 5, left=0.06, right=0.98, bottom=0.24, top=0.86, wspace=0.35, hspace=0.35)
        self.ax_hist = fig.add_subplot(grid[:, :2])
        m = self.stacks["eigen_images"].shape[-1]
        self.images = {}
        for name, (r, c) in {"eigen": (0, 2), "at": (0, 3), "gmm_pos": (0, 4),
                             "below": (1, 2), "above": (1, 3), "gmm_neg": (1, 4)}.items():
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            self.images[name] = ax.imshow(np.zeros((m, m)), cmap="gray", origin="lower")
        self.images["eigen"].axes.set_title("eigen-image", fontsize=9)
        self.images["gmm_pos"].axes.set_title("average, λ > 0", fontsize=9)
        self.images["gmm_neg"].axes.set_title("average, λ ≤ 0", fontsize=9)
        self.dir_slider = Slider(fig.add_axes([0.12, 0.11, 0.3, 0.03]), "direction", 0, max(n - 1, 1),
                                 valinit=direction, valstep=1)
        self.thr_slider = Slider(fig.add_axes([0.55, 0.11, 0.3, 0.03]), "threshold", -1.0, 1.0, valinit=0.0)
        for slider in (self.dir_slider, self.thr_slider):  # the valinit marker would stay behind
            getattr(slider, "vline", None) is not None and slider.vline.set_visible(False)
        self.apply_button = None
        if on_apply is not None:
            self.apply_button = Button(fig.add_axes([0.88, 0.02, 0.1, 0.06]), "Apply")
            self.apply_button.on_clicked(lambda _event: self.on_apply(self.direction, self.threshold))
        fig.text(0.02, 0.02, "threshold → Apply: two classes (below / above) of this direction's particles",
                 fontsize=8, color="0.3")
        self.direction, self.threshold, self.line = None, None, None
        self.dir_slider.on_changed(lambda val: self.set_direction(int(round(val))))
        self.thr_slider.on_changed(self.set_threshold)
        self.set_direction(direction)

    def rho(self, direction: Optional[int] = None) -> np.ndarray:
        """PCA coordinates of the particles of ``direction`` (default: the shown one)."""
        d = self.direction if direction is None else direction
        return self._pair_rho[self._pair_dir == d]

    def set_direction(self, d: int) -> None:
        """Show direction ``d``; the threshold goes to the middle of its two GMM means."""
        if d == self.direction:
            return
        self.direction = d
        row = self.dirs.iloc[d]
        rho = self.rho()
        means = (row["rlnGsplatGmmMean1"], row["rlnGsplatGmmMean2"])
        self.ax_hist.cla()
        plot_histogram(self.ax_hist, rho, means, float(row["rlnGsplatGmmSigma"]),
                       (row["rlnGsplatGmmWeight1"], row["rlnGsplatGmmWeight2"]))
        self.line = self.ax_hist.axvline(default_threshold(means), color="gold", lw=2.5)
        self.fig.suptitle(f"direction {d}: rot {row['rlnAngleRot']:.1f}°, tilt {row['rlnAngleTilt']:.1f}°, "
                          f"{len(rho)} particles, bimodality {row['rlnGsplatBimodality']:.2f}, "
                          f"PC1 {100 * row['rlnGsplatExplainedVariance']:.1f}% of variance", fontsize=10)
        for name, img in (("eigen", self.stacks["eigen_images"][d]),
                          ("gmm_pos", self.stacks["side_averages"][2 * d]),
                          ("gmm_neg", self.stacks["side_averages"][2 * d + 1])):
            _set_image(self.images[name], img)
        lo, hi = (float(rho.min()), float(rho.max())) if len(rho) else (-1.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        self.thr_slider.valmin, self.thr_slider.valmax = lo, hi
        self.thr_slider.ax.set_xlim(lo, hi)
        xy = self.thr_slider.poly.xy  # the filled part of the track starts at the new minimum
        for i in (0, 1, 4):
            xy[i] = lo, xy[i][1]
        self.thr_slider.poly.xy = xy
        self.threshold = None
        self.thr_slider.set_val(float(np.clip(default_threshold(means), lo, hi)))
        if int(round(self.dir_slider.val)) != d:
            self.dir_slider.set_val(d)

    def side_means(self) -> tuple[float, float]:
        """Mean ``ρ`` below and at/above the threshold (NaN for an empty side)."""
        rho = self.rho()
        below, above = rho[rho < self.threshold], rho[rho >= self.threshold]
        return (float(below.mean()) if len(below) else float("nan"),
                float(above.mean()) if len(above) else float("nan"))

    def set_threshold(self, t: float) -> None:
        """Move the threshold line, the counts and the threshold-dependent images to ``t``."""
        t = float(t)
        if t == self.threshold:
            return
        self.threshold = t
        rho = self.rho()
        eig, mean = self.stacks["eigen_images"][self.direction], self.stacks["mean_images"][self.direction]
        self.line.set_xdata([t, t])
        n_below, n_above = int((rho < t).sum()), int((rho >= t).sum())
        self.ax_hist.set_title(f"PC1 coordinate: {n_below} below | {n_above} above {t:.3g}")
        _set_image(self.images["at"], mean + t * eig)
        self.images["at"].axes.set_title(f"mean + {t:.3g}·eigen", fontsize=9)
        for name, rho_bar, count in zip(("below", "above"), self.side_means(), (n_below, n_above)):
            _set_image(self.images[name], mean + (0.0 if np.isnan(rho_bar) else rho_bar) * eig)
            self.images[name].axes.set_title(f"{name} (PC1 model): {count}", fontsize=9)
        self.fig.canvas.draw_idle()


def _set_image(artist, img) -> None:
    img = np.asarray(img, float)
    artist.set_data(img)
    lo, hi = float(img.min()), float(img.max())
    artist.set_clim(lo, hi if hi > lo else lo + 1e-6)


def interactive_direction_viewer(cls_dir, fig=None, direction: Optional[int] = None, on_apply=None):
    """A :class:`DirectionBrowser` in ``fig`` (a new 13 × 6.5 in figure by default);
    the browser is kept as ``fig.gsplat_browser`` (its sliders live as long as the figure)."""
    if fig is None:
        import matplotlib.pyplot as plt
        fig = plt.figure(figsize=(13, 6.5))
    fig.gsplat_browser = DirectionBrowser(fig, cls_dir, direction, on_apply)
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


def draw_graph_into(fig, cls_dir, graph_dir):
    """Draw the direction graph of a classification and its max-cut into ``fig`` (3D axes)."""
    import scipy.sparse as sp
    from ..io import read_star_table
    dirs, _ = read_classification(cls_dir)
    xyz = dirs[["rlnGsplatDirX", "rlnGsplatDirY", "rlnGsplatDirZ"]].to_numpy(float)
    signs = read_star_table(Path(graph_dir) / "directions_signs.star", "directions")["rlnGsplatSign"].to_numpy()
    w = sp.load_npz(Path(graph_dir) / "graph.npz")
    draw_graph(fig.add_subplot(111, projection="3d"), xyz, signs, w)
    return fig


def graph_figure(cls_dir, graph_dir):
    """A new figure of the direction graph (see :func:`draw_graph_into`)."""
    import matplotlib.pyplot as plt
    return draw_graph_into(plt.figure(figsize=(7, 7)), cls_dir, graph_dir)


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
