"""Protocol: local pose refinement against a map or a Gaussian model (gsplat_refine_poses)."""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.objects import SetOfParticles
from pwem.protocols import ProtRefine3D

from ..core import io
from .base import GsplatProgramMixin
from .protocol_gmm_heterogeneity import gaussian_model_of

REF_VOLUME, REF_MODEL = range(2)
MODES = ["expectation", "best"]


class ProtGsplatRefinePoses(GsplatProgramMixin, ProtRefine3D):
    """Refine each particle's pose locally against a reference, as RELION's
    local searches: rotations within about 3σ of the input pose and origin
    corrections within about 3σ, scored in Fourier space with the CTF and the
    measured noise spectrum, with a Gaussian prior around the input pose.
    The output particles carry the refined poses (posterior mean or best pose)
    and each particle's angle change and posterior uncertainty.
    """
    _label = "refine poses locally"
    _possibleOutputs = {"outputParticles": SetOfParticles}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", label="Input particles",
                      help="Particles with 3D poses (projection alignment) and CTF, e.g. from a RELION "
                           "Refine3D or a CryoSPARC refinement; their poses are the centre of the local "
                           "search, as in RELION's local searches (continuing a refinement).")
        form.addParam("referenceType", params.EnumParam, choices=["volume", "Gaussian model"],
                      default=REF_VOLUME, label="Reference",
                      help="A map with the particles' box and pixel size, or the atomic-structure output "
                           "of 'gaussian splat reconstruction' (its model.npz is used).")
        form.addParam("referenceVolume", params.PointerParam, pointerClass="Volume",
                      condition=f"referenceType=={REF_VOLUME}", label="Reference volume",
                      help="Map (MRC) with the particles' box and pixel size, in the frame of the input "
                           "poses (e.g. the consensus map of the refinement that gave them), as RELION's "
                           "'Input reference map'; only resolutions up to 'Max resolution' are used.")
        form.addParam("referenceModel", params.PointerParam, pointerClass="AtomStruct",
                      condition=f"referenceType=={REF_MODEL}", label="Gaussian model",
                      help="The atomic-structure output of a 'gaussian splat reconstruction' run of these "
                           "particles: the model is rendered as a map on the particles' grid (box and "
                           "pixel size) and used as the reference.")
        form.addSection(label="Search")
        form.addParam("sigmaAng", params.FloatParam, default=2.0, validators=[params.Positive],
                      label="Angular error (deg)",
                      help="Expected error of the input poses (σ of a Gaussian prior per rotation axis, "
                           "degrees; typically 1-3 after a consensus refinement), as RELION's --sigma_ang "
                           "of local searches. The search reaches 3σ; larger values search wider and "
                           "take longer.")
        form.addParam("sigmaShift", params.FloatParam, default=1.0, validators=[params.Positive],
                      label="Shift error (px)",
                      help="Expected error of the input origins (σ of a Gaussian prior per axis, pixels "
                           "of the input images; typically 0.5-2). The search reaches about 3σ.")
        form.addParam("mode", params.EnumParam, choices=MODES, default=0, label="Pose written",
                      help="expectation: the posterior mean (RELION-like, better at low SNR); best: the most "
                           "probable grid pose.")
        form.addParam("iterations", params.IntParam, default=1, validators=[params.GE(1)],
                      label="Passes",
                      help="1: align against the reference. More: each further pass aligns each half set "
                           "against its own FSC-filtered half map (gold standard).")
        form.addParam("resize", params.IntParam, default=0, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Working box (px)",
                      help="0: automatic (pixel ≈ 3 Å). A finer pixel gives more precise poses, slower.")
        form.addParam("maxRes", params.FloatParam, default=-1, expertLevel=params.LEVEL_ADVANCED,
                      label="Max resolution (Å)",
                      help="Highest resolution (Å) used to score the poses, as RELION's resolution "
                           "limit of the alignment or CryoSPARC's 'Maximum align resolution'. -1 "
                           "(default): up to the Nyquist of the working box (about 6 Å with the "
                           "automatic 3 Å pixel).")
        self._defineExtraParams(form, "gsplat_refine_poses")
        self._defineComputeParams(form)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.refineStep)
        self._insertFunctionStep(self.createOutputStep)

    # ------------------------------------------------------------------ steps
    def convertInputStep(self):
        self._convertPosedParticles()

    def _reference(self) -> str:
        if self.referenceType.get() == REF_MODEL:
            return gaussian_model_of(self.referenceModel.get())
        return os.path.abspath(self.referenceVolume.get().getFileName().split(":")[0])

    def _programArgs(self) -> list:
        args = ["-i", self._getExtraPath("input_particles.star"), "--ref", self._reference(),
                "-o", self._getExtraPath(), "--sigma-ang", self.sigmaAng.get(),
                "--sigma-shift", self.sigmaShift.get(), "--mode", MODES[self.mode.get()],
                "--iterations", self.iterations.get(), "--resize", self.resize.get()]
        if self.maxRes.get() > 0:
            args += ["--max-res", self.maxRes.get()]
        return args + (self.extraParams.get() or "").split()

    def refineStep(self):
        self.runProgram("refine_poses", self._programArgs())

    def createOutputStep(self):
        out = self._refinedParticles(self._getExtraPath("particles.star"))
        self._defineOutputs(outputParticles=out)
        self._defineSourceRelation(self.inputParticles, out)
        if self.referenceType.get() == REF_VOLUME:
            self._defineSourceRelation(self.referenceVolume, out)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        self._validatePosedParticles(errors)
        if self.referenceType.get() == REF_VOLUME:
            vol, parts = self.referenceVolume.get(), self.inputParticles.get()
            if vol is None:
                errors.append("Choose a reference volume.")
            elif parts is not None:
                if vol.getDim()[0] != self._inputImages().getXDim():
                    errors.append(f"The reference is {vol.getDim()[0]} px, the particles "
                                  f"{self._inputImages().getXDim()} px: resample the map to the particles' box.")
                if abs(vol.getSamplingRate() - self._inputImages().getSamplingRate()) > \
                        0.01 * self._inputImages().getSamplingRate():
                    errors.append(f"The reference's pixel ({vol.getSamplingRate():.4g} Å) differs from the "
                                  f"particles' ({self._inputImages().getSamplingRate():.4g} Å).")
        else:
            model = self.referenceModel.get()
            if model is None:
                errors.append("Choose the Gaussian model (atomic structure of a gaussian splat reconstruction).")
            elif not os.path.exists(gaussian_model_of(model)):
                errors.append(f"No Gaussian model file next to {model.getFileName()} "
                              f"(expected {gaussian_model_of(model)}).")
        return errors

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Output not ready yet."]
        table = io.read_particles(self._getExtraPath("particles.star")).particles
        return [f"{len(table)} particles refined (σ {self.sigmaAng.get():g}° / {self.sigmaShift.get():g} px, "
                f"{MODES[self.mode.get()]}, {self.iterations.get()} pass(es)).",
                f"Median angle change {table['rlnGsplatAngleChange'].median():.2f}°, median posterior SD "
                f"{table['rlnGsplatAngularSD'].median():.2f}° / {table['rlnGsplatShiftSD'].median():.2f} px."]

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        return ["Particle poses were refined by a local search of rotations and origins around the input "
                "poses with a Gaussian prior, scored in Fourier space with the CTF and the measured noise "
                "spectrum (scipion-gsplat)."]
