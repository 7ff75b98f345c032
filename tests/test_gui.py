"""The Scipion GUI of the plugin in a real X display (Xvfb, Tk, matplotlib TkAgg).

What a user meets, on the finished runs of the session's ``gui_runs`` project:

1. the project window (``pw_project`` in a subprocess): it opens, lists the
   finished runs (their green boxes counted in a screenshot), prints no traceback;
2. every protocol form of the plugin (new and of each finished run), with the
   expert level switched: mapped, drawn, no exception;
3. every viewer of the plugin on its finished run: the viewer's form, then EVERY
   action of ``_getVisualizeDict()`` (whatever keys exist when the test runs):
   each must open a window (matplotlib figure, Tk window or another X window)
   or register a protocol output with an 'info' confirmation, with no error
   dialog, no exception and no "Traceback" in the terminal.

Screenshots are PNG files (non-blank, minimum size checked), also copied to
``$GSPLAT_GUI_SHOTS`` when set, named ``<viewer>_<action>.png``,
``form_<Protocol>.png`` and ``project_window.png``; the table
action -> screenshot -> window titles is printed and written as
``viewer_actions.txt`` there.
"""
from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gui_support import DialogRecorder, assert_not_blank, keep_shot, pump, screenshot, tk_root


def test_the_display_tools_are_installed():
    """The GUI tests run here, never skipped: scripts/install.sh installs these."""
    missing = [exe for exe in ("Xvfb", "xdotool", "import") if shutil.which(exe) is None]
    assert not missing, f"missing {missing}: run scripts/install.sh (apt-get install xvfb xdotool imagemagick)"

PROJECT_NAME = "gsplat_gui"        # the name conftest's gui_runs gives its project
FINISHED_RGB = (0xD2, 0xF5, 0xCB)  # pyworkflow's box colour of a finished run (STATUS_COLORS)


# ---------------------------------------------------------------- the plugin's classes
def _plugin_classes(package: str, base_path: str) -> list:
    """The classes a plugin package exports that derive from ``base_path``
    ("module:Class"), i.e. what Scipion's Domain discovers in it; sorted by name."""
    import importlib
    module_name, cls_name = base_path.split(":")
    base = getattr(importlib.import_module(module_name), cls_name)
    pkg = importlib.import_module(package)
    found = {cls.__name__: cls for _, cls in inspect.getmembers(pkg, inspect.isclass)
             if issubclass(cls, base) and cls.__module__.startswith("scipion_gsplat")}
    return [found[name] for name in sorted(found)]


PROTOCOLS = _plugin_classes("scipion_gsplat.protocols", "pyworkflow.protocol:Protocol")
VIEWERS = _plugin_classes("scipion_gsplat.viewers", "pyworkflow.viewer:ProtocolViewer")


# ---------------------------------------------------------------- screenshots, windows
@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gui_shots")


def _keep(path: Path) -> None:
    keep_shot(path)


def _shoot_id(path: Path, window_id: int, min_width: int, min_height: int, keep: bool = True) -> dict:
    """Screenshot of the X window ``window_id``; assert it is not blank and big enough."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["import", "-window", str(window_id), str(path)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    stats = assert_not_blank(path, min_width=min_width, min_height=min_height)
    if keep:
        _keep(path)
    return stats


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _x_windows() -> dict:
    """Visible named X windows of the display: ``{id: title}``."""
    found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", "."],
                           capture_output=True, text=True, timeout=30)
    out = {}
    for wid in found.stdout.split():
        name = subprocess.run(["xdotool", "getwindowname", wid], capture_output=True, text=True, timeout=30)
        out[int(wid)] = name.stdout.strip()
    return out


def _tk_toplevels() -> list:
    """Every existing Tk toplevel under this process's default root."""
    import tkinter as tk
    out = []

    def walk(widget):
        for child in widget.winfo_children():
            if isinstance(child, tk.Toplevel) and child.winfo_exists():
                out.append(child)
            walk(child)
    walk(tk_root())
    return out


