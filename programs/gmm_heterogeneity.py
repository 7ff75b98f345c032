"""gsplat_gmm_heterogeneity: eigen-motions of a Gaussian model and per-particle coordinates.

Example::

    gsplat_gmm_heterogeneity -i particles.star -o hetero --consensus splat/model.npz --motions 4
    gsplat_gmm_heterogeneity -i particles.star -o hetero --amplitudes --classes 5

Per particle, the gradient of the data-fit loss with respect to the Gaussian
positions (and amplitudes with ``--amplitudes``) at the consensus; a PCA of
those gradients gives the eigen-motions; Gauss-Newton gives each particle's
coordinates along them; model, motions and coordinates are then refined in
turn (after Chen & Ludtke). Writes into the output folder:

* ``particles.star``: the input rows, same order, plus ``rlnGsplatCoordinate<k>``
  (with ``--sigma-ang``/``--sigma-shift``: the refined poses in rlnAngleRot/Tilt/Psi and
  rlnOriginX/YAngst, and rlnGsplatAngleChange in degrees)
  (with ``--parts``: the principal coordinates of all rigid and residual
  coordinates, and the rigid ones as ``rlnGsplatPart<p>RotXDeg`` … ``ShiftZA``),
  and ``rlnClassNumber`` with ``--classes``;
* ``heterogeneity.npz``: consensus model, motions, coordinates, explained variance;
* ``consensus.npz``/``consensus.pdb``/``consensus.mrc``: the consensus model;
* ``motion<k>_frame<f>.mrc`` maps and ``motion<k>.pdb`` trajectories along each motion;
* ``class<c>.mrc``: the model at each subset's mean coordinate (``--classes``);
* ``report.png`` (coordinate histograms/hexbin, explained variance) and ``summary.json``.

``state.npz`` is written after every stage (and ``consensus_fit.pt`` after every
epoch of the consensus fit); the same command run again continues from them and
gives the uninterrupted run's result, bit for bit. A state computed from other
particles (STAR rows, stacks), settings, seed, consensus or segmentation is not
used: the run starts afresh and says so (``--restart`` ignores the state anyway).
"""
from __future__ import annotations

import json
import os

import numpy as np

from scipion_gsplat.core import distributed, io
from scipion_gsplat.core.heterogeneity import analysis
from scipion_gsplat.core.heterogeneity.pipeline import HeterogeneityConfig, run_heterogeneity
from scipion_gsplat.core.heterogeneity.plots import save_report
from scipion_gsplat.core.heterogeneity.poses import POSE_METHODS, correction_summary
from scipion_gsplat.core.io import InputError, atomic_path
from scipion_gsplat.core.poses.rotations import compose
from scipion_gsplat.core.poses.star import pose_columns
from scipion_gsplat.core.safety import ProgramFiles

from ._cli import (Progress, add_memory_args, add_particle_args, console_entry, memory_workspace,
                   read_posed_particles, scratch_parent, setup_runtime)

DESCRIPTION = ("Continuous heterogeneity: eigen-motions of a Gaussian model from per-particle gradients, "
               "and each particle's coordinates along them.")
