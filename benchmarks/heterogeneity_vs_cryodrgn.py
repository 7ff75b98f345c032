"""Benchmark: GMM heterogeneity (gsplat_gmm_heterogeneity) vs cryoDRGN on simulated motions.

Data (gsplat_simulate, lysozyme 1AKI from tests/data, 64 px at 1.5 Å, random
poses, origins, CTF, white noise):

* ``hinge``: the β-domain (A/40-88) rotated about its hinge by one of 20 angles
  from 0 to 40°, 4000 particles, SNR 0.05;
* ``two_hinges``: the same plus the N-terminal segment A/1-20 rotated
  independently (5 × 5 angles), 4000 particles, SNR 0.05;
* ``composition``: residues A/100-129 absent from half of 4000 particles, SNR 0.05;
* ``hinge_snr0.1``: ``hinge`` at SNR 0.1 (how the gap to the oracle changes with the information);
* ``hinge_err2``: ``hinge`` with pose errors in the STAR file (``--pose-error 2 --shift-error 0.5``:
  2° on each Euler angle, 0.5 px on each origin; same images), run with the poses fixed and refined
  against the consensus (``--sigma-ang``/``--sigma-shift``); the table adds the RMS pose error of
  the input and of the output particles.star against the true poses.

Per run: |Spearman ρ| between each coordinate and the true motion parameter
(the best component is reported; two hinges: the best component per hinge and
the R² of a linear fit of each angle on all coordinates), per-state maps
(the model deformed to the median coordinates of each true state) against the
true state maps (FSC AUC, averaged over states, next to the consensus map's),
wall time and peak memory (GNU time) of the whole program. On ``hinge`` the
same particles go to ``cryodrgn train_vae --zdim 1`` (its own venv, see
benchmarks/cryodrgn_reference.py); on both hinge sets to an oracle: template matching against
the 20 true state maps with the true poses and CTF (the best any method can do
at this SNR). cryoDRGN's default 1024-wide networks take ~40 min per epoch of
4000 particles on one core, so the benchmark trains 256-wide ones (``--drgn-args``)
for 12 epochs; its run is cached in ``<out>/hinge/cryodrgn`` keyed by the STAR
file's checksum, epochs and arguments, and reused when present (the table says so).

Usage: python benchmarks/heterogeneity_vs_cryodrgn.py [--threads 1] [--drgn-epochs 12] [--datasets hinge ...] [--reuse]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from scipion_gsplat.core import fourier, fsc, io
from scipion_gsplat.core.heterogeneity.motion_model import MotionModel
from scipion_gsplat.core.heterogeneity.plots import read_outputs

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
COMMON = ["-n", 4000, "--box", 64, "--angpix", 1.5, "--snr", 0.05]
DATASETS = {
    "hinge": (["--hinge", "A/40-88", "--hinge-angle", 40, "--n-states", 20, "--seed", 5], []),
    "two_hinges": (["--hinge", "A/40-88", "--hinge-angle", 40, "--hinge2", "A/1-20", "--hinge2-angle", 40,
                    "--n-states", 5, "--seed", 7], []),
    "composition": (["--remove", "A/100-129", "--seed", 9], ["--amplitudes", "--motions", "1"]),
    # the same motion at twice the SNR: how the gap to the oracle changes with the information
    "hinge_snr0.1": (["--hinge", "A/40-88", "--hinge-angle", 40, "--n-states", 20, "--seed", 5, "--snr", 0.1], []),
    # the hinge particles (same images) with 2° / 0.5 px errors on the poses of the STAR file
    "hinge_err2": (["--hinge", "A/40-88", "--hinge-angle", 40, "--n-states", 20, "--seed", 5,
                    "--pose-error", 2, "--shift-error", 0.5], []),
}
DEFAULT = ("default (4 motions, 3 rounds x 2 epochs, 40 px)", [])
RUNS = {"hinge": [DEFAULT, ("1 motion, 6 rounds x 1 epoch, 64 px",
                            ["--motions", "1", "--rounds", "6", "--refit-epochs", "1", "--resize", "64"]),
                  ("4 motions + 2 rigid parts", ["--parts", "2"])],
        "two_hinges": [DEFAULT, ("4 motions + 3 rigid parts", ["--parts", "3"])],
        "composition": [("amplitudes, 1 motion", [])],
        "hinge_snr0.1": [DEFAULT],
        "hinge_err2": [("poses fixed", ["--sigma-ang", "0", "--sigma-shift", "0"]),
                       ("poses refined (search, 2° / 0.5 px prior)", ["--sigma-ang", "2", "--sigma-shift", "0.5"]),
                       ("poses refined (gradient, 2° / 0.5 px prior)",
                        ["--sigma-ang", "2", "--sigma-shift", "0.5", "--pose-method", "gradient"])]}


def _code_digest() -> str:
    """md5 of the heterogeneity code and its program."""
    files = sorted((REPO / "scipion_gsplat" / "core" / "heterogeneity").glob("*.py"))
    files.append(REPO / "programs" / "gmm_heterogeneity.py")
    return hashlib.md5(b"".join(f.read_bytes() for f in files)).hexdigest()


def run(cmd, log, cwd=None, env=None, reuse: bool = False) -> tuple[float, float]:
    """Run a command under GNU time; return (wall s, peak RSS MB). With
    ``reuse`` and a finished earlier run of the same command with the same
    heterogeneity code (its log and time files), read its figures instead of
    running it again (a changed default would not show in the command)."""
    tfile = Path(str(log) + ".time")
    cmd = [str(c) for c in cmd]
    done = Path(str(log) + ".cmd")
    key = " ".join(cmd) + f"\ncode {_code_digest()}"
    if not (reuse and tfile.exists() and done.exists() and done.read_text() == key):
        done.unlink(missing_ok=True)
        with open(log, "w") as fh:
            subprocess.run(["/usr/bin/time", "-v", "-o", str(tfile)] + cmd, cwd=cwd, env=env,
                           check=True, stdout=fh, stderr=subprocess.STDOUT)
        done.write_text(key)
    text = tfile.read_text()
    h, m, sec = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)",
                          text).groups()
    wall = int(h or 0) * 3600 + int(m) * 60 + float(sec)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return wall, (int(rss.group(1)) / 1024.0 if rss else float("nan"))


def rho(a, b) -> float:
    return float(abs(spearmanr(a, b).correlation))


def r2(z: np.ndarray, y: np.ndarray) -> float:
    """R² of a linear fit of ``y`` on the columns of ``z``."""
    x = np.column_stack([z, np.ones(len(z))])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(1.0 - np.var(y - x @ coef) / np.var(y))


def pose_error(star_path: Path, truth) -> dict:
    """RMS angular error (degrees) and RMS 2D origin error (pixels) of a STAR file's poses."""
    from scipion_gsplat.core import geometry
    from scipion_gsplat.core.poses.rotations import pose_errors
    star = io.read_particles(star_path)
    return pose_errors(star.poses(), geometry.euler_to_matrix(*truth["true_angles_deg"].T), star.shifts_A(),
                       truth["true_origins_A"], star.pixel_size)