def _show_without_blocking(window, seconds: float = 0.8) -> None:
    """``window.show()`` (pyworkflow's Window: centre, map, Tk main loop) with the
    main loop ended after ``seconds`` so that the test goes on."""
    root = tk_root()
    job = root.after(int(seconds * 1000), root.quit)
    try:
        window.show(center=True)
    finally:
        try:
            root.after_cancel(job)
        except Exception:
            pass
    pump(0.2)


def _destroy(window) -> None:
    """Destroy a pyworkflow Window's toplevel (``close()`` would sys.exit() a masterless one)."""
    try:
        if window.root.winfo_exists():
            window.root.destroy()
    except Exception:
        pass
    pump(0.1)


def _no_traceback(text: str, what: str) -> None:
    assert "Traceback" not in text, f"{what} printed a traceback:\n{text[-3000:]}"


# ---------------------------------------------------------------- 1. the project window
def _project_link(project) -> Path:
    """pyworkflow opens a project by name from SCIPION_USER_DATA/projects/<name>:
    link the fixture's project there when it lives elsewhere."""
    from pyworkflow.project import Manager
    target = Path(Manager().getProjectPath(PROJECT_NAME))
    source = Path(project.path).resolve()
    if target.resolve() != source:
        if target.is_symlink() or target.exists():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source, target_is_directory=True)
    return target


