"""Analytic projections of 3D Gaussian models (torch, CPU or CUDA, differentiable).

Geometry as everywhere in the plugin (:mod:`..geometry`): a centre ``μ`` (Å,
from the box centre) lands at image position ``(A·μ)_xy`` (Å from pixel
``n//2``), ``A`` RELION's matrix; images are ``[y, x]``. The projection of a 3D
Gaussian along the beam is the 2D Gaussian with mean ``(A·μ)_xy`` and covariance
``P·A·Σ·Aᵀ·Pᵀ`` (``P`` keeps x and y) and the same integral, sampled at pixel
centres times the pixel area — the convention of :meth:`.model.GaussianModel.to_map`,
so a rendered image equals the Fourier projection of the voxelised model.

* Isotropic Gaussians are separable: ``image = Gyᵀ·diag(a)·Gx`` with ``Gx, Gy``
  ``(N, n)`` profile matrices, one batched matrix product. The profiles are
  evaluated either densely or only in a window of ±5σ around each centre and
  scattered into the matrices (``window='auto'`` picks by size: the window wins
  when it is much narrower than the box).
  The backward pass is written out (:class:`_SeparableProjection`): two batched
  products of the image gradient with the profile matrices and one elementwise
  pass per axis, with no autograd graph kept for the profiles.
* Anisotropic Gaussians (covariances ``Σ``) are evaluated in truncated ``W×W``
  tiles around each projected centre and scatter-added into the images.

Both render into the smallest centred square holding the model's support
(:func:`support_box`) and zero-pad to the box, which is exact. Origins and the
CTF are applied afterwards in Fourier space with
:func:`..fourier.apply_ctf_and_shift`, the same code path as the voxel projector.
Large batches cost more per image than small ones on CPU (big temporaries), so
callers split work into micro-batches of at most ``max_elements`` profile values
(:func:`micro_batch_size`).
"""
from __future__ import annotations

import math
import time
from typing import Mapping, Optional

import numpy as np
import torch

from ..fourier import apply_ctf_and_shift, as_tensor, pad_to
from ..io import InputError
from .model import EXP_FLOOR, WINDOW_SIGMAS, GaussianModel, gaussian_profiles, pixel_grid_A

DEFAULT_MAX_ELEMENTS = 2 ** 22  # profile/tile values per micro-batch (≈16 MB in float32)


