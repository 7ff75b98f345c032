"""Isotropic 3D Gaussian models: from atomic structures, to voxel maps, to files.

A model is ``N`` Gaussians with centres ``μ`` (Å, relative to the map centre,
voxel ``n//2``), amplitudes ``a`` (integral of each Gaussian, in the map's
density units × Å³) and widths ``σ`` (Å)::

    V(r) = Σ_j a_j · (2π σ_j²)^(-3/2) · exp(−|r − μ_j|² / (2 σ_j²))

From a structure each atom (or residue) becomes one Gaussian built from its
electron scattering factor (International Tables 4.3.2.2, as tabulated by gemmi):
the five Gaussian terms ``a_i exp(−b_i s²/4)`` plus the atom's B-factor are
collapsed into one Gaussian with the same integral and the same second moment.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .io import InputError, atomic_path

_B_TO_SIGMA2 = 1.0 / (8.0 * np.pi ** 2)  # σ² (Å²) per unit B (Å²)


@dataclass
class GaussianModel:
    """``centres_A (N, 3)`` as (x, y, z), ``amplitudes (N,)``, ``sigmas_A (N,)``."""
    centres_A: np.ndarray
    amplitudes: np.ndarray
    sigmas_A: np.ndarray

    def __len__(self) -> int:
        return len(self.amplitudes)

    def save(self, path) -> None:
        """Write the model as ``.npz`` (atomically)."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, centres_A=self.centres_A, amplitudes=self.amplitudes,
                         sigmas_A=self.sigmas_A)

    @classmethod
    def load(cls, path) -> "GaussianModel":
        path = Path(path)
        if not path.exists():
            raise InputError(f"Gaussian model not found: {path}")
        with np.load(path) as z:
            return cls(z["centres_A"], z["amplitudes"], z["sigmas_A"])

    def to_map(self, box: int, pixel_size_A: float, chunk: int = 2048, device="cpu") -> np.ndarray:
        """Sample the model on a ``box³`` grid (voxel ``n//2`` at the origin).

        Each Gaussian is separable, so the map is ``Σ_j a_j gz_j ⊗ gy_j ⊗ gx_j``:
        one batched product per chunk of Gaussians.

        Returns:
            ``[z, y, x]`` float32 map (density per Å³ × voxel volume, so that
            the voxel sum equals the total amplitude).
        """
        grid = (torch.arange(box, dtype=torch.float64, device=device) - box // 2) * pixel_size_A
        out = torch.zeros((box, box, box), dtype=torch.float64, device=device)
        mu = torch.as_tensor(self.centres_A, dtype=torch.float64, device=device)
        amp = torch.as_tensor(self.amplitudes, dtype=torch.float64, device=device)
        sig = torch.as_tensor(self.sigmas_A, dtype=torch.float64, device=device)
        for s in range(0, len(amp), chunk):
            m, a, sg = mu[s:s + chunk], amp[s:s + chunk], sig[s:s + chunk]
            norm = pixel_size_A / (np.sqrt(2 * np.pi) * sg)  # 1D integral → voxel sum = 1

            def axis(k):
                return norm[:, None] * torch.exp(-0.5 * ((grid[None, :] - m[:, k, None]) / sg[:, None]) ** 2)
            out += torch.einsum("n,nz,ny,nx->zyx", a, axis(2), axis(1), axis(0))
        return out.cpu().numpy().astype(np.float32)


def _electron_gaussian(element, b_iso: float) -> tuple[float, float]:
    """(amplitude, σ² in Å²) of one atom's electron scattering as one Gaussian."""
    coef = element.c4322
    a = np.asarray(coef.a, float)
    b = np.asarray(coef.b, float) + b_iso
    # Each term a_i exp(−b_i s²/4) is, in real space, a 3D Gaussian of integral
    # a_i and variance b_i/(8π²) per axis; match total integral and 2nd moment.
    amp = a.sum()
    var = float((a * b).sum() / amp * _B_TO_SIGMA2) if amp > 0 else b_iso * _B_TO_SIGMA2
    return float(amp), var


def from_structure(st, level: str = "atom", center_A: Optional[np.ndarray] = None,
                   extra_sigma_A: float = 0.0) -> GaussianModel:
    """One Gaussian per atom or per residue of the first model.

    Args:
        st: gemmi structure.
        level: ``'atom'`` or ``'residue'`` (residue: amplitude-weighted centre,
            summed amplitude, width from the atoms' spread and their own widths).
        center_A: point moved to the origin (default: centre of mass).
        extra_sigma_A: added in quadrature to every width (e.g. a pixel-scale blur).
    """
    from .structure import center_of_mass_A
    if level not in ("atom", "residue"):
        raise InputError(f"unknown Gaussian level '{level}' (atom or residue)")
    centre = center_of_mass_A(st) if center_A is None else np.asarray(center_A, float)
    groups = []
    for chain in st[0]:
        for res in chain:
            atoms = []
            for atom in res:
                amp, var = _electron_gaussian(atom.element, atom.b_iso)
                atoms.append((np.array(atom.pos.tolist()) - centre, amp * atom.occ, var))
            if not atoms:
                continue
            if level == "atom":
                groups.extend(atoms)
            else:
                xyz = np.array([a[0] for a in atoms])
                w = np.array([a[1] for a in atoms])
                mu = (xyz * w[:, None]).sum(0) / w.sum()
                spread = (w * ((xyz - mu) ** 2).sum(1)).sum() / w.sum() / 3.0
                var = spread + (w * np.array([a[2] for a in atoms])).sum() / w.sum()
                groups.append((mu, w.sum(), var))
    if not groups:
        raise InputError("structure has no atoms")
    centres = np.array([g[0] for g in groups])
    amps = np.array([g[1] for g in groups])
    sig = np.sqrt(np.array([g[2] for g in groups]) + extra_sigma_A ** 2)
    return GaussianModel(centres, amps, sig)
