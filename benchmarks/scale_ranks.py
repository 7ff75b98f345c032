"""Benchmark: the programs at 1 and 2 ranks, and Fourier reconstruction against relion_reconstruct.

Part of the scale benchmark (issue 15; memory against N is ``scale.py``).

1. Ranks: a simulated set (``--n`` particles at ``--box`` px) is processed by
   ``gsplat_reconstruct_fourier``, ``gsplat_reconstruct_splat``,
   ``gsplat_gmm_heterogeneity`` and ``gsplat_refine_classes`` (the pooled split
   refined, default pose search), and ``gsplat_reconstruct_splat`` after its
   default local searches (``reconstruct_splat_aligned``), once as one process and once as two ranks
   (``torchrun --nproc-per-node 2``, or ``srun -N2 -n2`` with ``--srun`` on a
   Slurm queue: two nodes, whose per-step sums go over TCP; ``--srun-nodes 1``:
   ``srun -N1 -n2``, one node), each rank with ``--threads 1``: wall time,
   speedup, peak RSS (all processes of the run together; under srun the ranks,
   children of ``slurmd``, are found by their output folder) and particles per
   second per core. The outputs of
   the two runs are compared (largest difference of the maps relative to the
   largest voxel; for the class refinement also the particles classified
   differently and the largest probability difference).
   With ``--ceiling`` the same one-process run is also started twice at once
   (two independent copies, one core each): ``ceiling = 2 × alone / together``
   is the speedup two ranks could reach on this machine if the work split
   perfectly and cost no communication (two busy cores share the memory bus
   and the last-level cache, so each copy runs slower than alone); the
   efficiency is the measured speedup over that ceiling.
   With ``--repeats R`` each program runs R times at 1 rank and R times at 2
   ranks, alternating (1, 2, 1, 2, …), and the table gives the median times and
   their ratio, with every pair's speedup listed below it: on a shared virtual
   machine the same run varied by ±15 % within minutes (measured: one rank of
   the heterogeneity run took 132–159 s, two ranks 85–97 s), so one pair of
   runs can miss or make a target by chance.
2. Throughput at a large box: ``--n-large`` particles at ``--box-large`` px
   (default 2,000 at 256 px) reconstructed by ``gsplat_reconstruct_fourier
   --threads 1`` and by ``relion_reconstruct --ctf`` (one thread, RELION 3.1 has
   no threads option in relion_reconstruct): particles per second each.

Before any timing, ``--probe-memory`` GB are touched in a child process and the
cost per page is reported. On this kind of virtual machine the first touch of a
guest page costs a hypervisor fault (measured: 8-9 µs per 4 kB page, against
~0.3 µs when the same memory is touched again at once), and memory freed by a
process goes back to the host within seconds (touched again 2-20 s later: 2-7 µs
per page), so warming up before a run does not help: every run pays ~2.2 s per
GB it first touches (3.3 GB grids: ~7 s), each rank on its own memory, and
two processes touching fresh memory at once paid 3-6.6 µs per page each.

Writes ``ranks.json`` and ``ranks.txt`` in ``--out`` (default
``benchmarks/output/scale``); the simulated sets are deleted afterwards.

Usage::

    python benchmarks/scale_ranks.py --quick          # 2,000 particles, 64 px; 500 at 128 px
    python benchmarks/scale_ranks.py --n 20000 --box 64 --n-large 2000 --box-large 256
    python benchmarks/scale_ranks.py --star set/particles.star --programs gmm_heterogeneity \
        --srun --srun-nodes 1 --repeats 3 --ceiling --n-large 0
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import BIN, PDB, measure  # noqa: E402  (the same RSS/time measurement)

from scipion_gsplat.core import io  # noqa: E402

PROGRAMS = {
    "reconstruct_fourier": lambda star, out: [BIN / "gsplat_reconstruct_fourier", "-i", star, "-o", out / "map.mrc",
                                              "--halves"],
    "reconstruct_splat": lambda star, out: [BIN / "gsplat_reconstruct_splat", "-i", star, "-o", out, "--halves",
                                            "--n-gaussians", "2000", "--iterations", "2", "--align-rounds", "0"],
    # the same fit after its default pre-alignment (2 gold-standard rounds of local searches, split by particle)
    "reconstruct_splat_aligned": lambda star, out: [BIN / "gsplat_reconstruct_splat", "-i", star, "-o", out,
                                                    "--halves", "--n-gaussians", "2000", "--iterations", "2"],
    "gmm_heterogeneity": lambda star, out: [BIN / "gsplat_gmm_heterogeneity", "-i", star, "-o", out,
                                            "--n-gaussians", "1000", "--consensus-epochs", "1", "--motions", "2",
                                            "--rounds", "1", "--frames", "3", "--classes", "2"],
    # the pooled split (consensus pose search, eigenvolumes) refined with two free class maps
    "refine_classes": lambda star, out: [BIN / "gsplat_refine_classes", "-i", star, "-o", out, "--init", "pooled",
                                         "--refine-pooled", "--iterations", "3"],
}
#: the map each program writes (compared between 1 and 2 ranks)
MAPS = {"reconstruct_fourier": "map.mrc", "reconstruct_splat": "map.mrc", "reconstruct_splat_aligned": "map.mrc",
        "gmm_heterogeneity": "consensus.mrc",
        "refine_classes": "class1.mrc"}


_TOUCH = """
import sys, time
import numpy as np
gb = float(sys.argv[1])
t0 = time.perf_counter()
blocks = [np.ones(1 << 24, dtype=np.float64) for _ in range(int(gb * 8))]  # 128 MB each, touched
print(time.perf_counter() - t0)
"""


def probe_memory(gb: float) -> dict:
    """Touch ``gb`` GB once (a child process holding it all, then exiting), capped at
    70 % of MemAvailable; returns the GB touched, the seconds and µs per 4 kB page."""
    try:
        avail = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        gb = min(gb, 0.7 * avail / 2 ** 20)
    except (OSError, StopIteration):
        pass
    gb = int(gb * 8) / 8
    if gb <= 0:
        return {}
    res = subprocess.run([sys.executable, "-c", _TOUCH, str(gb)], check=True, capture_output=True, text=True)
    secs = float(res.stdout.split()[-1])
    return {"gb": gb, "seconds": secs, "us_per_page": 1e6 * secs / (gb * 2 ** 30 / 4096)}


def simulate(n: int, box: int, out: Path, angpix: float, hinge: bool) -> None:
    cmd = [BIN / "gsplat_simulate", "-i", PDB, "-o", out, "-n", n, "--box", box, "--angpix", angpix,
           "--snr", 0.1, "--seed", 1, "--device", "cpu", "--threads", 2]
    if hinge:
        cmd += ["--hinge", "A/40-88", "--hinge-angle", 40, "--n-states", 10]
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def launcher(ranks: int, srun: bool, srun_nodes: int = 2) -> list:
    if ranks == 1:
        return []
    if srun:
        return ["srun", "-N", str(min(srun_nodes, ranks)), "-n", str(ranks)]
    return [BIN / "torchrun", "--nproc-per-node", str(ranks), "--master-port", str(29000 + os.getpid() % 900)]


def two_at_once(cmd_a: list, cmd_b: list, logs: tuple) -> float:
    """Start two one-process runs together; the wall time (s) until both are done."""
    t0 = time.perf_counter()
    procs = []
    for cmd, log in zip((cmd_a, cmd_b), logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs):
        if proc.wait() != 0:
            raise RuntimeError(f"{cmd_a[0]} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def ranks_table(star: Path, n: int, work: Path, srun: bool, programs: list, ceiling: bool = False,
                srun_nodes: int = 2, repeats: int = 1) -> list:
    rows = []
    for name in programs:
        runs = {1: [], 2: []}
        # 1 and 2 ranks alternate, so that a slow spell of a shared machine falls on both alike;
        # every run writes a fresh folder (a rerun in the same one would resume from its checkpoints)
        for rep in range(repeats):
            for ranks in (1, 2):
                out = work / f"{name}_{ranks}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = (launcher(ranks, srun, srun_nodes) + PROGRAMS[name](star, out)
                       + ["--threads", "1", "--device", "cpu"])
                res = measure(cmd, work / f"{name}_{ranks}.log", also=str(out) if srun else None)
                runs[ranks].append(res)
                print(f"  {name}, {ranks} rank(s){f', run {rep + 1}/{repeats}' if repeats > 1 else ''}: "
                      f"{res['wall_s']:.1f} s, peak RSS {res['peak_rss_bytes'] / 2 ** 30:.2f} GB", flush=True)
        walls = {r: [x["wall_s"] for x in runs[r]] for r in (1, 2)}
        wall = {r: float(np.median(walls[r])) for r in (1, 2)}
        rss = {r: max(x["peak_rss_bytes"] for x in runs[r]) / 2 ** 30 for r in (1, 2)}
        a = io.read_map(str(work / f"{name}_1" / MAPS[name]))[0]
        b = io.read_map(str(work / f"{name}_2" / MAPS[name]))[0]
        rows.append({"program": name, "n": n, "wall_1": wall[1], "wall_2": wall[2],
                     "speedup": wall[1] / wall[2], "walls_1": walls[1], "walls_2": walls[2],
                     "speedups": [w1 / w2 for w1, w2 in zip(walls[1], walls[2])],
                     "rss_1_gb": rss[1], "rss_2_gb": rss[2],
                     "per_s_per_core_1": n / wall[1], "per_s_per_core_2": n / wall[2] / 2,
                     "map_difference": float(np.abs(a - b).max() / np.abs(a).max())})
        rows[-1].update(_class_differences(work / f"{name}_1", work / f"{name}_2"))
        if ceiling:
            cmds = [PROGRAMS[name](star, work / f"{name}_copy{c}") + ["--threads", "1", "--device", "cpu"]
                    for c in (1, 2)]
            together = two_at_once(*cmds, logs=(work / f"{name}_copy1.log", work / f"{name}_copy2.log"))
            rows[-1].update(wall_two_copies=together, ceiling=2 * wall[1] / together)
            rows[-1]["efficiency"] = rows[-1]["speedup"] / rows[-1]["ceiling"]
            print(f"  {name}, two independent copies at once: {together:.1f} s: ceiling "
                  f"{rows[-1]['ceiling']:.2f}x, efficiency {rows[-1]['efficiency']:.2f}", flush=True)
    return rows


def _class_differences(one: Path, two: Path) -> dict:
    """Particles classified differently and the largest probability difference
    between the runs' particles.star (empty without class columns)."""
    if not (one / "particles.star").exists():
        return {}
    p1, p2 = (io.read_particles(str(d / "particles.star")).particles for d in (one, two))
    if "rlnClassNumber" not in p1 or "rlnGsplatClassProbability" not in p1:
        return {}
    return {"classes_differ": int((p1["rlnClassNumber"].to_numpy() != p2["rlnClassNumber"].to_numpy()).sum()),
            "probability_difference": float(np.abs(p1["rlnGsplatClassProbability"].to_numpy(float)
                                                   - p2["rlnGsplatClassProbability"].to_numpy(float)).max())}


