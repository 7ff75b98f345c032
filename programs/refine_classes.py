"""gsplat_refine_classes: pool the evidence in 3D — residual eigenvolume and two-class refinement.

Examples::

    gsplat_refine_classes -i graph/particles.star -o refine/            # refine the graph's split
    gsplat_refine_classes -i particles.star -o pooled/ --init pooled    # no starting split needed
    gsplat_refine_classes -i graph/particles.star -o both/ --init both  # pooled if supported, else refined

``--init column`` refines ``rlnClassNumber`` with two free class maps (EM,
fixed poses); ``--init pooled`` takes the leading eigenvolume of the residuals
against the consensus map (low-passed, masked, then cut to where it is strong)
and classifies each particle's coordinate on it with a two-class mixture that
knows each coordinate's noise (weak for views in which the difference projects
weakly) or, with poses refined (``--pooled-classes evidence``, the default), by
its likelihood under the two class maps summed over local poses; ``--init both`` does
both and keeps the pooled split when its half-set eigenvolumes agree
(``--support``), the refined column split otherwise (``--choose reproducible``:
the candidate whose class difference the two half sets, each classified
alone, reproduce better). The pooled split is not
refined unless ``--refine-pooled`` (then the likelier refinement is kept).
Writes ``particles.star`` (input rows + ``rlnClassNumber``, probabilities,
score), ``class1.mrc``/``class2.mrc`` (at the working box), ``eigenvolume.mrc``
(pooled), ``mask.mrc`` and ``summary.star`` (support figures and the
refinement history).

Memory (``--max-memory``, default 2G): the particles' working-box spectra and
CTFs (12 bytes per rfft pixel) stay in RAM while they fit, else they go to a
scratch file (``--scratch``, default a hidden folder in the output folder,
removed at the end) and every pass reads them in chunks: the peak memory then
no longer grows with the number of particles.

Several processes (``srun``, ``torchrun``, ``mpirun``; Scipion's MPI field):
each rank reads and keeps only its share of the particles (the memory budget
is per rank), sums over particles (maps, noise spectrum, class fractions) are
added over the ranks, local pose searches run on each rank's share, and rank 0
gathers the per-particle results and writes the files; the same result as one
process within float rounding.

Poses with errors (``--sigma-ang``, ``--sigma-shift``): every pose is first
refined locally against the consensus map, and everything after uses the
refined poses; ``particles.star`` then carries each particle's refined pose
(with ``--pose-iterations``, the pose for its assigned class, as RELION's
Class3D data.star) and ``rlnGsplatAngleChange`` (degrees).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd

from scipion_gsplat.core import distributed, io, masks
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.particle_spectra import load_spectra
from scipion_gsplat.core.spectra_store import SpectraWorkspace
from scipion_gsplat.core.poses.star import pose_columns
from scipion_gsplat.core.safety import ProgramFiles
from scipion_gsplat.core.split_volume import files, heldout, pooled, refine

from ._cli import (Progress, add_memory_args, add_particle_args, console_entry, memory_workspace, read_posed_particles,
                   scratch_parent, setup_runtime, working_box)

DESCRIPTION = "Two-class 3D refinement and a 3D-pooled (eigenvolume) detector, poses fixed or refined locally."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="particles STAR file with poses and CTF")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--init", choices=("auto", "column", "pooled", "both"), default="auto",
                        help="starting split: rlnClassNumber (column, refined), the residual eigenvolume "
                             "(pooled), both (the pooled split if its half sets agree, else the refined "
                             "column); auto = column if present, else pooled")
    parser.add_argument("--iterations", type=int, default=8,
                        help="refinement iterations of a column start (0: no refinement)")
    parser.add_argument("--refine-pooled", action="store_true",
                        help="also refine the pooled split with two free class maps (measured: lowers "
                             "accuracy on every benchmark set; the eigenvolume confines the difference "
                             "to a masked low-passed volume, free maps carry the noise of the whole box)")
    parser.add_argument("--choose", choices=("reproducible", "support", "heldout"), default="reproducible",
                        help="--init both, how to pick between the pooled and the refined split: "
                             "reproducible (default): the split whose 3D difference is the more reproducible "
                             "(each candidate made on each half set alone; the masked 8 Å correlation of the "
                             "two halves' class-difference maps compared; costs one more refinement). "
                             "Measured (4000 particles, exact poses): pooled kept on a 5 %% pair at SNR 0.02 "
                             "(ARI 0.35, where support kept the refined split, 0.00), at SNR 0.1 (0.92 against "
                             "0.81) and on an 85/15 pair (0.85 against -0.06); the refined split on a hinge "
                             "pair where both agree 0.976 (ARI 0.96 against 0.97). support: the pooled split "
                             "when its half-set eigenvolumes agree at least --support. heldout: the split "
                             "whose class maps, built from one half set, predict the other half's particles "
                             "better (measured: it kept the refined split on all four sets, also where it "
                             "was worse)")
    parser.add_argument("--support", type=float, default=0.5,
                        help="--choose support: half-set eigenvolume agreement needed to prefer the pooled split")
    poses = parser.add_argument_group("local pose refinement (poses from a consensus refinement carry errors)")
    poses.add_argument("--sigma-ang", type=float, default=2.0,
                       help="expected error of the input angles (degrees, prior σ per rotation axis): every "
                            "pose is first refined locally (within 3σ) against the consensus map, and the "
                            "eigenvolume and the class refinement use the refined poses, written to "
                            "particles.star. 0 = poses fixed. Typical 1-3 for poses from a consensus "
                            "refinement. Measured (4000 particles, 2° / 0.5 px errors): a ~5 %% difference "
                            "at SNR 0.1 went from ARI 0.04 to 0.88; with exact poses it costs ~0.02 ARI and ~75 s per 4000 "
                            "particles on a core. On by default: real poses always carry errors")
    poses.add_argument("--sigma-shift", type=float, default=1.0,
                       help="expected error of the input origins (pixels of the input images, prior σ per "
                            "axis) when --sigma-ang > 0; the starting value of its estimate with --shift-prior "
                            "estimate (default); typical 0.5-2")
    poses.add_argument("--pose-iterations", type=int, default=0,
                       help="with --sigma-ang > 0: refinement iterations in which each class map re-aligns "
                            "every particle (per-class poses, as RELION's Class3D with local searches). "
                            "Default 0: measured on the subtle pair it lowered ARI (0.77 → 0.66 with 2 "
                            "iterations) and costs ~150 s per iteration per 4000 particles")
    poses.add_argument("--without-shifts", action="store_true",
                       help="remove from every particle's residual the part an origin error explains (its span "
                            "of the consensus projection's x/y derivatives) before the residual eigenvolume "
                            "(--init pooled/both). For poses kept fixed (--sigma-ang 0): measured on 4000 "
                            "particles with 2° / 0.5 px errors, ARI -0.01 → 0.83 on a 5 %% pair at SNR 0.1 and "
                            "0.71 → 0.80 on an 85/15 pair at SNR 0.02, without a pose search; after the search "
                            "(--sigma-ang > 0) it adds nothing, and with exact poses it costs ~0.02 ARI")
    poses.add_argument("--pooled-classes", choices=("evidence", "mixture"), default="evidence",
                       help="--init pooled/both with --sigma-ang > 0: how the 3D-pooled split assigns particles. "
                            "evidence (default): each particle's likelihood under the two class maps "
                            "(consensus ± the eigenvolume), summed over a local pose search around its pose for "
                            "each map, with the class fractions as prior (two more local searches, each about as "
                            "long as the consensus pose refinement). mixture: a two-class mixture of the "
                            "particles' coordinates along the eigenvolume at the consensus poses (always used "
                            "with fixed poses). The poses are searched around the input poses, with the prior "
                            "of --sigma-ang / --sigma-shift. Measured on six 85/15 sets (4000 particles, SNR "
                            "0.02, 2° / 0.5 px errors, --shift-prior fixed): ARI 0.811 (mixture) → 0.824 "
                            "(evidence, --evidence-iterations 0) → 0.833 (one iteration) on average; 0.847 with "
                            "all the defaults (the origin prior estimated)")
    poses.add_argument("--evidence-iterations", type=int, default=1,
                       help="--pooled-classes evidence: rounds in which the class difference is reconstructed "
                            "from the particles' class probabilities (at --evidence-lowpass) and the evidence "
                            "is computed again; each costs a pass over the particles and two local searches. "
                            "0: the maps of the eigenvolume only. Measured on six 85/15 sets (--shift-prior "
                            "fixed): one round 0.824 → 0.833 ARI on average (lower on none), a second round the "
                            "same")
    poses.add_argument("--evidence-lowpass", type=float, default=6.0,
                       help="resolution (Å) of the class difference re-estimated by --evidence-iterations "
                            "(limited by the working box's Nyquist); typical 5-8")
    poses.add_argument("--shift-prior", choices=("estimate", "fixed"), default="estimate",
                       help="with --sigma-ang > 0: estimate (default): --sigma-shift is the starting value of the "
                            "origin prior, re-estimated from the particles (empirical Bayes: five local searches "
                            "of up to 1000 particles around their input poses after a first consensus "
                            "refinement; the estimate is in summary.star); fixed: --sigma-shift as given. "
                            "Measured with a simulated 0.5 px error: 1 → 0.50 px, 2 → 0.51 px")
    poses.add_argument("--consensus-rounds", type=int, default=1,
                       help="rounds of pose refinement against the consensus map before the eigenvolume "
                            "and the two-class refinement (with --sigma-ang > 0)")
    parser.add_argument("--hard", action="store_true", help="hard assignments (default: soft)")
    parser.add_argument("--cross", action="store_true",
                        help="score each half set against the other half's maps")
    parser.add_argument("--resize", type=int, default=0,
                        help="working box (0: auto, pixel ≈ 3 Å, at most the box)")
    parser.add_argument("--max-res", type=float, default=None, help="highest resolution in the likelihood (Å)")
    parser.add_argument("--tau2-fudge", type=float, default=0.7,
                        help="multiplies each class's SSNR in its Wiener filter (< 1: smoother class maps)")
    parser.add_argument("--lowpass", type=float, default=8.0,
                        help="resolution of the eigenvolume (Å; measured on 4000-particle sets: 8 Å better "
                             "than 10 Å on all five, finer than the working Nyquist has no effect)")
    parser.add_argument("--eigen-iterations", type=int, default=15,
                        help="alternating least-squares iterations of the eigenvolume")
    parser.add_argument("--mask", help="3D mask for the eigenvolume (default: from the consensus map)")
    add_memory_args(parser, "the particles' working-box spectra and CTFs",
                    "They take N × m × (m/2+1) × 12 bytes at working box m (200,000 particles at m = 32: "
                    "1.2 GB; at m = 64: 4.7 GB), more with pose refinement (a refined copy) and for the "
                    "eigenvolume's residuals", initial_map=False)
    add_particle_args(parser)


def _mask(args, consensus, box, pix, work_box, work_pix):
    if not args.mask:
        return masks.mask_from_map(consensus, work_pix)
    vol, _ = io.read_map(args.mask)
    if vol.shape != (box,) * 3:
        raise InputError(f"mask {args.mask} has shape {vol.shape}, the particles are {box} px")
    if vol.max() <= 0:
        raise InputError(f"mask {args.mask} is empty")
    from scipion_gsplat.core.fourier import crop_to
    import torch
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(torch.from_numpy(vol))))
    small = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(crop_to(ft, work_box, 3)))).real
    small = small.numpy() * (work_box / box) ** 3
    return np.clip(small / small.max(), 0.0, 1.0).astype(np.float32)


def _label(key: str) -> str:
    """``half_agreement`` → ``rlnGsplatHalfAgreement``."""
    return "rlnGsplat" + "".join(part.title() for part in key.split("_"))


def program_files(args) -> ProgramFiles:
    """The particles and mask read; particles, maps and summary written into the output folder."""
    names = ("particles.star", "class1.mrc", "class2.mrc", "eigenvolume.mrc", "mask.mrc", "summary.star")
    return ProgramFiles(particles=[args.input], inputs=[args.mask],
                        outputs=[os.path.join(args.output, n) for n in names])


def _search(args, pixel_A: float):
    """The local search of --sigma-ang / --sigma-shift (None: poses fixed)."""
    if args.sigma_ang < 0 or args.sigma_shift < 0:
        raise InputError("--sigma-ang and --sigma-shift must be >= 0")
    if args.evidence_iterations < 0 or args.evidence_lowpass <= 0:
        raise InputError("--evidence-iterations must be >= 0 and --evidence-lowpass > 0 (Å)")
    if args.sigma_ang == 0:
        return None
    if args.sigma_shift == 0:
        raise InputError("--sigma-shift 0 with --sigma-ang > 0: give the origin error too (pixels, e.g. 1)")
    from scipion_gsplat.core.poses.local_search import LocalSearch
    return LocalSearch(sigma_ang_deg=args.sigma_ang, sigma_shift_A=args.sigma_shift * pixel_A,
                       max_res_A=args.max_res)


def _heldout_choice(args, data, consensus, starts, final, pool, summary) -> str:
    """The candidate split with the higher held-out (half-set) log likelihood.

    Every candidate is scored at the same (consensus) poses: per-class poses
    were refined against maps that hold the scored particles themselves and
    would favour their split (measured on the subtle pair with 2° errors:
    held-out log likelihood +3900 for a refined split of ARI 0.66 over the
    pooled split of ARI 0.88 with per-class poses, −10 at shared poses)."""
    sigma2 = refine.noise_spectrum(data, consensus)
    scores = {}
    for name, (prob, _, _) in final.items():
        if name == "pooled":
            indep = pool.half_probabilities
        elif args.iterations > 0:  # the column start refined on each half alone
            indep = heldout.independent_refinement(data, starts[name], n_iter=args.iterations, soft=not args.hard,
                                                   max_res_A=args.max_res, fudge=args.tau2_fudge, progress=_log)
        else:
            indep = prob
        scores[name] = heldout.heldout_loglik([data, data], indep, sigma2)[0]
        summary[f"heldout_loglik_{name}"] = scores[name]
    best = max(scores, key=scores.get)
    _print("gsplat_refine_classes: held-out log likelihood " +
           ", ".join(f"{k} {v:.1f}" for k, v in scores.items()) + f": keeping the {best} split", flush=True)
    return best


def _reproducible_choice(args, data, starts, final, pool, mask, summary) -> str:
    """The candidate split whose 3D difference is the more reproducible: each
    candidate made on each half set alone (the pooled split's half-set
    classifications; the column start refined on each half), and the masked,
    low-passed correlation of the two halves' class-difference maps compared
    (:func:`heldout.difference_agreement`)."""
    scores = {}
    for name, (prob, _, _) in final.items():
        if name == "pooled":
            indep = pool.half_probabilities
        elif args.iterations > 0:
            _log(f"the {name} split refined on each half set alone")
            indep = heldout.independent_refinement(data, starts[name], n_iter=args.iterations, soft=not args.hard,
                                                   max_res_A=args.max_res, fudge=args.tau2_fudge, progress=_log)
        else:  # the unrefined start as given
            indep = prob
        scores[name] = heldout.difference_agreement(data, indep, mask, args.lowpass, progress=_log)
        summary[f"difference_agreement_{name}"] = scores[name]
    best = max(scores, key=scores.get)
    _print("gsplat_refine_classes: half-set agreement of the class-difference maps " +
           ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f": keeping the {best} split", flush=True)
    return best


def _print(*args, **kwargs) -> None:
    """print on rank 0 only (every rank runs the same steps)."""
    if distributed.current().is_main:
        print(*args, **kwargs)


def _log(msg: str) -> None:
    _print("  " + msg, flush=True)


def main(args) -> None:
    with memory_workspace(args) as workspace:  # the scratch folder is made on first use only
        _main(args, workspace)


def _main(args, workspace: SpectraWorkspace) -> None:
    device = setup_runtime(args)
    world = distributed.init(device)
    device = distributed.rank_device(device, world)
    t0 = time.time()
    star, reader = read_posed_particles(args)
    if len(star) < 2:  # the two-class mixture needs two particles (measured: 2 run, 1 fails)
        raise InputError(f"{args.input}: {len(star)} particle; a two-class split needs at least 2")
    if len(star) < world.size:
        raise InputError(f"{args.input}: {len(star)} particles for {world.size} ranks; start fewer ranks")
    mine = world.shard(len(star))  # this rank's particles (rank 0 gathers the results)
    init = args.init
    has_column = "rlnClassNumber" in star.particles
    if init == "auto":
        init = "column" if has_column else "pooled"
    if init in ("column", "both"):
        if not has_column:
            raise InputError(f"{args.input}: --init {init} needs rlnClassNumber")
        col = star.particles["rlnClassNumber"].to_numpy(int)
        if set(np.unique(col)) - {1, 2} or len(np.unique(col)) < 2:
            raise InputError(f"{args.input}: rlnClassNumber must hold classes 1 and 2")
    box, pix = star.box_size, star.pixel_size
    work = working_box(args.resize, box, pix)
    search = _search(args, pix)
    # copies held at once: the data, plus a pose-refined spectra copy (8 of the 12 bytes per pixel),
    # plus one per class with per-class poses
    ranks = f", {world.size} ranks" if world.size > 1 else ""
    _print(f"gsplat_refine_classes: {len(star)} particles, working box {work} px, device {device}{ranks}",
           flush=True)
    workspace.parent = scratch_parent(args, reader)
    copies = 1.0 + (8 / 12 if search is not None else 0.0) + (
        16 / 12 if search is not None and args.pose_iterations > 0 else 0.0)
    log = _log
    data = load_spectra(star, reader, work, device, progress=Progress("reading particles") if world.is_main else None,
                        workspace=workspace, copies=copies, log=log, world=world)
    consensus_shift = np.zeros((len(data), 2))
    input_data = data  # the particles at their input poses (the pooled split's evidence searches around them)
    summary = {"working_box": work, "working_pixel_A": data.pixel_size_A}
    if search is not None:
        if args.shift_prior == "estimate":
            search, history = refine.estimate_origin_prior(data, search, progress=log)
            summary["sigma_shift_estimated_px"] = search.sigma_shift_A / pix
            _print(f"gsplat_refine_classes: origin prior estimated from the particles: σ "
                   f"{args.sigma_shift} → {search.sigma_shift_A / pix:.2f} px", flush=True)
        _print(f"gsplat_refine_classes: refining poses against the consensus map (σ {args.sigma_ang}°, "
               f"{search.sigma_shift_A / pix:.2f} px)", flush=True)
        data, consensus, consensus_shift = refine.refine_consensus_poses(data, search, args.consensus_rounds,
                                                                         progress=log)
        summary["consensus_pose_seconds"] = time.time() - t0
    else:
        consensus, _ = refine._reconstruct(data, np.arange(len(data)), np.ones(len(data)), progress=log,
                                           label="consensus map")
    mask = _mask(args, consensus, box, pix, work, data.pixel_size_A)
    starts = {}
    if init in ("column", "both"):
        starts["column"] = np.eye(2)[col[mine] - 1]
    pool = None
    if init in ("pooled", "both"):
        pool = pooled.pooled_split(data, consensus, mask, args.lowpass, args.eigen_iterations,
                                   seed=args.seed, progress=log, without_shifts=args.without_shifts,
                                   search=search if args.pooled_classes == "evidence" else None,
                                   search_data=input_data, evidence_iterations=args.evidence_iterations,
                                   evidence_lowpass_A=args.evidence_lowpass)
        starts["pooled"] = pool.probabilities
        summary.update(pooled_half_agreement=pool.half_agreement, pooled_bimodality=pool.bimodality,
                       pooled_eigenvalue=pool.eigenvalue, pooled_classifier=pool.classifier)
        if pool.classifier == "evidence":
            summary.update(evidence_iterations=args.evidence_iterations, evidence_lowpass_A=args.evidence_lowpass)
        sizes = data.sum_over_ranks(np.bincount(pool.classes, minlength=3)[1:])
        _print(f"gsplat_refine_classes: eigenvolume half-set agreement {pool.half_agreement:.3f}, "
               f"bimodality {pool.bimodality:.2f}, classes {[int(k) for k in sizes]}", flush=True)
    input_data = None  # freed before the class refinement (its per-class pose copies)
    results = {}
    for name, q0 in starts.items():
        if args.iterations > 0 and (name == "column" or args.refine_pooled):
            _print(f"gsplat_refine_classes: refining from the {name} split", flush=True)
            results[name] = refine.refine_two_classes(data, q0, args.iterations, not args.hard, args.max_res,
                                                      consensus, cross=args.cross, fudge=args.tau2_fudge,
                                                      search=search if args.pose_iterations > 0 else None,
                                                      pose_iterations=args.pose_iterations,
                                                      progress=log)
    # every start's split: refined, or as it started (class maps made below)
    final = {name: (results[name].probabilities, results[name].classes, results[name].maps)
             if name in results else (q0, np.argmax(q0, 1) + 1, None) for name, q0 in starts.items()}
    if len(final) == 2:
        if "pooled" in results and args.choose == "support":  # both refined: the likelier one
            best = max(results, key=lambda k: results[k].total_loglik)
        elif args.choose == "support":
            best = "pooled" if pool.half_agreement >= args.support else "column"
        elif args.choose == "reproducible":
            best = _reproducible_choice(args, data, starts, final, pool, mask, summary)
        else:
            best = _heldout_choice(args, data, consensus, starts, final, pool, summary)
        a, b = (final[k][1] for k in ("column", "pooled"))
        same = data.sum_over_ranks((a == b).sum()) / len(star)
        summary["agreement_between_starts"] = float(max(same, 1.0 - same))
    else:
        best = next(iter(final))
    prob, classes, maps = final[best]
    summary.update(started_from=best, iterations=len(results[best].history) if best in results else 0)
    if best in results:
        summary["total_loglik"] = results[best].total_loglik
    if maps is None:  # unrefined split: class maps from its probabilities
        maps = np.stack([refine._reconstruct(data, np.arange(len(data)), prob[:, k], progress=log,
                                             label=f"class {k + 1} map")[0] for k in range(2)])
    # each particle's pose for its class: per-class poses of a refinement with
    # pose search, else the consensus-refined ones (None: poses unchanged)
    pose_cols = None
    if search is not None:
        cls_idx = classes - 1
        if best in results and results[best].class_data is not None:
            r = results[best]
            mats = np.stack([d.poses for d in r.class_data])[cls_idx, np.arange(len(data))]
            shift = consensus_shift + r.origin_shift_A[cls_idx, np.arange(len(data))]
        else:
            mats, shift = data.poses, consensus_shift
        mats, shift = data.gather_rows(mats)[0], data.gather_rows(shift)[0]
    prob, classes = data.gather_rows(prob)[0], data.gather_rows(classes)[0]  # all rows, input order
    if not world.is_main:  # rank 0 writes the outputs
        return
    if search is not None:
        pose_cols = pose_columns(star, mats, star.shifts_A() + shift)
        summary["median_angle_change_deg"] = float(np.median(pose_cols["rlnGsplatAngleChange"]))
    if (classes == 1).sum() < (classes == 2).sum():  # class 1 = the larger class
        classes, prob = 3 - classes, prob[:, ::-1]
        maps = None if maps is None else maps[::-1]
    assigned = prob[np.arange(len(prob)), classes - 1]
    score = np.log(np.clip(prob[:, 0], 1e-300, 1)) - np.log(np.clip(prob[:, 1], 1e-300, 1))
    os.makedirs(args.output, exist_ok=True)
    files.write_classified_particles(os.path.join(args.output, "particles.star"), star, classes,
                                     np.clip(score, -50, 50), assigned, extra=pose_cols)
    if maps is not None:
        for k in range(2):
            io.write_map(os.path.join(args.output, f"class{k + 1}.mrc"), maps[k], data.pixel_size_A)
    if pool is not None:
        io.write_map(os.path.join(args.output, "eigenvolume.mrc"), pool.eigenvolume, data.pixel_size_A)
    io.write_map(os.path.join(args.output, "mask.mrc"), mask, data.pixel_size_A)
    history = pd.DataFrame([{"rlnGsplatIteration": h["iteration"], "rlnGsplatChanged": h["changed"],
                             "rlnGsplatFractionClass1": h["fraction_1"]}
                            for r in results.values() for h in r.history]) if results else None
    blocks = {"summary": pd.DataFrame([{_label(k): v for k, v in summary.items()}])}
    if history is not None and len(history):
        blocks["history"] = history
    io.write_star(os.path.join(args.output, "summary.star"), blocks)
    print(f"gsplat_refine_classes: classes {int((classes == 1).sum())} / {int((classes == 2).sum())} "
          f"(from the {summary['started_from']} split), {time.time() - t0:.1f} s", flush=True)


run = console_entry("gsplat_refine_classes", DESCRIPTION, add_args, main, files=program_files, ranks=True)

if __name__ == "__main__":
    run()
