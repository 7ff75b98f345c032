"""Split-volume classification protocol end to end in a headless Scipion project."""
import os

import numpy as np
import pytest

from scipion_gsplat.headless import launch_and_wait

from conftest import accuracy


@pytest.fixture(scope="module")
def pair_particles(project, sim_pair):
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    prot = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(sim_pair / "particles.star"))
    return launch_and_wait(project, prot, timeout=300)


def _truth_by_id(prot_import, sim_pair):
    truth = np.load(sim_pair / "ground_truth.npz")["labels"]
    ids = [p.getObjId() for p in prot_import.outputParticles.iterItems(orderBy="id")]
    return dict(zip(ids, truth))


def test_split_volume_graph_refine(in_gui_project, sim_pair, tmp_path):
    """The finished graph + refinement run of the session's GUI project (angular
    sampling 10°, 4 refinement iterations; one run serves the GUI tests and this one)."""
    project, prot = in_gui_project["project"], in_gui_project["split"]
    truth = _truth_by_id(in_gui_project["pair"], sim_pair)
    classes = prot.outputClasses
    assert classes.getSize() == 2
    labels, ref = [], []
    for cls in classes:
        assert cls.getRepresentative() is not None
        assert os.path.exists(os.path.join(project.path, cls.getRepresentative().getFileName()))
        for p in cls:
            labels.append(cls.getObjId())
            ref.append(truth[p.getObjId()])
    assert len(labels) == 1200 and accuracy(labels, ref) > 0.97
    assert prot.outputVolumes.getSize() == 2
    first = prot.outputParticles.getFirstItem()
    assert 0.5 <= first._gsplatClassProbability.get() <= 1.0
    assert "Particles per class" in prot.summary()[1]
    # viewer PNGs, headless
    from scipion_gsplat.viewers import GsplatSplitVolumeViewer
    viewer = GsplatSplitVolumeViewer(project=project, protocol=prot)
    paths = viewer.savePngs(str(tmp_path), n_directions=1)
    assert len(paths) == 2 and all(os.path.getsize(p) > 5000 for p in paths)


def test_split_volume_resumes_after_a_kill(project, pair_particles):
    """Kill the run during the split step, continue it: finished steps are not redone."""
    import time
    from pyworkflow.protocol.constants import MODE_RESUME
    from scipion_gsplat.protocols import ProtGsplatSplitVolume
    from scipion_gsplat.protocols.protocol_split_volume import MODE_GRAPH_REFINE
    prot = project.newProtocol(ProtGsplatSplitVolume, mode=MODE_GRAPH_REFINE, angularSampling=10.0,
                               refineIterations=2, numberOfThreads=1, sigmaAng=0.0)
    prot.inputParticles.set(pair_particles)
    prot.inputParticles.setExtended("outputParticles")
    project.launchProtocol(prot, wait=False)
    converted = os.path.join(project.path, prot._getExtraPath("input_particles.star"))
    started = os.path.join(project.path, prot._getExtraPath("level2"))
    t0 = time.time()
    while not os.path.exists(started) and time.time() - t0 < 300:
        time.sleep(0.5)
    assert os.path.exists(converted)
    project.stopProtocol(prot)
    project._updateProtocol(prot)
    assert not prot.isFinished()
    mtime = os.path.getmtime(converted)
    prot.runMode.set(MODE_RESUME)
    launch_and_wait(project, prot, timeout=900)
    assert os.path.getmtime(converted) == mtime  # the convert step was not run again
    assert prot.outputClasses.getSize() == 2


def test_split_volume_three_classes_stops_when_unsupported(project, pair_particles):
    """A two-state set asked for three classes: the second split is not supported."""
    from scipion_gsplat.protocols import ProtGsplatSplitVolume
    from scipion_gsplat.protocols.protocol_split_volume import MODE_POOLED
    prot = project.newProtocol(ProtGsplatSplitVolume, mode=MODE_POOLED, numberOfClasses=3,
                               refineIterations=2, numberOfThreads=2, sigmaAng=0.0)  # exact poses: kept
    prot.inputParticles.set(pair_particles)
    prot.inputParticles.setExtended("outputParticles")
    launch_and_wait(project, prot, timeout=900)
    assert prot.outputClasses.getSize() == 2
    assert os.path.exists(os.path.join(project.path, prot._getExtraPath("stop")))
