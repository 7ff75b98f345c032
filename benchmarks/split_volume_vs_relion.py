"""Benchmark: split-volume classification (every mode) vs RELION 3D classification vs the oracle.

Simulated lysozyme (1AKI) sets, 64 px at 1.5 Å, random poses, CTF:

* conformational: β-domain (residues 40-88) rotated 30° about its hinge, 50/50, SNR 0.05;
* compositional: residues 106-129 (~18 % of the mass) removed, 85/15, SNR 0.02;
* subtle: residues 120-126 (~5 % of the mass) removed, 60/40, SNR 0.1, 0.05 and 0.02.

Pose-error variants (``--pose-errors 1 2``): the same particles (same seed, the
images are byte-identical) with Gaussian errors of σ 1° or 2° on each Euler
angle and 0.5 px on each origin (x and y) in the STAR file, named
``<set>_err<σ>`` (e.g. ``subtle_0.1_err2``), as a consensus refinement leaves them.

For each set: our modes (graph as in the thesis; graph; graph + 3D refinement;
3D-pooled; both with consensus) at their defaults and, on pose-error sets, with
fixed poses (``--sigma-ang 0``, where the program has the option; with
``--our-sigma-ang X`` also with ``--sigma-ang X``, with ``--our-sigma-shift Y``
with ``--sigma-shift Y``); ``relion_refine --K 2
--tau2_fudge 4 --iter 25`` (Debian RELION 3.1, 2 threads) with ``--skip_align``
(several seeds) and, on pose-error sets, with local searches (``--healpix_order 4
--sigma_ang 2 --offset_range 2 --offset_step 1``, ``--relion-local-seeds``), both
from ``relion_reconstruct`` of the STAR file; and the oracle (each particle
assigned with the two true maps at its TRUE pose and CTF). Reported: accuracy (up
to the swap of labels), adjusted Rand index (on unbalanced sets all-in-one-class
scores ARI 0 but accuracy = majority fraction), wall time, the pose error of each
output STAR file against the truth (RMS rotation angle in degrees / RMS 2D
shift in pixels) and the speed ratio against RELION with local searches. RELION
results are cached in ``<out>/<set>_<N>/results/relion_*`` (``seconds.txt`` =
wall time) and reused; ``--relion-only`` runs just them (e.g. in the background
with ``nice -n 10``). One set's ARI moves by about ±0.01 from set to set (a few
dozen particles of 4000); ``--set-seeds`` makes one independent set per
simulator seed and adds the mean and SD of each method's ARI over them. A
second part times max-cut solvers on planted graphs.

Usage::

    python benchmarks/split_volume_vs_relion.py [--sizes 4000 20000] [--relion-seeds 1 2 3] [--set-seeds 123 41 7]
        [--sets conformational compositional subtle_0.1 ...] [--pose-errors 0 1 2] [--modes both pooled]
        [--relion-local-seeds 1] [--relion-only] [--maxcut-only] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

import relion_reference as rr
from scipion_gsplat.core import fourier, geometry, io

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SETS = {
    "conformational": dict(args=["--hinge", "A/40-88", "--hinge-angle", "30"], pops="0.5,0.5", snr=0.05),
    "compositional": dict(args=["--remove", "A/106-129"], pops="0.85,0.15", snr=0.02),
    "subtle_0.1": dict(args=["--remove", "A/120-126"], pops="0.6,0.4", snr=0.1),
    "subtle_0.05": dict(args=["--remove", "A/120-126"], pops="0.6,0.4", snr=0.05),
    "subtle_0.02": dict(args=["--remove", "A/120-126"], pops="0.6,0.4", snr=0.02),
}


run = rr.run
SHIFT_ERROR_PX = 0.5


def set_name(name: str, pose_error: float) -> str:
    """``subtle_0.1`` / ``subtle_0.1_err2`` (pose error σ in degrees per Euler angle)."""
    return name if not pose_error else f"{name}_err{pose_error:g}"


def score(labels, truth) -> dict:
    labels, truth = np.asarray(labels), np.asarray(truth)
    return {"accuracy": float(max((labels == truth).mean(), (labels != truth).mean())),
            "ari": float(adjusted_rand_score(truth, labels))}


def classes(star_path) -> np.ndarray:
    return io.read_particles(star_path).column("rlnClassNumber").astype(int)


def oracle(sim: Path) -> np.ndarray:
    """Each particle assigned with the two true maps at its true pose, origin and CTF."""
    star = io.read_particles(sim / "particles.star")
    g = np.load(sim / "ground_truth.npz")
    if "true_angles_deg" in g:
        poses, shifts = geometry.euler_to_matrix(*g["true_angles_deg"].T), g["true_origins_A"]
    else:
        poses, shifts = star.poses(), star.shifts_A()
    reader = io.ImageReader(star)
    err = np.zeros((len(star), 2))
    maps = [io.read_map(sim / f"truth_state{k}.mrc")[0] for k in (1, 2)]
    for rows, imgs in reader.chunks(1000):
        sub = star.subset(rows)
        for k, vol in enumerate(maps):
            proj = fourier.project(vol, poses[rows], star.pixel_size, shifts[rows], sub.ctf_params())
            err[rows, k] = ((imgs - proj) ** 2).sum((1, 2))
    return np.where(err[:, 0] <= err[:, 1], 1, 2)


_HELP = {}


def has_option(program: str, option: str) -> bool:
    """Whether ``program --help`` lists ``option`` (checked once per program)."""
    if program not in _HELP:
        res = subprocess.run([str(BIN / program), "--help"], capture_output=True, text=True)
        _HELP[program] = res.stdout + res.stderr
    return option in _HELP[program]


MODES = ("graph", "refine", "pooled", "both")


def ours(sim: Path, work: Path, log_dir: Path, pose_variants: list, modes=MODES) -> list:
    """Our modes (``modes``: graph = thesis and coordinate-weight graph splits,
    refine = graph + 3D refinement, pooled, both = both with consensus, the
    protocol's default); ``pose_variants``: ``[(tag, extra refine_classes
    options)]``, the first with ``tag`` '' (defaults). Returns ``[(method, folder, seconds)]``."""
    star = sim / "particles.star"
    t_cls = run([BIN / "gsplat_aligned_2d_classification", "-i", star, "-o", work / "cls"],
                log=log_dir / "cls.log")
    t_thesis = run([BIN / "gsplat_graph_max_cut", "-i", work / "cls", "--particles", star, "-o",
                    work / "thesis", "--weights", "llr"], log=log_dir / "thesis.log")
    t_graph = run([BIN / "gsplat_graph_max_cut", "-i", work / "cls", "--particles", star, "-o",
                   work / "graph"], log=log_dir / "graph.log")
    out = []
    if "graph" in modes:
        out += [("ours: graph (thesis, λ weights)", work / "thesis", t_cls + t_thesis),
                ("ours: graph (coordinate weights)", work / "graph", t_cls + t_graph)]
    for tag, extra in pose_variants:
        sfx = f"_{tag.replace(' ', '').replace('--', '').replace('-', '_')}" if tag else ""
        label = f" [{tag}]" if tag else ""
        if "refine" in modes:
            t_gref = run([BIN / "gsplat_refine_classes", "-i", work / "graph" / "particles.star", "-o",
                          work / f"graph_refine{sfx}", "--init", "column"] + extra,
                         log=log_dir / f"graph_refine{sfx}.log")
            out.append((f"ours: graph + 3D refinement{label}", work / f"graph_refine{sfx}",
                        t_cls + t_graph + t_gref))
        if "pooled" in modes:
            t_pool = run([BIN / "gsplat_refine_classes", "-i", star, "-o", work / f"pooled{sfx}", "--init",
                          "pooled"] + extra, log=log_dir / f"pooled{sfx}.log")
            out.append((f"ours: 3D-pooled{label}", work / f"pooled{sfx}", t_pool))
        if "both" in modes:
            t_both = run([BIN / "gsplat_refine_classes", "-i", work / "graph" / "particles.star", "-o",
                          work / f"both{sfx}", "--init", "both"] + extra, log=log_dir / f"both{sfx}.log")
            out.append((f"ours: both with consensus{label}", work / f"both{sfx}", t_cls + t_graph + t_both))
    return out


def pose_variants(pose_error: float, our_sigma_ang, our_sigma_shift=None) -> list:
    """Our refine_classes runs on a set: defaults and, with pose errors, fixed poses
    (``--sigma-ang 0``), ``--sigma-ang X`` and ``--sigma-shift Y``, when the program has the option."""
    variants = [("", [])]
    if not pose_error:
        return variants
    if not has_option("gsplat_refine_classes", "--sigma-ang"):
        print("note: gsplat_refine_classes has no --sigma-ang yet: only its defaults are run", flush=True)
        return variants
    variants.append(("--sigma-ang 0", ["--sigma-ang", "0"]))
    if our_sigma_ang is not None:
        variants.append((f"--sigma-ang {our_sigma_ang:g}", ["--sigma-ang", f"{our_sigma_ang:g}"]))
    if our_sigma_shift is not None:
        variants.append((f"--sigma-shift {our_sigma_shift:g}", ["--sigma-shift", f"{our_sigma_shift:g}"]))
    return variants


def relion_references(sim: Path, work: Path, args, pose_error: float) -> list:
    """RELION runs on one set (cached): ``[(method, data.star, seconds, local)]``."""
    ref, t_rec = rr.reconstruct(sim, work / "relion_consensus")
    print(f"  relion_reconstruct (consensus for RELION, {sim.name}): {t_rec:.0f} s", flush=True)
    out = []
    for seed in args.relion_seeds:
        star, t = rr.class3d(sim, work / f"relion_seed{seed}", ref, seed, local=False, threads=args.relion_threads)
        out.append((f"relion_refine K=2 --skip_align seed {seed}", star, t, False))
        print(f"  {out[-1][0]} ({sim.name}): {t:.0f} s", flush=True)
    if pose_error:
        for seed in args.relion_local_seeds:
            star, t = rr.class3d(sim, work / f"relion_local_seed{seed}", ref, seed, local=True,
                                 threads=args.relion_threads)
            out.append((f"relion_refine K=2 local search seed {seed}", star, t, True))
            print(f"  {out[-1][0]} ({sim.name}): {t:.0f} s", flush=True)
    return out


def simulate(sim: Path, n: int, spec: dict, pose_error: float, seed=None) -> None:
    """The set, made once (seed from N unless given: the pose-error variants have the same particles)."""
    if (sim / "particles.star").exists():
        return
    errors = ["--pose-error", pose_error, "--shift-error", SHIFT_ERROR_PX] if pose_error else []
    run([BIN / "gsplat_simulate", "-i", REPO / "tests/data/1aki.pdb", "-o", sim, "-n", n,
         "--box", 64, "--angpix", 1.5, "--snr", spec["snr"], "--populations", spec["pops"],
         "--seed", 100 + n % 97 if seed is None else seed, "--device", "cpu"] + spec["args"] + errors)


def classification_table(args) -> list:
    rows = []
    for n in args.sizes:
        for name in args.sets:
            for pe, seed in [(pe, seed) for pe in args.pose_errors for seed in args.set_seeds or [None]]:
                spec, family = SETS[name], set_name(name, pe)
                label = family if seed is None else f"{family}_s{seed}"
                sim = Path(args.out) / f"{label}_{n}"
                simulate(sim, n, spec, pe, seed)
                truth = np.load(sim / "ground_truth.npz")["labels"]
                work = sim / "results"
                logs = work / "logs"
                logs.mkdir(parents=True, exist_ok=True)
                base = {"set": label, "family": family, "particles": n}
                refs = (relion_references(sim, work, args, pe)
                        if args.relion_seeds or (pe and args.relion_local_seeds) else [])
                if args.relion_only:
                    continue
                rows.append({**base, "method": "input poses (STAR file)", "time_s": 0.0,
                             **score(np.ones(n, int), truth), "pose": rr.pose_errors(sim / "particles.star", sim)})
                variants = pose_variants(pe, args.our_sigma_ang, args.our_sigma_shift)
                for method, folder, t in ours(sim, work, logs, variants, args.modes):
                    rows.append({**base, "method": method, "time_s": t,
                                 **score(classes(folder / "particles.star"), truth),
                                 "pose": rr.pose_errors(folder / "particles.star", sim)})
                    print(rows[-1], flush=True)
                for method, star, t, local in refs:
                    rows.append({**base, "method": method, "time_s": t, "relion_local": local,
                                 **score(rr.classes(star, sim), truth), "pose": rr.pose_errors(star, sim)})
                    print(rows[-1], flush=True)
                t0 = time.perf_counter()
                rows.append({**base, "method": "oracle (true maps, poses, CTF)",
                             **score(oracle(sim), truth), "time_s": time.perf_counter() - t0})
                print(rows[-1], flush=True)
    return rows


def print_classification(rows: list) -> None:
    print(f"\n{'set':<22} {'N':>6}  {'method':<52} {'accuracy':>8} {'ARI':>6} {'time s':>8} "
          f"{'pose error RMS (median)':>26}")
    for r in rows:
        print(f"{r['set']:<22} {r['particles']:>6}  {r['method']:<52} {r['accuracy']:>8.4f} "
              f"{r['ari']:>6.3f} {r['time_s']:>8.1f} {rr.format_pose_errors(r.get('pose')):>26}")
    print("\nbest of ours vs best RELION (ARI) and speed ratios (RELION run time / ours):")
    for key in sorted({(r["set"], r["particles"]) for r in rows}):
        rs = [r for r in rows if (r["set"], r["particles"]) == key]
        mine = max((r for r in rs if r["method"].startswith("ours")), key=lambda r: r["ari"])
        line = f"  {key[0]:<22} {key[1]:>6}: ours {mine['method'][6:]} ARI {mine['ari']:.3f}"
        for tag, sel in (("--skip_align", lambda r: r.get("relion_local") is False),
                         ("local search", lambda r: r.get("relion_local") is True)):
            rel = [r for r in rs if sel(r)]
            if rel:
                best = max(rel, key=lambda r: r["ari"])
                line += (f"; RELION {tag} {best['ari']:.3f} (ΔARI {mine['ari'] - best['ari']:+.3f}, "
                         f"ours {best['time_s'] / mine['time_s']:.1f}× faster)")
        print(line)
    families = {(r["family"], r["particles"]) for r in rows}
    if len(families) < len({(r["set"], r["particles"]) for r in rows}):
        print("\nmean ± SD of the ARI over the sets made with --set-seeds (number of sets):")
        for fam, n in sorted(families):
            rs = [r for r in rows if (r["family"], r["particles"]) == (fam, n)]
            for method in dict.fromkeys(r["method"] for r in rs):
                a = np.array([r["ari"] for r in rs if r["method"] == method])
                print(f"  {fam:<22} {n:>6}  {method:<52} {a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0:.3f}"
                      f" ({len(a)})")


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
    ap.add_argument("--pose-errors", type=float, nargs="+", default=[0.0, 1.0, 2.0],
                    help="σ of the pose error per Euler angle (degrees) of each variant of every set "
                         f"(0: exact poses; others add a {SHIFT_ERROR_PX} px origin error)")
    ap.add_argument("--set-seeds", type=int, nargs="*", default=None,
                    help="simulator seeds: one independent set per seed (folders <set>_s<seed>_<N>) and a "
                         "table of the mean ARI; default one set per size, seeded from N (4000: seed 123)")
    ap.add_argument("--relion-seeds", type=int, nargs="*", default=[1, 2, 3],
                    help="seeds of RELION Class3D --skip_align")
    ap.add_argument("--relion-local-seeds", type=int, nargs="*", default=[1],
                    help="seeds of RELION Class3D with local searches (pose-error sets only; slow)")
    ap.add_argument("--relion-threads", type=int, default=2, help="relion_refine --j")
    ap.add_argument("--relion-only", action="store_true",
                    help="make the sets and run (or find cached) RELION references only")
    ap.add_argument("--our-sigma-ang", type=float, default=None,
                    help="also run our refine_classes modes with this --sigma-ang (degrees)")
    ap.add_argument("--our-sigma-shift", type=float, default=None,
                    help="also run our refine_classes modes with this --sigma-shift (pixels; the simulated "
                         f"origin error is {SHIFT_ERROR_PX} px)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="our modes to run (both = the protocol's default, both with consensus)")
    ap.add_argument("--maxcut-only", action="store_true")
    ap.add_argument("--no-maxcut", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "output" / "split_volume"))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.maxcut_only:
        if shutil.which("relion_refine") is None and (args.relion_seeds or args.relion_local_seeds):
            print("relion_refine not found: apt-get install relion", file=sys.stderr)
            return 1
        results["classification"] = classification_table(args)
        if args.relion_only:
            return 0
    if not args.no_maxcut:
        results["maxcut"] = maxcut_table()
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if "classification" in results:
        print_classification(results["classification"])
    if "maxcut" in results:
        print("\nmax-cut on planted graphs (±1 weights + Gaussian noise σ = 1, ~10 neighbours per node):")
        print(f"{'D':>6} {'method':<24} {'time s':>8} {'recovered':>9} {'objective':>10} {'deterministic':>13}")
        for r in results["maxcut"]:
            print(f"{r['D']:>6} {r['method']:<24} {r['time_s']:>8.2f} {r['recovered']:>9.3f} "
                  f"{r['objective']:>10.1f} {str(r['deterministic']):>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
