"""The GMM heterogeneity protocol and its viewer, end to end in a headless Scipion project."""
import glob
import os

import pytest
from scipy.stats import spearmanr

from scipion_gsplat.headless import launch_and_wait


@pytest.fixture(scope="module")
def imported(project, sim_motion):
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    prot = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(sim_motion / "particles.star"))
    return launch_and_wait(project, prot, timeout=300)


def _hetero(project, imported, **kwargs):
    from scipion_gsplat.protocols import ProtGsplatGmmHeterogeneity
    settings = dict(nGaussians=400, consensusEpochs=3, nMotions=2, rounds=2, nFrames=3, nClasses=3,
                    numberOfThreads=1)
    settings.update(kwargs)
    prot = project.newProtocol(ProtGsplatGmmHeterogeneity, **settings)
    prot.inputParticles.set(imported)
    prot.inputParticles.setExtended("outputParticles")
    return prot


def test_protocol_is_registered():
    from pwem import Domain
    assert "ProtGsplatGmmHeterogeneity" in Domain.getProtocols()


def test_heterogeneity_outputs_viewer_and_subset(in_gui_project, sim_motion, tmp_path):
    """The finished run of the session's GUI project (the settings of :func:`_hetero`;
    one run serves the GUI tests and this one)."""
    import numpy as np
    from scipion_gsplat.constants import ATTR_COORDINATE
    from scipion_gsplat.viewers import GsplatHeterogeneityViewer
    project, prot = in_gui_project["project"], in_gui_project["het"]
    truth = np.load(sim_motion / "ground_truth.npz")["parameters"]
    parts = prot.outputParticles
    assert parts.getSize() == 1000
    coord = {p.getObjId(): float(getattr(p, ATTR_COORDINATE.format(1)).get()) for p in parts}
    # imported particles keep the STAR order: ids 1..N
    z = np.array([coord[i + 1] for i in range(len(truth))])
    assert abs(spearmanr(z, truth).correlation) > 0.85
    assert prot.outputVolumes.getSize() == 2 * 3
    assert prot.outputClasses.getSize() == 3
    assert sum(c.getSize() for c in prot.outputClasses) == 1000
    assert os.path.exists(prot.outputTrajectory.getFileName())
    assert any("gradient variance" in line for line in prot.summary())

    viewer = GsplatHeterogeneityViewer(project=project, protocol=prot)
    pngs = viewer.savePngs(str(tmp_path / "png"))
    assert [os.path.basename(p) for p in pngs] == ["coordinates.png", "motion1.png", "motion2.png"]
    assert all(os.path.getsize(p) > 10000 for p in pngs)
    assert len(viewer.mapFiles(1)) == 3
    lo, hi = np.percentile(z, [0, 50])

    def subsets():  # the GUI tests of the session may have made some already
        return {name for name, _ in prot.iterOutputAttributes() if name.startswith("subsetMotion1_")}
    before = subsets()
    subset = viewer.createSubset(1, float(lo), float(hi))
    assert abs(subset.getSize() - 500) <= 5
    new = subsets() - before
    # stored in the project database: a fresh load of the project sees it (a protocol object
    # cached by the project before the viewer added the output would not)
    from pyworkflow.project import Manager
    again = Manager().loadProject(project.getShortName()).getProtocol(prot.getObjId())
    assert len(new) == 1 and hasattr(again, new.pop())
    # an empty range: an error, and neither an output nor a set file
    sets_before = set(glob.glob(prot._getPath("*.sqlite")))
    with pytest.raises(ValueError, match="No particle has coordinate 1 between"):
        viewer.createSubset(1, float(z.max()) + 1.0, float(z.max()) + 2.0)
    assert set(glob.glob(prot._getPath("*.sqlite"))) == sets_before
    assert len(subsets() - before) == 1


def test_validation(project, imported):
    from scipion_gsplat.protocols.protocol_gmm_heterogeneity import CONSENSUS_MODEL, CONSENSUS_VOLUME
    prot = _hetero(project, imported, consensusType=CONSENSUS_VOLUME)
    assert any("consensus volume" in e for e in prot.validate())
    prot = _hetero(project, imported, consensusType=CONSENSUS_MODEL)
    assert any("Gaussian model" in e for e in prot.validate())
