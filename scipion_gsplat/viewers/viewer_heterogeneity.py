"""Viewer of GMM heterogeneity: coordinates, eigen-motions, maps along a motion,
regions of coordinate space as particle subsets and maps.

Every action opens its window on the first click (Scipion plotters on the Tk
backend, the shared volume viewer for maps); user mistakes and failures are
shown as dialogs. :meth:`GsplatHeterogeneityViewer.savePngs` writes the figures
headless.

"Pick a region" is done three ways, all through :meth:`createSubsetFromMask`
and :meth:`reconstructRegion` on a boolean mask over the particles of the run's
``extra/particles.star``: a typed range along one motion (:meth:`createSubset`),
a lasso or rectangle drawn on the scatter of two coordinates (the
:class:`~scipion_gsplat.viewers.selection.RegionSelector` window), or a polygon
given as vertices (:meth:`selectPolygon`, :meth:`selectRectangle`).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pyworkflow.protocol.params as params
from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer

from ..core.heterogeneity import plots
from ..core.heterogeneity.selection import (coordinate_plane, points_in_polygon, points_in_range,
                                            points_in_rectangle)
from .figures import constrained_plotter, save_plotters
from ..protocols.protocol_gmm_heterogeneity import ProtGsplatGmmHeterogeneity

COORDINATE_COLUMN = "rlnGsplatCoordinate{}"
VIEWER_SLICES, VIEWER_CHIMERAX = 0, 1


def _dialog_on_error(title: str):
    """Turn an exception of a viewer action into an error dialog (a list with one
    message view) instead of a traceback in the terminal."""
    def wrap(method):
        @functools.wraps(method)
        def action(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except Exception as exc:  # shown to the user
                text = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
                return [self.errorMessage(text, title)]
        return action
    return wrap


class GsplatHeterogeneityViewer(ProtocolViewer):
    """Histograms and hexbin of the particle coordinates, explained variance,
    an eigen-motion as arrows on the Gaussian model, the maps along a motion,
    and particle subsets and maps of a region of coordinate space (a lasso or
    rectangle on two coordinates, or a range along one)."""
    _label = "viewer gmm heterogeneity"
    _targets = [ProtGsplatGmmHeterogeneity]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        from .volume_view import chimerax_available
        form.addSection(label="Visualization")
        form.addParam("volumeViewer", params.EnumParam, choices=["slices", "ChimeraX"], default=VIEWER_SLICES,
                      display=params.EnumParam.DISPLAY_HLIST, condition=str(chimerax_available()),
                      label="Volume viewer",
                      help="How maps are shown: 'slices' opens the three central orthogonal slices (z, y, x) "
                           "with sliders for the frame, the plane position and the contrast; 'ChimeraX' opens "
                           "them in ChimeraX (scipion-em-chimera). Shown only where ChimeraX is installed.")
        form.addParam("displayCoordinates", params.LabelParam, label="Coordinates (histograms, hexbin)",
                      help="Histogram of every coordinate (Å of RMS displacement along its eigen-motion), "
                           "the density of particles on coordinates 1 and 2, and the share of the gradient "
                           "variance each eigen-motion explains.")
        form.addParam("motion", params.IntParam, default=1, label="Eigen-motion",
                      help="Which eigen-motion (1 = the one explaining most variance) the next two "
                           "actions show.")
        form.addParam("displayMotion", params.LabelParam, label="Eigen-motion on the model (arrows)",
                      help="The consensus Gaussian model in three views with the motion drawn as arrows "
                           "(the displacement at two standard deviations of the coordinate).")
        form.addParam("displayMaps", params.LabelParam, label="Maps along the eigen-motion",
                      help="The maps of the model deformed along the motion (from one end of the "
                           "coordinate distribution to the other) in one window with a frame slider; the "
                           "Gaussian centres of each trajectory frame near a slice are drawn on it.")
        form.addSection(label="Region")
        form.addParam("xMotion", params.IntParam, default=1, label="Motion on the x axis",
                      help="Coordinate shown horizontally in the selection window (it can be changed "
                           "there too).")
        form.addParam("yMotion", params.IntParam, default=2, label="Motion on the y axis",
                      help="Coordinate shown vertically in the selection window.")
        form.addParam("displayRegion", params.LabelParam, label="Select a region (lasso / rectangle)",
                      help="A scatter of the particles on two coordinates: draw a lasso or a rectangle "
                           "around a group of particles (the count updates as you draw), then 'Create "
                           "subset' registers them as a new particle set output subsetRegion_<n> of this "
                           "run, and 'Reconstruct this region' computes their map (Fourier reconstruction "
                           "with their poses and CTF), shows it and registers it as output regionMap_<n>.")
        form.addSection(label="Subset")
        form.addParam("low", params.FloatParam, default=-1.0, label="Coordinate from (Å)",
                      help="Lower end of the range along the eigen-motion chosen in Visualization.")
        form.addParam("high", params.FloatParam, default=1.0, label="Coordinate to (Å)",
                      help="Upper end of the range (Å along the chosen eigen-motion, as in the coordinate "
                           "histograms); particles between the two ends form the subset.")
        form.addParam("doSubset", params.LabelParam, label="Create the subset of particles in this range",
                      help="New particle set output subsetMotion<k>_<n> with the particles whose coordinate "
                           "along the motion lies in the range.")

    def _getVisualizeDict(self):
        return {"displayCoordinates": self._showCoordinates, "displayMotion": self._showMotion,
                "displayMaps": self._showMaps, "displayRegion": self._showRegion,
                "doSubset": self._createSubsetAction}

    # ------------------------------------------------------------------ data
    def _readOutputs(self) -> dict:
        path = os.path.join(self.protocol._getExtraPath(), "heterogeneity.npz")
        if not os.path.exists(path):
            raise ValueError(f"No results yet: {path} is missing (has the run finished?).")
        return plots.read_outputs(self.protocol._getExtraPath())

    def particleTable(self):
        """The run's particles (``extra/particles.star``: poses, CTF, coordinates),
        read once; a :class:`~scipion_gsplat.core.io.ParticleStar`."""
        cached = getattr(self, "_particle_table", None)
        if cached is None:
            from ..core import io
            path = self.protocol._getExtraPath("particles.star")
            if not os.path.exists(path):
                raise ValueError(f"No results yet: {path} is missing (has the run finished?).")
            cached = self._particle_table = io.read_particles(path)
        return cached

    def particleCoordinates(self) -> tuple:
        """``(ids (N,), z (N, K))``: each particle's Scipion id and its coordinates (Å)."""
        p = self.particleTable().particles
        k = 1
        while COORDINATE_COLUMN.format(k) in p:
            k += 1
        if k == 1:
            raise ValueError("The particles of this run have no coordinates.")
        z = p[[COORDINATE_COLUMN.format(m) for m in range(1, k)]].to_numpy(np.float64)
        return p["rlnImageId"].to_numpy(np.int64), z

    def _formValue(self, name: str, default):
        """A form parameter's value (its default when the form was not built,
        e.g. a viewer made in a script without :meth:`setProtocol`)."""
        param = getattr(self, name, None)
        return default if param is None or param.get() is None else param.get()

    def _checkMotion(self, motion: int) -> int:
        k = self.particleCoordinates()[1].shape[1]
        if not 1 <= int(motion) <= k:
            raise ValueError(f"Eigen-motion {motion} does not exist: this run has motions 1 to {k}.")
        return int(motion)

    # ------------------------------------------------------------------ figures
    def coordinatesPlotter(self) -> EmPlotter:
        out = self._readOutputs()
        plotter = EmPlotter(x=1, y=3, windowTitle="Coordinates", figsize=(14, 4.5))
        fig = plotter.getFigure()
        axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
        plots.plot_histograms(axes[0], out["coordinates"])
        plots.plot_hexbin(axes[1], out["coordinates"])
        plots.plot_explained(axes[2], out["explained"])
        return plotter

    def motionPlotter(self, motion: int = None) -> EmPlotter:
        """The consensus model in three views with eigen-motion ``motion`` as arrows
        (constrained layout: the colour bars stay beside their panels)."""
        out = self._readOutputs()
        k = int(motion or self._formValue("motion", 1))
        if not 1 <= k <= out["motions"].shape[0]:
            raise ValueError(f"Eigen-motion {k} does not exist: this run has motions 1 to "
                             f"{out['motions'].shape[0]}.")
        plotter = constrained_plotter(x=1, y=3, windowTitle=f"Eigen-motion {k}", figsize=(14, 5))
        fig = plotter.getFigure()
        axes = [fig.add_subplot(1, 3, j + 1) for j in range(3)]
        spread = 2.0 * float(out["coordinates"][:, k - 1].std())
        plots.plot_motion_arrows(axes, out["model"], out["motions"][k - 1], spread, fig=fig)
        return plotter

    def mapFiles(self, motion: int = None) -> list:
        """The map files along a motion, in order."""
        k = int(motion or self._formValue("motion", 1))
        folder = self.protocol._getExtraPath()
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if f.startswith(f"motion{k:02d}_frame") and f.endswith(".mrc"))

    def _samplingRate(self) -> float:
        return float(self.protocol.outputParticles.getSamplingRate())

    @_dialog_on_error("Coordinates")
    def _showCoordinates(self, param=None):
        return [self.coordinatesPlotter()]

    @_dialog_on_error("Eigen-motion on the model")
    def _showMotion(self, param=None):
        return [self.motionPlotter()]

    @_dialog_on_error("Maps along the eigen-motion")
    def _showMaps(self, param=None):
        k = int(self._formValue("motion", 1))
        paths = self.mapFiles(k)
        if not paths:
            raise ValueError(f"No maps along eigen-motion {k} in {self.protocol._getExtraPath()} "
                             f"(this run has {self._readOutputs()['motions'].shape[0]} motions).")
        from .volume_view import volume_views
        title = f"Maps along eigen-motion {k}"
        if self._useChimerax():
            return volume_views(paths, title, use_chimerax=True)
        points = self.trajectoryCentres(k)
        return volume_views(paths, title, sampling=self._samplingRate(), labels=self.frameLabels(k, len(paths)),
                            points_A=points if points is not None and len(points) == len(paths) else None)

    def _useChimerax(self) -> bool:
        return self._formValue("volumeViewer", VIEWER_SLICES) == VIEWER_CHIMERAX

    def trajectoryCentres(self, motion: int):
        """Gaussian centres of each frame of the trajectory along ``motion``
        (``motion<k>.pdb``, one model per frame): a list of ``(N, 3)`` arrays
        ``x, y, z`` in Å with the origin at voxel ``n//2`` of the maps; None
        when the run wrote no trajectory."""
        import gemmi
        summary = self.protocol._summaryData()
        path = self.protocol._getExtraPath(f"motion{int(motion):02d}.pdb")
        if not os.path.exists(path) or "box" not in summary:
            return None
        origin = (int(summary["box"]) // 2) * float(summary["pixel_size_A"])
        st = gemmi.read_structure(path)
        return [np.array([cra.atom.pos.tolist() for cra in model.all()]) - origin for model in st]

    def frameLabels(self, motion: int, n_frames: int) -> list:
        """``"coordinate c Å"`` for each map along ``motion`` (the coordinates
        from the run's summary; plain frame numbers without it)."""
        entries = [e for e in self.protocol._summaryData().get("motion_frames", []) if e.get("motion") == motion]
        coords = entries[0].get("coordinates", []) if entries else []
        if len(coords) != n_frames:
            return [f"frame {f + 1}" for f in range(n_frames)]
        return [f"coordinate {c:+.2f} Å" for c in coords]

    # ------------------------------------------------------------------ regions
    def selectPolygon(self, vertices, motions=(1, 2)) -> np.ndarray:
        """Mask ``(N,)`` of the particles inside the polygon ``vertices (V, 2)``
        drawn on coordinates ``motions = (mx, my)`` (1-based, Å)."""
        return points_in_polygon(coordinate_plane(self.particleCoordinates()[1], motions), vertices)

    def selectRectangle(self, corner1, corner2, motions=(1, 2)) -> np.ndarray:
        """Mask ``(N,)`` of the particles inside the rectangle of two opposite
        corners ``(x, y)`` on coordinates ``motions``."""
        return points_in_rectangle(coordinate_plane(self.particleCoordinates()[1], motions), corner1, corner2)

    def createSubsetFromMask(self, mask, prefix: str = "subsetRegion"):
        """Register the particles selected by ``mask (N,)`` (rows of the run's
        particles) as a new output ``<prefix>_<n>``; returns ``(name, subset)``.
        Raises ValueError on an empty selection (no output, no set file left)."""
        ids, _ = self.particleCoordinates()
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ids.shape:
            raise ValueError(f"The selection has {mask.size} entries for {ids.size} particles.")
        if not mask.any():
            raise ValueError("No particle is selected: draw a region around some particles first.")
        return self.protocol.registerParticleSubset(prefix, ids[mask])

    def reconstructRegion(self, mask, prefix: str = "regionMap"):
        """Fourier reconstruction of the particles selected by ``mask`` (their
        poses and CTF), written to ``extra/<prefix>_<n>.mrc`` and registered as
        the output Volume ``<prefix>_<n>``; returns ``(name, volume, path)``."""
        from ..core.heterogeneity.selection import reconstruct_selection
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            raise ValueError("No particle is selected: draw a region around some particles first.")
        name = self.protocol.nextOutputName(prefix)
        path = self.protocol._getExtraPath(f"{name}.mrc")
        n = int(mask.sum())

        def progress(done, total):
            print(f"reconstructing {name}: {done}/{total} particles", flush=True)
        reconstruct_selection(self.particleTable(), mask, path, progress=progress)
        vol = self.protocol.registerVolume(name, path, label=f"map of {n} selected particles")
        return name, vol, path

    def regionSelector(self, motions=None):
        """The lasso/rectangle selection window on coordinates ``motions`` (default:
        the form's x and y motions), with "Create subset" and "Reconstruct this
        region" buttons."""
        from .selection import RegionSelector
        _, z = self.particleCoordinates()
        if z.shape[1] < 2:
            raise ValueError("This run has one eigen-motion: select a range of it in the Subset tab.")
        motions = tuple(motions or (self._formValue("xMotion", 1), self._formValue("yMotion", 2)))
        for m in motions:
            self._checkMotion(m)
        run = self.protocol.getObjLabel() or self.protocol.getRunName()
        return RegionSelector(z, motions, windowTitle=f"Select a region: {run}",
                              actions=[("Create subset", self._regionSubsetViews),
                                       ("Reconstruct this region", self._regionMapViews)])

    def _regionSubsetViews(self, mask) -> list:
        try:
            name, subset = self.createSubsetFromMask(mask)
        except ValueError as exc:
            return [self.errorMessage(str(exc), "No subset created")]
        return [self.infoMessage(f"{subset.getSize()} particles in the new output {name} of this run.",
                                 "Subset created")]

    def _regionMapViews(self, mask) -> list:
        from ..core.io import InputError
        try:
            name, vol, path = self.reconstructRegion(mask)
        except (ValueError, InputError) as exc:
            return [self.errorMessage(str(exc), "No map reconstructed")]
        from .volume_view import volume_views
        views = volume_views([path], f"{name}: {int(np.count_nonzero(mask))} particles",
                             sampling=vol.getSamplingRate(), use_chimerax=self._useChimerax())
        return views + [self.infoMessage(f"Map of {int(np.count_nonzero(mask))} particles written to {path} "
                                         f"and registered as output {name}.", "Map reconstructed")]

    @_dialog_on_error("Select a region")
    def _showRegion(self, param=None):
        return [self.regionSelector()]

    def rangeMask(self, motion: int, low: float, high: float) -> np.ndarray:
        """Mask ``(N,)`` of the particles whose coordinate ``motion`` lies in
        [low, high] (Å). Raises ValueError when the range holds no particle."""
        motion = self._checkMotion(motion)
        z = self.particleCoordinates()[1][:, motion - 1]
        mask = points_in_range(z, low, high)
        if not mask.any():
            raise ValueError(f"No particle has coordinate {motion} between {low:g} and {high:g} Å "
                             f"(the coordinates go from {z.min():.3g} to {z.max():.3g} Å).")
        return mask

    def createSubset(self, motion: int, low: float, high: float):
        """Register the particles whose coordinate ``motion`` lies in [low, high]
        as a new output ``subsetMotion<k>_<n>`` of the protocol; returns it.
        Raises ValueError (and creates nothing) when the range is empty."""
        mask = self.rangeMask(motion, low, high)
        return self.createSubsetFromMask(mask, prefix=f"subsetMotion{int(motion)}")[1]

    @_dialog_on_error("No subset created")
    def _createSubsetAction(self, param=None):
        motion = int(self._formValue("motion", 1))
        mask = self.rangeMask(motion, self._formValue("low", -1.0), self._formValue("high", 1.0))
        name, subset = self.createSubsetFromMask(mask, prefix=f"subsetMotion{motion}")
        return [self.infoMessage(f"{subset.getSize()} particles in the new output {name} of this run.",
                                 "Subset created")]

    def savePngs(self, folder) -> list:
        """Write ``coordinates.png`` and ``motion<k>.png`` for every motion (headless)."""
        n_motions = self._readOutputs()["motions"].shape[0]
        makers = [("coordinates", self.coordinatesPlotter)]
        makers += [(f"motion{k}", lambda k=k: self.motionPlotter(k)) for k in range(1, n_motions + 1)]
        return save_plotters(folder, makers)


__all__ = ["GsplatHeterogeneityViewer"]
