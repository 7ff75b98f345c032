"""Protocol: GMM heterogeneity — eigen-motions of a Gaussian model (gsplat_gmm_heterogeneity)."""
from __future__ import annotations

import os

import pyworkflow.protocol.params as params
from pwem.objects import AtomStruct, SetOfClasses3D, SetOfParticles, SetOfVolumes, Volume
from pwem.protocols import ProtAnalysis3D
from pyworkflow.object import Float

from ..constants import ATTR_COORDINATE
from ..convert import set_particle_class
from ..convert.alignment import relion_to_matrix
from ..core import io
from .base import GsplatProgramMixin

CONSENSUS_DATA, CONSENSUS_VOLUME, CONSENSUS_MODEL = range(3)
CONSENSUS_CHOICES = ["reconstruction of the particles", "volume",
                     "Gaussian model (from gaussian splat reconstruction)"]


def gaussian_model_of(atom_struct) -> str:
    """The ``model.npz`` written next to a splat reconstruction's structure file."""
    return os.path.join(os.path.dirname(os.path.abspath(atom_struct.getFileName())), "model.npz")


class ProtGsplatGmmHeterogeneity(GsplatProgramMixin, ProtAnalysis3D):
    """Continuous (and compositional) heterogeneity with a Gaussian model (after Chen & Ludtke).

    A consensus Gaussian model is fitted to the particles; the gradient of each
    particle's data-fit loss with respect to the Gaussian positions (and
    amplitudes) is computed; a PCA of these gradients gives the eigen-motions,
    and each particle gets coordinates along them (Gauss-Newton); model, motions
    and coordinates are then refined in turn. Outputs: particles with their
    coordinates, maps along each motion, a trajectory of the Gaussian model, and
    optionally classes from clusters of the coordinates.
    """
    _label = "gmm heterogeneity"
    _references = ["Chen2021gmm", "Shekarforoush2025cryospire"]
    _possibleOutputs = {"outputParticles": SetOfParticles, "outputVolumes": SetOfVolumes,
                        "outputClasses": SetOfClasses3D, "outputTrajectory": AtomStruct}

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", label="Input particles",
                      help="Particles with 3D poses (projection alignment) and CTF from a consensus "
                           "refinement (RELION Refine3D, CryoSPARC homogeneous/non-uniform refinement), "
                           "as for cryoDRGN or CryoSPARC's 3D variability analysis. A few thousand "
                           "particles already show large motions; the time grows in proportion.")
        form.addParam("consensusType", params.EnumParam, choices=CONSENSUS_CHOICES, default=CONSENSUS_DATA,
                      label="Consensus model",
                      help="The Gaussian model the motions are measured against. Reconstruction "
                           "(default): Gaussians sampled from the particles' own Fourier reconstruction. "
                           "Volume: sampled from a map you give (e.g. the consensus refinement's map). "
                           "Gaussian model: the atomic-structure output of a 'gaussian splat "
                           "reconstruction' run (the fitted Gaussians themselves).")
        form.addParam("consensusVolume", params.PointerParam, pointerClass="Volume",
                      condition=f"consensusType=={CONSENSUS_VOLUME}", label="Consensus volume",
                      help="Map (MRC) with the particles' box and pixel size, e.g. the map of the "
                           "consensus refinement that gave the poses; the Gaussians are placed where "
                           "its density is high.")
        form.addParam("consensusModel", params.PointerParam, pointerClass="AtomStruct",
                      condition=f"consensusType=={CONSENSUS_MODEL}", label="Gaussian model",
                      help="The atomic-structure output of a 'gaussian splat reconstruction' run of "
                           "these particles (or particles with the same box and pixel size); its fitted "
                           "Gaussians become the consensus model.")
        form.addParam("nGaussians", params.IntParam, default=1000, validators=[params.Positive],
                      condition=f"consensusType!={CONSENSUS_MODEL}", label="Number of Gaussians",
                      help="Gaussians sampled from the consensus map. 1000 (default) resolves domain "
                           "motions; more resolve finer ones but cost time and memory in proportion.")
        form.addParam("consensusEpochs", params.IntParam, default=1, validators=[params.GE(0)],
                      label="Consensus fitting epochs",
                      help="Epochs (passes over the particles) fitting the consensus Gaussians to these "
                           "particles before the motions are estimated; 0 uses it as given. The refinement "
                           "rounds refit it anyway, so 1-2 is enough (measured on 4000 simulated particles "
                           "of a hinge motion: rank correlation of the first coordinate with the true "
                           "angle 0.959 with 1 epoch, 0.961 with 2).")
        form.addParam("sigmaAng", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Pose refinement: angular error (deg)",
                      help="Expected error of the input poses (σ of each rotation, degrees; typically 1-3 after "
                           "a consensus refinement). Each particle's pose is refined locally against the consensus "
                           "(within about 3σ) before the motions are estimated, and every later stage uses the "
                           "refined poses; the output particles carry them. 0 (with a shift error of 0): the "
                           "poses are used as given. Measured on a 4000-particle hinge (SNR 0.05): with 2° / "
                           "0.5 px errors in the input, setting 2° / 0.5 px raised the rank correlation of "
                           "the first coordinate with the true angle 0.927 → 0.937 for ~13 % more time; on exact "
                           "poses it lowered it 0.961 → 0.949, so it is off by default. As RELION's "
                           "--sigma_ang of local searches.")
        form.addParam("sigmaShift", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Pose refinement: shift error (px)",
                      help="Expected error of the input origins (σ per axis, pixels; typically 0.3-1). "
                           "0: origins used as given.")
        form.addSection(label="Motions")
        form.addParam("nMotions", params.IntParam, default=4, validators=[params.Positive],
                      label="Number of eigen-motions",
                      help="Number of motions (principal components of the per-particle gradients) "
                           "estimated, as the number of modes of CryoSPARC's 3D variability analysis or "
                           "cryoDRGN's latent dimension. 4 (default); the summary reports the share of "
                           "variance of each: look at those that stand out, the rest are mostly noise.")
        form.addParam("doAmplitudes", params.BooleanParam, default=False, label="Amplitudes?",
                      help="Yes: the motions also include changes of the Gaussians' amplitudes, for "
                           "compositional heterogeneity (a ligand or subunit present in some particles). "
                           "No (default): positions only (conformational changes).")
        form.addParam("nParts", params.IntParam, default=0, validators=[params.GE(0)],
                      label="Rigid parts",
                      help="0: none. Otherwise the Gaussians are grouped into this many parts by position "
                           "and motion; the largest is the reference body, each other part gets a "
                           "per-particle rotation and translation on top of the eigen-motions "
                           "(a part-aware model as in Shekarforoush et al. 2025). Try 2-4 for domains "
                           "that move as rigid bodies.")
        form.addParam("rounds", params.IntParam, default=3, validators=[params.GE(0)],
                      label="Refinement rounds",
                      help="Alternations of (refit the model and the motions, re-estimate each particle's "
                           "coordinates); 0: the first estimate only. 3 (default); each round costs about "
                           "a fifth of the default run, and a 4th round changed the rank correlation with "
                           "the true hinge angle by only +0.001 on 4000 simulated particles.")
        form.addParam("nFrames", params.IntParam, default=10, validators=[params.Positive],
                      label="Maps along each motion",
                      help="Number of maps (and frames of the model trajectory) made along each motion, "
                           "evenly from the 5th to the 95th percentile of the particles' coordinates, the "
                           "others held at their mean; as 'Number of frames' of CryoSPARC's 3D "
                           "variability display. 10 (default); the viewer shows them with a frame slider.")
        form.addParam("nClasses", params.IntParam, default=0, validators=[params.GE(0)],
                      label="Number of classes",
                      help="Particle subsets made by k-means clustering of all coordinates, each with "
                           "the model's map at the subset's mean coordinate, as the 'cluster' mode of "
                           "CryoSPARC's 3D variability display. 0 (default): none; subsets can also be "
                           "picked later in the viewer.")
        self._defineExtraParams(form, "gsplat_gmm_heterogeneity", "--part-sigma-rot 5")
        self._defineComputeParams(form, mpi=True)  # the fits share minibatches over MPI ranks

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.heterogeneityStep)
        self._insertFunctionStep(self.createOutputStep)

    # ------------------------------------------------------------------ steps
    def convertInputStep(self):
        self._convertPosedParticles()

    def _programArgs(self) -> list:
        args = ["-i", self._getExtraPath("input_particles.star"), "-o", self._getExtraPath(),
                "--motions", self.nMotions.get(), "--rounds", self.rounds.get(),
                "--consensus-epochs", self.consensusEpochs.get(), "--frames", self.nFrames.get(),
                "--classes", self.nClasses.get(),
                "--sigma-ang", self.sigmaAng.get(), "--sigma-shift", self.sigmaShift.get()]
        kind = self.consensusType.get()
        if kind == CONSENSUS_VOLUME:
            args += ["--consensus", os.path.abspath(self.consensusVolume.get().getFileName().split(":")[0])]
        elif kind == CONSENSUS_MODEL:
            args += ["--consensus", gaussian_model_of(self.consensusModel.get())]
        if kind != CONSENSUS_MODEL:
            args += ["--n-gaussians", self.nGaussians.get()]
        if self.doAmplitudes:
            args.append("--amplitudes")
        if self.nParts.get() > 0:
            args += ["--parts", self.nParts.get()]
        return args + (self.extraParams.get() or "").split()

    def heterogeneityStep(self):
        self.runProgram("gmm_heterogeneity", self._programArgs(), ranks=True)

    def createOutputStep(self):
        pix = self._inputImages().getSamplingRate()
        table = io.read_particles(self._getExtraPath("particles.star")).particles
        k_motions = self.nMotions.get()
        cols = [f"rlnGsplatCoordinate{k + 1}" for k in range(k_motions)]
        coords = {int(i): row for i, row in zip(table["rlnImageId"], table[cols].to_numpy(float))}
        labels = ({int(i): int(c) for i, c in zip(table["rlnImageId"], table["rlnClassNumber"])}
                  if "rlnClassNumber" in table and self.nClasses.get() > 0 else {})
        poses = {}
        if "rlnGsplatAngleChange" in table:  # the poses were refined: the output carries them
            pose_cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
            poses = {int(i): row for i, row in zip(table["rlnImageId"], table[pose_cols].to_numpy(float))}

        def annotate(item, row=None):
            if item.getObjId() not in coords:
                return False
            for k, value in enumerate(coords[item.getObjId()]):
                setattr(item, ATTR_COORDINATE.format(k + 1), Float(float(value)))
            if labels:
                set_particle_class(item, labels[item.getObjId()])
            if poses:
                rot, tilt, psi, ox, oy = poses[item.getObjId()]
                item.getTransform().setMatrix(relion_to_matrix(rot, tilt, psi, ox / pix, oy / pix))

        out_parts = self._copyInputParticles(annotate)
        outputs = {"outputParticles": out_parts}

        summary = self._summaryData()
        vols = self._createSetOfVolumes()
        vols.setSamplingRate(pix)
        for entry in summary.get("motion_frames", []):
            for f, path in enumerate(entry["maps"]):
                vol = Volume()
                vol.setFileName(path)
                vol.setSamplingRate(pix)
                vol.setObjLabel(f"motion {entry['motion']} frame {f + 1}")
                vols.append(vol)
        outputs["outputVolumes"] = vols
        first = summary.get("motion_frames", [{}])[0].get("trajectory")
        if first and os.path.exists(first):
            outputs["outputTrajectory"] = AtomStruct(filename=first, pseudoatoms=True)
        if labels:
            class_maps = summary.get("classes", [])
            maps = {k + 1: path for k, path in enumerate(class_maps)}
            outputs["outputClasses"] = self._classOutputs(labels, maps, halves=False, annotate=annotate,
                                                          suffix="Kmeans")[0]
        self._defineOutputs(**outputs)
        for obj in outputs.values():
            self._defineSourceRelation(self.inputParticles, obj)

    # ------------------------------------------------------------------ outputs added by the viewer
    def nextOutputName(self, prefix: str) -> str:
        """``<prefix>_<n>`` with the first ``n`` (from 1) not yet used by an output."""
        n = 1
        while hasattr(self, f"{prefix}_{n}"):
            n += 1
        return f"{prefix}_{n}"

    def registerParticleSubset(self, prefix: str, ids) -> tuple:
        """Register the output particles whose ids are in ``ids`` as a new output
        ``<prefix>_<n>`` (a SetOfParticles with their coordinates, poses and CTF);
        returns ``(name, subset)``. Raises ValueError, leaving no output and no
        set file, when none of ``ids`` is an output particle."""
        wanted = {int(i) for i in ids}
        parts = self.outputParticles
        if not wanted:
            raise ValueError("No particle is selected: nothing to register.")
        name = self.nextOutputName(prefix)
        subset = self._createSetOfParticles(suffix=f"_{name}")
        subset.copyInfo(parts)
        for item in parts.iterItems():
            if item.getObjId() in wanted:
                subset.append(item.clone())
        if subset.getSize() == 0:
            path = subset.getFileName()
            subset.close()
            if os.path.exists(path):
                os.remove(path)
            raise ValueError("None of the selected particles is in the output particles of this run.")
        subset.write()
        self._defineOutputs(**{name: subset})
        self._defineSourceRelation(parts, subset)
        self._store()
        return name, subset

    def registerVolume(self, name: str, path: str, label: str = "") -> Volume:
        """Register the map ``path`` (written by the caller into the extra folder,
        named after :meth:`nextOutputName`) as the output Volume ``name`` at the
        particles' pixel size (Å); returns it."""
        if hasattr(self, name):
            raise ValueError(f"This run already has an output called {name}.")
        vol = Volume()
        vol.setFileName(path)
        vol.setSamplingRate(self.outputParticles.getSamplingRate())
        vol.setObjLabel(label or name)
        self._defineOutputs(**{name: vol})
        self._defineSourceRelation(self.outputParticles, vol)
        self._store()
        return vol

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        self._validatePosedParticles(errors)
        kind = self.consensusType.get()
        if kind == CONSENSUS_VOLUME and self.consensusVolume.get() is None:
            errors.append("Choose a consensus volume.")
        if kind == CONSENSUS_MODEL:
            model = self.consensusModel.get()
            if model is None:
                errors.append("Choose the Gaussian model (atomic structure of a gaussian splat reconstruction).")
            elif not os.path.exists(gaussian_model_of(model)):
                errors.append(f"No Gaussian model file next to {model.getFileName()} "
                              f"(expected {gaussian_model_of(model)}).")
        return errors

    def _summary(self):
        data = self._summaryData()
        if not data:
            return ["Output not ready yet."]
        lines = [f"{data['motions']} eigen-motions of {data['n_gaussians']} Gaussians from "
                 f"{data['n_particles']} particles ({data['seconds']:.0f} s)."]
        lines += [f"Motion {k + 1}: {100 * e:.1f} % of the gradient variance, coordinate spread "
                  f"{s:.2f} Å" for k, (e, s) in enumerate(zip(data["explained_variance"],
                                                              data["coordinate_std_A"]))]
        if "class_sizes" in data:
            lines.append("Particles per class: " + ", ".join(str(n) for n in data["class_sizes"]))
        return lines

    def _methods(self):
        if not hasattr(self, "outputParticles"):
            return []
        return ["Conformational heterogeneity was analysed with a Gaussian-mixture model: eigen-motions "
                "from a PCA of per-particle gradients of the model fit and per-particle coordinates "
                f"along them (after Chen & Ludtke 2021, in scipion-gsplat); {self.nMotions.get()} "
                "eigen-motions were estimated."]
