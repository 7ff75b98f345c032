"""gsplat_reconstruct_splat: Gaussian-splat reconstruction with gold-standard half sets.

Example::

    gsplat_reconstruct_splat -i particles.star -o splat --halves --iterations 10
    gsplat_reconstruct_splat -i particles.star -o splat --init pdb --init-file model.pdb --level residue
    gsplat_reconstruct_splat -i particles.star -o splat --init random --mask mask.mrc --n-gaussians 3000
    gsplat_reconstruct_splat -i particles.star -o splat --halves --sigma-ang 0   # poses kept as they are

The map is a sum of 3D Gaussians whose projections (with origins and CTF) are
fitted to the particles (known poses) by Adam. Writes into the output folder:
``model.npz`` (the Gaussian model) and ``model.pdb`` (or ``.cif``: centres as
atoms, B from the width, to open with the map in ChimeraX/Coot), ``map.mrc``,
``loss.star`` (loss per epoch), ``report.png`` (FSC, loss, model views) and
``summary.json``; with ``--halves`` also ``model_half<k>.npz``, ``map_half<k>.mrc``
and ``fsc.star`` (FSC between the half maps, RELION style).

Poses are refined by default (``--sigma-ang``/``--sigma-shift`` > 0): before the
fit, ``--align-rounds`` rounds of gold-standard local searches (each half set
against its own half map, as RELION's auto-refine with local searches); with
``--joint-poses`` also during the fit, by gradient descent with the model. The
refined poses are written to ``particles.star``: the input's rows and columns
with the refined rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst and
rlnGsplatAngleChange (degrees). Fits write
``checkpoint_half<k>.pt`` after every epoch; running the same command again
continues from them (``--restart`` ignores them).
"""
from __future__ import annotations

import time

_T_START = time.time()  # --time-limit counts from here, imports included

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scipion_gsplat.core import distributed, io  # noqa: E402
from scipion_gsplat.core.poses.local_search import LocalSearch  # noqa: E402
from scipion_gsplat.core.poses.rotations import compose  # noqa: E402
from scipion_gsplat.core.poses.star import with_poses  # noqa: E402
from scipion_gsplat.core.io import InputError, atomic_path  # noqa: E402
from scipion_gsplat.core.safety import ProgramFiles  # noqa: E402
from scipion_gsplat.core.splat.fit import FitConfig  # noqa: E402
from scipion_gsplat.core.splat.plots import save_report  # noqa: E402
from scipion_gsplat.core.splat.reconstruct import INIT_MODES, InitSpec, half_rows, reconstruct_splat  # noqa: E402

from ._cli import (Progress, add_memory_args, add_particle_args, console_entry, memory_workspace,  # noqa: E402
                   read_posed_particles, scratch_parent, setup_runtime)
from .reconstruct_fourier import fsc_table  # noqa: E402