def projected_centres_A(centres_A: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``(A·μ)_xy`` for every pose and Gaussian.

    Args:
        centres_A: ``(N, 3)`` centres (x, y, z) in Å, or ``(B, N, 3)`` with one
            set of centres per pose (deformed models, :mod:`..heterogeneity`).
        rotations: ``(B, 3, 3)`` RELION matrices ``A``.

    Returns:
        ``(B, N, 2)`` image positions (x, y) in Å from the box centre.
    """
    if centres_A.dim() == 3:
        return torch.einsum("bnk,bik->bni", centres_A, rotations[:, :2, :])
    return torch.einsum("nk,bik->bni", centres_A, rotations[:, :2, :])


def window_half_width(sigma_max_A: float, pixel_size_A: float, box: int) -> int:
    """Half width (pixels) of a window reaching ±``WINDOW_SIGMAS``·σ, at most ``box//2``."""
    return int(min(box // 2, math.ceil(WINDOW_SIGMAS * sigma_max_A / pixel_size_A)))


def support_box(centres_A: torch.Tensor, sigma_max_A: float, pixel_size_A: float, box: int) -> int:
    """Smallest centred square (pixels, ≤ ``box``) holding every projection of the
    model: the projected centres lie within ``max |μ|`` of the centre in any
    pose, and each Gaussian is rendered ±``WINDOW_SIGMAS``·σ around its centre.
    Rendering into this crop and zero-padding is exact and saves work when the
    particle is smaller than the box."""
    if centres_A.numel() == 0:
        return box
    reach = float(centres_A.detach().norm(dim=-1).max()) + WINDOW_SIGMAS * sigma_max_A
    size = 2 * int(math.ceil(reach / pixel_size_A)) + 4
    size += size % 2
    return int(min(box, size))


def _axis_profiles(pos_A: torch.Tensor, sigmas_A: torch.Tensor, box: int, pixel_size_A: float,
                   half: Optional[int]) -> tuple:
    """One axis of the separable projection: ``(B, N, box)`` profiles
    ``pixel/(√(2π)σ)·exp(−½z²)``, ``z = (g − μ)/σ``, and what their gradient
    needs: the values ``v`` and ``z`` where they were computed (``(B, N, W)``)
    and the pixel of each (``(B, N, W)`` indices; None: every pixel, dense).

    ``half``: evaluate only ``2·half+1`` pixels around each centre (the rest
    is 0, less than 1e-5 of the mass); None: every pixel of the box."""
    if half is None:
        grid, idx, valid = pixel_grid_A(box, pixel_size_A, pos_A.device, pos_A.dtype), None, None
    else:
        off = torch.arange(-half, half + 1, device=pos_A.device)
        idx = (torch.round(pos_A / pixel_size_A).long() + box // 2).unsqueeze(-1) + off   # (B, N, W)
        valid = (idx >= 0) & (idx < box)
        grid = (idx - box // 2).to(pos_A.dtype) * pixel_size_A
        idx.clamp_(0, box - 1)
    v, z = gaussian_profiles(grid, pos_A, sigmas_A, pixel_size_A, return_z=True)
    if idx is None:
        return v, v, z, None
    v.mul_(valid)
    out = torch.zeros(pos_A.shape + (box,), device=pos_A.device, dtype=pos_A.dtype)
    return out.scatter_add_(-1, idx, v), v, z, idx


def _profile_gradients(dv: torch.Tensor, v: torch.Tensor, z: torch.Tensor, sig: torch.Tensor) -> tuple:
    """``(∂L/∂μ, ∂L/∂σ)`` ``(B, N)`` of one axis from ``∂L/∂v`` (``(B, N, W)``):
    ``∂v/∂μ = v·z/σ`` and ``∂v/∂σ = v·(z² − 1)/σ`` (the exponent's part is 0
    where it was clamped at :data:`EXP_FLOOR`)."""
    t = dv.mul_(v).div_(sig.unsqueeze(-1))
    zk = z * (z.abs() < math.sqrt(-2.0 * EXP_FLOOR))
    return (t * zk).sum(-1), (t * (zk * z - 1.0)).sum(-1)


class _SeparableProjection(torch.autograd.Function):
    """``image = Gyᵀ·diag(a)·Gx`` with its gradient written out: the profile
    values are kept once, and the backward pass is two batched products and
    one elementwise pass per axis, instead of autograd's record of every
    elementwise step (about 15 % faster forward and backward on CPU).
    First derivatives only (no double backward)."""

    @staticmethod
    def forward(ctx, xy, sigmas, amplitudes, box, pixel_size_A, half):
        sig = sigmas.expand(xy.shape[:-1])
        gx, vx, zx, ix = _axis_profiles(xy[..., 0], sig, box, pixel_size_A, half)
        gy, vy, zy, iy = _axis_profiles(xy[..., 1], sig, box, pixel_size_A, half)
        gya = gy * amplitudes.unsqueeze(-1)
        ctx.save_for_backward(gx, gya, vx, zx, vy, zy, sig, amplitudes)
        ctx.index = (ix, iy)
        ctx.shapes = (sigmas.shape, amplitudes.shape)
        return torch.bmm(gya.transpose(1, 2), gx)

    @staticmethod
    def backward(ctx, dimg):
        gx, gya, vx, zx, vy, zy, sig, amplitudes = ctx.saved_tensors
        ix, iy = ctx.index
        dgx = torch.bmm(gya, dimg)                     # ∂L/∂Gx (B, N, box)
        dgy = torch.bmm(gx, dimg.transpose(1, 2))      # ∂L/∂(diag(a)·Gy)
        if ix is not None:
            dgx, dgy = dgx.gather(-1, ix), dgy.gather(-1, iy)
        da = (dgy * vy).sum(-1)
        dpx, dsx = _profile_gradients(dgx, vx, zx, sig)
        dpy, dsy = _profile_gradients(dgy.mul_(amplitudes.unsqueeze(-1)), vy, zy, sig)
        sig_shape, amp_shape = ctx.shapes
        return (torch.stack((dpx, dpy), -1), (dsx + dsy).sum_to_size(sig_shape), da.sum_to_size(amp_shape),
                None, None, None)


def render_isotropic(centres_A: torch.Tensor, amplitudes: torch.Tensor, sigmas_A: torch.Tensor,
                     rotations: torch.Tensor, box: int, pixel_size_A: float,
                     window: str = "auto") -> torch.Tensor:
    """Projections of isotropic Gaussians, centred (no origin shift, no CTF).

    Args:
        centres_A: ``(N, 3)`` Å; amplitudes ``(N,)``; sigmas_A ``(N,)`` Å.
            Centres ``(B, N, 3)`` and amplitudes ``(B, N)`` give every pose its
            own (deformed) model.
        rotations: ``(B, 3, 3)`` RELION matrices.
        box: image size ``n`` in pixels; pixel_size_A: Å.
        window: ``'dense'`` (profiles on every pixel), ``'window'`` (±5σ
            windows scattered into the profile matrices) or ``'auto'``.

    Returns:
        ``(B, n, n)`` images ``[y, x]`` (sum = total amplitude).
    """
    xy = projected_centres_A(centres_A, rotations)
    sig_max = float(sigmas_A.detach().max())
    crop = support_box(centres_A, sig_max, pixel_size_A, box)
    half = window_half_width(sig_max, pixel_size_A, crop)
    use_window = window == "window" or (window == "auto" and 2 * half + 1 <= (3 * crop) // 4)
    img = _SeparableProjection.apply(xy, sigmas_A, amplitudes, crop, pixel_size_A, half if use_window else None)
    return img if crop == box else pad_to(img, box, 2)


def render_anisotropic(centres_A: torch.Tensor, amplitudes: torch.Tensor,
                       covariances_A2: torch.Tensor, rotations: torch.Tensor, box: int,
                       pixel_size_A: float) -> torch.Tensor:
    """Projections of anisotropic Gaussians, centred, by truncated tiles.

    Each Gaussian's 2D covariance ``S = P·A·Σ·Aᵀ·Pᵀ`` is evaluated on a ``W×W``
    tile (±5 of the largest 3D σ of the model) around its projected centre, and
    the tiles are scatter-added into the images.

    Args:
        covariances_A2: ``(N, 3, 3)`` symmetric positive-definite, Å².

    Returns:
        ``(B, n, n)`` images.
    """
    xy = projected_centres_A(centres_A, rotations)                         # (B, N, 2)
    r2 = rotations[:, :2, :]
    s = torch.einsum("bik,nkl,bjl->bnij", r2, covariances_A2, r2)         # (B, N, 2, 2)
    sxx, sxy, syy = s[..., 0, 0], s[..., 0, 1], s[..., 1, 1]
    det = (sxx * syy - sxy * sxy).clamp(min=1e-12)
    sig_max = float(torch.linalg.eigvalsh(covariances_A2.detach())[:, -1].max().clamp(min=0).sqrt())
    b, n = rotations.shape[0], support_box(centres_A, sig_max, pixel_size_A, box)
    half = window_half_width(sig_max, pixel_size_A, n)
    off = torch.arange(-half, half + 1, device=xy.device)
    cpx = torch.round(xy.detach() / pixel_size_A).long() + n // 2          # (B, N, 2)
    ix = cpx[..., 0, None] + off                                           # (B, N, W)
    iy = cpx[..., 1, None] + off
    dx = (ix - n // 2).to(xy.dtype) * pixel_size_A - xy[..., 0, None]
    dy = (iy - n // 2).to(xy.dtype) * pixel_size_A - xy[..., 1, None]
    q = (syy[..., None, None] * dx[..., None, :] ** 2
         - 2.0 * sxy[..., None, None] * dy[..., :, None] * dx[..., None, :]
         + sxx[..., None, None] * dy[..., :, None] ** 2) / det[..., None, None]   # (B, N, Wy, Wx)
    norm = amplitudes * pixel_size_A ** 2 / (2.0 * math.pi * torch.sqrt(det))
    vals = norm[..., None, None] * torch.exp(torch.clamp(-0.5 * q, min=EXP_FLOOR))
    inside = (((ix >= 0) & (ix < n))[..., None, :] & ((iy >= 0) & (iy < n))[..., :, None])
    flat = iy.clamp(0, n - 1)[..., :, None] * n + ix.clamp(0, n - 1)[..., None, :]
    out = torch.zeros(b, n * n, device=xy.device, dtype=xy.dtype)
    out = out.scatter_add(1, flat.reshape(b, -1), (vals * inside).reshape(b, -1)).reshape(b, n, n)
    return out if n == box else pad_to(out, box, 2)


def render(params: Mapping[str, torch.Tensor], rotations: torch.Tensor, box: int,
           pixel_size_A: float, shifts_A: Optional[torch.Tensor] = None,
           ctf_params: Optional[Mapping] = None, window: str = "auto") -> torch.Tensor:
    """Particle images of a model: projection, then origin shift and CTF in Fourier space.

    Args:
        params: tensors ``centres_A (N, 3)``, ``amplitudes (N,)`` and either
            ``sigmas_A (N,)`` or ``covariances_A2 (N, 3, 3)`` (see :func:`model_tensors`).
        rotations: ``(B, 3, 3)`` RELION matrices.
        shifts_A: ``(B, 2)`` RELION origins in Å (subtracted), or None.
        ctf_params: per-particle CTF parameters (arrays ``(B,)``) or None.

    Returns:
        ``(B, n, n)`` images, differentiable with respect to ``params``.
    """
    if "covariances_A2" in params:
        img = render_anisotropic(params["centres_A"], params["amplitudes"], params["covariances_A2"],
                                 rotations, box, pixel_size_A)
    else:
        img = render_isotropic(params["centres_A"], params["amplitudes"], params["sigmas_A"],
                               rotations, box, pixel_size_A, window)
    return apply_ctf_and_shift(img, pixel_size_A, shifts_A, ctf_params)


def model_tensors(model: GaussianModel, device="cpu", dtype=torch.float32) -> dict:
    """The model's arrays as tensors keyed as :func:`render` expects."""
    out = {"centres_A": as_tensor(model.centres_A, device, dtype),
           "amplitudes": as_tensor(model.amplitudes, device, dtype)}
    if model.is_anisotropic:
        out["covariances_A2"] = as_tensor(model.covariances_A2(), device, dtype)
    else:
        out["sigmas_A"] = as_tensor(model.sigmas_A, device, dtype)
    return out


def elements_per_image(n_gaussians: int, box: int, sigma_max_A: float, pixel_size_A: float,
                       anisotropic: bool = False) -> int:
    """Profile (isotropic) or tile (anisotropic) values one image needs."""
    if anisotropic:
        w = 2 * window_half_width(sigma_max_A, pixel_size_A, box) + 1
        return n_gaussians * w * w
    return 2 * n_gaussians * box


def micro_batch_size(n_gaussians: int, box: int, sigma_max_A: float, pixel_size_A: float,
                     anisotropic: bool = False, max_elements: int = DEFAULT_MAX_ELEMENTS) -> int:
    """Images per micro-batch so that one holds at most ``max_elements`` values (≥ 1)."""
    per = elements_per_image(n_gaussians, box, sigma_max_A, pixel_size_A, anisotropic)
    return max(1, int(max_elements // max(per, 1)))


def project_model(model: GaussianModel, poses: np.ndarray, pixel_size_A: float, box: int,
                  shifts_A: Optional[np.ndarray] = None, ctf_params: Optional[Mapping] = None,
                  device="cpu", max_elements: int = DEFAULT_MAX_ELEMENTS,
                  progress=None) -> np.ndarray:
    """Render a model at RELION poses, with optional origins and CTF (numpy in and out).

    The counterpart of :func:`..fourier.project` for Gaussian models.

    Args:
        poses: ``(B, 3, 3)`` RELION matrices.
        shifts_A: ``(B, 2)`` origins (x, y) in Å, or None.
        ctf_params: per-particle CTF arrays ``(B,)``, or None.
        max_elements: memory bound per micro-batch (see :func:`micro_batch_size`).
        progress: optional ``callback(done, total)``.

    Returns:
        ``(B, n, n)`` float32 images.
    """
    if len(model) == 0:
        raise InputError("the Gaussian model is empty")
    params = model_tensors(model, device)
    sig_max = float(np.sqrt(np.linalg.eigvalsh(model.covariances_A2())[:, -1].max()))
    step = micro_batch_size(len(model), box, sig_max, pixel_size_A, model.is_anisotropic, max_elements)
    out = np.empty((len(poses), box, box), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(poses), step):
            sl = slice(s, s + step)
            rot = as_tensor(poses[sl], device)
            sh = None if shifts_A is None else as_tensor(shifts_A[sl], device)
            cp = None if ctf_params is None else {k: np.asarray(v)[sl] for k, v in ctf_params.items()}
            out[sl] = render(params, rot, box, pixel_size_A, sh, cp).cpu().numpy()
            if progress:
                progress(min(s + step, len(poses)), len(poses))
    return out


def throughput(model: GaussianModel, box: int, pixel_size_A: float, batch: int, device="cpu",
               backward: bool = False, min_seconds: float = 2.0, seed: int = 0,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> float:
    """Images per second rendering batches of ``batch`` random poses with origins
    and a CTF, split into micro-batches as in fitting, optionally with the
    backward pass of an L2 loss. One warm-up batch, then batches until
    ``min_seconds`` have passed."""
    from ..geometry import random_rotations
    rng = np.random.default_rng(seed)
    params = {k: v.requires_grad_(backward) for k, v in model_tensors(model, device).items()}
    rot = as_tensor(random_rotations(batch, rng), device)
    shifts = as_tensor(rng.normal(0.0, 2.0, (batch, 2)), device)
    ctf = {"defocus_u_A": rng.uniform(1e4, 2.5e4, batch), "voltage_kV": np.full(batch, 300.0),
           "cs_mm": np.full(batch, 2.7), "amplitude_contrast": np.full(batch, 0.1)}
    ctf["defocus_v_A"] = ctf["defocus_u_A"]
    sig_max = float(np.sqrt(np.linalg.eigvalsh(model.covariances_A2())[:, -1].max()))
    step = micro_batch_size(len(model), box, sig_max, pixel_size_A, model.is_anisotropic, max_elements)

    def one_batch():
        for s in range(0, batch, step):
            sl = slice(s, s + step)
            cp = {k: v[sl] for k, v in ctf.items()}
            with torch.set_grad_enabled(backward):
                img = render(params, rot[sl], box, pixel_size_A, shifts[sl], cp)
                if backward:
                    img.square().sum().backward()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    one_batch()
    done, t0 = 0, time.perf_counter()
    while True:
        one_batch()
        done += batch
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed
