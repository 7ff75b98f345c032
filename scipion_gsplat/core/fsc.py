"""Fourier shell correlation, resolution, FSC area and per-shell operations.

Shells are one Fourier pixel wide, indexed by the rounded radius (as RELION):
``n//2 + 1`` shells from 0 to Nyquist for a box of ``n``. We do not use
``torch-fourier-shell-correlation`` here: its interpolated shell weights took
4 s per 64³ FSC on 2 cores (the two-class refinement computes several per
iteration); the plain shell sums below take milliseconds.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def shell_frequencies(box: int, pixel_size_A: float) -> np.ndarray:
    """Spatial frequency (1/Å) of each FSC shell ``0 … box//2``."""
    return np.arange(box // 2 + 1) / (box * pixel_size_A)


def _shell_grid(box: int) -> torch.Tensor:
    """Shell of each voxel of an unshifted ``rfftn`` of a ``box³`` map (int64): the
    rounded radius, with every voxel beyond Nyquist in one extra shell ``box//2 + 1``.

    (float32 radii round as float64 ones do: for boxes up to 1024, ``sqrt`` of an
    integer is never within 1.4e-4 of a half-integer, and float32's error on a
    radius up to 887 is at most 5.3e-5.)"""
    radius = torch.round(shell_index(box, rfft=True, fftshifted=False))
    return radius.clamp(max=box // 2 + 1).to(torch.int64)


def _shell_sums(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> np.ndarray:
    """Sum of ``values`` (float64) per shell ``0 … n_shells-1`` (the shell beyond: dropped)."""
    return torch.bincount(shells.reshape(-1), values.reshape(-1), minlength=n_shells + 1)[:n_shells].numpy()


def _rfftn64(vol) -> torch.Tensor:
    """``rfftn`` in float64 of a map (numpy or torch); torch's FFT is 3× numpy's here."""
    return torch.fft.rfftn(torch.as_tensor(np.asarray(vol), dtype=torch.float64))


def _power(ft: torch.Tensor) -> torch.Tensor:
    """``|F|²`` without the square root of ``abs``."""
    return ft.real.square() + ft.imag.square()


def fsc_curve(map1: np.ndarray, map2: np.ndarray, pixel_size_A: float,
              mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """FSC between two maps ``[z, y, x]`` of equal cubic shape (float64 sums).

    Args:
        mask: optional real-space mask multiplied into both maps.

    Returns:
        ``(frequency_per_A (n//2+1,), fsc (n//2+1,))``.
    """
    a, b = np.asarray(map1), np.asarray(map2)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"FSC needs two 3D maps of the same shape, got {a.shape} and {b.shape}")
    if mask is not None:
        m = np.asarray(mask, np.float64)
        a, b = a * m, b * m
    n = a.shape[-1]
    fa, fb = _rfftn64(a), _rfftn64(b)
    shells = _shell_grid(n)
    ns = n // 2 + 1
    num = _shell_sums(fa.real * fb.real + fa.imag * fb.imag, shells, ns)
    den = np.sqrt(_shell_sums(_power(fa), shells, ns) * _shell_sums(_power(fb), shells, ns))
    fsc = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
    return shell_frequencies(n, pixel_size_A), fsc


def shell_power(vol: np.ndarray) -> np.ndarray:
    """Mean ``|F|²`` per shell of a map's unnormalised FFT, ``(n//2+1,)``."""
    n = vol.shape[-1]
    ft = _rfftn64(np.fft.ifftshift(np.asarray(vol)))
    shells = _shell_grid(n)
    ns = n // 2 + 1
    counts = _shell_sums(torch.ones(shells.shape, dtype=torch.float64), shells, ns)
    return _shell_sums(_power(ft), shells, ns) / np.maximum(counts, 1)


def apply_shell_filter(vol: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Multiply a map's transform by a per-shell ``factor (n//2+1,)`` (zero beyond Nyquist)."""
    n = vol.shape[-1]
    ft = _rfftn64(np.fft.ifftshift(np.asarray(vol)))
    shells = _shell_grid(n)
    table = torch.zeros(n // 2 + 2, dtype=torch.float64)  # the last shell (beyond Nyquist) stays 0
    k = min(len(factor), n // 2 + 1)
    table[:k] = torch.as_tensor(np.asarray(factor, np.float64)[:k])
    if k < n // 2 + 1:  # a short factor extends with its last value up to Nyquist
        table[k:n // 2 + 1] = float(np.asarray(factor)[-1])
    out = torch.fft.irfftn(ft * table[shells], s=vol.shape)
    return np.fft.fftshift(out.numpy()).astype(np.float32)


def lowpass(vol: np.ndarray, pixel_size_A: float, resolution_A: float, edge_shells: float = 2.0) -> np.ndarray:
    """Low-pass a map to ``resolution_A`` with a raised-cosine edge of ``edge_shells``."""
    n = vol.shape[-1]
    cutoff = n * pixel_size_A / resolution_A
    s = np.arange(n // 2 + 1)
    t = np.clip((s - cutoff) / edge_shells + 0.5, 0.0, 1.0)
    return apply_shell_filter(vol, 0.5 + 0.5 * np.cos(np.pi * t))


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


def shell_index(size: int, rfft: bool = True, fftshifted: bool = True, device=None,
                zs: slice = slice(None), xs: slice = slice(None)) -> torch.Tensor:
    """Radius in Fourier pixels of each voxel of a 3D transform of a ``size`` box.

    Args:
        rfft: grid is ``(size, size, size//2 + 1)`` (else ``size³``).
        fftshifted: the full axes have the origin at index ``size//2``.
        zs: only these z planes (a slab of the grid, to bound memory).
        xs: only these x columns (the last axis).

    Returns:
        float32 tensor of the grid's shape (``zs`` planes along z, ``xs`` along x).
    """
    full = torch.fft.fftfreq(size, d=1.0 / size, device=device)
    if fftshifted:
        full = torch.fft.fftshift(full)
    last = torch.fft.rfftfreq(size, d=1.0 / size, device=device) if rfft else full
    kz, ky, kx = torch.meshgrid(full[zs], full, last[xs], indexing="ij")
    return torch.sqrt(kz ** 2 + ky ** 2 + kx ** 2).to(torch.float32)
