"""gsplat_aligned_2d_classification: per-direction 2D classification of posed particles.

Example::

    gsplat_aligned_2d_classification -i particles.star -o classify --angular-sampling 7.5

Groups the particles by projection direction (cones on a grid folded to a
hemisphere and the symmetry's asymmetric unit), aligns each group in-plane
(swing-twist), corrects the CTF, computes a masked PCA per direction and fits a
2-component GMM to the first coordinate. Writes ``directions.star``,
``pairs.star`` (coordinate and log-likelihood ratio of every (particle,
direction) pair), ``eigen_images.mrcs``, ``mean_images.mrcs`` and
``side_averages.mrcs``. The particles are read once, in chunks.
"""
from __future__ import annotations

import os
import time

import numpy as np

from scipion_gsplat.core import io
from scipion_gsplat.core.fourier import project
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.particle_spectra import fourier_crop
from scipion_gsplat.core.safety import ProgramFiles
from scipion_gsplat.core.split_volume import align, classify2d, directions, files
from scipion_gsplat.core.symmetry import normalize_symmetry_name

from ._cli import Progress, add_particle_args, console_entry, read_posed_particles, setup_runtime, working_box

DESCRIPTION = "Per-direction masked PCA + GMM of particles with known poses (split-volume step 1)."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="particles STAR file with poses and CTF")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--mask", help="3D mask (MRC, same box as the particles) projected per direction; "
                                       "default: a disc of --radius")
    parser.add_argument("--radius", type=float, default=None,
                        help="disc mask radius in Å (default: 45%% of the box)")
    parser.add_argument("--sym", default="c1", help="point-group symmetry")
    parser.add_argument("--angular-sampling", type=float, default=7.5, help="direction grid spacing (degrees)")
    parser.add_argument("--cone", type=float, default=None,
                        help="cone radius in degrees (default 1.25 × angular sampling)")
    parser.add_argument("--resize", type=int, default=0,
                        help="downsample images to this box (0: auto, pixel ≈ 3 Å, at most the box)")
    parser.add_argument("--no-hemisphere", action="store_true",
                        help="do not fold opposite directions (mirror views) together")
    parser.add_argument("--wiener-eps", type=float, default=0.1, help="ε of the CTF correction CTF/(CTF²+ε)")
    parser.add_argument("--min-particles", type=int, default=10,
                        help="directions with fewer particles get no weight")
    add_particle_args(parser)


def projected_masks(mask_path: str, star_box: int, pixel_size_A: float, dirs: np.ndarray,
                    new_box: int) -> np.ndarray:
    """Project a 3D mask along every direction, downsample, binarise at half maximum."""
    import torch
    from scipion_gsplat.core.fourier import image_irfft, image_rfft
    vol, _ = io.read_map(mask_path)
    if vol.shape != (star_box,) * 3:
        raise InputError(f"mask {mask_path} has shape {vol.shape}, the particles are {star_box} px")
    if vol.max() <= 0:
        raise InputError(f"mask {mask_path} is empty")
    proj = project(vol, directions.direction_reference_poses(dirs), pixel_size_A)
    small = image_irfft(fourier_crop(image_rfft(torch.from_numpy(proj)), star_box, new_box), new_box).numpy()
    peak = small.reshape(len(small), -1).max(1)
    return small >= 0.5 * peak[:, None, None]


def program_files(args) -> ProgramFiles:
    """The particles and mask read; the classification files written into the output folder."""
    names = (files.DIRECTIONS, files.PAIRS, "eigen_images.mrcs", "mean_images.mrcs", "side_averages.mrcs")
    return ProgramFiles(particles=[args.input], inputs=[args.mask],
                        outputs=[os.path.join(args.output, n) for n in names])


def main(args) -> None:
    device = setup_runtime(args)
    t0 = time.time()
    symmetry = normalize_symmetry_name(args.sym)
    star, reader = read_posed_particles(args)
    box, pix = star.box_size, star.pixel_size
    new_box = working_box(args.resize, box, pix)
    groups = directions.group_particles(star.poses(), args.angular_sampling, args.cone, symmetry,
                                        hemisphere=not args.no_hemisphere)
    counts = groups.counts()
    print(f"gsplat_aligned_2d_classification: {len(star)} particles, {groups.n_directions} directions, "
          f"{np.median(counts):.0f} particles per direction (median), box {box} -> {new_box}", flush=True)
    masks = None
    if args.mask:
        masks = projected_masks(args.mask, box, pix, groups.directions, new_box)
    images = align.prepare_images(star, reader, new_box, args.wiener_eps, device=device,
                                  progress=Progress("reading particles"))
    radius_px = None if args.radius is None else args.radius / (pix * box / new_box)
    result = classify2d.classify_directions(images, groups, masks, radius_px, args.min_particles,
                                            args.seed, progress=Progress("classifying directions"))
    files.write_classification(args.output, groups, result, pix * box / new_box)
    good = int((result.bimodality > 2).sum())
    print(f"gsplat_aligned_2d_classification: {good}/{groups.n_directions} directions bimodal "
          f"(balanced separation > 2), {result.info['skipped_directions']} skipped (< {args.min_particles} "
          f"particles), {time.time() - t0:.1f} s", flush=True)


run = console_entry("gsplat_aligned_2d_classification", DESCRIPTION, add_args, main, files=program_files)

if __name__ == "__main__":
    run()