def state_map_auc(sim: Path, out: Path, labels: np.ndarray, pix: float, box: int) -> tuple[float, float]:
    """Mean FSC AUC of the per-state maps (model at each state's median
    coordinates) and of the consensus map against the true state maps."""
    mm, z = MotionModel.load(out / "heterogeneity.npz")
    cons, _ = io.read_map(out / "consensus.mrc")
    ours, base = [], []
    for s in np.unique(labels):
        truth, _ = io.read_map(sim / f"truth_state{s}.mrc")
        vol = mm.frame(np.median(z[labels == s], axis=0)).to_map(box, pix)
        ours.append(fsc.fsc_auc(fsc.fsc_curve(vol, truth, pix)[1]))
        base.append(fsc.fsc_auc(fsc.fsc_curve(cons, truth, pix)[1]))
    return float(np.mean(ours)), float(np.mean(base))


def oracle_rho(sim: Path, n_states: int, params: np.ndarray) -> float:
    """|ρ| of the posterior-mean state under template matching with the true maps."""
    star = io.read_particles(sim / "particles.star")
    imgs = io.ImageReader(star).read(np.arange(len(star)))
    truth = np.load(sim / "ground_truth.npz")
    noise = float(truth["noise_sigma"]) ** 2
    poses, shifts = star.poses(), star.shifts_A()
    if "true_angles_deg" in truth:  # the oracle knows the true poses
        from scipion_gsplat.core import geometry
        poses, shifts = geometry.euler_to_matrix(*truth["true_angles_deg"].T), truth["true_origins_A"]
    loss = np.zeros((len(star), n_states))
    for s in range(n_states):
        vol, pix = io.read_map(sim / f"truth_state{s + 1}.mrc")
        proj = fourier.project(vol, poses, pix, shifts, star.ctf_params())
        loss[:, s] = ((proj - imgs) ** 2).sum(axis=(1, 2))
    p = np.exp(-(loss - loss.min(1, keepdims=True)) / (2 * noise))
    p /= p.sum(1, keepdims=True)
    return rho(p @ np.arange(n_states), params)


