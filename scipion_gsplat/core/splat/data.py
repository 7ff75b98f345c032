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

    def mean_variance(self, n: int = 512, seed: int = 0) -> float:
        """Mean per-image pixel variance over up to ``n`` images (the loss scale)."""
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(self), size=min(n, len(self)), replace=False))
        imgs = self.batch(idx)[0]
        return float(imgs.var(dim=(-2, -1)).mean())
