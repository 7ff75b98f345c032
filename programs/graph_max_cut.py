"""gsplat_graph_max_cut: synchronise per-direction classifications on the direction graph.

Example::

    gsplat_graph_max_cut -i classify/ --particles particles.star -o graph/ --method auto

Builds the direction graph from the pairs of a gsplat_aligned_2d_classification
folder (edge weight = Σ over shared particles of the product of their per-direction
values), finds the sign of every direction (``exact``, ``sdp``, ``spectral`` or
``auto``), solving each connected component on its own and saying so, and
writes ``particles.star``: the input particles (same rows, same order) with
``rlnClassNumber``, ``rlnGsplatScore``, ``rlnGsplatClassProbability``,
``rlnMaxValueProbDistribution`` and ``rlnGsplatComponent``; plus
``directions_signs.star`` and ``graph.npz`` (the sparse weight matrix).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scipion_gsplat.core import io
from scipion_gsplat.core.io import InputError, atomic_path
from scipion_gsplat.core.split_volume import files, maxcut, partition
from scipion_gsplat.core.safety import ProgramFiles

from ._cli import add_particle_args, console_entry, read_star, setup_runtime

DESCRIPTION = "Direction-graph sign synchronisation (max-cut) and per-particle classes (split-volume step 2)."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="gsplat_aligned_2d_classification output folder")
    parser.add_argument("--particles", required=True, help="the particles STAR file that was classified")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--method", choices=maxcut.METHODS, default="auto",
                        help="max-cut solver: exact (<= 20 directions), sdp (cvxpy), spectral, auto")
    parser.add_argument("--weights", choices=("coordinate", "llr"), default="coordinate",
                        help="edge weights and particle scores from standardised PCA coordinates with "
                             "direction reliabilities (default) or from GMM log-likelihood ratios (thesis)")
    add_particle_args(parser)


def program_files(args) -> ProgramFiles:
    """The particles and the classification tables read; graph, signs and particles written."""
    return ProgramFiles(particles=[args.particles],
                        inputs=[os.path.join(args.input, n) for n in (files.DIRECTIONS, files.PAIRS)],
                        outputs=[os.path.join(args.output, n)
                                 for n in ("graph.npz", "directions_signs.star", "particles.star")])


def main(args) -> None:
    setup_runtime(args)
    t0 = time.time()
    dirs, pairs = files.read_classification(args.input)
    star = read_star(args.particles, args)
    n, d = len(star), len(dirs)
    pp = pairs["rlnGsplatParticle"].to_numpy(int)
    pd_ = pairs["rlnGsplatDirection"].to_numpy(int)
    if len(pp) == 0:
        raise InputError(f"{args.input}: no (particle, direction) pairs")
    if pp.max() >= n or pd_.max() >= d:
        raise InputError(f"{args.input} does not match {args.particles} ({n} particles, {d} directions)")
    if args.weights == "llr":
        values = pairs["rlnGsplatLogLikelihoodRatio"].to_numpy(float)
    else:
        # skipped directions (too few particles) have all-zero coordinates -> z = 0
        values = partition.standardise(pairs["rlnGsplatCoordinate"].to_numpy(float), pd_, d)
    w = maxcut.direction_graph(pp, pd_, values, d, n)
    result = maxcut.synchronise(w, args.method, args.seed)
    if result.n_components > 1:
        sizes = np.bincount(result.component)
        print(f"gsplat_graph_max_cut: WARNING: the direction graph has {result.n_components} connected "
              f"components (sizes {sizes.tolist()}); their relative signs cannot be determined, "
              f"particles outside component 0 are flagged in rlnGsplatComponent", flush=True)
    if args.weights == "llr":
        part = partition.partition_llr(pp, pd_, values, result.signs, result.component, n)
        reliability = np.ones(d)
    else:
        reliability = partition.direction_reliability(w, pp, pd_, result.signs, n)
        part = partition.partition_coordinates(pp, pd_, values, result.signs, reliability,
                                               result.component, n, args.seed)
    os.makedirs(args.output, exist_ok=True)
    with atomic_path(os.path.join(args.output, "graph.npz")) as tmp:
        with open(tmp, "wb") as fh:
            sp.save_npz(fh, w.tocsr())
    io.write_star(os.path.join(args.output, "directions_signs.star"), {"directions": pd.DataFrame({
        "rlnGsplatDirection": np.arange(d), "rlnGsplatSign": result.signs.astype(int),
        "rlnGsplatComponent": result.component, "rlnGsplatReliability": reliability})})
    files.write_classified_particles(os.path.join(args.output, "particles.star"), star, part.classes,
                                     part.score, part.probability,
                                     {"rlnGsplatComponent": part.component})
    c1, c2 = part.class_sizes()
    print(f"gsplat_graph_max_cut: {d} directions, {w.nnz // 2} edges, method "
          f"{'/'.join(sorted(set(result.methods)))}, objective {result.objective:.4g}; "
          f"classes {c1} / {c2}; {time.time() - t0:.1f} s", flush=True)


run = console_entry("gsplat_graph_max_cut", DESCRIPTION, add_args, main, files=program_files)

if __name__ == "__main__":
    run()