COORDINATE_LABEL = "rlnGsplatCoordinate{}"
DEFAULT_SIGMA_ANG = 0.0
DEFAULT_SIGMA_SHIFT = 0.0


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="particles STAR file with poses and CTF")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    add_particle_args(parser)
    g = parser.add_argument_group("consensus model")
    g.add_argument("--consensus", default=None,
                   help="Gaussian model (.npz from gsplat_reconstruct_splat) or map (.mrc) to sample one "
                        "from; default: the particles' own Fourier reconstruction")
    g.add_argument("--n-gaussians", type=int, default=1000, help="Gaussians sampled from a map")
    g.add_argument("--consensus-epochs", type=int, default=1,
                   help="epochs fitting the consensus to these particles first (0 = use as given; the rounds "
                        "refit it anyway; 4000-particle hinge: 1 epoch with 2-epoch refits |ρ| 0.959, 2 with "
                        "3-epoch refits 0.961)")
    p = parser.add_argument_group("pose refinement (before the motions; every later stage uses the refined poses)")
    p.add_argument("--sigma-ang", type=float, default=DEFAULT_SIGMA_ANG,
                   help="prior σ of the particles' angular errors (degrees per axis; typical 1-3 after a "
                        "consensus refinement): each pose is refined locally against the consensus, within about "
                        "3σ; 0 with --sigma-shift 0: poses used as given. Measured (4000-particle hinge, SNR "
                        "0.05, 64 px): with 2°/0.5 px errors in the input, --sigma-ang 2 --sigma-shift 0.5 raised "
                        "|ρ| 0.927 → 0.937 (pose error 3.5° → 3.1°) in 96 s instead of 85 s on 2 threads, "
                        "but on exact poses it lowered |ρ| 0.961 → 0.949: use it when the poses are known to "
                        "be off")
    p.add_argument("--sigma-shift", type=float, default=DEFAULT_SIGMA_SHIFT,
                   help="prior σ of the particles' origin errors (pixels of the input; typical 0.3-1); "
                        "0: origins fixed")
    p.add_argument("--pose-method", choices=POSE_METHODS, default="search",
                   help="search: local grid search of each particle against a map of the consensus (posterior "
                        "mean); gradient: corrections optimised jointly with the consensus fit")
    m = parser.add_argument_group("motions and coordinates")
    m.add_argument("--motions", type=int, default=4, help="number of eigen-motions K")
    m.add_argument("--amplitudes", action="store_true",
                   help="also per-particle amplitude changes (compositional heterogeneity)")
    m.add_argument("--rounds", type=int, default=3,
                   help="alternations of (refit model and motions, re-estimate coordinates); each round costs "
                        "about a fifth of the default run (4 instead of 3: |ρ| +0.001 on the hinge benchmark)")
    m.add_argument("--refit-epochs", type=int, default=None,
                   help="epochs of each refit (default 2, or 1 with --amplitudes, where more lost accuracy)")
    m.add_argument("--final-epochs", type=int, default=0,
                   help="epochs of a last refit on the full-size images when the work ran on cropped ones "
                        "(sharper maps along the motions), then the coordinates once more on them; 2 adds "
                        "about half the default run time (box² more work per particle) for |ρ| +0.004 on the "
                        "hinge benchmark (0: neither)")
    m.add_argument("--gn-steps", type=int, default=2, help="Gauss-Newton steps per coordinate estimate")
    m.add_argument("--prior-components", type=int, default=8,
                   help="Gaussians of the coordinates' population prior, fitted by deconvolution each round; "
                        "coordinates are posterior means under it (0: one Gaussian prior, MAP coordinates; "
                        "not used with --amplitudes)")
    m.add_argument("--refit-means", action="store_true",
                   help="refit model and motions on the coordinates' posterior means instead of on draws from "
                        "each particle's posterior (Monte Carlo EM, the default where there are posteriors)")
    m.add_argument("--batch", type=int, default=32, help="particles per optimiser step")
    m.add_argument("--resize", type=int, default=0,
                   help="working box (px) the particles are Fourier-cropped to (0: a pixel of about 2.4 Å; "
                        "the box size: no cropping)")
    m.add_argument("--pca-particles", type=int, default=10000,
                   help="at most this many particles enter the gradient PCA (memory bound)")
    m.add_argument("--parts", type=int, default=0,
                   help="rigid parts (0: none): Gaussians grouped by position and motion, each part with a "
                        "per-particle rotation and translation on top of the eigen-motions")
    m.add_argument("--segmentation", default=None,
                   help="integer-labelled map (.mrc, labels 1..P) defining the rigid parts instead")
    m.add_argument("--part-sigma-rot", type=float, default=10.0, help="prior width of part rotations (degrees)")
    m.add_argument("--part-sigma-shift", type=float, default=5.0, help="prior width of part translations (Å)")
    o = parser.add_argument_group("outputs")
    o.add_argument("--frames", type=int, default=10, help="maps along each motion")
    o.add_argument("--classes", type=int, default=0, help="particle subsets (0 = none)")
    o.add_argument("--subset-method", choices=analysis.SUBSET_METHODS, default="kmeans",
                   help="kmeans on all coordinates, or bins along --subset-motion")
    o.add_argument("--subset-motion", type=int, default=1, help="motion binned by --subset-method bins")
    o.add_argument("--restart", action="store_true", help="ignore the state of an earlier run in the output folder "
                   "(one from other particles or settings is never used)")
    add_memory_args(parser, "the particle images at the working box (Fourier-cropped)",
                    "They take N × m² × 4 bytes at working box m (200,000 particles at m = 40: 1.2 GB; at "
                    "m = 64: 3.1 GB); with --final-epochs the full-size images are kept too when both fit "
                    "(else read from the stacks per batch)")


