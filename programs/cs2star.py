"""gsplat_cs2star: a CryoSPARC particle ``.cs`` file as a RELION 3.1 particle STAR file.

Example::

    gsplat_cs2star -i P3/J42/J42_005_particles.cs -o particles.star --project-dir /data/cryosparc/P3
    gsplat_cs2star -i J42_particles_selected.cs --passthrough J42_passthrough_particles_selected.cs \\
        -o selected.star

Converts poses (``alignments3D/pose`` rotation vectors → RELION Euler angles,
``alignments3D/shift`` px → ``rlnOriginX/YAngst``), CTF (radians → degrees), class
(0-based → ``rlnClassNumber`` 1-based), class posterior (→ ``rlnMaxValueProbDistribution``),
half sets (``split`` 0/1 → ``rlnRandomSubset`` 1/2) and pixel sizes (one optics group per
pixel size, box, voltage, Cs, amplitude contrast and exposure group). Every other field
(``uid``, locations, …) is kept in ``cs/<field>`` columns, so ``gsplat_star2cs`` gives the
same ``.cs`` back.

Contrast: CryoSPARC extracts particles dark (``blob/sign`` −1) and flips them when it
reads them; gsplat programs (and RELION) expect the map's contrast. Images with sign −1
are therefore written negated into ``<output>_stacks/`` (``--contrast keep`` skips this).
``.mrc`` stacks are referred to through ``.mrcs`` links there, as RELION needs.
"""
from __future__ import annotations

import os

from scipion_gsplat.core import cryosparc
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.safety import ProgramFiles

from ._cli import console_entry

DESCRIPTION = "Convert a CryoSPARC particle .cs file into a RELION 3.1 particle STAR file."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True,
                        help="CryoSPARC particle .cs file (e.g. J42/J42_005_particles.cs or an export)")
    parser.add_argument("-o", "--output", required=True, help="output particle STAR file")
    parser.add_argument("--project-dir", default=None,
                        help="CryoSPARC project folder (holds the J*/ job folders): image paths "
                             "(blob/path) are relative to it; default: found from the .cs file's folder "
                             "and its parents")
    parser.add_argument("--passthrough", nargs="+", default=[], metavar="P.cs",
                        help="passthrough .cs files of the same job (e.g. J42_passthrough_particles.cs): "
                             "their extra fields (CTF, locations, …) are merged by uid")
    parser.add_argument("--contrast", choices=("flip", "keep"), default="flip",
                        help="flip: images with blob/sign -1 (protein dark, as CryoSPARC extracts them) are "
                             "written negated (map contrast, as gsplat programs and RELION expect) into the "
                             "stack folder; keep: use the images as they are (disk space: none)")
    parser.add_argument("--stack-dir", default=None,
                        help="folder for negated stacks and .mrcs links (default: <output name>_stacks "
                             "beside the output)")
    parser.add_argument("--no-links", action="store_true",
                        help="refer to .mrc stacks directly instead of through .mrcs links "
                             "(gsplat programs read both; RELION reads n@stack only from .mrcs)")


def program_files(args) -> ProgramFiles:
    """The .cs files read (the stacks they name are checked by the converter); the STAR written."""
    return ProgramFiles(inputs=[args.input, *args.passthrough], outputs=[args.output])


def main(args) -> None:
    if not args.output.lower().endswith(".star"):
        raise InputError(f"--output {args.output}: give a .star file name")
    if args.project_dir is not None and not os.path.isdir(args.project_dir):
        raise InputError(f"--project-dir {args.project_dir}: not a folder")
    s = cryosparc.convert_cs_to_star(args.input, args.output, project_dir=args.project_dir,
                                     passthrough=args.passthrough, contrast=args.contrast,
                                     links=not args.no_links, stack_dir=args.stack_dir)
    print(f"gsplat_cs2star: {s['particles']} particles, {s['optics_groups']} optics group(s), "
          f"{'with' if s['poses'] else 'without'} poses, {'with' if s['ctf'] else 'without'} CTF; "
          f"{s['flipped']} images contrast-flipped into {s['flipped_stacks']} stack(s), "
          f"{s['links']} .mrcs link(s)", flush=True)
    print(f"gsplat_cs2star: wrote {args.output}", flush=True)


run = console_entry("gsplat_cs2star", DESCRIPTION, add_args, main, files=program_files)

if __name__ == "__main__":
    run()
