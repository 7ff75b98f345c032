"""The Scipion Plugin class of scipion-gsplat."""
import os
import shutil
import sys

import pwem
import pyworkflow.utils as pwutils

from .constants import GSPLAT_BIN, GSPLAT_DEVICE


class Plugin(pwem.Plugin):
    """Plugin entry: no binaries to install; the programs are console scripts
    installed with this package (next to the Python that runs Scipion)."""
    # pyworkflow locates a plugin's files through Plugin.__module__ (it reads the
    # package's __path__): name the package, where Scipion expects the class.
    __module__ = "scipion_gsplat"
    _homeVar = GSPLAT_BIN
    _url = "https://github.com/scipion-em/scipion-em-gsplat"

    @classmethod
    def _defineVariables(cls):
        cls._defineVar(GSPLAT_BIN, os.path.dirname(sys.executable),
                       description="Folder of the gsplat_* programs")
        cls._defineVar(GSPLAT_DEVICE, "auto",
                       description="Default device of the gsplat programs: auto, cpu or cuda")

    @classmethod
    def getEnviron(cls):
        """Environment of the programs: the current one, with the programs'
        folder first on PATH."""
        env = pwutils.Environ(os.environ)
        env.update({"PATH": cls.getVar(GSPLAT_BIN)}, position=pwutils.Environ.BEGIN)
        return env

    @classmethod
    def getProgram(cls, name: str) -> str:
        """Absolute path of the ``gsplat_<name>`` console script."""
        prog = name if name.startswith("gsplat_") else f"gsplat_{name}"
        candidate = os.path.join(cls.getVar(GSPLAT_BIN), prog)
        if os.path.exists(candidate):
            return candidate
        found = shutil.which(prog)
        if found is None:
            raise FileNotFoundError(f"{prog} not found: is scipion-em-gsplat installed in this Python?")
        return found

    @classmethod
    def getDefaultDevice(cls) -> str:
        return cls.getVar(GSPLAT_DEVICE)

    @classmethod
    def defineBinaries(cls, env):
        """Nothing to download: everything is pip-installed."""
