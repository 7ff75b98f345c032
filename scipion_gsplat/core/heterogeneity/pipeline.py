"""The whole GMM-heterogeneity run, stage by stage, resumable.

1. consensus Gaussian model: a given model (``.npz``), or sampled from a given
   map or from the particles' own Fourier reconstruction, then fitted to the
   particles for ``consensus_epochs`` (:func:`..splat.fit.fit`); with a pose
   prior (``sigma_ang_deg``/``sigma_shift_A``) the particles' poses are refined
   against it (:mod:`.poses`) and every later stage uses the refined poses;
2. per-particle gradients at the consensus (:mod:`.gradients`) on up to
   ``pca_particles`` particles, PCA → ``n_motions`` eigen-motions and the
   fraction of the gradient variance each explains;
3. coordinates of every particle by Gauss-Newton (:mod:`.coordinates`);
4. ``rounds`` × (refit model and motions with the coordinates fixed — each
   step on a draw from every particle's posterior, Monte Carlo EM —,
   re-normalise, re-estimate coordinates with the population prior);
5. when the work ran on cropped particles, a last refit of model and motions on
   the full-size images (sharper maps along the motions), and the coordinates
   re-estimated once on those images.

After each stage the state is written to ``<workdir>/state.npz``: the raw
trainable parameters (not quantities derived from them, which would not convert
back exactly), coordinates and posterior covariances, with a signature of the
inputs (content of the STAR rows, the stacks, every setting, the seed, the
consensus and segmentation files) and, from the consensus on, the pose
corrections. The consensus fit also checkpoints itself
after every epoch (``consensus_fit.pt``, parameters and optimiser state). A
rerun with the same inputs continues after the last finished stage or epoch
and ends with the uninterrupted run's result, bit for bit (every random draw is
seeded by the seed and the stage); with other inputs it starts afresh.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..distributed import World
from ..io import ImageReader, InputError, ParticleStar, atomic_path, read_map
from ..particle_spectra import working_box
from ..safety import content_digest, input_signature
from ..spectra_store import format_bytes
from ..splat.data import ParticleData
from ..splat.fit import FitConfig, fit
from ..splat.model import GaussianModel
from ..splat.reconstruct import InitSpec, initial_models
from .coordinates import estimate_coordinates
from .deconvolution import deconvolved_coordinates
from .gradients import gradient_matrix, principal_motions
from .motion_model import MotionModel, base_parameters, isotropic, motions_from_vectors
from .parts import part_centroids, parts_from_map, parts_from_motions
from .poses import POSE_METHODS, correction_summary, search_corrections
from .refine import refit


WORKING_PIXEL_A = 2.4  # automatic working pixel: on the hinge benchmark 2.4 Å (40 px) gave |ρ| 0.950
                       # after 4 rounds, 3 Å (32 px) 0.944, 1.5 Å (64 px) 0.94 at twice the time

# Epochs of each refit. Hinge benchmark (2 threads): 1 epoch × 4 rounds |ρ| 0.954 in 93 s, 3 × 4 0.961 in
# 103 s, 3 × 3 0.960 in 92 s, 5 × 4 0.961 in 133 s. With amplitude motions 3 epochs made the refit
# diverge (composition set: loss 0.89 → 3·10⁵ in round 3), so those runs keep 1.
# Default schedule (issue 17, hinge, 4000 particles, 1 thread, same machine state): 4 consensus epochs,
# 4 rounds × 3 epochs and the full-size stage (2 epochs + coordinates) |ρ| 0.966; 2 consensus epochs,
# 3 × 3, no full-size stage 0.961; 2, 4 × 3, none 0.962; 1 consensus epoch, 3 × 2, none 0.959 in 108 s
# of CPU; the same on a 32 px working box 0.953 (2, 3 × 3).
REFIT_EPOCHS = 2
REFIT_EPOCHS_AMPLITUDES = 1


@dataclass
class HeterogeneityConfig:
    """Settings of :func:`run_heterogeneity`.

    Attributes:
        n_motions: eigen-motions ``K``.
        amplitudes: also learn per-particle amplitude changes (composition).
        consensus: ``.npz`` Gaussian model, ``.mrc`` map, or None (the
            particles' own Fourier reconstruction).
        n_gaussians: Gaussians sampled from a consensus map.
        consensus_epochs: epochs fitting the consensus to the particles first.
        rounds: alternations of refit and coordinates.
        refit_epochs: epochs of each refit; None: :data:`REFIT_EPOCHS`, or
            :data:`REFIT_EPOCHS_AMPLITUDES` with ``amplitudes``.
        gn_steps: Gauss-Newton steps per coordinate estimation.
        batch: particles per optimiser step.
        pca_particles: at most this many particles enter the PCA (memory bound).
        final_epochs: after the rounds, epochs refitting model and motions on
            the full-size images (coordinates fixed), for sharper maps, followed by
            one more estimate of the coordinates on those images (only when the
            particles were cropped; 0: neither).
        parts: number of rigid parts (0: none), the largest one the reference
            body; each other part gets a per-particle rotation and translation
            (:mod:`.parts`).
        segmentation: integer-labelled map defining the parts instead of the
            automatic grouping (k-means on positions and eigen-motions).
        part_sigma_rot_deg, part_sigma_shift_A: prior widths of the parts'
            rotations and translations (as RELION's multi-body refinement has:
            translations along the beam and some rotations are invisible in a
            view and would otherwise run away).
        prior_components: Gaussians of the population prior of the
            coordinates fitted by deconvolution in every round; the
            coordinates are then posterior means under it
            (:mod:`.deconvolution`); 0: a single Gaussian prior (MAP).
            Not used with ``amplitudes`` (it diverged there).
        refit_draws: refit model and motions on draws from each particle's
            posterior (Monte Carlo EM) rather than on the posterior means,
            where the deconvolved prior gives posteriors; False: on the means.
        resize: working box (pixels) the particles are Fourier-cropped to
            (0: automatic, a pixel of about 2.4 Å; the box itself: no cropping).
            Motions of domains need no high resolution, and the work falls
            with the square of the box.
        sigma_ang_deg, sigma_shift_A: prior σ of the particles' pose errors
            (degrees per rotation-vector component; Å per origin axis); both 0:
            poses fixed. Otherwise the poses are refined against the consensus
            (:mod:`.poses`) and every later stage uses the refined ones.
        pose_method: ``search`` (local grid search against the consensus map)
            or ``gradient`` (jointly with the consensus fit).
    """
    n_motions: int = 4
    amplitudes: bool = False
    consensus: Optional[str] = None
    n_gaussians: int = 1000
    consensus_epochs: int = 1
    rounds: int = 3
    refit_epochs: Optional[int] = None
    gn_steps: int = 2
    batch: int = 32
    pca_particles: int = 10000
    resize: int = 0
    final_epochs: int = 0
    parts: int = 0
    segmentation: Optional[str] = None
    part_sigma_rot_deg: float = 10.0
    part_sigma_shift_A: float = 5.0
    prior_components: int = 8
    refit_draws: bool = True
    sigma_ang_deg: float = 0.0
    sigma_shift_A: float = 0.0
    pose_method: str = "search"

    @property
    def refine_poses(self) -> bool:
        return self.sigma_ang_deg > 0 or self.sigma_shift_A > 0


@dataclass
class HeterogeneityResult:
    """``coordinates (M, K)`` in STAR row order; ``explained (K,)`` fractions of
    the gradient variance; ``history``: one dict per stage; ``pose_omega (M, 3)``
    rad and ``pose_shift_A (M, 2)`` Å: the pose corrections every stage used
    (:mod:`.poses`; None when the poses were fixed)."""
    model: MotionModel
    coordinates: np.ndarray
    explained: np.ndarray
    history: list = field(default_factory=list)
    seconds: float = 0.0
    pose_omega: Optional[np.ndarray] = None
    pose_shift_A: Optional[np.ndarray] = None


def initial_consensus(star: ParticleStar, cfg: HeterogeneityConfig, seed: int, device="cpu",
                      log: Callable[[str], None] = print, progress_factory=None,
                      world: Optional[World] = None) -> GaussianModel:
    """The consensus Gaussian model before its fit: the given ``.npz`` model,
    or Gaussians sampled from the given map or from the particles' own Fourier
    reconstruction (streamed from the stacks). Called before the particle
    images are loaded, so that the reconstruction's padded grids (about 3 GB
    at 256 px) and the working images are never in memory together."""
    prog = progress_factory or (lambda label: None)
    path = cfg.consensus
    if path and Path(path).suffix.lower() == ".npz":
        model = isotropic(GaussianModel.load(path))
        log(f"consensus: {len(model)} Gaussians from {path}")
        return model
    spec = InitSpec(mode="map", file=path, n_gaussians=cfg.n_gaussians)
    models, _, _ = initial_models(star, spec, False, seed, device, True, log, prog("consensus reconstruction"),
                                  world)
    log(f"consensus: {len(models[0])} Gaussians sampled from {path or 'the particles reconstruction'}")
    return models[0]


def consensus_model(star: ParticleStar, data: ParticleData, model: GaussianModel, cfg: HeterogeneityConfig,
                    seed: int, device="cpu", log: Callable[[str], None] = print, progress_factory=None,
                    checkpoint=None, inputs: Optional[str] = None, world: Optional[World] = None
                    ) -> tuple[GaussianModel, Optional[tuple[np.ndarray, np.ndarray]]]:
    """The consensus Gaussian ``model`` (:func:`initial_consensus`) fitted to
    the particles (the fit written to and resumed from ``checkpoint`` after
    every epoch, when given, if it was computed from the same ``inputs``:
    :func:`_signature`), and the pose corrections ``(omega (M, 3) rad, shift
    (M, 2) Å)`` of the particles (None: poses fixed), refined jointly with the
    fit or by a local search against it (``cfg.pose_method``)."""
    prog = progress_factory or (lambda label: None)
    joint = cfg.refine_poses and cfg.pose_method == "gradient"
    if joint and cfg.consensus_epochs < 1:
        raise InputError("pose refinement with the consensus fit needs --consensus-epochs of at least 1")
    corrections = None
    if cfg.consensus_epochs > 0:
        fc = FitConfig(epochs=cfg.consensus_epochs, batch=cfg.batch)
        if joint:
            fc = replace(fc, sigma_ang_deg=cfg.sigma_ang_deg, sigma_shift_A=cfg.sigma_shift_A)
        res = fit(model, data, fc, seed=seed, checkpoint=checkpoint, inputs=inputs,
                  progress=prog("fitting consensus"), log=lambda line: log(f"consensus: {line}"), world=world)
        model = res.model
        if joint:
            corrections = (np.asarray(res.pose_omega, np.float64), np.asarray(res.pose_shift_A, np.float64))
    if cfg.refine_poses and not joint:
        corrections = search_corrections(star, model, data.box, cfg.sigma_ang_deg, cfg.sigma_shift_A,
                                         device, log, workspace=data.workspace, world=world)
    if corrections is not None:
        s = correction_summary(*corrections, data.pixel_size_A * data.box / star.box_size)
        log(f"poses refined against the consensus ({cfg.pose_method}): median change "
            f"{s['median_angle_change_deg']:.2f}°, {s['median_shift_change_px']:.2f} px")
    return model, corrections


def add_parts(mm: MotionModel, z: torch.Tensor, cfg: HeterogeneityConfig, data: ParticleData, seed: int,
              log: Callable[[str], None], prog, world: Optional[World] = None) -> torch.Tensor:
    """Group the Gaussians into rigid parts (in place) and estimate every
    particle's rigid coordinates in front of its residual ones."""
    model = mm.to_model()
    if cfg.segmentation:  # label 0 (no part) is the reference body
        seg, _ = read_map(cfg.segmentation)
        labels = parts_from_map(seg, model.centres_A, data.pixel_size_A * data.box / seg.shape[-1])
    else:
        labels = parts_from_motions(model.centres_A, mm.motions.cpu().numpy(), cfg.parts, seed)
        # the largest part is the reference body: it follows only the residual motions
        # (moving it too is nearly degenerate with the particle's pose and only adds noise)
        big = int(np.argmax(np.bincount(labels)))
        labels = np.where(labels == big, -1, np.where(labels > big, labels - 1, labels))
    if not (labels >= 0).any():
        raise InputError("rigid parts: only one part, nothing moves relative to it (use --parts 2 or more)")
    centres = part_centroids(model.centres_A, labels, model.amplitudes)
    mm.parts = torch.as_tensor(labels, device=mm.motions.device)
    mm.part_centres = torch.as_tensor(centres, dtype=torch.float32, device=mm.motions.device)
    sizes = np.bincount(labels[labels >= 0])
    log(f"{len(sizes)} moving part(s) of " + ", ".join(str(int(n)) for n in sizes) + " Gaussians, "
        f"{int((labels < 0).sum())} in the reference body")
    z = torch.cat([torch.zeros(len(z), mm.n_rigid, device=z.device), z], dim=1)
    z, _ = estimate_coordinates(mm, data, z, cfg.gn_steps, prior_var=prior_variances(mm, z, cfg),
                                progress=prog("rigid coordinates"), world=world)
    return z