def throughput(star: Path, n: int, box: int, work: Path) -> dict:
    ours = measure([BIN / "gsplat_reconstruct_fourier", "-i", star, "-o", work / "ours.mrc", "--threads", "1",
                    "--device", "cpu"], work / "ours.log")
    relion = shutil.which("relion_reconstruct")
    out = {"n": n, "box": box, "ours_s": ours["wall_s"], "ours_per_s": n / ours["wall_s"]}
    if relion:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        with open(work / "relion.log", "w") as fh:
            subprocess.run([relion, "--i", star.name, "--o", str(work / "relion.mrc"), "--ctf"], check=True,
                           stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=star.parent)
        wall = time.perf_counter() - t0
        out.update(relion_s=wall, relion_per_s=n / wall, ratio=(n / ours["wall_s"]) / (n / wall))
    return out


def write(out_dir: Path, rows: list, thr: dict, note: str, touch: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ranks.json").write_text(json.dumps({"ranks": rows, "throughput": thr, "note": note,
                                                    "first_touch": touch}, indent=1))
    lines = [f"{'program':26s} {'N':>7s} {'1 rank':>8s} {'2 ranks':>8s} {'speedup':>8s} {'RSS 1':>7s} "
             f"{'RSS 2':>7s} {'p/s/core 1':>10s} {'p/s/core 2':>10s} {'map diff':>9s}"]
    for r in rows:
        lines.append(f"{r['program']:26s} {r['n']:7d} {r['wall_1']:7.1f}s {r['wall_2']:7.1f}s {r['speedup']:8.2f} "
                     f"{r['rss_1_gb']:6.2f}G {r['rss_2_gb']:6.2f}G {r['per_s_per_core_1']:10.1f} "
                     f"{r['per_s_per_core_2']:10.1f} {r['map_difference']:9.1e}")
    if thr:
        lines.append("")
        lines.append(f"Fourier reconstruction, {thr['n']} particles at {thr['box']} px, one thread each: ours "
                     f"{thr['ours_per_s']:.1f} particles/s ({thr['ours_s']:.1f} s)" +
                     (f", relion_reconstruct {thr['relion_per_s']:.1f} particles/s ({thr['relion_s']:.1f} s), "
                      f"ratio {thr['ratio']:.2f}" if "relion_s" in thr else ", relion_reconstruct not found"))
    for r in rows:
        if "classes_differ" in r:
            lines.append(f"{r['program']}: {r['classes_differ']} particles classified differently, largest "
                         f"probability difference {r['probability_difference']:.1e}")
    for r in rows:
        if len(r["speedups"]) > 1:
            lines.append(f"{r['program']}: {len(r['speedups'])} alternating runs, medians above; 1 rank "
                         + ", ".join(f"{w:.1f}" for w in r["walls_1"]) + " s; 2 ranks "
                         + ", ".join(f"{w:.1f}" for w in r["walls_2"]) + " s; speedups "
                         + ", ".join(f"{x:.2f}" for x in r["speedups"]))
    for r in rows:
        if "ceiling" in r:
            lines.append(f"{r['program']}: two independent one-process copies at once {r['wall_two_copies']:.1f} s "
                         f"(alone {r['wall_1']:.1f} s): this machine's ceiling for 2 ranks {r['ceiling']:.2f}x; "
                         f"measured {r['speedup']:.2f}x = {100 * r['efficiency']:.0f} % of it")
    if touch:
        lines.append(f"first touch of memory on this machine: {touch['gb']:.1f} GB in {touch['seconds']:.1f} s "
                     f"({touch['us_per_page']:.2f} µs per 4 kB page; ~0.3 without a hypervisor fault)")
    lines.append(note)
    (out_dir / "ranks.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="particles of the ranks set")
    p.add_argument("--box", type=int, default=64, help="box of the ranks set (px)")
    p.add_argument("--n-large", type=int, default=2000, help="particles of the throughput set")
    p.add_argument("--box-large", type=int, default=256, help="box of the throughput set (px)")
    p.add_argument("--programs", default=",".join(PROGRAMS), help="programs of the ranks table")
    p.add_argument("--star", default=None,
                   help="an existing simulated particles.star (hinge set) for the ranks table instead of "
                        "simulating --n × --box (kept afterwards): time one program at a time on one set")
    p.add_argument("--ceiling", action="store_true",
                   help="also run two independent one-process copies at once: the machine's 2-rank ceiling")
    p.add_argument("--srun", action="store_true", help="two ranks through srun (a Slurm queue) instead of torchrun")
    p.add_argument("--srun-nodes", type=int, default=2, choices=(1, 2),
                   help="with --srun: the two ranks on two nodes (srun -N2; sums over TCP) or on one (srun -N1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each program at 1 and at 2 ranks, alternating; the table gives the median "
                        "times (their speedup) and every run's speedup: on a shared machine one pair of runs "
                        "can be ±15 %% off")
    p.add_argument("--probe-memory", type=float, default=1.0,
                   help="GB touched once to report the machine's first-touch cost (0: none); see the docstring")
    p.add_argument("--quick", action="store_true", help="2,000 particles at 64 px; 500 at 128 px")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "output" / "scale"))
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.box, args.n_large, args.box_large = 2000, 64, 500, 128
    work = Path(tempfile.mkdtemp(prefix="gsplat_ranks_"))
    try:
        touch = probe_memory(args.probe_memory)
        if touch:
            print(f"first touch of {touch['gb']:.1f} GB: {touch['seconds']:.1f} s "
                  f"({touch['us_per_page']:.2f} µs/page)", flush=True)
        if args.star:
            star = Path(args.star).resolve()
            args.n = len(io.read_particles(str(star)))
        else:
            sim = work / "sim"
            simulate(args.n, args.box, sim, 1.5, hinge=True)
            star = sim / "particles.star"
        rows = ranks_table(star, args.n, work, args.srun, [p for p in args.programs.split(",") if p],
                          args.ceiling, args.srun_nodes, args.repeats)
        if not args.star:
            shutil.rmtree(sim)
        thr = {}
        if args.n_large > 0:
            large = work / "large"
            simulate(args.n_large, args.box_large, large, 1.5 * 64 / args.box_large, hinge=False)
            thr = throughput(large / "particles.star", args.n_large, args.box_large, work)
        load = os.getloadavg()[0]
        note = (f"{os.cpu_count()} cores; load average {load:.1f} at the end; each rank --threads 1; "
                f"2 ranks via {f'srun -N{args.srun_nodes} -n2' if args.srun else 'torchrun'}")
        write(Path(args.out), rows, thr, note, touch)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
