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
    """
    _label = "reconstruct fourier"
    _possibleOutputs = {"outputVolume": Volume, "outputFSC": FSC}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", label="Input particles",
                      help="Particles with 3D poses (projection alignment) and CTF.")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry",
                      help="Point group: c1, cN, dN, t, o, i (RELION conventions).")
        form.addParam("maxRes", params.FloatParam, default=-1, label="Max resolution (Å)",
                      help="Use Fourier components up to this resolution; -1 for Nyquist.")
        form.addParam("doCTF", params.BooleanParam, default=True, label="Correct the CTF?")
        form.addParam("doWiener", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Wiener filter?",
                      help="Regularise with the spectral SNR measured from the half maps.")
        self._defineComputeParams(form)

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
        if self.maxRes.get() > 0:
            args += ["--maxres", self.maxRes.get()]
        if not self.doCTF:
            args.append("--no-ctf")
        if self.doWiener:
            args.append("--wiener")
        self.runProgram("reconstruct_fourier", args)

    def createOutputStep(self):
        parts = self.inputParticles.get()
        vol = Volume()
        vol.setFileName(self._getExtraPath("map.mrc"))
        vol.setSamplingRate(parts.getSamplingRate())
        vol.setHalfMaps([self._getExtraPath("map_half1.mrc"), self._getExtraPath("map_half2.mrc")])
        table = read_star_table(self._getExtraPath("map_fsc.star"), "fsc")
        fsc = FSC(objLabel="FSC (half maps)")
        fsc.setData(table["rlnResolution"].tolist(), table["rlnFourierShellCorrelation"].tolist())
        self._defineOutputs(outputVolume=vol, outputFSC=fsc)
        self._defineSourceRelation(self.inputParticles, vol)
        self._defineSourceRelation(self.inputParticles, fsc)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        self._validateSymmetry(errors)
        parts = self.inputParticles.get()
        if parts is not None and self.doCTF and not parts.hasCTF():
            errors.append("The input particles have no CTF; switch off CTF correction.")
        return errors

    def _summary(self):
        if not hasattr(self, "outputFSC"):
            return ["Output not ready yet."]
        return [f"Resolution (FSC 0.143, half maps): {float(self.outputFSC.calculateResolution(0.143)):.2f} Å",
                f"Symmetry {self.symmetryGroup.get()}, "
                f"{self.inputParticles.get().getSize()} particles."]

    def _methods(self):
        return ["The map was reconstructed by CTF-weighted Fourier insertion (scipion-gsplat) "
                "from two independent half sets."] if hasattr(self, "outputVolume") else []
