"""Chaining with the real RELION Scipion plugin (scipion-em-relion) both ways.

Our split-volume outputs go into RELION protocols (reconstruct one class,
postprocess a class map's half maps, 3D classification without alignment from
our class map), and RELION's classes come back into ours, which must keep
RELION's class labels. RELION runs are kept short (1200 particles of 40 px,
two iterations, one thread). Skipped with the reason when the plugin or the
RELION programs (tests/conftest.py links /usr/bin/relion_* as RELION_HOME) are
absent; ``scripts/install.sh`` installs both.
"""
import os

import numpy as np
import pytest

from scipion_gsplat.core import io
from scipion_gsplat.headless import launch_and_wait


def _relion_missing() -> str:
    try:
        import relion  # noqa: F401  (scipion-em-relion)
    except ImportError:
        return "scipion-em-relion is not installed (scripts/install.sh installs it)"
    home = os.environ.get("RELION_HOME", "")
    if not os.path.exists(os.path.join(home, "bin", "relion_refine")):
        return f"no RELION programs under RELION_HOME={home!r} (apt-get install relion)"
    return ""


pytestmark = pytest.mark.skipif(bool(_relion_missing()), reason=_relion_missing() or "-")
N_MICS = 12


def write_real_layout(src_star, out_dir) -> str:
    """The simulated STAR as users have it: picking coordinates (px), micrograph
    names (N_MICS micrographs) and two optics groups (same optics). Returns its path."""
    star = io.read_particles(src_star)
    p = star.particles.copy()
    n = len(p)
    p["rlnImageName"] = [f"{i + 1:06d}@{os.path.abspath(os.path.join(os.path.dirname(src_star), 'particles.mrcs'))}"
                         for i in range(n)]
    p["rlnMicrographName"] = [f"MotionCorr/job002/mic{i % N_MICS:03d}.mrc" for i in range(n)]
    p["rlnCoordinateX"] = 50.0 + 3 * np.arange(n)
    p["rlnCoordinateY"] = 2000.0 - np.arange(n)
    p["rlnOpticsGroup"] = 1 + (np.arange(n) >= n // 2)
    optics = star.optics.copy()
    two = optics.loc[[0, 0]].reset_index(drop=True)
    two["rlnOpticsGroup"] = [1, 2]
    two["rlnOpticsGroupName"] = ["opticsGroup1", "opticsGroup2"]
    path = os.path.join(out_dir, "particles_real_layout.star")
    io.write_particles(path, io.ParticleStar(p, two, star.path), p)
    return path


@pytest.fixture(scope="module")
def layout_particles(project, sim_pair, tmp_path_factory):
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    star = write_real_layout(sim_pair / "particles.star", tmp_path_factory.mktemp("layout"))
    prot = project.newProtocol(ProtGsplatImportParticlesStar, starFile=star)
    return launch_and_wait(project, prot, timeout=300)


@pytest.fixture(scope="module")
def our_split(project, layout_particles):
    from scipion_gsplat.protocols import ProtGsplatSplitVolume
    from scipion_gsplat.protocols.protocol_split_volume import MODE_POOLED
    prot = project.newProtocol(ProtGsplatSplitVolume, mode=MODE_POOLED, refineIterations=2, numberOfThreads=1,
                               sigmaAng=0.0)  # exact poses: kept (the pose search is tested on the programs)
    prot.inputParticles.set(layout_particles)
    prot.inputParticles.setExtended("outputParticles")
    return launch_and_wait(project, prot, timeout=900)


def _map(project, obj) -> np.ndarray:
    path = obj.getFileName().split(":")[0]
    return io.read_map(path if os.path.isabs(path) else os.path.join(project.path, path))[0]


def _corr(a, b) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _our_labels(prot) -> dict:
    return {p.getObjId(): p.getClassId() for p in prot.outputParticles.iterItems()}


def test_our_classes_in_scipion_form(project, our_split):
    """Class representatives carry their half maps; one FSC per class; particles
    carry class id, _rlnClassNumber (also on the coordinate) and probabilities."""
    classes = our_split.outputClasses
    assert classes.getSize() == 2
    for cls in classes:
        halves = cls.getRepresentative().getHalfMaps(asList=True)
        assert len(halves) == 2 and all(os.path.exists(os.path.join(project.path, h)) for h in halves)
    fscs = our_split.outputFSCs
    assert fscs.getSize() == 2
    for fsc in fscs:
        assert 2.0 * 2 <= float(fsc.calculateResolution(0.143)) < 40
    part = our_split.outputParticles.getFirstItem()
    assert part.getClassId() == part._rlnClassNumber.get() == part.getCoordinate()._rlnClassNumber.get()
    assert 0.5 <= part._rlnMaxValueProbDistribution.get() <= 1.0
    assert part.getCoordinate().getMicName().startswith("MotionCorr/job002/mic")


def test_relion_reconstruct_one_of_our_classes(project, our_split):
    """relion_reconstruct --class 1 on our output particles (failed before:
    "The rlnClassNumber column is missing") gives our class 1 map."""
    from relion.protocols import ProtRelionReconstruct
    prot = project.newProtocol(ProtRelionReconstruct, classNum=1, doCTF=True, numberOfMpi=1)
    prot.inputParticles.set(our_split)
    prot.inputParticles.setExtended("outputParticles")
    launch_and_wait(project, prot, timeout=300)
    ours = _map(project, next(c for c in our_split.outputVolumes if c.getObjId() == 1))
    other = _map(project, next(c for c in our_split.outputVolumes if c.getObjId() == 2))
    relion_map = _map(project, prot.outputVolume)
    assert _corr(relion_map, ours) > 0.9 and _corr(relion_map, ours) > _corr(relion_map, other)


def test_relion_postprocess_of_our_class_half_maps(project, our_split):
    """RELION postprocess reads a class map's half maps through Volume.getHalfMaps()."""
    from relion.protocols import ProtRelionCreateMask3D, ProtRelionPostprocess
    mask = project.newProtocol(ProtRelionCreateMask3D, threshold=0.01, extend=2, edge=3, numberOfThreads=1)
    mask.inputVolume.set(our_split)
    mask.inputVolume.setExtended("outputVolumes.1")
    launch_and_wait(project, mask, timeout=300)
    post = project.newProtocol(ProtRelionPostprocess, relionInput=False, inputType=0)
    post.inputVolume.set(our_split)
    post.inputVolume.setExtended("outputVolumes.1")
    post.solventMask.set(mask.outputMask)
    launch_and_wait(project, post, timeout=300)
    relion_fsc = io.read_star_table(os.path.join(project.path, post._getExtraPath("postprocess.star")), "fsc")
    ours = io.read_star_table(os.path.join(project.path, our_split._getExtraPath("class1_fsc.star")), "fsc")
    n = min(len(relion_fsc), len(ours))
    assert n > 10  # RELION's FSC of our half maps (unmasked) is our class-1 FSC
    assert np.allclose(relion_fsc["rlnFourierShellCorrelationUnmaskedMaps"][:n],
                       ours["rlnFourierShellCorrelation"][:n], atol=1e-3)
    fsc = next(f for f in our_split.outputFSCs if f.getObjId() == 1)
    assert np.allclose(fsc.getData()[1][:n], ours["rlnFourierShellCorrelation"][:n], atol=1e-6)


@pytest.fixture(scope="module")
def relion_classes(project, our_split):
    """RELION 3D classification without image alignment, 2 classes, started
    from our class 1 map, 2 iterations."""
    from relion.protocols import ProtRelionClassify3D
    prot = project.newProtocol(ProtRelionClassify3D, numberOfClasses=2, numberOfIterations=2,
                               doImageAlignment=False, copyAlignment=True, doGpu=False,
                               initialLowPassFilterA=15, maskDiameterA=76, numberOfMpi=1,
                               numberOfThreads=1, isMapAbsoluteGreyScale=False)
    prot.inputParticles.set(our_split)
    prot.inputParticles.setExtended("outputParticles")
    prot.referenceVolume.set(our_split)
    prot.referenceVolume.setExtended("outputVolumes.1")
    return launch_and_wait(project, prot, timeout=600)


def test_ours_keep_relion_class_labels(project, our_split, relion_classes):
    """RELION's classes → our reconstruction of class 1: the STAR we write has
    RELION's labels (it had ours before), for the classes and for particles taken
    out of them; our class-1 map matches RELION's class-1 map."""
    from scipion_gsplat.protocols import ProtGsplatReconstructFourier
    relion_labels = {}
    for cls in relion_classes.outputClasses:
        for p in cls:
            relion_labels[p.getObjId()] = cls.getObjId()
    ours = _our_labels(our_split)
    assert any(relion_labels[i] != ours[i] for i in relion_labels), "RELION kept every label: no test"
    prot = project.newProtocol(ProtGsplatReconstructFourier, classNum=1, numberOfThreads=1)
    prot.inputParticles.set(relion_classes)
    prot.inputParticles.setExtended("outputClasses")
    launch_and_wait(project, prot, timeout=300)
    table = io.read_particles(os.path.join(project.path, prot._getExtraPath("input_particles.star"))).particles
    written = dict(zip(table["rlnImageId"].astype(int), table["rlnClassNumber"].astype(int)))
    assert written == relion_labels
    assert {"rlnCoordinateX", "rlnMicrographName", "rlnMicrographId"} <= set(table.columns)
    rep = next(c for c in relion_classes.outputClasses if c.getObjId() == 1).getRepresentative()
    assert _corr(_map(project, prot.outputVolume), _map(project, rep)) > 0.8


def test_split_volume_on_relion_classes_keeps_their_labels(project, relion_classes):
    """A SetOfClasses3D from RELION as our split-volume input: the converted STAR
    carries RELION's class of every particle; the run completes."""
    from scipion_gsplat.protocols import ProtGsplatSplitVolume
    from scipion_gsplat.protocols.protocol_split_volume import MODE_POOLED
    prot = project.newProtocol(ProtGsplatSplitVolume, mode=MODE_POOLED, refineIterations=1, numberOfThreads=1,
                               sigmaAng=0.0)  # exact poses: kept
    prot.inputParticles.set(relion_classes)
    prot.inputParticles.setExtended("outputClasses")
    launch_and_wait(project, prot, timeout=900)
    table = io.read_particles(os.path.join(project.path, prot._getExtraPath("input_particles.star"))).particles
    relion_labels = {p.getObjId(): cls.getObjId() for cls in relion_classes.outputClasses for p in cls}
    assert dict(zip(table["rlnImageId"].astype(int), table["rlnClassNumber"].astype(int))) == relion_labels
    assert prot.outputParticles.getSize() == len(relion_labels) and prot.outputClasses.getSize() == 2
