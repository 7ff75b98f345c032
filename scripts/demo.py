"""scipion-gsplat demo (run by scripts/demo.sh).

1. Simulate 3000 lysozyme particles (PDB 1AKI, 64 px at 1.5 Å, random poses,
   CTF, SNR 0.1) with gsplat_simulate.
2. Create a headless Scipion project, import the particles from their STAR
   file and reconstruct them (half maps, FSC) with the plugin's protocols.
3. Print the half-map resolution and the FSC of the map against the truth.
4. Simulate a two-state set (lysozyme β-domain rotated 30° about its hinge in
   half of 3000 particles, SNR 0.05), classify it with the split-volume protocol
   (graph + 3D refinement), print the accuracy against the truth and write the
   viewer's figures (PCA histograms, direction graph) as PNG files.
5. Simulate a continuous motion (the β-domain at one of 10 hinge angles from
   0 to 40°, 2000 particles, SNR 0.1), run the GMM heterogeneity protocol
   (2 eigen-motions), print the rank correlation of the first coordinate with
   the true angle and write the viewer's figures.

Output folder: demo_output/ (or the first argument).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "demo_output").absolute()

from scipion_gsplat import headless  # noqa: E402  (no pyworkflow import yet)

headless.configure(OUT / "scipion")


def main() -> int:
    from scipion_gsplat.core import fsc, io
    from scipion_gsplat.programs import simulate
    import numpy as np
    from scipion_gsplat.protocols import (ProtGsplatGmmHeterogeneity, ProtGsplatImportParticlesStar,
                                          ProtGsplatReconstructFourier, ProtGsplatSplitVolume)
    from scipion_gsplat.protocols.protocol_split_volume import MODE_GRAPH_REFINE
    from scipion_gsplat.viewers import GsplatHeterogeneityViewer, GsplatSplitVolumeViewer
    from scipy.stats import spearmanr

    t0 = time.time()
    sim = OUT / "simulated"
    print(f"[demo] 1/5 simulating particles into {sim}", flush=True)
    code = simulate.run(["-i", str(REPO / "tests" / "data" / "1aki.pdb"), "-o", str(sim),
                         "-n", "3000", "--box", "64", "--angpix", "1.5", "--snr", "0.1", "--seed", "1"])
    if code:
        return code

    print("[demo] 2/5 headless Scipion project: import particles (STAR), reconstruct fourier", flush=True)
    project = headless.new_project(f"gsplat_demo_{int(time.time())}")
    os.chdir(project.path)
    imp = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(sim / "particles.star"))
    headless.launch_and_wait(project, imp, timeout=900)
    rec = project.newProtocol(ProtGsplatReconstructFourier, symmetryGroup="c1", numberOfThreads=2)
    rec.inputParticles.set(imp)
    rec.inputParticles.setExtended("outputParticles")
    headless.launch_and_wait(project, rec, timeout=1800)

    print("[demo] 3/5 results", flush=True)
    vol_path = os.path.join(project.path, rec.outputVolume.getFileName())
    vol, pix = io.read_map(vol_path)
    truth, _ = io.read_map(sim / "truth_state1.mrc")
    freq, curve = fsc.fsc_curve(vol, truth, pix)
    print(f"  particles imported        : {imp.outputParticles.getSize()}")
    print(f"  map                       : {vol_path}")
    print(f"  half-map resolution       : {float(rec.outputFSC.calculateResolution(0.143)):.2f} Å (FSC 0.143)")
    print(f"  map vs truth              : {fsc.resolution_at(freq, curve, 0.5):.2f} Å (FSC 0.5), "
          f"AUC {fsc.fsc_auc(curve):.3f}")
    print(f"  Scipion project           : {project.path}")

    print("[demo] 4/5 split-volume classification of a two-state set", flush=True)
    pair = OUT / "two_states"
    code = simulate.run(["-i", str(REPO / "tests" / "data" / "1aki.pdb"), "-o", str(pair), "-n", "3000",
                         "--box", "64", "--angpix", "1.5", "--snr", "0.05", "--hinge", "A/40-88",
                         "--hinge-angle", "30", "--seed", "2"])
    if code:
        return code
    imp2 = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(pair / "particles.star"))
    headless.launch_and_wait(project, imp2, timeout=900)
    split = project.newProtocol(ProtGsplatSplitVolume, mode=MODE_GRAPH_REFINE, numberOfThreads=2)
    split.inputParticles.set(imp2)
    split.inputParticles.setExtended("outputParticles")
    headless.launch_and_wait(project, split, timeout=3600)
    truth = dict(zip((p.getObjId() for p in imp2.outputParticles.iterItems(orderBy="id")),
                     np.load(pair / "ground_truth.npz")["labels"]))
    got, ref = [], []
    for cls in split.outputClasses:
        for p in cls:
            got.append(cls.getObjId())
            ref.append(truth[p.getObjId()])
    got, ref = np.array(got), np.array(ref)
    acc = max((got == ref).mean(), (got != ref).mean())
    pngs = GsplatSplitVolumeViewer(project=project, protocol=split).savePngs(str(OUT / "viewer"), 3)
    print(f"  classes                   : {[c.getSize() for c in split.outputClasses]} (truth 1500 / 1500)")
    print(f"  accuracy vs truth         : {acc:.4f}")
    print(f"  viewer figures            : {', '.join(os.path.basename(p) for p in pngs)} in {OUT / 'viewer'}")

    print("[demo] 5/5 GMM heterogeneity of a continuous hinge motion", flush=True)
    motion = OUT / "motion"
    code = simulate.run(["-i", str(REPO / "tests" / "data" / "1aki.pdb"), "-o", str(motion), "-n", "2000",
                         "--box", "64", "--angpix", "1.5", "--snr", "0.1", "--hinge", "A/40-88",
                         "--hinge-angle", "40", "--n-states", "10", "--seed", "3"])
    if code:
        return code
    imp3 = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(motion / "particles.star"))
    headless.launch_and_wait(project, imp3, timeout=900)
    het = project.newProtocol(ProtGsplatGmmHeterogeneity, nMotions=2, rounds=3, nFrames=5, nClasses=3,
                              numberOfThreads=2)
    het.inputParticles.set(imp3)
    het.inputParticles.setExtended("outputParticles")
    headless.launch_and_wait(project, het, timeout=3600)
    angle = dict(zip((p.getObjId() for p in imp3.outputParticles.iterItems(orderBy="id")),
                     np.load(motion / "ground_truth.npz")["parameters"]))
    pairs = [(float(p._gsplatCoordinate1.get()), angle[p.getObjId()]) for p in het.outputParticles]
    rho = abs(spearmanr(*zip(*pairs)).correlation)
    pngs = GsplatHeterogeneityViewer(project=project, protocol=het).savePngs(str(OUT / "viewer_heterogeneity"))
    for line in het.summary():
        print(f"  {line}")
    print(f"  |Spearman ρ| coordinate 1 vs hinge angle: {rho:.3f}")
    print(f"  maps along motion 1       : {os.path.join(project.path, het._getExtraPath())}/"
          f"motion01_frame*.mrc ({het.outputVolumes.getSize()} maps in all)")
    print(f"  viewer figures            : {', '.join(os.path.basename(p) for p in pngs)} "
          f"in {OUT / 'viewer_heterogeneity'}")
    print(f"[demo] done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
