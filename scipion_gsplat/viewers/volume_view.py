"""Volumes in the GUI without Xmipp: three orthogonal slices with sliders, or ChimeraX.

:func:`volume_views` is what viewer actions call: ChimeraX through Scipion's
standard ``ChimeraView`` (scipion-em-chimera) where it is installed and the
user asked for it, otherwise our own matplotlib window
(:class:`VolumeSlicesView`): the central z, y and x slices of a map, and for a
series of maps (maps along a motion, trajectory frames, class maps, half maps)
a frame slider. Sliders update the image data in place, so they follow a drag.

The drawing (:class:`SliceBrowser`, :func:`save_slices_png`) is pure
numpy/matplotlib and works on any figure, with or without a display.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
from pyworkflow.viewer import View

#: figure size of the slices window (inches)
FIGSIZE = (13.0, 6.0)


def _clean_path(path) -> str:
    """Scipion writes MRC file names as ``file.mrc:mrc``; drop that suffix."""
    path = str(path)
    for suffix in (":mrc", ":mrcs"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def central_slices(volume: np.ndarray, offset_px: int = 0) -> tuple:
    """The three orthogonal slices through voxel ``n//2 + offset_px`` of each axis.

    Args:
        volume: ``[z, y, x]`` map.
        offset_px: shift of all three planes from the centre (px), clipped to the box.

    Returns:
        ``(z slice [y, x], y slice [z, x], x slice [z, y])`` and the three indices ``(iz, iy, ix)``.
    """
    idx = tuple(int(np.clip(n // 2 + int(offset_px), 0, n - 1)) for n in volume.shape)
    iz, iy, ix = idx
    return (volume[iz], volume[:, iy, :], volume[:, :, ix]), idx


def contrast_limits(volume: np.ndarray, percent: float) -> tuple:
    """Grey-scale limits clipping ``percent`` % of the voxels at each end
    (estimated on at most ~2 million voxels)."""
    flat = volume.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    lo, hi = np.percentile(flat[::step], [percent, 100.0 - percent])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        lo, hi = float(np.nanmin(flat)), float(np.nanmax(flat))
        if not hi > lo:
            hi = lo + 1.0
    return float(lo), float(hi)


class SliceBrowser:
    """Three central orthogonal slices of one map or a series of maps on a
    matplotlib figure, with sliders for the frame, the plane position and the
    contrast. Slider events only change image data, limits and text, so a drag
    is followed continuously.

    Args:
        fig: a matplotlib Figure (from pyplot, Scipion's plotter or ``Figure()``).
        volumes: the maps, each a ``[z, y, x]`` array or an MRC path (read on
            demand with :func:`scipion_gsplat.core.io.read_map`, a few kept in memory).
        pixel_size_A: voxel size (Å); None: from the first MRC header; 0 or
            unknown: axes in pixels.
        labels: one name per frame (default: file names or ``frame k``).
        points_A: optional per frame an ``(N, 3)`` array of ``x, y, z`` positions
            (Å, origin at voxel ``n//2``), e.g. Gaussian centres; those within
            ``slab_A`` of a plane are drawn on it.
        slab_A: half thickness of the slab whose points are drawn (Å; default 1.5 voxels).
        interactive: add the sliders (False for PNG files).
        title: text above the slices.
    """

    def __init__(self, fig, volumes: Sequence, pixel_size_A: Optional[float] = None,
                 labels: Optional[Sequence[str]] = None, points_A: Optional[Sequence] = None,
                 slab_A: Optional[float] = None, interactive: bool = True, title: str = ""):
        if len(volumes) == 0:
            raise ValueError("no map to show")
        self.fig, self.sources = fig, list(volumes)
        self.labels = list(labels) if labels else [
            os.path.basename(_clean_path(v)) if isinstance(v, (str, os.PathLike)) else f"frame {k}"
            for k, v in enumerate(self.sources)]
        self.points_A = list(points_A) if points_A is not None else None
        self._cache: OrderedDict = OrderedDict()
        self._header_pixel = None
        self.frame, self.offset_px, self.percent = 0, 0, 0.1
        vol = self.volume(0)
        pix = self._header_pixel if pixel_size_A is None else pixel_size_A
        self.pixel_size_A = float(pix) if pix and pix > 0 else None
        self.slab_A = slab_A if slab_A else 1.5 * (self.pixel_size_A or 1.0)
        self.title = title
        self._build(vol, interactive)
        self._show_frame()

    # ------------------------------------------------------------------ data
    @property
    def n_frames(self) -> int:
        return len(self.sources)

    def volume(self, k: int) -> np.ndarray:
        """Map ``k`` as a ``[z, y, x]`` float32 array (MRC files read once, the
        last few kept)."""
        src = self.sources[k]
        if not isinstance(src, (str, os.PathLike)):
            return np.asarray(src, dtype=np.float32)
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        from ..core.io import read_map
        vol, pix = read_map(_clean_path(src))
        if self._header_pixel is None:
            self._header_pixel = pix
        self._cache[k] = vol
        budget = max(2, int(1.5e9 // max(vol.nbytes, 1)))  # ~1.5 GB of maps at most
        while len(self._cache) > budget:
            self._cache.popitem(last=False)
        return vol

    def _extent(self, n_cols: int, n_rows: int) -> tuple:
        s = self.pixel_size_A or 1.0
        return ((-(n_cols // 2) - 0.5) * s, (n_cols - n_cols // 2 - 0.5) * s,
                (-(n_rows // 2) - 0.5) * s, (n_rows - n_rows // 2 - 0.5) * s)

    # ------------------------------------------------------------------ figure
    def _build(self, vol: np.ndarray, interactive: bool) -> None:
        from matplotlib.colors import Normalize
        fig = self.fig
        bottom = 0.30 if interactive else 0.12
        height = 0.88 - bottom
        self.norm = Normalize(*contrast_limits(vol, self.percent))
        unit = "Å" if self.pixel_size_A else "px"
        self.axes, self.images, self.markers = [], [], []
        for k, (name, (h, v)) in enumerate((("z", ("x", "y")), ("y", ("x", "z")), ("x", ("y", "z")))):
            ax = fig.add_axes([0.055 + k * 0.305, bottom, 0.25, height])
            im = ax.imshow(np.zeros((2, 2), np.float32), cmap="gray", norm=self.norm, origin="lower",
                           interpolation="nearest")
            ax.set_xlabel(f"{h} ({unit})")
            ax.set_ylabel(f"{v} ({unit})")
            marker, = ax.plot([], [], ls="none", marker="o", ms=3, mfc="none", mec="tab:orange", mew=0.8)
            self.axes.append(ax)
            self.images.append(im)
            self.markers.append(marker)
        cax = fig.add_axes([0.93, bottom, 0.012, height])
        fig.colorbar(self.images[0], cax=cax, label="density")
        self.heading = fig.text(0.5, 0.955, "", ha="center", va="center", fontsize=11)
        self.frame_slider = self.offset_slider = self.contrast_slider = None
        if not interactive:
            return
        from matplotlib.widgets import Slider
        rows = [0.16, 0.10, 0.04] if self.n_frames > 1 else [None, 0.13, 0.06]
        if self.n_frames > 1:
            self.frame_slider = Slider(fig.add_axes([0.18, rows[0], 0.6, 0.035]), "frame", 0,
                                       self.n_frames - 1, valinit=0, valstep=1, valfmt="%d")
            self.frame_slider.on_changed(self.set_frame)
        half = min(vol.shape) // 2
        self.offset_slider = Slider(fig.add_axes([0.18, rows[1], 0.6, 0.035]), "plane offset (px)", -half,
                                    min(vol.shape) - half - 1, valinit=0, valstep=1, valfmt="%d")
        self.offset_slider.on_changed(self.set_offset)
        self.contrast_slider = Slider(fig.add_axes([0.18, rows[2], 0.6, 0.035]), "clip (%)", 0.0, 5.0,
                                      valinit=self.percent, valfmt="%.2f")
        self.contrast_slider.on_changed(self.set_contrast)

    def _show_frame(self) -> None:
        vol = self.volume(self.frame)
        slices, idx = central_slices(vol, self.offset_px)
        shapes = ((vol.shape[2], vol.shape[1]), (vol.shape[2], vol.shape[0]), (vol.shape[1], vol.shape[0]))
        for ax, im, sl, (nc, nr) in zip(self.axes, self.images, slices, shapes):
            im.set_data(sl)
            ext = self._extent(nc, nr)
            im.set_extent(ext)
            ax.set_xlim(ext[0], ext[1])
            ax.set_ylim(ext[2], ext[3])
        s = self.pixel_size_A or 1.0
        planes = [(i - n // 2) * s for i, n in zip(idx, vol.shape)]  # z, y, x plane positions
        names = ("z", "y", "x")
        for ax, axis, pos in zip(self.axes, names, planes):
            unit = "Å" if self.pixel_size_A else "px"
            ax.set_title(f"slice {axis} = {pos:+.1f} {unit}", fontsize=9)
        self._draw_points(planes)
        self.norm.vmin, self.norm.vmax = contrast_limits(vol, self.percent)
        label = self.labels[self.frame] if self.frame < len(self.labels) else f"frame {self.frame}"
        count = f"frame {self.frame + 1}/{self.n_frames}: " if self.n_frames > 1 else ""
        size = f"{vol.shape[2]}×{vol.shape[1]}×{vol.shape[0]} px" + (
            f", {self.pixel_size_A:.3g} Å/px" if self.pixel_size_A else "")
        self.heading.set_text(f"{self.title + '  —  ' if self.title else ''}{count}{label} ({size})")
        if self.frame_slider is not None:
            self.frame_slider.valtext.set_text(f"{self.frame + 1}/{self.n_frames}")

    def _draw_points(self, planes) -> None:
        if self.points_A is None or self.pixel_size_A is None:
            return
        pts = np.asarray(self.points_A[min(self.frame, len(self.points_A) - 1)], dtype=float).reshape(-1, 3)
        z0, y0, x0 = planes
        for marker, axis, plane, (h, v) in zip(self.markers, (2, 1, 0), (z0, y0, x0), ((0, 1), (0, 2), (1, 2))):
            near = np.abs(pts[:, axis] - plane) <= self.slab_A
            marker.set_data(pts[near, h], pts[near, v])

    def _redraw(self) -> None:
        self._show_frame()
        self.fig.canvas.draw_idle()

    # ------------------------------------------------------------------ slider callbacks
    def set_frame(self, value) -> None:
        """Show map ``value`` of the series (0-based)."""
        self.frame = int(np.clip(round(float(value)), 0, self.n_frames - 1))
        self._redraw()

    def set_offset(self, value) -> None:
        """Move the three planes ``value`` px from the centre."""
        self.offset_px = int(round(float(value)))
        self._redraw()

    def set_contrast(self, value) -> None:
        """Clip ``value`` % of the voxels at each end of the grey scale."""
        self.percent = float(value)
        self._redraw()


def save_slices_png(path, volumes: Sequence, frame: int = 0, pixel_size_A: Optional[float] = None,
                    title: str = "", **options) -> str:
    """Write the slices of map ``frame`` of ``volumes`` as a PNG (no display
    needed; written atomically). ``options`` go to :class:`SliceBrowser`."""
    from matplotlib.figure import Figure

    from ..core.io import atomic_path
    fig = Figure(figsize=FIGSIZE, dpi=100)
    browser = SliceBrowser(fig, volumes, pixel_size_A, interactive=False, title=title, **options)
    if frame:
        browser.set_frame(frame)
    with atomic_path(str(path)) as tmp:
        fig.savefig(tmp, format="png")
    return str(path)


class VolumeSlicesView(View):
    """One matplotlib window (Scipion's plotter, TkAgg in the GUI) with the
    central z, y, x slices of a map, and a frame slider for several maps.

    Args:
        paths: MRC file names (one per frame; ``file.mrc:mrc`` accepted).
        title: window title.
        sampling: voxel size (Å); None: from the MRC header.
        options: ``labels``, ``points_A``, ``slab_A`` of :class:`SliceBrowser`.
    """

    def __init__(self, paths, title: str, sampling: Optional[float] = None, **options):
        View.__init__(self)
        self.paths = [_clean_path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        self.title, self.sampling, self.options = title, sampling, options
        self.plotter = self.browser = None

    def show(self):
        from pyworkflow.gui.plotter import Plotter
        self.plotter = Plotter(x=1, y=1, windowTitle=self.title, figsize=FIGSIZE)
        self.plotter.tightLayoutOn = False  # axes are placed by hand
        self.browser = SliceBrowser(self.plotter.getFigure(), self.paths, self.sampling,
                                    title=self.title, **self.options)
        self.plotter.getFigure()._gsplat_slices = self.browser  # the sliders live as long as the window
        self.plotter.show()

    def save_png(self, path, frame: int = 0) -> str:
        """The slices of map ``frame`` as a PNG file (headless, no window)."""
        return save_slices_png(path, self.paths, frame, self.sampling, title=self.title, **self.options)


def chimerax_available() -> bool:
    """Whether ChimeraX is installed where scipion-em-chimera (or pwem's
    default) looks for it; False, never an error, when it is not."""
    try:
        from pwem.viewers.viewer_chimera import Chimera
        program = Chimera.getProgram()
    except Exception:  # plugin absent or misconfigured: no ChimeraX
        return False
    return bool(program) and os.path.exists(program)


def volume_views(paths, title: str, sampling: Optional[float] = None, use_chimerax: bool = False,
                 **options) -> list:
    """The views that show ``paths`` (one MRC map or a series).

    ChimeraX (pwem's ``ChimeraView``) when ``use_chimerax`` and it is installed;
    otherwise ``[VolumeSlicesView]`` (when ChimeraX was asked for but is
    missing, the window title says so). ``options`` go to :class:`VolumeSlicesView`.
    No map or a missing file: an error dialog (``MessageView``) instead.
    """
    files = [_clean_path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    missing = [f for f in files if not os.path.exists(f)]
    if not files or missing:
        from pyworkflow.viewer import MSG_ERROR, MessageView
        text = f"Map files not found: {', '.join(missing)}" if missing else "There is no map to show."
        return [MessageView(text, title, msgType=MSG_ERROR)]
    if use_chimerax and chimerax_available():
        from pwem.viewers.viewer_chimera import ChimeraView
        return [ChimeraView([os.path.abspath(f) for f in files])]
    if use_chimerax:
        title = f"{title} (ChimeraX not installed: slices)"
    return [VolumeSlicesView(files, title, sampling, **options)]
