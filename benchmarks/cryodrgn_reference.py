"""cryoDRGN as a reference tool for heterogeneity benchmarks.

Runs cryoDRGN (https://github.com/ml-struct-bio/cryodrgn) from its own virtual
environment through subprocesses, so this module needs only the standard
library and numpy (no torch import here).  ``run_cryodrgn`` does, in
``workdir``::

    cryodrgn parse_pose_star STAR -o pose.pkl -D BOX --Apix APIX
    cryodrgn parse_ctf_star  STAR -o ctf.pkl  -D BOX --Apix APIX [--ps 0]
    cryodrgn train_vae STAR --poses pose.pkl --ctf ctf.pkl --zdim Z -n EPOCHS \
        -o train --seed SEED --max-threads T --no-analysis [extra_args]

and returns the latent means ``train/z.pkl`` (a pickled float32 numpy array,
one row per particle in STAR row order), the wall time of the whole sequence
and the peak RSS of the training process.

Conventions found for STAR files from ``gsplat_simulate`` / RELION 3.1
(checked with cryoDRGN 4.3.1, torch 2.13.0+cpu):

* Contrast: leave cryoDRGN's default (it negates the images).  Its CTF is
  ``sqrt(1-w^2) sin(g) - w cos(g)`` (about -1 in the first lobe), the
  opposite sign of RELION's ``-sin(chi)``, so "protein bright" RELION-style
  particles need the default inversion.  Checked with
  ``cryodrgn backproject_voxel``: the default gives correlation +0.55 with
  the true map, ``--uninvert-data`` gives -0.55.  Do NOT pass
  ``--uninvert-data``.
* ``parse_ctf_star`` writes NaN phase shifts when the STAR has no
  ``_rlnPhaseShift`` column, and training then fails on NaN; ``--ps 0`` is
  added automatically in that case only (``--ps`` overrides the column when
  present, so it is not passed otherwise).
* ``parse_pose_star`` needs ``--Apix`` to convert ``_rlnOriginX/YAngst`` to
  pixels; ``-D`` sets the box.  Relative ``_rlnImageName`` stack paths are
  resolved against the STAR file's folder (``--datadir`` via ``extra_args``
  otherwise).
* ``train_vae`` runs ``cryodrgn analyze`` after training unless
  ``--no-analysis`` (minutes of extra CPU); it is always passed here.
* Default architecture (3x1024 encoder/decoder): about 150 s per epoch for
  300 particles at 64 px on one CPU thread.

Install (CPU torch wheel, no CUDA): see ``install_hint()``.
"""

from __future__ import annotations

import os
import pickle
import re
import resource
import subprocess
import time

import numpy as np

__all__ = ["run_cryodrgn", "install_hint"]

DEFAULT_VENV = "/opt/cryodrgn_venv"


def install_hint() -> str:
    """One-line install command for the reference cryoDRGN environment."""
    return ("python3 -m venv /opt/cryodrgn_venv && "
            "/opt/cryodrgn_venv/bin/pip install torch==2.13.0 cryodrgn")


def _tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return "(no log)"


def _run(cmd, log_path, env, cwd, time_path=None):
    """Run ``cmd`` with stdout+stderr to ``log_path``; raise on failure."""
    full = list(cmd)
    if time_path is not None:
        full = ["/usr/bin/time", "-v", "-o", time_path] + full
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        proc = subprocess.run(full, stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(
            "cryoDRGN command failed (exit %d): %s\n--- last lines of %s ---\n%s"
            % (proc.returncode, " ".join(map(str, cmd)), log_path,
               _tail(log_path)))


def _star_particle_columns(star_path: str) -> set:
    """Column labels of the particles table (or of the only table)."""
    cols, tables, current = set(), {}, None
    with open(star_path, errors="replace") as fh:
        for line in fh:
            s = line.strip()
            if s.startswith("data_"):
                current = s
                tables[current] = set()
            elif s.startswith("_rln") and current is not None:
                tables[current].add(s.split()[0])
    if "data_particles" in tables:
        cols = tables["data_particles"]
    else:
        for c in tables.values():
            cols |= c
    return cols


def _version(python: str, env) -> str:
    try:
        out = subprocess.run(
            [python, "-c", "import importlib.metadata as m;"
             "print(m.version('cryodrgn'), m.version('torch'))"],
            capture_output=True, text=True, env=env, timeout=120)
        v = out.stdout.split()
        return "cryodrgn %s (torch %s)" % (v[0], v[1]) if len(v) == 2 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _peak_rss_from_time(path: str):
    try:
        with open(path) as fh:
            m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)",
                          fh.read())
        return int(m.group(1)) / 1024.0 if m else None
    except OSError:
        return None


