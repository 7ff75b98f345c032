"""Particles for fitting: images, poses, origins and CTF of a subset, batch by batch.

Images of the subset are read once into memory when they fit under the memory
budget (a :class:`~..spectra_store.SpectraWorkspace`, ``--max-memory``; without
one, ``preload_limit_bytes``), otherwise read from the stacks batch by batch.
Fourier-cropped copies (:meth:`ParticleData.downsampled`) are made chunk by
chunk from memory or from the stacks and kept in RAM under the budget, else in
a scratch file (:class:`~..spectra_store.DiskArray`) read per batch. Images
cost ``box² × 4`` bytes per particle (float32): 16 kB at 64 px, 262 kB at 256 px.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from ..ctf import select_params
from ..fourier import as_tensor
from ..io import ImageReader, InputError, ParticleStar
from ..spectra_store import DiskArray, SpectraWorkspace, format_bytes


@dataclass
class ParticleData:
    """Particles ``rows`` of a STAR table, ready for :func:`.fit.fit`.

    Attributes:
        rows: ``(M,)`` indices into the STAR table.
        poses: ``(M, 3, 3)`` RELION matrices (tensor on ``device``).
        shifts_A: ``(M, 2)`` origins in Å (tensor).
        ctf: CTF parameter arrays ``(M,)`` or None (CTF ignored).
        images: ``(M, n, n)`` float32 tensor on ``device``, a :class:`DiskArray`
            of them (a scratch file), or None (then read from the stacks per batch).
        workspace: the memory budget and scratch folder of the run (None: RAM).
    """
    reader: ImageReader
    rows: np.ndarray
    poses: torch.Tensor
    shifts_A: torch.Tensor
    ctf: Optional[dict]
    images: Optional[Union[torch.Tensor, DiskArray]]
    box: int
    pixel_size_A: float
    device: str = "cpu"
    workspace: Optional[SpectraWorkspace] = None

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_star(cls, star: ParticleStar, rows=None, device="cpu", use_ctf: bool = True,
                  preload_limit_bytes: Optional[float] = None, reader: Optional[ImageReader] = None,
                  workspace: Optional[SpectraWorkspace] = None, preload: Optional[bool] = None
                  ) -> "ParticleData":
        """Collect the particles ``rows`` (default all) of ``star``.

        Args:
            preload_limit_bytes: read the images into memory when they take at
                most this (default: the workspace's budget, or 2e9 bytes without one).
            workspace: memory budget and scratch folder (kept for :meth:`downsampled`).
            preload: True/False to decide it here (e.g. when several sets share the budget).

        Raises:
            InputError: no poses, no CTF (when ``use_ctf``), or NaN/inf pixels.
        """
        if not star.has_poses:
            raise InputError(f"{star.path}: particles have no poses (rlnAngleRot/Tilt/Psi)")
        if use_ctf and not star.has_ctf:
            raise InputError(f"{star.path}: particles have no CTF parameters (use --no-ctf to ignore the CTF)")
        if reader is None:
            reader = ImageReader(star)
            reader.check()
        rows = np.arange(len(star)) if rows is None else np.asarray(rows)
        box, pix = star.box_size, star.pixel_size
        ctf = select_params(star.ctf_params(), rows) if use_ctf else None
        if preload is None:
            nbytes = len(rows) * box * box * 4
            if preload_limit_bytes is not None:
                preload = nbytes <= preload_limit_bytes
            else:
                preload = workspace.fits(nbytes) if workspace is not None else nbytes <= 2e9
        images = None
        if preload:
            arr = reader.read(rows)
            _check_finite(arr, star.path)
            images = torch.from_numpy(arr).to(device)
        return cls(reader, rows, as_tensor(star.poses()[rows], device), as_tensor(star.shifts_A()[rows], device),
                   ctf, images, box, pix, device, workspace)

    @property
    def where(self) -> str:
        """Where the images are: ``in memory``, ``in the scratch folder …`` or ``read from the stacks``."""
        if self.images is None:
            return "read from the stacks per batch"
        if isinstance(self.images, DiskArray):
            return f"in the scratch folder {self.images.folder}"
        return "in memory"

    def _read(self, idx) -> torch.Tensor:
        """Images of the subset positions ``idx`` (an index array or a slice)."""
        if self.images is None:
            arr = self.reader.read(self.rows[idx])
            _check_finite(arr, getattr(self.reader.star, "path", "the particles"))
            return torch.from_numpy(arr).to(self.device)
        if isinstance(self.images, DiskArray):
            return self.images[idx]
        return self.images[idx if isinstance(idx, slice) else torch.as_tensor(idx, device=self.images.device)]

    def batch(self, idx: np.ndarray):
        """``(images, rotations, shifts_A, ctf_params)`` of the subset positions ``idx``."""
        imgs = self._read(np.asarray(idx))
        t = torch.as_tensor(idx, device=self.poses.device)
        ctf = None if self.ctf is None else select_params(self.ctf, idx)
        return imgs, self.poses[t], self.shifts_A[t], ctf

    def downsampled(self, new_box: int, chunk: int = 1024,
                    workspace: Optional[SpectraWorkspace] = None,
                    in_memory: Optional[bool] = None, progress=None) -> "ParticleData":
        """The same particles Fourier-cropped to ``new_box`` pixels (pixel size
        ``pixel·box/new_box``). Pixel values are scaled by ``(box/new_box)²`` so
        each image keeps its sum, the convention of the renderer (an image sums
        to the model's total amplitude at any pixel size): a model fitted at one
        sampling stays valid at the other.

        Made ``chunk`` particles at a time from memory or from the stacks; the
        cropped images (``M × new_box² × 4`` bytes) stay in RAM when they fit
        the budget of ``workspace`` (default: this set's; none: RAM), else go
        to its scratch folder. ``in_memory`` decides it here instead;
        ``progress(done, total)`` is called after each chunk."""
        from dataclasses import replace
        from ..fourier import image_irfft, image_rfft
        from ..particle_spectra import fourier_crop
        if new_box == self.box:
            return self
        if not 8 <= new_box < self.box or new_box % 2:
            raise InputError(f"working box {new_box}: must be even, >= 8 and below the box ({self.box})")
        workspace = workspace or self.workspace
        if in_memory is None:
            in_memory = workspace is None or workspace.fits(len(self) * new_box * new_box * 4)
        if workspace is None and not in_memory:
            raise ValueError("images on disk need a workspace (a scratch folder)")
        shape = (len(self), new_box, new_box)
        out = (torch.empty(shape, dtype=torch.float32, device=self.device) if workspace is None
               else workspace.empty(shape, torch.float32, self.device, in_memory=in_memory))
        for s in range(0, len(self), chunk):
            part = slice(s, min(s + chunk, len(self)))
            spec = fourier_crop(image_rfft(self._read(part)), self.box, new_box)
            out[part] = image_irfft(spec * (self.box / new_box) ** 2, new_box)
            if progress:
                progress(part.stop, len(self))
        return replace(self, images=out, box=new_box, pixel_size_A=self.pixel_size_A * self.box / new_box,
                       workspace=workspace)

    def describe(self) -> str:
        """``'N × n² px images, size: where'`` (one line for logs)."""
        return (f"{len(self)} × {self.box}² px images, {format_bytes(len(self) * self.box ** 2 * 4)}: "
                f"{self.where}")

    def with_pose_corrections(self, omega, shift_A) -> "ParticleData":
        """The same particles with corrected poses: rotations ``exp([ω]×)·A``
        (:func:`..poses.rotations.compose`) and origins ``origin + d``.

        Args:
            omega: ``(M, 3)`` rotation corrections (rad, image frame).
            shift_A: ``(M, 2)`` origin corrections (Å, x and y).
        """
        from dataclasses import replace
        from ..poses.rotations import compose
        om = torch.as_tensor(np.asarray(omega), dtype=torch.float64)
        sh = torch.as_tensor(np.asarray(shift_A), dtype=torch.float64)
        if om.shape != (len(self), 3) or sh.shape != (len(self), 2):
            raise ValueError(f"corrections of shapes {tuple(om.shape)}, {tuple(sh.shape)} for {len(self)} particles")
        poses = compose(self.poses.detach().cpu().double(), om).to(self.poses.device, self.poses.dtype)
        shifts = (self.shifts_A.detach().cpu().double() + sh).to(self.shifts_A.device, self.shifts_A.dtype)
        return replace(self, poses=poses, shifts_A=shifts)

    def mean_variance(self, n: int = 512, seed: int = 0) -> float:
        """Mean per-image pixel variance over up to ``n`` images (the loss scale)."""
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(self), size=min(n, len(self)), replace=False))
        imgs = self.batch(idx)[0]
        return float(imgs.var(dim=(-2, -1)).mean())


def _check_finite(arr: np.ndarray, where) -> None:
    if not np.isfinite(arr).all():
        raise InputError(f"{where}: the particle images contain NaN or infinite pixels")
