"""Shared command-line plumbing of the gsplat programs.

Every program gets ``--seed``, ``--device``, ``--threads`` and ``--verbose``;
bad input (:class:`~scipion_gsplat.core.io.InputError`, a missing file, a bad
value) ends the program with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.particle_spectra import working_box  # noqa: F401  (re-exported for the programs)

EXIT_BAD_INPUT = 2


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every program has."""
    g = parser.add_argument_group("common options")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda if available)")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (default: 0 = all available cores)")
    g.add_argument("-v", "--verbose", action="store_true", help="print more progress information")


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; checks the name."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise InputError(f"--device {name}: use cpu, cuda, cuda:N or auto")
    return name


def setup_runtime(args) -> str:
    """Apply ``--threads`` and ``--seed``; return the resolved device."""
    import numpy as np
    import torch
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % (2 ** 32))
    return resolve_device(args.device)


class Progress:
    """Prints ``label: done/total (pct%) elapsed`` about every 10 % (or every
    ``min_seconds``), so long loops show they are alive in Scipion's log."""

    def __init__(self, label: str, stream=None, min_seconds: float = 10.0):
        self.label = label
        self.stream = stream or sys.stdout
        self.t0 = time.time()
        self.last_pct = -10.0
        self.last_time = self.t0
        self.min_seconds = min_seconds

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        now = time.time()
        if pct - self.last_pct >= 10.0 or now - self.last_time >= self.min_seconds or done == total:
            self.last_pct, self.last_time = pct, now
            print(f"  {self.label}: {done}/{total} ({pct:.0f}%) {now - self.t0:.1f} s",
                  file=self.stream, flush=True)


def make_parser(prog: str, description: str, add_args: Callable) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_args(parser)
    add_common_args(parser)
    return parser


def run_program(prog: str, description: str, add_args: Callable, main: Callable,
                argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, run ``main(args)``, turn bad input into a one-line error.

    Returns:
        the exit code (0 on success, 2 on bad input).
    """
    parser = make_parser(prog, description, add_args)
    args = parser.parse_args(argv)
    try:
        main(args)
    except (InputError, FileNotFoundError) as exc:
        if getattr(args, "verbose", False):
            import traceback
            traceback.print_exc()
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


def console_entry(prog: str, description: str, add_args: Callable, main: Callable) -> Callable:
    """A ``run(argv=None)`` function suitable for a console-script entry point."""
    def run(argv: Optional[Sequence[str]] = None) -> int:
        code = run_program(prog, description, add_args, main, argv)
        if argv is None:  # called as a script: exit with the code
            sys.exit(code)
        return code
    run.__doc__ = f"Entry point of ``{prog}``: returns (or exits with) the exit code."
    return run


def read_posed_particles(path: str, angpix=None, need_ctf: bool = False):
    """Read a particle STAR file that must carry poses (and CTF if ``need_ctf``),
    and check its image stacks.

    Returns:
        ``(ParticleStar, ImageReader)``.
    """
    from scipion_gsplat.core import io
    star = io.read_particles(path, pixel_size_A=angpix)
    if not star.has_poses:
        raise InputError(f"{path}: particles have no poses (rlnAngleRot/Tilt/Psi)")
    if need_ctf and not star.has_ctf:
        raise InputError(f"{path}: particles have no CTF parameters")
    reader = io.ImageReader(star)
    reader.check()
    return star, reader


def out_path(path: str) -> str:
    """Create the parent folder of an output path and return it."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return path
