"""The Gaussian-splat viewer in a real display: every action opens its window on
the first call, with no error dialog and nothing in the terminal.

Uses the finished runs of ``in_gui_project`` (Xvfb + TkAgg of ``gui_display``).
Screenshots are named after the action (``splat_<action>.png``) and also kept
under ``GSPLAT_GUI_SHOTS`` when set.
"""
from __future__ import annotations


import numpy as np
import pytest

from gui_support import (DialogRecorder, assert_not_blank, close_all, figure_titles, keep_shot, open_one_window,
                         pump, screenshot)

#: viewer action → the start of the title of the window it opens
ACTIONS = {
    "displayFsc": "GSFSC",
    "displayLoss": "Loss",
    "displayModel": "Gaussian model",
    "displayMap": "Gaussian splat map",
    "displayModelMap": "Gaussian model rendered as a map",
}


def _viewer(project, prot):
    from scipion_gsplat.viewers import GsplatSplatViewer
    viewer = GsplatSplatViewer(project=project, protocol=prot)
    viewer.setProtocol(prot)
    return viewer


@pytest.mark.parametrize("action", list(ACTIONS))
def test_splat_action_opens_on_first_click(gui_display, in_gui_project, action, tmp_path, capfd):
    prot = in_gui_project["splat"]
    viewer = _viewer(in_gui_project["project"], prot)
    close_all()
    capfd.readouterr()
    title, fig = open_one_window(viewer, action)
    assert title.startswith(ACTIONS[action]), title
    if action == "displayFsc":  # threshold line, its label and the resolution where the curve crosses it
        ax = fig.axes[0]
        texts = [t.get_text() for t in ax.texts]
        assert "FSC = 0.143" in texts and any(t.endswith(" Å") for t in texts)
        assert any(np.allclose(line.get_ydata(), 0.143) for line in ax.lines)
        assert "Å at 0.143" in ax.get_legend().get_texts()[0].get_text()
    if action == "displayMap":  # map and both half maps as frames of one window
        browser = fig._gsplat_slices
        assert browser.n_frames == 3 and browser.frame_slider is not None
        assert browser.pixel_size_A == pytest.approx(2.0)
    if action == "displayModelMap":  # the model's map with the Gaussian centres near each plane
        browser = fig._gsplat_slices
        assert browser.n_frames == 3
        assert sum(len(m.get_xdata()) for m in browser.markers) > 0
    shot = screenshot(tmp_path / f"splat_{action}.png", title)
    assert_not_blank(shot)
    keep_shot(shot, f"splat_{action}.png")
    out = capfd.readouterr()
    for word in ("Traceback", "RuntimeError", "Exception"):
        assert word not in out.err and word not in out.out, out.err[-2000:]
    close_all()


def test_splat_viewer_errors_are_dialogs(gui_display, in_gui_project, capfd):
    """A run that has not produced its files yet: every action answers with an
    error dialog that says so, and no window and no traceback."""
    from scipion_gsplat.protocols import ProtGsplatReconstructSplat
    project = in_gui_project["project"]
    prot = project.newProtocol(ProtGsplatReconstructSplat)
    prot.setObjLabel("splat not run")
    project.saveProtocol(prot)
    viewer = _viewer(project, prot)
    assert not viewer._definition.evalParamCondition("volumeViewer")  # no ChimeraX here: no choice shown
    close_all()
    capfd.readouterr()
    with DialogRecorder() as rec:
        for action in ACTIONS:
            viewer._visualizeParam(action)
        pump(0.3)
    assert figure_titles() == [] and rec.exceptions == []
    assert rec.kinds() == ["error"] * len(ACTIONS), rec.messages
    assert all("has not finished" in text for _, _, text in rec.messages)
    out = capfd.readouterr()
    assert "Traceback" not in out.err + out.out
