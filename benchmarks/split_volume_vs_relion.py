"""Benchmark: split-volume classification (every mode) vs RELION 3D classification vs the oracle.

Simulated lysozyme (1AKI) sets, 64 px at 1.5 Å, random poses, CTF:

* conformational: β-domain (residues 40-88) rotated 30° about its hinge, 50/50, SNR 0.05;
* compositional: residues 106-129 (~18 % of the mass) removed, 85/15, SNR 0.02;
* subtle: residues 120-126 (~5 % of the mass) removed, 60/40, SNR 0.1, 0.05 and 0.02.

For each set: our modes (graph as in the thesis; graph; graph + 3D refinement;
3D-pooled; both with consensus), ``relion_refine --skip_align --K 2
--tau2_fudge 4 --iter 25`` (Debian RELION 3.1, several seeds, 2 threads) and the
oracle (each particle assigned with the two true maps at its true pose and CTF).
Reported: accuracy (up to the swap of labels), adjusted Rand index (on
unbalanced sets all-in-one-class scores ARI 0 but accuracy = majority
fraction), wall time. A second part times max-cut solvers on planted graphs.

Usage::

    python benchmarks/split_volume_vs_relion.py [--sizes 4000 20000] [--relion-seeds 1 2 3]
        [--sets conformational compositional subtle_0.1 ...] [--maxcut-only] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

from scipion_gsplat.core import fourier, io

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SETS = {
    "conformational": dict(args=["--hinge", "A/40-88", "--hinge-angle", "30"], pops="0.5,0.5", snr=0.05),
    "compositional": dict(args=["--remove", "A/106-129"], pops="0.85,0.15", snr=0.02),
    "subtle_0.1": dict(args=["--remove", "A/120-126"], pops="0.6,0.4", snr=0.1),
    "subtle_0.05": dict(args=["--remove", "A/120-126"], pops="0.6,0.4", snr=0.05),
    "subtle_0.02": dict(args=["--remove", "A/120-126"], pops="0.6,0.4", snr=0.02),
}


def run(cmd, cwd=None, log=None) -> float:
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as fh:
        subprocess.run([str(c) for c in cmd], cwd=cwd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def score(labels, truth) -> dict:
    labels, truth = np.asarray(labels), np.asarray(truth)
    return {"accuracy": float(max((labels == truth).mean(), (labels != truth).mean())),
            "ari": float(adjusted_rand_score(truth, labels))}


def classes(star_path) -> np.ndarray:
    return io.read_particles(star_path).column("rlnClassNumber").astype(int)


def oracle(sim: Path) -> np.ndarray:
    star = io.read_particles(sim / "particles.star")
    reader = io.ImageReader(star)
    err = np.zeros((len(star), 2))
    maps = [io.read_map(sim / f"truth_state{k}.mrc")[0] for k in (1, 2)]
    for rows, imgs in reader.chunks(1000):
        sub = star.subset(rows)
        for k, vol in enumerate(maps):
            proj = fourier.project(vol, sub.poses(), star.pixel_size, sub.shifts_A(), sub.ctf_params())
            err[rows, k] = ((imgs - proj) ** 2).sum((1, 2))
    return np.where(err[:, 0] <= err[:, 1], 1, 2)


def ours(sim: Path, work: Path, log_dir: Path) -> list:
    star = sim / "particles.star"
    t_cls = run([BIN / "gsplat_aligned_2d_classification", "-i", star, "-o", work / "cls"],
                log=log_dir / "cls.log")
    t_thesis = run([BIN / "gsplat_graph_max_cut", "-i", work / "cls", "--particles", star, "-o",
                    work / "thesis", "--weights", "llr"], log=log_dir / "thesis.log")
    t_graph = run([BIN / "gsplat_graph_max_cut", "-i", work / "cls", "--particles", star, "-o",
                   work / "graph"], log=log_dir / "graph.log")
    t_gref = run([BIN / "gsplat_refine_classes", "-i", work / "graph" / "particles.star", "-o",
                  work / "graph_refine", "--init", "column"], log=log_dir / "graph_refine.log")
    t_pool = run([BIN / "gsplat_refine_classes", "-i", star, "-o", work / "pooled", "--init", "pooled"],
                 log=log_dir / "pooled.log")
    t_both = run([BIN / "gsplat_refine_classes", "-i", work / "graph" / "particles.star", "-o",
                  work / "both", "--init", "both"], log=log_dir / "both.log")
    return [("ours: graph (thesis, λ weights)", work / "thesis", t_cls + t_thesis),
            ("ours: graph (coordinate weights)", work / "graph", t_cls + t_graph),
            ("ours: graph + 3D refinement", work / "graph_refine", t_cls + t_graph + t_gref),
            ("ours: 3D-pooled", work / "pooled", t_pool),
            ("ours: both with consensus", work / "both", t_cls + t_graph + t_both)]


def relion(sim: Path, work: Path, seed: int) -> tuple[Path, float]:
    out = work / f"relion_seed{seed}"
    done = out / "run_it025_data.star"
    timing = out / "seconds.txt"
    if done.exists() and timing.exists():
        return done, float(timing.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not (work / "consensus.mrc").exists():
        run(["relion_reconstruct", "--i", sim / "particles.star", "--o", work / "consensus.mrc", "--ctf"],
            cwd=sim)
    t = run(["relion_refine", "--i", "particles.star", "--o", out / "run", "--ref", work / "consensus.mrc",
             "--ini_high", 15, "--K", 2, "--iter", 25, "--tau2_fudge", 4, "--skip_align", "--ctf",
             "--particle_diameter", 70, "--zero_mask", "--flatten_solvent", "--pad", 2, "--j", 2,
             "--random_seed", seed], cwd=sim, log=out / "log.txt")
    timing.write_text(f"{t:.2f}")
    return done, t


def classification_table(args) -> list:
    rows = []
    for n in args.sizes:
        for name in args.sets:
            spec = SETS[name]
            sim = Path(args.out) / f"{name}_{n}"
            if not (sim / "particles.star").exists():
                run([BIN / "gsplat_simulate", "-i", REPO / "tests/data/1aki.pdb", "-o", sim, "-n", n,
                     "--box", 64, "--angpix", 1.5, "--snr", spec["snr"], "--populations", spec["pops"],
                     "--seed", 100 + n % 97, "--device", "cpu"] + spec["args"])
            truth = np.load(sim / "ground_truth.npz")["labels"]
            work = sim / "results"
            logs = work / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            base = {"set": name, "particles": n}
            for method, folder, t in ours(sim, work, logs):
                rows.append({**base, "method": method, "time_s": t,
                             **score(classes(folder / "particles.star"), truth)})
                print(rows[-1], flush=True)
            for seed in args.relion_seeds:
                star, t = relion(sim, work, seed)
                import starfile
                rel = starfile.read(star)["particles"]["rlnClassNumber"].to_numpy(int)
                rows.append({**base, "method": f"relion_refine K=2 seed {seed}", "time_s": t, **score(rel, truth)})
                print(rows[-1], flush=True)
            t0 = time.perf_counter()
            rows.append({**base, "method": "oracle (true maps, poses, CTF)",
                         "time_s": time.perf_counter() - t0, **score(oracle(sim), truth)})
            print(rows[-1], flush=True)
    return rows


def planted_graph(d: int, noise: float, seed: int):
    """A direction-like graph: ``d`` points on a hemisphere, edges between
    neighbours (about 10 each), weights ``s_i s_j`` + Gaussian noise."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree
    from scipion_gsplat.core.split_volume.directions import fibonacci_sphere
    pts = fibonacci_sphere(2 * d)
    pts = pts[pts[:, 2] > 0][:d]
    rng = np.random.default_rng(seed)
    s = np.where(rng.random(len(pts)) < 0.5, -1.0, 1.0)
    radius = 2 * np.sin(np.sqrt(10 * 2 * np.pi / d / np.pi) / 2)
    pairs = cKDTree(pts).query_pairs(radius, output_type="ndarray")
    w = s[pairs[:, 0]] * s[pairs[:, 1]] + rng.normal(0, noise, len(pairs))
    m = sp.coo_matrix((w, (pairs[:, 0], pairs[:, 1])), shape=(len(pts),) * 2)
    return (m + m.T).tocsr(), s


