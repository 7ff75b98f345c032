"""Particles held in memory as centred, downsampled Fourier spectra with their CTFs.

Methods that compare every particle with map projections many times (two-class
refinement, residual eigenvolumes) load the data once with :func:`load_spectra`:
each image's rfft is moved by its origin (centred), cropped to a smaller box
(downsampling, ``pixel_size × box / new_box``) and kept with its CTF on the
same grid. Projections of a map are compared on that grid
(:meth:`ParticleSpectra.project`).

Memory: ``12·m·(m//2+1)`` bytes per particle at working box ``m``. Given a
:class:`.spectra_store.SpectraWorkspace`, :func:`load_spectra` keeps the
arrays in RAM while they fit its budget and in a scratch file otherwise
(:class:`.spectra_store.DiskArray`, read by chunks); every consumer indexes
them by rows, so both give the same numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from .ctf import ctf_2d
from .distributed import World
from .fourier import as_tensor, extract_spectra, image_rfft, shift_phase, volume_rfft
from .io import ImageReader, InputError, ParticleStar
from .spectra_store import DiskArray, SpectraWorkspace, format_bytes, take_rows


def working_box(resize: int, box: int, pixel_size_A: float, target_pixel_A: float = 3.0,
                minimum: int = 24) -> int:
    """The downsampled box of a ``--resize`` option (0: automatic, a pixel of
    about ``target_pixel_A`` Å and at least ``minimum`` pixels, never
    upsampling), checked.

    Raises:
        InputError: odd, too small or larger than ``box``.
    """
    if resize:
        m = resize
    else:
        m = int(min(box, max(minimum, int(round(box * pixel_size_A / target_pixel_A / 2.0)) * 2)))
    if m > box or m < 8 or m % 2:
        raise InputError(f"--resize {m}: must be even, >= 8 and <= the box ({box})")
    return m


def fourier_crop(spectra: torch.Tensor, box: int, new_box: int) -> torch.Tensor:
    """Crop unshifted rffts ``(B, box, box//2+1)`` to ``(B, new_box, new_box//2+1)``
    (downsampling; content, centre and real-space amplitudes are kept)."""
    if new_box == box:
        return spectra
    h = new_box // 2
    rows = torch.cat([torch.arange(0, h), torch.arange(box - h, box)]).to(spectra.device)
    return spectra[:, rows, : h + 1] * (new_box / box) ** 2


def fourier_crop_map(volume: np.ndarray, new_box: int) -> np.ndarray:
    """A map ``[z, y, x]`` (box ``n``) Fourier-cropped to ``new_box`` (pixel
    ``× n / new_box``), float32: the reference on the grid of :func:`load_spectra`'s
    ``new_box``, scaled by ``(new_box/n)²`` so that its projections (sums over
    ``new_box`` voxels) match the particles Fourier-cropped by :func:`fourier_crop`
    (which keep their real-space amplitudes)."""
    vol = np.asarray(volume, np.float32)
    n = vol.shape[-1]
    if new_box == n:
        return vol
    if new_box > n:
        raise InputError(f"cannot crop a {n}-px map to {new_box} px")
    from .fourier import crop_to
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(torch.from_numpy(vol))))
    small = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(crop_to(ft, new_box, 3)))).real
    return (small.numpy() * (new_box / n) ** 2).astype(np.float32)


def centred_spectra_chunks(star: ParticleStar, reader: ImageReader, new_box: int, device="cpu",
                           chunk: int = 512, with_ctf: bool = True, rows: Optional[np.ndarray] = None):
    """Yield ``(rows, spectra, ctf)`` per chunk of ``rows`` (default all): origin-corrected
    rffts cropped to ``new_box`` (``(B, m, m//2+1)`` complex) and the CTF on the same grid (or None)."""
    box, pix = star.box_size, star.pixel_size
    shifts = star.shifts_A()
    params = star.ctf_params() if (with_ctf and star.has_ctf) else None
    for rows, imgs in reader.chunks(chunk, rows):
        spec = image_rfft(torch.from_numpy(imgs).to(device))
        spec = spec * shift_phase(as_tensor(shifts[rows], device), box, pix)  # move by +origin
        spec = fourier_crop(spec, box, new_box)
        ctf = None
        if params is not None:
            ctf = ctf_2d({k: v[rows] for k, v in params.items()}, new_box, pix * box / new_box,
                         device=device)
        yield rows, spec, ctf


@dataclass
class ParticleSpectra:
    """All particles of a set on a ``box × (box//2+1)`` rfft grid.

    Attributes:
        spectra: ``(N, m, m//2+1)`` complex64, centred (origins removed): a
            tensor, or a :class:`.spectra_store.DiskArray` read by rows.
        ctf: ``(N, m, m//2+1)`` float32 CTF (ones without CTF), likewise.
        poses: ``(N, 3, 3)`` RELION matrices.
        half: ``(N,)`` half set 1 or 2.
        box: ``m``; pixel_size_A: pixel size of the downsampled grid.
        spare_bytes: RAM the methods may still take for more per-particle
            working arrays (the eigenvolume's whitened residuals); beyond it
            they compute them chunk by chunk. ``inf``: no limit.
        world: the ranks among which the particles are split
            (:class:`.distributed.World`): this process holds its shard only,
            and every sum over particles (:meth:`sum_over_ranks`, the
            reconstructions' accumulators) is added over the ranks, which
            must then all call the same methods in the same order. None: every
            particle is here.
    """
    spectra: Union[torch.Tensor, DiskArray]
    ctf: Union[torch.Tensor, DiskArray]
    poses: np.ndarray
    half: np.ndarray
    box: int
    pixel_size_A: float
    spare_bytes: float = float("inf")
    world: Optional[World] = None

    def __len__(self) -> int:
        return self.spectra.shape[0]

    @property
    def sharded(self) -> bool:
        """Whether the particles are split among several ranks."""
        return self.world is not None and self.world.size > 1

    def count(self) -> int:
        """Number of particles over all ranks (``len`` counts this shard)."""
        return self.world.sum_int(len(self)) if self.sharded else len(self)

    def sum_over_ranks(self, values):
        """``values`` (a number or numpy array) summed over the ranks, as float64
        (unchanged with one process)."""
        if not self.sharded:
            return values
        arr = np.asarray(values, np.float64)
        t = torch.from_numpy(arr.reshape(-1).copy())
        if self.world.backend == "nccl":
            t = t.cuda()
        self.world.all_reduce_(t)
        out = t.cpu().numpy().reshape(arr.shape)
        return out if arr.ndim else float(out)

    def gather_rows(self, array: np.ndarray) -> tuple[np.ndarray, slice]:
        """Every rank's rows of ``array`` (rows = this shard's particles)
        concatenated in the rank order (the order of the input rows), and the
        slice of this rank's rows in it."""
        array = np.asarray(array)
        if not self.sharded:
            return array, slice(0, len(array))
        sizes = self.world.gather_rows(np.array([len(array)]))
        start = int(sizes[:self.world.rank].sum())
        return self.world.gather_rows(array), slice(start, start + len(array))

    @property
    def device(self):
        return self.spectra.device

    @property
    def on_disk(self) -> bool:
        """Whether the spectra are read from a scratch file."""
        return isinstance(self.spectra, DiskArray)

    def subset(self, rows: np.ndarray, half: Optional[np.ndarray] = None) -> "ParticleSpectra":
        """The particles ``rows`` (a copy in RAM, a view on disk), half sets
        ``half`` (default: theirs)."""
        rows = np.asarray(rows)
        return ParticleSpectra(take_rows(self.spectra, rows), take_rows(self.ctf, rows), self.poses[rows],
                               self.half[rows] if half is None else np.asarray(half), self.box,
                               self.pixel_size_A, self.spare_bytes, self.world)

    def shells(self) -> torch.Tensor:
        """Shell index (rounded radius in Fourier pixels) of the 2D rfft grid ``(m, m//2+1)``."""
        ky = torch.fft.fftfreq(self.box, d=1.0 / self.box, device=self.device)
        kx = torch.fft.rfftfreq(self.box, d=1.0 / self.box, device=self.device)
        return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).round().long()

    def transform(self, volume: np.ndarray) -> torch.Tensor:
        """The padded transform of ``volume`` that :meth:`project` samples
        (compute it once for passes that project chunk by chunk)."""
        return volume_rfft(as_tensor(volume, self.device))

    def project(self, volume: Optional[np.ndarray], rows: np.ndarray, batch: int = 512,
                transform: Optional[torch.Tensor] = None):
        """Yield ``(sub_rows, spectra)``: rffts of the projections of ``volume``
        (``[z, y, x]``, box ``m``; or its :meth:`transform`) at the poses of
        ``rows``, in batches; no CTF."""
        vft = self.transform(volume) if transform is None else transform
        for s in range(0, len(rows), batch):
            r = rows[s:s + batch]
            yield r, extract_spectra(vft, self.poses[r], self.box)


def spectra_bytes(n: int, box: int) -> int:
    """Bytes of ``n`` particles' spectra (complex64) and CTFs (float32) at working box ``box``."""
    return int(n) * box * (box // 2 + 1) * 12


def load_spectra(star: ParticleStar, reader: ImageReader, new_box: int, device="cpu",
                 progress: Optional[Callable[[int, int], None]] = None,
                 workspace: Optional[SpectraWorkspace] = None, copies: float = 1.0,
                 log: Optional[Callable[[str], None]] = None,
                 world: Optional[World] = None) -> ParticleSpectra:
    """Read every particle once into a :class:`ParticleSpectra` (box ``new_box``).

    Args:
        workspace: memory budget and scratch folder (None: everything in RAM).
            The arrays stay in RAM when ``copies ×`` their size fits the
            budget, else they go to a scratch file.
        copies: how many copies of the arrays the caller's method holds at
            once (e.g. 2 with pose refinement, which refines a copy).
        log: told where the arrays went (one line).
        world: several ranks: read only this rank's shard of the rows
            (:meth:`.distributed.World.shard`; the budget is per rank) and
            mark the result as split among them (``ParticleSpectra.world``).
    """
    mine = np.arange(len(star)) if world is None else world.shard(len(star))
    n, h = len(mine), new_box // 2 + 1
    need = spectra_bytes(n, new_box)
    in_ram = workspace is None or workspace.fits(need * copies)
    if workspace is None:
        spectra = torch.empty((n, new_box, h), dtype=torch.complex64, device=device)
        ctf = torch.ones((n, new_box, h), dtype=torch.float32, device=device)
    else:
        spectra = workspace.empty((n, new_box, h), torch.complex64, device, in_ram)
        ctf = workspace.empty((n, new_box, h), torch.float32, device, in_ram,
                              fill=1.0 if in_ram or not star.has_ctf else None)  # else all written below
    if log and workspace is not None:
        where = "in memory" if in_ram else f"in the scratch folder {workspace.folder}"
        log(f"particle spectra and CTFs: {n} × {new_box}² px, {format_bytes(need)} "
            f"(× {copies:g} copies; budget {format_bytes(workspace.max_bytes)}): {where}")
    done = 0
    for rows, spec, c in centred_spectra_chunks(star, reader, new_box, device, rows=mine):
        idx = torch.arange(done, done + len(rows), device=device)  # positions in this shard
        spectra[idx] = spec.to(torch.complex64)
        if c is not None:
            ctf[idx] = c
        done += len(rows)
        if progress:
            progress(done, n)
    spare = float("inf") if workspace is None else (
        max(0.0, workspace.max_bytes - need * copies) if in_ram else 0.0)
    return ParticleSpectra(spectra, ctf, star.poses()[mine], star.half_set()[mine], new_box,
                           star.pixel_size * star.box_size / new_box, spare, world)


class PassProgress:
    """Progress of one pass over particles for a ``(str) -> None`` callback:
    a line every ``seconds`` (and at the end when the pass took longer), so
    long passes are never silent. ``tick(done)`` after each chunk."""

    def __init__(self, progress: Optional[Callable[[str], None]], label: str, total: int,
                 seconds: float = 30.0):
        self.progress, self.label, self.total, self.seconds = progress, label, total, seconds
        self.t0 = self.last = time.time()

    def tick(self, done: int) -> None:
        if self.progress is None:
            return
        now = time.time()
        if now - self.last >= self.seconds or (done >= self.total and now - self.t0 >= self.seconds):
            self.last = now
            self.progress(f"{self.label}: {done}/{self.total} particles, {now - self.t0:.0f} s")


def shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Mean of ``values (..., m, m//2+1)`` over everything but the grid, per shell."""
    flat = values.reshape(-1, shells.numel()).sum(0)
    total = torch.zeros(n_shells, dtype=flat.dtype, device=flat.device).index_add_(
        0, shells.ravel().clamp(max=n_shells - 1), flat)
    count = torch.bincount(shells.ravel().clamp(max=n_shells - 1), minlength=n_shells).to(flat.dtype)
    reps = values.numel() // shells.numel()
    return total / (count * reps).clamp(min=1)


def noise_spectrum(data: ParticleSpectra, consensus: np.ndarray, batch: int = 512,
                   progress: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """Image noise power per shell ``σ²(s)`` (``(box//2+1,)``, float64) from the
    residuals ``X − CTF·P·consensus`` of every particle (consensus: ``[z, y, x]``
    map at ``data.box``; every rank's particles when ``data`` is sharded)."""
    shells = data.shells()
    n_shells = data.box // 2 + 1
    total = torch.zeros(n_shells, dtype=torch.float64, device=data.device)
    rows = np.arange(len(data))
    ticker = PassProgress(progress, "noise spectrum", len(rows))
    for r, proj in data.project(consensus, rows, batch):
        idx = torch.as_tensor(r, device=data.device)
        res = data.spectra[idx] - data.ctf[idx] * proj
        total += shell_mean((res.abs() ** 2).double(), shells, n_shells) * len(r)
        ticker.tick(int(r[-1]) + 1)
    sigma2 = data.sum_over_ranks(total.cpu().numpy()) / max(data.count(), 1)
    return np.maximum(sigma2, 1e-12 * max(sigma2.max(), 1e-30))
