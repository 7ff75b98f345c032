"""Fourier-space helpers and the voxel-map projector (projection-slice theorem).

Slices are taken from / put into the 3D transform with ``torch-fourier-slice``
(trilinear interpolation on a 2×-padded grid, sinc² gridding correction). Its
rotation matrices map slice frequencies ``(kx, ky, 0)`` to map frequencies; for
RELION's projection ``image(x) = ∫ V(Aᵀ·x) dz`` that matrix is ``Aᵀ``
(:func:`slice_matrices`). Shifts and the CTF are applied to the cropped image's
rfft, as ``relion_project`` does.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch_fourier_slice import extract_central_slices_rfft_3d
from torch_fourier_slice.volume_utils import separable_sinc2_correction

from .ctf import ctf_2d, rfft_frequencies


def as_tensor(x, device=None, dtype=torch.float32) -> torch.Tensor:
    """A tensor on ``device`` from an array or tensor (numpy input is copied)."""
    if torch.is_tensor(x):
        return x.to(device=device, dtype=dtype)
    return torch.tensor(np.asarray(x), device=device, dtype=dtype)


def slice_matrices(poses: np.ndarray, device=None) -> torch.Tensor:
    """RELION pose matrices ``A (B, 3, 3)`` → slice matrices ``Aᵀ`` for torch-fourier-slice."""
    return as_tensor(np.swapaxes(np.asarray(poses, np.float64), -1, -2), device=device)


def pad_to(x: torch.Tensor, size: int, dims: int) -> torch.Tensor:
    """Zero-pad the last ``dims`` axes of a centred array from ``n`` to ``size``
    keeping the centre at index ``size // 2``."""
    n = x.shape[-1]
    lo = size // 2 - n // 2
    hi = size - n - lo
    return F.pad(x, [lo, hi] * dims)


def crop_to(x: torch.Tensor, size: int, dims: int) -> torch.Tensor:
    """Crop the last ``dims`` axes of a centred array to ``size`` (inverse of :func:`pad_to`)."""
    n = x.shape[-1]
    lo = n // 2 - size // 2
    sl = (Ellipsis,) + (slice(lo, lo + size),) * dims
    return x[sl]


def image_rfft(images: torch.Tensor) -> torch.Tensor:
    """rfft of centred images ``(..., n, n)`` (centre pixel moved to the origin)."""
    return torch.fft.rfftn(torch.fft.ifftshift(images, dim=(-2, -1)), dim=(-2, -1))


