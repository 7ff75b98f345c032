"""Viewer of the Gaussian-splat reconstruction: FSC, loss, the model, the maps.

Interactive plots in the GUI (matplotlib windows through Scipion's plotter);
:meth:`GsplatSplatViewer.savePngs` writes the same figures as PNG files
headless. The drawing itself is :mod:`scipion_gsplat.core.splat.plots`; maps
open in :func:`scipion_gsplat.viewers.volume_view.volume_views` (our slices
window, or ChimeraX where it is installed and chosen).
"""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer

from ..core.io import InputError
from ..core.splat import plots
from .figures import constrained_plotter, save_plotters
from .volume_view import chimerax_available, volume_views
from ..protocols.protocol_reconstruct_splat import ProtGsplatReconstructSplat

VIEWER_SLICES, VIEWER_CHIMERAX = 0, 1


class GsplatSplatViewer(ProtocolViewer):
    """FSC curve with the resolution at 0.143, loss per epoch, the Gaussian
    centres coloured by amplitude seen along z, y and x, and the map, half maps
    and the model rendered as a map in the volume viewer."""
    _label = "viewer gaussian splat"
    _targets = [ProtGsplatReconstructSplat]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("volumeViewer", params.EnumParam, choices=["slices", "ChimeraX"], default=VIEWER_SLICES,
                      display=params.EnumParam.DISPLAY_HLIST, condition=str(chimerax_available()),
                      label="Volume viewer",
                      help="How the map actions below show volumes: 'slices' opens the three central "
                           "orthogonal slices (z, y, x) with sliders for the map, the plane position and "
                           "the contrast; 'ChimeraX' opens the maps in ChimeraX (scipion-em-chimera). "
                           "Shown only where ChimeraX is installed.")
        form.addParam("displayFsc", params.LabelParam, label="FSC between the half maps",
                      help="Gold-standard FSC of the two independently fitted half maps, with the 0.143 "
                           "threshold and the resolution where the curve crosses it (Å).")
        form.addParam("displayLoss", params.LabelParam, label="Loss per epoch",
                      help="Fit residual relative to the data variance after each pass over the "
                           "particles, per half set: a flat end means the fit has converged.")
        form.addParam("displayModel", params.LabelParam, label="Gaussian model (three views)",
                      help="The Gaussian centres seen along z, y and x, coloured by amplitude; marker "
                           "area grows with the width of each Gaussian.")
        form.addParam("displayMap", params.LabelParam, label="Map (slices; half maps as frames)",
                      help="The output map (map.mrc) and, from a run with half sets, the two half maps "
                           "as further frames of the volume viewer.")
        form.addParam("displayModelMap", params.LabelParam, label="Gaussian model rendered as a map",
                      help="The Gaussian model sampled on the map grid (full model, then each half "
                           "model), with the centres of the Gaussians near each plane marked; in "
                           "ChimeraX the map with the model's pseudo-atoms (model.pdb).")

    def _getVisualizeDict(self):
        return {"displayFsc": self._showFsc, "displayLoss": self._showLoss,
                "displayModel": self._showModel, "displayMap": self._showMap,
                "displayModelMap": self._showModelMap}

    # ------------------------------------------------------------------ data
    def _readOutputs(self) -> dict:
        return plots.read_outputs(self.protocol._getExtraPath())

    def _extra(self, name: str) -> str:
        return self.protocol._getExtraPath(name)

    def _problem(self, *names) -> str:
        """Why the files ``names`` of the run's extra folder cannot be shown
        (unfinished run, missing files), or '' when they can."""
        missing = [n for n in names if not os.path.exists(self._extra(n))]
        if not missing:
            return ""
        if not self.protocol.isFinished():
            return (f"The run '{self.protocol.getObjLabel()}' has not finished "
                    f"(status: {self.protocol.getStatusMessage()}): {', '.join(missing)} not written yet.")
        return f"Missing in {self.protocol._getExtraPath()}: {', '.join(missing)}."

    def _useChimerax(self) -> bool:
        return self.volumeViewer.get() == VIEWER_CHIMERAX

    # ------------------------------------------------------------------ figures
    def fscPlotter(self) -> EmPlotter:
        out = self._readOutputs()
        plotter = EmPlotter(x=1, y=1, windowTitle="GSFSC", figsize=(7, 5))
        ax = plotter.getFigure().add_subplot(111)
        if out["curves"] is None:
            ax.text(0.5, 0.5, "no half sets: no FSC", ha="center", va="center", transform=ax.transAxes)
        else:
            plots.plot_fsc(ax, out["frequency"], out["curves"])
        return plotter

    def lossPlotter(self) -> EmPlotter:
        plotter = EmPlotter(x=1, y=1, windowTitle="Loss", figsize=(7, 5))
        plots.plot_loss(plotter.getFigure().add_subplot(111), self._readOutputs()["histories"])
        return plotter

    def modelPlotter(self) -> EmPlotter:
        plotter = constrained_plotter(x=1, y=3, windowTitle="Gaussian model", figsize=(14, 5))
        fig = plotter.getFigure()
        axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
        plots.plot_model_views(axes, self._readOutputs()["model"], fig=fig)
        return plotter

    # ------------------------------------------------------------------ actions
    def _figure(self, make, *needed):
        problem = self._problem(*needed)
        if problem:
            return [self.errorMessage(problem, "Gaussian splat")]
        try:
            return [make()]
        except (OSError, InputError) as exc:
            return [self.errorMessage(f"Cannot read the run's results: {exc}", "Gaussian splat")]

    def _showFsc(self, param=None):
        problem = self._problem("model.npz")
        if not problem and not os.path.exists(self._extra("fsc.star")):
            return [self.infoMessage("This run fitted all particles together (no independent half sets): "
                                     "there is no FSC. Run with 'Independent half sets?' = Yes for a "
                                     "gold-standard FSC.", "FSC between the half maps")]
        return self._figure(self.fscPlotter, "model.npz", "fsc.star")

    def _showLoss(self, param=None):
        return self._figure(self.lossPlotter, "model.npz")

    def _showModel(self, param=None):
        return self._figure(self.modelPlotter, "model.npz")

    def _mapFiles(self) -> list:
        """``(label, file)`` of the map and, when written, the half maps."""
        files = [("map", "map.mrc")] + [(f"half map {k}", f"map_half{k}.mrc") for k in (1, 2)]
        return [(label, name) for label, name in files if os.path.exists(self._extra(name))]

    def _showMap(self, param=None):
        problem = self._problem("map.mrc")
        if problem:
            return [self.errorMessage(problem, "Map")]
        files = self._mapFiles()
        return volume_views([self._extra(n) for _, n in files], f"Gaussian splat map: {self.protocol.getObjLabel()}",
                            use_chimerax=self._useChimerax(), labels=[f"{lab} ({n})" for lab, n in files])

    def _showModelMap(self, param=None):
        from ..core.splat.model import GaussianModel
        problem = self._problem("model.npz")
        if problem:
            return [self.errorMessage(problem, "Gaussian model rendered as a map")]
        title = f"Gaussian model rendered as a map: {self.protocol.getObjLabel()}"
        try:
            frames = self._modelMaps()
            if self._useChimerax():
                structure = self.protocol._modelStructurePath()
                extra = [structure] if os.path.exists(structure) else []
                return volume_views([frames[0][1]] + extra, title, use_chimerax=True)
            points = [GaussianModel.load(model).centres_A for _, _, model in frames]
        except (OSError, InputError) as exc:
            return [self.errorMessage(f"Cannot read the Gaussian model: {exc}", "Gaussian model rendered as a map")]
        return volume_views([m for _, m, _ in frames], title, labels=[lab for lab, _, _ in frames],
                            points_A=points)

    def _modelMaps(self) -> list:
        """``(label, map file, model file)`` for the full model and each half
        model. The run's maps are the models sampled on the map grid
        (``GaussianModel.to_map``); a model whose map is missing is rendered
        into the run's tmp folder on the grid of the output map (or of the
        particles)."""
        frames = [("full model", "map.mrc", "model.npz")] + [
            (f"half {k} model", f"map_half{k}.mrc", f"model_half{k}.npz") for k in (1, 2)]
        out = []
        for label, map_name, model_name in frames:
            model = self._extra(model_name)
            if not os.path.exists(model):
                continue
            path = self._extra(map_name)
            if not os.path.exists(path):
                path = self._renderModel(model, map_name)
            out.append((f"{label} ({os.path.basename(path)}; circles: Gaussian centres)", path, model))
        return out

    def _renderModel(self, model_path: str, map_name: str) -> str:
        from ..core.io import read_map, write_map
        from ..core.splat.model import GaussianModel
        if os.path.exists(self._extra("map.mrc")):
            vol, pix = read_map(self._extra("map.mrc"))
            box = vol.shape[0]
        else:
            parts = self.protocol.inputParticles.get()
            box, pix = parts.getXDim(), parts.getSamplingRate()
        os.makedirs(self.protocol._getTmpPath(), exist_ok=True)
        path = self.protocol._getTmpPath("rendered_" + map_name)
        write_map(path, GaussianModel.load(model_path).to_map(box, pix), pix)
        return path

    def savePngs(self, folder) -> list:
        """Write ``fsc.png``, ``loss.png`` and ``model.png`` into ``folder`` (headless)."""
        return save_plotters(folder, (("fsc", self.fscPlotter), ("loss", self.lossPlotter),
                                      ("model", self.modelPlotter)))
