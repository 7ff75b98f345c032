"""Viewer of the Gaussian-splat reconstruction: FSC, loss, the model in three views.

Interactive plots in the GUI (matplotlib windows through Scipion's plotter);
:meth:`GsplatSplatViewer.savePngs` writes the same figures as PNG files
headless. The drawing itself is :mod:`scipion_gsplat.core.splat.plots`.
"""
from __future__ import annotations

import pyworkflow.protocol.params as params
from pwem.viewers.plotter import EmPlotter
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer

from ..core.splat import plots
from .figures import save_plotters
from ..protocols.protocol_reconstruct_splat import ProtGsplatReconstructSplat


class GsplatSplatViewer(ProtocolViewer):
    """FSC curve with the resolution at 0.143, loss per epoch, and the Gaussian
    centres coloured by amplitude seen along z, y and x."""
    _label = "viewer gaussian splat"
    _targets = [ProtGsplatReconstructSplat]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayFsc", params.LabelParam, label="FSC between the half maps")
        form.addParam("displayLoss", params.LabelParam, label="Loss per epoch")
        form.addParam("displayModel", params.LabelParam, label="Gaussian model (three views)")

    def _getVisualizeDict(self):
        return {"displayFsc": self._showFsc, "displayLoss": self._showLoss,
                "displayModel": self._showModel}

    # ------------------------------------------------------------------ data
    def _readOutputs(self) -> dict:
        return plots.read_outputs(self.protocol._getExtraPath())

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
        plotter = EmPlotter(x=1, y=3, windowTitle="Gaussian model", figsize=(14, 5))
        fig = plotter.getFigure()
        fig.set_layout_engine("constrained")
        axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
        plots.plot_model_views(axes, self._readOutputs()["model"], fig=fig)
        return plotter

    def _showFsc(self, param=None):
        return [self.fscPlotter()]

    def _showLoss(self, param=None):
        return [self.lossPlotter()]

    def _showModel(self, param=None):
        return [self.modelPlotter()]

    def savePngs(self, folder) -> list:
        """Write ``fsc.png``, ``loss.png`` and ``model.png`` into ``folder`` (headless)."""
        return save_plotters(folder, (("fsc", self.fscPlotter), ("loss", self.lossPlotter),
                                      ("model", self.modelPlotter)))
