"""gsplat_star2cs: a RELION particle STAR file (ours or RELION's) as a CryoSPARC ``.cs`` file.

Example::

    gsplat_star2cs -i split/classes.star -o classes.cs
    gsplat_star2cs -i particles.star -o particles.cs --project-dir /data/cryosparc/P3

Writes poses (RELION Euler angles → ``alignments3D/pose`` rotation vectors, origins Å →
``alignments3D/shift`` px), CTF (degrees → radians), ``rlnClassNumber`` →
``alignments3D/class`` (0-based), the class probability (``rlnGsplatClassProbability``,
else ``rlnMaxValueProbDistribution``) → ``alignments3D/class_posterior``, ``rlnRandomSubset``
→ ``alignments3D/split`` and pixel size/box → ``blob/*``, for CryoSPARC's "Import Result
Group" or "Import Particle Stack". Particles that came from ``gsplat_cs2star`` get their
CryoSPARC ``uid``, image path/index and ``blob/sign`` back (when they still show the same
images), so CryoSPARC recognises them; other images are written as they are (sign +1, the
map's contrast).

No column is dropped: every STAR column without a ``.cs`` home (micrograph names,
coordinates, scores, …) is kept as a ``.cs`` field ``relion/<column>``; ``gsplat_cs2star``
turns them back into the same columns.
"""
from __future__ import annotations

import os

from scipion_gsplat.core import cryosparc
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.safety import ProgramFiles

from ._cli import add_particle_args, console_entry, read_star

DESCRIPTION = "Convert a RELION particle STAR file into a CryoSPARC .cs file."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="particle STAR file (RELION 3.0-5 or a gsplat output)")
    parser.add_argument("-o", "--output", required=True, help="output .cs file")
    parser.add_argument("--project-dir", default=None,
                        help="CryoSPARC project folder: stacks inside it are written as '>relative/path' "
                             "(default: absolute paths)")
    add_particle_args(parser)


def program_files(args) -> ProgramFiles:
    """The particles (and their stacks) read; the .cs written."""
    return ProgramFiles(particles=[args.input], outputs=[args.output])


def main(args) -> None:
    if not args.output.lower().endswith(".cs"):
        raise InputError(f"--output {args.output}: give a .cs file name")
    if args.project_dir is not None and not os.path.isdir(args.project_dir):
        raise InputError(f"--project-dir {args.project_dir}: not a folder")
    star = read_star(args.input, args)
    s = cryosparc.convert_star_to_cs(args.input, args.output, project_dir=args.project_dir, star=star)
    kept = f"; kept as relion/ fields: {', '.join(s['relion_fields'])}" if s["relion_fields"] else ""
    print(f"gsplat_star2cs: {s['particles']} particles, {s['fields']} fields{kept}", flush=True)
    print(f"gsplat_star2cs: wrote {args.output}", flush=True)


run = console_entry("gsplat_star2cs", DESCRIPTION, add_args, main, files=program_files)

if __name__ == "__main__":
    run()
