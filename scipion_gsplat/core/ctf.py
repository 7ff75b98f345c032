"""RELION-convention contrast transfer function, in torch (numpy wrapper).

Formula as in RELION 3.1 ``ctf.h``::

    λ = 12.2643247 / sqrt(V·(1 + 0.978466e-6·V))          (Å, V in volts)
    Δf(θ) = −[(dU + dV)/2 + (dU − dV)/2 · cos 2(θ − azimuth)]
    χ(k) = π·λ·Δf·|k|² + (π/2)·Cs·λ³·|k|⁴ − phase_shift − atan(Q0/√(1−Q0²))
    CTF(k) = −sin χ · exp(−B|k|²/4) · scale

with ``k`` in 1/Å, ``θ`` the angle of ``k`` from the image x axis, defocus in Å
(positive = underfocus) and Cs in Å. The CTF is positive at low frequency, so
simulated particles keep the map's contrast. We keep our own implementation
rather than ``torch-ctf`` because that library measures the astigmatism angle
from the y axis and takes defocus in µm: matching RELION through it needs a
conversion layer longer than the formula.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kV * 1e3
    return 12.2643247 / (v * (1.0 + v * 0.978466e-6)) ** 0.5


def rfft_frequencies(box: int, pixel_size_A: float, device=None, dtype=torch.float32):
    """Spatial frequencies (1/Å) of the unshifted 2D rfft grid of a ``box`` image.

    Returns:
        ``(ky, kx)`` each ``(box, box//2 + 1)``.
    """
    ky = torch.fft.fftfreq(box, d=pixel_size_A, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(box, d=pixel_size_A, device=device, dtype=dtype)
    return torch.meshgrid(ky, kx, indexing="ij")


def ctf_2d(params: Mapping[str, torch.Tensor], box: int, pixel_size_A: float,
           device=None, dtype=torch.float32) -> torch.Tensor:
    """CTF on the unshifted rfft grid of ``box``-pixel images.

    Args:
        params: per-particle tensors or arrays ``(B,)`` with keys
            ``defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm,
            amplitude_contrast`` and optionally ``phase_shift_deg, bfactor_A2,
            scale`` (as returned by ``ParticleStar.ctf_params``).
        box: image size in pixels (the grid may be a padded box).
        pixel_size_A: pixel size in Å.

    Returns:
        ``(B, box, box//2 + 1)`` real CTF values.
    """
    def get(key, default=None):
        v = params.get(key, default)
        if not torch.is_tensor(v):
            v = torch.tensor(np.asarray(v, dtype=np.float64))
        return v.to(device=device, dtype=torch.float64).reshape(-1, 1, 1)

    ky, kx = rfft_frequencies(box, pixel_size_A, device=device, dtype=torch.float64)
    k2 = kx ** 2 + ky ** 2
    angle = torch.atan2(ky, kx)
    du, dv = get("defocus_u_A"), get("defocus_v_A")
    azimuth = torch.deg2rad(get("defocus_angle_deg", 0.0))
    lam = electron_wavelength_A(get("voltage_kV"))
    cs_A = get("cs_mm") * 1e7
    q0 = get("amplitude_contrast")
    deltaf = -(0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2.0 * (angle - azimuth)))
    chi = (math.pi * lam * deltaf * k2 + 0.5 * math.pi * cs_A * lam ** 3 * k2 ** 2
           - torch.deg2rad(get("phase_shift_deg", 0.0))
           - torch.atan(q0 / torch.sqrt(1.0 - q0 ** 2)))
    ctf = -torch.sin(chi)
    bfac = get("bfactor_A2", 0.0)
    ctf = ctf * torch.exp(-0.25 * bfac * k2) * get("scale", 1.0)
    return ctf.to(dtype)


def ctf_2d_numpy(params: Mapping[str, np.ndarray], box: int, pixel_size_A: float) -> np.ndarray:
    """numpy version of :func:`ctf_2d` (same code path), float32 ``(B, box, box//2+1)``."""
    return ctf_2d(params, box, pixel_size_A).numpy()


def select_params(params: Mapping[str, np.ndarray], rows) -> dict:
    """The CTF parameters of a subset of particles."""
    return {k: np.asarray(v)[rows] for k, v in params.items()}
