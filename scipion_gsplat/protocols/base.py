"""Shared pieces of the gsplat protocols: compute parameters and program calls."""
from __future__ import annotations

import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU

from .. import Plugin


class GsplatProgramMixin:
    """Mixin for protocols that run ``gsplat_*`` programs.

    Adds the parallel section (threads), the GPU selection and a seed, and
    builds the common program arguments from them.
    """

    def _defineComputeParams(self, form, threads: int = 2, gpu: bool = True) -> None:
        """Add the seed, GPU and thread parameters (call at the end of _defineParams)."""
        form.addParam("seed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed", help="Same seed and inputs give the same result.")
        if gpu:
            form.addHidden(USE_GPU, params.BooleanParam, default=False,
                           label="Use GPU?", help="Run the heavy computation on a CUDA GPU.")
            form.addHidden(GPU_LIST, params.StringParam, default="0", label="GPU id",
                           help="CUDA device number used when 'Use GPU' is set.")
        form.addParallelSection(threads=threads, mpi=0)

    def _deviceArg(self) -> str:
        if getattr(self, USE_GPU, None) is not None and self.getAttributeValue(USE_GPU, False):
            gpu = str(self.getAttributeValue(GPU_LIST, "0")).split()[0]
            return f"cuda:{gpu}"
        return "cpu"

    def _commonArgs(self) -> list:
        return ["--seed", str(self.seed.get()), "--device", self._deviceArg(),
                "--threads", str(max(1, self.numberOfThreads.get()))]

    def _validateSymmetry(self, errors: list) -> None:
        """Append an error when the ``symmetryGroup`` parameter is not a point group."""
        from ..core.io import InputError
        from ..core.symmetry import normalize_symmetry_name
        try:
            normalize_symmetry_name(self.symmetryGroup.get())
        except InputError as exc:
            errors.append(str(exc))

    def _convertPosedParticles(self, need_ctf: bool = True) -> None:
        """Write ``inputParticles`` as ``extra/input_particles.star`` (poses required)."""
        from ..convert import set_to_star
        set_to_star(self.inputParticles.get(), self._getExtraPath("input_particles.star"),
                    need_poses=True, need_ctf=need_ctf)

    def _validatePosedParticles(self, errors: list) -> None:
        """Append errors when the input particles lack CTF or 3D poses."""
        parts = self.inputParticles.get()
        if parts is not None:
            if not parts.hasCTF():
                errors.append("The input particles have no CTF.")
            if not parts.hasAlignmentProj():
                errors.append("The input particles have no 3D poses (projection alignment).")

    def _summaryData(self) -> dict:
        """The program's ``extra/summary.json`` ({} before it exists)."""
        import json
        import os
        path = self._getExtraPath("summary.json")
        if not os.path.exists(path):
            return {}
        with open(path) as fh:
            return json.load(fh)

    def runProgram(self, name: str, args: list) -> None:
        """Run ``gsplat_<name>`` with ``args`` plus the common arguments."""
        full = [str(a) for a in args] + self._commonArgs()
        self.runJob(Plugin.getProgram(name), " ".join(_quote(a) for a in full),
                    env=Plugin.getEnviron(), numberOfMpi=1, numberOfThreads=1)


def _quote(arg: str) -> str:
    """Quote one shell argument when needed (paths with spaces)."""
    import shlex
    return shlex.quote(arg)
