"""gsplat_refine_poses: local refinement of particle poses against a map or a Gaussian model.

Examples::

    gsplat_refine_poses -i particles.star --ref consensus.mrc -o refined/
    gsplat_refine_poses -i particles.star --ref splat/model.npz -o refined/ --sigma-ang 3 --sigma-shift 1.5
    gsplat_refine_poses -i particles.star --ref consensus.mrc -o refined/ --iterations 3   # gold standard

Every particle's pose is searched on a local grid of small rotations (within
``3 × --sigma-ang`` of its pose) and origin corrections (within
``3 × --sigma-shift``), scored against the reference's projections in Fourier
space with the particle's CTF and the noise spectrum estimated from the data,
with a Gaussian prior around the input pose (RELION's local searches). The
result is the posterior mean (``--mode expectation``, default) or the best pose
(``--mode best``). With ``--iterations N > 1`` the later passes are gold
standard: half maps are reconstructed from the refined poses, FSC-filtered,
and each half set is aligned against its own half map only.

Writes ``particles.star``: the input rows and columns with refined
``rlnAngleRot/Tilt/Psi`` and ``rlnOriginX/YAngst``, plus ``rlnGsplatAngleChange``
(degrees), ``rlnGsplatAngularSD`` (posterior SD of the rotation, degrees per
axis), ``rlnGsplatShiftSD`` (posterior SD of the origin, pixels per axis) and
``rlnGsplatLogEvidence``; with ``--iterations > 1`` also the FSC-filtered half
maps ``half1.mrc``/``half2.mrc`` (working box).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from scipion_gsplat.core import geometry, io
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.particle_spectra import fourier_crop_map, load_spectra
from scipion_gsplat.core.poses.local_search import MODES, LocalSearch, refine_iteratively
from scipion_gsplat.core.poses.star import with_poses
from scipion_gsplat.core.safety import ProgramFiles

from ._cli import Progress, add_particle_args, console_entry, read_posed_particles, setup_runtime, working_box

DESCRIPTION = "Local pose refinement (rotations and origins) of particles against a map or Gaussian model."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="particles STAR file with poses (and CTF)")
    parser.add_argument("--ref", required=True,
                        help="reference: a map (.mrc, same box and pixel as the particles) or a Gaussian "
                             "model (.npz from gsplat_reconstruct_splat), rendered on the particles' grid")
    parser.add_argument("-o", "--output", required=True, help="output folder (particles.star is written there)")
    parser.add_argument("--sigma-ang", type=float, default=2.0,
                        help="prior σ of the pose error (degrees, per rotation axis); the search reaches 3σ. "
                             "Typical after a consensus refinement: 1-3")
    parser.add_argument("--sigma-shift", type=float, default=1.0,
                        help="prior σ of the origin error (pixels of the input images, per axis); the search "
                             "reaches 3σ. Typical: 0.5-2")
    parser.add_argument("--mode", choices=MODES, default="expectation",
                        help="expectation: posterior mean of the pose (RELION-like, more accurate at low SNR); "
                             "best: the single most probable grid pose")
    parser.add_argument("--iterations", type=int, default=1,
                        help="passes: 1 aligns against --ref; each further pass reconstructs FSC-filtered half "
                             "maps from the refined poses and aligns each half set against its own half map "
                             "(gold standard)")
    parser.add_argument("--resize", type=int, default=0,
                        help="working box in pixels (0: auto, pixel ≈ 3 Å, at most the box); a finer working "
                             "pixel gives more precise poses at a higher cost")
    parser.add_argument("--max-res", type=float, default=None,
                        help="highest resolution used to score poses (Å; default: the working Nyquist)")
    parser.add_argument("--truth", default=None, help=argparse.SUPPRESS)  # ground_truth.npz of gsplat_simulate
    add_particle_args(parser)


def program_files(args) -> ProgramFiles:
    """The particles, reference (and truth) read; particles and half maps written into the folder."""
    names = ("particles.star", "half1.mrc", "half2.mrc")
    return ProgramFiles(particles=[args.input], inputs=[args.ref, args.truth],
                        outputs=[os.path.join(args.output, n) for n in names])


def _check_args(args) -> None:
    for name, value in (("--sigma-ang", args.sigma_ang), ("--sigma-shift", args.sigma_shift)):
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"{name} {value}: must be > 0 (to keep poses fixed, do not run this program)")
    if args.iterations < 1:
        raise InputError(f"--iterations {args.iterations}: must be >= 1")
    if args.max_res is not None and not args.max_res > 0:
        raise InputError(f"--max-res {args.max_res}: must be > 0 Å")
    ext = os.path.splitext(args.ref)[1].lower()
    if ext not in (".mrc", ".map", ".npz"):
        raise InputError(f"--ref {args.ref}: give a map (.mrc) or a Gaussian model (.npz)")


def read_reference(path: str, box: int, pixel_A: float, device="cpu") -> np.ndarray:
    """The reference as a map at the particles' ``box`` and pixel (Å).

    Raises:
        InputError: a map of another box or pixel size, not a model file.
    """
    if path.lower().endswith(".npz"):
        from scipion_gsplat.core.splat.model import GaussianModel
        return GaussianModel.load(path).to_map(box, pixel_A, device=device)
    vol, pix = io.read_map(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"--ref {path}: not a cubic 3D map (shape {vol.shape})")
    if vol.shape[0] != box:
        raise InputError(f"--ref {path}: the map is {vol.shape[0]} px, the particles {box} px; resample or "
                         f"re-box the map to the particles' grid ({box} px of {pixel_A:.4g} Å)")
    if pix > 0 and abs(pix - pixel_A) > 0.01 * pixel_A:
        raise InputError(f"--ref {path}: the map's pixel is {pix:.4g} Å, the particles' {pixel_A:.4g} Å; "
                         f"resample the map to the particles' pixel")
    if not np.isfinite(vol).all():
        raise InputError(f"--ref {path}: the map has NaN or infinite values")
    return vol.astype(np.float32)


def _truth_errors(path, star, poses, origins_A) -> dict:
    from scipion_gsplat.core.poses.rotations import pose_errors
    with np.load(path) as g:
        if "true_angles_deg" not in g or len(g["true_angles_deg"]) != len(star):
            raise InputError(f"--truth {path}: no true poses for {len(star)} particles")
        true = geometry.euler_to_matrix(*g["true_angles_deg"].T)
        return pose_errors(poses, true, origins_A, g["true_origins_A"], star.pixel_size)


def main(args) -> None:
    _check_args(args)
    device = setup_runtime(args)
    t0 = time.time()
    star, reader = read_posed_particles(args)
    box, pix = star.box_size, star.pixel_size
    reference = read_reference(args.ref, box, pix, device)
    work = working_box(args.resize, box, pix)
    data = load_spectra(star, reader, work, device, progress=Progress("reading particles"))
    search = LocalSearch(sigma_ang_deg=args.sigma_ang, sigma_shift_A=args.sigma_shift * pix,
                         mode=args.mode, max_res_A=args.max_res)
    print(f"gsplat_refine_poses: {len(star)} particles, working box {work} px ({data.pixel_size_A:.3g} Å), "
          f"σ {args.sigma_ang:g}° / {args.sigma_shift:g} px, {args.mode}, {args.iterations} pass(es)", flush=True)
    if args.truth:
        before = _truth_errors(args.truth, star, star.poses(), star.shifts_A())
    update, maps, info = refine_iteratively(data, fourier_crop_map(reference, work), search, args.iterations,
                                            progress=lambda msg: print("  " + msg, flush=True))
    origins = star.shifts_A() + update.delta_origin_A
    parts = with_poses(star, data.poses, origins).particles
    change = parts["rlnGsplatAngleChange"].to_numpy(float)
    parts["rlnGsplatAngularSD"] = update.angular_sd_deg
    parts["rlnGsplatShiftSD"] = update.shift_sd_A / pix
    parts["rlnGsplatLogEvidence"] = update.log_evidence
    os.makedirs(args.output, exist_ok=True)
    io.write_particles(os.path.join(args.output, "particles.star"), star, parts)
    if len(maps) == 2:
        for k in range(2):
            io.write_map(os.path.join(args.output, f"half{k + 1}.mrc"), maps[k], data.pixel_size_A)
    shift_px = np.linalg.norm(update.delta_origin_A, axis=1) / pix
    print(f"gsplat_refine_poses: median angle change {np.median(change):.2f}°, median shift change "
          f"{np.median(shift_px):.2f} px, median posterior SD {np.median(update.angular_sd_deg):.2f}° / "
          f"{np.median(update.shift_sd_A) / pix:.2f} px (reference scale {info['reference_scale']:.3g}), "
          f"{time.time() - t0:.1f} s", flush=True)
    if args.truth:
        after = _truth_errors(args.truth, star, data.poses, origins)
        print(f"gsplat_refine_poses: truth RMS angle {before['rms_angle_deg']:.2f}° → "
              f"{after['rms_angle_deg']:.2f}°, RMS shift {before['rms_shift_px']:.2f} → "
              f"{after['rms_shift_px']:.2f} px", flush=True)


run = console_entry("gsplat_refine_poses", DESCRIPTION, add_args, main, files=program_files)

if __name__ == "__main__":
    run()
