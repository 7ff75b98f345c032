"""Fit a Gaussian model to particles with known poses and CTF (Adam, minibatches).

Loss per optimiser step (``B`` particles, ``n×n`` pixels)::

    L = Σ_b Σ_pixels (CTF_b ∗ render_b(θ) − image_b)² / (B · n² · v̄)
        + k · mean_pairs (|μ_i − μ_j| − r₀)²

with ``v̄`` the mean pixel variance of the particles (so ``L ≈ 1`` for an empty
model) and the optional harmonic bond term of Dräger's Gaussian-splatting report between neighbouring
Gaussians. Each step's batch is rendered in micro-batches that respect a memory
bound and their gradients accumulated. Learning rates follow a cosine decay
from their base values to ``lr_final`` × base over the run (or over the time
limit, whichever ends first). Densification and pruning (:mod:`.densify`) run
between epochs when enabled. A checkpoint (parameters, Adam state, history) is
written after every epoch, and a fit restarted with the same checkpoint path
continues from it.

Pose refinement (``sigma_ang_deg``/``sigma_shift_A`` > 0): every particle's
rotation and origin get corrections (:mod:`..poses.gradient`) optimised with
the model by their own row-wise Adam, with a Gaussian prior in the units of the
data loss; they start moving once the run is ``pose_start`` through (the model
must first resemble the particles). Without it the fit is unchanged, bit for bit.

Several ranks (:mod:`..distributed`): every rank draws the same minibatch, takes
its contiguous share of it, and the gradients (model and pose corrections) and
losses are summed over ranks before the identical Adam step on every rank, so
the fit follows the one-process fit up to float summation order. Only rank 0
writes the checkpoint and the log lines.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..distributed import World
from ..io import InputError, atomic_path
from ..poses.gradient import PoseCorrections
from .data import ParticleData
from .densify import DensityStats, densify_and_prune, make_optimizer
from .model import GaussianModel
from .parameters import SplatParameters, check_finite, default_sigma_min_A, trainable_names
from .render import DEFAULT_MAX_ELEMENTS, micro_batch_size, render


class FitDivergedError(InputError):
    """The loss became NaN or infinite."""


@dataclass
class FitConfig:
    """Settings of :func:`fit` (lengths in Å).

    Attributes:
        epochs: passes over the particles.
        batch: particles per optimiser step.
        lr_centres_A, lr_amplitudes, lr_widths: Adam step sizes (centres in Å;
            amplitudes and widths act on their logarithms).
        lr_final: learning rates decay (cosine) to this fraction of their base.
        fit_centres, fit_amplitudes, fit_widths: which parameters are learned.
        anisotropic: learn full covariances (Cholesky) instead of one width.
        sigma_min_A: width floor (default 0.7 pixel).
        bond_weight: ``k`` of the harmonic bond term (0 = off).
        bond_length_A: ``r₀`` (default: median initial pair length).
        densify_every: epochs between densify/prune rounds (0 = never).
        densify_until: no densification after this fraction of the epochs.
        densify_fraction: fraction of Gaussians split/cloned per round.
        max_gaussians: cap on the count (0 = twice the initial count).
        prune_threshold: prune amplitudes below this × median (0 = off).
        max_elements: memory bound of one micro-batch (profile values).
        time_limit_s: stop after this many seconds (the schedule follows it).
        window: isotropic renderer mode ('auto', 'dense', 'window').
        sigma_ang_deg: prior σ of each particle's rotation correction (degrees
            per rotation-vector component; 0 = rotations fixed).
        sigma_shift_A: prior σ of each particle's origin correction (Å per
            axis; 0 = origins fixed).
        lr_pose_deg, lr_pose_shift_A: Adam steps of the rotation (degrees) and
            origin (Å) corrections (same cosine decay as the model).
        pose_start: fraction of the run (steps or time) after which the poses
            start moving.
    """
    epochs: int = 20
    batch: int = 32
    lr_centres_A: float = 0.1
    lr_amplitudes: float = 0.05
    lr_widths: float = 0.05
    lr_final: float = 0.05
    fit_centres: bool = True
    fit_amplitudes: bool = True
    fit_widths: bool = True
    anisotropic: bool = False
    sigma_min_A: Optional[float] = None
    bond_weight: float = 0.0
    bond_length_A: Optional[float] = None
    densify_every: int = 0
    densify_until: float = 0.6
    densify_fraction: float = 0.05
    max_gaussians: int = 0
    prune_threshold: float = 0.0
    max_elements: int = DEFAULT_MAX_ELEMENTS
    time_limit_s: Optional[float] = None
    window: str = "auto"
    sigma_ang_deg: float = 0.0
    sigma_shift_A: float = 0.0
    lr_pose_deg: float = 1.0
    lr_pose_shift_A: float = 0.4
    pose_start: float = 0.0

    @property
    def refine_poses(self) -> bool:
        return self.sigma_ang_deg > 0 or self.sigma_shift_A > 0


@dataclass
class FitResult:
    """Fitted model, per-epoch history (dicts: epoch, loss, n_gaussians, seconds, lr).

    ``pose_omega (M, 3)`` rad and ``pose_shift_A (M, 2)`` Å are the pose
    corrections of ``data``'s particles (None when the poses were fixed); apply
    them with :meth:`.data.ParticleData.with_pose_corrections`.
    """
    model: GaussianModel
    history: list = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    stopped_early: bool = False
    pose_omega: Optional[np.ndarray] = None
    pose_shift_A: Optional[np.ndarray] = None


def lr_factor(progress: float, final: float) -> float:
    """Cosine decay from 1 at ``progress = 0`` to ``final`` at 1."""
    p = min(max(progress, 0.0), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * p))


def data_loss(params: dict, data: ParticleData, idx: np.ndarray, scale: float,
              window: str = "auto", poses=None, part: slice = slice(None)) -> torch.Tensor:
    """Sum over the particles ``idx`` of their squared residuals / (n² · scale).

    ``poses``: optional :class:`..poses.gradient.PoseBatch` whose rows ``part``
    correct the poses of ``idx`` (differentiable in the corrections)."""
    imgs, rot, sh, ctf = data.batch(idx)
    if poses is not None:
        rot, sh = poses.apply(rot, sh, part)
    pred = render(params, rot, data.box, data.pixel_size_A, sh, ctf, window)
    return (pred - imgs).square().sum() / (data.box ** 2 * scale)


def calibrate_scale(params: SplatParameters, data: ParticleData, n: int = 256, seed: int = 0,
                    max_elements: int = DEFAULT_MAX_ELEMENTS, world: Optional[World] = None) -> float:
    """Rescale the amplitudes by the least-squares factor between rendered and
    real particles (on up to ``n`` of them); returns the factor. With several
    ranks (``world``) each renders its share of the ``n`` and the sums are added.

    Raises:
        InputError: the model anti-correlates with the particles (wrong contrast,
            wrong hand or wrong poses).
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data), size=min(n, len(data)), replace=False))
    world = world or World()
    idx = idx[world.shard(len(idx))]
    step = _micro(params, data, max_elements)
    num = den = 0.0
    with torch.no_grad():
        phys = params.tensors()
        for s in range(0, len(idx), step):
            imgs, rot, sh, ctf = data.batch(idx[s:s + step])
            pred = render(phys, rot, data.box, data.pixel_size_A, sh, ctf)
            num += float((pred * imgs).sum())
            den += float((pred * pred).sum())
    num, den = (float(v) for v in world.sum_arrays(num, den))
    if not den > 0 or not num > 0:
        raise InputError("the initial model does not correlate positively with the particles "
                         "(inverted contrast, wrong poses, or an empty model?)")
    factor = num / den
    with torch.no_grad():
        params.raw["log_amplitudes"] += math.log(factor)
    return factor


