"""Protocol: Gaussian-splat reconstruction (gsplat_reconstruct_splat)."""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.objects import FSC, AtomStruct, SetOfParticles, Volume
from pwem.protocols import ProtReconstruct3D

from ..core.io import read_star_table
from .base import GsplatProgramMixin

INIT_DATA, INIT_VOLUME, INIT_STRUCTURE, INIT_RANDOM = range(4)
INIT_CHOICES = ["reconstruction of the particles", "volume", "atomic structure", "random in a mask"]
MRC_SUFFIXES = (".mrc", ".map", ".mrcs")


def _mrc_path(obj) -> str:
    """Absolute path of an image object's MRC file (drops ``:mrc`` suffixes)."""
    return os.path.abspath(obj.getFileName().split(":")[0])


class ProtGsplatReconstructSplat(GsplatProgramMixin, ProtReconstruct3D):
    """Reconstruct a map as a sum of 3D Gaussians whose analytic projections
    (with the particles' origins and CTF) are fitted to the particles by gradient
    descent (Adam), poses fixed. The two half sets are fitted independently from
    independent starts, giving half maps and their FSC (gold standard). The
    Gaussian model is also given as an atomic structure (centres as atoms, B from
    the width) to open with the map in ChimeraX or Coot.
    """
    _label = "gaussian splat reconstruction"
    _references = ["Drager2024splat"]
    _possibleOutputs = {"outputVolume": Volume, "outputFSC": FSC, "outputAtomStruct": AtomStruct,
                        "outputParticles": SetOfParticles}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", label="Input particles",
                      help="Particles with 3D poses (projection alignment) and CTF, e.g. from a RELION "
                           "Refine3D or a CryoSPARC refinement (imported), with their half-set numbers "
                           "when present. Poses are refined locally unless the pose errors are set to 0.")
        form.addParam("initialModel", params.EnumParam, choices=INIT_CHOICES, default=INIT_DATA,
                      label="Initial model",
                      help="Reconstruction: each half set starts from points sampled in its own "
                           "Fourier reconstruction (independent starts). Volume: points sampled "
                           "in a (low-passed) map. Atomic structure: one Gaussian per atom or "
                           "residue. Random: uniform points inside a mask.")
        form.addParam("initVolume", params.PointerParam, pointerClass="Volume",
                      condition=f"initialModel=={INIT_VOLUME}", label="Initial volume",
                      help="Map (MRC) with the particles' box and pixel size, e.g. the consensus "
                           "refinement's map; it is low-passed (10 Å) and the Gaussians are placed where "
                           "its density is high.")
        form.addParam("initStructure", params.PointerParam, pointerClass="AtomStruct",
                      condition=f"initialModel=={INIT_STRUCTURE}", label="Initial structure",
                      help="PDB/mmCIF in the frame of a map of the particles' box with its "
                           "origin at the corner (as fitted in the consensus map).")
        form.addParam("atomLevel", params.EnumParam, choices=["atom", "residue"], default=0,
                      condition=f"initialModel=={INIT_STRUCTURE}", label="One Gaussian per",
                      help="atom (default): one Gaussian per atom of the structure (fine, many "
                           "Gaussians: about 8 per residue). residue: one per residue at its centre "
                           "(about 8 times fewer, faster; usually enough for maps worse than about 4 Å).")
        form.addParam("centerStructure", params.BooleanParam, default=False,
                      condition=f"initialModel=={INIT_STRUCTURE}", label="Centre the structure?",
                      help="Put the structure's centre of mass at the box centre instead of "
                           "using its coordinates as they are.")
        form.addParam("inputMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      condition=f"initialModel in [{INIT_DATA}, {INIT_VOLUME}, {INIT_RANDOM}]",
                      label="Mask",
                      help="Random start: the Gaussians are placed inside it (required). "
                           "Reconstruction/volume start: restricts where they are placed.")
        form.addParam("nGaussians", params.IntParam, default=2000, validators=[params.Positive],
                      condition=f"initialModel!={INIT_STRUCTURE}", label="Number of Gaussians",
                      help="How many Gaussians describe the map (not used with an atomic structure). "
                           "2000 (default) is a starting point; a large complex or a finer map needs more, "
                           "up to about one per residue. Time and memory grow with the number; "
                           "'Densify' can add more where the fit needs them.")
        form.addParam("gaussianType", params.EnumParam, choices=["isotropic", "anisotropic"], default=0,
                      label="Gaussian type",
                      help="Isotropic: one width per Gaussian (fast, separable rendering). "
                           "Anisotropic: full covariance (Cholesky factor).")
        form.addSection(label="Fitting")
        form.addParam("iterations", params.IntParam, default=10, validators=[params.Positive],
                      label="Iterations (epochs)",
                      help="Passes over all the particles of each half set (as cryoDRGN's epochs). "
                           "10 (default); if the loss curve of the viewer still falls at the end, run "
                           "more. Time grows in proportion.")
        form.addParam("batchSize", params.IntParam, default=32, validators=[params.Positive],
                      expertLevel=params.LEVEL_ADVANCED, label="Particles per step",
                      help="Particles per optimiser (Adam) step, the minibatch size (as cryoDRGN's "
                           "--batch-size or the batch size of CryoSPARC's ab-initio). 32 (default); "
                           "larger is smoother and faster per particle on a GPU but takes fewer steps "
                           "per epoch.")
        form.addParam("doHalves", params.BooleanParam, default=True, label="Independent half sets?",
                      help="Yes (default): fit the two half sets separately from independent starts, "
                           "giving half maps and a gold-standard FSC resolution (as RELION auto-refine "
                           "and CryoSPARC). No: one fit of all particles, about half the time, no FSC.")
        form.addParam("doDensify", params.BooleanParam, default=False, label="Densify?",
                      help="Add Gaussians where the fit needs them: every few epochs the 5 % with the "
                           "largest position gradients are split (large ones) or cloned (small ones), up "
                           "to twice the initial number. Useful when the start has too few Gaussians in "
                           "some region; off by default.")
        form.addParam("densifyEvery", params.IntParam, default=2, condition="doDensify",
                      label="Densify every (epochs)",
                      help="Epochs between two densification rounds (default 2); none in the last 40 % "
                           "of the epochs, so the new Gaussians settle.")
        form.addParam("pruneThreshold", params.FloatParam, default=0.0, label="Prune below",
                      help="Remove Gaussians whose amplitude falls below this fraction of the median "
                           "amplitude, e.g. 0.05 to drop Gaussians that fitted noise outside the "
                           "molecule; 0 (default): never.")
        form.addParam("bondWeight", params.FloatParam, default=0.0, expertLevel=params.LEVEL_ADVANCED,
                      label="Bond regulariser weight",
                      help="Strength of harmonic springs between neighbouring Gaussians (rest length: "
                           "their median distance), as in Dräger (2024). It helps only a start far from "
                           "the truth (centre errors of ~2 Å: 3.4 → 2.0 Å with 0.1) and spoils a good "
                           "one (0.4 → 1.8 Å), so 0 (default, off) unless the start is poor.")
        form.addParam("lrCentres", params.FloatParam, default=0.1, expertLevel=params.LEVEL_ADVANCED,
                      label="Learning rate of the centres (Å)",
                      help="Adam step of the Gaussian centres in Å at the start (it decays to 5 % along "
                           "a cosine by the end). 0.1 Å (default); larger moves the Gaussians faster "
                           "from a poor start but can make the fit noisy.")
        form.addParam("sigmaAng", params.FloatParam, default=2.0, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Pose refinement: angular σ (deg)",
                      help="Expected error of the input orientations (degrees per axis, a Gaussian prior): "
                           "each particle's orientation is refined within about 3σ of its input pose. "
                           "Typical 1-3 for poses from a consensus refinement. 0: orientations fixed.")
        form.addParam("sigmaShift", params.FloatParam, default=1.0, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Pose refinement: shift σ (px)",
                      help="Expected error of the input origins (pixels per axis); typical 0.5-1. "
                           "0: poses fixed.")
        form.addParam("alignRounds", params.IntParam, default=2, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Local search rounds",
                      help="Rounds of local pose searches before the fit, gold standard as in RELION's "
                           "auto-refine with local searches: each half set is aligned against its own half "
                           "map, rebuilt every round. 0: no searches.")
        form.addParam("jointPoses", params.BooleanParam, default=False,
                      expertLevel=params.LEVEL_ADVANCED, label="Refine poses during the fit?",
                      help="Also refine the poses by gradient descent together with the Gaussians "
                           "(a small further gain with pose errors, a small loss with exact poses).")
        self._defineExtraParams(form, "gsplat_reconstruct_splat", "--init-lowpass 8 --time-limit 3600")
        self._defineComputeParams(form, mpi=True)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.reconstructStep)
        self._insertFunctionStep(self.createOutputStep)

    # ------------------------------------------------------------------ steps
    def convertInputStep(self):
        self._convertPosedParticles()

    def _programArgs(self) -> list:
        init = self.initialModel.get()
        args = ["-i", self._getExtraPath("input_particles.star"), "-o", self._getExtraPath(),
                "--iterations", self.iterations.get(), "--batch", self.batchSize.get(),
                "--gaussian-type", "aniso" if self.gaussianType.get() == 1 else "iso",
                "--lr-centres", self.lrCentres.get(),
                "--sigma-ang", self.sigmaAng.get(), "--sigma-shift", self.sigmaShift.get(),
                "--align-rounds", self.alignRounds.get()]
        if self.jointPoses.get():
            args.append("--joint-poses")
        if init == INIT_STRUCTURE:
            args += ["--init", "pdb", "--init-file", os.path.abspath(self.initStructure.get().getFileName()),
                     "--level", ["atom", "residue"][self.atomLevel.get()],
                     "--pdb-center", "com" if self.centerStructure else "box"]
        else:
            args += ["--n-gaussians", self.nGaussians.get()]
            args += ["--init", "random"] if init == INIT_RANDOM else ["--init", "map"]
            if init == INIT_VOLUME:
                args += ["--init-file", _mrc_path(self.initVolume.get())]
            if self.inputMask.get() is not None:
                args += ["--mask", _mrc_path(self.inputMask.get())]
        if self.doHalves:
            args.append("--halves")
        if self.doDensify:
            args += ["--densify-every", self.densifyEvery.get()]
        if self.pruneThreshold.get() > 0:
            args += ["--prune", self.pruneThreshold.get()]
        if self.bondWeight.get() > 0:
            args += ["--bond-weight", self.bondWeight.get()]
        extra = (self.extraParams.get() or "").split()
        return args + extra

    def reconstructStep(self):
        self.runProgram("reconstruct_splat", self._programArgs(), ranks=True)

    def createOutputStep(self):
        parts = self.inputParticles.get()
        pix = parts.getSamplingRate()
        vol = Volume()
        vol.setFileName(self._getExtraPath("map.mrc"))
        vol.setSamplingRate(pix)
        outputs = {"outputVolume": vol}
        if self.doHalves:
            vol.setHalfMaps([self._getExtraPath("map_half1.mrc"), self._getExtraPath("map_half2.mrc")])
            table = read_star_table(self._getExtraPath("fsc.star"), "fsc")
            fsc = FSC(objLabel="GSFSC (half maps)")
            fsc.setData(table["rlnResolution"].tolist(), table["rlnFourierShellCorrelation"].tolist())
            outputs["outputFSC"] = fsc
        structure = self._modelStructurePath()
        atoms = AtomStruct(filename=structure, pseudoatoms=True)
        atoms.setVolume(vol)
        outputs["outputAtomStruct"] = atoms
        if os.path.exists(self._getExtraPath("particles.star")):  # poses refined
            outputs["outputParticles"] = self._refinedParticles(self._getExtraPath("particles.star"))
        self._defineOutputs(**outputs)
        for obj in outputs.values():
            self._defineSourceRelation(self.inputParticles, obj)

    def _modelStructurePath(self) -> str:
        for ext in ("pdb", "cif"):
            path = self._getExtraPath(f"model.{ext}")
            if os.path.exists(path):
                return path
        return self._getExtraPath("model.pdb")

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        self._validatePosedParticles(errors)
        init = self.initialModel.get()
        if init == INIT_VOLUME:
            vol = self.initVolume.get()
            if vol is None:
                errors.append("Choose an initial volume.")
            elif not _mrc_path(vol).lower().endswith(MRC_SUFFIXES):
                errors.append("The initial volume must be an MRC file.")
        if init == INIT_STRUCTURE and self.initStructure.get() is None:
            errors.append("Choose an initial atomic structure.")
        if init == INIT_RANDOM and self.inputMask.get() is None:
            errors.append("A random start needs a mask.")
        return errors

    def _summary(self):
        data = self._summaryData()
        if not data:
            return ["Output not ready yet."]
        lines = [f"{data['n_gaussians']} Gaussians fitted to {data['n_particles']} particles "
                 f"({data['epochs']} epochs, {data['seconds']:.0f} s)."]
        if "resolution_0143_A" in data:
            lines.append(f"Resolution (GSFSC 0.143, half maps): {data['resolution_0143_A']:.2f} Å")
        lines += [f"Note: {n}" for n in data.get("notes", [])]
        return lines

    def _methods(self):
        if not hasattr(self, "outputVolume"):
            return []
        halves = " from two independent half sets" if self.doHalves else ""
        return ["The map was reconstructed as a sum of 3D Gaussians fitted to the particles by "
                "gradient descent on their analytic, CTF-modulated projections (Gaussian splatting "
                f"after Dräger 2024, in scipion-gsplat){halves}."]
