"""Adaptive density control (as in 3D Gaussian splatting): densify and prune.

* Densify: the Gaussians whose centre gradient, averaged over the steps since the
  last densification, is largest (the top ``fraction``) are where the model
  misses detail. Wide ones (σ above the median) are *split* into two Gaussians
  of width σ/1.6 placed ±σ apart along a random axis; narrow ones are *cloned*.
  Both halves get half the amplitude, so the map barely changes.
* Prune: Gaussians whose amplitude fell below ``threshold`` × the median
  amplitude carry no density and are removed.

The Adam moments follow the Gaussians (copied for the new ones), so the
optimiser continues smoothly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .parameters import SplatParameters

SPLIT_WIDTH_FACTOR = 1.6


@dataclass
class DensityStats:
    """Running sum of per-Gaussian centre-gradient norms ``(N,)`` and a step count."""
    grad_sum: torch.Tensor
    steps: int = 0

    @classmethod
    def zeros(cls, n: int, device="cpu") -> "DensityStats":
        return cls(torch.zeros(n, device=device))

    def add(self, centres_grad: torch.Tensor) -> None:
        self.grad_sum += centres_grad.detach().norm(dim=1)
        self.steps += 1

    def mean(self) -> torch.Tensor:
        return self.grad_sum / max(self.steps, 1)


def densify_and_prune(params: SplatParameters, optimizer: torch.optim.Adam, stats: DensityStats,
                      rng: np.random.Generator, densify_fraction: float = 0.0,
                      max_gaussians: int = 0, prune_threshold: float = 0.0):
    """One round of densification and pruning.

    Args:
        densify_fraction: fraction of the Gaussians to split/clone (0 = none).
        max_gaussians: upper bound on the count after densification (0 = 2 × current).
        prune_threshold: prune amplitudes below this × median amplitude (0 = none).

    Returns:
        ``(params, optimizer, info)`` — new objects when anything changed, and
        ``info = {'split': s, 'cloned': c, 'pruned': p, 'n': N}``.
    """
    n = len(params)
    device = params.raw["centres"].device
    with torch.no_grad():
        phys = params.tensors()
        amp = phys["amplitudes"]
        if "sigmas_A" in phys:
            width = phys["sigmas_A"]
        else:
            width = torch.sqrt(torch.diagonal(phys["covariances_A2"], dim1=1, dim2=2).mean(1))
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if prune_threshold > 0 and n > 1:
        keep = amp >= prune_threshold * amp.median()
    n_keep = int(keep.sum())
    cap = max_gaussians if max_gaussians > 0 else 2 * n
    n_new = int(min(math.floor(densify_fraction * n), max(cap - n_keep, 0)))
    grown = torch.zeros(0, dtype=torch.long, device=device)
    if n_new > 0:
        score = torch.where(keep, stats.mean(), torch.full_like(amp, -1.0))
        grown = torch.topk(score, n_new).indices
    if n_keep == n and n_new == 0:
        return params, optimizer, {"split": 0, "cloned": 0, "pruned": 0, "n": n}
    kept = torch.nonzero(keep).squeeze(1)
    index = torch.cat([kept, grown])
    raw = {k: v.detach()[index].clone() for k, v in params.raw.items()}
    # the grown Gaussians: the original (in 'kept') and its copy (appended) share the amplitude
    pos_orig = torch.searchsorted(kept, grown)
    pos_copy = torch.arange(len(kept), len(index), device=device)
    split = width[grown] > width[kept].median()
    raw["log_amplitudes"][pos_orig] -= math.log(2.0)
    raw["log_amplitudes"][pos_copy] -= math.log(2.0)
    if bool(split.any()):
        s_orig, s_copy, g = pos_orig[split], pos_copy[split], grown[split]
        axis = torch.as_tensor(rng.normal(size=(len(g), 3)), dtype=raw["centres"].dtype, device=device)
        axis = axis / axis.norm(dim=1, keepdim=True)
        step = axis * width[g, None]
        raw["centres"][s_orig] += step
        raw["centres"][s_copy] -= step
        shrink = math.log(SPLIT_WIDTH_FACTOR)
        if params.anisotropic:
            raw["width"][s_orig] -= shrink
            raw["width"][s_copy] -= shrink
            raw["cholesky_offdiag"][s_orig] /= SPLIT_WIDTH_FACTOR
            raw["cholesky_offdiag"][s_copy] /= SPLIT_WIDTH_FACTOR
        else:
            _shrink_isotropic(raw["width"], s_orig, params.sigma_min_A)
            _shrink_isotropic(raw["width"], s_copy, params.sigma_min_A)
    new = SplatParameters(raw, params.sigma_min_A, params.trainable)
    return new, _transplant_adam(optimizer, params, new, index), {
        "split": int(split.sum()), "cloned": int((~split).sum()), "pruned": n - n_keep, "n": len(index)}


def _shrink_isotropic(width_raw: torch.Tensor, rows: torch.Tensor, sigma_min_A: float) -> None:
    """Divide σ by :data:`SPLIT_WIDTH_FACTOR` in the ``σ² = σ_min² + exp(2s)`` parameterisation."""
    sig2 = sigma_min_A ** 2 + torch.exp(2.0 * width_raw[rows])
    target = sig2 / SPLIT_WIDTH_FACTOR ** 2
    excess = torch.clamp(target - sigma_min_A ** 2, min=0.01 * sigma_min_A ** 2)
    width_raw[rows] = 0.5 * torch.log(excess)


def make_optimizer(params: SplatParameters, lrs: dict) -> torch.optim.Adam:
    """Adam with one parameter group per trainable tensor (``lrs``: name → learning rate)."""
    groups = [{"params": [t], "lr": lrs[name], "name": name, "base_lr": lrs[name]}
              for name, t in params.leaves().items()]
    return torch.optim.Adam(groups, eps=1e-12)


def _transplant_adam(optimizer: torch.optim.Adam, old: SplatParameters, new: SplatParameters,
                     index: torch.Tensor) -> torch.optim.Adam:
    """A new Adam over ``new``'s leaves whose moments are the old ones at ``index``."""
    lrs = {g["name"]: g["base_lr"] for g in optimizer.param_groups}
    current = {g["name"]: g["lr"] for g in optimizer.param_groups}
    opt = make_optimizer(new, lrs)
    old_leaves = old.leaves()
    for g in opt.param_groups:
        g["lr"] = current[g["name"]]
        p_new = g["params"][0]
        state = optimizer.state.get(old_leaves[g["name"]])
        if state:
            opt.state[p_new] = {k: (v[index].clone() if torch.is_tensor(v) and v.dim() > 0 else
                                    (v.clone() if torch.is_tensor(v) else v)) for k, v in state.items()}
    return opt