def _count_boxes(path: Path, rgb, min_area: int = 150) -> int:
    """Connected regions of exactly colour ``rgb`` of at least ``min_area`` px."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage
    img = np.asarray(Image.open(path).convert("RGB"))
    mask = np.all(img == np.array(rgb, dtype=img.dtype), axis=-1)
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0
    areas = ndimage.sum(mask, labels, index=range(1, n + 1))
    return int((np.asarray(areas) >= min_area).sum())


def test_project_window_lists_the_finished_runs(gui_display, in_gui_project, shots):
    proj = in_gui_project["project"]
    _project_link(proj)
    finished = [run for run in proj.getRuns() if run.isFinished()]
    env = dict(os.environ, DISPLAY=gui_display)
    log_out, log_err = shots / "project_window.stdout", shots / "project_window.stderr"
    with open(log_out, "w") as out, open(log_err, "w") as err:
        # -O: opened in this process; without it pw_project relaunches through `scipion`
        app = subprocess.Popen([sys.executable, "-O", "-m", "pyworkflow.apps.pw_project", PROJECT_NAME],
                               env=env, stdout=out, stderr=err, cwd=proj.path)
        try:
            wid, t0 = None, time.time()
            while wid is None and time.time() - t0 < 60:
                found = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", PROJECT_NAME],
                                       capture_output=True, text=True, timeout=30)
                if found.stdout.split():
                    wid = int(found.stdout.split()[-1])
                else:
                    assert app.poll() is None, f"pw_project exited ({app.returncode}):\n{log_err.read_text()}"
                    time.sleep(0.5)
            assert wid is not None, "no project window within 60 s"
            time.sleep(3.0)  # the runs graph is drawn after the window maps
            title = subprocess.run(["xdotool", "getwindowname", str(wid)], capture_output=True, text=True).stdout
            assert title.startswith(PROJECT_NAME), title
            png = screenshot(shots / "project_window.png", PROJECT_NAME)
            stats = assert_not_blank(png, min_width=800, min_height=500)
            _keep(png)
            boxes = _count_boxes(png, FINISHED_RGB)
            # every finished run is a green box of the runs graph
            assert boxes >= len(finished), (boxes, [r.getRunName() for r in finished], stats)
            assert app.poll() is None, "the project window closed by itself"
        finally:
            app.terminate()
            try:
                app.wait(timeout=20)
            except subprocess.TimeoutExpired:
                app.kill()
                app.wait()
    _no_traceback(log_out.read_text() + log_err.read_text(), "the project window")


# ---------------------------------------------------------------- 2. every protocol form
def _open_form(prot, title: str):
    import pyworkflow.gui.project  # noqa: F401  (imported first, as the GUI does: form <-> project cycle)
    from pyworkflow.gui.form import FormWindow
    saved = []
    form = FormWindow(title, prot, lambda *args, **kw: saved.append(args), None)
    _show_without_blocking(form)
    return form


def test_plugin_protocols_are_in_the_domain():
    from pyworkflow import Config
    domain = Config.getDomain().getProtocols()
    assert len(PROTOCOLS) >= 5
    missing = [cls.__name__ for cls in PROTOCOLS if cls.__name__ not in domain]
    assert not missing, f"protocols Scipion does not discover: {missing}"
    viewers = Config.getDomain().getViewers()
    assert [cls.__name__ for cls in VIEWERS if cls.__name__ not in viewers] == []


@pytest.mark.parametrize("cls", PROTOCOLS, ids=lambda c: c.__name__)
def test_protocol_forms(gui_display, in_gui_project, shots, cls):
    """The form of a new run and of every finished run of ``cls``: mapped, drawn,
    the expert level switched, no exception."""
    from pyworkflow.protocol import LEVEL_ADVANCED
    proj = in_gui_project["project"]
    prots = [("new", proj.newProtocol(cls))]
    prots += [(_safe(run.getObjLabel()), run) for run in proj.getRuns()
              if type(run) is cls and run.isFinished()]
    for tag, prot in prots:
        with DialogRecorder() as dialogs:
            form = _open_form(prot, f"Protocol Run: {cls.__name__} {tag}")
            try:
                assert form.root.winfo_ismapped(), (cls.__name__, tag)
                if prot.hasExpert():
                    form.setVar("expertLevel", LEVEL_ADVANCED)
                    pump(0.3)
                    assert prot.expertLevel.get() == LEVEL_ADVANCED
                name = f"form_{cls.__name__}" + ("" if tag == "new" else f"_{tag}") + ".png"
                _shoot_id(shots / name, form.root.winfo_id(), 600, 450)
            finally:
                _destroy(form)
        assert dialogs.exceptions == [], (cls.__name__, tag, dialogs.exceptions)
        assert [m for m in dialogs.messages if m[0] == "error"] == [], dialogs.messages


# ---------------------------------------------------------------- 3. every viewer action
ACTION_ROWS = []  # (viewer, key, label, effect, screenshots, titles)


def _outputs(proj, prot) -> set:
    """Output names of ``prot`` as stored in the project database (what the GUI reloads)."""
    from pyworkflow.protocol import getProtocolFromDb
    fresh = getProtocolFromDb(proj.path, proj.dbPath, prot.getObjId())
    return {name for name, _ in fresh.iterOutputAttributes()}


def _target_run(proj, viewer_cls):
    for run in proj.getRuns():
        if run.isFinished() and any(isinstance(run, target) for target in viewer_cls._targets):
            return run
    return None


def _label(viewer, key) -> str:
    param = viewer._definition.getParam(key)
    return param.label.get() if param is not None else key


def _run_action(viewer, key, proj, prot, shots, capfd, keep: bool = True) -> dict:
    """Click one viewer action (its eye button's command, i.e. the viewer's
    ``_visualizeParam(key)``); return what it did."""
    import matplotlib.pyplot as plt
    figs0, tops0, xwins0 = set(plt.get_fignums()), set(_tk_toplevels()), set(_x_windows())
    outs0 = _outputs(proj, prot)
    capfd.readouterr()
    problems, error = [], None
    with DialogRecorder() as dialogs:
        try:
            form = viewer.getWindow()
            widget = form.widgetDict.get(key) if form is not None else None
            if getattr(widget, "visualizeCallback", None) is not None:
                widget._visualizeVar()  # the command of the action's eye button in the form
            else:
                viewer._visualizeParam(key)
        except Exception as exc:  # the user would see a traceback in the terminal
            import traceback
            error = "".join(traceback.format_exception(exc))
        pump(1.0)
    captured = capfd.readouterr()
    figs = [n for n in plt.get_fignums() if n not in figs0]
    tops = [t for t in _tk_toplevels() if t not in tops0 and t.winfo_ismapped()]
    # without a window manager xdotool lists Tk's wrapper windows, not winfo_id(): tell ours by title
    ours = {t.title() for t in tops} | {plt.figure(n).canvas.manager.get_window_title() for n in figs}
    pump(0.5)  # windows of other processes (e.g. ChimeraX) take longer
    foreign = {wid: t for wid, t in _x_windows().items() if wid not in xwins0 and t not in ours}
    new_outputs = sorted(_outputs(proj, prot) - outs0)
    if error:
        problems.append(f"exception:\n{error}")
    if dialogs.exceptions:
        problems.append(f"Tk callback exceptions: {dialogs.exceptions}")
    for kind, title, text in dialogs.messages:
        if kind == "error":
            problems.append(f"error dialog {title!r}: {text}")
    term = captured.out + captured.err
    if "Traceback" in term:
        problems.append(f"traceback in the terminal:\n{term[-2000:]}")
    infos = [m for m in dialogs.messages if m[0] == "info"]
    if new_outputs and not infos:
        problems.append(f"new outputs {new_outputs} without an 'info' confirmation")
    if not (figs or tops or foreign or new_outputs or infos) and not problems:
        problems.append("no visible effect (no figure, no window, no output, no message)")
    # screenshots of every new window, then close them
    base = f"{type(viewer).__name__}_{key}"
    names, titles = [], []
    windows = []
    for num in figs:
        manager = plt.figure(num).canvas.manager
        if not manager.window.winfo_ismapped():  # the "shows nothing on the first click" failure
            problems.append(f"figure {manager.get_window_title()!r} created but its window did not open")
            continue
        titles.append(manager.get_window_title())
        windows.append(int(manager.window.winfo_id()))
    for top in tops:
        titles.append(top.title())
        windows.append(int(top.winfo_id()))
    for wid, title in foreign.items():
        titles.append(title)
        windows.append(wid)
    for i, wid in enumerate(windows):
        name = f"{base}.png" if i == 0 else f"{base}_{i + 1}.png"
        try:
            _shoot_id(shots / name, wid, 300, 200, keep=keep)
            names.append(name)
        except (AssertionError, subprocess.SubprocessError) as exc:
            problems.append(f"screenshot {name}: {exc}")
    for num in figs:
        plt.close(num)
    for top in tops:
        if top.winfo_exists():
            top.destroy()
    pump(0.2)
    effect = ", ".join(filter(None, [f"{len(figs)} figure(s)" if figs else "",
                                     f"{len(tops)} Tk window(s)" if tops else "",
                                     f"{len(foreign)} X window(s)" if foreign else "",
                                     f"outputs {new_outputs}" if new_outputs else "",
                                     "info: " + "; ".join(m[2] for m in infos) if infos else ""]))
    return {"problems": problems, "names": names, "titles": titles, "effect": effect,
            "messages": dialogs.messages}


@pytest.mark.parametrize("viewer_cls", VIEWERS, ids=lambda c: c.__name__)
def test_viewer_actions(gui_display, in_gui_project, shots, capfd, viewer_cls):
    """The viewer's form on its finished run, then every action of the form."""
    proj = in_gui_project["project"]
    prot = _target_run(proj, viewer_cls)
    if prot is None:
        pytest.skip(f"no finished run of {[t.__name__ for t in viewer_cls._targets]} in the GUI project")
    viewer = viewer_cls(project=proj, protocol=prot)
    with DialogRecorder() as dialogs:
        tk_root().after(800, tk_root().quit)  # visualize() enters the Tk main loop
        viewer.visualize(prot)
        pump(0.3)
    form = viewer.formWindow
    try:
        assert form.root.winfo_ismapped()
        assert dialogs.exceptions == [] and dialogs.messages == [], (dialogs.exceptions, dialogs.messages)
        _shoot_id(shots / f"{viewer_cls.__name__}_form.png", form.root.winfo_id(), 500, 300)
        keys = list(viewer._getVisualizeDict())
        assert keys, "a viewer without actions"
        failures = {}
        for key in keys:
            result = _run_action(viewer, key, proj, prot, shots, capfd)
            ACTION_ROWS.append((viewer_cls.__name__, key, _label(viewer, key), result["effect"],
                                ", ".join(result["names"]) or "-", " | ".join(result["titles"]) or "-"))
            if result["problems"]:
                failures[key] = result["problems"]
    finally:
        _destroy(form)
    _report(capfd, viewer_cls.__name__)
    assert not failures, "\n".join(f"{viewer_cls.__name__}.{key} ({_label(viewer, key)}):\n  " + "\n  ".join(p)
                                   for key, p in failures.items())