def prior_variances(mm: MotionModel, z: torch.Tensor, cfg: HeterogeneityConfig) -> torch.Tensor:
    """``(D,)`` prior variances: the population variance of each residual
    coordinate, the configured widths for the rigid ones."""
    res = z[:, mm.n_rigid:].var(dim=0)
    if not mm.n_rigid:
        return res
    one = torch.tensor([cfg.part_sigma_rot_deg ** 2] * 3 + [cfg.part_sigma_shift_A ** 2] * 3,
                       device=z.device, dtype=z.dtype)
    return torch.cat([one.repeat(mm.n_rigid // 6), res])


def coordinates(mm: MotionModel, data: ParticleData, z0: Optional[torch.Tensor], cfg: HeterogeneityConfig,
                prior_var: Optional[torch.Tensor], seed: int, progress=None, world: Optional[World] = None
                ) -> tuple[torch.Tensor, float, Optional[torch.Tensor]]:
    """Every particle's coordinates: Gauss-Newton (MAP under one Gaussian
    prior of variances ``prior_var``, none if None), then, with
    ``cfg.prior_components``, posterior means under the population prior
    deconvolved from all particles' likelihoods (:mod:`.deconvolution`).

    Returns:
        ``((M, D) coordinates, noise variance, (M, D, D) posterior
        covariances or None)`` (None: MAP coordinates, no posterior).
    """
    if cfg.prior_components < 1 or cfg.amplitudes:
        # with amplitude motions (exponential in the coordinates) the deconvolved prior let the
        # coordinates spread wider every round until the refit diverged (composition
        # benchmark: 0.4 → 77 Å in four rounds); those runs keep the single Gaussian prior
        z, noise = estimate_coordinates(mm, data, z0, cfg.gn_steps, prior_var=prior_var, progress=progress,
                                        world=world)
        return z, noise, None
    z, noise, (eta, prec) = estimate_coordinates(mm, data, z0, cfg.gn_steps, prior_var=prior_var,
                                                 progress=progress, likelihood=True, world=world)
    post, cov, _ = deconvolved_coordinates(eta, prec, z.cpu().numpy(), cfg.prior_components, seed, world=world)
    post, cov = (torch.as_tensor(a, dtype=z.dtype, device=z.device) for a in (post, cov))
    return post, noise, cov


def normalised(mm: MotionModel, z: torch.Tensor, cov: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:meth:`MotionModel.normalise` (in place on ``mm``), and the posterior
    covariances ``cov (M, D, D)`` (or None) carried into the new units."""
    scale = torch.cat([torch.ones(mm.n_rigid, device=z.device), mm.rms_displacement().to(z.device)])
    z = mm.normalise(z)
    return z, (None if cov is None else cov * scale[:, None] * scale[None, :])


def posterior_factors(cov: Optional[torch.Tensor], cfg: HeterogeneityConfig) -> Optional[torch.Tensor]:
    """``(M, D, D)`` Cholesky factors of the posterior covariances for the
    refit's draws, or None (no posteriors, or ``cfg.refit_draws`` off)."""
    if cov is None or not cfg.refit_draws:
        return None
    jitter = 1e-6 * cov.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-12)
    return torch.linalg.cholesky(cov + jitter * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device))


def epochs_per_refit(cfg: HeterogeneityConfig) -> int:
    """Epochs of each refit: the configured number, or the default for the kind of motion."""
    if cfg.refit_epochs is not None:
        return cfg.refit_epochs
    return REFIT_EPOCHS_AMPLITUDES if cfg.amplitudes else REFIT_EPOCHS


# stages recorded in the state besides 0 (motions and first coordinates), 1..rounds and rounds + 1
STAGE_STARTED = -2    # nothing finished yet (the consensus fit checkpoints itself)
STAGE_CONSENSUS = -1  # the consensus model is fitted
CONSENSUS_CHECKPOINT = "consensus_fit.pt"


def _signature(star: ParticleStar, cfg: HeterogeneityConfig, seed: int) -> str:
    """What the result depends on: the content of the STAR rows (optics values
    merged in), the image stacks (size, modification time), every setting, the
    seed, and the content of the consensus and segmentation files."""
    options = asdict(cfg)
    for key in ("consensus", "segmentation"):
        if options[key]:
            options[key] = content_digest(options[key])
    return input_signature(star.particles, ImageReader(star).stack_files(), seed=seed, config=options)


def _save_state(path, stage: int, signature: str, history: list, **arrays) -> None:
    """Write the state atomically: the stage last finished, the signature and
    history, and the arrays that stage left (numpy or torch)."""
    arrays = {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v))
              for k, v in arrays.items() if v is not None}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, stage=np.int64(stage), signature=np.str_(signature), history=np.str_(json.dumps(history)),
                     **arrays)


