"""gsplat_project: particle images of a Gaussian model or a map at the poses of a STAR file.

Example::

    gsplat_project -i model.npz --star particles.star -o projections.mrcs
    gsplat_project -i map.mrc --star particles.star -o noisy.mrcs --snr 0.1 --device cuda

Renders every particle's pose, origin and CTF (Gaussian models analytically with
the splat renderer, maps with the Fourier projector — the same origin/CTF code
path) and writes the stack plus a STAR file beside it (``projections.star``,
the input rows pointing at the new images). ``--snr`` adds white Gaussian noise
(variance = mean per-image variance of the clean projections / SNR, as
``gsplat_simulate``). Prints the throughput (images per second).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from scipion_gsplat.core import io
from scipion_gsplat.core.ctf import select_params
from scipion_gsplat.core.fourier import project as project_map
from scipion_gsplat.core.io import InputError, ParticleStar
from scipion_gsplat.core.safety import ProgramFiles
from scipion_gsplat.core.splat.model import GaussianModel
from scipion_gsplat.core.splat.render import DEFAULT_MAX_ELEMENTS, project_model

from ._cli import Progress, add_particle_args, console_entry, read_posed_particles, setup_runtime

DESCRIPTION = "Project a Gaussian model (.npz) or a map (.mrc) at the poses, origins and CTFs of a STAR file."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="Gaussian model (.npz) or map (.mrc)")
    parser.add_argument("--star", required=True, help="particles STAR file with poses (and CTF)")
    parser.add_argument("-o", "--output", required=True, help="output stack (.mrcs); a .star is written beside it")
    parser.add_argument("--out-star", default=None, help="output STAR file (default: stack name with .star)")
    parser.add_argument("--box", type=int, default=None,
                        help="image size (px) for a model when the STAR gives none (default: from the STAR)")
    add_particle_args(parser)
    parser.add_argument("--no-ctf", action="store_true", help="do not apply the CTF")
    parser.add_argument("--no-shifts", action="store_true", help="ignore the particles' origins")
    parser.add_argument("--snr", type=float, default=None, help="add white noise at this SNR (default: none)")
    parser.add_argument("--chunk", type=int, default=512, help="images projected and written per chunk")
    parser.add_argument("--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS,
                        help="memory bound of the model renderer (values per micro-batch)")


def _box_and_pixel(star: ParticleStar, args, source_box) -> tuple[int, float]:
    pix = star.pixel_size
    declared = star.particles["rlnImageSize"].to_numpy(int)
    box = args.box or (star.box_size if (declared > 0).all() else None) or source_box
    if box is None:
        raise InputError(f"{args.star}: no rlnImageSize; give --box")
    if source_box is not None and box != source_box:
        raise InputError(f"the map is {source_box} voxels but the images are {box} pixels")
    return int(box), pix


def output_star(args) -> str:
    """The STAR file written beside the stack."""
    return args.out_star or os.path.splitext(args.output)[0] + ".star"


def program_files(args) -> ProgramFiles:
    """The model/map and particles read; the stack and its STAR file written."""
    return ProgramFiles(particles=[args.star], inputs=[args.input], outputs=[args.output, output_star(args)])


def main(args) -> None:
    device = setup_runtime(args)
    if args.snr is not None and not args.snr > 0:
        raise InputError("--snr must be positive")
    if args.chunk < 1:
        raise InputError("--chunk must be at least 1")
    star, _ = read_posed_particles(args, path=args.star, images=False)
    if not args.no_ctf and not star.has_ctf:
        raise InputError(f"{args.star}: particles have no CTF parameters (use --no-ctf)")
    suffix = Path(args.input).suffix.lower()
    if suffix == ".npz":
        model, volume, source_box = GaussianModel.load(args.input), None, None
        if len(model) == 0:
            raise InputError(f"{args.input}: the Gaussian model is empty")
    elif suffix in (".mrc", ".map"):
        volume, vpix = io.read_map(args.input)
        model, source_box = None, volume.shape[-1]
        if abs(vpix - star.pixel_size) > 1e-3 * star.pixel_size:
            raise InputError(f"{args.input}: pixel size {vpix:.3f} Å, particles {star.pixel_size:.3f} Å")
    else:
        raise InputError(f"{args.input}: give a Gaussian model (.npz) or a map (.mrc)")
    box, pix = _box_and_pixel(star, args, source_box)
    n = len(star)
    poses = star.poses()
    shifts = None if args.no_shifts else star.shifts_A()
    ctf = None if args.no_ctf else star.ctf_params()

    def render(rows: np.ndarray) -> np.ndarray:
        sh = None if shifts is None else shifts[rows]
        cp = None if ctf is None else select_params(ctf, rows)
        if model is not None:
            return project_model(model, poses[rows], pix, box, sh, cp, device=device,
                                 max_elements=args.max_elements)
        return project_map(volume, poses[rows], pix, sh, cp, device=device)

    rng = np.random.default_rng(args.seed)
    sigma = 0.0
    if args.snr is not None:
        probe = np.sort(rng.choice(n, size=min(n, 256), replace=False))
        signal_var = float(np.mean(np.var(render(probe), axis=(1, 2))))
        sigma = float(np.sqrt(signal_var / args.snr))
    out_star = output_star(args)
    kind = f"{len(model)} Gaussians" if model is not None else f"map {box}³"
    print(f"gsplat_project: {n} images of {kind}, box {box} px at {pix} Å, device {device}"
          + (f", noise σ {sigma:.4g} (SNR {args.snr})" if sigma else ""), flush=True)
    progress = Progress("projecting")
    t_render, t0 = 0.0, time.time()
    with io.StackWriter(args.output, n, box, pix) as writer:
        for s in range(0, n, args.chunk):
            rows = np.arange(s, min(n, s + args.chunk))
            t1 = time.time()
            imgs = render(rows)
            t_render += time.time() - t1
            if sigma > 0:
                imgs = imgs + rng.normal(0.0, sigma, imgs.shape).astype(np.float32)
            writer.write(s, imgs)
            progress(rows[-1] + 1, n)
    stack_rel = os.path.relpath(os.path.abspath(args.output), os.path.dirname(os.path.abspath(out_star)))
    parts = star.particles.copy()
    parts["rlnImageName"] = [f"{i + 1:06d}@{stack_rel}" for i in range(n)]
    parts["rlnImageSize"], parts["rlnImagePixelSize"] = box, pix  # the new images' grid
    if "rlnCtfDataAreCtfPremultiplied" in parts:
        parts["rlnCtfDataAreCtfPremultiplied"] = 0
    io.write_particles(out_star, star, parts)  # the input's rows and columns, new image names
    total = time.time() - t0
    print(f"gsplat_project: {n / max(t_render, 1e-9):.1f} images/s projecting, "
          f"{n / max(total, 1e-9):.1f} images/s with writing ({total:.1f} s)", flush=True)
    print(f"gsplat_project: wrote {args.output} and {out_star}", flush=True)


run = console_entry("gsplat_project", DESCRIPTION, add_args, main, files=program_files)

if __name__ == "__main__":
    run()