def image_irfft(spectra: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`image_rfft`: centred images ``(..., box, box)``."""
    return torch.fft.fftshift(torch.fft.irfftn(spectra, s=(box, box), dim=(-2, -1)), dim=(-2, -1))


def shift_phase(shifts_A: torch.Tensor, box: int, pixel_size_A: float) -> torch.Tensor:
    """Phase factors ``exp(−2πi k·t)`` that translate images by ``t = shifts_A``.

    Args:
        shifts_A: ``(B, 2)`` translations (x, y) in Å.

    Returns:
        complex ``(B, box, box//2+1)``; multiplying an image rfft by it moves the
        image content by ``+t``.
    """
    ky, kx = rfft_frequencies(box, pixel_size_A, device=shifts_A.device, dtype=torch.float64)
    t = shifts_A.to(torch.float64)
    phase = -2.0 * np.pi * (kx * t[:, 0, None, None] + ky * t[:, 1, None, None])
    return torch.polar(torch.ones_like(phase), phase).to(torch.complex64)


def volume_rfft(volume: torch.Tensor, pad: float = 2.0) -> torch.Tensor:
    """Prepare a map ``[z, y, x]`` for slice extraction: zero-pad by ``pad``,
    pre-correct for trilinear interpolation (divide by sinc²), rfft, fftshift
    the two full axes (the layout torch-fourier-slice expects)."""
    n = volume.shape[-1]
    size = int(round(n * pad))
    v = pad_to(volume, size, 3)
    v = v / separable_sinc2_correction(v.shape, device=v.device)
    dft = torch.fft.rfftn(torch.fft.ifftshift(v, dim=(-3, -2, -1)), dim=(-3, -2, -1))
    return torch.fft.fftshift(dft, dim=(-3, -2))


def project_rfft(vol_rfft: torch.Tensor, poses: np.ndarray, box: int) -> torch.Tensor:
    """Noise-free projections (no CTF, no shift) from a prepared padded transform.

    Args:
        vol_rfft: output of :func:`volume_rfft`.
        poses: ``(B, 3, 3)`` RELION matrices.
        box: output box in pixels (the unpadded map size).

    Returns:
        ``(B, box, box)`` real images.
    """
    size = vol_rfft.shape[0]
    slices = extract_central_slices_rfft_3d(vol_rfft, slice_matrices(poses, vol_rfft.device))
    slices = torch.fft.ifftshift(slices, dim=(-2,))
    images = torch.fft.fftshift(torch.fft.irfftn(slices, s=(size, size), dim=(-2, -1)), dim=(-2, -1))
    return crop_to(images, box, 2)


def extract_spectra(vol_rfft: torch.Tensor, poses: np.ndarray, box: int) -> torch.Tensor:
    """Central slices sampled directly on a ``box``-pixel image's rfft grid.

    Samples the padded transform (from :func:`volume_rfft`) by trilinear
    interpolation at ``pad·Aᵀ·k`` for every frequency ``k`` of the unshifted
    ``(box, box//2+1)`` rfft grid, as RELION's projector does; no inverse
    transform is needed when the comparison is done in Fourier space.

    Returns:
        ``(B, box, box//2+1)`` complex64 spectra of the (uncropped-in-real-space,
        periodic) projections.
    """
    size = vol_rfft.shape[0]
    pad = size / box
    dev = vol_rfft.device
    ky = torch.fft.fftfreq(box, d=1.0 / box, device=dev)
    kx = torch.fft.rfftfreq(box, d=1.0 / box, device=dev)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    k = torch.stack([gx.ravel(), gy.ravel()], dim=-1) * pad  # (P, 2) padded units
    mats = as_tensor(poses, dev)
    r = torch.einsum("pk,bkj->bpj", k, mats[:, :2, :])  # (B, P, xyz)
    flip = r[..., 0] < 0
    r = torch.where(flip[..., None], -r, r)
    w = vol_rfft.shape[-1]
    # grid_sample (align_corners=True): index i ↦ 2i/(dim−1) − 1; order (x, y, z)
    grid = torch.stack([2 * r[..., 0] / (w - 1) - 1,
                        2 * (r[..., 1] + size // 2) / (size - 1) - 1,
                        2 * (r[..., 2] + size // 2) / (size - 1) - 1], dim=-1)
    vol = torch.view_as_real(vol_rfft).permute(3, 0, 1, 2)[None]  # (1, 2, z, y, x)
    b, p = r.shape[0], r.shape[1]
    out = F.grid_sample(vol.expand(1, 2, *vol.shape[2:]), grid.reshape(1, 1, 1, b * p, 3),
                        mode="bilinear", padding_mode="zeros", align_corners=True)
    vals = torch.complex(out[0, 0, 0, 0], out[0, 1, 0, 0]).reshape(b, p)
    vals = torch.where(flip, vals.conj(), vals)
    return vals.reshape(b, box, box // 2 + 1)


def apply_ctf_and_shift(images: torch.Tensor, pixel_size_A: float,
                        shifts_A: Optional[torch.Tensor] = None,
                        ctf_params: Optional[Mapping] = None) -> torch.Tensor:
    """Translate centred images by ``−origin`` and multiply by the CTF, in Fourier space.

    Args:
        images: ``(B, n, n)``.
        shifts_A: ``(B, 2)`` RELION origins (x, y) in Å (subtracted).
        ctf_params: per-particle CTF parameters (see :func:`ctf.ctf_2d`) or None.
    """
    box = images.shape[-1]
    if shifts_A is None and ctf_params is None:
        return images
    spec = image_rfft(images)
    if shifts_A is not None:
        spec = spec * shift_phase(-shifts_A, box, pixel_size_A)
    if ctf_params is not None:
        spec = spec * ctf_2d(ctf_params, box, pixel_size_A, device=images.device)
    return image_irfft(spec, box)


def project(volume: np.ndarray, poses: np.ndarray, pixel_size_A: float,
            shifts_A: Optional[np.ndarray] = None, ctf_params: Optional[Mapping] = None,
            pad: float = 2.0, batch: int = 256, device: str = "cpu") -> np.ndarray:
    """Project a voxel map at RELION poses, with optional origins and CTF.

    Matches ``relion_project --ang particles.star [--ctf]``.

    Args:
        volume: ``[z, y, x]`` map, cubic, box ``n``.
        poses: ``(B, 3, 3)`` RELION matrices.
        pixel_size_A: pixel size in Å.
        shifts_A: ``(B, 2)`` origins (x, y) in Å, or None.
        ctf_params: per-particle CTF parameters (arrays ``(B,)``) or None.
        pad: padding factor of the 3D transform.
        batch: images per batch (memory bound).

    Returns:
        ``(B, n, n)`` float32 images.
    """
    vol = as_tensor(volume, device=device)
    n = vol.shape[-1]
    vft = volume_rfft(vol, pad)
    out = np.empty((len(poses), n, n), dtype=np.float32)
    for s in range(0, len(poses), batch):
        sl = slice(s, s + batch)
        imgs = project_rfft(vft, poses[sl], n)
        sh = None if shifts_A is None else as_tensor(shifts_A[sl], device=device)
        cp = None if ctf_params is None else {k: np.asarray(v)[sl] for k, v in ctf_params.items()}
        out[sl] = apply_ctf_and_shift(imgs, pixel_size_A, sh, cp).cpu().numpy()
    return out