DEFAULT_SIGMA_ANG_DEG = 2.0
DEFAULT_SIGMA_SHIFT_PX = 1.0
DEFAULT_ALIGN_ROUNDS = 2
SHORT_TIME_LIMIT_S = 600.0  # below this --time-limit, no local searches unless --align-rounds is given
DESCRIPTION = "Reconstruct a map as a sum of 3D Gaussians fitted to particles with known poses and CTF."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="particles STAR file (RELION 3.0/3.1) with poses")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--halves", action="store_true",
                        help="fit the two half sets (rlnRandomSubset) independently: half maps and FSC")
    add_particle_args(parser)
    add_memory_args(parser, "the particle images (full size) and the pose search's spectra",
                    "The images take N × box² × 4 bytes (200,000 particles at 64 px: 3.1 GB; at 256 px: "
                    "49 GB); above the budget they are read from the stacks at every step. The local pose "
                    "searches (--sigma-ang) keep N × m × (m/2+1) × 12 bytes at a working box m of about 2 Å "
                    "pixels, in a scratch file above the budget")
    parser.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
    g = parser.add_argument_group("initial model")
    g.add_argument("--init", choices=INIT_MODES, default="map",
                   help="map: density of --init-file, or of each half set's own Fourier reconstruction; "
                        "pdb: one Gaussian per atom/residue of --init-file; random: inside --mask")
    g.add_argument("--init-file", help="initial map (.mrc) for --init map, structure (PDB/mmCIF) for --init pdb")
    g.add_argument("--mask", help="mask (.mrc) for --init random (default: sphere of 0.4 box); "
                                  "restricts the sampling for --init map")
    g.add_argument("--n-gaussians", type=int, default=2000, help="number of Gaussians (map and random)")
    g.add_argument("--level", choices=("atom", "residue"), default="atom", help="Gaussians per atom or residue (pdb)")
    g.add_argument("--pdb-center", default="box",
                   help="structure frame: box (coordinates of a map of this box with origin 0), "
                        "com (centre of mass at the box centre) or x,y,z in Å")
    g.add_argument("--init-lowpass", type=float, default=None,
                   help="low-pass the initial map (Å); default: FSC 0.143 of the data's half maps, "
                        "10 Å for --init-file")
    g.add_argument("--init-threshold", type=float, default=0.25,
                   help="sample map voxels above this fraction of the map's 99.9th percentile")
    g.add_argument("--init-sigma", type=float, default=None, help="initial width σ (Å); default from the spacing")
    g.add_argument("--init-perturb", type=float, default=0.0, help="jitter of the initial centres (Å), per half")
    g.add_argument("--no-auto-mask", action="store_true",
                   help="for --init map without --mask: sample the whole map, not only its largest "
                        "connected density")
    f = parser.add_argument_group("fitting")
    f.add_argument("--gaussian-type", choices=("iso", "aniso"), default="iso",
                   help="isotropic widths or anisotropic covariances")
    f.add_argument("--iterations", type=int, default=10, help="epochs (passes over the particles of each fit)")
    f.add_argument("--batch", type=int, default=32, help="particles per optimiser step")
    f.add_argument("--lr-centres", type=float, default=0.1, help="Adam step of the centres (Å)")
    f.add_argument("--lr-amplitudes", type=float, default=0.05, help="Adam step of the log-amplitudes")
    f.add_argument("--lr-widths", type=float, default=0.05, help="Adam step of the log-widths")
    f.add_argument("--lr-final", type=float, default=0.05, help="final learning rate / initial (cosine decay)")
    f.add_argument("--fix-centres", action="store_true", help="do not move the centres")
    f.add_argument("--fix-amplitudes", action="store_true", help="do not change the amplitudes")
    f.add_argument("--fix-widths", action="store_true", help="do not change the widths")
    f.add_argument("--bond-weight", type=float, default=0.0,
                   help="harmonic bond regulariser between neighbouring Gaussians (as in Dräger's Gaussian-splatting report; 0 = off)")
    f.add_argument("--bond-length", type=float, default=None, help="bond rest length (Å); default median")
    f.add_argument("--densify-every", type=int, default=0, help="split/clone every N epochs (0 = never)")
    f.add_argument("--densify-fraction", type=float, default=0.05, help="fraction of Gaussians split/cloned")
    f.add_argument("--max-gaussians", type=int, default=0, help="cap when densifying (0 = 2 × initial)")
    f.add_argument("--prune", type=float, default=0.0,
                   help="remove Gaussians with amplitude below this × median (0 = never)")
    p = parser.add_argument_group("pose refinement")
    p.add_argument("--sigma-ang", type=float, default=DEFAULT_SIGMA_ANG_DEG, metavar="DEG",
                   help="prior σ of the pose error (degrees per rotation axis): each particle's orientation "
                        "is refined within about 3σ of its input pose; typical 1-3 for poses from a "
                        "consensus refinement; 0 = orientations fixed")
    p.add_argument("--sigma-shift", type=float, default=DEFAULT_SIGMA_SHIFT_PX, metavar="PX",
                   help="prior σ of the origin error (pixels per axis); typical 0.5-1; 0 = origins fixed")
    p.add_argument("--align-rounds", type=int, default=None, metavar="N",
                   help="rounds of local searches before the fit, gold standard as in RELION's auto-refine "
                        "(each half set aligned against its own half map, rebuilt every round); 0 = none. "
                        f"Default {DEFAULT_ALIGN_ROUNDS}, or 0 with a --time-limit under {SHORT_TIME_LIMIT_S:.0f} s: "
                        "the searches take about a minute per 4000 particles (64 px) and would leave the fit "
                        "too little time (measured at 180 s: FSC AUC 0.63 with them, 0.88 without)")
    p.add_argument("--joint-poses", action="store_true",
                   help="also refine the poses by gradient descent together with the Gaussians during the "
                        "fit (measured: +0.02 FSC AUC after 3 epochs with 2° errors, a small loss with "
                        "exact poses)")
    p.add_argument("--align-pixel", type=float, default=2.0, metavar="A",
                   help="pixel size (Å) of the working grid of the local searches (larger: faster, coarser)")
    f.add_argument("--time-limit", type=float, default=None,
                   help="wall-clock budget (s) of the whole run: the fits share what is left after "
                        "the initial models and stop in time (learning rates decay to match)")
    f.add_argument("--max-elements", type=int, default=2 ** 22,
                   help="memory bound: profile values per micro-batch")
    f.add_argument("--restart", action="store_true", help="ignore checkpoints of an earlier run")
    f.add_argument("--model-format", choices=("pdb", "cif"), default=None,
                   help="format of the exported model (default: pdb, cif above 99 999 Gaussians)")


