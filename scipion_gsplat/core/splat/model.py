"""3D Gaussian models: isotropic or anisotropic, from structures, to maps and files.

A model is ``N`` Gaussians with centres ``μ`` (Å, relative to the map centre,
voxel ``n//2``), amplitudes ``a`` (integral of each Gaussian, in the map's
density units × Å³) and either isotropic widths ``σ`` (Å) or covariances
``Σ = L·Lᵀ`` given by lower-triangular Cholesky factors ``L`` (Å)::

    V(r) = Σ_j a_j · (2π)^(-3/2) |Σ_j|^(-1/2) · exp(−½ (r − μ_j)ᵀ Σ_j⁻¹ (r − μ_j))

Maps are point samples of ``V`` times the voxel volume, so the voxel sum of
:meth:`GaussianModel.to_map` equals the total amplitude (for widths of at least
~0.7 voxel). The renderer (:mod:`.render`) samples projections the same way, so
a rendered image matches the Fourier projection of the voxelised model.

From a structure each atom (or residue) becomes one Gaussian built from its
electron scattering factor (International Tables 4.3.2.2, as tabulated by gemmi):
the five Gaussian terms ``a_i exp(−b_i s²/4)`` plus the atom's B-factor are
collapsed into one Gaussian with the same integral and the same second moment.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..io import InputError, atomic_path

B_TO_SIGMA2 = 1.0 / (8.0 * np.pi ** 2)  # σ² (Å²) per unit B (Å²)
EXP_FLOOR = -30.0     # exponents are clamped here: far tails stay normal floats (no denormals)
WINDOW_SIGMAS = 5.0   # truncated windows reach this many σ (mass lost < 1e-5)


def gaussian_profiles(grid_A: torch.Tensor, centres_A: torch.Tensor, sigmas_A: torch.Tensor,
                      pixel_size_A: float, return_z: bool = False):
    """Sampled, normalised 1D Gaussians: ``pixel/(√(2π)σ)·exp(−½((g − μ)/σ)²)``.

    The one profile used by :meth:`GaussianModel.to_map` and the isotropic
    renderer, so maps and projections share their sampling convention (their
    sum over a grid wide enough is 1).

    Args:
        grid_A: ``(G,)`` sample positions in Å (or ``(..., N, G)``: each
            centre its own samples, e.g. a window around it).
        centres_A: ``(..., N)`` centres along this axis in Å.
        sigmas_A: widths in Å, broadcastable to ``centres_A``.
        pixel_size_A: sample spacing in Å.
        return_z: also return ``z = (g − μ)/σ`` (what the derivatives need).

    Returns:
        ``(..., N, G)`` profiles (and ``z``, same shape). The exponent is clamped
        at :data:`EXP_FLOOR` so tails never become denormal floats (which slow
        products ~10×).
    """
    sig = sigmas_A.unsqueeze(-1)
    z = (grid_A - centres_A.unsqueeze(-1)) / sig
    values = (pixel_size_A / math.sqrt(2.0 * math.pi)) / sig * torch.exp(torch.clamp(-0.5 * z * z, min=EXP_FLOOR))
    return (values, z) if return_z else values


def pixel_grid_A(box: int, pixel_size_A: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Positions (Å) of the ``box`` samples of one axis, index ``box//2`` at 0."""
    return (torch.arange(box, device=device, dtype=dtype) - box // 2) * pixel_size_A


@dataclass
class GaussianModel:
    """``centres_A (N, 3)`` as (x, y, z), ``amplitudes (N,)``, and either
    ``sigmas_A (N,)`` (isotropic) or ``cholesky_A (N, 3, 3)`` (anisotropic,
    lower triangular, ``Σ = L·Lᵀ`` in Å²). For an anisotropic model
    ``sigmas_A`` holds the equivalent isotropic width ``√(tr Σ / 3)``."""
    centres_A: np.ndarray
    amplitudes: np.ndarray
    sigmas_A: Optional[np.ndarray] = None
    cholesky_A: Optional[np.ndarray] = None

    def __post_init__(self):
        self.centres_A = np.asarray(self.centres_A, np.float64).reshape(-1, 3)
        self.amplitudes = np.asarray(self.amplitudes, np.float64).reshape(-1)
        n = len(self.amplitudes)
        if len(self.centres_A) != n:
            raise InputError(f"Gaussian model: {len(self.centres_A)} centres for {n} amplitudes")
        if self.cholesky_A is not None:
            self.cholesky_A = np.tril(np.asarray(self.cholesky_A, np.float64).reshape(n, 3, 3))
            self.sigmas_A = np.sqrt(np.trace(self.covariances_A2(), axis1=1, axis2=2) / 3.0)
        elif self.sigmas_A is None:
            raise InputError("Gaussian model: give sigmas_A or cholesky_A")
        self.sigmas_A = np.broadcast_to(np.asarray(self.sigmas_A, np.float64), (n,)).copy()

    def __len__(self) -> int:
        return len(self.amplitudes)

    @property
    def is_anisotropic(self) -> bool:
        return self.cholesky_A is not None

    def covariances_A2(self) -> np.ndarray:
        """``(N, 3, 3)`` covariance matrices in Å²."""
        if self.cholesky_A is None:
            return self.sigmas_A[:, None, None] ** 2 * np.eye(3)
        return self.cholesky_A @ np.swapaxes(self.cholesky_A, 1, 2)

    def to_anisotropic(self) -> "GaussianModel":
        """The same Gaussians with Cholesky factors (``L = σ·I`` for isotropic ones)."""
        if self.is_anisotropic:
            return self
        return GaussianModel(self.centres_A.copy(), self.amplitudes.copy(),
                             cholesky_A=self.sigmas_A[:, None, None] * np.eye(3))

    def subset(self, rows) -> "GaussianModel":
        """The Gaussians at ``rows`` (indices or boolean mask)."""
        return GaussianModel(self.centres_A[rows], self.amplitudes[rows], self.sigmas_A[rows],
                             None if self.cholesky_A is None else self.cholesky_A[rows])

    @staticmethod
    def concatenate(models: Sequence["GaussianModel"],
                    weights: Optional[Sequence[float]] = None) -> "GaussianModel":
        """One model holding every Gaussian, amplitudes multiplied by ``weights``
        (e.g. ``[0.5, 0.5]``: the map of the result is the mean of the maps)."""
        weights = [1.0] * len(models) if weights is None else list(weights)
        aniso = any(m.is_anisotropic for m in models)
        if aniso:
            models = [m.to_anisotropic() for m in models]
        return GaussianModel(
            np.concatenate([m.centres_A for m in models]),
            np.concatenate([w * m.amplitudes for m, w in zip(models, weights)]),
            None if aniso else np.concatenate([m.sigmas_A for m in models]),
            np.concatenate([m.cholesky_A for m in models]) if aniso else None)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the model as ``.npz`` (atomically)."""
        arrays = {"centres_A": self.centres_A, "amplitudes": self.amplitudes, "sigmas_A": self.sigmas_A}
        if self.cholesky_A is not None:
            arrays["cholesky_A"] = self.cholesky_A
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    @classmethod
    def load(cls, path) -> "GaussianModel":
        """Read a model written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"Gaussian model not found: {path}")
        try:
            with np.load(path) as z:
                if "cholesky_A" in z:
                    return cls(z["centres_A"], z["amplitudes"], cholesky_A=z["cholesky_A"])
                return cls(z["centres_A"], z["amplitudes"], z["sigmas_A"])
        except (KeyError, ValueError, OSError) as exc:
            raise InputError(f"{path} is not a Gaussian model file: {exc}") from None

    def write_structure(self, path, origin_A=(0.0, 0.0, 0.0), cell_A: Optional[float] = None,
                        frames: Optional[Sequence[np.ndarray]] = None) -> None:
        """Export as PDB (``.pdb``) or mmCIF (``.cif``/``.mmcif``), to open in ChimeraX or Coot.

        Each Gaussian is one carbon atom (residue ``GSP``) at ``centre + origin_A``;
        its B-factor is ``8π²σ²`` (anisotropic: ``ANISOU`` = Σ in Å²), its
        occupancy the amplitude relative to the largest one. PDB B-factors stop
        at 999.99 Å² (σ ≈ 3.6 Å); mmCIF keeps any width. Use
        ``origin_A = (box//2)·pixel`` so the atoms overlay the model's map as
        written by :func:`~scipion_gsplat.core.io.write_map` (origin at the corner).

        Args:
            cell_A: edge of a cubic unit cell to record (e.g. ``box·pixel``).
            frames: optional list of ``(N, 3)`` centre sets (Å) written as
                successive models (a trajectory, e.g. along an eigen-motion)
                instead of the model's own centres.
        """
        import gemmi
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".pdb", ".cif", ".mmcif"):
            raise InputError(f"{path}: export the model as .pdb, .cif or .mmcif")
        per_chain = 9999  # PDB residue numbers have four digits
        upper = string.ascii_uppercase
        chain_names = list(upper) + [a + b for a in upper for b in upper]
        if len(self) > per_chain * len(chain_names):
            raise InputError(f"too many Gaussians ({len(self)}) to export")
        st = gemmi.Structure()
        st.name = "gsplat_model"
        if cell_A:
            st.cell = gemmi.UnitCell(cell_A, cell_A, cell_A, 90, 90, 90)
        occ = self.amplitudes / max(float(np.abs(self.amplitudes).max()), 1e-30)
        cov = self.covariances_A2() if self.is_anisotropic else None
        for k, centres in enumerate(frames if frames is not None else [self.centres_A]):
            model = gemmi.Model(str(k + 1))
            xyz = np.asarray(centres, float) + np.asarray(origin_A, float)
            for c0 in range(0, len(self), per_chain):
                chain = gemmi.Chain(chain_names[c0 // per_chain])
                for j in range(c0, min(len(self), c0 + per_chain)):
                    res = gemmi.Residue()
                    res.name = "GSP"
                    res.seqid = gemmi.SeqId(j - c0 + 1, " ")
                    res.het_flag = "H"
                    res.subchain = chain.name
                    atom = gemmi.Atom()
                    atom.name = "C"
                    atom.element = gemmi.Element("C")
                    atom.pos = gemmi.Position(*xyz[j])
                    atom.occ = float(np.clip(occ[j], 0.0, 1.0))
                    var = self.sigmas_A[j] ** 2 if cov is None else np.trace(cov[j]) / 3.0
                    atom.b_iso = float(var / B_TO_SIGMA2)
                    if suffix == ".pdb":
                        atom.b_iso = min(atom.b_iso, 999.99)  # the PDB column holds 6 characters
                    if cov is not None:
                        s = cov[j]
                        atom.aniso = gemmi.SMat33f(s[0, 0], s[1, 1], s[2, 2], s[0, 1], s[0, 2], s[1, 2])
                    res.add_atom(atom)
                    chain.add_residue(res)
                model.add_chain(chain)
            st.add_model(model)
        with atomic_path(path) as tmp:
            if suffix == ".pdb":
                st.write_minimal_pdb(tmp)
            else:
                st.make_mmcif_document().write_file(tmp)

    # ------------------------------------------------------------------ maps
    def to_map(self, box: int, pixel_size_A: float, chunk: int = 2048, device="cpu") -> np.ndarray:
        """Sample the model on a ``box³`` grid (voxel ``n//2`` at the origin).

        Isotropic Gaussians are separable, so the map is ``Σ_j a_j gz_j ⊗ gy_j ⊗
        gx_j`` (one batched product per chunk, profiles from
        :func:`gaussian_profiles`); anisotropic ones are evaluated in truncated
        windows of ±:data:`WINDOW_SIGMAS` σ around each centre.

        Returns:
            ``[z, y, x]`` float32 map (density per Å³ × voxel volume, so that
            the voxel sum equals the total amplitude).
        """
        if self.is_anisotropic:
            return _anisotropic_map(self, box, pixel_size_A, device)
        grid = pixel_grid_A(box, pixel_size_A, device, torch.float64)
        out = torch.zeros((box, box, box), dtype=torch.float64, device=device)
        mu = torch.as_tensor(self.centres_A, dtype=torch.float64, device=device)
        amp = torch.as_tensor(self.amplitudes, dtype=torch.float64, device=device)
        sig = torch.as_tensor(self.sigmas_A, dtype=torch.float64, device=device)
        for s in range(0, len(amp), chunk):
            m, a, sg = mu[s:s + chunk], amp[s:s + chunk], sig[s:s + chunk]
            gx, gy, gz = (gaussian_profiles(grid, m[:, k], sg, pixel_size_A) for k in range(3))
            out += torch.einsum("n,nz,ny,nx->zyx", a, gz, gy, gx)
        return out.cpu().numpy().astype(np.float32)


def _anisotropic_map(model: GaussianModel, box: int, pixel_size_A: float, device="cpu",
                     max_elements: int = 2 ** 24) -> np.ndarray:
    """Windowed evaluation of anisotropic Gaussians on a ``box³`` grid (float64)."""
    cov = torch.as_tensor(model.covariances_A2(), dtype=torch.float64, device=device)
    mu = torch.as_tensor(model.centres_A, dtype=torch.float64, device=device)
    amp = torch.as_tensor(model.amplitudes, dtype=torch.float64, device=device)
    prec = torch.linalg.inv(cov)
    norm = amp * pixel_size_A ** 3 / ((2 * math.pi) ** 1.5 * torch.sqrt(torch.linalg.det(cov)))
    sig_max = torch.sqrt(torch.linalg.eigvalsh(cov)[:, -1])
    half = int(min(box // 2, math.ceil(WINDOW_SIGMAS * float(sig_max.max()) / pixel_size_A)))
    off = torch.arange(-half, half + 1, device=device)
    w = len(off)
    oz, oy, ox = torch.meshgrid(off, off, off, indexing="ij")
    offsets = torch.stack([ox, oy, oz], -1).reshape(-1, 3)  # (W³, xyz)
    out = torch.zeros(box ** 3, dtype=torch.float64, device=device)
    chunk = max(1, max_elements // w ** 3)
    for s in range(0, len(amp), chunk):
        sl = slice(s, s + chunk)
        c = torch.round(mu[sl] / pixel_size_A).long() + box // 2           # (C, 3) centre voxel
        idx = c[:, None, :] + offsets[None]                                 # (C, W³, 3)
        d = (idx - box // 2).to(torch.float64) * pixel_size_A - mu[sl, None, :]
        q = torch.einsum("cwi,cij,cwj->cw", d, prec[sl], d)
        val = norm[sl, None] * torch.exp(torch.clamp(-0.5 * q, min=EXP_FLOOR))
        inside = ((idx >= 0) & (idx < box)).all(-1)
        flat = (idx[..., 2] * box + idx[..., 1]) * box + idx[..., 0]
        out.index_add_(0, flat[inside], val[inside])
    return out.reshape(box, box, box).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------- from structures
def _electron_gaussian(element, b_iso: float) -> tuple[float, float]:
    """(amplitude, σ² in Å²) of one atom's electron scattering as one Gaussian."""
    coef = element.c4322
    a = np.asarray(coef.a, float)
    b = np.asarray(coef.b, float) + b_iso
    # Each term a_i exp(−b_i s²/4) is, in real space, a 3D Gaussian of integral
    # a_i and variance b_i/(8π²) per axis; match total integral and 2nd moment.
    amp = a.sum()
    var = float((a * b).sum() / amp * B_TO_SIGMA2) if amp > 0 else b_iso * B_TO_SIGMA2
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

    Returns:
        the model, Gaussians in file order (chain by chain), so consecutive
        Gaussians are bonded neighbours along the chain.
    """
    from ..structure import center_of_mass_A
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
