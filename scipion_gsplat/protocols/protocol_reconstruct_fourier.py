"""Protocol: Fourier reconstruction with half maps and FSC (gsplat_reconstruct_fourier)."""
from __future__ import annotations

import pyworkflow.protocol.params as params
from pwem.objects import FSC, Volume
from pwem.protocols import ProtReconstruct3D

from ..convert import set_to_star
from ..core.io import read_star_table
from .base import GsplatProgramMixin


class ProtGsplatReconstructFourier(GsplatProgramMixin, ProtReconstruct3D):
    """Reconstruct a map from particles with known poses and CTF: CTF-weighted
    Fourier insertion on a ×2 padded grid, independent half maps and their FSC
    (resolution at FSC 0.143). Point-group symmetry is applied in Fourier space.
    The input may be the classes of a 3D classification (ours, RELION's, …):
    one class is then reconstructed, chosen by its number.
    """
    _label = "reconstruct fourier"
    _possibleOutputs = {"outputVolume": Volume, "outputFSC": FSC}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles,SetOfClasses3D",
                      label="Input particles",
                      help="Particles with 3D poses (projection alignment) and CTF, e.g. from a RELION "
                           "Refine3D or a CryoSPARC refinement, or a SetOfClasses3D (its particles, with "
                           "their class numbers). Two half maps are made from the particles' half sets "
                           "(rlnRandomSubset when present, else alternating particles).")
        form.addParam("classNum", params.IntParam, default=-1, label="Use only this class",
                      help="Reconstruct only the particles of this class (-1: all). The class of a "
                           "particle is its Scipion class id (the class it sits in, for a "
                           "SetOfClasses3D input), else its _rlnClassNumber.")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry",
                      help="Point-group symmetry of the particle, imposed in Fourier space: c1 (none), "
                           "cN, dN, t, o, i (= i2; also i1-i4), in RELION's conventions and orientations, "
                           "as RELION's 'Symmetry' (--sym) or CryoSPARC's 'Symmetry'. Use the group of the "
                           "refinement that gave the poses.")
        form.addParam("maxRes", params.FloatParam, default=-1, label="Max resolution (Å)",
                      help="Use Fourier components up to this resolution (Å), e.g. 8 for a quick "
                           "low-resolution map; -1 (default) uses everything up to Nyquist (2 × pixel "
                           "size). As --maxres of relion_reconstruct.")
        form.addParam("doCTF", params.BooleanParam, default=True, label="Correct the CTF?",
                      help="Yes (default): each image is weighted by its CTF when inserted and the sum is "
                           "divided by the summed CTF² (as relion_reconstruct --ctf). No: the images "
                           "are inserted as they are; only for images without a CTF (e.g. simulated "
                           "without one): images that have one give a map with the CTF's oscillations.")
        form.addParam("doWiener", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Wiener filter?",
                      help="Regularise the CTF division with the spectral signal-to-noise ratio measured "
                           "from the two half maps (a Wiener filter, as RELION's tau2 regularisation): "
                           "less noise at high resolution. No (default): plain CTF-weighted average.")
        self._defineComputeParams(form, mpi=True)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.reconstructStep)
        self._insertFunctionStep(self.createOutputStep)

    # ------------------------------------------------------------------ steps
    def convertInputStep(self):
        set_to_star(self.inputParticles.get(), self._getExtraPath("input_particles.star"),
                    need_ctf=self.doCTF.get())

    def reconstructStep(self):
        args = ["-i", self._getExtraPath("input_particles.star"), "-o", self._getExtraPath("map.mrc"),
                "--halves", "--sym", self.symmetryGroup.get()]
        if self.classNum.get() > 0:
            args += ["--class", self.classNum.get()]
        if self.maxRes.get() > 0:
            args += ["--maxres", self.maxRes.get()]
        if not self.doCTF:
            args.append("--no-ctf")
        if self.doWiener:
            args.append("--wiener")
        self.runProgram("reconstruct_fourier", args, ranks=True)

    def createOutputStep(self):
        parts = self._inputImages()
        vol = Volume()
        vol.setFileName(self._getExtraPath("map.mrc"))
        vol.setSamplingRate(parts.getSamplingRate())
        vol.setHalfMaps([self._getExtraPath("map_half1.mrc"), self._getExtraPath("map_half2.mrc")])
        fsc = self._fsc(read_star_table(self._getExtraPath("map_fsc.star"), "fsc"), "FSC (half maps)")
        self._defineOutputs(outputVolume=vol, outputFSC=fsc)
        self._defineSourceRelation(self.inputParticles, vol)
        self._defineSourceRelation(self.inputParticles, fsc)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        self._validateSymmetry(errors)
        if self.inputParticles.get() is not None:
            parts = self._inputImages()
            if self.doCTF and not parts.hasCTF():
                errors.append("The input particles have no CTF; switch off CTF correction.")
            if not parts.hasAlignmentProj():
                errors.append("The input particles have no 3D poses (projection alignment).")
        return errors

    def _summary(self):
        if not hasattr(self, "outputFSC"):
            return ["Output not ready yet."]
        return [f"Resolution (FSC 0.143, half maps): {float(self.outputFSC.calculateResolution(0.143)):.2f} Å",
                f"Symmetry {self.symmetryGroup.get()}, "
                f"{self._inputImages().getSize()} particles"
                + (f", class {self.classNum.get()}." if self.classNum.get() > 0 else ".")]

    def _methods(self):
        return ["The map was reconstructed by CTF-weighted Fourier insertion (scipion-gsplat) "
                "from two independent half sets."] if hasattr(self, "outputVolume") else []
