"""The GMM heterogeneity viewer in a real display (Xvfb + TkAgg): every action
opens its window on the first call; a lasso and a rectangle drawn with mouse
events select exactly the particles inside them, with the count in the title;
"Create subset" and "Reconstruct this region" register outputs of that size;
an empty selection is an error dialog that leaves nothing behind.

Uses the finished heterogeneity run of ``in_gui_project`` (1000 particles, 40 px,
2 motions). Screenshots are named ``het_<action>.png`` and also kept under
``GSPLAT_GUI_SHOTS`` when set.
"""
from __future__ import annotations

import glob
import math
import os
import time

import numpy as np
import pytest
from matplotlib.path import Path

from gui_support import (DialogRecorder, assert_not_blank, close_all, figure_titles, keep_shot, mouse,
                         open_one_window, pump, screenshot)

#: action → start of the title of the window it opens
ACTIONS = {
    "displayCoordinates": "Coordinates",
    "displayMotion": "Eigen-motion 1",
    "displayMaps": "Maps along eigen-motion 1",
    "displayRegion": "Select a region",
}


def _shot(tmp_path, name: str, title: str):
    path = screenshot(tmp_path / name, title)
    assert_not_blank(path)
    keep_shot(path, name)
    return path


def _viewer(project, prot):
    from scipion_gsplat.viewers import GsplatHeterogeneityViewer
    viewer = GsplatHeterogeneityViewer(project=project, protocol=prot)
    viewer.setProtocol(prot)
    return viewer


def _figure(prefix: str):
    import matplotlib.pyplot as plt
    found = [plt.figure(n) for n in plt.get_fignums()
             if plt.figure(n).canvas.manager.get_window_title().startswith(prefix)]
    assert found, f"no figure titled {prefix!r}*: {figure_titles()}"
    return found[-1]


def _particle_coordinates(prot) -> tuple:
    """Ids and (coordinate 1, coordinate 2) of the output particles, read from the
    Scipion set (not from the files the viewer uses)."""
    from scipion_gsplat.constants import ATTR_COORDINATE
    ids, xy = [], []
    for p in prot.outputParticles:
        ids.append(p.getObjId())
        xy.append([float(getattr(p, ATTR_COORDINATE.format(k)).get()) for k in (1, 2)])
    return np.array(ids), np.array(xy)


def _mouse(canvas, name: str, xy_px, button=1):
    mouse(canvas, name, xy_px[0], xy_px[1], button)
    pump(0.01)


def _click_button(selector, label: str):
    ax = selector.actionButtons[label].ax
    centre = ax.transAxes.transform((0.5, 0.5))
    _mouse(selector.getCanvas(), "button_press_event", centre)
    _mouse(selector.getCanvas(), "button_release_event", centre)
    pump(0.5)


def _drag(selector, path_px):
    """Press at the first pixel, move through the others, release at the last."""
    canvas = selector.getCanvas()
    _mouse(canvas, "button_press_event", path_px[0])
    for p in path_px[1:]:
        _mouse(canvas, "motion_notify_event", p)
    _mouse(canvas, "button_release_event", path_px[-1])
    pump(0.3)


