"""Fourier shell correlation, resolution and FSC area.

The FSC itself comes from ``torch-fourier-shell-correlation`` (shells of one
Fourier pixel, from 0 to Nyquist: ``n//2 + 1`` values for a box of ``n``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch_fourier_shell_correlation import fourier_shell_correlation


def shell_frequencies(box: int, pixel_size_A: float) -> np.ndarray:
    """Spatial frequency (1/Å) of each FSC shell ``0 … box//2``."""
    return np.arange(box // 2 + 1) / (box * pixel_size_A)


def fsc_curve(map1: np.ndarray, map2: np.ndarray, pixel_size_A: float,
              mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """FSC between two maps ``[z, y, x]`` of equal cubic shape.

    Args:
        mask: optional real-space mask multiplied into both maps.

    Returns:
        ``(frequency_per_A (n//2+1,), fsc (n//2+1,))``.
    """
    a, b = np.asarray(map1, np.float32), np.asarray(map2, np.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"FSC needs two 3D maps of the same shape, got {a.shape} and {b.shape}")
    if mask is not None:
        a, b = a * mask, b * mask
    fsc = fourier_shell_correlation(torch.from_numpy(np.ascontiguousarray(a)),
                                    torch.from_numpy(np.ascontiguousarray(b))).numpy()
    fsc = np.nan_to_num(fsc.astype(np.float64), nan=0.0)
    return shell_frequencies(a.shape[-1], pixel_size_A), fsc


def resolution_at(frequency: np.ndarray, fsc: np.ndarray, threshold: float = 0.143) -> float:
    """Resolution in Å where the FSC first falls below ``threshold``
    (linear interpolation between shells; Nyquist if it never does)."""
    below = np.nonzero(fsc[1:] < threshold)[0]
    if len(below) == 0:
        return float(1.0 / frequency[-1])
    i = below[0] + 1
    f0, f1, c0, c1 = frequency[i - 1], frequency[i], fsc[i - 1], fsc[i]
    f = f0 if c0 == c1 else f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
    return float(1.0 / f) if f > 0 else float("inf")


def fsc_auc(fsc: np.ndarray) -> float:
    """Area under the FSC curve from shell 1 to Nyquist, with the frequency axis
    scaled to [0, 1] (1.0 = perfect correlation at every shell)."""
    f = np.asarray(fsc, float)[1:]
    return float(np.trapz(f, dx=1.0 / (len(f) - 1))) if len(f) > 1 else float(f.mean())


def shell_index(size: int, rfft: bool = True, fftshifted: bool = True, device=None) -> torch.Tensor:
    """Radius in Fourier pixels of each voxel of a 3D transform of a ``size`` box.

    Args:
        rfft: grid is ``(size, size, size//2 + 1)`` (else ``size³``).
        fftshifted: the full axes have the origin at index ``size//2``.

    Returns:
        float32 tensor of the grid's shape.
    """
    full = torch.fft.fftfreq(size, d=1.0 / size, device=device)
    if fftshifted:
        full = torch.fft.fftshift(full)
    last = torch.fft.rfftfreq(size, d=1.0 / size, device=device) if rfft else full
    kz, ky, kx = torch.meshgrid(full, full, last, indexing="ij")
    return torch.sqrt(kz ** 2 + ky ** 2 + kx ** 2).to(torch.float32)
