"""gsplat_refine_classes: pool the evidence in 3D — residual eigenvolume and two-class refinement.

Examples::

    gsplat_refine_classes -i graph/particles.star -o refine/            # refine the graph's split
    gsplat_refine_classes -i particles.star -o pooled/ --init pooled    # no starting split needed
    gsplat_refine_classes -i graph/particles.star -o both/ --init both  # pooled if supported, else refined

``--init column`` refines ``rlnClassNumber`` with two free class maps (EM,
fixed poses); ``--init pooled`` takes the leading eigenvolume of the residuals
against the consensus map (low-passed, masked) and classifies each particle's
coordinate on it with a two-class mixture that knows each coordinate's noise
(weak for views in which the difference projects weakly); ``--init both`` does
both and keeps the pooled split when its half-set eigenvolumes agree
(``--support``), the refined column split otherwise. The pooled split is not
refined unless ``--refine-pooled`` (then the likelier refinement is kept).
Writes ``particles.star`` (input rows + ``rlnClassNumber``, probabilities,
score), ``class1.mrc``/``class2.mrc`` (at the working box), ``eigenvolume.mrc``
(pooled), ``mask.mrc`` and ``summary.star`` (support figures and the
refinement history).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd

from scipion_gsplat.core import io, masks
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.particle_spectra import load_spectra
from scipion_gsplat.core.safety import ProgramFiles
from scipion_gsplat.core.split_volume import files, pooled, refine

from ._cli import Progress, add_particle_args, console_entry, read_posed_particles, setup_runtime, working_box

DESCRIPTION = "Two-class 3D refinement with fixed poses and a 3D-pooled (eigenvolume) detector."


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
    parser.add_argument("--support", type=float, default=0.5,
                        help="--init both: half-set eigenvolume agreement needed to prefer the pooled split")
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


def main(args) -> None:
    device = setup_runtime(args)
    t0 = time.time()
    star, reader = read_posed_particles(args)
    if len(star) < 2:  # the two-class mixture needs two particles (measured: 2 run, 1 fails)
        raise InputError(f"{args.input}: {len(star)} particle; a two-class split needs at least 2")
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
    data = load_spectra(star, reader, work, device, progress=Progress("reading particles"))
    consensus, _ = refine._reconstruct(data, np.arange(len(data)), np.ones(len(data)))
    mask = _mask(args, consensus, box, pix, work, data.pixel_size_A)
    log = lambda msg: print("  " + msg, flush=True)  # noqa: E731
    summary = {"working_box": work, "working_pixel_A": data.pixel_size_A}
    starts = {}
    if init in ("column", "both"):
        starts["column"] = np.eye(2)[col - 1]
    pool = None
    if init in ("pooled", "both"):
        pool = pooled.pooled_split(data, consensus, mask, args.lowpass, args.eigen_iterations,
                                   seed=args.seed, progress=log)
        starts["pooled"] = pool.probabilities
        summary.update(pooled_half_agreement=pool.half_agreement, pooled_bimodality=pool.bimodality,
                       pooled_eigenvalue=pool.eigenvalue)
        print(f"gsplat_refine_classes: eigenvolume half-set agreement {pool.half_agreement:.3f}, "
              f"bimodality {pool.bimodality:.2f}, classes {np.bincount(pool.classes, minlength=3)[1:].tolist()}",
              flush=True)
    results = {}
    for name, q0 in starts.items():
        if args.iterations > 0 and (name == "column" or args.refine_pooled):
            print(f"gsplat_refine_classes: refining from the {name} split", flush=True)
            results[name] = refine.refine_two_classes(data, q0, args.iterations, not args.hard, args.max_res,
                                                      consensus, cross=args.cross, fudge=args.tau2_fudge,
                                                      progress=log)
    # every start's split: refined, or as it started (class maps made below)
    final = {name: (results[name].probabilities, results[name].classes, results[name].maps)
             if name in results else (q0, np.argmax(q0, 1) + 1, None) for name, q0 in starts.items()}
    if len(final) == 2:
        if "pooled" in results:  # both refined: the likelier one
            best = max(results, key=lambda k: results[k].total_loglik)
        else:
            best = "pooled" if pool.half_agreement >= args.support else "column"
        a, b = (final[k][1] for k in ("column", "pooled"))
        summary["agreement_between_starts"] = float(max((a == b).mean(), (a != b).mean()))
    else:
        best = next(iter(final))
    prob, classes, maps = final[best]
    summary.update(started_from=best, iterations=len(results[best].history) if best in results else 0)
    if best in results:
        summary["total_loglik"] = results[best].total_loglik
    if maps is None:  # unrefined split: class maps from its probabilities
        maps = np.stack([refine._reconstruct(data, np.arange(len(data)), prob[:, k])[0] for k in range(2)])
    if (classes == 1).sum() < (classes == 2).sum():  # class 1 = the larger class
        classes, prob = 3 - classes, prob[:, ::-1]
        maps = None if maps is None else maps[::-1]
    assigned = prob[np.arange(len(prob)), classes - 1]
    score = np.log(np.clip(prob[:, 0], 1e-300, 1)) - np.log(np.clip(prob[:, 1], 1e-300, 1))
    os.makedirs(args.output, exist_ok=True)
    files.write_classified_particles(os.path.join(args.output, "particles.star"), star, classes,
                                     np.clip(score, -50, 50), assigned)
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


run = console_entry("gsplat_refine_classes", DESCRIPTION, add_args, main, files=program_files)

if __name__ == "__main__":
    run()
