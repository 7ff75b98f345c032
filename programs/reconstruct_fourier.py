"""gsplat_reconstruct_fourier: Fourier reconstruction with half maps and FSC.

Example::

    gsplat_reconstruct_fourier -i particles.star -o map.mrc --halves --sym c1

Writes ``map.mrc``; with ``--halves`` also ``map_half1.mrc``, ``map_half2.mrc``
and ``map_fsc.star`` (RELION-style FSC table). Half sets come from
``rlnRandomSubset`` (alternating rows when the column is missing).

Several ranks (``torchrun``, ``srun``, ``mpirun``) share the back-projection
and the solves. With an even number of ranks and half sets of similar sizes,
half of the ranks back-project half set 1 and the others half set 2: each rank
then holds one half set's sums (about 0.8 GB at 256 px instead of 1.6 GB).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from scipion_gsplat.core import distributed, io
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.reconstruct import reconstruct_particles
from scipion_gsplat.core.safety import ProgramFiles
from scipion_gsplat.core.symmetry import normalize_symmetry_name

from ._cli import Progress, add_particle_args, console_entry, read_posed_particles, setup_runtime

DESCRIPTION = "Reconstruct a map (CTF-corrected, half maps, FSC) from particles with known poses."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="particles STAR file (RELION 3.0/3.1) with poses")
    parser.add_argument("-o", "--output", required=True, help="output map (.mrc)")
    parser.add_argument("--halves", action="store_true", help="also write half maps and the FSC table")
    parser.add_argument("--sym", default="c1", help="point-group symmetry (c1, cN, dN, t, o, i)")
    parser.add_argument("--class", dest="class_number", type=int, default=None,
                        help="use only particles with this rlnClassNumber")
    parser.add_argument("--maxres", type=float, default=None, help="highest resolution to use (Å)")
    add_particle_args(parser)
    parser.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
    parser.add_argument("--wiener", action="store_true",
                        help="Wiener-regularise with the SSNR measured from the half maps")
    parser.add_argument("--tau2-fudge", type=float, default=1.0, help="SSNR multiplier for --wiener")
    parser.add_argument("--chunk", type=int, default=256, help="images read and inserted per batch")


def fsc_table(freq: np.ndarray, fsc: np.ndarray) -> pd.DataFrame:
    """RELION-style FSC table (``rlnResolution`` in 1/Å)."""
    with np.errstate(divide="ignore"):
        angst = np.where(freq > 0, 1.0 / np.maximum(freq, 1e-12), 999.0)
    return pd.DataFrame({"rlnSpectralIndex": np.arange(len(freq)), "rlnResolution": freq,
                         "rlnAngstromResolution": angst, "rlnFourierShellCorrelation": fsc})


def output_names(output: str) -> dict:
    """Paths of every file the program writes for ``-o output``."""
    root = output[:-4] if output.lower().endswith(".mrc") else output
    return {"map": root + ".mrc", "half1": root + "_half1.mrc", "half2": root + "_half2.mrc",
            "fsc": root + "_fsc.star"}


def program_files(args) -> ProgramFiles:
    """The particles read; the map (and half maps and FSC with ``--halves``) written."""
    names = output_names(args.output)
    keys = ("map", "half1", "half2", "fsc") if args.halves else ("map",)
    return ProgramFiles(particles=[args.input], outputs=[names[k] for k in keys])


def main(args) -> None:
    device = setup_runtime(args)
    world = distributed.init(device)
    device = distributed.rank_device(device, world)
    symmetry = normalize_symmetry_name(args.sym)
    star, _ = read_posed_particles(args)
    if not args.no_ctf and not star.has_ctf:
        raise InputError(f"{args.input}: particles have no CTF parameters (use --no-ctf to ignore the CTF)")
    rows = None
    if args.class_number is not None:
        if "rlnClassNumber" not in star.particles:
            raise InputError(f"{args.input}: no rlnClassNumber column for --class")
        rows = np.flatnonzero(star.particles["rlnClassNumber"].to_numpy(int) == args.class_number)
        if len(rows) < 2:
            raise InputError(f"class {args.class_number} has {len(rows)} particle(s)")
    if args.maxres is not None and args.maxres <= 0:
        raise InputError("--maxres must be positive")
    n = len(star) if rows is None else len(rows)
    ranks = f", {world.size} ranks" if world.size > 1 else ""
    if world.is_main:
        print(f"gsplat_reconstruct_fourier: {n} particles, symmetry {symmetry}, device {device}{ranks}",
              flush=True)
    rec = reconstruct_particles(star, symmetry=symmetry, device=device, wiener=args.wiener,
                                fudge=args.tau2_fudge, chunk_size=args.chunk, rows=rows,
                                progress=Progress("back-projecting") if world.is_main else None,
                                use_ctf=not args.no_ctf, maxres_A=args.maxres, world=world)
    if not world.is_main:  # rank 0 solves and writes
        return
    names = output_names(args.output)
    os.makedirs(os.path.dirname(os.path.abspath(names["map"])), exist_ok=True)
    io.write_map(names["map"], rec.full, rec.pixel_size_A)
    if args.halves:
        io.write_map(names["half1"], rec.half1, rec.pixel_size_A)
        io.write_map(names["half2"], rec.half2, rec.pixel_size_A)
        io.write_star(names["fsc"], {"fsc": fsc_table(rec.frequency, rec.fsc)})
    by_half = (f" ({rec.half_set_ranks} rank{'s' if rec.half_set_ranks > 1 else ''} on each half set)"
               if rec.half_set_ranks else "")
    print(f"gsplat_reconstruct_fourier: half sets {rec.n_half[0]} + {rec.n_half[1]} particles{by_half}, "
          f"resolution {rec.resolution_A(0.143):.2f} Å (FSC 0.143), "
          f"{rec.resolution_A(0.5):.2f} Å (FSC 0.5), {rec.seconds:.1f} s", flush=True)
    print(f"gsplat_reconstruct_fourier: wrote {names['map']}", flush=True)


run = console_entry("gsplat_reconstruct_fourier", DESCRIPTION, add_args, main, files=program_files,
                    ranks=True)

if __name__ == "__main__":
    run()
