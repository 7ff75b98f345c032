"""Scipion protocols through a real Slurm queue with the shipped hosts.conf
template (scripts/hosts_slurm.conf): the whole protocol runs as one job, its
outputs are registered, a controller outage does not fail it, and a cancelled
job leaves the protocol failed and resumable."""
import os
import subprocess
import time
from pathlib import Path

import pytest

from scipion_gsplat.headless import launch_and_wait, log_tail, update_status

TEMPLATE = Path(__file__).parents[1] / "scripts" / "hosts_slurm.conf"


@pytest.fixture(scope="module")
def queue_project(slurm_queue, tmp_path_factory):
    """A project whose hosts.conf is the shipped Slurm template; SLURM_CONF in
    the environment of Scipion (sbatch/squeue/scancel and the jobs inherit it)."""
    from pyworkflow.project import Manager
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_queue["SLURM_CONF"]
    cwd = os.getcwd()
    # SCIPION_HOSTS is an absolute path here, and pyworkflow copies a project's hostsConf onto
    # "<project>/<SCIPION_HOSTS>", which is then that same file: the Slurm template replaces the
    # session's hosts.conf, which every project (and its protocols' processes) reads while this
    # module runs. Put the session's back afterwards, or later modules' MPI runs would call srun.
    hosts = Path(os.environ["SCIPION_HOSTS"])
    hosts_text = hosts.read_text()
    proj = Manager().createProject("gsplat_queue", hostsConf=str(TEMPLATE),
                                   location=str(tmp_path_factory.mktemp("queue_projects")))
    os.chdir(proj.path)
    yield proj
    os.chdir(cwd)
    hosts.write_text(hosts_text)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def _queued(prot, memory="1G"):
    prot._useQueue.set(True)
    prot.setQueueParams(["gsplat", {"JOB_MEMORY": memory, "JOB_TIME": "00:30:00"}])
    return prot


def _job_state(job_id, env) -> str:
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, env=env)
    return out.stdout.strip()


def _wait_running(project, prot, env, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        update_status(project, prot)
        jobs = prot.getJobIds()
        if len(jobs) and _job_state(jobs[0], env) == "RUNNING" and prot.isActive():
            return int(jobs[0])
        time.sleep(0.5)
    raise AssertionError(f"job of {prot.getRunName()} not running after {timeout} s\n{log_tail(prot)}")


@pytest.fixture(scope="module")
def imported(queue_project, sim_small, slurm_queue):
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    prot = _queued(queue_project.newProtocol(ProtGsplatImportParticlesStar,
                                             starFile=str(sim_small / "particles.star")))
    return launch_and_wait(queue_project, prot, timeout=300)


def test_a_protocol_runs_as_one_slurm_job(queue_project, imported, slurm_queue):
    assert imported.outputParticles.getSize() == 400
    jobs = imported.getJobIds()
    assert len(jobs) == 1 and int(jobs[0]) > 0
    script = Path(imported._getLogsPath(f"{imported.strId()}.job"))
    text = script.read_text()
    assert "#SBATCH --gres=gpu:0" in text  # the import uses no GPU: none requested
    assert "export OMP_NUM_THREADS=" in text and "#SBATCH -p gsplat" in text
    # the job ran under Slurm (its own log line)
    out = Path(imported._getLogsPath(f"{imported.strId()}.job.out")).read_text()
    assert f"job {jobs[0]} on node" in out


def _reconstruction(project, imported, **kwargs):
    from scipion_gsplat.protocols import ProtGsplatReconstructSplat
    settings = dict(nGaussians=300, iterations=6, batchSize=32, numberOfThreads=1)
    settings.update(kwargs)
    prot = project.newProtocol(ProtGsplatReconstructSplat, **settings)
    prot.inputParticles.set(imported)
    prot.inputParticles.setExtended("outputParticles")
    return _queued(prot)


def test_a_controller_outage_does_not_fail_a_running_protocol(queue_project, imported, slurm_queue):
    folder = Path(slurm_queue["SLURM_CONF"]).parent
    prot = _reconstruction(queue_project, imported)
    queue_project.launchProtocol(prot, wait=False)
    _wait_running(queue_project, prot, slurm_queue)
    pid = int((folder / "slurmctld.pid").read_text())
    os.kill(pid, 15)
    try:
        t0 = time.time()
        while time.time() - t0 < 6.0:  # Scipion polls during the outage
            update_status(queue_project, prot)
            assert not prot.isFailed(), prot.getErrorMessage()
            time.sleep(1.0)
    finally:
        subprocess.run(["slurmctld", "-f", slurm_queue["SLURM_CONF"]], check=True, env=slurm_queue)
    t0 = time.time()
    while not (prot.isFinished() or prot.isFailed()) and time.time() - t0 < 600:
        update_status(queue_project, prot)
        time.sleep(1.0)
    assert prot.isFinished(), f"{prot.getErrorMessage()}\n{log_tail(prot)}"
    assert prot.outputVolume is not None


def test_a_cancelled_job_leaves_the_protocol_failed_and_resumable(queue_project, imported, slurm_queue):
    from pyworkflow.protocol.constants import MODE_RESUME
    prot = _reconstruction(queue_project, imported)
    queue_project.launchProtocol(prot, wait=False)
    job = _wait_running(queue_project, prot, slurm_queue)
    subprocess.run(["scancel", str(job)], check=True, env=slurm_queue)
    t0 = time.time()
    while not prot.isFailed() and time.time() - t0 < 120:
        update_status(queue_project, prot)
        time.sleep(1.0)
    assert prot.isFailed(), prot.getStatus()
    assert not hasattr(prot, "outputVolume") or prot.outputVolume is None
    prot.runMode.set(MODE_RESUME)
    launch_and_wait(queue_project, prot, timeout=600)
    assert prot.outputVolume is not None
    assert len(prot.getJobIds()) == 1 and int(prot.getJobIds()[0]) != job


def test_mpi_processes_become_slurm_tasks(queue_project, imported, slurm_queue):
    """numberOfMpi=2 through the queue: one job with two tasks started by srun
    (the template's PARALLEL_COMMAND); the program runs as two ranks."""
    from scipion_gsplat.protocols import ProtGsplatReconstructFourier
    prot = queue_project.newProtocol(ProtGsplatReconstructFourier, numberOfMpi=2, numberOfThreads=1)
    prot.inputParticles.set(imported)
    prot.inputParticles.setExtended("outputParticles")
    launch_and_wait(queue_project, _queued(prot), timeout=600)
    assert "#SBATCH --ntasks=2" in Path(prot._getLogsPath(f"{prot.strId()}.job")).read_text()
    log = Path(prot.getStdoutLog()).read_text()
    assert "srun --mpi=none -n 2" in log and "2 ranks" in log
    assert prot.outputVolume is not None
