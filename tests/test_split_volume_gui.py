"""Split-volume viewer in a real display (Xvfb, TkAgg): every action opens its
window, a drag on the threshold slider is followed, a threshold becomes a
SetOfClasses3D output, errors are dialogs.

Screenshots go to the test's tmp folder and, when ``GSPLAT_GUI_SHOTS`` is set,
also there (named ``split_<action>.png``).
"""
import os

import numpy as np
import pytest

from gui_support import DialogRecorder, assert_not_blank, close_all, figure_titles, keep_shot, mouse, pump, screenshot

ACTIONS = ["displayDirections", "displayGraph", "displayClassTable", "displayFsc", "displayMaps",
           "displayCoordinate"]


@pytest.fixture
def viewer(gui_display, in_gui_project):
    from scipion_gsplat.viewers.viewer_split_volume import GsplatSplitVolumeViewer
    prot = in_gui_project["split"]
    view = GsplatSplitVolumeViewer(project=in_gui_project["project"], protocol=prot)
    view.setProtocol(prot)  # what the viewer form does: creates the form's values
    yield view
    close_all()


def _shot(tmp_path, name, title):
    path = screenshot(tmp_path / f"split_{name}.png", title)
    keep_shot(path)
    return assert_not_blank(path)


def _threshold_outputs(viewer) -> set:
    """Names of the thresholdClasses_<n> outputs of the run, from a fresh load of
    the project database (what Scipion shows after a refresh)."""
    from pyworkflow.project import Manager
    again = Manager().loadProject(viewer.getProject().getShortName()).getProtocol(viewer.protocol.getObjId())
    return {name for name, _ in again.iterOutputAttributes() if name.startswith("thresholdClasses_")}


def _pairs(prot, level=2):
    from scipion_gsplat.core.io import read_star_table
    return read_star_table(prot._getExtraPath(f"level{level}", "classify", "pairs.star"), "pairs")


def _browser():
    import matplotlib.pyplot as plt
    for num in plt.get_fignums():
        fig = plt.figure(num)
        if hasattr(fig, "gsplat_browser"):
            return fig, fig.gsplat_browser
    raise AssertionError("no PCA histogram window")


def _mouse(canvas, name, x, y):
    mouse(canvas, name, x, y)


@pytest.mark.parametrize("action", ACTIONS)
def test_each_action_opens_its_window(viewer, action, tmp_path, capfd):
    before = len(figure_titles())
    with DialogRecorder() as rec:
        viewer._visualizeParam(action)
        pump(0.5)
    titles = figure_titles()
    assert len(titles) == before + 1, (action, titles, rec.messages)
    assert rec.messages == [] and rec.exceptions == []
    stats = _shot(tmp_path, action, titles[-1])
    assert stats["width"] >= 600
    assert "Traceback" not in capfd.readouterr().err


def test_drag_threshold_slider(viewer, capfd):
    with DialogRecorder() as rec:
        viewer._visualizeParam("displayDirections")
        pump(0.5)
        fig, browser = _browser()
        slider = browser.thr_slider
        d = browser.direction
        start = slider.val
        target = slider.valmin + 0.8 * (slider.valmax - slider.valmin)
        assert abs(target - start) > 1e-3
        to_px = slider.ax.transData.transform
        _mouse(fig.canvas, "button_press_event", *to_px((start, 0.5)))  # on the knob
        for f in (0.25, 0.5, 0.75, 1.0):
            _mouse(fig.canvas, "motion_notify_event", *to_px((start + f * (target - start), 0.5)))
            pump(0.05)
        _mouse(fig.canvas, "button_release_event", *to_px((target, 0.5)))
        pump(0.2)
    assert rec.messages == [] and rec.exceptions == []
    assert browser.thr_slider is slider and browser.direction == d
    assert slider.val == pytest.approx(target, abs=1e-6)
    assert browser.threshold == pytest.approx(target, abs=1e-6)
    assert browser.line.get_xdata()[0] == pytest.approx(target, abs=1e-6)
    # the side images follow: mean + (mean coordinate of each side) · eigen-image
    import mrcfile
    pairs = _pairs(viewer.protocol)
    rho = pairs["rlnGsplatCoordinate"].to_numpy(float)[pairs["rlnGsplatDirection"].to_numpy(int) == d]
    cls_dir = viewer.protocol._getExtraPath("level2", "classify")
    eig = mrcfile.read(os.path.join(cls_dir, "eigen_images.mrcs"))[d].astype(float)
    mean = mrcfile.read(os.path.join(cls_dir, "mean_images.mrcs"))[d].astype(float)
    below, above = rho[rho < target], rho[rho >= target]
    assert len(below) and len(above)
    np.testing.assert_allclose(browser.images["below"].get_array(), mean + below.mean() * eig, atol=1e-4)
    np.testing.assert_allclose(browser.images["above"].get_array(), mean + above.mean() * eig, atol=1e-4)
    assert f"{len(below)} below | {len(above)} above" in browser.ax_hist.get_title()
    assert "Traceback" not in capfd.readouterr().err


