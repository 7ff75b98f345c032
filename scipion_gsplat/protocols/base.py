"""Shared pieces of the gsplat protocols: compute parameters and program calls."""
from __future__ import annotations

import os
import time

import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU

from .. import Plugin


PLUGIN_LABEL = "gsplat"


#: seconds between a run's last status write and the second touch of its database (:meth:`GsplatLabelMixin._endRun`)
FINAL_TOUCH_S = 1.0


class GsplatLabelMixin:
    """Shared by every gsplat protocol: run labels, and the end of a run.

    Run labels read "gsplat - <protocol label>".

    Scipion names a new run ``<plugin name> - <label>`` and shows it in the
    Methods and Summary tabs as ``_<run name>_`` (italics); the plugin's module
    name, ``scipion_gsplat``, holds an underscore that ends the italics early
    (the text read "*scipion*gsplat ..._"). The tree section is "gsplat" too.
    """

    @classmethod
    def getClassLabel(cls, prependPackageName=True):
        label = cls.__dict__.get("_label", cls.__name__)
        return f"{PLUGIN_LABEL} - {label}" if prependPackageName else label

    def _endRun(self):
        """pyworkflow's end of a run, then the run's database touched once more,
        a second later.

        A project window (pyworkflow 3.x ``Project._updateProtocol``) reads a
        run's database and only then takes the database's time stamp. When the
        run writes its last status ("finished") in between, the window keeps
        "running", believes itself up to date, and once the process is gone
        marks the finished run failed ("Process N not found running on the
        machine"). The later touch makes the window read the database again."""
        super()._endRun()
        time.sleep(FINAL_TOUCH_S)
        try:
            os.utime(self.getDbPath())
        except OSError:  # the run's folder was deleted meanwhile: nothing to update
            pass


