"""Refit the consensus model and its motions with the particle coordinates fixed.

Minibatch Adam on the same normalised L2 loss as :mod:`..splat.fit`, every
particle rendered from the model deformed by its own coordinates; consensus
centres, amplitudes, widths and the motions (and amplitude motions) learn
together. Alternating this with :mod:`.coordinates` sharpens both: the motions
stop being the blurred PCA directions of gradients and become the displacement
fields that explain the images.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..distributed import World
from ..splat.data import ParticleData
from ..splat.fit import FitDivergedError, data_loss, lr_factor
from ..splat.render import DEFAULT_MAX_ELEMENTS, micro_batch_size
from .motion_model import MotionModel

LEARNING_RATES = {"centres": 0.05, "log_amplitudes": 0.02, "width": 0.02, "cholesky_offdiag": 0.02,
                  "motions": 0.01, "amp_motions": 0.002}


def refit(mm: MotionModel, data: ParticleData, z: torch.Tensor, epochs: int = 1, batch: int = 32,
          seed: int = 0, scale: Optional[float] = None, lr_scale: float = 1.0,
          max_elements: int = DEFAULT_MAX_ELEMENTS, z_chol: Optional[torch.Tensor] = None,
          progress: Optional[Callable[[int, int], None]] = None, world: Optional[World] = None) -> list:
    """Adam on model and motions, coordinates ``z (M, K)`` fixed; in place.

    With ``z_chol (M, K, K)``, the lower Cholesky factors ``L`` of each
    particle's posterior covariance, every step renders a particle at a fresh
    draw ``z + L·ε`` (``ε`` standard normal, seeded) instead of at ``z``: a
    Monte Carlo EM step, whose expected loss also penalises the motions for
    how uncertain each particle's coordinates are, where plain posterior means
    would treat them as exact.

    With several ranks (``world``) each takes its share of every minibatch and
    the gradients and losses are summed over ranks before the same Adam step.

    Returns:
        the mean loss of each epoch.
    """
    world = world or World()
    leaves = mm.leaves()
    for t in leaves.values():
        t.requires_grad_(True)
    groups = [{"params": [t], "lr": LEARNING_RATES[name] * lr_scale, "base_lr": LEARNING_RATES[name] * lr_scale}
              for name, t in leaves.items()]
    opt = torch.optim.Adam(groups, eps=1e-12)
    scale = scale or data.mean_variance(seed=seed)
    with torch.no_grad():
        sig = float(mm.base.tensors()["sigmas_A"].max())
    micro = max(1, min(micro_batch_size(len(mm), data.box, sig, data.pixel_size_A, max_elements=max_elements),
                       batch))
    gen = torch.Generator(device=z.device).manual_seed(seed)
    steps_total, step, losses = epochs * math.ceil(len(data) / batch), 0, []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, 31, epoch]).permutation(len(data))
        total = 0.0
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            f = lr_factor(step / max(steps_total, 1), 0.1)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            opt.zero_grad(set_to_none=True)
            phys = mm.base.tensors()
            batch_loss = 0.0
            if z_chol is not None:  # a draw from each particle's posterior (Monte Carlo EM)
                eps = torch.randn((len(idx), z.shape[1]), generator=gen, device=z.device)
            mine = world.shard(len(idx))  # this rank's positions in the batch
            lo, hi = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
            for m0 in range(lo, hi, micro):
                m1 = min(m0 + micro, hi)
                part = idx[m0:m1]
                zp = z[part]
                if z_chol is not None:
                    zp = zp + (z_chol[part] @ eps[m0:m1].unsqueeze(-1)).squeeze(-1)
                loss = data_loss(mm.deformed(zp, phys), data, part, scale * len(idx))
                loss.backward(retain_graph=m1 < hi)
                batch_loss += float(loss.detach())
            batch_loss, = world.sum_gradients(list(leaves.values()), [batch_loss])  # one round trip per step
            if not math.isfinite(batch_loss):
                raise FitDivergedError(f"the loss became {batch_loss} while refitting the motions "
                                       f"(epoch {epoch + 1}): check the particles for bad values")
            opt.step()
            step += 1
            total += batch_loss * len(idx)
            if progress and world.is_main:
                progress(step, steps_total)
        losses.append(total / len(data))
    for t in leaves.values():
        t.requires_grad_(False)
    return losses
