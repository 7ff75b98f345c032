"""Viewer of the split-volume classification: PCA histograms and the direction graph.

In the GUI the direction view has sliders (direction, threshold) and the graph
is a rotatable 3D plot; :meth:`GsplatSplitVolumeViewer.savePngs` writes the same
figures headless. The drawing is :mod:`scipion_gsplat.core.split_volume.plots`.
"""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer

from ..core.split_volume import plots
from ..protocols.protocol_split_volume import ProtGsplatSplitVolume


class GsplatSplitVolumeViewer(ProtocolViewer):
    """Per-direction PCA histogram with the GMM and a movable threshold (plus the
    eigen-image, the image at the threshold and the two side averages), and the
    direction graph on a sphere coloured by sign."""
    _label = "viewer split volume"
    _targets = [ProtGsplatSplitVolume]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("splitLevel", params.IntParam, default=2, label="Split (2 = first split)",
                      help="Which split to show when more than two classes were made.")
        form.addParam("displayDirections", params.LabelParam, label="PCA histogram per direction")
        form.addParam("displayGraph", params.LabelParam, label="Direction graph")

    def _getVisualizeDict(self):
        return {"displayDirections": self._showDirections, "displayGraph": self._showGraph}

    def _folders(self, level: int = None):
        if level is None:  # the form's value in the GUI, the first split otherwise
            level = self.splitLevel.get() if hasattr(self, "splitLevel") else 2
        level = self.protocol._getExtraPath(f"level{level}")
        cls_dir, graph_dir = os.path.join(level, "classify"), os.path.join(level, "graph")
        if not os.path.exists(os.path.join(cls_dir, "pairs.star")):
            raise FileNotFoundError("this run has no per-direction classification (3D-pooled mode)")
        return cls_dir, graph_dir

    def _showDirections(self, param=None):
        try:
            cls_dir, _ = self._folders()
        except FileNotFoundError as exc:
            return [self.errorMessage(str(exc))]
        fig = plots.interactive_direction_viewer(cls_dir)
        fig.show()
        return []

    def _showGraph(self, param=None):
        try:
            cls_dir, graph_dir = self._folders()
        except FileNotFoundError as exc:
            return [self.errorMessage(str(exc))]
        plots.graph_figure(cls_dir, graph_dir).show()
        return []

    def savePngs(self, folder, n_directions: int = 4, level: int = 2) -> list:
        """Headless: ``direction_graph.png`` and the most bimodal directions of a split."""
        cls_dir, graph_dir = self._folders(level)
        return plots.save_pngs(cls_dir, graph_dir, folder, n_directions)
