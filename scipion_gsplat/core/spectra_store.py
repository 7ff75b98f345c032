"""Per-particle arrays kept in RAM or in a scratch file, under a memory budget.

Iterative methods (two-class refinement, residual eigenvolumes, local pose
searches) read every particle's working-box spectrum and CTF many times. At
10⁵–10⁶ particles those arrays no longer fit in memory, so a
:class:`SpectraWorkspace` decides from a byte budget (``--max-memory``) where
they live:

* under the budget: ordinary torch tensors (fastest);
* over it: a :class:`DiskArray` — one file per array in a private scratch
  folder (removed at the end), read and written by rows with ``os.preadv`` /
  ``os.pwritev``. Reading allocates only the rows asked for; file pages sit in
  the kernel's page cache, which is not counted in the process's resident
  memory, so the peak RSS does not grow with the number of particles.

:class:`DiskArray` answers the part of the tensor API the consumers use:
``a[idx]`` (``idx`` a torch/numpy integer index, a list, a slice or an int)
returns a tensor on the array's device, ``a[idx] = value`` writes rows back,
``.shape``, ``.dtype`` (torch), ``.device``, ``len(a)``, ``clone()`` (a new file)
and :meth:`DiskArray.take` (a view of some rows, no copy).

Sizes: a working box ``m`` costs ``m·(m//2+1)·8`` bytes per particle for the
complex64 spectrum and ``·4`` for the float32 CTF (12 bytes per rfft pixel):
at ``m = 64``, 25 kB per particle, 25 GB per million.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .io import InputError

#: default of ``--max-memory``
DEFAULT_MAX_MEMORY = "2G"  # with the programs' own ~0.5–1 GB, a peak under 4 GB (a common per-job --mem)
_UNITS = {"": None, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_TORCH_TO_NUMPY = {torch.complex64: np.complex64, torch.float32: np.float32, torch.float64: np.float64,
                   torch.complex128: np.complex128, torch.int64: np.int64}


def parse_memory(text: Union[str, int, float]) -> int:
    """A memory size ``"4G"``, ``"512M"``, ``"1.5T"``, ``"800MB"``, ``"2GiB"``
    (binary units: K = 1024 bytes) → bytes. A number needs a unit.

    Raises:
        InputError: not a size, no unit, or not > 0.
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
        if not match:
            raise InputError(f"--max-memory {text!r}: give a size such as 4G, 500M or 1.5T")
        unit = _UNITS[match.group(2).lower()]
        if unit is None:
            raise InputError(f"--max-memory {text}: give a unit, e.g. {text}G or {text}M")
        value = int(float(match.group(1)) * unit)
    if value <= 0:
        raise InputError(f"--max-memory {text}: must be > 0")
    return value


def format_bytes(n: float) -> str:
    """``1536 * 2**20`` → ``'1.50 GB'`` (binary units)."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _as_rows(idx, n: int) -> np.ndarray:
    """Any index of the first axis → ``(R,)`` int64 row numbers in ``0 … n-1``."""
    if isinstance(idx, slice):
        return np.arange(n, dtype=np.int64)[idx]
    if torch.is_tensor(idx):
        idx = idx.detach().cpu().numpy()
    rows = np.asarray(idx)
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise IndexError(f"boolean index of shape {rows.shape} for {n} rows")
        return np.flatnonzero(rows)
    rows = rows.astype(np.int64, copy=False).reshape(-1) if rows.ndim else rows.astype(np.int64).reshape(1)
    rows = np.where(rows < 0, rows + n, rows)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return rows


def _runs(sorted_rows: np.ndarray, max_gap: int) -> list:
    """``[(start, stop), …]`` covering sorted rows where the gaps are at most
    ``max_gap`` rows (one read per run; e.g. alternating half sets are read as
    one span and the other half's rows dropped)."""
    if len(sorted_rows) == 0:
        return []
    cut = np.flatnonzero(np.diff(sorted_rows) > max_gap) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [len(sorted_rows)]])
    return [(int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1) for a, b in zip(starts, stops)]


