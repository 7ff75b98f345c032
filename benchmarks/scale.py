"""Benchmark: peak memory and time of the programs against the number of particles.

For each size N (``--sizes``): simulate a two-state set with ``gsplat_simulate``
(lysozyme 1AKI with its β-domain hinged by 40°, ``--box`` px at 1.5 Å, SNR
0.1), run each program of ``--programs`` as a subprocess under each memory
setting of ``--budgets``, and record the peak resident memory (RSS of the
process and its children, polled every 0.1 s with psutil), the wall time and
the particles per second per core; then delete the set. Writes
``results.json`` and ``results.txt`` (a table) in ``--out``.

Programs are entries of :data:`PROGRAMS` (name → argument builder):
``refine_classes``, ``gmm_heterogeneity`` and ``reconstruct_splat`` (short
settings each; see their builders). The store column says where the particle
data went: RAM, disk (a scratch file) or stacks (read from the image stacks per
batch).

``gsplat_simulate`` itself and ``gsplat_reconstruct_fourier`` (which streams
and has no budget) are measured too.

Targets (issue 15): peak RSS under 4 GB at 200,000 × 64 px and at 20,000 ×
256 px, independent of N.

Usage::

    python benchmarks/scale.py --quick                       # 2,000 and 4,000 particles, minutes
    python benchmarks/scale.py --sizes 20000,50000 --budgets 1T,64M
    python benchmarks/scale.py --sizes 50000,100000,200000 --threads 2
    python benchmarks/scale.py --sizes 20000 --box 256 --budgets 2G --append

``--budgets``: values of ``--max-memory``; a large one (1T) keeps everything
in RAM as before the disk store existed, a small one (64M) forces the store.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PDB = REPO / "tests" / "data" / "1aki.pdb"


def _refine_classes(sim: Path, out: Path, budget: str, extra: list) -> list:
    """The pooled detector (no starting split needed) with fixed poses and a
    short EM refinement: every pass of the program over the particles
    (eigenvolume iterations, half-set eigenvolumes, refinement iterations)."""
    return [BIN / "gsplat_refine_classes", "-i", sim / "particles.star", "-o", out, "--init", "pooled",
            "--refine-pooled", "--iterations", "3", "--eigen-iterations", "5", "--sigma-ang", "0",
            "--max-memory", budget] + extra


def _gmm_heterogeneity(sim: Path, out: Path, budget: str, extra: list) -> list:
    """Short settings: 1 consensus epoch, 1 round (1-epoch refit), 2 motions,
    400 Gaussians, 2,000 particles in the gradient PCA; every stage still
    passes over all particles (consensus, refit, coordinates twice). Images
    Fourier-cropped to the 2.4 Å working pixel (40 px for 64 px at 1.5 Å)."""
    return [BIN / "gsplat_gmm_heterogeneity", "-i", sim / "particles.star", "-o", out, "--n-gaussians", "400",
            "--consensus-epochs", "1", "--rounds", "1", "--refit-epochs", "1", "--motions", "2",
            "--pca-particles", "2000", "--frames", "2", "--final-epochs", "0", "--max-memory", budget] + extra


def _reconstruct_splat(sim: Path, out: Path, budget: str, extra: list) -> list:
    """One epoch per half set, 1,000 Gaussians, poses as given (no local
    searches): the full-size images in RAM under the budget, else read from
    the stacks at every step."""
    return [BIN / "gsplat_reconstruct_splat", "-i", sim / "particles.star", "-o", out, "--halves",
            "--iterations", "1", "--n-gaussians", "1000", "--sigma-ang", "0", "--sigma-shift", "0",
            "--max-memory", budget] + extra


def _reconstruct_fourier(sim: Path, out: Path, budget: str, extra: list) -> list:
    """Half maps and the full map; it streams the particles (no budget needed)."""
    return [BIN / "gsplat_reconstruct_fourier", "-i", sim / "particles.star", "-o", out / "map.mrc",
            "--halves"] + extra


#: name → argument builder ``(sim, out, budget, extra) → command``
PROGRAMS = {"refine_classes": _refine_classes, "gmm_heterogeneity": _gmm_heterogeneity,
            "reconstruct_splat": _reconstruct_splat, "reconstruct_fourier": _reconstruct_fourier}
#: programs without a memory budget (run once per size)
NO_BUDGET = {"reconstruct_fourier"}


def simulate(n: int, box: int, out: Path, threads: int, log: Path) -> dict:
    """Simulate the set; wall time and peak RSS of ``gsplat_simulate``."""
    return measure([BIN / "gsplat_simulate", "-i", PDB, "-o", out, "-n", n, "--box", box, "--angpix", 1.5,
                    "--snr", 0.1, "--hinge", "A/40-88", "--hinge-angle", 40, "--seed", 1, "--device", "cpu",
                    "--threads", threads], log)


def measure(cmd: list, log: Path, interval: float = 0.1, allow_failure: bool = False,
            also: Optional[str] = None) -> dict:
    """Run ``cmd``; its wall time, peak RSS (bytes, the process and its children)
    and exit status (a failure raises unless ``allow_failure``).

    ``also``: a string (e.g. the run's output folder) in the command lines of
    processes that are not children of ``cmd`` but belong to the run, added to
    the RSS: under ``srun`` the ranks are started by ``slurmd``, not by ``srun``."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT)
        ps, peak, found, scanned = psutil.Process(proc.pid), 0, {}, 0.0
        while proc.poll() is None:
            if also and time.perf_counter() - scanned > 1.0:  # a scan of every process: once a second
                found = {p.pid: p for p in psutil.process_iter(["cmdline"])
                         if any(also in str(a) for a in (p.info["cmdline"] or []))}
                scanned = time.perf_counter()
            try:
                children = {c.pid: c for c in ps.children(recursive=True)}
            except psutil.Error:  # the run ended meanwhile
                children = {}
            rss = 0
            for p in {ps.pid: ps, **found, **children}.values():
                try:
                    rss += p.memory_info().rss
                except psutil.Error:  # the process ended meanwhile
                    pass
            peak = max(peak, rss)
            time.sleep(interval)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 and not allow_failure:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {log}")
    return {"wall_s": wall, "peak_rss_bytes": peak, "returncode": proc.returncode}


def table(rows: list) -> str:
    head = f"{'program':16s} {'N':>8s} {'box':>4s} {'--max-memory':>12s} {'store':>6s} {'peak RSS':>10s} " \
           f"{'wall':>8s} {'part/s/core':>11s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        failed = f"  FAILED (exit {r['returncode']})" if r.get("returncode") else ""
        lines.append(f"{r['program']:16s} {r['n']:8d} {r['box']:4d} {r['budget']:>12s} {r['store']:>6s} "
                     f"{r['peak_rss_bytes'] / 2 ** 30:8.2f} GB {r['wall_s']:7.0f}s {r['particles_per_s_core']:11.1f}"
                     f"{failed}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="50000,100000,200000", help="numbers of particles, comma-separated")
    p.add_argument("--box", type=int, default=64, help="image box (px, 1.5 Å pixels)")
    p.add_argument("--budgets", default="1T,256M", help="--max-memory values, comma-separated")
    p.add_argument("--programs", default=",".join(PROGRAMS), help="programs, comma-separated")
    p.add_argument("--threads", type=int, default=2, help="--threads of every program (cores used)")
    p.add_argument("--quick", action="store_true", help="2,000 and 4,000 particles (a check of the script)")
    p.add_argument("--work", default=None, help="folder for the simulated sets (default: a temporary folder)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "output" / "scale"))
    p.add_argument("--note", default="", help="a line about the machine (load, shared cores) for the table")
    p.add_argument("--sets", default=None,
                   help="keep the simulated sets in this folder and reuse them on a later run (default: "
                        "simulate into --work and delete each set after its rows)")
    p.add_argument("--append", action="store_true", help="add the rows to those of an earlier results.json in --out")
    args = p.parse_args(argv)
    sizes = [2000, 4000] if args.quick else [int(s) for s in args.sizes.split(",")]
    budgets = args.budgets.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gsplat_scale_", dir=args.work))
    rows, notes = [], []
    if args.append and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        rows = old["rows"]
        notes = old["meta"].get("earlier", []) + [old["meta"]["machine"] + ". " + old["meta"]["note"]]
    try:
        for n in sizes:
            sim = (Path(args.sets) if args.sets else work) / f"sim_{n}_{args.box}"
            if args.sets and (sim / "particles.star").exists():
                t_sim = float("nan")
                print(f"reusing the set {sim}", flush=True)
            else:
                r = simulate(n, args.box, sim, args.threads, out / f"simulate_{n}_{args.box}.log")
                t_sim = r["wall_s"]
                r.update(program="simulate", n=n, box=args.box, budget="-", threads=args.threads, store="stack",
                         particles_per_s_core=n / r["wall_s"] / args.threads, simulate_s=t_sim)
                rows.append(r)
                print(table([r]).splitlines()[-1], flush=True)
                _write(out, rows, notes, args.note)
            for name in args.programs.split(","):
                for budget in (["-"] if name in NO_BUDGET else budgets):
                    res_dir = work / f"{name}_{n}_{budget}"
                    log = out / f"{name}_{n}_{args.box}_{budget}.log"
                    cmd = PROGRAMS[name](sim, res_dir, budget, ["--threads", str(args.threads)])
                    if name in NO_BUDGET:
                        res_dir.mkdir(parents=True, exist_ok=True)
                    r = measure(cmd, log, allow_failure=True)  # a failure is a row; the other programs still run
                    text = log.read_text()
                    r.update(program=name, n=n, box=args.box, budget=budget, threads=args.threads,
                             store=("stream" if name in NO_BUDGET else "disk" if "in the scratch folder" in text
                                    else "stacks" if "read from the stacks" in text else "RAM"),
                             particles_per_s_core=n / r["wall_s"] / args.threads, simulate_s=t_sim)
                    rows.append(r)
                    print(table([r]).splitlines()[-1], flush=True)
                    _write(out, rows, notes, args.note)  # after every row: a long run that stops keeps its rows
                    shutil.rmtree(res_dir, ignore_errors=True)
            if not args.sets:
                shutil.rmtree(sim, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_write(out, rows, notes, args.note))


def _write(out: Path, rows: list, notes: list, note: str) -> str:
    """``results.json`` and ``results.txt`` in ``out``; returns the text."""
    meta = {"machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2 ** 30:.0f} GB RAM, "
                       f"load average {os.getloadavg()[0]:.1f} at the end", "note": note, "earlier": notes}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = table(rows) + "\n\n" + "\n".join(notes + [f"{meta['machine']}. {meta['note']}"]) + "\n"
    (out / "results.txt").write_text(text)
    return text


if __name__ == "__main__":
    main()