def _load_state(path: Path, signature: str, log: Callable[[str], None]) -> Optional[dict]:
    """The state's arrays (with ``stage`` an int and ``history`` a list), or
    None — saying why — when there is none, it is unreadable or it was
    computed from other particles or settings."""
    if not path.exists():
        return None
    try:
        with np.load(path) as d:
            state = {k: d[k] for k in d.files}
        if str(state["signature"]) != signature:
            log(f"{path} is from other particles, stacks or settings: starting afresh")
            return None
        state["stage"], state["history"] = int(state["stage"]), json.loads(str(state["history"]))
        return state
    except (OSError, KeyError, ValueError, EOFError) as exc:
        log(f"{path} cannot be read ({exc.__class__.__name__}): starting afresh")
        return None


def _pose_arrays(corrections: Optional[tuple]) -> dict:
    """The pose corrections as state arrays (none when the poses are fixed)."""
    if corrections is None:
        return {}
    return {"pose_omega": np.asarray(corrections[0], np.float64),
            "pose_shift_A": np.asarray(corrections[1], np.float64)}


def _stage_arrays(mm: MotionModel, z: torch.Tensor, cov: Optional[torch.Tensor], explained,
                  corrections: Optional[tuple] = None) -> dict:
    """What a stage from 0 on leaves: the model's raw parameters (bit-exact,
    :meth:`MotionModel.state`), the coordinates, posterior covariances,
    explained variances and the pose corrections (:func:`_pose_arrays`)."""
    return dict(mm.state(), coordinates=z, posterior_cov=cov, explained=explained, **_pose_arrays(corrections))