def _drgn_epochs_rho(train: Path, epochs: int, params: np.ndarray) -> list:
    """|ρ| of cryoDRGN's latent after each epoch (its z.<e>.pkl files)."""
    import pickle
    out = []
    for e in range(1, epochs + 1):
        path = train / f"z.{e}.pkl"
        if path.exists():
            with open(path, "rb") as fh:
                out.append(rho(np.asarray(pickle.load(fh))[:, 0], params))
    return out


def cryodrgn_row(sim: Path, params: np.ndarray, epochs: int, threads: int, extra: list) -> dict:
    from cryodrgn_reference import install_hint, run_cryodrgn
    work = sim / "cryodrgn"
    digest = hashlib.md5((sim / "particles.star").read_bytes() + (sim / "particles.mrcs").read_bytes()[:1 << 20]
                         ).hexdigest()
    key = {"digest": digest, "epochs": epochs, "extra": list(extra)}
    cache = work / "result.json"
    label = f"cryodrgn train_vae --zdim 1 {' '.join(extra)} {epochs} ep".replace("  ", " ")
    res = json.loads(cache.read_text()) if cache.exists() else {}
    if all(res.get(k) == v for k, v in key.items()):
        label += " (cached run)"
    else:
        if not Path("/opt/cryodrgn_venv/bin/cryodrgn").exists():
            print(f"cryoDRGN not installed ({install_hint()}): skipped", file=sys.stderr)
            return {}
        res = run_cryodrgn(sim / "particles.star", work, 64, 1.5, epochs, zdim=1, threads=threads, extra_args=extra)
        np.save(work / "z.npy", res.pop("z"))
        res.update(key)
        cache.write_text(json.dumps(res, indent=1))
        label += f" ({threads} thr)"
    z = np.load(work / "z.npy")
    return {"method": label, "rho": rho(z[:, 0], params), "time_s": res["seconds"], "peak_MB": res["peak_rss_MB"],
            "rho_by_epoch": _drgn_epochs_rho(work / "train", epochs, params)}


def benchmark(name: str, out: Path, threads: int, drgn_epochs: int, reuse: bool = False,
              drgn_args: tuple = ()) -> list:
    sim_args, extra = DATASETS[name]
    sim = out / name
    if not (sim / "particles.star").exists():
        subprocess.run([str(BIN / "gsplat_simulate"), "-i", str(REPO / "tests/data/1aki.pdb"), "-o", str(sim)]
                       + [str(a) for a in COMMON + sim_args] + ["--threads", str(threads), "--device", "cpu"],
                       check=True, stdout=subprocess.DEVNULL)
    truth = np.load(sim / "ground_truth.npz")
    labels, params = truth["labels"], truth["parameters"]
    rows = []
    for label, run_args in RUNS[name]:
        folder = sim / ("ours_" + re.sub(r"\W+", "_", label).strip("_"))
        wall, peak = run([BIN / "gsplat_gmm_heterogeneity", "-i", sim / "particles.star", "-o", folder,
                          "--restart", "--threads", threads, "--device", "cpu", "--frames", 5] + extra + run_args,
                         sim / f"{folder.name}.log", reuse=reuse)
        z = read_outputs(folder)["coordinates"]  # the coordinates users see (principal ones with parts)
        auc, auc_cons = state_map_auc(sim, folder, labels, 1.5, 64)
        row = {"method": f"gsplat {label} ({threads} thr)", "time_s": wall, "peak_MB": peak,
               "rho": max(rho(z[:, k], params) for k in range(z.shape[1])), "auc": auc, "auc_consensus": auc_cons}
        if "parameters2" in truth:
            p2 = truth["parameters2"]
            row["rho2"] = max(rho(z[:, k], p2) for k in range(z.shape[1]))
            row["r2"] = (r2(z, params), r2(z, p2))
            row["components"] = (int(np.argmax([rho(z[:, k], params) for k in range(z.shape[1])])) + 1,
                                 int(np.argmax([rho(z[:, k], p2) for k in range(z.shape[1])])) + 1)
        if "true_angles_deg" in truth:
            row["pose_error"] = (pose_error(sim / "particles.star", truth),
                                 pose_error(folder / "particles.star", truth))
        if name == "composition":
            from sklearn.mixture import GaussianMixture
            gm = GaussianMixture(2, random_state=0).fit(z[:, :1])
            pred = gm.predict(z[:, :1]) + 1
            row["accuracy"] = float(max((pred == labels).mean(), (pred != labels).mean()))
        rows.append(row)
    if name.startswith("hinge"):
        cache = sim / "oracle.json"
        if reuse and cache.exists():
            oracle = json.loads(cache.read_text())
        else:
            t0 = time.perf_counter()
            oracle = {"rho": oracle_rho(sim, 20, params), "time_s": time.perf_counter() - t0}
            cache.write_text(json.dumps(oracle))
        rows.append({"method": "oracle: template matching with the 20 true maps", **oracle})
        if drgn_epochs > 0 and name == "hinge":
            drgn = cryodrgn_row(sim, params, drgn_epochs, threads, list(drgn_args))
            if drgn:
                rows.append(drgn)
    return rows