class _File:
    """An open scratch file, unlinked when the last array using it goes."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self._finalizer = weakref.finalize(self, _release, self.fd, path)

    def release(self) -> None:
        self._finalizer()


def _release(fd: int, path: str) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


class DiskArray:
    """An ``(N, *row_shape)`` array of one dtype in a scratch file.

    Args:
        folder: where the file is created (a unique name; removed when the
            array and its views are garbage-collected, or with the folder).
        shape: ``(N, …)``.
        dtype: a torch dtype (complex64, float32, …).
        device: where rows read are returned.
        fill: optional value every element starts with (default: zeros).
    """

    #: rows whose gap is at most this are read in one span (then dropped)
    MAX_GAP = 3

    def __init__(self, folder: str, shape: Sequence[int], dtype: torch.dtype, device="cpu",
                 fill: Optional[float] = None, _file: Optional[_File] = None,
                 _rows: Optional[np.ndarray] = None):
        self._shape = tuple(int(s) for s in shape)
        self._dtype = dtype
        self._np = np.dtype(_TORCH_TO_NUMPY[dtype])
        self._device = torch.device(device)
        self._row_shape = self._shape[1:]
        self.row_bytes = int(np.prod(self._row_shape, dtype=np.int64)) * self._np.itemsize
        self.folder = folder
        self._rows = _rows  # a view: row i is the file's row _rows[i]
        if _file is None:
            fd, path = tempfile.mkstemp(prefix="spectra_", suffix=".bin", dir=folder)
            os.close(fd)
            _file = _File(path)
            os.ftruncate(_file.fd, self._shape[0] * self.row_bytes)  # sparse: zeros
            if fill:
                self._fill(_file, fill)
        self._file = _file

    def _fill(self, file: _File, value: float) -> None:
        per = max(1, (8 << 20) // max(self.row_bytes, 1))
        block = np.full((min(per, self._shape[0]),) + self._row_shape, value, dtype=self._np)
        for s in range(0, self._shape[0], per):
            k = min(per, self._shape[0] - s)
            os.pwrite(file.fd, memoryview(block[:k]).cast("B"), s * self.row_bytes)

    # -------------------------------------------------------------- tensor API
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        return self._shape[0] * self.row_bytes

    @property
    def path(self) -> str:
        return self._file.path

    def __len__(self) -> int:
        return self._shape[0]

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self._shape[dim]

    def _file_rows(self, idx) -> np.ndarray:
        rows = _as_rows(idx, self._shape[0])
        return rows if self._rows is None else self._rows[rows]

    def read_numpy(self, idx) -> np.ndarray:
        """Rows ``idx`` as a new numpy array ``(R, *row_shape)``."""
        rows = self._file_rows(idx)
        out = np.empty((len(rows),) + self._row_shape, dtype=self._np)
        if len(rows) == 0:
            return out
        order = None
        if len(rows) > 1 and np.any(np.diff(rows) < 0):
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
        fd, rb = self._file.fd, self.row_bytes
        pos = 0
        for a, b in _runs(rows, self.MAX_GAP):
            k = int(np.searchsorted(rows, b, side="left")) - pos  # rows of this run
            if b - a == k and (k == 1 or np.all(np.diff(rows[pos:pos + k]) == 1)):  # contiguous
                self._pread(fd, out[pos:pos + k], a * rb)
            else:
                span = np.empty((b - a,) + self._row_shape, dtype=self._np)
                self._pread(fd, span, a * rb)
                out[pos:pos + k] = span[rows[pos:pos + k] - a]
            pos += k
        if order is not None:
            unsorted = np.empty_like(out)
            unsorted[order] = out
            out = unsorted
        return out

    @staticmethod
    def _pread(fd: int, dest: np.ndarray, offset: int) -> None:
        view = memoryview(dest).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read from the spectra cache at byte {offset + done}")
            done += got

    def __getitem__(self, idx) -> torch.Tensor:
        scalar = isinstance(idx, (int, np.integer)) or (torch.is_tensor(idx) and idx.dim() == 0)
        t = torch.from_numpy(self.read_numpy(idx))
        if self._device.type != "cpu":
            t = t.to(self._device)
        return t[0] if scalar else t

    def __setitem__(self, idx, value) -> None:
        rows = self._file_rows(idx)
        if torch.is_tensor(value):
            value = value.detach().to("cpu")
            value = value.numpy() if value.dtype == self._dtype else value.to(self._dtype).numpy()
        vals = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=self._np),
                                                    (len(rows),) + self._row_shape))
        if len(rows) == 0:
            return
        fd, rb = self._file.fd, self.row_bytes
        cut = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(rows)]])):
            view = memoryview(vals[a:b]).cast("B")
            offset, done = int(rows[a]) * rb, 0
            while done < len(view):
                done += os.pwritev(fd, [view[done:]], offset + done)

    def take(self, idx) -> "DiskArray":
        """A view of rows ``idx`` (no copy; writes go to this array's file)."""
        rows = self._file_rows(idx)
        return DiskArray(self.folder, (len(rows),) + self._row_shape, self._dtype, self._device,
                         _file=self._file, _rows=rows)

    def clone(self, chunk_bytes: int = 64 << 20) -> "DiskArray":
        """A copy in a new file of the same folder (chunked; bounded memory)."""
        out = DiskArray(self.folder, self._shape, self._dtype, self._device)
        if self._rows is None:
            shutil.copyfile(self._file.path, out.path)  # same inode; copied in the kernel (sendfile)
            return out
        per = max(1, chunk_bytes // max(self.row_bytes, 1))
        for s in range(0, self._shape[0], per):
            rows = np.arange(s, min(s + per, self._shape[0]))
            out[rows] = self.read_numpy(rows)
        return out

    def to(self, device) -> "DiskArray":
        """The same rows, returned on ``device`` when read (no copy)."""
        return DiskArray(self.folder, self._shape, self._dtype, device, _file=self._file, _rows=self._rows)

    def numpy(self) -> np.ndarray:
        """Every row, in memory (for small arrays and tests)."""
        return self.read_numpy(slice(None))

    def __repr__(self) -> str:
        return f"DiskArray(shape={self._shape}, dtype={self._dtype}, file={self.path})"


Array = Union[torch.Tensor, DiskArray]


def take_rows(array: Array, rows) -> Array:
    """Rows of a tensor (a copy) or of a :class:`DiskArray` (a view)."""
    if isinstance(array, DiskArray):
        return array.take(rows)
    return array[torch.as_tensor(np.asarray(rows), device=array.device)]


class SpectraWorkspace:
    """Where the per-particle arrays of one run live: RAM under ``max_bytes``,
    else files in a private folder created in ``parent`` (removed by
    :meth:`close`; also a context manager).

    Args:
        max_bytes: memory budget for the arrays (``--max-memory``).
        parent: folder for the scratch folder (the output folder or ``--scratch``).
        force_disk: put every array on disk whatever its size (tests).
    """

    def __init__(self, max_bytes: int, parent: str, force_disk: bool = False, log=None):
        self.max_bytes = int(max_bytes)
        self.parent = parent
        self.force_disk = force_disk
        self.log = log  # (str) -> None: told about scratch folders of killed runs that were removed
        self._folder: Optional[str] = None

    def fits(self, nbytes: float) -> bool:
        """Whether ``nbytes`` of arrays may be held in RAM."""
        return not self.force_disk and nbytes <= self.max_bytes

    @property
    def folder(self) -> str:
        """The scratch folder (created on first use: ``<parent>/.gsplat_cache_XXXX``)."""
        if self._folder is None:
            os.makedirs(self.parent, exist_ok=True)
            for stale in remove_stale_scratch(self.parent):
                if self.log:
                    self.log(f"removed {stale}: the scratch folder of a run that was killed")
            self._folder = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=self.parent)
            with open(os.path.join(self._folder, OWNER_FILE), "w") as fh:
                fh.write(_owner_stamp(os.getpid()))
        return self._folder

    def empty(self, shape: Sequence[int], dtype: torch.dtype, device="cpu", in_memory: bool = True,
              fill: Optional[float] = None) -> Array:
        """A new array: a tensor (``in_memory``) or a :class:`DiskArray`, zeros or ``fill``."""
        if in_memory:
            t = torch.empty(tuple(shape), dtype=dtype, device=device)
            return t.fill_(fill) if fill is not None else t.zero_()
        return DiskArray(self.folder, shape, dtype, device, fill=fill)

    def close(self) -> None:
        """Remove the scratch folder and everything in it."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "SpectraWorkspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SCRATCH_PREFIX = ".gsplat_cache_"
#: in every scratch folder: ``host pid start-time`` of the process that made it
OWNER_FILE = "owner"


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (clock ticks since boot, from
    ``/proc``), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_stamp(pid: int) -> str:
    import socket
    return f"{socket.gethostname()} {pid} {_process_start(pid)}\n"


def remove_stale_scratch(parent: str) -> list:
    """Remove the scratch folders in ``parent`` whose run has died (killed with
    SIGKILL, out of memory, a node reboot): those made on this host by a process
    that no longer exists (or whose pid now belongs to another process).
    Folders of live runs, of other hosts (a shared disk) and without an owner
    stamp are left alone. Returns the removed paths."""
    import socket
    host, removed = socket.gethostname(), []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(SCRATCH_PREFIX)]
    except OSError:
        return removed
    for name in names:
        folder = os.path.join(parent, name)
        try:
            with open(os.path.join(folder, OWNER_FILE)) as fh:
                owner_host, pid, start = fh.read().split()
        except (OSError, ValueError):
            continue
        if owner_host != host or not pid.isdigit():
            continue
        if _process_start(int(pid)) != start:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
