"""Viewer of GMM heterogeneity: coordinates, eigen-motions, maps along a motion, subsets.

Interactive plots in the GUI; :meth:`GsplatHeterogeneityViewer.savePngs` writes
the same figures headless. :meth:`createSubset` turns a region of coordinate
space (a range along one or two motions) into a new particle subset output of
the protocol, the "pick a region" step of the analysis.
"""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer

from ..core.heterogeneity import plots
from .figures import save_plotters
from ..protocols.protocol_gmm_heterogeneity import ProtGsplatGmmHeterogeneity


class GsplatHeterogeneityViewer(ProtocolViewer):
    """Histograms and hexbin of the particle coordinates, explained variance,
    an eigen-motion as arrows on the Gaussian model, the maps along a motion,
    and subsets of particles from a coordinate range."""
    _label = "viewer gmm heterogeneity"
    _targets = [ProtGsplatGmmHeterogeneity]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayCoordinates", params.LabelParam, label="Coordinates (histograms, hexbin)")
        form.addParam("motion", params.IntParam, default=1, label="Eigen-motion")
        form.addParam("displayMotion", params.LabelParam, label="Eigen-motion on the model (arrows)")
        form.addParam("displayMaps", params.LabelParam, label="Maps along the eigen-motion")
        form.addSection(label="Subset")
        form.addParam("low", params.FloatParam, default=-1.0, label="Coordinate from (Å)")
        form.addParam("high", params.FloatParam, default=1.0, label="Coordinate to (Å)")
        form.addParam("doSubset", params.LabelParam, label="Create the subset of particles in this range")

    def _getVisualizeDict(self):
        return {"displayCoordinates": self._showCoordinates, "displayMotion": self._showMotion,
                "displayMaps": self._showMaps, "doSubset": self._createSubsetAction}

    def _readOutputs(self) -> dict:
        return plots.read_outputs(self.protocol._getExtraPath())

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
        out = self._readOutputs()
        k = (motion or self.motion.get()) - 1
        plotter = EmPlotter(x=1, y=3, windowTitle=f"Eigen-motion {k + 1}", figsize=(14, 5))
        fig = plotter.getFigure()
        fig.set_layout_engine("constrained")
        axes = [fig.add_subplot(1, 3, j + 1) for j in range(3)]
        spread = 2.0 * float(out["coordinates"][:, k].std())
        plots.plot_motion_arrows(axes, out["model"], out["motions"][k], spread, fig=fig)
        return plotter

    def mapFiles(self, motion: int = None) -> list:
        """The map files along a motion, in order."""
        k = motion or self.motion.get()
        folder = self.protocol._getExtraPath()
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if f.startswith(f"motion{k:02d}_frame") and f.endswith(".mrc"))

    def _showCoordinates(self, param=None):
        return [self.coordinatesPlotter()]

    def _showMotion(self, param=None):
        return [self.motionPlotter()]

    def _showMaps(self, param=None):
        from pwem.viewers import DataView
        return [DataView(path) for path in self.mapFiles()]

    def createSubset(self, motion: int, low: float, high: float):
        """Register the particles whose coordinate ``motion`` lies in [low, high]
        as a new output ``subsetMotion<k>_<n>`` of the protocol; returns it."""
        from ..constants import ATTR_COORDINATE
        prot = self.protocol
        parts = prot.outputParticles
        attr = ATTR_COORDINATE.format(motion)
        n = sum(1 for name, _ in prot.iterOutputAttributes() if name.startswith(f"subsetMotion{motion}_")) + 1
        subset = prot._createSetOfParticles(suffix=f"_motion{motion}_{n}")
        subset.copyInfo(parts)
        for item in parts.iterItems():
            value = float(getattr(item, attr).get())
            if low <= value <= high:
                subset.append(item.clone())
        if subset.getSize() == 0:
            raise ValueError(f"no particle has coordinate {motion} between {low} and {high}")
        name = f"subsetMotion{motion}_{n}"
        prot._defineOutputs(**{name: subset})
        prot._defineSourceRelation(parts, subset)
        prot._store()
        return subset

    def _createSubsetAction(self, param=None):
        subset = self.createSubset(self.motion.get(), self.low.get(), self.high.get())
        self.infoMessage(f"{subset.getSize()} particles in the new subset.", "Subset created")
        return []

    def savePngs(self, folder) -> list:
        """Write ``coordinates.png`` and ``motion<k>.png`` for every motion (headless)."""
        n_motions = self._readOutputs()["motions"].shape[0]
        makers = [("coordinates", self.coordinatesPlotter)]
        makers += [(f"motion{k}", lambda k=k: self.motionPlotter(k)) for k in range(1, n_motions + 1)]
        return save_plotters(folder, makers)


__all__ = ["GsplatHeterogeneityViewer"]
