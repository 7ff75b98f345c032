"""A window to select particles by drawing on a scatter of two coordinates.

:class:`RegionSelector` is a Scipion plotter (a matplotlib window, TkAgg in the
GUI) showing the particles in the plane of two coordinates (a scatter, or a
hexbin density for large sets) with:

* a lasso or a rectangle (radio buttons) to draw the region;
* the motions on the x and y axes (radio buttons, when there are more than two);
* the live count of selected particles in the title, updated while drawing;
* action buttons (e.g. "Create subset", "Reconstruct this region") that hand
  the boolean selection mask to the caller's callbacks.

Callbacks return a list of Scipion views (message dialogs, plot or volume
windows) which the window shows; any exception they raise is shown as an error
dialog, never as a traceback in the terminal. The geometry itself (points in a
polygon/rectangle) is :mod:`scipion_gsplat.core.heterogeneity.selection`.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from pyworkflow.gui.plotter import Plotter

from ..core.heterogeneity.selection import coordinate_plane, points_in_polygon, points_in_rectangle

LASSO, RECTANGLE = "lasso", "rectangle"
# More particles than this: a hexbin density with a random sample of the
# selection on top (a scatter of millions of points redraws too slowly).
MAX_SCATTER = 50000
# During a drag the count is updated at most this often (s), and only for sets
# up to LIVE_LIMIT particles (larger ones: on release).
LIVE_INTERVAL_S = 0.1
LIVE_LIMIT = 500000


class RegionSelector(Plotter):
    """Lasso/rectangle selection on the plane of two coordinates.

    Args:
        z: ``(N, K)`` particle coordinates (Å), K ≥ 2.
        motions: 1-based motions on the x and y axes.
        actions: ``[(label, callback)]``; ``callback(mask (N,) bool) -> list of
            views`` runs when its button is pressed.
        windowTitle: the window's title.
        unit: axis unit shown in the labels.

    Attributes:
        mask: ``(N,)`` boolean, the current selection.
        mode: ``"lasso"`` or ``"rectangle"``.
    """

    def __init__(self, z: np.ndarray, motions: Sequence[int] = (1, 2),
                 actions: Sequence[tuple[str, Callable]] = (), windowTitle: str = "Select a region",
                 unit: str = "Å", **kwargs):
        super().__init__(windowTitle=windowTitle, figsize=kwargs.pop("figsize", (11, 7.5)), **kwargs)
        self.tightLayoutOn = False  # hand-placed widget axes
        self.z = np.asarray(z, dtype=np.float64)
        if self.z.ndim != 2 or self.z.shape[1] < 2:
            raise ValueError("a selection on a plane needs at least two coordinates per particle")
        self.unit = unit
        self.motions = tuple(int(m) for m in motions)
        self.xy = coordinate_plane(self.z, self.motions)
        self.mask = np.zeros(len(self.z), dtype=bool)
        self.mode = LASSO
        self._actions = list(actions)
        self._last_live = 0.0
        self._syncing = False
        self._rng = np.random.default_rng(0)
        fig = self.getFigure()
        fig._gsplat_selector = self  # widgets are only weakly referenced by the canvas
        self.ax = fig.add_axes([0.07, 0.09, 0.6, 0.82])
        self._buildWidgets()
        self._drawPoints()
        self._connectSelectors()
        fig.canvas.mpl_connect("motion_notify_event", self._onMotion)

    # ------------------------------------------------------------------ layout
    def _buildWidgets(self):
        from matplotlib.widgets import Button, RadioButtons
        fig = self.getFigure()
        fig.text(0.72, 0.9, "Draw with", fontsize=10, weight="bold")
        self.modeButtons = RadioButtons(fig.add_axes([0.72, 0.78, 0.24, 0.11]), (LASSO, RECTANGLE))
        self.modeButtons.on_clicked(self._onMode)
        k = self.z.shape[1]
        labels = tuple(str(m) for m in range(1, k + 1))
        height = min(0.04 * k + 0.02, 0.3)
        fig.text(0.72, 0.74, "x motion", fontsize=10, weight="bold")
        fig.text(0.85, 0.74, "y motion", fontsize=10, weight="bold")
        self.xButtons = RadioButtons(fig.add_axes([0.72, 0.73 - height, 0.11, height]), labels,
                                     active=self.motions[0] - 1)
        self.yButtons = RadioButtons(fig.add_axes([0.85, 0.73 - height, 0.11, height]), labels,
                                     active=self.motions[1] - 1)
        self.xButtons.on_clicked(lambda label: self.setMotions((int(label), self.motions[1])))
        self.yButtons.on_clicked(lambda label: self.setMotions((self.motions[0], int(label))))
        self.actionButtons = {}
        for n, (label, callback) in enumerate(self._actions):
            button = Button(fig.add_axes([0.72, 0.26 - 0.09 * n, 0.24, 0.07]), label)
            button.on_clicked(lambda event, cb=callback, lb=label: self.runAction(lb, cb))
            self.actionButtons[label] = button
        clear = Button(fig.add_axes([0.72, 0.26 - 0.09 * len(self._actions), 0.24, 0.07]), "Clear selection")
        clear.on_clicked(lambda event: self.setMask(np.zeros(len(self.z), dtype=bool)))
        self.actionButtons["Clear selection"] = clear
        fig.text(0.07, 0.015, "Drag on the plot to draw a region around particles; the count updates as you "
                              "draw. Then create a subset or reconstruct a map of the selection.", fontsize=9)

    def _drawPoints(self):
        ax = self.ax
        ax.clear()
        x, y = self.xy[:, 0], self.xy[:, 1]
        if len(x) > MAX_SCATTER:
            ax.hexbin(x, y, gridsize=80, cmap="Greys", mincnt=1, bins="log")
        else:
            size = float(np.clip(4000.0 / max(len(x), 1), 1.0, 12.0))
            ax.scatter(x, y, s=size, c="0.55", linewidths=0)
        self._selected = ax.scatter([], [], s=8 if len(x) <= MAX_SCATTER else 2, c="crimson", linewidths=0)
        self._outline, = ax.plot([], [], color="tab:blue", linewidth=1.2)
        ax.set_xlabel(f"coordinate {self.motions[0]} ({self.unit})")
        ax.set_ylabel(f"coordinate {self.motions[1]} ({self.unit})")
        ax.set_xlim(*_padded(x))
        ax.set_ylim(*_padded(y))
        self._updateCount(self.mask)

    def _connectSelectors(self):
        from matplotlib.widgets import LassoSelector, RectangleSelector
        self.lasso = LassoSelector(self.ax, self._onLasso, props={"color": "tab:blue", "linewidth": 1.5})
        self.rectangle = RectangleSelector(self.ax, self._onRectangle, useblit=False, button=[1],
                                           props={"facecolor": "tab:blue", "alpha": 0.15,
                                                  "edgecolor": "tab:blue"}, interactive=False)
        self.lasso.set_active(self.mode == LASSO)
        self.rectangle.set_active(self.mode == RECTANGLE)

    # ------------------------------------------------------------------ state
    def setMotions(self, motions: Sequence[int]) -> None:
        """Show the plane of the motions ``(mx, my)`` (1-based); the selection is kept
        (it is a set of particles), the drawn outline is not."""
        motions = tuple(int(m) for m in motions)
        if self._syncing:  # the radio buttons being set below call back here
            return
        xy = coordinate_plane(self.z, motions)  # ValueError for a motion that does not exist
        self._syncing = True
        try:
            for buttons, m in ((self.xButtons, motions[0]), (self.yButtons, motions[1])):
                if buttons.value_selected != str(m):
                    buttons.set_active(m - 1)
        finally:
            self._syncing = False
        self.motions, self.xy = motions, xy
        for sel in (getattr(self, "lasso", None), getattr(self, "rectangle", None)):
            if sel is not None:
                sel.disconnect_events()
        self._drawPoints()
        self._connectSelectors()
        self.getCanvas().draw_idle()

    def setMode(self, mode: str) -> None:
        """``"lasso"`` or ``"rectangle"``."""
        if mode not in (LASSO, RECTANGLE):
            raise ValueError(f"unknown selection mode {mode!r}")
        self.mode = mode
        self.lasso.set_active(mode == LASSO)
        self.rectangle.set_active(mode == RECTANGLE)

    def setMask(self, mask: np.ndarray, outline=None) -> None:
        """Make ``mask`` the selection and redraw the highlight and the count;
        ``outline (V, 2)``: the region's border to draw (data units), or None."""
        self.mask = np.asarray(mask, dtype=bool).copy()
        v = np.empty((0, 2)) if outline is None else np.asarray(outline, dtype=float).reshape(-1, 2)
        if len(v):
            v = np.vstack([v, v[:1]])
        self._outline.set_data(v[:, 0], v[:, 1])
        self._updateCount(self.mask)
        self.getCanvas().draw_idle()

    def selectPolygon(self, vertices) -> np.ndarray:
        """Select the particles inside the polygon ``vertices (V, 2)`` (data units of the plot)."""
        self.setMask(points_in_polygon(self.xy, vertices), outline=vertices)
        return self.mask

    def selectRectangle(self, corner1, corner2) -> np.ndarray:
        """Select the particles inside the rectangle of two opposite corners (data units)."""
        (xa, ya), (xb, yb) = corner1, corner2
        self.setMask(points_in_rectangle(self.xy, corner1, corner2),
                     outline=[(xa, ya), (xb, ya), (xb, yb), (xa, yb)])
        return self.mask

    def countText(self) -> str:
        """The title line: ``"<n> of <N> particles selected (<p> %)"``."""
        return _count_text(int(self.mask.sum()), len(self.mask))

    # ------------------------------------------------------------------ events
    def _onMode(self, label):
        self.setMode(label)

    def _onLasso(self, verts):
        self.selectPolygon(np.asarray(verts))

    def _onRectangle(self, press, release):
        if None in (press.xdata, press.ydata, release.xdata, release.ydata):
            return
        self.selectRectangle((press.xdata, press.ydata), (release.xdata, release.ydata))

    def _onMotion(self, event):
        """Update the count while a region is being drawn (throttled)."""
        if event.button != 1 or len(self.mask) > LIVE_LIMIT or time.time() - self._last_live < LIVE_INTERVAL_S:
            return
        live = None
        if self.mode == LASSO and getattr(self.lasso, "verts", None) and len(self.lasso.verts) >= 3:
            live = points_in_polygon(self.xy, np.asarray(self.lasso.verts))
        elif self.mode == RECTANGLE and self.rectangle._eventpress is not None and event.inaxes is self.ax:
            press = self.rectangle._eventpress
            if press.xdata is not None and event.xdata is not None:
                live = points_in_rectangle(self.xy, (press.xdata, press.ydata), (event.xdata, event.ydata))
        if live is not None:
            self._last_live = time.time()
            self._updateCount(live)
            self.getCanvas().draw_idle()

    def _updateCount(self, mask):
        sel = np.flatnonzero(mask)
        if len(self.xy) > MAX_SCATTER and len(sel) > MAX_SCATTER:
            sel = self._rng.choice(sel, MAX_SCATTER, replace=False)
        self._selected.set_offsets(self.xy[sel] if len(sel) else np.empty((0, 2)))
        self.ax.set_title(_count_text(int(np.count_nonzero(mask)), len(mask)), fontsize=12)

    # ------------------------------------------------------------------ actions
    def runAction(self, label: str, callback: Callable) -> list:
        """Run an action on the current selection and show the views it returns;
        an exception becomes an error dialog. Returns the views."""
        import pyworkflow.gui.dialog as dialog
        from pyworkflow.viewer import View
        try:
            views = callback(self.mask.copy()) or []
        except Exception as exc:  # shown to the user, not printed
            dialog.showError(label, f"{type(exc).__name__}: {exc}", self._dialogParent())
            return []
        for view in views:
            if isinstance(view, View):
                view.show()
        return views

    def _dialogParent(self):
        canvas = self.getCanvas()
        return canvas.get_tk_widget() if hasattr(canvas, "get_tk_widget") else None


def _count_text(n: int, total: int) -> str:
    pct = 100.0 * n / total if total else 0.0
    return f"{n} of {total} particles selected ({pct:.1f} %)"


def _padded(values: np.ndarray, frac: float = 0.05) -> tuple:
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    pad = (hi - lo) * frac or 1.0
    return lo - pad, hi + pad


__all__ = ["RegionSelector", "LASSO", "RECTANGLE"]
