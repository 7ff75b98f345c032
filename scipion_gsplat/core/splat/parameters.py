"""Trainable parameterisation of a Gaussian model (unconstrained torch leaves).

* centres ``μ`` (Å) as they are;
* amplitudes ``a = exp(ℓ)`` (positive blobs);
* isotropic widths ``σ² = σ_min² + exp(2s)``, anisotropic covariances
  ``Σ = L·Lᵀ + σ_min²·I`` with ``L`` lower triangular, ``diag(L) = exp(d)``.
  The floor ``σ_min`` (default 0.7 pixel) keeps every Gaussian wide enough for
  point sampling to preserve its integral (error < 10⁻³).

Each raw tensor is a leaf with ``requires_grad``; :meth:`SplatParameters.tensors`
gives the physical tensors :func:`.render.render` takes, :meth:`to_model` the
:class:`.model.GaussianModel`. Parameters can be frozen individually.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

from .model import GaussianModel

NAMES = ("centres", "log_amplitudes", "width", "cholesky_offdiag")
_TRIL = (torch.tensor([1, 2, 2]), torch.tensor([0, 0, 1]))  # (row, col) of the off-diagonal of L


class SplatParameters:
    """Raw trainable tensors of ``N`` Gaussians.

    Attributes:
        raw: dict name → leaf tensor: ``centres (N, 3)``, ``log_amplitudes (N,)``,
            ``width`` (``(N,)`` log-σ excess, or ``(N, 3)`` log-diagonal of ``L``),
            and for anisotropic models ``cholesky_offdiag (N, 3)``.
        sigma_min_A: width floor in Å.
    """

    def __init__(self, raw: dict, sigma_min_A: float, trainable: Iterable[str] = NAMES):
        self.raw = raw
        self.sigma_min_A = float(sigma_min_A)
        self.trainable = set(trainable)
        for name, t in self.raw.items():
            t.requires_grad_(name in self.trainable)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_model(cls, model: GaussianModel, sigma_min_A: float, anisotropic: bool = False,
                   trainable: Iterable[str] = NAMES, device="cpu") -> "SplatParameters":
        """Raw tensors reproducing ``model`` (widths below the floor are raised to it)."""
        f = dict(device=device, dtype=torch.float32)
        amp = np.maximum(model.amplitudes, 1e-12 * max(float(np.abs(model.amplitudes).max()), 1e-30))
        raw = {"centres": torch.tensor(model.centres_A, **f),
               "log_amplitudes": torch.tensor(np.log(amp), **f)}
        floor2 = sigma_min_A ** 2
        if anisotropic:
            cov = model.covariances_A2() - floor2 * np.eye(3)
            # keep the excess positive definite: eigenvalues at least 1 % of the floor
            w, v = np.linalg.eigh(cov)
            cov = (v * np.maximum(w, 0.01 * floor2)[:, None, :]) @ np.swapaxes(v, 1, 2)
            chol = np.linalg.cholesky(cov)
            raw["width"] = torch.tensor(np.log(np.diagonal(chol, axis1=1, axis2=2)), **f)
            raw["cholesky_offdiag"] = torch.tensor(chol[:, [1, 2, 2], [0, 0, 1]], **f)
        else:
            excess = np.maximum(model.sigmas_A ** 2 - floor2, 0.01 * floor2)
            raw["width"] = torch.tensor(0.5 * np.log(excess), **f)
        return cls(raw, sigma_min_A, trainable)

    @property
    def anisotropic(self) -> bool:
        return "cholesky_offdiag" in self.raw

    def __len__(self) -> int:
        return self.raw["centres"].shape[0]

    def leaves(self) -> dict:
        """The trainable leaves (name → tensor), for the optimiser."""
        return {k: v for k, v in self.raw.items() if k in self.trainable}

    def tensors(self) -> dict:
        """Physical tensors for :func:`.render.render` (differentiable)."""
        out = {"centres_A": self.raw["centres"], "amplitudes": torch.exp(self.raw["log_amplitudes"])}
        floor2 = self.sigma_min_A ** 2
        if self.anisotropic:
            n = len(self)
            low = torch.diag_embed(torch.exp(self.raw["width"]))
            off = torch.zeros(n, 3, 3, device=low.device, dtype=low.dtype)
            off = off.index_put((torch.arange(n, device=low.device)[:, None].expand(n, 3),
                                 _TRIL[0].to(low.device).expand(n, 3), _TRIL[1].to(low.device).expand(n, 3)),
                                self.raw["cholesky_offdiag"])
            chol = low + off
            eye = torch.eye(3, device=low.device, dtype=low.dtype)
            out["covariances_A2"] = chol @ chol.transpose(1, 2) + floor2 * eye
        else:
            out["sigmas_A"] = torch.sqrt(floor2 + torch.exp(2.0 * self.raw["width"]))
        return out

    def to_model(self) -> GaussianModel:
        """The current :class:`GaussianModel` (float64 numpy)."""
        with torch.no_grad():
            t = {k: v.detach().double().cpu().numpy() for k, v in self.tensors().items()}
        if self.anisotropic:
            return GaussianModel(t["centres_A"], t["amplitudes"], cholesky_A=np.linalg.cholesky(t["covariances_A2"]))
        return GaussianModel(t["centres_A"], t["amplitudes"], t["sigmas_A"])

    # ------------------------------------------------------------------ editing
    def select(self, index: torch.Tensor) -> "SplatParameters":
        """New parameters with the Gaussians at ``index`` (repeats allowed), detached."""
        raw = {k: v.detach()[index].clone() for k, v in self.raw.items()}
        return SplatParameters(raw, self.sigma_min_A, self.trainable)

    def state(self) -> dict:
        """Detached raw tensors (for checkpoints)."""
        return {k: v.detach().cpu().clone() for k, v in self.raw.items()}

    @classmethod
    def from_state(cls, state: dict, sigma_min_A: float, trainable: Iterable[str] = NAMES,
                   device="cpu") -> "SplatParameters":
        return cls({k: v.to(device).clone() for k, v in state.items()}, sigma_min_A, trainable)


def default_sigma_min_A(pixel_size_A: float) -> float:
    """Width floor: 0.7 pixel (point-sampled integrals exact to 10⁻³)."""
    return 0.7 * pixel_size_A


def trainable_names(fit_centres: bool = True, fit_amplitudes: bool = True,
                    fit_widths: bool = True) -> tuple:
    """Names of the raw tensors to train."""
    names = []
    if fit_centres:
        names.append("centres")
    if fit_amplitudes:
        names.append("log_amplitudes")
    if fit_widths:
        names += ["width", "cholesky_offdiag"]
    return tuple(names)


def check_finite(params: SplatParameters) -> Optional[str]:
    """Name of the first raw tensor holding NaN/inf values, or None."""
    for k, v in params.raw.items():
        if not torch.isfinite(v).all():
            return k
    return None
