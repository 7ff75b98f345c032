"""Helpers for the GUI tests: a virtual X display, Tk event pumping, window lists,
dialog capture and screenshots.

The GUI tests run the real Tk widgets and matplotlib's TkAgg backend on an Xvfb
display (started once per session by the ``gui_display`` fixture in conftest).
Modal dialogs would block a test forever, so :class:`DialogRecorder` replaces
pyworkflow's ``showInfo/showWarning/showError`` by recorders while a test runs:
what a user would have read in the dialog is asserted instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


def start_xvfb(width: int = 1600, height: int = 1000):
    """Start ``Xvfb`` on a free display number; return ``(process, ":N")``.

    Raises RuntimeError when Xvfb is missing (scripts/install.sh installs it)."""
    exe = shutil.which("Xvfb")
    if exe is None:
        raise RuntimeError("Xvfb is not installed: run scripts/install.sh (apt-get install xvfb)")
    for number in range(91, 140):
        if os.path.exists(f"/tmp/.X11-unix/X{number}") or os.path.exists(f"/tmp/.X{number}-lock"):
            continue
        proc = subprocess.Popen([exe, f":{number}", "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if os.path.exists(f"/tmp/.X11-unix/X{number}"):
                return proc, f":{number}"
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.kill()
    raise RuntimeError("could not start Xvfb on any display :91-:139")


def tk_root():
    """The Tk root of this process (created on first use), withdrawn."""
    import tkinter as tk
    root = tk._default_root
    if root is None:
        root = tk.Tk()
        root.withdraw()
    return root


def pump(seconds: float = 0.3):
    """Process Tk events (window mapping, redraws, ``after`` callbacks) for ``seconds``."""
    root = tk_root()
    end = time.time() + seconds
    while time.time() < end:
        root.update()
        time.sleep(0.01)


def toplevel_titles() -> list:
    """Titles of the mapped Tk top-level windows under this process's default
    Tk root (Scipion forms, dialogs, our Tk viewers). matplotlib's TkAgg windows
    have their own Tk root: see :func:`figure_titles`."""
    import tkinter as tk
    root = tk_root()
    titles = []

    def walk(widget):
        for child in widget.winfo_children():
            if isinstance(child, tk.Toplevel) and child.winfo_exists() and child.winfo_ismapped():
                titles.append(child.title())
            walk(child)
    walk(root)
    return titles


def figure_titles() -> list:
    """Window titles of the open matplotlib figures."""
    import matplotlib.pyplot as plt
    out = []
    for num in plt.get_fignums():
        manager = plt.figure(num).canvas.manager
        out.append(manager.get_window_title() if manager is not None else "")
    return out


def close_all():
    """Close every matplotlib figure and every Tk toplevel (keep the root)."""
    import tkinter as tk
    import matplotlib.pyplot as plt
    plt.close("all")
    root = tk_root()
    for child in list(root.winfo_children()):
        if isinstance(child, tk.Toplevel):
            child.destroy()
    pump(0.1)


def screenshot(path, window_title: str = None) -> Path:
    """Save a PNG of the whole display (or of the window whose title contains
    ``window_title``, found with xdotool) with ImageMagick's ``import``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = "root"
    if window_title is not None:
        found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", window_title],
                               capture_output=True, text=True)
        ids = found.stdout.split()
        if not ids:
            raise AssertionError(f"no visible window titled like {window_title!r}")
        target = ids[-1]
    subprocess.run(["import", "-window", target, str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def image_stats(path) -> dict:
    """Width, height and the number of distinct colours (a blank window has 1-3)."""
    from PIL import Image
    img = Image.open(path).convert("RGB")
    small = img.resize((min(img.width, 400), min(img.height, 300)))
    return {"width": img.width, "height": img.height, "colours": len(set(small.getdata()))}


def assert_not_blank(path, min_width: int = 200, min_height: int = 150, min_colours: int = 8):
    stats = image_stats(path)
    assert stats["width"] >= min_width and stats["height"] >= min_height, (path, stats)
    assert stats["colours"] >= min_colours, f"{path} looks blank: {stats}"
    return stats


def keep_shot(path, name: str = None) -> None:
    """Copy a screenshot to ``$GSPLAT_GUI_SHOTS`` when set (screenshots collected
    for the release notes), as ``name`` (default: its own name)."""
    folder = os.environ.get("GSPLAT_GUI_SHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        shutil.copy(str(path), os.path.join(folder, name or Path(path).name))


def mouse(canvas, name: str, x: float, y: float, button: int = 1) -> None:
    """Send a matplotlib mouse event (``button_press_event``,
    ``motion_notify_event``, ``button_release_event``) at display pixel
    ``(x, y)`` through the canvas's callbacks, as a real mouse does."""
    from matplotlib.backend_bases import MouseEvent
    canvas.callbacks.process(name, MouseEvent(name, canvas, x, y, button=button))


def open_one_window(viewer, action: str, seconds: float = 0.8):
    """Run a viewer action as its eye button does (``_visualizeParam``) and return
    ``(title, figure)`` of the one new matplotlib window it opened, asserting that
    no dialog and no Tk exception came with it."""
    import matplotlib.pyplot as plt
    before = figure_titles()
    with DialogRecorder() as rec:
        viewer._visualizeParam(action)
        pump(seconds)
    titles = figure_titles()
    assert rec.messages == [] and rec.exceptions == [], (rec.messages, rec.exceptions)
    assert len(titles) == len(before) + 1, (before, titles)  # exactly one new window, at once
    title = next(t for t in titles if t not in before)
    figures = [plt.figure(n) for n in plt.get_fignums()
               if plt.figure(n).canvas.manager.get_window_title() == title]
    return title, figures[-1]


class DialogRecorder:
    """Replace pyworkflow's message dialogs by recorders (a modal dialog would
    block the test); ``messages`` is a list of ``(kind, title, text)``.

    Use as a context manager. Also records exceptions raised in Tk callbacks
    (``report_callback_exception``) in ``exceptions``.
    """

    def __init__(self):
        self.messages, self.exceptions = [], []

    def __enter__(self):
        import pyworkflow.gui.dialog as dialog
        self._dialog = dialog
        self._saved = {name: getattr(dialog, name) for name in ("showInfo", "showWarning", "showError")}
        for name, kind in (("showInfo", "info"), ("showWarning", "warning"), ("showError", "error")):
            setattr(dialog, name, self._recorder(kind))
        root = tk_root()
        self._saved_report = root.report_callback_exception
        root.report_callback_exception = lambda exc, val, tb: self.exceptions.append(val)
        return self

    def _recorder(self, kind):
        def record(title, msg, parent=None, *args, **kwargs):
            self.messages.append((kind, str(title), str(msg)))
        return record

    def __exit__(self, *exc):
        for name, func in self._saved.items():
            setattr(self._dialog, name, func)
        tk_root().report_callback_exception = self._saved_report
        return False

    def kinds(self) -> list:
        return [m[0] for m in self.messages]
