"""The Gaussian-splat protocol and its viewer, end to end in a headless Scipion project."""
import os

import pytest

from scipion_gsplat.headless import launch_and_wait


@pytest.fixture(scope="module")
def imported(project, sim_small):
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    prot = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(sim_small / "particles.star"))
    return launch_and_wait(project, prot, timeout=300)


@pytest.fixture(scope="module")
def structure(project, lysozyme_pdb):
    from pwem.protocols import ProtImportPdb
    prot = project.newProtocol(ProtImportPdb, inputPdbData=1, pdbFile=str(lysozyme_pdb), skipChimera=True)
    return launch_and_wait(project, prot, timeout=300)


def _splat(project, imported, **kwargs):
    from scipion_gsplat.protocols import ProtGsplatReconstructSplat
    settings = dict(nGaussians=300, iterations=2, batchSize=32, numberOfThreads=1)
    settings.update(kwargs)
    prot = project.newProtocol(ProtGsplatReconstructSplat, **settings)
    prot.inputParticles.set(imported)
    prot.inputParticles.setExtended("outputParticles")
    return prot


def test_protocol_is_registered():
    from pwem import Domain
    assert "ProtGsplatReconstructSplat" in Domain.getProtocols()
    from scipion_gsplat.viewers import GsplatSplatViewer
    from scipion_gsplat.protocols import ProtGsplatReconstructSplat
    assert ProtGsplatReconstructSplat in GsplatSplatViewer._targets


def test_splat_reconstruction_and_viewer(project, imported, tmp_path):
    from scipion_gsplat.viewers import GsplatSplatViewer
    prot = _splat(project, imported, doHalves=True, pruneThreshold=0.01)
    launch_and_wait(project, prot, timeout=600)
    vol = prot.outputVolume
    assert vol.hasHalfMaps() and len(vol.getHalfMaps().split(",")) == 2
    assert vol.getSamplingRate() == pytest.approx(2.0)
    res = float(prot.outputFSC.calculateResolution(0.143))
    assert 4.0 <= res < 9.0
    atoms = prot.outputAtomStruct
    assert os.path.exists(atoms.getFileName()) and atoms.getFileName().endswith("model.pdb")
    assert any("GSFSC" in line for line in prot.summary())
    viewer = GsplatSplatViewer(project=project, protocol=prot)
    viewer.setProtocol(prot)
    pngs = viewer.savePngs(tmp_path / "views")
    assert [os.path.basename(p) for p in pngs] == ["fsc.png", "loss.png", "model.png"]
    assert all(os.path.getsize(p) > 10000 for p in pngs)
    assert len(viewer._getVisualizeDict()["displayModel"]("displayModel")) == 1


def test_start_from_an_atomic_structure(project, imported, structure):
    from scipion_gsplat.protocols.protocol_reconstruct_splat import INIT_STRUCTURE
    prot = _splat(project, imported, initialModel=INIT_STRUCTURE, atomLevel=1, centerStructure=True,
                  iterations=1, doHalves=False)
    prot.initStructure.set(structure)
    prot.initStructure.setExtended("outputPdb")
    launch_and_wait(project, prot, timeout=600)
    assert not hasattr(prot, "outputFSC")
    assert "129 Gaussians" in prot.summary()[0]
    # the structure's own coordinates are far from this box: a clear failure
    bad = _splat(project, imported, initialModel=INIT_STRUCTURE, centerStructure=False, iterations=1)
    bad.initStructure.set(structure)
    bad.initStructure.setExtended("outputPdb")
    launch_and_wait(project, bad, timeout=600, expect_failure=True)
    log = open(bad.getStderrLog()).read() + open(bad.getStdoutLog()).read()
    assert "outside the particle box" in log


def test_validation(project, imported, tmp_path, sim_small):
    from scipion_gsplat.core import io
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    from scipion_gsplat.protocols.protocol_reconstruct_splat import INIT_RANDOM, INIT_VOLUME
    assert any("needs a mask" in e for e in _splat(project, imported, initialModel=INIT_RANDOM).validate())
    assert any("initial volume" in e for e in _splat(project, imported, initialModel=INIT_VOLUME).validate())
    # particles without CTF
    star = io.read_particles(sim_small / "particles.star")
    parts = star.particles.drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{sim_small / 'particles.mrcs'}" for n in parts["rlnImageName"]]
    io.write_star(tmp_path / "noctf.star", {"optics": star.optics, "particles": parts})
    imp = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(tmp_path / "noctf.star"))
    launch_and_wait(project, imp, timeout=300)
    assert any("no CTF" in e for e in _splat(project, imp).validate())
