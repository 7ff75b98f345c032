"""Protocols end to end in a real headless Scipion project."""
import datetime
import os
import subprocess
import sys
import time

import pytest

from scipion_gsplat.headless import launch_and_wait


@pytest.fixture(scope="module")
def imported(project, sim_small):
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    prot = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(sim_small / "particles.star"))
    return launch_and_wait(project, prot, timeout=300)


def test_plugin_is_registered():
    from pwem import Domain
    assert "scipion_gsplat" in Domain.getPlugins()
    names = Domain.getProtocols()
    assert "ProtGsplatImportParticlesStar" in names and "ProtGsplatReconstructFourier" in names
    from scipion_gsplat import Plugin
    assert os.path.exists(Plugin.getProgram("reconstruct_fourier"))


def test_protocols_conf_lists_every_protocol():
    import configparser
    import json
    import scipion_gsplat
    from pwem import Domain
    cp = configparser.ConfigParser()
    cp.optionxform = str
    cp.read(os.path.join(os.path.dirname(scipion_gsplat.__file__), "protocols.conf"))
    tree = json.loads(cp.get("PROTOCOLS", "Protocols SPA"))
    listed = {c["value"] for c in tree[0]["children"]}
    ours = {n for n, c in Domain.getProtocols().items() if c.__module__.startswith("scipion_gsplat")}
    assert tree[0]["text"] == "gsplat" and listed == ours


def test_import_star(imported, sim_small):
    parts = imported.outputParticles
    assert parts.getSize() == 400
    assert parts.hasAlignmentProj() and parts.hasCTF()
    assert parts.getSamplingRate() == pytest.approx(2.0)
    assert parts.getXDim() == 40
    first = parts.getFirstItem()
    assert first.getCTF().getDefocusU() > 5000


def test_reconstruct_fourier(project, imported, sim_small):
    from scipion_gsplat.core import fsc, io
    from scipion_gsplat.protocols import ProtGsplatReconstructFourier
    prot = project.newProtocol(ProtGsplatReconstructFourier, symmetryGroup="c1", numberOfThreads=2)
    prot.inputParticles.set(imported)
    prot.inputParticles.setExtended("outputParticles")
    launch_and_wait(project, prot, timeout=600)
    vol = prot.outputVolume
    assert vol.hasHalfMaps() and len(vol.getHalfMaps().split(",")) == 2
    res = float(prot.outputFSC.calculateResolution(0.143))
    assert 4.0 <= res < 8.0
    assert "Resolution" in prot.summary()[0]
    rec, _ = io.read_map(os.path.join(project.path, vol.getFileName()))
    truth, pix = io.read_map(sim_small / "truth_state1.mrc")
    assert fsc.fsc_auc(fsc.fsc_curve(rec, truth, pix)[1]) > 0.8
    # resume: a second launch in continue mode redoes nothing
    from pyworkflow.protocol.constants import MODE_RESUME
    mtime = os.path.getmtime(os.path.join(project.path, vol.getFileName()))
    prot.runMode.set(MODE_RESUME)
    launch_and_wait(project, prot, timeout=300)
    assert os.path.getmtime(os.path.join(project.path, prot.outputVolume.getFileName())) == mtime


def test_reconstruct_rejects_bad_symmetry(project, imported):
    from scipion_gsplat.protocols import ProtGsplatReconstructFourier
    prot = project.newProtocol(ProtGsplatReconstructFourier, symmetryGroup="x7")
    prot.inputParticles.set(imported)
    prot.inputParticles.setExtended("outputParticles")
    assert any("unsupported symmetry" in e for e in prot.validate())


def test_import_fails_cleanly_on_missing_stack(project, tmp_path):
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    (tmp_path / "bad.star").write_text(
        "data_\nloop_\n_rlnImageName\n_rlnImagePixelSize\n1@nothere.mrcs 1.0\n")
    prot = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(tmp_path / "bad.star"))
    launch_and_wait(project, prot, timeout=300, expect_failure=True)
    assert "not found" in prot.getErrorMessage()


def _finished_import(project, sim_small):
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    prot = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(sim_small / "particles.star"))
    return launch_and_wait(project, prot, timeout=300)


def _as_after_the_race(prot, stamp) -> None:
    """What pyworkflow holds when it read the run's database just before the
    run's last status write and took the time stamp (``stamp``) after it: the
    run "running", its process (a pid that has ended) gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prot.setStatus("running")
    prot.setPid(dead.pid)
    prot.lastUpdateTimeStamp.set(stamp)


def test_the_harness_poll_reads_a_status_written_as_the_process_exits(project, sim_small):
    """pyworkflow reads a run's database and only then takes its time stamp; a
    run whose last status ("finished") lands in between looks up to date and
    running with its process gone, and pyworkflow marks it failed. The
    harness's poll (``update_status``) then reads the database again and finds
    it finished (a job that really died stays failed: the scancel test in
    test_queue.py polls through the same helper)."""
    from scipion_gsplat.headless import update_status
    prot = _finished_import(project, sim_small)
    later = datetime.datetime.now() + datetime.timedelta(hours=1)  # up to date whatever the run touches
    _as_after_the_race(prot, later)
    update_status(project, prot)
    assert prot.isFinished(), prot.getErrorMessage()
    _as_after_the_race(prot, later)
    project._updateProtocol(prot)  # pyworkflow alone: the race's outcome
    assert prot.isFailed() and "not found running" in prot.getErrorMessage()
    update_status(project, prot)
    assert prot.isFinished(), prot.getErrorMessage()


def test_a_project_window_that_lost_the_race_still_sees_the_run_finish(project, sim_small):
    """pyworkflow alone (a project window, no harness re-read), with the time
    stamp taken just after the run's last status write: our runs touch their
    database once more a second after the end, so the window reads it again
    and finds the run finished (without that touch it marks it failed)."""
    import pyworkflow.utils as pwutils
    prot = _finished_import(project, sim_small)
    end = prot.endTime.datetime()
    t0 = time.time()  # the run's process touches its database after its status says finished
    while pwutils.getFileLastModificationDate(prot.getDbPath()) < end + datetime.timedelta(seconds=0.9) \
            and time.time() - t0 < 5:
        time.sleep(0.1)
    _as_after_the_race(prot, end + datetime.timedelta(seconds=0.5))
    project._updateProtocol(prot)
    assert prot.isFinished(), prot.getErrorMessage()