def config_from_args(args, pixel_A: float = 1.0) -> HeterogeneityConfig:
    """The run's settings (``pixel_A``: the particles' pixel size, for ``--sigma-shift``)."""
    for name in ("motions", "batch", "frames", "n_gaussians", "gn_steps", "pca_particles"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("rounds", "refit_epochs", "final_epochs", "consensus_epochs", "classes", "resize", "parts",
                 "prior_components"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must not be negative")
    for name in ("sigma_ang", "sigma_shift"):
        if not getattr(args, name) >= 0:
            raise InputError(f"--{name.replace('_', '-')} must not be negative (0: no pose refinement)")
    if args.segmentation and not os.path.exists(args.segmentation):
        raise InputError(f"segmentation not found: {args.segmentation}")
    if args.consensus and not os.path.exists(args.consensus):
        raise InputError(f"consensus not found: {args.consensus}")
    if args.consensus and os.path.splitext(args.consensus)[1].lower() not in (".npz", ".mrc", ".map"):
        raise InputError(f"{args.consensus}: give a Gaussian model (.npz) or a map (.mrc)")
    return HeterogeneityConfig(
        n_motions=args.motions, amplitudes=args.amplitudes, consensus=args.consensus,
        n_gaussians=args.n_gaussians, consensus_epochs=args.consensus_epochs, rounds=args.rounds,
        refit_epochs=args.refit_epochs, final_epochs=args.final_epochs, gn_steps=args.gn_steps, batch=args.batch,
        pca_particles=args.pca_particles, resize=args.resize, parts=args.parts,
        segmentation=args.segmentation, part_sigma_rot_deg=args.part_sigma_rot,
        part_sigma_shift_A=args.part_sigma_shift, prior_components=args.prior_components,
        refit_draws=not args.refit_means, sigma_ang_deg=args.sigma_ang, sigma_shift_A=args.sigma_shift * pixel_A,
        pose_method=args.pose_method)


def check_segmentation(path, box: int) -> None:
    """Refuse a segmentation map whose box differs from the particles' (``box`` px)."""
    if path:
        seg, _ = io.read_map(path)
        if seg.shape != (box,) * 3:
            raise InputError(f"segmentation {path} is {'x'.join(map(str, seg.shape[::-1]))} voxels, "
                             f"the particles are {box} px: give a segmentation of the particles' box")


def part_sizes(mm) -> list:
    """Gaussians in each moving part ([] without parts)."""
    if mm.parts is None:
        return []
    labels = mm.parts.cpu().numpy()
    return [int(n) for n in np.bincount(labels[labels >= 0])]


def program_files(args) -> ProgramFiles:
    """The particles, consensus and segmentation read; everything written into the output folder."""
    names = ("particles.star", "heterogeneity.npz", "consensus.npz", "consensus.pdb", "consensus.cif",
             "consensus.mrc", "motion*_frame*.mrc", "motion*.pdb", "motion*.cif", "class*.mrc", "report.png",
             "summary.json", "state*.npz", "*.pt")  # state and checkpoints
    return ProgramFiles(particles=[args.input], inputs=[args.consensus, args.segmentation],
                        outputs=[os.path.join(args.output, n) for n in names])


def main(args) -> None:
    with memory_workspace(args) as workspace:  # the scratch folder is made on first use only
        _main(args, workspace)


def _main(args, workspace) -> None:
    device = setup_runtime(args)
    world = distributed.init(device)
    device = distributed.rank_device(device, world)
    star, reader = read_posed_particles(args, need_ctf=True)
    workspace.parent = scratch_parent(args, reader)
    cfg = config_from_args(args, star.pixel_size)
    box, pix = star.box_size, star.pixel_size
    check_segmentation(args.segmentation, box)
    os.makedirs(args.output, exist_ok=True)
    state = os.path.join(args.output, "state.npz")
    if args.restart and os.path.exists(state) and world.is_main:
        os.remove(state)
    world.barrier()
    ranks = f", {world.size} ranks" if world.size > 1 else ""
    if world.is_main:
        print(f"gsplat_gmm_heterogeneity: {len(star)} particles, box {box} px at {pix} Å, "
              f"{cfg.n_motions} motions{' + amplitudes' if cfg.amplitudes else ''}, device {device}{ranks}",
              flush=True)

    def log(line: str) -> None:
        print(f"  {line}", flush=True)

    res = run_heterogeneity(star, cfg, seed=args.seed, device=device, workdir=args.output, log=log,
                            progress_factory=lambda label: Progress(label), world=world, workspace=workspace)
    if not world.is_main:  # rank 0 writes the outputs
        return
    z, mm = res.coordinates, res.model
    u, _, _ = analysis.user_coordinates(mm, z)
    out = lambda name: os.path.join(args.output, name)  # noqa: E731
    parts = star.particles.copy()
    for k in range(u.shape[1]):
        parts[COORDINATE_LABEL.format(k + 1)] = u[:, k]
    for name, values in zip(mm.coordinate_names()[:mm.n_rigid], z[:, :mm.n_rigid].T):
        parts["rlnGsplat" + "".join(w.capitalize() for w in name.split("_"))] = values
    summary = {"n_particles": len(star), "box": box, "pixel_size_A": pix, "n_gaussians": len(mm),
               "motions": cfg.n_motions, "amplitudes": cfg.amplitudes,
               "explained_variance": [float(e) for e in res.explained],
               "coordinate_std_A": [float(s) for s in u.std(axis=0)], "seconds": res.seconds,
               "coordinate_names": mm.coordinate_names(),
               "parts": part_sizes(mm)}
    if args.classes:
        labels, _ = analysis.subsets(u, args.classes, args.subset_method, args.subset_motion - 1, args.seed)
        centres = np.stack([z[labels == c].mean(axis=0) if (labels == c).any() else z.mean(axis=0)
                            for c in range(1, args.classes + 1)])
        parts["rlnClassNumber"] = labels
        summary["classes"] = analysis.write_subset_maps(mm, centres, args.output, box, pix, device)
        summary["class_sizes"] = [int((labels == c).sum()) for c in range(1, args.classes + 1)]
    if res.pose_omega is not None:
        for col, values in pose_columns(star, compose(star.poses(), res.pose_omega),
                                        star.shifts_A() + res.pose_shift_A).items():
            parts[col] = values
        summary["pose_refinement"] = correction_summary(res.pose_omega, res.pose_shift_A, pix)
    io.write_particles(out("particles.star"), star, parts)
    mm.save(out("heterogeneity.npz"), z, explained=res.explained, user_coordinates=u)
    consensus = mm.to_model()
    consensus.save(out("consensus.npz"))
    origin = np.full(3, (box // 2) * pix)
    consensus.write_structure(out("consensus.pdb"), origin, box * pix)
    io.write_map(out("consensus.mrc"), consensus.to_map(box, pix, device=device), pix)
    summary["motion_frames"] = analysis.write_motion_frames(mm, z, args.output, box, pix, args.frames,
                                                            device=device)
    save_report(out("report.png"), u, res.explained)
    with atomic_path(out("summary.json")) as tmp:
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=1)
    print(f"gsplat_gmm_heterogeneity: {len(mm)} Gaussians, {cfg.n_motions} motions "
          f"({', '.join(f'{100 * e:.1f} %' for e in res.explained)} of the gradient variance), "
          f"{res.seconds:.1f} s", flush=True)
    print(f"gsplat_gmm_heterogeneity: wrote {out('particles.star')}", flush=True)


run = console_entry("gsplat_gmm_heterogeneity", DESCRIPTION, add_args, main, files=program_files,
                    ranks=True)

if __name__ == "__main__":
    run()
