"""Viewer of the split-volume classification: directions, graph, classes, and a
threshold that becomes new classes.

Actions (form of the viewer):

* "PCA histogram per direction" — a live window (direction and threshold
  sliders, updated in place so a drag is followed; an "Apply" button that makes
  classes from the shown direction's threshold);
* "Direction graph" — the directions on a rotatable sphere, coloured by sign;
* "Class table", "FSC per class", "Class maps (slices)" — the run's classes;
* "Split coordinate histogram" and "Apply the threshold" — the threshold (on the
  split coordinate of every particle, or on one direction's PCA coordinate)
  becomes a new output ``thresholdClasses_<n>`` of the protocol: a
  SetOfClasses3D (class 1 below, class 2 at or above the threshold) with a map
  per class reconstructed from its particles.

Errors reach the user as dialogs. :meth:`GsplatSplitVolumeViewer.savePngs`
writes the direction and graph figures headless. The drawing is in
:mod:`scipion_gsplat.core.split_volume.plots` and ``class_plots``; the
threshold → classes logic in :mod:`scipion_gsplat.core.split_volume.threshold`.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer

from ..core.io import InputError
from ..core.split_volume import class_plots, plots, threshold as thr
from ..core.split_volume.files import read_classification
from ..protocols.protocol_split_volume import ProtGsplatSplitVolume

THRESHOLD_ON = ["split coordinate (all particles)", "one direction (its particles)"]
ON_COORDINATE, ON_DIRECTION = range(2)


class GsplatSplitVolumeViewer(ProtocolViewer):
    """Per-direction PCA histogram with the GMM and a movable threshold, the
    direction graph, the class table, FSC and maps, and new classes from a threshold."""
    _label = "viewer split volume"
    _targets = [ProtGsplatSplitVolume]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("splitLevel", params.IntParam, default=2, label="Split (2 = first split)",
                      help="Which split to show when more than two classes were made: 2 is the first split "
                           "(all particles in two), 3 the split of the largest class into the third class, "
                           "and so on.")
        form.addParam("displayDirections", params.LabelParam, label="PCA histogram per direction",
                      help="A window per split: the histogram of the particles' coordinate on the first "
                           "eigen-image of one projection direction, with the two-Gaussian fit; sliders "
                           "choose the direction and move the threshold; the images show the eigen-image, "
                           "the image at the threshold and the two sides. 'Apply' turns this direction's "
                           "threshold into classes (see the Threshold tab).")
        form.addParam("displayGraph", params.LabelParam, label="Direction graph",
                      help="The projection directions on a sphere, coloured by the side the max-cut gave "
                           "them, with the graph edges (rotatable).")
        form.addParam("displayClassTable", params.LabelParam, label="Class table",
                      help="Per class of the run: particles, mean probability of the assigned class, a "
                           "thumbnail (projection of the class map) and the resolution (FSC = 0.143 of the "
                           "class half maps).")
        form.addParam("displayFsc", params.LabelParam, label="FSC per class",
                      help="The FSC of each class's half maps (needs 'Half maps per class?' = Yes in the run).")
        form.addParam("displayMaps", params.LabelParam, label="Class maps (slices)",
                      help="The class maps in the volume viewer (orthogonal slices, one frame per class).")
        form.addSection(label="Threshold")
        form.addParam("thresholdOn", params.EnumParam, choices=THRESHOLD_ON, default=ON_COORDINATE,
                      display=params.EnumParam.DISPLAY_COMBO, label="Threshold on",
                      help="split coordinate: every particle of the split, by its split coordinate (its "
                           "per-direction coordinates with the signs the graph cut gave, averaged over its "
                           "directions; 0 = the graph's own split; in 3D-pooled runs the log-odds of class 1 "
                           "of the 3D refinement). Use it to keep only clear members of each class. "
                           "one direction: only the particles of one projection direction, by the coordinate "
                           "of the PCA histogram (a check of one view; its maps come from few views).")
        form.addParam("direction", params.IntParam, default=-1, label="Direction",
                      condition=f"thresholdOn == {ON_DIRECTION}",
                      help="Direction number as in the PCA histogram window; -1 = the most bimodal one.")
        form.addParam("threshold", params.FloatParam, default=0.0, label="Threshold",
                      help="Particles below go to class 1, at or above to class 2 (units of the coordinate "
                           "shown in the histogram windows).")
        form.addParam("displayCoordinate", params.LabelParam, label="Split coordinate histogram",
                      help="Histogram of the split coordinate of every particle with the threshold.")
        form.addParam("doApply", params.LabelParam, label="Apply the threshold (new classes)",
                      help="Make a new output thresholdClasses_<n> of this run: two 3D classes (below / at "
                           "or above the threshold) with a map each, reconstructed from their particles "
                           "(seconds for thousands of particles, minutes for a million).")

    def _getVisualizeDict(self):
        return {"displayDirections": self._showDirections, "displayGraph": self._showGraph,
                "displayClassTable": self._showClassTable, "displayFsc": self._showFsc,
                "displayMaps": self._showMaps, "displayCoordinate": self._showCoordinate,
                "doApply": self._applyAction}

    # ------------------------------------------------------------------ helpers
    def _extra(self) -> str:
        return self.protocol._getExtraPath()

    def _formValue(self, name: str, default):
        return getattr(self, name).get() if hasattr(self, name) else default

    def _level(self, level: int = None) -> int:
        """The split level asked for (the form's by default), checked against the run."""
        level = self._formValue("splitLevel", 2) if level is None else level
        levels = thr.available_levels(self._extra())
        if level not in levels:
            n = self.protocol.outputClasses.getSize() if getattr(self.protocol, "outputClasses", None) \
                else max(2, self.protocol.numberOfClasses.get())
            span = f"levels {min(levels)}..{max(levels)}" if levels else "no split finished yet"
            raise InputError(f"this run made {n} classes: {span}")
        return level

    def _folders(self, level: int = None):
        level = self._level(level)
        folder = thr.level_folder(self._extra(), level)
        cls_dir, graph_dir = os.path.join(folder, "classify"), os.path.join(folder, "graph")
        if not os.path.exists(os.path.join(cls_dir, "pairs.star")):
            raise InputError("this run has no per-direction classification (3D-pooled mode)")
        return cls_dir, graph_dir

    def _guard(self, action, title: str):
        """Run ``action()``; a user error or a failure becomes an error dialog."""
        try:
            return action()
        except (InputError, ValueError, OSError, RuntimeError) as exc:
            return [self.errorMessage(str(exc), title)]

    @staticmethod
    def _plotter(title: str, figsize):
        from pyworkflow.gui.plotter import Plotter
        plotter = Plotter(x=1, y=1, windowTitle=title, figsize=figsize)
        plotter.tightLayoutOn = False  # axes are placed by hand
        return plotter

    # ------------------------------------------------------------------ directions and graph
    def directionsPlotter(self, level: int = None, direction: int = None):
        """The live PCA-histogram window (its browser: ``getFigure().gsplat_browser``)."""
        cls_dir, _ = self._folders(level)
        level = self._level(level)
        plotter = self._plotter(f"Split volume: PCA histogram per direction, split {level}", (13, 6.5))

        def apply(d, t):
            for view in self._guard(lambda: self._applyViews(t, d, level), "Apply the threshold"):
                view.show()
        plots.interactive_direction_viewer(cls_dir, plotter.getFigure(), direction, on_apply=apply)
        return plotter

    def _showDirections(self, param=None):
        return self._guard(lambda: [self.directionsPlotter()], "PCA histogram per direction")

    def graphPlotter(self, level: int = None):
        cls_dir, graph_dir = self._folders(level)
        plotter = self._plotter(f"Split volume: direction graph, split {self._level(level)}", (7, 7))
        plots.draw_graph_into(plotter.getFigure(), cls_dir, graph_dir)
        return plotter

    def _showGraph(self, param=None):
        return self._guard(lambda: [self.graphPlotter()], "Direction graph")

    # ------------------------------------------------------------------ classes
    def _classRows(self) -> list:
        """:class:`class_plots.ClassRow` per class of ``outputClasses`` (map, FSC when kept)."""
        from ..constants import ATTR_CLASS_PROB
        from ..core.io import read_map, read_star_table
        from ..core.fsc import fsc_curve
        classes = getattr(self.protocol, "outputClasses", None)
        if classes is None:
            raise InputError("this run has no classes yet")
        rows = []
        for cls in classes.iterItems(orderBy="id"):
            probs = [float(getattr(p, ATTR_CLASS_PROB).get()) for p in cls.iterItems()
                     if getattr(p, ATTR_CLASS_PROB, None) is not None]
            row = class_plots.ClassRow(int(cls.getObjId()), int(cls.getSize()),
                                       float(np.mean(probs)) if probs else float("nan"))
            rep = cls.getRepresentative()
            path = rep.getFileName().split(":")[0] if rep is not None else ""
            if path and os.path.exists(path):
                row.volume, pix = read_map(path)
                root = path[:-len(".mrc")]
                if os.path.exists(root + "_fsc.star"):
                    table = read_star_table(root + "_fsc.star", "fsc")
                    row.fsc = (table["rlnResolution"].to_numpy(float),
                               table["rlnFourierShellCorrelation"].to_numpy(float))
                elif os.path.exists(root + "_half1.mrc") and os.path.exists(root + "_half2.mrc"):
                    row.fsc = fsc_curve(read_map(root + "_half1.mrc")[0], read_map(root + "_half2.mrc")[0], pix)
            rows.append(row)
        return rows

    def classTablePlotter(self):
        rows = self._classRows()
        plotter = self._plotter("Split volume: class table", (9, 1.2 + 1.6 * len(rows)))
        class_plots.draw_class_table(plotter.getFigure(), rows,
                                     f"{self.protocol.getRunName()}: {len(rows)} classes")
        return plotter

    def _showClassTable(self, param=None):
        return self._guard(lambda: [self.classTablePlotter()], "Class table")

    def fscPlotter(self):
        curves = {f"class {r.number}": r.fsc for r in self._classRows() if r.fsc is not None}
        if not curves:
            raise InputError("this run kept no half maps per class ('Half maps per class?' = No), so there "
                             "is no FSC per class: run it again with half maps")
        plotter = self._plotter("Split volume: FSC per class", (8, 5.5))
        plotter.tightLayoutOn = True
        class_plots.draw_fsc_curves(plotter.getFigure().add_subplot(111), curves)
        return plotter

    def _showFsc(self, param=None):
        return self._guard(lambda: [self.fscPlotter()], "FSC per class")

    def classMapViews(self) -> list:
        from .volume_view import volume_views
        classes = getattr(self.protocol, "outputClasses", None)
        if classes is None:
            raise InputError("this run has no classes yet")
        paths, labels = [], []
        for cls in classes.iterItems(orderBy="id"):
            rep = cls.getRepresentative()
            if rep is not None and os.path.exists(rep.getFileName().split(":")[0]):
                paths.append(rep.getFileName().split(":")[0])
                labels.append(f"class {cls.getObjId()}: {cls.getSize()} particles")
        if not paths:
            raise InputError("no class of this run has a map")
        return volume_views(paths, "Split volume: class maps", classes.getSamplingRate(), labels=labels)

    def _showMaps(self, param=None):
        return self._guard(self.classMapViews, "Class maps (slices)")

    # ------------------------------------------------------------------ threshold
    def _formThreshold(self) -> tuple:
        """``(threshold, direction or None)`` from the form."""
        t = float(self._formValue("threshold", 0.0))
        if self._formValue("thresholdOn", ON_COORDINATE) != ON_DIRECTION:
            return t, None
        d = int(self._formValue("direction", -1))
        if d < 0:
            cls_dir, _ = self._folders()
            d = int(np.argmax(read_classification(cls_dir)[0]["rlnGsplatBimodality"].to_numpy()))
        return t, d

    def thresholdSplit(self, threshold: float, direction: int = None, level: int = None):
        """The :class:`~scipion_gsplat.core.split_volume.threshold.ThresholdSplit` of a threshold."""
        level = self._level(level)
        if direction is None:
            return thr.coordinate_split(self._extra(), level, threshold)
        self._folders(level)
        return thr.direction_split(self._extra(), level, direction, threshold)

    def coordinatePlotter(self, level: int = None, threshold: float = None):
        level = self._level(level)
        t = float(self._formValue("threshold", 0.0)) if threshold is None else threshold
        split = thr.coordinate_split(self._extra(), level, t)
        plotter = self._plotter(f"Split volume: split coordinate, split {level}", (8, 5))
        plotter.tightLayoutOn = True
        ax = plotter.getFigure().add_subplot(111)
        plots.plot_histogram(ax, split.values, (), 0.0, ())
        ax.axvline(t, color="gold", lw=2.5)
        below, above = split.sizes()
        ax.set_title(f"{below} below | {above} at or above {t:.3g}")
        ax.set_xlabel(split.what)
        return plotter

    def _showCoordinate(self, param=None):
        return self._guard(lambda: [self.coordinatePlotter()], "Split coordinate histogram")

    def applyThreshold(self, threshold: float, direction: int = None, level: int = None):
        """Register the two classes of a threshold as ``thresholdClasses_<n>``.

        ``direction`` None: the split coordinate of every particle of the split;
        otherwise that direction's PCA coordinate. Returns ``(name, classes)``.
        Raises InputError (and registers nothing, writes nothing) when a class
        would be empty."""
        from ..programs import reconstruct_fourier
        prot = self.protocol
        level = self._level(level)
        split = self.thresholdSplit(threshold, direction, level)
        n_below, n_above = split.sizes()
        if n_below == 0 or n_above == 0:
            raise InputError(f"threshold {threshold:.4g} on the {split.what}: {n_below} particles below and "
                             f"{n_above} at or above; an empty class, no classes made")
        n = 1  # a number no output, folder or set file of an earlier (maybe deleted) output uses
        while (hasattr(prot, f"thresholdClasses_{n}") or os.path.exists(prot._getExtraPath(f"threshold_{n}"))
               or os.path.exists(prot._getPath(f"classes3D_threshold{n}.sqlite"))):
            n += 1
        name, folder = f"thresholdClasses_{n}", prot._getExtraPath(f"threshold_{n}")
        os.makedirs(folder, exist_ok=True)
        try:
            star = os.path.join(folder, "particles.star")
            thr.write_split_star(self._extra(), level, split, star)
            maps = {}
            for k, size in zip((thr.BELOW, thr.ABOVE), (n_below, n_above)):
                if size >= 2:
                    out = os.path.join(folder, f"class{k}.mrc")
                    args = ["-i", star, "-o", out, "--class", str(k), "--sym", prot.symmetryGroup.get(),
                            "--halves"]
                    if reconstruct_fourier.run(args + prot._commonArgs()) != 0:
                        raise RuntimeError(f"the map of class {k} could not be reconstructed (see the terminal)")
                    maps[k] = out
            classes = self._registerClasses(name, n, split, maps)
        except BaseException:  # nothing of a failed output stays behind
            shutil.rmtree(folder, ignore_errors=True)
            leftover = prot._getPath(f"classes3D_threshold{n}.sqlite")
            if not hasattr(prot, name) and os.path.exists(leftover):
                os.remove(leftover)
            raise
        return name, classes

    def _registerClasses(self, name: str, n: int, split, maps: dict):
        from pwem.objects import Volume
        from pyworkflow.object import Pointer
        prot = self.protocol
        parts = prot.outputParticles
        labels = dict(zip(split.image_ids.tolist(), split.labels.tolist()))
        names = {thr.BELOW: f"below {split.threshold:.4g}", thr.ABOVE: f"at or above {split.threshold:.4g}"}
        classes = prot._createSetOfClasses3D(parts, suffix=f"_threshold{n}")

        def update_item(item, row=None):
            k = labels.get(item.getObjId())
            if k is None:
                item._appendItem = False
            else:
                item.setClassId(k)

        def update_class(cls):
            k = cls.getObjId()
            cls.setObjLabel(names.get(k, ""))
            if k in maps:
                vol = Volume(location=maps[k])
                vol.setSamplingRate(parts.getSamplingRate())
                cls.setRepresentative(vol)

        classes.classifyItems(updateItemCallback=update_item, updateClassCallback=update_class)
        classes.setObjComment(f"threshold {split.threshold:.4g} on the {split.what}")
        prot._defineOutputs(**{name: classes})
        prot._defineSourceRelation(Pointer(prot, extended="outputParticles"), classes)
        prot._store()
        return classes

    def _applyViews(self, threshold: float, direction: int = None, level: int = None) -> list:
        name, classes = self.applyThreshold(threshold, direction, level)
        sizes = {c.getObjId(): c.getSize() for c in classes}
        text = (f"New output {name}: class 1 (below {threshold:.4g}): {sizes.get(1, 0)} particles; "
                f"class 2 (at or above): {sizes.get(2, 0)} particles.")
        return [self.infoMessage(text, "Threshold applied")]

    def _applyAction(self, param=None):
        return self._guard(lambda: self._applyViews(*self._formThreshold()), "Apply the threshold")

    # ------------------------------------------------------------------ headless
    def savePngs(self, folder, n_directions: int = 4, level: int = 2) -> list:
        """Headless: ``direction_graph.png`` and the most bimodal directions of a split."""
        cls_dir, graph_dir = self._folders(level)
        return plots.save_pngs(cls_dir, graph_dir, folder, n_directions)
