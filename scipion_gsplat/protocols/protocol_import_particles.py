"""Protocol: import particles from a RELION STAR file (3.0 or 3.1)."""
from __future__ import annotations

import os
import shutil

import pyworkflow.protocol.params as params
from pwem.protocols import ProtImport
from pwem.objects import SetOfParticles

from ..convert import star_to_set
from ..core.io import ImageReader, read_particles


class ProtGsplatImportParticlesStar(ProtImport):
    """Import particles with their poses (projection alignment) and CTF from a
    RELION particles STAR file, without needing the RELION plugin.

    Stacks are linked (or copied) into the protocol folder. Half sets
    (rlnRandomSubset) and classes (rlnClassNumber) are kept as particle
    attributes.
    """
    _label = "import particles (STAR)"
    _outputClassName = "SetOfParticles"
    _possibleOutputs = {"outputParticles": SetOfParticles}

    def _defineParams(self, form):
        form.addSection(label="Import")
        form.addParam("starFile", params.PathParam, label="Particles STAR file",
                      help="RELION 3.0 or 3.1 particles STAR file; image stacks must be MRC.")
        form.addParam("samplingRate", params.FloatParam, default=0.0, label="Pixel size (Å)",
                      help="Leave 0 to take it from the STAR file (optics table or "
                           "rlnDetectorPixelSize/rlnMagnification).")
        form.addParam("copyFiles", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Copy stacks?", help="Copy the stacks into the project instead of linking them.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep)

    def importStep(self):
        pix = self.samplingRate.get() or None
        star = read_particles(self.starFile.get(), pixel_size_A=pix)
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
            errors.append(f"STAR file not found: {path}")
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
        return [f"{self.outputParticles.getSize()} particles were imported from a RELION STAR file."] \
            if hasattr(self, "outputParticles") else []