def _report(capfd, viewer_name: str) -> None:
    """Print the rows of ``viewer_name`` (and keep the whole table in $GSPLAT_GUI_SHOTS)."""
    rows = [r for r in ACTION_ROWS if r[0] == viewer_name]
    lines = [f"{r[2]}  ->  {r[4]}  ->  {r[5]}   [{r[1]}: {r[3]}]" for r in rows]
    with capfd.disabled():
        print(f"\n{viewer_name}:\n  " + "\n  ".join(lines))
    extra = os.environ.get("GSPLAT_GUI_SHOTS")
    if extra:
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, "viewer_actions.txt"), "w") as fh:
            fh.write("viewer\tkey\taction\teffect\tscreenshots\twindow titles\n")
            fh.writelines("\t".join(r) + "\n" for r in ACTION_ROWS)


def _broken_splat_viewer():
    """The splat viewer with broken actions added (each a failure a user has met)."""
    from scipion_gsplat.viewers import GsplatSplatViewer

    class BrokenActions(GsplatSplatViewer):
        def _getVisualizeDict(self):
            return {"good": lambda param=None: [self.fscPlotter()],
                    "raises": self._raises, "terminal": self._terminal, "nothing": lambda param=None: [],
                    "error": lambda param=None: [self.errorMessage("cannot do that", "Error")],
                    "colorbar": self._colorbar}

        def _raises(self, param=None):
            raise ValueError("no particle in this range")

        def _terminal(self, param=None):
            try:
                raise AttributeError("'NoneType' object has no attribute 'getEnviron'")
            except AttributeError:
                import traceback
                traceback.print_exc()
            return []

        def _colorbar(self, param=None):  # the "Colorbar layout" crash: plt.tight_layout() on a constrained figure
            import numpy as np
            from pwem.viewers.plotter import EmPlotter
            plotter = EmPlotter(x=1, y=1, windowTitle="constrained")
            fig = plotter.getFigure()
            fig.set_layout_engine("constrained")
            ax = fig.add_subplot(111)
            fig.colorbar(ax.imshow(np.eye(8)), ax=ax)
            return [plotter]
    return BrokenActions


def test_action_checker_catches_broken_actions(gui_display, in_gui_project, shots, capfd):
    """The checks of test_viewer_actions fail on an exception, a traceback in the
    terminal, an error dialog, an action without effect and the colour-bar crash;
    a working action passes."""
    proj = in_gui_project["project"]
    cls = _broken_splat_viewer()
    prot = _target_run(proj, cls)
    viewer = cls(project=proj, protocol=prot)
    viewer.setProtocol(prot)
    results = {key: _run_action(viewer, key, proj, prot, shots, capfd, keep=False)
               for key in viewer._getVisualizeDict()}
    assert results["good"]["problems"] == [] and results["good"]["titles"] == ["GSFSC"], results["good"]
    for key in ("raises", "terminal", "nothing", "error", "colorbar"):
        assert results[key]["problems"], (key, results[key])
    assert "exception" in results["raises"]["problems"][0]
    assert "traceback in the terminal" in results["terminal"]["problems"][0]
    assert "error dialog" in results["error"]["problems"][0]
    assert "no visible effect" in results["nothing"]["problems"][0]
    assert "Colorbar layout" in results["colorbar"]["problems"][0]
