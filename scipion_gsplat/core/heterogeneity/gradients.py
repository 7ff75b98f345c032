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

#: particles per backward pass: on CPU (one thread, 40 px, 1000 Gaussians) 0.85 ms per particle at
#: 16-32, 1.15 ms at 64 (cache-bound temporaries)
GRADIENT_BATCH = 32


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
    micro-batches; with several ranks each computes only its share of the rows
    (``world.shard(len(rows))``) and returns those: :func:`principal_motions`
    works on the rows split over ranks."""
    world = world or World()
    if world.size > 1:
        mine = world.shard(len(rows))
        return gradient_matrix(phys, data, np.asarray(rows)[mine], amplitudes, amp_length_A, max_elements,
                               progress if world.is_main else None)
    n = phys["centres_A"].shape[0]
    step = micro_batch_size(n, data.box, float(phys["sigmas_A"].max()), data.pixel_size_A,
                            max_elements=max_elements)
    step = max(1, min(step, GRADIENT_BATCH))
    out = []
    for s in range(0, len(rows), step):
        out.append(particle_gradients(phys, data, rows[s:s + step], amplitudes, amp_length_A))
        if progress:
            progress(min(s + step, len(rows)), len(rows))
    return torch.cat(out)


def _orthonormal_columns(y: torch.Tensor, world: World) -> torch.Tensor:
    """An orthonormal basis of the columns of the row-sharded ``y (M, q)`` (each
    rank its rows): Cholesky QR, twice for accuracy, with the ``q×q`` Gram
    matrices summed over ranks."""
    eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
    for _ in range(2):
        gram = world.all_reduce_(y.T @ y)
        gram = gram + 1e-13 * float(gram.diagonal().sum().clamp(min=1e-300)) * eye  # rank-deficient: still solvable
        r = torch.linalg.cholesky(gram, upper=True)
        y = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    return y


def principal_motions(gradients: torch.Tensor, k: int, seed: int = 0, niter: int = 6,
                      world: Optional[World] = None) -> tuple[np.ndarray, np.ndarray]:
    """Leading principal directions of the (centred) gradients.

    Randomised subspace iteration (Halko, Martinsson & Tropp 2011, as
    ``torch.pca_lowrank``) on ``k + 10`` directions, written so that it also
    runs on rows split over ranks: every product with the matrix is a local
    one plus a sum over ranks of a small ``(D, q)`` or ``(q, q)`` matrix, so no
    rank ever holds the whole matrix. Each direction's sign is fixed (its
    largest entry positive), so every run and rank count gives the same signs.

    Args:
        gradients: ``(M, D)``; with several ranks (``world``) this rank's rows of it.
        k: number of components.
        niter: subspace iterations.

    Returns:
        ``(vectors (k, D) unit rows, explained (k,) fraction of the total variance)``.
    """
    world = world or World()
    g = gradients.double()
    m, d = world.sum_int(g.shape[0]), g.shape[1]
    g = g - world.all_reduce_(g.sum(dim=0, keepdim=True)) / m
    total = world.sum_float(float(g.square().sum()))
    k = int(min(k, min(m, d) - 1))
    q = min(k + 10, m, d)
    torch.manual_seed(seed)
    basis = torch.randn(d, q, dtype=g.dtype, device=g.device)  # the same on every rank
    y = _orthonormal_columns(g @ basis, world)
    for _ in range(niter):
        basis = torch.linalg.qr(world.all_reduce_(g.T @ y)).Q
        y = _orthonormal_columns(g @ basis, world)
    _, s, vh = torch.linalg.svd(world.all_reduce_(y.T @ g), full_matrices=False)
    vectors = vh[:k]
    signs = torch.sign(vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True)))
    vectors = (vectors * torch.where(signs == 0, 1.0, signs)).contiguous().cpu().numpy()
    explained = (s[:k].square() / max(total, 1e-300)).cpu().numpy()
    return vectors, explained
