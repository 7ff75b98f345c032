"""Test harness: a private, headless Scipion environment and shared simulated data.

The Scipion variables are set here, before any test imports pyworkflow: every
run gets its own temporary SCIPION_HOME / SCIPION_USER_DATA / SCIPION_TESTS and a
generated hosts.conf, so tests never touch a user's Scipion installation.
"""
import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

from scipion_gsplat.headless import configure  # noqa: E402  (imports no pyworkflow)

_HOME = tempfile.mkdtemp(prefix="gsplat-tests-")
configure(_HOME)
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)  # each run left its Scipion home in /tmp

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def project(tmp_path_factory, request):
    """A fresh headless Scipion project per test module (named after it), as
    the working directory while the module's tests run."""
    import os

    from scipion_gsplat.headless import new_project
    cwd = os.getcwd()
    name = "gsplat_" + request.module.__name__.split(".")[-1].replace("test_", "")
    proj = new_project(name, tmp_path_factory.mktemp("projects"))
    os.chdir(proj.path)
    yield proj
    os.chdir(cwd)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def lysozyme_pdb() -> Path:
    return DATA / "1aki.pdb"


@pytest.fixture(scope="session")
def sim_small(tmp_path_factory, lysozyme_pdb) -> Path:
    """400 lysozyme particles, 40 px at 2 Å, SNR 1, made by gsplat_simulate
    in-process (shared by the tests of one session)."""
    from scipion_gsplat.programs import simulate
    out = tmp_path_factory.mktemp("sim_small")
    code = simulate.run(["-i", str(lysozyme_pdb), "-o", str(out), "-n", "400", "--box", "40",
                         "--angpix", "2.0", "--snr", "1.0", "--seed", "3", "--device", "cpu"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def sim_pair(tmp_path_factory, lysozyme_pdb) -> Path:
    """A conformational pair: 1200 lysozyme particles (40 px, 2 Å, SNR 0.5), the
    β-domain (residues 40-88) rotated by 40° about its hinge in half of them."""
    from scipion_gsplat.programs import simulate
    out = tmp_path_factory.mktemp("sim_pair")
    code = simulate.run(["-i", str(lysozyme_pdb), "-o", str(out), "-n", "1200", "--box", "40",
                         "--angpix", "2.0", "--snr", "0.5", "--hinge", "A/40-88", "--hinge-angle", "40",
                         "--seed", "4", "--device", "cpu"])
    assert code == 0
    return out


def accuracy(labels, truth) -> float:
    """Two-class accuracy up to the swap of the labels."""
    import numpy as np
    labels, truth = np.asarray(labels), np.asarray(truth)
    return float(max((labels == truth).mean(), (labels != truth).mean()))


@pytest.fixture(scope="session")
def sim_motion(tmp_path_factory, lysozyme_pdb) -> Path:
    """A continuous motion: 1000 lysozyme particles (40 px, 2 Å, SNR 0.5), the
    β-domain rotated about its hinge by one of 10 angles from 0 to 40°."""
    from scipion_gsplat.programs import simulate
    out = tmp_path_factory.mktemp("sim_motion")
    code = simulate.run(["-i", str(lysozyme_pdb), "-o", str(out), "-n", "1000", "--box", "40",
                         "--angpix", "2.0", "--snr", "0.5", "--hinge", "A/40-88", "--hinge-angle", "40",
                         "--n-states", "10", "--seed", "6", "--device", "cpu", "--threads", "1"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def gui_display():
    """A virtual X display (Xvfb) for the GUI tests, with matplotlib's TkAgg
    backend and Scipion's plotter switched to it; yields the display name."""
    import os

    from gui_support import start_xvfb
    proc, display = start_xvfb()
    saved = os.environ.get("DISPLAY")
    os.environ["DISPLAY"] = display
    from pyworkflow.gui.plotter import Plotter
    Plotter.setBackend("TkAgg")
    from gui_support import tk_root
    tk_root()
    yield display
    import tkinter as tk
    if tk._default_root is not None:
        tk._default_root.destroy()
    Plotter.setBackend("Agg")
    if saved is None:
        os.environ.pop("DISPLAY", None)
    else:
        os.environ["DISPLAY"] = saved
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def gui_runs(tmp_path_factory, sim_pair, sim_small, sim_motion):
    """One project with finished small runs of every method, for the GUI tests:
    a dict with ``project`` and the protocols ``split`` (graph refine, 2 classes),
    ``splat`` (half maps), ``het`` (2 motions, 3 frames, 3 classes) and the
    imports ``pair``, ``small``, ``motion``. Tests that use it must run inside
    the project folder (fixture ``in_gui_project``)."""
    import os

    from scipion_gsplat.headless import launch_and_wait, new_project
    from scipion_gsplat.protocols import (ProtGsplatGmmHeterogeneity, ProtGsplatImportParticlesStar,
                                          ProtGsplatReconstructSplat, ProtGsplatSplitVolume)
    from scipion_gsplat.protocols.protocol_split_volume import MODE_GRAPH_REFINE
    cwd = os.getcwd()
    proj = new_project("gsplat_gui", tmp_path_factory.mktemp("gui_projects"))
    os.chdir(proj.path)
    try:
        runs = {"project": proj}
        for key, sim in (("pair", sim_pair), ("small", sim_small), ("motion", sim_motion)):
            imp = proj.newProtocol(ProtGsplatImportParticlesStar, starFile=str(sim / "particles.star"))
            imp.setObjLabel(f"import {key}")
            runs[key] = launch_and_wait(proj, imp, timeout=300)

        def child(cls, source, label, **settings):
            prot = proj.newProtocol(cls, **settings)
            prot.setObjLabel(label)
            prot.inputParticles.set(source)
            prot.inputParticles.setExtended("outputParticles")
            return launch_and_wait(proj, prot, timeout=900)

        runs["split"] = child(ProtGsplatSplitVolume, runs["pair"], "split volume", mode=MODE_GRAPH_REFINE,
                              angularSampling=10.0, refineIterations=4, numberOfThreads=2,
                              sigmaAng=0.0)  # exact poses: kept (the pose search is tested on the programs)
        runs["splat"] = child(ProtGsplatReconstructSplat, runs["small"], "gaussian splat", nGaussians=300,
                              iterations=2, batchSize=32, doHalves=True, numberOfThreads=1)
        runs["het"] = child(ProtGsplatGmmHeterogeneity, runs["motion"], "gmm heterogeneity", nGaussians=400,
                            consensusEpochs=3, nMotions=2, rounds=2, nFrames=3, nClasses=3, numberOfThreads=1)
    finally:
        os.chdir(cwd)
    return runs


@pytest.fixture
def in_gui_project(gui_runs):
    """Run a test inside the GUI project's folder (viewers use project-relative
    paths); yields ``gui_runs``."""
    import os
    cwd = os.getcwd()
    os.chdir(gui_runs["project"].path)
    yield gui_runs
    os.chdir(cwd)


@pytest.fixture(scope="session")
def slurm_queue(tmp_path_factory):
    """A real Slurm queue with two virtual nodes on this machine
    (scripts/slurm_local.sh), stopped at the end; yields the environment
    (``SLURM_CONF`` set) for subprocesses."""
    import os
    import subprocess
    import socket
    folder = tmp_path_factory.mktemp("slurm")
    script = Path(__file__).parents[1] / "scripts" / "slurm_local.sh"
    with socket.socket() as sock:  # a free port for the controller (the nodes take the next two)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    port = min(port, 65000)
    started = subprocess.run(["bash", str(script), "start", "2", str(folder)], capture_output=True, text=True,
                             env=dict(os.environ, GSPLAT_SLURM_PORT=str(port)))
    assert started.returncode == 0, started.stdout + started.stderr
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"))
    yield env
    subprocess.run(["bash", str(script), "stop", str(folder)], capture_output=True)