def _consensus_from_state(state: dict) -> GaussianModel:
    if "consensus_cholesky_A" in state:
        return GaussianModel(state["consensus_centres_A"], state["consensus_amplitudes"],
                             cholesky_A=state["consensus_cholesky_A"])
    return GaussianModel(state["consensus_centres_A"], state["consensus_amplitudes"], state["consensus_sigmas_A"])


def _stage_name(stage: int, rounds: int) -> str:
    if stage == STAGE_CONSENSUS:
        return "the consensus"
    if stage == 0:
        return "the eigen-motions"
    return f"round {stage}" if stage <= rounds else "the full-resolution stage"


def run_heterogeneity(star: ParticleStar, cfg: HeterogeneityConfig, seed: int = 0, device="cpu",
                      workdir=None, log: Callable[[str], None] = print,
                      progress_factory: Optional[Callable[[str], Callable]] = None,
                      world: Optional[World] = None, workspace=None) -> HeterogeneityResult:
    """Consensus, eigen-motions and per-particle coordinates for all particles of ``star``.

    ``workspace``: memory budget and scratch folder
    (:class:`..spectra_store.SpectraWorkspace`, ``--max-memory``) for the images:
    the working-box images stay in RAM under it, else in a scratch file; the
    full-size ones are kept in RAM only when needed (``final_epochs``) and
    both fit, else read from the stacks per batch. None: the full-size images
    in RAM up to 2 GB, the working-box ones in RAM.

    ``world``: ranks sharing the work (:mod:`..distributed`): the fits share each
    minibatch, the per-particle stages (gradients, coordinates) split the
    particles, and so do the local pose searches. Only rank 0 logs and
    writes the state."""
    t0 = time.time()
    world = world or World()
    if not world.is_main:
        log, progress_factory = (lambda line: None), None
    prog = progress_factory or (lambda label: None)
    if cfg.n_motions < 1:
        raise InputError("the number of eigen-motions must be at least 1")
    if cfg.pose_method not in POSE_METHODS:
        raise InputError(f"pose refinement method {cfg.pose_method!r}: choose one of {', '.join(POSE_METHODS)}")
    if not (cfg.sigma_ang_deg >= 0 and cfg.sigma_shift_A >= 0):
        raise InputError("the pose prior σ must not be negative")
    if len(star) < 2 * cfg.n_motions + 2:
        raise InputError(f"{len(star)} particles are too few for {cfg.n_motions} eigen-motions")
    signature = _signature(star, cfg, seed) if workdir else None
    state_path = Path(workdir) / "state.npz" if workdir else None
    checkpoint = Path(workdir) / CONSENSUS_CHECKPOINT if workdir else None
    state = _load_state(state_path, signature, log) if state_path else None
    stage, history = (state["stage"], state["history"]) if state else (STAGE_STARTED, [])
    world.barrier()  # every rank has read the state before rank 0 replaces it
    if not world.is_main:
        state_path = None  # rank 0 writes the state
    if state_path and state is None:  # a fresh start: nothing an earlier run left is reused
        checkpoint.unlink(missing_ok=True)
        _save_state(state_path, STAGE_STARTED, signature, history)
    elif stage >= STAGE_CONSENSUS:
        log(f"resumed from {state_path} after {_stage_name(stage, cfg.rounds)}")
    if stage == STAGE_STARTED:  # before the images are loaded (see initial_consensus)
        model = initial_consensus(star, cfg, seed, device, log, progress_factory, world)
    work = working_box(cfg.resize, star.box_size, star.pixel_size, WORKING_PIXEL_A)
    keep_full = None  # no workspace: in RAM up to 2 GB
    if workspace is not None:
        n, box = len(star), star.box_size
        needed = work == box or cfg.final_epochs > 0
        keep_full = needed and workspace.fits(n * box * box * 4 + (n * work * work * 4 if work != box else 0))
    full = data = ParticleData.from_star(star, None, device, use_ctf=True, workspace=workspace, preload=keep_full)
    if work != data.box:
        data = data.downsampled(work, progress=prog("Fourier-cropping the particles"))
        log(f"particles Fourier-cropped to {work} px ({data.pixel_size_A:.2f} Å pixels)")
    if workspace is not None:
        log(f"working images: {data.describe()} (budget --max-memory {format_bytes(workspace.max_bytes)})")
    corrections = None
    if stage == STAGE_STARTED:
        model, corrections = consensus_model(star, data, model, cfg, seed, device, log, progress_factory,
                                             checkpoint, signature, world)
        if state_path:
            arrays = {"consensus_centres_A": model.centres_A, "consensus_amplitudes": model.amplitudes,
                      "consensus_sigmas_A": model.sigmas_A, "consensus_cholesky_A": model.cholesky_A}
            _save_state(state_path, STAGE_CONSENSUS, signature, history, **arrays,
                        **_pose_arrays(corrections))
            checkpoint.unlink(missing_ok=True)  # the state holds the fitted consensus now
    else:
        if stage == STAGE_CONSENSUS:
            model = _consensus_from_state(state)
        if "pose_omega" in state:
            corrections = (state["pose_omega"], state["pose_shift_A"])
    if corrections is not None:  # every later stage sees the refined poses (the state carries them on)
        data, full = data.with_pose_corrections(*corrections), full.with_pose_corrections(*corrections)
    if stage >= 0:
        mm = MotionModel.from_state(state, device)
        z = torch.from_numpy(state["coordinates"]).to(device)
        cov = torch.from_numpy(state["posterior_cov"]).to(device) if "posterior_cov" in state else None
        explained = state["explained"]
    else:
        base = base_parameters(model, data.pixel_size_A, device)
        amp_length = float(model.sigmas_A.mean())
        rng = np.random.default_rng([seed, 4])
        rows = np.sort(rng.choice(len(data), size=min(cfg.pca_particles, len(data)), replace=False))
        with torch.no_grad():
            phys = {k: v.detach() for k, v in base.tensors().items()}
        grads = gradient_matrix(phys, data, rows, cfg.amplitudes, amp_length, progress=prog("gradients"),
                                world=world)
        vectors, explained = principal_motions(grads, cfg.n_motions, seed, world=world)  # grads: this rank's rows
        del grads
        motions, amp_motions = motions_from_vectors(vectors, len(base), cfg.amplitudes, amp_length, device)
        mm = MotionModel(base, motions, amp_motions, amp_length)
        for k, e in enumerate(explained):
            log(f"eigen-motion {k + 1}: {100 * e:.1f} % of the gradient variance")
        z, noise, cov = coordinates(mm, data, None, cfg, None, seed, prog("coordinates"), world)
        z, cov = normalised(mm, z, cov)
        if cfg.parts or cfg.segmentation:
            z, cov = add_parts(mm, z, cfg, data, seed, log, prog, world), None
        history.append({"stage": 0, "seconds": time.time() - t0, "noise_var": noise})
        if state_path:
            _save_state(state_path, 0, signature, history, **_stage_arrays(mm, z, cov, explained, corrections))
        stage = 0
    refit_epochs = epochs_per_refit(cfg)
    for r in range(stage + 1, cfg.rounds + 1):
        # Monte Carlo EM: each step sees a draw from every particle's posterior (hinge benchmark,
        # three seeds: |ρ| +0.0010 to +0.0013 over refitting on the posterior means)
        losses = refit(mm, data, z, refit_epochs, cfg.batch, seed=seed + r, z_chol=posterior_factors(cov, cfg),
                       progress=prog(f"round {r}: refitting model and motions"), world=world)
        prior = prior_variances(mm, z, cfg)
        z, noise, cov = coordinates(mm, data, z, cfg, prior, seed + r, prog(f"round {r}: coordinates"), world)
        z, cov = normalised(mm, z, cov)
        history.append({"stage": r, "seconds": time.time() - t0, "loss": losses[-1], "noise_var": noise})
        log(f"round {r}/{cfg.rounds}: loss {losses[-1]:.6f}, coordinate spread "
            + ", ".join(f"{float(s):.2f}" for s in z.std(dim=0)) + f" Å, {time.time() - t0:.1f} s")
        if state_path:
            _save_state(state_path, r, signature, history, **_stage_arrays(mm, z, cov, explained, corrections))
    if full.box != data.box and cfg.final_epochs > 0 and stage <= cfg.rounds:
        # the coordinates are settled; sharpen the model (and its maps) on the full-size images
        mm.base = base_parameters(mm.to_model(), full.pixel_size_A, device)
        losses = refit(mm, full, z, cfg.final_epochs, cfg.batch, seed=seed + 997,
                       z_chol=posterior_factors(cov, cfg), progress=prog("full-resolution refit"), world=world)
        z, cov = normalised(mm, z, cov)
        # and the coordinates once more, from the full-size images and the sharper model
        # (hinge benchmark: |ρ| 0.961 → 0.965 for ~20 s)
        z, _, cov = coordinates(mm, full, z, cfg, prior_variances(mm, z, cfg), seed + 998,
                                prog("full-resolution coordinates"), world)
        z, cov = normalised(mm, z, cov)
        history.append({"stage": cfg.rounds + 1, "seconds": time.time() - t0, "loss": losses[-1]})
        log(f"full-resolution refit and coordinates ({full.box} px): refit loss {losses[-1]:.6f}, {time.time() - t0:.1f} s")
        if state_path:
            _save_state(state_path, cfg.rounds + 1, signature, history,
                        **_stage_arrays(mm, z, cov, explained, corrections))
    omega, shift = corrections if corrections is not None else (None, None)
    return HeterogeneityResult(mm, z.cpu().numpy(), np.asarray(explained), history, time.time() - t0,
                               omega, shift)
