"""A Gaussian model with eigen-motions: the deformable model of GMM heterogeneity.

Per particle ``b`` with coordinates ``z_b (K,)``::

    μ_b = μ + Σ_k z_bk · V_k            V: (K, N, 3) Å per unit coordinate
    a_b = a · exp(Σ_k z_bk · W_k)       W: (K, N) log-amplitude per unit (optional)

Motions are scaled so that one unit of a coordinate moves the Gaussians by 1 Å
root-mean-square (counting amplitude changes as displacements of ``σ̄·Δlog a``,
the displacement that changes a Gaussian's image as much), so coordinates read
as Å of RMS displacement from the consensus.

With parts (:mod:`.parts`), every particle also has ``6P`` rigid coordinates
(a rotation in degrees and a translation in Å per part) placed before the ``K``
residual ones: ``z = [rigid (6P), residual (K)]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..io import InputError, atomic_path
from ..splat.model import GaussianModel
from ..splat.parameters import SplatParameters, default_sigma_min_A
from .parts import RIGID_DOFS, apply_rigid, rigid_names


@dataclass
class MotionModel:
    """Consensus parameters plus motions (torch leaves, trainable).

    Attributes:
        base: the consensus Gaussians (isotropic).
        motions: ``(K, N, 3)`` displacement (Å) per unit coordinate.
        amp_motions: ``(K, N)`` log-amplitude change per unit coordinate, or None.
        amp_length_A: ``σ̄``, the length (Å) one unit of log-amplitude counts as.
        parts: ``(N,)`` part index per Gaussian (−1: in no part), or None.
        part_centres: ``(P, 3)`` rotation centres of the parts (Å), or None.
    """
    base: SplatParameters
    motions: torch.Tensor
    amp_motions: Optional[torch.Tensor]
    amp_length_A: float
    parts: Optional[torch.Tensor] = None
    part_centres: Optional[torch.Tensor] = None

    @property
    def n_motions(self) -> int:
        """Residual (linear) eigen-motions ``K``."""
        return int(self.motions.shape[0])

    @property
    def n_rigid(self) -> int:
        """Rigid coordinates ``6P`` (0 without parts)."""
        return 0 if self.part_centres is None else RIGID_DOFS * int(self.part_centres.shape[0])

    @property
    def n_coordinates(self) -> int:
        return self.n_rigid + self.n_motions

    def coordinate_names(self) -> list:
        return rigid_names(self.n_rigid // RIGID_DOFS) + [f"motion{k + 1}" for k in range(self.n_motions)]

    def __len__(self) -> int:
        return len(self.base)

    def leaves(self) -> dict:
        out = dict(self.base.leaves())
        out["motions"] = self.motions
        if self.amp_motions is not None:
            out["amp_motions"] = self.amp_motions
        return out

    def deformed(self, z: torch.Tensor, phys: Optional[dict] = None) -> dict:
        """Render parameters of the model deformed by coordinates
        ``z (B, 6P + K)``: centres ``(B, N, 3)``, amplitudes ``(B, N)`` (or
        ``(N,)``), widths ``(N,)``."""
        phys = self.base.tensors() if phys is None else phys
        out = dict(phys)
        res = z[:, self.n_rigid:]
        centres = phys["centres_A"] + torch.einsum("bk,kni->bni", res, self.motions)
        if self.n_rigid:
            centres = apply_rigid(centres, z[:, :self.n_rigid], self.parts, self.part_centres)
        out["centres_A"] = centres
        if self.amp_motions is not None:
            out["amplitudes"] = phys["amplitudes"] * torch.exp(res @ self.amp_motions)
        return out

    def frame(self, z: np.ndarray) -> GaussianModel:
        """The deformed model at one coordinate vector ``z (K,)`` (numpy)."""
        with torch.no_grad():
            p = self.deformed(torch.as_tensor(np.asarray(z, np.float32)[None], device=self.motions.device))
            amps = p["amplitudes"][0] if p["amplitudes"].dim() == 2 else p["amplitudes"]
            return GaussianModel(p["centres_A"][0].double().cpu().numpy(), amps.double().cpu().numpy(),
                                 p["sigmas_A"].double().cpu().numpy())

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Re-centre and re-scale the residual motions in place so their
        coordinates have mean 0 and each moves 1 Å RMS per unit; returns the
        matching coordinates (rigid coordinates are left as they are)."""
        if self.n_rigid:
            rest = self._normalise_residual(z[:, self.n_rigid:])
            return torch.cat([z[:, :self.n_rigid], rest], dim=1)
        return self._normalise_residual(z)

    def _normalise_residual(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mean = z.mean(dim=0)
            self.base.raw["centres"] += torch.einsum("k,kni->ni", mean, self.motions)
            if self.amp_motions is not None:
                self.base.raw["log_amplitudes"] += mean @ self.amp_motions
            z = z - mean
            rms = self.rms_displacement()
            self.motions /= rms[:, None, None]
            if self.amp_motions is not None:
                self.amp_motions /= rms[:, None]
            return z * rms

    def rms_displacement(self) -> torch.Tensor:
        """``(K,)`` RMS displacement (Å) of one unit of each coordinate."""
        with torch.no_grad():
            sq = self.motions.square().sum(dim=(1, 2))
            if self.amp_motions is not None:
                sq = sq + (self.amp_length_A * self.amp_motions).square().sum(dim=1)
            return torch.sqrt(sq / len(self)).clamp(min=1e-12)

    def to_model(self) -> GaussianModel:
        return self.base.to_model()

    # ------------------------------------------------------------------ files
    def state(self) -> dict:
        """Numpy arrays from which :meth:`from_state` rebuilds this model bit for
        bit (for checkpoints): the raw trainable tensors ``raw_<name>`` of the
        consensus (not the centres, amplitudes and widths derived from them,
        which do not convert back exactly), the motions and the parts."""
        arrays = {f"raw_{k}": v.numpy() for k, v in self.base.state().items()}
        arrays.update(sigma_min_A=np.float64(self.base.sigma_min_A), motions_A=self.motions.detach().cpu().numpy(),
                      amp_length_A=np.float64(self.amp_length_A))
        if self.amp_motions is not None:
            arrays["amp_motions"] = self.amp_motions.detach().cpu().numpy()
        if self.parts is not None:
            arrays["parts"] = self.parts.cpu().numpy()
            arrays["part_centres_A"] = self.part_centres.cpu().numpy()
        return arrays

    @classmethod
    def from_state(cls, arrays, device="cpu") -> "MotionModel":
        """The model :meth:`state` gave ``arrays`` of (a dict or an open ``.npz``)."""
        raw = {k[len("raw_"):]: torch.from_numpy(np.array(arrays[k])) for k in arrays if k.startswith("raw_")}
        base = SplatParameters.from_state(raw, float(arrays["sigma_min_A"]), device=device)

        def tensor(name):
            return torch.from_numpy(np.array(arrays[name])).to(device) if name in arrays else None
        return cls(base, tensor("motions_A"), tensor("amp_motions"), float(arrays["amp_length_A"]),
                   tensor("parts"), tensor("part_centres_A"))

    def save(self, path, coordinates: Optional[np.ndarray] = None, **extra) -> None:
        """Write an ``.npz``: consensus model, motions, optional coordinates and extras."""
        m = self.to_model()
        arrays = {"centres_A": m.centres_A, "amplitudes": m.amplitudes, "sigmas_A": m.sigmas_A,
                  "motions_A": self.motions.detach().cpu().numpy(),
                  "amp_length_A": np.float64(self.amp_length_A),
                  "sigma_min_A": np.float64(self.base.sigma_min_A)}
        if self.amp_motions is not None:
            arrays["amp_motions"] = self.amp_motions.detach().cpu().numpy()
        if coordinates is not None:
            arrays["coordinates"] = np.asarray(coordinates)
        if self.parts is not None:
            arrays["parts"] = self.parts.cpu().numpy()
            arrays["part_centres_A"] = self.part_centres.cpu().numpy()
        arrays.update({k: np.asarray(v) for k, v in extra.items()})
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    @classmethod
    def load(cls, path, device="cpu") -> tuple["MotionModel", Optional[np.ndarray]]:
        """Read what :meth:`save` wrote; returns ``(model, coordinates or None)``."""
        path = Path(path)
        try:
            d = np.load(path)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a motion model file ({exc})") from None
        if "motions_A" not in d:
            raise InputError(f"{path}: no motions in this file (not written by gsplat_gmm_heterogeneity)")
        model = GaussianModel(d["centres_A"], d["amplitudes"], d["sigmas_A"])
        base = SplatParameters.from_model(model, float(d["sigma_min_A"]), device=device)
        amp = torch.tensor(d["amp_motions"], device=device) if "amp_motions" in d else None
        parts = torch.tensor(d["parts"], device=device) if "parts" in d else None
        centres = torch.tensor(d["part_centres_A"], device=device) if "part_centres_A" in d else None
        mm = cls(base, torch.tensor(d["motions_A"], device=device), amp, float(d["amp_length_A"]), parts, centres)
        return mm, (d["coordinates"] if "coordinates" in d else None)


def isotropic(model: GaussianModel) -> GaussianModel:
    """The model with each covariance replaced by the isotropic one of equal
    mean variance (the deformation code renders isotropic Gaussians)."""
    if not model.is_anisotropic:
        return model
    sig = np.sqrt(np.trace(model.covariances_A2(), axis1=1, axis2=2) / 3.0)
    return GaussianModel(model.centres_A, model.amplitudes, sig)


def base_parameters(model: GaussianModel, pixel_size_A: float, device="cpu") -> SplatParameters:
    """Trainable consensus parameters (isotropic, width floor 0.7 pixel)."""
    return SplatParameters.from_model(isotropic(model), default_sigma_min_A(pixel_size_A), device=device)


def motions_from_vectors(vectors: np.ndarray, n_gaussians: int, amplitudes: bool, amp_length_A: float,
                         device="cpu") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Split unit PCA vectors ``(K, 3N [+ N])`` into position motions ``(K, N, 3)``
    and log-amplitude motions ``(K, N)`` (the amplitude block is in units of
    ``σ̄·log a``), scaled to 1 Å RMS per unit coordinate."""
    k = vectors.shape[0]
    v = np.asarray(vectors, np.float64) * np.sqrt(n_gaussians)
    motions = torch.tensor(v[:, :3 * n_gaussians].reshape(k, n_gaussians, 3), dtype=torch.float32, device=device)
    amp = None
    if amplitudes:
        amp = torch.tensor(v[:, 3 * n_gaussians:] / amp_length_A, dtype=torch.float32, device=device)
    return motions, amp