def print_table(name: str, rows: list) -> None:
    args = COMMON + DATASETS[name][0]
    snr = [args[i + 1] for i, a in enumerate(args) if a == "--snr"][-1]  # the last one given wins
    print(f"\n{name}: lysozyme, 64 px at 1.5 Å, 4000 particles, SNR {snr}, {os.cpu_count()} cores")
    head = f"{'method':<58} {'|ρ|':>6} {'state-map AUC':>14} {'consensus AUC':>14} {'time s':>8} {'peak MB':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        auc = f"{r['auc']:.3f}" if "auc" in r else ""
        cons = f"{r['auc_consensus']:.3f}" if "auc_consensus" in r else ""
        peak = f"{r['peak_MB']:.0f}" if "peak_MB" in r else ""
        print(f"{r['method']:<58} {r['rho']:>6.3f} {auc:>14} {cons:>14} {r['time_s']:>8.1f} {peak:>8}")
        if "rho2" in r:
            print(f"{'':<4}second hinge |ρ| {r['rho2']:.3f}; best components {r['components']}; "
                  f"R² of each angle on all coordinates {r['r2'][0]:.3f}, {r['r2'][1]:.3f}")
        if r.get("rho_by_epoch"):
            print(f"{'':<4}|ρ| after each epoch: " + ", ".join(f"{v:.3f}" for v in r["rho_by_epoch"]))
        if "pose_error" in r:
            a, b = r["pose_error"]
            print(f"{'':<4}pose error (RMS) {a['rms_angle_deg']:.2f}° / {a['rms_shift_px']:.2f} px in the input → "
                  f"{b['rms_angle_deg']:.2f}° / {b['rms_shift_px']:.2f} px in the output")
        if "accuracy" in r:
            print(f"{'':<4}two-class accuracy (GMM on the coordinate) {r['accuracy']:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--drgn-epochs", type=int, default=12, help="cryoDRGN epochs (0 = skip cryoDRGN)")
    ap.add_argument("--drgn-args", default="--enc-dim 256 --dec-dim 256",
                    help="extra train_vae arguments (default: 256-wide networks, ~16x cheaper than cryoDRGN's "
                         "1024 default, whose first epoch alone takes ~40 min of one core here)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "output" / "heterogeneity"))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--reuse", action="store_true",
                    help="reuse finished runs of the same commands (figures from their logs) and the oracle")
    args = ap.parse_args()
    if shutil.which("time") is None and not Path("/usr/bin/time").exists():
        print("GNU time is needed (apt-get install time)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.datasets:
        results[name] = benchmark(name, out, args.threads, args.drgn_epochs, args.reuse,
                                  tuple(args.drgn_args.split()))
        print_table(name, results[name])
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