class GsplatProgramMixin(GsplatLabelMixin):
    """Mixin for protocols that run ``gsplat_*`` programs.

    Adds the parallel section (threads), the GPU selection and a seed, and
    builds the common program arguments from them.
    """

    def _defineExtraParams(self, form, program: str, example: str = "") -> None:
        """The expert 'Additional arguments' of ``program`` (``example``: e.g. "--rounds 5")."""
        eg = f" (e.g. {example})" if example else ""
        form.addParam("extraParams", params.StringParam, default="", expertLevel=params.LEVEL_ADVANCED,
                      label="Additional arguments",
                      help=f"More options of the {program} program, as typed on its command line{eg}; "
                           f"see {program} --help. As RELION's 'Additional arguments'.")

    def _defineComputeParams(self, form, threads: int = 2, gpu: bool = True, mpi: bool = False) -> None:
        """Add the seed, GPU and thread parameters (call at the end of _defineParams);
        ``mpi``: also the number of processes (the program splits its work over
        ranks, see :mod:`scipion_gsplat.core.distributed`)."""
        form.addParam("seed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED,
                      label="Random seed",
                      help="Seed of every random choice of the run (starting points, mixture and "
                           "k-means starts, minibatch order). The same seed, inputs and settings give the "
                           "same result on the CPU, bit for bit; another seed shows whether a result "
                           "depends on the start. As RELION's --random_seed or CryoSPARC's "
                           "'Random seed'; any integer, default 0.")
        if gpu:
            form.addHidden(USE_GPU, params.BooleanParam, default=False,
                           label="Use GPU?",
                           help="Run the heavy computation (projections, fits, searches) on a CUDA GPU "
                                "through PyTorch. No (default): the CPU, with the threads below.")
            form.addHidden(GPU_LIST, params.StringParam, default="0", label="GPU id",
                           help="CUDA device number used when 'Use GPU' is set (0 = the first GPU, as "
                                "listed by nvidia-smi); one device per run, the first number given.")
        form.addParallelSection(threads=threads, mpi=1 if mpi else 0)

    def _usesGpu(self) -> bool:
        return getattr(self, USE_GPU, None) is not None and bool(self.getAttributeValue(USE_GPU, False))

    def getGpuList(self) -> list:
        """The GPUs this run asks for: none unless "Use GPU" is on. (Scipion's own
        method returns the GPU id field even when the GPU is off, and a queue
        template would then request a GPU for a CPU run.)"""
        return super().getGpuList() if self._usesGpu() else []

    def _deviceArg(self) -> str:
        """``cpu``, or the GPU: ``cuda:<id>`` from the form on a workstation; in a
        queue job plain ``cuda`` (the job's own GPUs, renumbered from 0 by the
        queue in CUDA_VISIBLE_DEVICES: an id typed in the form would be wrong)."""
        if not self._usesGpu():
            return "cpu"
        if self.useQueue():
            return "cuda"
        gpu = str(self.getAttributeValue(GPU_LIST, "0")).split()[0]
        return f"cuda:{gpu}"

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
            parts = self._inputImages()
            if not parts.hasCTF():
                errors.append("The input particles have no CTF.")
            if not parts.hasAlignmentProj():
                errors.append("The input particles have no 3D poses (projection alignment).")

    def _inputImages(self):
        """The SetOfParticles behind ``inputParticles`` (a SetOfParticles or a SetOfClasses)."""
        from ..convert import particles_of
        return particles_of(self.inputParticles.get())

    def _copyInputParticles(self, annotate):
        """A new SetOfParticles with the input particles (of a SetOfParticles or of
        every class of a SetOfClasses), ``annotate(particle)`` applied to each;
        particles for which it returns False are left out."""
        from ..convert import iter_particles
        out = self._createSetOfParticles()
        out.copyInfo(self._inputImages())
        for part in iter_particles(self.inputParticles.get()):
            if annotate(part) is not False:
                out.append(part)
        return out

    def _refinedParticles(self, star_path: str):
        """The input particles with the refined poses of a program's ``particles.star``
        (rows matched by rlnImageId), and the pose change and, where written, the
        posterior SDs as attributes (``_gsplatAngleChange``, ``_gsplatAngularSD``,
        ``_gsplatShiftSD``)."""
        from pyworkflow.object import Float
        from ..constants import ATTR_ANGLE_CHANGE, ATTR_ANGULAR_SD, ATTR_SHIFT_SD
        from ..convert.alignment import relion_to_matrix
        from ..core import io
        pix = self._inputImages().getSamplingRate()
        table = io.read_particles(star_path).particles
        pose = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                      "rlnOriginYAngst"]].to_numpy(float)
        extra = {attr: table[col].to_numpy(float) for col, attr in
                 (("rlnGsplatAngleChange", ATTR_ANGLE_CHANGE), ("rlnGsplatAngularSD", ATTR_ANGULAR_SD),
                  ("rlnGsplatShiftSD", ATTR_SHIFT_SD)) if col in table}
        where = {int(i): k for k, i in enumerate(table["rlnImageId"])}

        def annotate(item, row=None):
            k = where.get(item.getObjId())
            if k is None:
                return False
            rot, tilt, psi, ox, oy = pose[k]
            item.getTransform().setMatrix(relion_to_matrix(rot, tilt, psi, ox / pix, oy / pix))
            for attr, values in extra.items():
                setattr(item, attr, Float(float(values[k])))

        return self._copyInputParticles(annotate)

    def _classOutputs(self, labels: dict, maps: dict, halves: bool, annotate=None, suffix: str = ""):
        """SetOfClasses3D, SetOfVolumes and SetOfFSCs of a classification.

        Args:
            labels: Scipion particle id → class number (particles absent are left out).
            maps: class number → map path written by gsplat_reconstruct_fourier
                (``<root>.mrc``; its ``_half1/_half2.mrc`` and ``_fsc.star`` are used
                when ``halves``).
            halves: attach half maps to each volume and class representative and
                make one FSC per class (label "class k").
            annotate: optional ``annotate(particle)`` applied to each class member.
            suffix: of the sets' sqlite files (when the protocol makes other sets too).
        """
        import os

        from pwem.objects import Volume
        from ..core.io import read_star_table
        pix = self._inputImages().getSamplingRate()

        def volume(k):
            vol = Volume(location=maps[k])
            vol.setSamplingRate(pix)
            if halves:
                root = maps[k][:-len(".mrc")]
                vol.setHalfMaps([root + "_half1.mrc", root + "_half2.mrc"])
            return vol

        vols = self._createSetOfVolumes(suffix)
        vols.setSamplingRate(pix)
        fscs = self._createSetOfFSCs(suffix)
        for k in sorted(maps):
            vol = volume(k)
            vol.setObjId(k)
            vol.setObjLabel(f"class {k}")
            vols.append(vol)
            fsc_path = maps[k][:-len(".mrc")] + "_fsc.star"
            if halves and os.path.exists(fsc_path):
                table = read_star_table(fsc_path, "fsc")
                fsc = self._fsc(table, f"class {k}")
                fsc.setObjId(k)
                fscs.append(fsc)

        classes = self._createSetOfClasses3D(self._inputImages(), suffix)

        def update_item(item, row=None):
            k = labels.get(item.getObjId())
            if k is None:
                item._appendItem = False
            else:
                if annotate is not None:
                    annotate(item)
                item.setClassId(k)

        def update_class(cls):
            k = cls.getObjId()
            if k in maps:
                cls.setRepresentative(volume(k))

        classes.classifyItems(updateItemCallback=update_item, updateClassCallback=update_class)
        return classes, vols, fscs

    @staticmethod
    def _fsc(table, label: str):
        """A Scipion FSC (x: 1/Å, y: FSC) from a RELION-style ``fsc`` table."""
        from pwem.objects import FSC
        fsc = FSC(objLabel=label)
        fsc.setData(table["rlnResolution"].tolist(), table["rlnFourierShellCorrelation"].tolist())
        return fsc

    def _summaryData(self) -> dict:
        """The program's ``extra/summary.json`` ({} before it exists)."""
        import json
        import os
        path = self._getExtraPath("summary.json")
        if not os.path.exists(path):
            return {}
        with open(path) as fh:
            return json.load(fh)

    def runProgram(self, name: str, args: list, ranks: bool = False) -> None:
        """Run ``gsplat_<name>`` with ``args`` plus the common arguments; with
        ``ranks`` as the form's number of MPI processes, started by the host's
        PARALLEL_COMMAND (srun on Slurm, mpirun or torchrun on a workstation)."""
        full = [str(a) for a in args] + self._commonArgs()
        n_ranks = max(1, int(self.numberOfMpi.get() or 1)) if ranks else 1
        env = Plugin.getEnviron()
        threads = str(max(1, self.numberOfThreads.get()))
        # numpy/BLAS/OpenMP inside the run's threads too (torch follows --threads): on a shared
        # node or in a queue job they would otherwise take every core of the machine
        env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads})
        self.runJob(Plugin.getProgram(name), " ".join(_quote(a) for a in full),
                    env=env, numberOfMpi=n_ranks, numberOfThreads=1)


def _quote(arg: str) -> str:
    """Quote one shell argument when needed (paths with spaces)."""
    import shlex
    return shlex.quote(arg)
