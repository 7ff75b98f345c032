"""Protocol: split-volume 3D classification of particles with known poses."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pyworkflow.protocol.params as params
from pwem.objects import SetOfClasses3D, SetOfFSCs, SetOfParticles, SetOfVolumes
from pwem.protocols import ProtClassify3D
from pyworkflow.object import Float

from ..constants import ATTR_SCORE
from ..convert import particles_of, set_particle_class, set_to_star
from ..core import io
from ..core.split_volume.maxcut import METHODS
from .base import GsplatProgramMixin

MODES = ["graph (thesis)", "graph + 3D refinement", "3D-pooled", "both with consensus"]
MODE_THESIS, MODE_GRAPH_REFINE, MODE_POOLED, MODE_BOTH = range(4)


class ProtGsplatSplitVolume(GsplatProgramMixin, ProtClassify3D):
    """Split-volume 3D classification without 3D references (after Lauzirika Zarrabeitia, extended).

    Particles with known poses are grouped by projection direction, aligned
    in-plane and classified in 2D (masked PCA + GMM); the direction graph is cut
    into two consistent halves (max-cut); the evidence is then pooled in 3D (a
    two-class refinement with fixed poses, and/or the leading residual
    eigenvolume). More than two classes are made by splitting the largest class
    again while the split is supported (independent half sets find the same
    eigenvolume). Each class is reconstructed with half maps. The 3D step runs
    as the form's MPI processes (each holds a share of the particles; on a
    Slurm queue, tasks on several nodes); the 2D and graph steps run as one.
    """
    _label = "split volume classification"
    _references = ["Lauzirika2024splitvolume"]
    _possibleOutputs = {"outputClasses": SetOfClasses3D, "outputVolumes": SetOfVolumes,
                        "outputParticles": SetOfParticles, "outputFSCs": SetOfFSCs}

    # ------------------------------------------------------------------ form
    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles,SetOfClasses3D",
                      label="Input particles",
                      help="Particles with 3D poses (projection alignment) and CTF, e.g. from a "
                           "consensus refinement, or the classes of a 3D classification (e.g. "
                           "RELION's): their particles are used and their class numbers are "
                           "written as rlnClassNumber.")
        form.addParam("inputMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      label="Mask (optional)",
                      help="3D mask of the region to classify (same box and pixel size as the particles, "
                           "values 0-1, soft edge), as RELION's 'Reference mask' of a focused 3D "
                           "classification: only differences inside it count. It is projected along each "
                           "direction for the 2D steps. Without it a disc of 45 % of the box (graph) or a "
                           "mask from the consensus map (3D) is used.")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry",
                      help="Point-group symmetry of the particle: c1 (none), cN, dN, t, o, i, in RELION's "
                           "conventions, as RELION's 'Symmetry' (--sym). Projection directions are folded "
                           "into the asymmetric unit (more particles per direction) and the class maps are "
                           "symmetrised. Use the group of the refinement that gave the poses; use c1 when "
                           "the difference you look for may break the symmetry.")
        form.addParam("mode", params.EnumParam, choices=MODES, default=MODE_BOTH, label="Mode",
                      display=params.EnumParam.DISPLAY_COMBO,
                      help="graph (thesis): the method of Lauzirika Zarrabeitia (2024): per-direction 2D "
                           "PCA and mixture, then a max-cut of the direction graph; no 3D step. "
                           "graph + 3D refinement: the graph split refined in 3D (a two-class EM with "
                           "fixed poses, like RELION's Class3D with K=2 and --skip_align started from it). "
                           "3D-pooled: the leading eigenvolume of the residuals against the consensus map "
                           "(at 8 Å, masked, then cut to where it is strong) and a two-class mixture of each "
                           "particle's coordinate on it, akin to a one-mode CryoSPARC 3D variability analysis; "
                           "with a pose error set, each particle then goes to the class map that explains it "
                           "better over a local pose search (as RELION's Class3D). both with consensus "
                           "(default): both; the pooled split when its half sets agree, else the refined "
                           "graph split.")
        form.addParam("numberOfClasses", params.IntParam, default=2, label="Number of classes",
                      help="Number of classes K (RELION's 'Number of classes'). 2 (default): one split. "
                           "More: the largest class is split again, one class at a time, while the two "
                           "half sets support the split (see 'Split support threshold'); the run may "
                           "therefore end with fewer classes than asked.")
        form.addSection(label="Directions")
        form.addParam("angularSampling", params.FloatParam, default=7.5, label="Angular sampling (deg)",
                      help="Spacing in degrees of the grid of projection directions; particles are grouped "
                           "by direction and compared in 2D within each group. 7.5° (default, RELION's "
                           "HEALPix order 3) suits 10^4-10^6 particles; use 10-15° for fewer than about "
                           "20 000 particles so that each direction keeps enough particles (at least "
                           "~50), 3.75° (order 4) only for very large sets.")
        form.addParam("coneRadius", params.FloatParam, default=-1, label="Cone radius (deg)",
                      help="Particles within this angle (degrees) of a direction's centre join it; "
                           "neighbouring directions share particles, which links them in the graph. "
                           "-1 (default): 1.25 × the angular sampling. Larger: more particles and more "
                           "links per direction, but each direction then mixes more different views.")
        form.addParam("resize", params.IntParam, default=0, label="Resize to (px)",
                      help="Box (px) the images are downsampled to for the classification (Fourier "
                           "cropping, as CryoSPARC's 'Fourier crop to box size'); the class maps are "
                           "reconstructed at the full size. 0 (default): automatic, a pixel of about 3 Å "
                           "(never larger than the input box). Larger: finer details, slower.")
        form.addParam("maxCutMethod", params.EnumParam, choices=list(METHODS), default=0,
                      label="Max-cut method", display=params.EnumParam.DISPLAY_COMBO,
                      help="How the directions are sorted into two consistent halves (which 2D class of "
                           "each direction belongs to 3D class 1). auto (default): exact for up to 16 "
                           "directions, else the semidefinite relaxation. exact: tries every assignment "
                           "(at most 20 directions). sdp: Goemans-Williamson semidefinite relaxation with "
                           "random roundings. spectral: sign of the leading eigenvector (fastest, less "
                           "reliable on noisy graphs).")
        form.addSection(label="3D")
        form.addParam("refineIterations", params.IntParam, default=8, label="Refinement iterations",
                      help="Iterations of the two-class 3D refinement of the graph split (modes graph + 3D "
                           "refinement and both), as the 'Number of iterations' of a RELION Class3D "
                           "with --skip_align. 8 (default) is usually converged; 4 for a quick look.")
        form.addParam("sigmaAng", params.FloatParam, default=2.0, label="Pose error: angles (deg)",
                      help="Expected error of the input angles (degrees, σ of a Gaussian prior per rotation "
                           "axis). Above 0, every particle's pose is refined locally (within 3σ) against the "
                           "consensus map before the 3D steps, and the output particles carry the refined "
                           "poses. Poses from a consensus refinement typically err by 1-3°; with errors of "
                           "2° a subtle difference (~5 % of the mass) is not found without it (measured on "
                           "4000 simulated particles: adjusted Rand index against the true classes 0.04 → 0.88; "
                           "with exact poses it costs about 0.02). As RELION's --sigma_ang of local searches. "
                           "0 = poses used as they are. Costs about 75 s per 4000 particles per core.")
        form.addParam("sigmaShift", params.FloatParam, default=1.0, label="Pose error: origins (px)",
                      condition="sigmaAng > 0",
                      help="Expected error of the input origins (pixels of the input images, σ of a "
                           "Gaussian prior per axis); the search reaches about 3σ. It is the starting value: "
                           "the program re-estimates it from the particles (empirical Bayes; the estimate is "
                           "in the run's summary.star). Typical 0.5-2 px.")
        form.addParam("supportThreshold", params.FloatParam, default=0.5, expertLevel=params.LEVEL_ADVANCED,
                      label="Split support threshold",
                      help="With 3 or more classes: a further split is kept only when the eigenvolumes "
                           "found independently in the two half sets correlate at least this much (0-1). "
                           "0.5 (default); higher: stop earlier, fewer but surer classes.")
        form.addParam("doHalves", params.BooleanParam, default=True, label="Half maps per class?",
                      help="Yes (default): each class map is also made from its two half sets, giving "
                           "half maps and an FSC curve per class (gold-standard resolution, as RELION "
                           "auto-refine and CryoSPARC report). No: one map per class, faster.")
        self._defineComputeParams(form, mpi=True)  # the 3D refinement splits its particles over MPI ranks

    # ------------------------------------------------------------------ steps
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        for level in range(2, max(2, self.numberOfClasses.get()) + 1):
            self._insertFunctionStep(self.splitStep, level)
        for k in range(1, max(2, self.numberOfClasses.get()) + 1):
            self._insertFunctionStep(self.reconstructStep, k)
        self._insertFunctionStep(self.createOutputStep)

    def _path(self, *names):
        return self._getExtraPath(*names)

    def convertInputStep(self):
        set_to_star(self.inputParticles.get(), self._path("input_particles.star"))
        if self.inputMask.get() is not None:
            shutil.copy(self.inputMask.get().getFileName(), self._path("mask.mrc"))

    def _classes_file(self, level: int) -> str:
        return self._path(f"classes_level{level}.star")

    def splitStep(self, level: int):
        """Split the input (level 2) or the largest class (level > 2) in two."""
        work = self._path(f"level{level}")
        os.makedirs(work, exist_ok=True)
        if level == 2:
            subset, parent_rows = self._path("input_particles.star"), None
        else:
            previous = io.read_particles(self._classes_file(level - 1))
            if os.path.exists(self._path("stop")):  # an earlier split was not supported
                shutil.copy(self._classes_file(level - 1), self._classes_file(level))
                return
            labels = previous.column("rlnClassNumber").astype(int)
            parent = int(np.bincount(labels).argmax())
            parent_rows = np.flatnonzero(labels == parent)
            subset = os.path.join(work, "input.star")
            io.write_particles(subset, previous.subset(parent_rows))
        result = self._runMode(subset, work)
        split = io.read_particles(result)
        if level > 2 and not self._supported(work, subset):
            self.info(f"Split {level - 1} -> {level} classes not supported: stopping at {level - 1} classes.")
            open(self._path("stop"), "w").write("not supported\n")
            shutil.copy(self._classes_file(level - 1), self._classes_file(level))
            return
        if level == 2:
            shutil.copy(result, self._classes_file(2))
            return
        merged = io.read_particles(self._classes_file(level - 1))
        new = split.column("rlnClassNumber").astype(int)
        for col in ("rlnGsplatScore", "rlnGsplatClassProbability", "rlnMaxValueProbDistribution"):
            merged.particles.loc[parent_rows, col] = split.particles[col].to_numpy()
        merged.particles.loc[parent_rows[new == 2], "rlnClassNumber"] = level
        io.write_particles(self._classes_file(level), merged)

    def _runMode(self, star: str, work: str) -> str:
        """Run the programs of the chosen mode; return the classified particles STAR."""
        mode = self.mode.get()
        mask = ["--mask", self._path("mask.mrc")] if self.inputMask.get() is not None else []
        common = ["--sym", self.symmetryGroup.get()]
        resize = ["--resize", self.resize.get()] if self.resize.get() > 0 else []
        if mode in (MODE_THESIS, MODE_GRAPH_REFINE, MODE_BOTH):
            cone = ["--cone", self.coneRadius.get()] if self.coneRadius.get() > 0 else []
            self.runProgram("aligned_2d_classification",
                            ["-i", star, "-o", os.path.join(work, "classify"),
                             "--angular-sampling", self.angularSampling.get()] + cone + common + mask + resize)
            self.runProgram("graph_max_cut",
                            ["-i", os.path.join(work, "classify"), "--particles", star,
                             "-o", os.path.join(work, "graph"), "--method", METHODS[self.maxCutMethod.get()],
                             "--weights", "llr" if mode == MODE_THESIS else "coordinate"])
            if mode == MODE_THESIS:
                return os.path.join(work, "graph", "particles.star")
            star = os.path.join(work, "graph", "particles.star")
        init = {MODE_GRAPH_REFINE: "column", MODE_POOLED: "pooled", MODE_BOTH: "both"}[mode]
        self.runProgram("refine_classes", ["-i", star, "-o", os.path.join(work, "refine"), "--init", init,
                                           "--iterations", self.refineIterations.get()] + mask + resize
                        + self._poseArgs(), ranks=True)
        return os.path.join(work, "refine", "particles.star")

    def _poseArgs(self) -> list:
        """--sigma-ang / --sigma-shift of gsplat_refine_classes (none when the poses are kept)."""
        if self.sigmaAng.get() <= 0:
            return []
        return ["--sigma-ang", self.sigmaAng.get(), "--sigma-shift", self.sigmaShift.get()]

    def _supported(self, work: str, subset: str) -> bool:
        summary = os.path.join(work, "refine", "summary.star")
        if not os.path.exists(summary) or "rlnGsplatPooledHalfAgreement" not in io.read_star_table(
                summary, "summary"):
            self.runProgram("refine_classes", ["-i", subset, "-o", os.path.join(work, "support"),
                                               "--init", "pooled", "--iterations", 0] + self._poseArgs(),
                            ranks=True)
            summary = os.path.join(work, "support", "summary.star")
        agreement = float(io.read_star_table(summary, "summary")["rlnGsplatPooledHalfAgreement"].iloc[0])
        self.info(f"half-set eigenvolume agreement {agreement:.3f} (threshold {self.supportThreshold.get()})")
        return agreement >= self.supportThreshold.get()

    def _final_classes(self) -> str:
        return self._classes_file(max(2, self.numberOfClasses.get()))

    def reconstructStep(self, k: int):
        labels = io.read_particles(self._final_classes()).column("rlnClassNumber").astype(int)
        if (labels == k).sum() < 2:
            return
        args = ["-i", self._final_classes(), "-o", self._path(f"class{k}.mrc"), "--class", k,
                "--sym", self.symmetryGroup.get()]
        if self.doHalves:
            args.append("--halves")
        self.runProgram("reconstruct_fourier", args)

    def createOutputStep(self):
        """Particles (class id, ``_rlnClassNumber``, probabilities, score), classes
        whose representatives carry their half maps, the class maps and one FSC
        per class (from the half maps)."""
        table = io.read_particles(self._final_classes()).particles
        info = {int(i): (int(c), float(p), float(s)) for i, c, p, s in zip(
            table["rlnImageId"], table["rlnClassNumber"], table["rlnGsplatClassProbability"],
            table["rlnGsplatScore"])}
        maps = {k: self._path(f"class{k}.mrc") for k in sorted(set(c for c, _, _ in info.values()))
                if os.path.exists(self._path(f"class{k}.mrc"))}

        def annotate(item):
            if item.getObjId() not in info:
                return False
            c, p, s = info[item.getObjId()]
            set_particle_class(item, c, p)
            setattr(item, ATTR_SCORE, Float(s))

        out_parts = self._copyInputParticles(annotate)
        classes, vols, fscs = self._classOutputs({i: c for i, (c, _, _) in info.items()}, maps,
                                                 bool(self.doHalves), annotate)
        outputs = {"outputClasses": classes, "outputVolumes": vols, "outputParticles": out_parts}
        if fscs.getSize():
            outputs["outputFSCs"] = fscs
        self._defineOutputs(**outputs)
        for out in outputs.values():
            self._defineSourceRelation(self.inputParticles, out)

    # ------------------------------------------------------------------ info
    def _validate(self):
        errors = []
        self._validateSymmetry(errors)
        if self.numberOfClasses.get() < 2:
            errors.append("At least 2 classes.")
        if self.sigmaAng.get() < 0 or (self.sigmaAng.get() > 0 and self.sigmaShift.get() <= 0):
            errors.append("Pose errors: angles >= 0 (0 = poses kept); origins > 0 when angles > 0.")
        parts = self.inputParticles.get()
        if parts is not None:
            parts = particles_of(parts)
            if not parts.hasCTF():
                errors.append("The input particles have no CTF.")
            if not parts.hasAlignmentProj():
                errors.append("The input particles have no 3D poses (projection alignment).")
        return errors

    def _summary(self):
        if not hasattr(self, "outputClasses"):
            return ["Output not ready yet."]
        sizes = [f"class {c.getObjId()}: {c.getSize()}" for c in self.outputClasses]
        return [f"Mode: {MODES[self.mode.get()]}", "Particles per class: " + ", ".join(sizes)]

    def _methods(self):
        return [f"{self.outputParticles.getSize()} particles were classified into "
                f"{self.outputClasses.getSize()} classes without 3D references with the split-volume "
                f"method of scipion-gsplat (mode {MODES[self.mode.get()]}; after Lauzirika Zarrabeitia "
                f"2024), with projection directions every {self.angularSampling.get():g}° and symmetry "
                f"{self.symmetryGroup.get()}."] \
            if hasattr(self, "outputClasses") and hasattr(self, "outputParticles") else []