def maxcut_table(sizes=(100, 370, 1000, 5000), noise: float = 1.0) -> list:
    from scipion_gsplat.core.split_volume import maxcut
    rows = []
    for d in sizes:
        w, truth = planted_graph(d, noise, seed=d)
        for method in ("sdp", "auto", "spectral"):
            t0 = time.perf_counter()
            res = maxcut.synchronise(w, method, seed=0)
            t = time.perf_counter() - t0
            again = maxcut.synchronise(w, method, seed=0)
            rec = float(max((res.signs == truth).mean(), (res.signs != truth).mean()))
            name = method if method != "auto" else "auto (" + res.methods[0] + ")"
            if method == "sdp":
                name = "sdp (" + res.methods[0] + ")"
            rows.append({"D": d, "method": name, "time_s": t, "recovered": rec,
                         "components": res.n_components,
                         "deterministic": bool(np.array_equal(res.signs, again.signs)),
                         "objective": res.objective})
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 20000])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--relion-seeds", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--maxcut-only", action="store_true")
    ap.add_argument("--no-maxcut", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "output" / "split_volume"))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.maxcut_only:
        if shutil.which("relion_refine") is None and args.relion_seeds:
            print("relion_refine not found: apt-get install relion", file=sys.stderr)
            return 1
        results["classification"] = classification_table(args)
    if not args.no_maxcut:
        results["maxcut"] = maxcut_table()
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if "classification" in results:
        print(f"\n{'set':<15} {'N':>6}  {'method':<36} {'accuracy':>8} {'ARI':>6} {'time s':>8}")
        for r in results["classification"]:
            print(f"{r['set']:<15} {r['particles']:>6}  {r['method']:<36} {r['accuracy']:>8.4f} "
                  f"{r['ari']:>6.3f} {r['time_s']:>8.1f}")
        print("\nbest of ours vs best RELION seed (ARI) and speed ratio (RELION best-seed time / ours):")
        keys = sorted({(r["set"], r["particles"]) for r in results["classification"]})
        for key in keys:
            rs = [r for r in results["classification"] if (r["set"], r["particles"]) == key]
            mine = max((r for r in rs if r["method"].startswith("ours")), key=lambda r: r["ari"])
            rel = [r for r in rs if r["method"].startswith("relion")]
            if rel:
                best = max(rel, key=lambda r: r["ari"])
                print(f"  {key[0]:<15} {key[1]:>6}: ours {mine['method'][6:]} ARI {mine['ari']:.3f} vs "
                      f"RELION {best['ari']:.3f} (ΔARI {mine['ari'] - best['ari']:+.3f}); "
                      f"{best['time_s'] / mine['time_s']:.1f}× faster")
    if "maxcut" in results:
        print("\nmax-cut on planted graphs (±1 weights + Gaussian noise σ = 1, ~10 neighbours per node):")
        print(f"{'D':>6} {'method':<24} {'time s':>8} {'recovered':>9} {'objective':>10} {'deterministic':>13}")
        for r in results["maxcut"]:
            print(f"{r['D']:>6} {r['method']:<24} {r['time_s']:>8.2f} {r['recovered']:>9.3f} "
                  f"{r['objective']:>10.1f} {str(r['deterministic']):>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