def run_cryodrgn(star_path, workdir, box, apix, epochs, zdim=1,
                 venv=DEFAULT_VENV, threads=2, extra_args=(), seed=0) -> dict:
    """Parse poses/CTF from ``star_path`` and train a cryoDRGN VAE.

    Args:
        star_path: RELION (3.0 or 3.1) particles STAR file with poses and CTF.
        workdir: folder for the .pkl inputs, logs and the ``train`` output.
        box, apix: image size (px) and pixel size (Å).
        epochs: number of training epochs.
        zdim: latent dimension.
        venv: virtual environment holding cryoDRGN (see ``install_hint``).
        threads: CPU threads (OMP/MKL and ``--max-threads``).
        extra_args: extra ``train_vae`` arguments (e.g. ``--enc-dim 256``).
        seed: ``train_vae --seed`` (ignored when extra_args has ``--seed``).

    Returns:
        dict with ``z`` (n_particles, zdim) float array in STAR row order,
        ``seconds`` (wall time of parse + train), ``peak_rss_MB`` (training
        process), ``epochs``, ``version``, plus ``seconds_train`` and
        ``workdir``.
    """
    star_path = os.path.abspath(star_path)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    exe = os.path.join(venv, "bin", "cryodrgn")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(exe):
        raise RuntimeError("cryoDRGN not found at %s; install with: %s"
                           % (exe, install_hint()))
    threads = max(1, int(threads))
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "NUMEXPR_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("MPLBACKEND", "Agg")
    env.pop("PYTHONPATH", None)

    pose_pkl = os.path.join(workdir, "pose.pkl")
    ctf_pkl = os.path.join(workdir, "ctf.pkl")
    outdir = os.path.join(workdir, "train")
    time_path = os.path.join(workdir, "train_vae.time")
    common = ["-D", str(int(box)), "--Apix", repr(float(apix))]

    ctf_cmd = [exe, "parse_ctf_star", star_path, "-o", ctf_pkl] + common
    if "_rlnPhaseShift" not in _star_particle_columns(star_path):
        ctf_cmd += ["--ps", "0"]
    extra = [str(a) for a in extra_args]
    train_cmd = [exe, "train_vae", star_path, "--poses", pose_pkl,
                 "--ctf", ctf_pkl, "--zdim", str(int(zdim)),
                 "-n", str(int(epochs)), "-o", outdir,
                 "--max-threads", str(threads), "--no-analysis"]
    if "--seed" not in extra:
        train_cmd += ["--seed", str(int(seed))]
    train_cmd += extra

    use_time = os.access("/usr/bin/time", os.X_OK)  # GNU time -v for RSS
    t0 = time.perf_counter()
    _run([exe, "parse_pose_star", star_path, "-o", pose_pkl] + common,
         os.path.join(workdir, "parse_pose_star.log"), env, workdir)
    _run(ctf_cmd, os.path.join(workdir, "parse_ctf_star.log"), env, workdir)
    t1 = time.perf_counter()
    _run(train_cmd, os.path.join(workdir, "train_vae.log"), env, workdir,
         time_path if use_time else None)
    t2 = time.perf_counter()

    peak = _peak_rss_from_time(time_path) if use_time else None
    if peak is None:  # upper bound: largest child waited for by this process
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0

    z_path = os.path.join(outdir, "z.pkl")
    if not os.path.exists(z_path):
        z_path = os.path.join(outdir, "z.%d.pkl" % int(epochs))
    if not os.path.exists(z_path):
        raise RuntimeError("cryoDRGN wrote no z.pkl in %s\n--- last lines of "
                           "train_vae.log ---\n%s"
                           % (outdir, _tail(os.path.join(workdir,
                                                         "train_vae.log"))))
    with open(z_path, "rb") as fh:
        z = np.asarray(pickle.load(fh), dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]

    return {"z": z, "seconds": t2 - t0, "seconds_train": t2 - t1,
            "peak_rss_MB": float(peak), "epochs": int(epochs),
            "version": _version(python, env), "workdir": workdir}
