"""Protocol: import particles from a RELION STAR file (3.0-5) or a CryoSPARC ``.cs`` file."""
from __future__ import annotations

import os
import shutil

import pyworkflow.protocol.params as params
from pwem.protocols import ProtImport
from pwem.objects import SetOfParticles

from ..convert import star_to_set
from ..core.io import ImageReader, read_particles
from .base import GsplatLabelMixin

CS_EXTENSION = ".cs"


class ProtGsplatImportParticlesStar(GsplatLabelMixin, ProtImport):
    """Import particles with their poses (projection alignment) and CTF from a
    RELION particles STAR file or a CryoSPARC particle .cs file, without needing
    the RELION plugin or pyem.

    A .cs file is first converted (``gsplat_cs2star``'s converter) into
    extra/cryosparc_particles.star: poses, shifts, CTF, classes, half sets and
    pixel sizes in RELION conventions; images CryoSPARC stores dark (blob/sign
    -1) are written with the map's contrast into extra/cryosparc_stacks.
    Stacks are linked (or copied) into the protocol folder. Half sets
    (rlnRandomSubset) and classes (rlnClassNumber) are kept as particle
    attributes.
    """
    _label = "import particles (STAR/cs)"
    _outputClassName = "SetOfParticles"
    _possibleOutputs = {"outputParticles": SetOfParticles}

    def _defineParams(self, form):
        form.addSection(label="Import")
        form.addParam("starFile", params.PathParam, label="Particles file (.star or .cs)",
                      help="RELION 3.0-5 particles STAR file with poses and CTF (e.g. run_data.star of "
                           "a Refine3D job, or particles.star of Extract/Select), or a CryoSPARC particle "
                           ".cs file (e.g. J42/J42_005_particles.cs of a refinement). Image stacks must be "
                           "MRC (.mrcs/.mrc); relative image paths are looked up beside the STAR file.")
        form.addParam("csProjectDir", params.PathParam, default="", label="CryoSPARC project folder (.cs)",
                      help="For a .cs file: the folder holding the J*/ job folders, which the image "
                           "paths are relative to. Leave empty to find it from the .cs file's folder and "
                           "its parents. Ignored for STAR files.")
        form.addParam("samplingRate", params.FloatParam, default=0.0, label="Pixel size (Å)",
                      help="Pixel size of the particle images in Å/px. Leave 0 to take it from the file "
                           "(RELION optics table rlnImagePixelSize, or rlnDetectorPixelSize and "
                           "rlnMagnification of older files; CryoSPARC's blob/psize_A). Needed only for a "
                           "RELION 3.0 file that gives none; a pixel size in the file always wins.")
        form.addParam("copyFiles", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Copy stacks?",
                      help="Yes: copy the image stacks into the project (safe if the original folder "
                           "moves, but doubles the disk use). No (default): link them, as Scipion's own "
                           "import does without 'Copy files'.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep)

    def _isCs(self) -> bool:
        return str(self.starFile.get() or "").lower().endswith(CS_EXTENSION)

    def _starPath(self) -> str:
        """The STAR file read: the given one, or the conversion of the .cs file."""
        if not self._isCs():
            return self.starFile.get()
        from ..core.cryosparc import convert_cs_to_star
        out = self._getExtraPath("cryosparc_particles.star")
        summary = convert_cs_to_star(self.starFile.get(), out, project_dir=self.csProjectDir.get() or None,
                                     links=False, stack_dir=self._getExtraPath("cryosparc_stacks"))
        self.info(f"converted {self.starFile.get()}: {summary}")
        return out

    def importStep(self):
        pix = self.samplingRate.get() or None
        star = read_particles(self._starPath(), pixel_size_A=pix)
        reader = ImageReader(star)
        reader.check()
        stack_paths = {}
        for name, resolved in zip(star.particles["rlnImageName"].astype(str), reader.stacks):
            stack = name.split("@", 1)[-1]
            if stack in stack_paths:
                continue
            dest = self._getExtraPath(f"{len(stack_paths):03d}_{os.path.basename(resolved)}")
            if self.copyFiles:
                shutil.copy(resolved, dest)
            else:
                os.symlink(os.path.abspath(resolved), dest)
            stack_paths[stack] = dest
        part_set = self._createSetOfParticles()
        star_to_set(star, part_set, stack_paths)
        self._defineOutputs(outputParticles=part_set)

    def _validate(self):
        errors = []
        path = self.starFile.get()
        if not path or not os.path.exists(path):
            errors.append(f"particles file not found: {path}")
        elif self._isCs():
            try:
                import cryosparc.dataset  # noqa: F401
            except ImportError:
                errors.append("reading .cs files needs cryosparc-tools: pip install cryosparc-tools==5.0.3")
            proj = self.csProjectDir.get()
            if proj and not os.path.isdir(proj):
                errors.append(f"CryoSPARC project folder not found: {proj}")
        return errors

    def _summary(self):
        if not hasattr(self, "outputParticles"):
            return ["Output not ready yet."]
        out = self.outputParticles
        return [f"Imported {out.getSize()} particles from {self.starFile.get()}",
                f"Pixel size {out.getSamplingRate():.3f} Å, "
                f"{'with' if out.hasAlignmentProj() else 'without'} poses, "
                f"{'with' if out.hasCTF() else 'without'} CTF."]

    def _methods(self):
        kind = "CryoSPARC .cs" if self._isCs() else "RELION STAR"
        return [f"{self.outputParticles.getSize()} particles were imported from a {kind} file."] \
            if hasattr(self, "outputParticles") else []
