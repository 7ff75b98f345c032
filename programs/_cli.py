"""Shared command-line plumbing of the gsplat programs.

Every program gets ``--seed``, ``--device``, ``--threads`` and ``--verbose``;
bad input (:class:`~scipion_gsplat.core.io.InputError`, a missing file, a bad
value) ends the program with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from typing import Callable, Optional, Sequence

from scipion_gsplat.core import distributed, safety
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.particle_spectra import working_box  # noqa: F401  (re-exported for the programs)

EXIT_BAD_INPUT = 2
# OS errors a user can fix (rights, space, a file where a folder should be): one line, exit 2.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                  errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG}
# Particle STAR files the output guard read, handed to the program's own read (read once).
_GUARD_STARS: dict = {}


def _star_key(path, args) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns, repr(particle_options(args))


def add_particle_args(parser: argparse.ArgumentParser, angpix: bool = True) -> None:
    """The particle-input options of every program that reads a particle STAR file."""
    g = parser.add_argument_group("particle input (RELION STAR files)")
    if angpix:
        g.add_argument("--angpix", type=float, default=None,
                       help="pixel size (Å) of the particle images, for RELION 3.0 files without one "
                            "(replaces the file's value when given)")
    g.add_argument("--data-dir", default=None,
                   help="folder that relative image paths (rlnImageName) are relative to: the RELION "
                        "project folder, e.g. for Extract/job012/Movies/mic001.mrcs (default: the STAR "
                        "file's folder, then the current folder); the names are written out unchanged")
    g.add_argument("--voltage", type=float, default=None,
                   help="acceleration voltage (kV, e.g. 300) for files that have defoci but no rlnVoltage")
    g.add_argument("--cs", type=float, default=None,
                   help="spherical aberration (mm, e.g. 2.7) for files without rlnSphericalAberration")
    g.add_argument("--amplitude-contrast", type=float, default=None,
                   help="amplitude contrast (fraction, typically 0.1; 0.07 for some setups) for files "
                        "without rlnAmplitudeContrast (RELION 3.0)")


def particle_options(args) -> dict:
    """Keyword arguments of :func:`~scipion_gsplat.core.io.read_particles` from the
    options of :func:`add_particle_args` (absent options count as not given)."""
    return {"pixel_size_A": getattr(args, "angpix", None), "data_dir": getattr(args, "data_dir", None),
            "fill": {"rlnVoltage": getattr(args, "voltage", None),
                     "rlnSphericalAberration": getattr(args, "cs", None),
                     "rlnAmplitudeContrast": getattr(args, "amplitude_contrast", None)}}


def read_star(path, args):
    """Read a particle STAR file (:func:`~scipion_gsplat.core.io.read_particles`)
    with the options of :func:`add_particle_args`; the copy the output guard read
    just before is reused instead of reading twice."""
    from scipion_gsplat.core import io
    try:
        star = _GUARD_STARS.pop(_star_key(path, args), None)
    except OSError:
        star = None
    return star if star is not None else io.read_particles(path, **particle_options(args))


def guard_files(args, files: Callable) -> list:
    """Before any work: refuse outputs that would replace an input (the STAR
    files, the image stacks they name, maps, masks, models), create the output
    folders and check they can be written.

    Args:
        files: ``args → safety.ProgramFiles`` of the program.

    Returns:
        the folders created (removed again when the run fails and leaves them empty).
    """
    from scipion_gsplat.core import io
    spec = files(args)
    inputs = [(p, f"the input {p}") for p in spec.inputs if p]
    for path in spec.particles:
        inputs.append((path, f"the input {path}"))
        star = io.read_particles(path, **particle_options(args))
        _GUARD_STARS[_star_key(path, args)] = star
        try:
            stacks = io.ImageReader(star).stack_files()
        except InputError:  # a stack is missing: nothing there to protect; read, it is reported
            stacks = []
        inputs += [(s, f"the image stack {s} named in {path}") for s in stacks]
    safety.check_no_overwrite(inputs, spec.outputs)
    return safety.prepare_outputs(spec.outputs)


def add_memory_args(parser: argparse.ArgumentParser, what: str, sizes: str, initial_map: bool = True) -> None:
    """``--max-memory`` and ``--scratch``: ``what`` stays in RAM under the budget,
    in a scratch file read in chunks above it; ``sizes`` says how big it is.
    ``initial_map``: the program makes a full-box Fourier reconstruction (its
    grids are outside the budget, and the help says how big they are)."""
    from scipion_gsplat.core.spectra_store import DEFAULT_MAX_MEMORY
    g = parser.add_argument_group("memory")
    g.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY,
                   help=f"memory for {what}, e.g. 4G, 500M, 1.5T (binary units). {sizes}. Above the budget "
                        "they are kept in a scratch file and read in chunks on every pass (same results, "
                        "peak memory independent of the number of particles, somewhat slower); the program "
                        "itself needs a few hundred MB more" + (
                            ", and while it makes a Fourier reconstruction (the initial map, before the particles "
                            "are loaded) its 3D grids: about 200 bytes × box³ (3.3 GB at 256 px, 0.4 GB at 128 px)"
                            if initial_map else "") + ". With several ranks (MPI) the budget is per node: "
                        "the ranks of one node share it")
    g.add_argument("--scratch", default=None,
                   help="folder for the scratch file when the particles exceed --max-memory (default: the "
                        "output folder); a hidden .gsplat_cache_* folder is made there and removed at the "
                        "end (also when the run is cancelled; one left by a killed run is removed by the next "
                        "run there). Needs about the size above; a fast local disk helps")


def memory_workspace(args, parent: Optional[str] = None):
    """The :class:`~scipion_gsplat.core.spectra_store.SpectraWorkspace` of
    ``--max-memory`` / ``--scratch`` (a context manager; its scratch folder,
    made on first use in ``parent`` or the output folder, is removed at the end)."""
    from scipion_gsplat.core.spectra_store import SpectraWorkspace, parse_memory
    budget = parse_memory(args.max_memory)
    if args.scratch and not os.path.isdir(args.scratch):
        raise InputError(f"--scratch {args.scratch}: not a folder")
    ranks_here = distributed.local_size()
    if ranks_here > 1:  # the budget is the node's: its ranks share it
        budget //= ranks_here
        if distributed.detect()[0] == 0:
            print(f"  --max-memory {args.max_memory} shared by the {ranks_here} ranks of this node", flush=True)
    return SpectraWorkspace(budget, parent or args.output, log=lambda msg: print("  " + msg, flush=True))


def scratch_parent(args, reader) -> str:
    """The folder for the scratch folder: ``--scratch`` or the output folder,
    never a folder holding the input STAR file or its image stacks (then the
    system's temporary folder, ``$TMPDIR``)."""
    inputs = {os.path.dirname(os.path.realpath(args.input))}
    inputs |= {os.path.dirname(p) for p in reader.stack_files()}
    parent = os.path.realpath(args.scratch or args.output)
    if parent in inputs:
        if args.scratch:
            raise InputError(f"--scratch {args.scratch} holds input files; give another folder")
        import tempfile
        parent = tempfile.gettempdir()
    return parent


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


#: glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: the allocator settings of :func:`keep_freed_memory` (bytes)
ALLOCATOR = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30, "top_pad": 64 << 20}


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory instead of handing it back to the kernel.

    torch allocates and frees temporaries of 8–32 MB in every batch. glibc's
    defaults give such blocks fresh pages (mmap) or return the freed top of the
    heap to the kernel, so every batch page-faults its temporaries in again:
    kernel time was 16 s of the 71 s of a 4,000-particle, 256 px Fourier
    reconstruction. Here blocks up to 32 MB come from the heap, which keeps up to
    1 GB of freed memory for the next batch (peak memory is unchanged: memory in
    use at once is what it is). Same effect as the environment variables
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_``,
    which, when set, are left to rule. Returns False where there is no glibc.
    """
    if any(f"MALLOC_{k.upper()}_" in os.environ for k in ALLOCATOR):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, ALLOCATOR["mmap_threshold"])
    ok &= mallopt(_M_TRIM_THRESHOLD, ALLOCATOR["trim_threshold"])
    ok &= mallopt(_M_TOP_PAD, ALLOCATOR["top_pad"])
    return bool(ok)


def setup_runtime(args) -> str:
    """Apply ``--threads`` and ``--seed`` (and :func:`keep_freed_memory`); return the resolved device."""
    import numpy as np
    import torch
    keep_freed_memory()
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
        try:  # numpy's BLAS and OpenMP too: a rank uses its --threads, not every core (srun sets no OMP_NUM_THREADS)
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:
            pass
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already says
    what the default is (no "(default: 0) (default: 0)") or the option is a
    flag (no "(default: False)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.nargs == 0:  # a flag is off unless given
            return text
        return super()._get_help_string(action)


def make_parser(prog: str, description: str, add_args: Callable) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_HelpFormatter)
    add_args(parser)
    add_common_args(parser)
    return parser


def _one_line_error(prog: str, args, msg: str) -> int:
    if getattr(args, "verbose", False):
        import traceback
        traceback.print_exc()
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def _exit_on_sigterm():
    """Make SIGTERM (``scancel``, a queue's time limit, ``kill``) end the program
    as an exception, so that its clean-up runs (scratch folders, partial files);
    returns the previous handler (None where handlers cannot be set)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None

    def _terminate(signum, frame):
        raise SystemExit(128 + signum)
    return signal.signal(signal.SIGTERM, _terminate)


def run_program(prog: str, description: str, add_args: Callable, main: Callable,
                argv: Optional[Sequence[str]] = None, files: Optional[Callable] = None,
                ranks: bool = False) -> int:
    """Parse ``argv``, check the outputs (:func:`guard_files` with ``files``),
    run ``main(args)``, turn bad input into a one-line error.

    ``ranks``: the program splits its work over several processes (srun,
    torchrun, mpirun; :mod:`scipion_gsplat.core.distributed`). A program without
    it refuses to start as one of several ranks (they would all write the same
    files).

    Returns:
        the exit code (0 on success, 2 on bad input).
    """
    parser = make_parser(prog, description, add_args)
    args = parser.parse_args(argv)
    created, ok = [], False
    previous = _exit_on_sigterm()
    try:
        size = distributed.detect()[1]
        if size > 1 and not ranks:
            raise InputError(f"{prog} runs as one process; it was started as one of {size} "
                             "(srun/mpirun/torchrun): start it once, with --threads for more cores")
        if files is not None:
            created = guard_files(args, files)
        main(args)
        ok = True
    except (InputError, FileNotFoundError) as exc:
        return _one_line_error(prog, args, str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        return _one_line_error(prog, args, f"{exc.strerror or exc}{where}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _GUARD_STARS.clear()
        distributed.shutdown(together=ok)  # ranks leave together after a success
        if not ok:
            safety.remove_empty_folders(created)
    return 0


def console_entry(prog: str, description: str, add_args: Callable, main: Callable,
                  files: Optional[Callable] = None, ranks: bool = False) -> Callable:
    """A ``run(argv=None)`` function suitable for a console-script entry point;
    ``files`` (``args → safety.ProgramFiles``) names what the program reads and
    writes, for :func:`guard_files`; ``ranks``: it runs as several processes
    (see :func:`run_program`)."""
    def run(argv: Optional[Sequence[str]] = None) -> int:
        code = run_program(prog, description, add_args, main, argv, files, ranks)
        if argv is None:  # called as a script: exit with the code
            sys.exit(code)
        return code
    run.__doc__ = f"Entry point of ``{prog}``: returns (or exits with) the exit code."
    return run


def read_posed_particles(args, need_ctf: bool = False, path: Optional[str] = None, images: bool = True):
    """Read the particle STAR file ``path`` (default ``args.input``) with the
    options of :func:`add_particle_args`; it must carry poses (and CTF if
    ``need_ctf``). With ``images``: refuse CTF-premultiplied images, check the
    stacks in O(rows) and say how optics groups of different pixel or box sizes
    are brought to one grid.

    Returns:
        ``(ParticleStar, ImageReader or None)``.
    """
    from scipion_gsplat.core import io
    path = args.input if path is None else path
    star = read_star(path, args)
    if not star.has_poses:
        raise InputError(f"{path}: particles have no poses (rlnAngleRot/Tilt/Psi)")
    if need_ctf and not star.has_ctf:
        raise InputError(f"{path}: particles have no CTF parameters (rlnDefocusU)")
    if not images:
        return star, None
    p = star.particles
    if "rlnCtfDataAreCtfPremultiplied" in p and (p["rlnCtfDataAreCtfPremultiplied"].to_numpy(float) != 0).any():
        raise InputError(f"{path}: the images are CTF-premultiplied (rlnCtfDataAreCtfPremultiplied 1); "
                         f"re-extract the particles without premultiplication")
    reader = io.ImageReader(star)
    reader.check()
    note = star.grid_note()
    if note:
        print(f"  {note}", flush=True)
    return star, reader
