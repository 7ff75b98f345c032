"""RELION 3.1 reference runs for the benchmarks, cached on disk, and pose-error figures.

Every reference run writes into its own folder a ``seconds.txt`` (wall time of
the RELION call, s) next to its result; a later benchmark run finds both and
reuses them instead of running RELION again (delete the folder to redo it).
RELION is run in the simulation folder (``cwd``), so image names in its STAR
files are the simulator's (``000001@particles.mrcs``) and rows are matched
through ``rlnImageName``.

Runs:

* :func:`reconstruct` - ``relion_reconstruct --ctf`` (one thread);
* :func:`class3d` - ``relion_refine`` Class3D K=2, 25 iterations, either
  ``--skip_align`` (poses fixed) or with local searches
  (``--healpix_order 4 --sigma_ang 2 --offset_range 2 --offset_step 1``);
* :func:`auto_refine` - ``relion_refine --auto_refine --split_random_halves``
  with local searches from the STAR file's poses (3D auto-refine, gold standard).

Used by ``split_volume_vs_relion.py`` and ``splat_vs_relion.py``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np

from scipion_gsplat.core import io
from scipion_gsplat.core.geometry import euler_to_matrix

#: local angular / translational searches, as a consensus refinement's last iterations do:
#: 3.75° HEALPix sampling, σ 2° on each Euler angle (searched ±3σ), ±2 px in 1 px steps
LOCAL_SEARCH = ["--healpix_order", 4, "--sigma_ang", 2, "--offset_range", 2, "--offset_step", 1]


def run(cmd, cwd=None, log=None) -> float:
    """Run a command, return its wall time (s); its output goes to ``log``."""
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as fh:
        subprocess.run([str(c) for c in cmd], cwd=cwd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def cached_run(out: Path, result: str, cmd, cwd) -> tuple[Path, float, bool]:
    """Run ``cmd`` into the folder ``out`` unless ``out/result`` and
    ``out/seconds.txt`` exist. Returns ``(out/result, wall time s, was cached)``."""
    done, timing = out / result, out / "seconds.txt"
    if done.exists() and timing.exists():
        return done, float(timing.read_text()), True
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = run(cmd, cwd=cwd, log=out / "log.txt")
    if not done.exists():
        raise RuntimeError(f"{cmd[0]} finished without writing {done} (see {out / 'log.txt'})")
    timing.write_text(f"{t:.2f}")
    return done, t, False


def reconstruct(sim: Path, out: Path, star: str = "particles.star") -> tuple[Path, float]:
    """``relion_reconstruct --ctf`` of ``sim/star`` into ``out/relion.mrc`` (cached)."""
    path, t, _ = cached_run(out, "relion.mrc", ["relion_reconstruct", "--i", star, "--o",
                                                out.resolve() / "relion.mrc", "--ctf"], cwd=sim)
    return path, t


def class3d(sim: Path, out: Path, ref: Path, seed: int, local: bool, threads: int = 2) -> tuple[Path, float]:
    """RELION Class3D K=2 on ``sim/particles.star`` from ``ref`` (cached).

    Args:
        local: local pose searches (:data:`LOCAL_SEARCH`) instead of ``--skip_align``.

    Returns:
        ``(out/run_it025_data.star, wall time s)``.
    """
    align = LOCAL_SEARCH if local else ["--skip_align"]
    cmd = ["relion_refine", "--i", "particles.star", "--o", out.resolve() / "run", "--ref", ref.resolve(),
           "--ini_high", 15, "--K", 2, "--iter", 25, "--tau2_fudge", 4, "--ctf", "--particle_diameter", 70,
           "--zero_mask", "--flatten_solvent", "--pad", 2, "--j", threads, "--random_seed", seed] + align
    path, t, _ = cached_run(out, "run_it025_data.star", cmd, cwd=sim)
    return path, t


def auto_refine(sim: Path, out: Path, ref: Path, threads: int = 2) -> tuple[Path, Path, float]:
    """RELION 3D auto-refine with local searches from the STAR file's poses (cached).

    ``--auto_refine --split_random_halves`` (halves from ``rlnRandomSubset``),
    reference low-passed at 15 Å, :data:`LOCAL_SEARCH` from the first iteration
    (``--auto_local_healpix_order 4``; RELION's auto-sampling then refines the
    sampling locally), CTF, solvent flattening. RELION 3.1 splits halves only
    under MPI: ``mpirun -n 3 relion_refine_mpi`` (a master and one worker per
    half, each with ``threads`` threads).

    Returns:
        ``(final map out/run_class001.mrc, out/run_data.star, wall time s)``.
    """
    cmd = mpirun(3) + ["relion_refine_mpi", "--i", "particles.star", "--o", out.resolve() / "run",
                       "--ref", ref.resolve(), "--auto_refine", "--split_random_halves", "--ini_high", 15,
                       "--particle_diameter", 70, "--ctf", "--flatten_solvent", "--zero_mask", "--pad", 2,
                       "--j", threads, "--low_resol_join_halves", 40, "--auto_local_healpix_order", 4]
    cmd += LOCAL_SEARCH
    path, t, _ = cached_run(out, "run_class001.mrc", cmd, cwd=sim)
    return path, out / "run_data.star", t


def mpirun(n: int) -> list:
    """``mpirun -n N`` (Open MPI: allowed as root and on fewer cores than processes)."""
    cmd = ["mpirun", "-n", n]
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True)
    if "Open MPI" in version.stdout + version.stderr:
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return cmd


def _by_image_name(star: io.ParticleStar, sim: Path) -> np.ndarray:
    """Row of ``star`` for each particle of ``sim/particles.star`` (in its order)."""
    def key(name: str) -> tuple:  # written relative to other folders: image number + stack file name
        number, _, stack = name.partition("@")
        return int(number), Path(stack).name

    names = [key(n) for n in io.read_particles(sim / "particles.star").particles["rlnImageName"]]
    index = {key(n): i for i, n in enumerate(star.particles["rlnImageName"])}
    missing = [n for n in names if n not in index]
    if missing:
        raise RuntimeError(f"{star.path}: {len(missing)} particles of {sim} missing (e.g. {missing[0]})")
    return np.array([index[n] for n in names])


def classes(star_path, sim: Path) -> np.ndarray:
    """``rlnClassNumber`` of a STAR file, in the order of ``sim/particles.star``."""
    star = io.read_particles(star_path)
    return star.column("rlnClassNumber").astype(int)[_by_image_name(star, sim)]


def pose_errors(star_path, sim: Path) -> Optional[dict]:
    """RMS rotation angle (deg), median angle (deg) and RMS 2D shift (px) of a
    STAR file's poses against the simulation's true ones (``ground_truth.npz``
    ``true_angles_deg``, ``true_origins_A``); None for sets made without them."""
    from scipion_gsplat.core.poses.rotations import pose_errors as errors
    g = np.load(sim / "ground_truth.npz")
    if "true_angles_deg" not in g:
        return None
    star = io.read_particles(star_path)
    rows = _by_image_name(star, sim)
    true = euler_to_matrix(*g["true_angles_deg"].T)
    return errors(star.poses()[rows], true, star.shifts_A()[rows], g["true_origins_A"], star.pixel_size)


def format_pose_errors(e: Optional[dict]) -> str:
    """``'3.46° (2.95°) / 0.71 px'`` (RMS angle (median angle) / RMS shift) or ``''``."""
    if not e:
        return ""
    return f"{e['rms_angle_deg']:.2f}° ({e['median_angle_deg']:.2f}°) / {e['rms_shift_px']:.2f} px"
