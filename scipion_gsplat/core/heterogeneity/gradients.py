"""Per-particle gradients of the data-fit loss and their PCA (the initial eigen-motions).

For particle ``b`` the loss is ``L_b = ‖CTF_b ∗ render_b(μ, a) − image_b‖²`` (the
fitting loss of :mod:`..splat.fit`). Its gradient with respect to the Gaussian
centres (and, with amplitudes, to ``σ̄·log a``) points from the consensus
towards what this particle's image asks for; over many particles the leading
principal components of these gradients span the motions the data contain.
All particles of a batch are differentiated in one backward pass by giving
each image its own copy of the centres (``(B, N, 3)``).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..distributed import World
from ..splat.data import ParticleData
from ..splat.fit import data_loss
from ..splat.render import DEFAULT_MAX_ELEMENTS, micro_batch_size


def particle_gradients(phys: dict, data: ParticleData, idx: np.ndarray, amplitudes: bool,
                       amp_length_A: float, scale: float = 1.0) -> torch.Tensor:
    """Gradients of each particle's loss at the consensus.

    Args:
        phys: consensus render tensors (``centres_A (N, 3)``, ``amplitudes (N,)``,
            ``sigmas_A (N,)``), detached.
        idx: ``(B,)`` particle positions in ``data``.
        amplitudes: append the gradient with respect to ``σ̄·log a``.
        amp_length_A: ``σ̄`` (Å).
        scale: loss normaliser (pixel variance).

    Returns:
        ``(B, 3N)`` or ``(B, 4N)`` float32 gradients (centres flattened x, y, z per Gaussian).
    """
    b = len(idx)
    centres = phys["centres_A"].detach().unsqueeze(0).expand(b, -1, -1).clone().requires_grad_(True)
    p = {k: v.detach() for k, v in phys.items()}
    p["centres_A"] = centres
    leaves = [centres]
    if amplitudes:
        log_a = torch.zeros(b, centres.shape[1], device=centres.device, requires_grad=True)
        p["amplitudes"] = p["amplitudes"] * torch.exp(log_a)
        leaves.append(log_a)
    loss = data_loss(p, data, idx, scale)
    grads = torch.autograd.grad(loss, leaves)
    out = grads[0].reshape(b, -1)
    if amplitudes:
        out = torch.cat([out, grads[1] / amp_length_A], dim=1)
    return out.detach()


def gradient_matrix(phys: dict, data: ParticleData, rows: np.ndarray, amplitudes: bool,
                    amp_length_A: float, max_elements: int = DEFAULT_MAX_ELEMENTS,
                    progress: Optional[Callable[[int, int], None]] = None,
                    world: Optional[World] = None) -> torch.Tensor:
    """``(M, D)`` gradients of the particles ``rows`` (positions in ``data``), in
    micro-batches; with several ranks each computes its share of the rows and
    every rank gets the whole matrix."""
    world = world or World()
    if world.size > 1:
        mine = world.shard(len(rows))
        local = gradient_matrix(phys, data, np.asarray(rows)[mine], amplitudes, amp_length_A, max_elements,
                                progress if world.is_main else None)
        full = torch.zeros((len(rows), local.shape[1]), dtype=local.dtype, device=local.device)
        full[torch.as_tensor(mine, device=local.device)] = local
        return world.all_reduce_(full)
    n = phys["centres_A"].shape[0]
    step = micro_batch_size(n, data.box, float(phys["sigmas_A"].max()), data.pixel_size_A,
                            max_elements=max_elements)
    step = max(1, min(step, 64))
    out = []
    for s in range(0, len(rows), step):
        out.append(particle_gradients(phys, data, rows[s:s + step], amplitudes, amp_length_A))
        if progress:
            progress(min(s + step, len(rows)), len(rows))
    return torch.cat(out)


def principal_motions(gradients: torch.Tensor, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Leading principal directions of the (centred) gradients.

    Args:
        gradients: ``(M, D)``.
        k: number of components.

    Returns:
        ``(vectors (k, D) unit rows, explained (k,) fraction of the total variance)``.
    """
    g = gradients.double()
    g = g - g.mean(dim=0, keepdim=True)
    total = float(g.square().sum())
    k = int(min(k, min(g.shape) - 1))
    torch.manual_seed(seed)
    _, s, v = torch.pca_lowrank(g, q=min(k + 10, min(g.shape)), center=False, niter=6)
    vectors = v[:, :k].T.contiguous().cpu().numpy()
    explained = (s[:k].square() / max(total, 1e-300)).cpu().numpy()
    return vectors, explained
