"""Image preparation and in-plane alignment to a direction's reference view.

Each particle is prepared once (:func:`prepare_images`): its origin is removed,
its CTF corrected with a Wiener-like filter ``CTF / (CTF² + ε)``, and it is
downsampled by Fourier cropping — all on its own rfft. The prepared image is
centred and in the particle's own frame (pose ``A``).

In a direction with reference pose ``B`` (ψ = 0), a particle seen with the
equivalent pose ``A'`` is rotated in-plane by the twist of ``A'·Bᵀ`` (the
swing-twist decomposition, :func:`..geometry.swing_twist_psi_deg`) and, if
``A'`` includes the hemisphere mirror, flipped in y. With ``R2 = [[c, s], [−s, c]]``
for the twist angle, the aligned image is ``aligned(u) = image(M·R2·u)``
(``M = diag(1, −1)`` for mirrored poses): one batched ``grid_sample``.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..fourier import image_irfft
from ..geometry import swing_twist_psi_deg
from ..io import ImageReader, ParticleStar
from ..particle_spectra import centred_spectra_chunks


def prepare_images(star: ParticleStar, reader: ImageReader, new_box: int,
                   wiener_eps: Optional[float] = 0.1, device: str = "cpu", chunk: int = 512,
                   progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Centred, CTF-corrected, downsampled copies of every particle image.

    Args:
        star: particles (origins and CTF are used).
        new_box: output box in pixels (``<= box``, even).
        wiener_eps: ε of the CTF correction ``CTF/(CTF² + ε)`` (None: no correction).

    Returns:
        ``(N, new_box, new_box)`` float32 tensor on ``device``.
    """
    out = torch.empty((len(star), new_box, new_box), dtype=torch.float32, device=device)
    for rows, spec, ctf in centred_spectra_chunks(star, reader, new_box, device, chunk,
                                                  with_ctf=wiener_eps is not None):
        if ctf is not None:
            spec = spec * (ctf / (ctf * ctf + wiener_eps))
        out[torch.as_tensor(rows, device=device)] = image_irfft(spec, new_box)
        if progress:
            progress(int(rows[-1]) + 1, len(star))
    return out


def in_plane_angles_deg(pair_poses: np.ndarray, reference_poses: np.ndarray) -> np.ndarray:
    """Twist angles (degrees) of each pair's pose relative to its direction's reference."""
    return swing_twist_psi_deg(pair_poses, reference_poses)


def align_images(images: torch.Tensor, angles_deg: np.ndarray, mirror: np.ndarray) -> torch.Tensor:
    """Rotate (and mirror) prepared images into their direction's reference frame.

    Args:
        images: ``(B, m, m)`` prepared images (centre at ``m//2``).
        angles_deg: ``(B,)`` twist angles.
        mirror: ``(B,)`` booleans: flip y (hemisphere mirror).

    Returns:
        ``(B, m, m)`` aligned images (bilinear interpolation, zero outside).
    """
    m = images.shape[-1]
    dev = images.device
    t = torch.deg2rad(torch.as_tensor(np.asarray(angles_deg), dtype=torch.float32, device=dev))
    c, s = torch.cos(t), torch.sin(t)
    flip = torch.where(torch.as_tensor(np.asarray(mirror), device=dev), -1.0, 1.0)
    coords = torch.arange(m, dtype=torch.float32, device=dev) - m // 2
    uy, ux = torch.meshgrid(coords, coords, indexing="ij")
    # x_in = M · R2 · u with R2 = [[c, s], [-s, c]], M = diag(1, flip)
    xin = c[:, None, None] * ux + s[:, None, None] * uy
    yin = flip[:, None, None] * (-s[:, None, None] * ux + c[:, None, None] * uy)
    grid = torch.stack([(2 * (xin + m // 2) + 1) / m - 1, (2 * (yin + m // 2) + 1) / m - 1], dim=-1)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]