def _micro(params: SplatParameters, data: ParticleData, max_elements: int) -> int:
    with torch.no_grad():
        phys = params.tensors()
        if "sigmas_A" in phys:
            sig = float(phys["sigmas_A"].max())
        else:
            sig = float(torch.linalg.eigvalsh(phys["covariances_A2"])[:, -1].max().sqrt())
    return micro_batch_size(len(params), data.box, sig, data.pixel_size_A, params.anisotropic, max_elements)


def bond_energy(centres: torch.Tensor, pairs: torch.Tensor, length_A: float) -> torch.Tensor:
    """Mean of ``(|μ_i − μ_j| − r₀)²`` over the pairs (Å²)."""
    d = (centres[pairs[:, 0]] - centres[pairs[:, 1]]).norm(dim=1)
    return (d - length_A).square().mean()


def _save_checkpoint(path, params, optimizer, epoch, step, history, signature, elapsed,
                     poses=None) -> None:
    state = {"raw": params.state(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "step": step, "history": history, "signature": signature,
             "sigma_min_A": params.sigma_min_A, "elapsed": elapsed}
    if poses is not None:
        state["poses"] = poses.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path, signature, device, log=None):
    """The checkpoint at ``path`` if it was computed from the same inputs and
    settings (``signature``); else None, saying why in ``log``."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        theirs = ck.get("signature") or {}
    except Exception:  # a truncated or foreign file: start again
        if log:
            log(f"checkpoint {path} cannot be read; starting afresh")
        return None
    if theirs == signature:
        return ck
    if log:
        why = "from other inputs" if theirs.get("inputs") != signature.get("inputs") else "with other settings"
        log(f"checkpoint {path} was computed {why}; starting afresh")
    return None


def fit(model: GaussianModel, data: ParticleData, config: FitConfig, seed: int = 0,
        pairs: Optional[np.ndarray] = None, checkpoint=None,
        progress: Optional[Callable[[int, int], None]] = None,
        log: Optional[Callable[[str], None]] = None, calibrate: bool = True,
        inputs: Optional[str] = None, world: Optional[World] = None) -> FitResult:
    """Fit ``model`` to ``data`` by minibatch Adam.

    Args:
        model: initial model (isotropic; made anisotropic when ``config.anisotropic``).
        data: particles with poses, origins and CTF.
        seed: minibatch order (epoch ``e`` uses ``default_rng([seed, e])``) and
            densification randomness.
        pairs: ``(P, 2)`` Gaussian index pairs for the bond term (needed when
            ``config.bond_weight > 0``; densification turns the term off).
        checkpoint: file to write after every epoch and to resume from; only a
            checkpoint of the same ``inputs``, model size, seed and configuration
            is resumed.
        progress: ``callback(steps_done, steps_total)``.
        log: ``callback(line)`` for one line per epoch.
        calibrate: rescale the initial amplitudes to the data first.
        inputs: what the data and the initial model were computed from
            (:func:`..safety.input_signature`: particle rows, stacks, options).
        world: ranks sharing each minibatch (None: this process alone).

    Raises:
        FitDivergedError: NaN/inf loss or parameters.
    """
    device = data.device
    world = world or World()
    if not world.is_main:
        progress, log = None, None
    t_start = time.time()
    sigma_min = config.sigma_min_A or default_sigma_min_A(data.pixel_size_A)
    names = trainable_names(config.fit_centres, config.fit_amplitudes, config.fit_widths)
    lrs = {"centres": config.lr_centres_A, "log_amplitudes": config.lr_amplitudes,
           "width": config.lr_widths, "cholesky_offdiag": config.lr_widths}
    if not names:
        raise InputError("nothing to fit: enable centres, amplitudes or widths")
    if len(data) == 0:
        raise InputError("no particles to fit")
    if not (config.sigma_ang_deg >= 0 and config.sigma_shift_A >= 0):
        raise InputError(f"the pose prior σ must be >= 0 (got {config.sigma_ang_deg}°, {config.sigma_shift_A} Å)")
    poses = None
    if config.refine_poses:
        poses = PoseCorrections(len(data), config.sigma_ang_deg, config.sigma_shift_A,
                                config.lr_pose_deg, config.lr_pose_shift_A, device=device)
    steps_per_epoch = int(math.ceil(len(data) / config.batch))
    total_steps = steps_per_epoch * config.epochs
    signature = {"n_particles": len(data), "n_init": len(model), "seed": seed, "inputs": inputs,
                 "config": {k: v for k, v in asdict(config).items() if k != "time_limit_s"}}
    ck = _load_checkpoint(checkpoint, signature, device, log) if checkpoint else None
    if ck is not None:
        params = SplatParameters.from_state(ck["raw"], ck["sigma_min_A"], names, device)
        optimizer = make_optimizer(params, lrs)
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, step, history = ck["epoch"] + 1, ck["step"], ck["history"]
        if poses is not None:
            poses.load_state_dict(ck["poses"])
        t_start -= ck.get("elapsed", 0.0)
        if log:
            log(f"resumed from {checkpoint} after epoch {start_epoch}")
    else:
        params = SplatParameters.from_model(model, sigma_min, config.anisotropic, names, device)
        optimizer = make_optimizer(params, lrs)
        start_epoch, step, history = 0, 0, []
        if calibrate:
            factor = calibrate_scale(params, data, seed=seed, max_elements=config.max_elements, world=world)
            if log:
                log(f"amplitudes rescaled to the particles by {factor:.4g}")
    scale = data.mean_variance(seed=seed)
    if not scale > 0:
        raise InputError("the particle images are constant (zero variance)")
    use_bonds = config.bond_weight > 0 and pairs is not None and len(pairs) > 0
    pairs_t = torch.as_tensor(pairs, device=device) if use_bonds else None
    bond_len = None
    if use_bonds:
        with torch.no_grad():
            c = params.raw["centres"]
            d0 = (c[pairs_t[:, 0]] - c[pairs_t[:, 1]]).norm(dim=1)
        bond_len = config.bond_length_A if config.bond_length_A else float(d0.median())
    stats = DensityStats.zeros(len(params), device)
    dens_rng = np.random.default_rng([seed, 7919])
    stopped = False
    elapsed = None  # seconds since the start, the same on every rank (the mean of their clocks)
    for epoch in range(start_epoch, config.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(data))
        micro = _micro(params, data, config.max_elements)
        t_epoch, loss_sum, loss_n = time.time(), 0.0, 0
        for b0 in range(0, len(order), config.batch):
            idx = order[b0:b0 + config.batch]
            progress_frac = step / max(total_steps, 1)
            if config.time_limit_s:  # the ranks' shared clock (below), so that all follow one schedule
                if elapsed is None:
                    elapsed = world.max_float(time.time() - t_start)
                progress_frac = max(progress_frac, elapsed / config.time_limit_s)
            factor = lr_factor(progress_frac, config.lr_final)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            optimizer.zero_grad(set_to_none=True)
            phys = params.tensors()
            batch_loss = 0.0
            pb = poses.gather(idx) if poses is not None and progress_frac >= config.pose_start else None
            mine = world.shard(len(idx))  # this rank's contiguous positions in the batch
            lo, hi = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
            for m0 in range(lo, hi, micro):
                m1 = min(m0 + micro, hi)
                part = data_loss(phys, data, idx[m0:m1], scale * len(idx), config.window,
                                 pb, slice(m0, m1))
                part.backward(retain_graph=m1 < hi)
                batch_loss += float(part.detach())
            # the data gradients and loss summed over ranks in one all-reduce (one round trip per step)
            # (with a time limit the ranks' clocks ride along: their mean is the elapsed time all ranks use)
            batch_loss, elapsed = world.sum_gradients(list(params.raw.values()) +
                                                      ([pb.omega, pb.shift_A] if pb is not None else []),
                                                      [batch_loss, time.time() - t_start])
            elapsed /= world.size
            if poses is not None:
                poses.observe_loss(batch_loss)  # mean r²/v̄ per particle: the noise fraction ρ
            # prior and bond terms: cheap, computed by every rank alike after the sum (no second round trip)
            extra = 0.0
            if pb is not None:
                prior = poses.prior_loss(pb, data.box ** 2, len(idx))
                prior.backward()
                extra += float(prior.detach())
            if use_bonds:
                bond = config.bond_weight * bond_energy(params.raw["centres"], pairs_t, bond_len)
                bond.backward()
                extra += float(bond.detach())
            batch_loss += extra
            if not math.isfinite(batch_loss):
                raise FitDivergedError(
                    f"the loss became {batch_loss} at epoch {epoch + 1}, step {step + 1}: lower the "
                    f"learning rates, or check the particles for bad values")
            if params.raw["centres"].grad is not None:
                stats.add(params.raw["centres"].grad)
            optimizer.step()
            if pb is not None:
                poses.step(pb, factor)
            step += 1
            loss_sum += batch_loss * len(idx)
            loss_n += len(idx)
            if progress:
                progress(step, total_steps)
            if config.time_limit_s and elapsed > config.time_limit_s:
                stopped = True
                break
        bad = check_finite(params)
        if bad:
            raise FitDivergedError(f"the parameters ({bad}) became NaN at epoch {epoch + 1}: "
                                   f"lower the learning rates")
        entry = {"epoch": epoch + 1, "loss": loss_sum / max(loss_n, 1), "n_gaussians": len(params),
                 "seconds": time.time() - t_start, "lr_factor": factor}
        densify_now = (config.densify_every > 0 and (epoch + 1) % config.densify_every == 0
                       and epoch + 1 < config.densify_until * config.epochs)
        if (densify_now or (config.prune_threshold > 0 and config.densify_every == 0
                            and epoch + 1 < config.epochs)) and not stopped:
            params, optimizer, info = densify_and_prune(
                params, optimizer, stats, dens_rng,
                config.densify_fraction if densify_now else 0.0,
                config.max_gaussians or 2 * len(model), config.prune_threshold)
            entry.update({k: info[k] for k in ("split", "cloned", "pruned")}, n_gaussians=info["n"])
            if info["n"] != len(stats.grad_sum) or info["pruned"]:
                use_bonds = False  # the pair list no longer matches the Gaussians
            stats = DensityStats.zeros(len(params), device)
        history.append(entry)
        if log:
            extra = "".join(f", {k} {entry[k]}" for k in ("split", "cloned", "pruned") if entry.get(k))
            log(f"epoch {epoch + 1}/{config.epochs}: loss {entry['loss']:.6f}, {len(params)} Gaussians, "
                f"{time.time() - t_epoch:.1f} s{extra}")
        if checkpoint and world.is_main:
            _save_checkpoint(checkpoint, params, optimizer, epoch, step, history, signature,
                             time.time() - t_start, poses)
        if stopped:
            if log:
                log(f"time limit of {config.time_limit_s:.0f} s reached after {step} steps")
            break
    omega, shift = poses.numpy() if poses is not None else (None, None)
    return FitResult(params.to_model(), history, time.time() - t_start, step, stopped, omega, shift)
