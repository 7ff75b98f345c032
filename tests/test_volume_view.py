"""The volume viewer without Xmipp: slices window, frame slider drag, PNG, ChimeraX choice.

Runs on the Xvfb display of the ``gui_display`` fixture (TkAgg). Screenshots go
to the test's tmp folder and, when ``GSPLAT_GUI_SHOTS`` is set, there too.
"""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from gui_support import assert_not_blank, close_all, figure_titles, keep_shot, mouse, pump, screenshot

BOX, PIX = 24, 2.5


def _blob(k: int) -> np.ndarray:
    """A Gaussian blob at x = (4k − 4) px from the centre, ``[z, y, x]``."""
    z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX // 2
    return np.exp(-((x - (4 * k - 4)) ** 2 + y ** 2 + z ** 2) / 8.0).astype(np.float32)


@pytest.fixture
def series(tmp_path):
    from scipion_gsplat.core.io import write_map
    paths = []
    for k in range(3):
        path = tmp_path / f"frame{k}.mrc"
        write_map(path, _blob(k), PIX)
        paths.append(str(path))
    return paths


def _mouse(canvas, name: str, ax, fx: float, fy: float = 0.5):
    """Send a left-button mouse event at axes fraction ``(fx, fy)`` of ``ax``
    through the canvas's callback registry (what a real mouse does)."""
    x, y = ax.transAxes.transform((fx, fy))
    mouse(canvas, name, x, y)


def test_slices_window_follows_a_frame_slider_drag(gui_display, series, tmp_path, capfd):
    from scipion_gsplat.viewers.volume_view import VolumeSlicesView
    close_all()
    before = figure_titles()
    view = VolumeSlicesView(series, "Test series slices")
    view.show()
    pump(0.5)
    after = figure_titles()
    assert len(after) == len(before) + 1 and "Test series slices" in after
    browser = view.browser
    slider, fig = browser.frame_slider, browser.fig
    assert browser.pixel_size_A == pytest.approx(PIX)  # from the MRC header
    assert browser.axes[0].get_xlabel() == "x (Å)"
    np.testing.assert_array_equal(browser.images[0].get_array(), _blob(0)[BOX // 2])
    n_axes = len(fig.axes)

    # a real mouse drag on the frame slider (X events through Tk), following every position
    widget = fig.canvas.get_tk_widget()

    def on_screen(fx):
        x, y = slider.ax.transAxes.transform((fx, 0.5))
        return str(int(widget.winfo_rootx() + x)), str(int(widget.winfo_rooty() + widget.winfo_height() - y))

    seen = []
    subprocess.run(["xdotool", "mousemove", *on_screen(0.02)], check=True)
    pump(0.2)
    subprocess.run(["xdotool", "mousedown", "1"], check=True)
    pump(0.2)
    for fx in (0.3, 0.55, 0.8, 0.99):
        subprocess.run(["xdotool", "mousemove", *on_screen(fx)], check=True)
        pump(0.2)
        seen.append(browser.frame)
    subprocess.run(["xdotool", "mouseup", "1"], check=True)
    pump(0.3)
    assert seen == [1, 1, 2, 2], seen  # every drag position was followed, not only the first
    assert browser.frame == 2
    np.testing.assert_array_equal(browser.images[0].get_array(), _blob(2)[BOX // 2])
    np.testing.assert_array_equal(browser.images[2].get_array(), _blob(2)[:, :, BOX // 2])
    assert browser.frame_slider is slider and len(fig.axes) == n_axes  # nothing rebuilt
    assert "frame 3/3" in browser.heading.get_text()

    # plane and contrast sliders: dragging the plane moves all three slices
    _mouse(fig.canvas, "button_press_event", browser.offset_slider.ax, 0.5)
    _mouse(fig.canvas, "motion_notify_event", browser.offset_slider.ax, 0.75)
    _mouse(fig.canvas, "button_release_event", browser.offset_slider.ax, 0.75)
    assert browser.offset_px > 0
    np.testing.assert_array_equal(browser.images[0].get_array(), _blob(2)[BOX // 2 + browser.offset_px])
    pump(0.3)

    shot = screenshot(tmp_path / "volume_slices.png", "Test series slices")
    assert_not_blank(shot, min_width=800, min_height=400)
    keep_shot(shot, "volume_slices_frame_slider.png")
    out = capfd.readouterr()
    assert "Traceback" not in out.err + out.out and "Error" not in out.err
    close_all()


def test_headless_png_and_single_map(series, tmp_path):
    from scipion_gsplat.viewers.volume_view import VolumeSlicesView, save_slices_png
    from gui_support import image_stats
    view = VolumeSlicesView(series, "series")
    png = view.save_png(tmp_path / "frame2.png", frame=2)
    stats = image_stats(png)
    assert stats["width"] == 1300 and stats["height"] == 600 and stats["colours"] > 20
    # one map, pixel size given: no frame slider in the headless figure, points drawn near the planes
    from matplotlib.figure import Figure
    from scipion_gsplat.viewers.volume_view import SliceBrowser
    fig = Figure(figsize=(13, 6))
    pts = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 20.0]])  # x, y, z (Å): the second is far from z = 0
    browser = SliceBrowser(fig, [_blob(1)], pixel_size_A=PIX, points_A=[pts], interactive=False)
    assert browser.frame_slider is None
    assert len(browser.markers[0].get_xdata()) == 1  # z plane: only the point at z = 0
    assert len(browser.markers[1].get_xdata()) == 2  # y plane: both (y = 0)
    assert os.path.getsize(save_slices_png(tmp_path / "one.png", [series[0]])) > 10000


def test_volume_views_chimerax_choice(series, monkeypatch, tmp_path):
    from pwem.viewers.viewer_chimera import Chimera, ChimeraView
    from scipion_gsplat.viewers import volume_view
    monkeypatch.setattr(Chimera, "_program", str(tmp_path / "no" / "ChimeraX"))
    assert not volume_view.chimerax_available()
    views = volume_view.volume_views(series, "Maps", use_chimerax=True)
    assert len(views) == 1 and isinstance(views[0], volume_view.VolumeSlicesView)
    assert views[0].title.startswith("Maps") and "ChimeraX not installed" in views[0].title
    views = volume_view.volume_views(series[0] + ":mrc", "Map")
    assert isinstance(views[0], volume_view.VolumeSlicesView) and views[0].paths == [series[0]]
    # where ChimeraX exists, the standard pwem ChimeraView opens every map
    fake = tmp_path / "bin" / "ChimeraX"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setattr(Chimera, "_program", str(fake))
    assert volume_view.chimerax_available()
    views = volume_view.volume_views(series, "Maps", use_chimerax=True)
    assert isinstance(views[0], ChimeraView) and all(os.path.basename(p) in views[0]._cmd for p in series)
    assert isinstance(volume_view.volume_views(series, "Maps")[0], volume_view.VolumeSlicesView)
    # a missing file or no file at all: an error dialog, not a traceback when shown
    from pyworkflow.viewer import MSG_ERROR, MessageView
    for bad in ([series[0], str(tmp_path / "gone.mrc")], []):
        views = volume_view.volume_views(bad, "Maps")
        assert isinstance(views[0], MessageView) and views[0]._msgType == MSG_ERROR
    assert "gone.mrc" in volume_view.volume_views([str(tmp_path / "gone.mrc")], "Maps")[0]._msg
