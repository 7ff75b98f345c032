"""Run Scipion headless: a private environment, projects and protocol waits.

Used by the test suite and the demo. :func:`configure` must run before
pyworkflow is imported (it reads its configuration from the environment at
import time).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from pathlib import Path

#: The local host of a headless project: several processes of a program (the
#: form's MPI field) are started by torchrun, which needs no MPI installation.
HOSTS_CONF = ("[localhost]\nPARALLEL_COMMAND = {python} -m torch.distributed.run --no-python --standalone "
              "--nproc-per-node %_(JOB_NODES)d %_(COMMAND)s\n")


def configure(root) -> Path:
    """Point Scipion at a private folder tree under ``root`` and return it.

    Sets SCIPION_HOME, SCIPION_USER_DATA, SCIPION_TESTS, SCIPION_HOSTS (a
    generated hosts.conf for the local machine), SCIPION_DOMAIN=pwem,
    SCIPION_NOTIFY=False, SCIPION_TEST_NOSYNC=True, SCIPION_PYTHON (this
    interpreter, which runs the protocols) and MPLBACKEND=Agg; RELION_HOME
    too when it is unset and RELION is on the PATH (see :func:`link_relion`).
    """
    if "pyworkflow" in sys.modules:
        raise RuntimeError("configure() must run before pyworkflow is imported")
    root = Path(root).absolute()
    for sub in ("home", "userdata/projects", "tests", "config"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    hosts = root / "config" / "hosts.conf"
    hosts.write_text(HOSTS_CONF.format(python=sys.executable))
    os.environ.update({
        "SCIPION_HOME": str(root / "home"),
        "SCIPION_USER_DATA": str(root / "userdata"),
        "SCIPION_TESTS": str(root / "tests"),
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_HOSTS": str(hosts),
        "SCIPION_NOTIFY": "False",
        "SCIPION_TEST_NOSYNC": "True",
        "SCIPION_PYTHON": sys.executable,
        "MPLBACKEND": "Agg",
    })
    if "RELION_HOME" not in os.environ:
        home = link_relion(root / "software" / "relion-3.1")
        if home is not None:
            os.environ["RELION_HOME"] = str(home)
    return root


def link_relion(home) -> "Path | None":
    """Make ``home/bin`` a folder of symbolic links to the ``relion_*`` programs
    found on the PATH (e.g. Debian's ``/usr/bin/relion_*``), the layout the
    scipion-em-relion plugin expects under RELION_HOME. Returns ``home``, or
    None when ``relion_refine`` is not on the PATH."""
    found = shutil.which("relion_refine")
    if found is None:
        return None
    bindir = Path(home) / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for prog in glob.glob(os.path.join(os.path.dirname(os.path.realpath(found)), "relion_*")):
        link = bindir / os.path.basename(prog)
        if not link.exists():
            link.symlink_to(prog)
    return Path(home)


def new_project(name: str, location=None):
    """Create a Scipion project (in SCIPION_USER_DATA/projects by default)."""
    from pyworkflow.project import Manager
    return Manager().createProject(name, location=None if location is None else str(location))


def log_tail(prot, lines: int = 40) -> str:
    """The last lines of a protocol's stdout and stderr logs."""
    out = []
    for path in (prot.getStdoutLog(), prot.getStderrLog()):
        p = Path(path) if Path(path).is_absolute() else Path(prot.getProject().path) / path
        if p.exists():
            out.append(f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


#: pyworkflow's errors for a protocol whose process (or queue job) is gone while its status says running
_PROCESS_GONE = ("not found running on the machine", "not found running on the queue engine")


def update_status(project, prot) -> None:
    """``project._updateProtocol(prot)``, safe against a race in pyworkflow 3.x.

    pyworkflow reads the run's database and only then takes the database's
    time stamp, so a status the protocol writes in between (its last one,
    "finished", just before its process exits) is never read: the process is
    then gone while the status still says running, and the protocol is marked
    failed ("Process N not found running on the machine", or "JOB ID N not
    found running on the queue engine" for a queue job). When that happens
    the run's database is read once more, its time stamp forgotten: a
    protocol that did finish is then finished; one whose process died is
    marked failed again."""
    project._updateProtocol(prot)
    if prot.isFailed() and any(text in (prot.getErrorMessage() or "") for text in _PROCESS_GONE):
        prot.lastUpdateTimeStamp.set(None)
        project._updateProtocol(prot)


def launch_and_wait(project, prot, timeout: float = 600.0, expect_failure: bool = False,
                    poll_seconds: float = 1.0):
    """Launch ``prot`` and poll its status (``project._updateProtocol``) until it ends.

    Raises:
        RuntimeError: on timeout, or when the protocol fails (unless
            ``expect_failure``, in which case a success raises), with the tail
            of its logs.
    """
    project.launchProtocol(prot, wait=False)
    t0 = time.time()
    while True:
        update_status(project, prot)
        if prot.isFinished() or prot.isFailed() or prot.isAborted():
            break
        if time.time() - t0 > timeout:
            raise RuntimeError(f"{prot.getRunName()} did not finish in {timeout} s\n{log_tail(prot)}")
        time.sleep(poll_seconds)
    if expect_failure:
        if not prot.isFailed():
            raise RuntimeError(f"{prot.getRunName()} should have failed\n{log_tail(prot)}")
    elif not prot.isFinished():
        raise RuntimeError(f"{prot.getRunName()} failed: {prot.getErrorMessage()}\n{log_tail(prot)}")
    return prot