def _along_edges(vertices_px):
    """Integer pixels along each edge of the closed polygon (exactly on the
    straight edges: steps of (dx, dy)/gcd), from the first vertex back to it."""
    pts = []
    for p, q in zip(vertices_px, vertices_px[1:] + vertices_px[:1]):
        d = (q[0] - p[0], q[1] - p[1])
        g = max(math.gcd(abs(d[0]), abs(d[1])), 1)
        pts += [(p[0] + k * d[0] // g, p[1] + k * d[1] // g) for k in range(g)]
    return pts + [vertices_px[0]]


def _open_selector(viewer):
    with DialogRecorder() as rec:
        viewer._visualizeParam("displayRegion")
        pump(0.8)
    assert rec.messages == [] and rec.exceptions == []
    fig = _figure("Select a region")
    fig.canvas.draw()
    return fig._gsplat_selector


def _outputs(project, prot, prefix: str) -> dict:
    """The outputs ``<prefix>*`` of ``prot`` as stored in the project database
    (read through a freshly loaded project: ``project.getProtocol`` may return
    an object cached before the viewer added the output)."""
    import pyworkflow as pw
    from pyworkflow.project import Project
    fresh = Project(pw.Config.getDomain(), project.path)
    fresh.load()
    return {name: obj for name, obj in fresh.getProtocol(prot.getObjId()).iterOutputAttributes()
            if name.startswith(prefix)}


def test_points_in_polygon_and_rectangle_match_matplotlib():
    from scipion_gsplat.core.heterogeneity.selection import (coordinate_plane, points_in_polygon,
                                                             points_in_rectangle)
    rng = np.random.default_rng(5)
    xy = rng.normal(size=(20000, 2))
    angle = np.linspace(0, 2 * np.pi, 157, endpoint=False)  # a concave star-like lasso
    lasso = np.c_[np.cos(angle) * (1 + 0.4 * np.sin(5 * angle)), np.sin(angle) * (1 + 0.4 * np.sin(5 * angle))]
    inside = points_in_polygon(xy, lasso)
    assert 4000 < inside.sum() < 16000
    assert np.array_equal(inside, Path(lasso).contains_points(xy))
    assert not points_in_polygon(xy, [[0, 0], [1, 1], [0, 0]]).any()  # a click, no region
    rect = points_in_rectangle(xy, (0.5, 1.0), (-0.2, -0.3))  # corners in any order
    assert np.array_equal(rect, (xy[:, 0] >= -0.2) & (xy[:, 0] <= 0.5) & (xy[:, 1] >= -0.3) & (xy[:, 1] <= 1.0))
    z = rng.normal(size=(10, 3))
    assert np.array_equal(coordinate_plane(z, (3, 1)), z[:, [2, 0]])
    with pytest.raises(ValueError, match="motion 4 does not exist"):
        coordinate_plane(z, (1, 4))


@pytest.mark.parametrize("action", list(ACTIONS))
def test_het_action_opens_on_first_click(gui_display, in_gui_project, action, tmp_path, capfd):
    viewer = _viewer(in_gui_project["project"], in_gui_project["het"])
    close_all()
    capfd.readouterr()
    title, fig = open_one_window(viewer, action)
    assert title.startswith(ACTIONS[action]), title
    if action == "displayMaps":  # the three frames along motion 1 in one window with a frame slider
        browser = fig._gsplat_slices
        assert browser.n_frames == 3 and browser.frame_slider is not None
        assert browser.labels[0].startswith("coordinate -") and browser.labels[2].startswith("coordinate +")
        assert sum(len(m.get_xdata()) for m in browser.markers) > 0  # the trajectory frame's Gaussians
    if action == "displayMotion":  # arrows drawn on the three views
        assert sum(len(ax.collections) for ax in fig.axes) >= 3
    if action == "displayRegion":
        assert fig._gsplat_selector.countText() == "0 of 1000 particles selected (0.0 %)"
    _shot(tmp_path, f"het_{action}.png", title)
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err and "Error" not in out.err, out
    close_all()


def test_lasso_selects_the_polygon_and_creates_that_subset(gui_display, in_gui_project, tmp_path, capfd):
    project, prot = in_gui_project["project"], in_gui_project["het"]
    viewer = _viewer(project, prot)
    close_all()
    capfd.readouterr()
    selector = _open_selector(viewer)
    ids, xy = _particle_coordinates(prot)
    ax = selector.ax
    # a concave hexagon around the centre of the cloud, in whole display pixels
    (x0, y0), (x1, y1) = ax.transData.transform(np.percentile(xy, [10, 90], axis=0))
    cx, cy, wx, wy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    shape = [(-1.0, -0.8), (0.2, -1.0), (1.0, -0.3), (0.3, 0.1), (0.8, 0.9), (-0.6, 0.7)]
    verts_px = [(int(round(cx + a * wx)), int(round(cy + b * wy))) for a, b in shape]
    polygon = ax.transData.inverted().transform(np.array(verts_px, float))
    expected = set(ids[Path(polygon).contains_points(xy)])
    assert 100 < len(expected) < 900

    _drag(selector, _along_edges(verts_px))
    row_ids = viewer.particleCoordinates()[0]
    assert set(row_ids[selector.mask]) == expected
    assert ax.get_title() == selector.countText()
    assert ax.get_title().startswith(f"{len(expected)} of 1000 particles selected")
    assert len(selector._selected.get_offsets()) == len(expected)  # highlighted
    _shot(tmp_path, "het_lasso.png", "Select a region")

    before = set(_outputs(project, prot, "subsetRegion"))
    with DialogRecorder() as rec:
        _click_button(selector, "Create subset")
    assert rec.exceptions == [] and rec.kinds() == ["info"], rec.messages
    assert f"{len(expected)} particles" in rec.messages[0][2]
    new = {k: v for k, v in _outputs(project, prot, "subsetRegion").items() if k not in before}
    assert len(new) == 1
    subset = next(iter(new.values()))
    assert subset.getSize() == len(expected)
    assert {p.getObjId() for p in subset} == expected
    # another plane (y: motion 1) through its radio button: same selection, new axes
    label = next(t for t in selector.yButtons.labels if t.get_text() == "1")
    centre = label.get_window_extent().get_points().mean(axis=0)
    _mouse(selector.getCanvas(), "button_press_event", centre)
    _mouse(selector.getCanvas(), "button_release_event", centre)
    assert selector.motions == (1, 1) and selector.ax.get_ylabel() == "coordinate 1 (Å)"
    assert selector.ax.get_title().startswith(f"{len(expected)} of 1000")
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err, out
    close_all()


def test_rectangle_selection_creates_that_subset(gui_display, in_gui_project, tmp_path, capfd):
    project, prot = in_gui_project["project"], in_gui_project["het"]
    viewer = _viewer(project, prot)
    close_all()
    capfd.readouterr()
    selector = _open_selector(viewer)
    # choose the rectangle with its radio button, as a user would
    radio = selector.modeButtons
    label = next(t for t in radio.labels if t.get_text() == "rectangle")
    centre = label.get_window_extent().get_points().mean(axis=0)
    _mouse(selector.getCanvas(), "button_press_event", centre)
    _mouse(selector.getCanvas(), "button_release_event", centre)
    assert selector.mode == "rectangle"
    ids, xy = _particle_coordinates(prot)
    ax = selector.ax
    (px0, py0), (px1, py1) = ax.transData.transform(np.percentile(xy, [30, 80], axis=0)).round().astype(int)
    corners = ax.transData.inverted().transform(np.array([[px0, py0], [px1, py1]], float))
    (xa, ya), (xb, yb) = corners
    expected = set(ids[(xy[:, 0] >= xa) & (xy[:, 0] <= xb) & (xy[:, 1] >= ya) & (xy[:, 1] <= yb)])
    assert 50 < len(expected) < 900
    canvas = selector.getCanvas()
    _mouse(canvas, "button_press_event", (px0, py0))
    for t in np.linspace(0, 1, 12)[1:]:
        _mouse(canvas, "motion_notify_event", (int(px0 + (px1 - px0) * t), int(py0 + (py1 - py0) * t)))
    time.sleep(0.15)  # the count follows the drag (updated at most every 0.1 s)
    _mouse(canvas, "motion_notify_event", (px1, py1))
    assert ax.get_title().startswith(f"{len(expected)} of 1000 particles selected")
    assert not selector.mask.any()  # not selected before the button is released
    _mouse(canvas, "button_release_event", (px1, py1))
    row_ids = viewer.particleCoordinates()[0]
    assert set(row_ids[selector.mask]) == expected
    assert ax.get_title().startswith(f"{len(expected)} of 1000 particles selected")
    _shot(tmp_path, "het_rectangle.png", "Select a region")

    before = set(_outputs(project, prot, "subsetRegion"))
    with DialogRecorder() as rec:
        _click_button(selector, "Create subset")
    assert rec.exceptions == [] and rec.kinds() == ["info"], rec.messages
    new = [v for k, v in _outputs(project, prot, "subsetRegion").items() if k not in before]
    assert len(new) == 1 and new[0].getSize() == len(expected)
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err, out
    close_all()


def test_reconstruct_region_shows_and_registers_a_map(gui_display, in_gui_project, tmp_path, capfd):
    from scipion_gsplat.core import io
    project, prot = in_gui_project["project"], in_gui_project["het"]
    viewer = _viewer(project, prot)
    close_all()
    capfd.readouterr()
    selector = _open_selector(viewer)
    ids, xy = _particle_coordinates(prot)
    lo, hi = np.percentile(xy, [0, 60], axis=0)
    mask = selector.selectRectangle(lo - 1.0, (hi[0], xy[:, 1].max() + 1.0))
    n = int(mask.sum())
    assert 500 <= n <= 700
    before = set(_outputs(project, prot, "regionMap"))
    figures_before = figure_titles()
    t0 = time.time()
    with DialogRecorder() as rec:
        _click_button(selector, "Reconstruct this region")
    seconds = time.time() - t0
    assert rec.exceptions == [] and rec.kinds() == ["info"], rec.messages
    assert seconds < 30, seconds
    new = {k: v for k, v in _outputs(project, prot, "regionMap").items() if k not in before}
    assert len(new) == 1
    name, vol = next(iter(new.items()))
    assert vol.getSamplingRate() == pytest.approx(2.0)
    data, pix = io.read_map(vol.getFileName())
    assert data.shape == (40, 40, 40) and pix == pytest.approx(2.0)
    assert np.isfinite(data).all() and data.std() > 0
    assert os.path.dirname(os.path.abspath(vol.getFileName())) == os.path.abspath(prot._getExtraPath())
    opened = [t for t in figure_titles() if t not in figures_before]
    assert opened == [f"{name}: {n} particles"], opened
    _shot(tmp_path, "het_region_map.png", opened[0])
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err, out
    close_all()


def test_empty_selection_is_an_error_and_leaves_nothing(gui_display, in_gui_project, tmp_path, capfd):
    project, prot = in_gui_project["project"], in_gui_project["het"]
    viewer = _viewer(project, prot)
    close_all()
    capfd.readouterr()
    selector = _open_selector(viewer)
    # a lasso drawn in an empty corner of the plot selects nothing
    ax = selector.ax
    (x0, y0), (x1, y1) = ax.transAxes.transform([(0.0, 0.0), (1.0, 1.0)])
    corner = [(int(x1 - 20), int(y1 - 20)), (int(x1 - 5), int(y1 - 20)), (int(x1 - 5), int(y1 - 5))]
    _drag(selector, corner + corner[:1])
    assert not selector.mask.any()
    outputs_before = set(_outputs(project, prot, ""))
    sqlite_before = set(glob.glob(prot._getPath("*.sqlite")))
    maps_before = set(glob.glob(prot._getExtraPath("*.mrc")))
    for label in ("Create subset", "Reconstruct this region"):
        with DialogRecorder() as rec:
            _click_button(selector, label)
        assert rec.exceptions == [] and rec.kinds() == ["error"], (label, rec.messages)
        assert "No particle is selected" in rec.messages[0][2]
    # the typed range along a motion: an empty range is an error dialog too
    viewer.low.set(1000.0)
    viewer.high.set(2000.0)
    with DialogRecorder() as rec:
        viewer._visualizeParam("doSubset")
    assert rec.kinds() == ["error"] and "No particle has coordinate 1" in rec.messages[0][2]
    assert set(_outputs(project, prot, "")) == outputs_before
    assert set(glob.glob(prot._getPath("*.sqlite"))) == sqlite_before
    assert set(glob.glob(prot._getExtraPath("*.mrc"))) == maps_before
    # a typed range that holds particles: the confirmation gives the count
    viewer.low.set(-1000.0)
    viewer.high.set(1000.0)
    with DialogRecorder() as rec:
        viewer._visualizeParam("doSubset")
    assert rec.kinds() == ["info"] and "1000 particles in the new output subsetMotion1_" in rec.messages[0][2]
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err, out
    close_all()
