"""Particles for fitting: images, poses, origins and CTF of a subset, batch by batch.

Images of the subset are read once into memory when they fit under a size
limit, otherwise read from the memory-mapped stacks batch by batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..ctf import select_params
from ..fourier import as_tensor
from ..io import ImageReader, InputError, ParticleStar


@dataclass
class ParticleData:
    """Particles ``rows`` of a STAR table, ready for :func:`.fit.fit`.

    Attributes:
        rows: ``(M,)`` indices into the STAR table.
        poses: ``(M, 3, 3)`` RELION matrices (tensor on ``device``).
        shifts_A: ``(M, 2)`` origins in Å (tensor).
        ctf: CTF parameter arrays ``(M,)`` or None (CTF ignored).
        images: ``(M, n, n)`` float32 tensor on ``device`` or None (then read per batch).
    """
    reader: ImageReader
    rows: np.ndarray
    poses: torch.Tensor
    shifts_A: torch.Tensor
    ctf: Optional[dict]
    images: Optional[torch.Tensor]
    box: int
    pixel_size_A: float
    device: str = "cpu"

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_star(cls, star: ParticleStar, rows=None, device="cpu", use_ctf: bool = True,
                  preload_limit_bytes: float = 2e9, reader: Optional[ImageReader] = None) -> "ParticleData":
        """Collect the particles ``rows`` (default all) of ``star``.

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
        images = None
        if len(rows) * box * box * 4 <= preload_limit_bytes:
            arr = reader.read(rows)
            if not np.isfinite(arr).all():
                raise InputError(f"{star.path}: the particle images contain NaN or infinite pixels")
            images = torch.from_numpy(arr).to(device)
        return cls(reader, rows, as_tensor(star.poses()[rows], device), as_tensor(star.shifts_A()[rows], device),
                   ctf, images, box, pix, device)

    def batch(self, idx: np.ndarray):
        """``(images, rotations, shifts_A, ctf_params)`` of the subset positions ``idx``."""
        if self.images is not None:
            imgs = self.images[torch.as_tensor(idx, device=self.images.device)]
        else:
            imgs = torch.from_numpy(self.reader.read(self.rows[idx])).to(self.device)
        t = torch.as_tensor(idx, device=self.poses.device)
        ctf = None if self.ctf is None else select_params(self.ctf, idx)
        return imgs, self.poses[t], self.shifts_A[t], ctf

    def downsampled(self, new_box: int, chunk: int = 1024) -> "ParticleData":
        """The same particles Fourier-cropped to ``new_box`` pixels (pixel size
        ``pixel·box/new_box``). Pixel values are scaled by ``(box/new_box)²`` so
        each image keeps its sum, the convention of the renderer (an image sums
        to the model's total amplitude at any pixel size): a model fitted at one
        sampling stays valid at the other."""
        from dataclasses import replace
        from ..fourier import image_irfft, image_rfft
        from ..particle_spectra import fourier_crop
        if new_box == self.box:
            return self
        if self.images is None:
            raise InputError("downsampling needs the particles in memory (a smaller set or more memory)")
        if not 8 <= new_box < self.box or new_box % 2:
            raise InputError(f"working box {new_box}: must be even, >= 8 and below the box ({self.box})")
        parts = []
        for s in range(0, len(self), chunk):
            spec = fourier_crop(image_rfft(self.images[s:s + chunk]), self.box, new_box)
            parts.append(image_irfft(spec * (self.box / new_box) ** 2, new_box))
        return replace(self, images=torch.cat(parts), box=new_box,
                       pixel_size_A=self.pixel_size_A * self.box / new_box)

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