def fit_config(args, pixel_size_A: float = 1.0) -> FitConfig:
    """The :class:`FitConfig` of the command line (``pixel_size_A`` converts --sigma-shift)."""
    for name in ("iterations", "batch"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    for name in ("sigma_ang", "sigma_shift"):
        if not getattr(args, name) >= 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0 (0 = fixed)")
    return FitConfig(
        epochs=args.iterations, batch=args.batch, lr_centres_A=args.lr_centres,
        lr_amplitudes=args.lr_amplitudes, lr_widths=args.lr_widths, lr_final=args.lr_final,
        fit_centres=not args.fix_centres, fit_amplitudes=not args.fix_amplitudes,
        fit_widths=not args.fix_widths, anisotropic=args.gaussian_type == "aniso",
        bond_weight=args.bond_weight, bond_length_A=args.bond_length,
        densify_every=args.densify_every, densify_fraction=args.densify_fraction,
        max_gaussians=args.max_gaussians, prune_threshold=args.prune,
        max_elements=args.max_elements, sigma_ang_deg=args.sigma_ang if args.joint_poses else 0.0,
        sigma_shift_A=args.sigma_shift * pixel_size_A if args.joint_poses else 0.0)


def align_rounds(args) -> int:
    """``--align-rounds``, or its default: :data:`DEFAULT_ALIGN_ROUNDS`, 0 under a short time limit."""
    if args.align_rounds is not None:
        return args.align_rounds
    if args.time_limit is not None and args.time_limit < SHORT_TIME_LIMIT_S:
        return 0
    return DEFAULT_ALIGN_ROUNDS


def prealign_search(args, pixel_size_A: float):
    """The :class:`LocalSearch` of the local searches before the fit, or None."""
    if align_rounds(args) < 0:
        raise InputError("--align-rounds must be >= 0")
    if not args.align_pixel > 0:
        raise InputError("--align-pixel must be positive (Å)")
    if align_rounds(args) == 0 or args.sigma_ang <= 0 or args.sigma_shift <= 0:
        return None
    return LocalSearch(sigma_ang_deg=args.sigma_ang, sigma_shift_A=args.sigma_shift * pixel_size_A)


def init_spec(args, box: int) -> InitSpec:
    """The :class:`InitSpec` of the command line (reads the mask)."""
    mask = None
    if args.mask:
        mask, _ = io.read_map(args.mask)
        if mask.shape != (box,) * 3:
            raise InputError(f"{args.mask}: mask of {mask.shape[-1]} voxels, particles of {box} pixels")
        if not (mask >= 0.5).any():
            raise InputError(f"{args.mask}: the mask is empty (no voxel >= 0.5)")
    if args.init == "pdb" and not args.init_file:
        raise InputError("--init pdb needs --init-file (a PDB or mmCIF file)")
    return InitSpec(mode=args.init, file=args.init_file, n_gaussians=args.n_gaussians, level=args.level,
                    pdb_center=args.pdb_center, mask=mask, lowpass_A=args.init_lowpass,
                    sigma_A=args.init_sigma, threshold_rel=args.init_threshold,
                    auto_mask=not args.no_auto_mask, perturb_A=args.init_perturb)


def loss_table(fits, halves: bool) -> pd.DataFrame:
    """One row per fit and epoch."""
    rows = []
    for k, fit in enumerate(fits):
        for h in fit.history:
            rows.append({"gsplatHalf": k + 1 if halves else 0, "gsplatEpoch": h["epoch"],
                         "gsplatLoss": h["loss"], "gsplatNumberOfGaussians": h["n_gaussians"],
                         "gsplatSeconds": h["seconds"]})
    return pd.DataFrame(rows)


def write_refined_particles(path: str, star, rec, halves: bool) -> dict:
    """``particles.star``: the input rows and columns with each particle's refined
    pose (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst: the local searches before the
    fit, then the joint refinement) and rlnGsplatAngleChange (degrees from the
    input pose); returns the median/RMS changes for the summary."""
    used = rec.star if rec.star is not None else star
    poses, shifts = used.poses(), used.shifts_A()
    omega, dshift = np.zeros((len(star), 3)), np.zeros((len(star), 2))
    for rows, f in zip(half_rows(used, halves), rec.fits):
        if f.pose_omega is not None:
            omega[rows], dshift[rows] = f.pose_omega, f.pose_shift_A
    refined = with_poses(star, compose(poses, omega), shifts + dshift)
    io.write_particles(path, star, refined.particles)
    change = refined.particles["rlnGsplatAngleChange"].to_numpy(float)
    shift_px = np.linalg.norm(refined.shifts_A() - star.shifts_A(), axis=1) / star.pixel_size
    return {"median_angle_deg": float(np.median(change)), "rms_angle_deg": float(np.sqrt(np.mean(change ** 2))),
            "median_shift_px": float(np.median(shift_px)), "rms_shift_px": float(np.sqrt(np.mean(shift_px ** 2)))}


def output_names(outdir: str, model_format: str = "pdb") -> dict:
    """Paths of the files the program writes into ``outdir``."""
    j = lambda name: os.path.join(outdir, name)  # noqa: E731
    return {"model": j("model.npz"), "structure": j(f"model.{model_format}"), "map": j("map.mrc"),
            "half1": j("map_half1.mrc"), "half2": j("map_half2.mrc"),
            "model_half1": j("model_half1.npz"), "model_half2": j("model_half2.npz"),
            "fsc": j("fsc.star"), "loss": j("loss.star"), "report": j("report.png"),
            "summary": j("summary.json"), "particles": j("particles.star")}


def program_files(args) -> ProgramFiles:
    """The particles, initial map/structure and mask read; every output and checkpoint written."""
    names = {**output_names(args.output, "pdb"), **{k + "_cif": v for k, v in output_names(args.output, "cif").items()}}
    checkpoints = [os.path.join(args.output, f"checkpoint_half{k}.pt") for k in (0, 1, 2)]
    return ProgramFiles(particles=[args.input], inputs=[args.init_file, args.mask],
                        outputs=list(names.values()) + checkpoints)


def main(args) -> None:
    # a console script counts from its imports; a run in-process long after the import, from here
    t_start = _T_START if time.time() - _T_START < 30.0 else time.time()
    with memory_workspace(args) as workspace:  # the scratch folder is made on first use only
        _main(args, workspace, t_start)


def _main(args, workspace, t_start: float) -> None:
    device = setup_runtime(args)
    world = distributed.init(device)
    device = distributed.rank_device(device, world)
    if args.time_limit is not None and not args.time_limit > 0:
        raise InputError("--time-limit must be positive")
    star, reader = read_posed_particles(args, need_ctf=not args.no_ctf)
    workspace.parent = scratch_parent(args, reader)
    box, pix = star.box_size, star.pixel_size
    config = fit_config(args, pix)
    search = prealign_search(args, pix)
    spec = init_spec(args, box)
    os.makedirs(args.output, exist_ok=True)
    if args.restart and world.is_main:
        for k in (0, 1, 2):
            path = os.path.join(args.output, f"checkpoint_half{k}.pt")
            if os.path.exists(path):
                os.remove(path)
    world.barrier()
    ranks = f", {world.size} ranks" if world.size > 1 else ""
    if world.is_main:
        print(f"gsplat_reconstruct_splat: {len(star)} particles, box {box} px at {pix} Å, init {args.init}, "
              f"{args.gaussian_type} Gaussians, {args.iterations} epochs, device {device}{ranks}", flush=True)

    def log(line: str) -> None:
        if world.is_main:
            print(f"  {line}", flush=True)

    # keep a reserve for the maps and the outputs (model, maps, report: a few seconds)
    deadline = None if args.time_limit is None else t_start + 0.95 * args.time_limit - 4.0
    rec = reconstruct_splat(star, spec, config, halves=args.halves, seed=args.seed, device=device,
                            use_ctf=not args.no_ctf, checkpoint_dir=args.output, log=log,
                            progress_factory=lambda label: Progress(label) if world.is_main else None, deadline=deadline,
                            prealign=search, prealign_rounds=align_rounds(args), world=world,
                            workspace=workspace)
    if not world.is_main:  # rank 0 writes the outputs
        return
    fmt = args.model_format or ("pdb" if len(rec.model) <= 99999 else "cif")
    names = output_names(args.output, fmt)
    rec.model.save(names["model"])
    rec.model.write_structure(names["structure"], origin_A=np.full(3, (box // 2) * pix), cell_A=box * pix)
    io.write_map(names["map"], rec.full_map, pix)
    summary = {"n_particles": len(star), "box": box, "pixel_size_A": pix, "n_gaussians": len(rec.model),
               "halves": bool(args.halves), "epochs": args.iterations, "seconds": rec.seconds,
               "init_seconds": rec.init_seconds, "notes": rec.notes,
               "final_loss": [f.history[-1]["loss"] if f.history else None for f in rec.fits],
               "stopped_early": any(f.stopped_early for f in rec.fits)}
    curves = None
    if args.halves:
        for k in (0, 1):
            rec.half_models[k].save(names[f"model_half{k + 1}"])
            io.write_map(names[f"half{k + 1}"], rec.half_maps[k], pix)
        io.write_star(names["fsc"], {"fsc": fsc_table(rec.frequency, rec.fsc)})
        summary.update(resolution_0143_A=rec.resolution_A(0.143), resolution_05_A=rec.resolution_A(0.5))
        curves = {"half maps": rec.fsc}
    refined = config.refine_poses or search is not None
    if refined:
        summary["pose_change"] = write_refined_particles(names["particles"], star, rec, args.halves)
    io.write_star(names["loss"], {"loss": loss_table(rec.fits, args.halves)})
    histories = {(f"half {k + 1}" if args.halves else "all"): f.history for k, f in enumerate(rec.fits)}
    save_report(names["report"], rec.model, histories, rec.frequency, curves)
    with atomic_path(names["summary"]) as tmp:
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=1)
    res = (f", resolution {summary['resolution_0143_A']:.2f} Å (FSC 0.143), "
           f"{summary['resolution_05_A']:.2f} Å (FSC 0.5)") if args.halves else ""
    print(f"gsplat_reconstruct_splat: {len(rec.model)} Gaussians{res}, {rec.seconds:.1f} s", flush=True)
    print(f"gsplat_reconstruct_splat: wrote {names['map']} and {names['structure']}", flush=True)
    if refined:
        pc = summary["pose_change"]
        print(f"gsplat_reconstruct_splat: refined poses in {names['particles']} (median change "
              f"{pc['median_angle_deg']:.2f}°, {pc['median_shift_px']:.2f} px)", flush=True)


run = console_entry("gsplat_reconstruct_splat", DESCRIPTION, add_args, main, files=program_files,
                    ranks=True)

if __name__ == "__main__":
    run()