def test_apply_threshold_registers_classes(viewer, tmp_path, capfd):
    """Apply button of the window (one direction), then the form (split coordinate)."""
    from scipion_gsplat.core.io import read_particles
    prot = viewer.protocol
    before = _threshold_outputs(viewer)  # other GUI tests of the session may have applied some
    with DialogRecorder() as rec:
        viewer._visualizeParam("displayDirections")
        pump(0.5)
        fig, browser = _browser()
        browser.dir_slider.set_val(browser.direction)  # stays; the most bimodal direction
        lo, hi = browser.thr_slider.valmin, browser.thr_slider.valmax
        browser.thr_slider.set_val(lo + 0.6 * (hi - lo))
        d, t = browser.direction, browser.threshold
        x, y = browser.apply_button.ax.transAxes.transform((0.5, 0.5))
        _mouse(fig.canvas, "button_press_event", x, y)
        _mouse(fig.canvas, "button_release_event", x, y)
        pump(0.3)
    assert rec.exceptions == [] and [m[0] for m in rec.messages] == ["info"], rec.messages
    pairs = _pairs(prot)
    rho = pairs["rlnGsplatCoordinate"].to_numpy(float)[pairs["rlnGsplatDirection"].to_numpy(int) == d]
    n_below, n_above = int((rho < t).sum()), int((rho >= t).sum())
    assert n_below > 0 and n_above > 0
    first = _threshold_outputs(viewer) - before
    assert len(first) == 1
    classes = getattr(prot, first.pop())
    sizes = {c.getObjId(): c.getSize() for c in classes}
    assert sizes == {1: n_below, 2: n_above}
    assert f"{n_below} particles" in rec.messages[0][2] and f"{n_above} particles" in rec.messages[0][2]
    for cls in classes:
        assert os.path.exists(cls.getRepresentative().getFileName())
    # the same through the form, on the split coordinate of every particle
    viewer.thresholdOn.set(0)
    viewer.threshold.set(0.3)
    with DialogRecorder() as rec:
        viewer._visualizeParam("doApply")
    assert [m[0] for m in rec.messages] == ["info"], rec.messages
    score = read_particles(prot._getExtraPath("level2", "graph", "particles.star")).column("rlnGsplatScore")
    names = _threshold_outputs(viewer) - before  # read from a fresh load of the project database
    assert len(names) == 2
    second = max(names, key=lambda name: int(name.split("_")[-1]))
    sizes = {c.getObjId(): c.getSize() for c in getattr(prot, second)}
    assert sizes == {1: int((score < 0.3).sum()), 2: int((score >= 0.3).sum())}
    assert "Traceback" not in capfd.readouterr().err


def test_empty_threshold_is_an_error_and_makes_nothing(viewer, capfd):
    prot = viewer.protocol
    outputs = [name for name, _ in prot.iterOutputAttributes()]
    files = sorted(os.listdir(prot._getPath())) + sorted(os.listdir(prot._getExtraPath()))
    viewer.thresholdOn.set(1)
    viewer.direction.set(-1)
    viewer.threshold.set(1e6)
    with DialogRecorder() as rec:
        viewer._visualizeParam("doApply")
    assert [m[0] for m in rec.messages] == ["error"]
    assert "empty class" in rec.messages[0][2]
    assert [name for name, _ in prot.iterOutputAttributes()] == outputs
    assert sorted(os.listdir(prot._getPath())) + sorted(os.listdir(prot._getExtraPath())) == files
    assert "Traceback" not in capfd.readouterr().err


def test_missing_level_says_how_many_classes(viewer, capfd):
    viewer.splitLevel.set(3)
    for action in ("displayDirections", "displayGraph", "doApply"):
        with DialogRecorder() as rec:
            viewer._visualizeParam(action)
        assert rec.messages == [("error", rec.messages[0][1], "this run made 2 classes: levels 2..2")], action
    assert figure_titles() == []
    assert "Traceback" not in capfd.readouterr().err
