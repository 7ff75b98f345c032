"""Benchmark: throughput of the Gaussian-splat renderer (images per second).

Isotropic models of 1k, 8k and 32k Gaussians (centres uniform in a ball filling
70 % of the box, widths 1–2 pixels, as a protein), rendered at random poses with
origins and a CTF, at 64 px (1.5 Å) and 128 px (0.75 Å), for several batch sizes,
forward only and forward + backward (an L2 loss), with the memory bound the
fitting uses (micro-batches of ≤ 2²² profile values). The reference in the same
run is our voxel-map Fourier projector (:func:`core.fourier.project`, forward,
same poses/CTF) at the same box: the ratio column is splat forward / Fourier
projector. An anisotropic row (8k Gaussians) shows the tile renderer.

GPU: the code runs with ``--device cuda``; no GPU figure is reported by this
task (no GPU machine was available to it).

Usage: python benchmarks/splat_render_throughput.py [--threads 2] [--device cpu] [--seconds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scipion_gsplat.core import fourier, geometry
from scipion_gsplat.core.splat.model import GaussianModel
from scipion_gsplat.core.splat.render import throughput

REPO = Path(__file__).resolve().parent.parent
CASES = [(64, 1.5), (128, 0.75)]
COUNTS = [1000, 8000, 32000]
BATCHES = [8, 32, 128]


def protein_like(n: int, box: int, pix: float, rng, aniso: bool = False) -> GaussianModel:
    radius = 0.35 * box * pix
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    centres = d * radius * rng.uniform(0, 1, (n, 1)) ** (1 / 3)
    sig = rng.uniform(1.0, 2.0, n) * pix
    model = GaussianModel(centres, rng.uniform(0.5, 1.5, n), sig)
    if aniso:
        low = np.tril(rng.normal(0, 0.3 * pix, (n, 3, 3)), -1) + np.eye(3) * sig[:, None, None]
        model = GaussianModel(centres, model.amplitudes, cholesky_A=low)
    return model


def fourier_throughput(box: int, pix: float, batch: int, device: str, min_seconds: float, rng) -> float:
    vol = protein_like(2000, box, pix, rng).to_map(box, pix)
    poses = geometry.random_rotations(batch, rng)
    shifts = rng.normal(0, 2.0, (batch, 2))
    ctf = {"defocus_u_A": rng.uniform(1e4, 2.5e4, batch), "voltage_kV": np.full(batch, 300.0),
           "cs_mm": np.full(batch, 2.7), "amplitude_contrast": np.full(batch, 0.1)}
    ctf["defocus_v_A"] = ctf["defocus_u_A"]
    fourier.project(vol, poses, pix, shifts, ctf, device=device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fourier.project(vol, poses, pix, shifts, ctf, device=device)
        done += batch
    return done / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timing per measurement")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "output" / "splat_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    print(f"Gaussian-splat renderer throughput (images/s), device {args.device}, {args.threads} threads, "
          f"{os.cpu_count()} cores; origins + CTF applied; ratio = splat forward / Fourier projector")
    head = f"{'box':>4} {'Gaussians':>9} {'batch':>6} {'forward':>9} {'fwd+bwd':>9} {'Fourier proj.':>13} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for box, pix in CASES:
        ref = {b: fourier_throughput(box, pix, b, args.device, args.seconds, rng) for b in BATCHES}
        for n in COUNTS:
            model = protein_like(n, box, pix, rng)
            for b in BATCHES:
                fwd = throughput(model, box, pix, b, args.device, False, args.seconds)
                bwd = throughput(model, box, pix, b, args.device, True, args.seconds)
                rows.append({"box": box, "n": n, "batch": b, "forward": fwd, "forward_backward": bwd,
                             "fourier": ref[b], "anisotropic": False})
                print(f"{box:>4} {n:>9} {b:>6} {fwd:>9.1f} {bwd:>9.1f} {ref[b]:>13.1f} {fwd / ref[b]:>6.2f}",
                      flush=True)
        model = protein_like(8000, box, pix, rng, aniso=True)
        fwd = throughput(model, box, pix, 32, args.device, False, args.seconds)
        bwd = throughput(model, box, pix, 32, args.device, True, args.seconds)
        rows.append({"box": box, "n": 8000, "batch": 32, "forward": fwd, "forward_backward": bwd,
                     "fourier": ref[32], "anisotropic": True})
        print(f"{box:>4} {'8000 ani':>9} {32:>6} {fwd:>9.1f} {bwd:>9.1f} {ref[32]:>13.1f} {fwd / ref[32]:>6.2f}",
              flush=True)
    print("GPU (H100): not measured — no GPU was available to this task; run with --device cuda.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
