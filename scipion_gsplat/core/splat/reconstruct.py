"""Gaussian-splat reconstruction with gold-standard half sets.

particles (poses, origins, CTF) → an initial model per half set (from the
half's own Fourier reconstruction, a map, a structure, or random points in a
mask) → one fit per half (:func:`.fit.fit`) → half maps (voxelised models),
their FSC (GSFSC), the full map (mean of the half maps) and the full model (both
half models with half amplitudes, whose map is the full map).

Half sets come from ``rlnRandomSubset`` (alternating rows when it is missing).
Initial models of the two halves are independent when they come from the data
(each half's own reconstruction) or from random points; from a user map or a
structure they share the source (as any refinement from a common reference does)
and differ only by their independent sampling / ``perturb_A`` jitter.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..fsc import fsc_curve, lowpass, resolution_at
from ..io import ImageReader, InputError, ParticleStar, read_map
from ..masks import mask_from_map
from ..particle_spectra import load_spectra, working_box
from ..poses.local_search import LocalSearch, refine_iteratively
from ..poses.star import with_poses
from ..reconstruct import half_set_group, reconstruct_particles
from ..safety import content_digest, input_signature
from ..spectra_store import format_bytes
from . import init as initial
from .data import ParticleData
from .fit import FitConfig, FitResult, fit
from .model import GaussianModel
from .parameters import default_sigma_min_A

INIT_MODES = ("map", "pdb", "random")


@dataclass
class InitSpec:
    """How to build the initial models.

    Attributes:
        mode: ``map`` (sampled density of ``file``, or of each half's own Fourier
            reconstruction when ``file`` is None), ``pdb`` (one Gaussian per atom
            or residue of the structure ``file``) or ``random`` (uniform inside
            ``mask``, a sphere of 0.4 box when None).
        n_gaussians: count for ``map`` and ``random``.
        level: ``atom`` or ``residue`` for ``pdb``.
        pdb_center: ``box``, ``com`` or ``x,y,z`` (see :func:`.init.from_structure_file`).
        mask: ``[z, y, x]`` mask for ``random`` (and to restrict ``map`` sampling).
        lowpass_A: low-pass the initial map at this resolution (Å) before
            sampling; default: the data's own Fourier half-map FSC 0.143
            resolution for data maps, 10 Å for a given map.
        sigma_A: initial width (default from the occupied volume).
        threshold_rel: map voxels below this fraction of the map's 99.9th
            percentile are not sampled (keeps Gaussians out of the noise).
        auto_mask: without ``mask``, sample ``map`` starts only inside the
            largest connected density of the map itself
            (:func:`..masks.mask_from_map`), so no Gaussian starts on a noise
            blob (which would also widen every rendered crop).
        perturb_A: Gaussian jitter (Å) added to every initial centre, drawn
            independently per half.
    """
    mode: str = "map"
    file: Optional[str] = None
    n_gaussians: int = 2000
    level: str = "atom"
    pdb_center: str = "box"
    mask: Optional[np.ndarray] = None
    lowpass_A: Optional[float] = None
    sigma_A: Optional[float] = None
    threshold_rel: float = 0.25
    auto_mask: bool = True
    perturb_A: float = 0.0


@dataclass
class SplatReconstruction:
    """Result of :func:`reconstruct_splat` (maps ``[z, y, x]`` float32, box ``n``).

    ``half_models``/``half_maps``/``fsc`` hold one entry / are None without half sets.
    """
    model: GaussianModel
    full_map: np.ndarray
    half_models: list
    half_maps: list
    fits: list
    frequency: Optional[np.ndarray]
    fsc: Optional[np.ndarray]
    pixel_size_A: float
    box: int
    init_seconds: float = 0.0
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    star: Optional[ParticleStar] = None

    def resolution_A(self, threshold: float = 0.143) -> float:
        if self.fsc is None:
            raise ValueError("no half sets, no FSC")
        return resolution_at(self.frequency, self.fsc, threshold)


def half_rows(star: ParticleStar, halves: bool) -> list:
    """Particle rows of each half set (one list of all rows without halves)."""
    if not halves:
        return [np.arange(len(star))]
    h = star.half_set()
    rows = [np.flatnonzero(h == k) for k in (1, 2)]
    if min(len(r) for r in rows) == 0:
        raise InputError("both half sets need particles (rlnRandomSubset 1 and 2)")
    return rows


def initial_models(star: ParticleStar, spec: InitSpec, halves: bool, seed: int, device="cpu",
                   use_ctf: bool = True, log: Optional[Callable[[str], None]] = None,
                   progress=None, world=None) -> tuple[list, list, list]:
    """One initial model per half set (or one for all particles).

    Returns:
        ``(models, pair_lists, notes)``; pair lists are the bond-regulariser
        neighbours of each model (sequence neighbours for structures).
    """
    box, pix = star.box_size, star.pixel_size
    sigma_min = default_sigma_min_A(pix)
    n_sets = 2 if halves else 1
    rngs = [np.random.default_rng([seed, 101, k]) for k in range(n_sets)]
    notes = []
    if spec.mode not in INIT_MODES:
        raise InputError(f"unknown --init '{spec.mode}' ({', '.join(INIT_MODES)})")
    if spec.mode != "pdb" and spec.n_gaussians < 1:
        raise InputError("--n-gaussians must be at least 1")
    if spec.mask is not None and spec.mask.shape != (box,) * 3:
        raise InputError(f"the mask is {spec.mask.shape[-1]} voxels, the particles {box} pixels")
    if spec.mode == "pdb":
        if not spec.file:
            raise InputError("--init pdb needs a structure file (--init-file)")
        base = initial.from_structure_file(spec.file, spec.level, sigma_min, spec.pdb_center, box, pix)
        models = [initial.perturb(base, spec.perturb_A, r) for r in rngs]
        pairs = [initial.bond_pairs(m.centres_A, sequential=True) for m in models]
        if halves and spec.perturb_A <= 0:
            notes.append("both half sets start from the same structure: their FSC may be optimistic")
        return models, pairs, notes
    if spec.mode == "random":
        mask = initial.sphere_mask(box) if spec.mask is None else spec.mask
        models = [initial.from_mask(mask, pix, spec.n_gaussians, r, sigma_min, spec.sigma_A) for r in rngs]
    else:
        if spec.file:
            vol, vpix = read_map(spec.file)
            if vol.shape != (box,) * 3 or abs(vpix - pix) > 1e-3 * pix:
                raise InputError(f"{spec.file}: map of {vol.shape[-1]} voxels × {vpix:.3f} Å; the particles "
                                 f"are {box} pixels × {pix:.3f} Å")
            lp = spec.lowpass_A or 10.0
            raw = [vol] * n_sets
            if halves:
                notes.append(f"both half sets sample the same map (low-passed at {lp:.1f} Å)")
        else:
            rec = reconstruct_particles(star, device=device, use_ctf=use_ctf, progress=progress, world=world)
            lp = spec.lowpass_A or max(rec.resolution_A(0.143), 2.0 * pix)
            raw = [rec.half1, rec.half2] if halves else [rec.full]
            if log:
                log(f"initial maps: Fourier reconstruction of each half set, FSC 0.143 at "
                    f"{rec.resolution_A(0.143):.2f} Å, low-passed at {lp:.2f} Å")
        sources = [lowpass(v, pix, lp) for v in raw]
        masks = [spec.mask] * n_sets
        if spec.mask is None and spec.auto_mask:
            masks = [mask_from_map(v, pix) for v in raw]
        models = [initial.from_map(src, pix, spec.n_gaussians, r, sigma_min, spec.sigma_A, m,
                                   spec.threshold_rel) for src, r, m in zip(sources, rngs, masks)]
    models = [initial.perturb(m, spec.perturb_A, r) for m, r in zip(models, rngs)]
    pairs = [initial.bond_pairs(m.centres_A, sequential=False) for m in models]
    return models, pairs, notes


def fit_inputs(star: ParticleStar, rows: np.ndarray, stack_files: list, spec: InitSpec, halves: bool,
               use_ctf: bool, seed: int, prealign: Optional[dict] = None) -> str:
    """What one fit is computed from (:func:`..safety.input_signature`): its
    particle rows as given (every column), the image stacks (size, modification
    time) and the options that make its data and initial model (init spec, the
    content of its file, its mask, half sets, CTF, seed, the local pose searches before the fit).
    A checkpoint of other inputs is not resumed. The rows are signed before the
    pose searches: their refined poses follow from these inputs, and a float
    rounding difference in them would otherwise refuse a valid resume."""
    init = {k: v for k, v in asdict(spec).items() if k != "mask"}
    init["file_digest"] = content_digest(spec.file) if spec.file else None
    init["mask_digest"] = (None if spec.mask is None else
                           hashlib.sha256(np.ascontiguousarray(spec.mask, np.float32).tobytes()).hexdigest())
    return input_signature(star.particles.iloc[rows], stack_files, init=init, halves=bool(halves),
                           use_ctf=bool(use_ctf), seed=int(seed), box=star.box_size,
                           pixel_size_A=star.pixel_size, prealign=prealign)


def prealigned(star: ParticleStar, reader: ImageReader, search: LocalSearch, rounds: int,
               device="cpu", target_pixel_A: float = 2.0,
               log: Optional[Callable[[str], None]] = None, workspace=None, world=None) -> ParticleStar:
    """The particles with poses refined by gold-standard local searches before any fit.

    Every round reconstructs the two half maps (``rlnRandomSubset``) from the
    current poses, FSC-filtered, and aligns each half set against its own half
    map only (:func:`..poses.local_search.refine_iteratively` without an
    external reference), as RELION's auto-refine does; the half sets stay
    independent. Works on Fourier-cropped spectra with a pixel of about
    ``target_pixel_A`` Å, in RAM under the budget of ``workspace``
    (:class:`..spectra_store.SpectraWorkspace`), else in its scratch folder.
    ``world``: several ranks each read and search their share of the
    particles (the half maps and noise spectra come from all of them); every
    rank returns all the refined poses.
    """
    box, pix = star.box_size, star.pixel_size
    work = working_box(0, box, pix, target_pixel_A=target_pixel_A)
    data = load_spectra(star, reader, work, device, workspace=workspace, log=log,
                        world=world if world is not None and world.size > 1 else None)
    bad = sum(not bool(torch.isfinite(torch.view_as_real(data.spectra[s:s + 4096])).all())
              for s in range(0, len(data), 4096))
    if data.sum_over_ranks(bad) > 0:  # every rank stops, not only the one that read the bad images
        raise InputError(f"{star.path}: the particle images contain NaN or infinite pixels")
    total, _, _ = refine_iteratively(data, None, search, rounds, progress=log)
    poses, _ = data.gather_rows(data.poses)
    shifts, _ = data.gather_rows(total.delta_origin_A)
    return with_poses(star, poses, star.shifts_A() + shifts)


def reconstruct_splat(star: ParticleStar, spec: InitSpec, config: FitConfig, halves: bool = True,
                      seed: int = 0, device="cpu", use_ctf: bool = True,
                      checkpoint_dir=None, log: Optional[Callable[[str], None]] = None,
                      progress_factory: Optional[Callable[[str], Callable]] = None,
                      deadline: Optional[float] = None, prealign: Optional[LocalSearch] = None,
                      prealign_rounds: int = 2, world=None, workspace=None) -> SplatReconstruction:
    """Fit Gaussian models to the particles, per half set, and make maps and FSC.

    Args:
        star: particles with poses (and CTF unless ``use_ctf=False``).
        halves: two independent fits (gold standard) instead of one.
        checkpoint_dir: folder for ``checkpoint_half<k>.pt`` (resumable fits;
            a checkpoint computed from other inputs, :func:`fit_inputs`, starts afresh).
        progress_factory: ``label → callback(done, total)`` (e.g. ``Progress``).
        deadline: ``time.time()`` by which the fits must end; each fit gets an
            equal share of the time left (``config.time_limit_s`` is then ignored).
        prealign: local searches of the poses before the fits (:func:`prealigned`,
            ``prealign_rounds`` gold-standard rounds); None: the input poses.
            The result's ``star`` holds the poses the fits started from.
        world: ranks (:mod:`..distributed`) sharing the initial reconstruction,
            the local pose searches (each rank its share of the particles) and
            every minibatch of the fits; with two half sets and an even number
            of ranks, half of the ranks fit half set 1 and the others half set
            2 at the same time (:func:`..reconstruct.half_set_group`).
        workspace: memory budget and scratch folder
            (:class:`..spectra_store.SpectraWorkspace`, ``--max-memory``): the
            particle images are held in RAM when all of them fit, else read from
            the stacks per batch; the pre-alignment spectra likewise (RAM or a
            scratch file). None: images in RAM up to 2 GB per half set.
    """
    t0 = time.time()
    if not star.has_poses:
        raise InputError(f"{star.path}: particles have no poses (rlnAngleRot/Tilt/Psi)")
    if use_ctf and not star.has_ctf:
        raise InputError(f"{star.path}: particles have no CTF parameters (use --no-ctf to ignore the CTF)")
    reader = ImageReader(star)
    reader.check()
    box, pix = star.box_size, star.pixel_size
    given = star  # the particles as given: what the fits' checkpoints are signed with
    searched = None
    if prealign is not None and prealign_rounds > 0:
        searched = {**asdict(prealign), "rounds": int(prealign_rounds)}
        if log:
            log(f"local pose searches before the fit: {prealign_rounds} gold-standard round(s), "
                f"σ {prealign.sigma_ang_deg:g}° / {prealign.sigma_shift_A:.2f} Å")
        star = prealigned(star, reader, prealign, prealign_rounds, device, log=log, workspace=workspace,
                          world=world)
    rows = half_rows(star, halves)
    stacks = reader.stack_files()
    prog = progress_factory or (lambda label: None)
    # the initial reconstruction first: its padded grids (about 3 GB at 256 px) are freed before the
    # images are loaded under the budget, so the two are never in memory together
    models, pairs, notes = initial_models(star, spec, halves, seed, device, use_ctf, log,
                                          prog("initial reconstruction"), world)
    # an even number of ranks with two half sets: each half of the ranks fits one half set, both at once
    split = half_set_group(world, len(rows[0]), len(rows[1])) if halves else None
    mine = list(range(len(rows))) if split is None else [split.half - 1]
    fit_world = world if split is None else split.group
    n_mine = sum(len(rows[k]) for k in mine)
    preload = None if workspace is None else workspace.fits(n_mine * box * box * 4)  # the sets fitted here
    datas = {k: ParticleData.from_star(star, rows[k], device, use_ctf, reader=reader, workspace=workspace,
                                       preload=preload) for k in mine}
    if log and workspace is not None:
        log(f"particle images: {n_mine} × {box}² px, "
            f"{'in memory' if preload else 'read from the stacks per batch'} (budget --max-memory "
            f"{format_bytes(workspace.max_bytes)})")
    for note in notes:
        if log:
            log(f"note: {note}")
    if log and split is not None:
        log(f"ranks split by half set: {split.group.size} rank(s) fit each half set, both at once")
    init_seconds = time.time() - t0
    fits: dict = {}
    for i, k in enumerate(mine):
        model, pr, data = models[k], pairs[k], datas[k]
        label = f"half {k + 1}" if halves else "all particles"
        if log:
            log(f"{label}: {len(data)} particles, {len(model)} initial Gaussians")
        ck = None if checkpoint_dir is None else Path(checkpoint_dir) / f"checkpoint_half{k + 1 if halves else 0}.pt"
        cfg = config
        if deadline is not None:
            share = max((deadline - time.time()) / (len(mine) - i), 1.0)
            if world is not None:  # one schedule for all ranks: the shortest share
                share = -world.max_float(-share)
            cfg = replace(config, time_limit_s=share)
            if log:
                log(f"{label}: time limit {share:.0f} s")
        fits[k] = fit(model, data, cfg, seed=int(seed) * 2 + k, pairs=pr, checkpoint=ck,
                      progress=prog(f"fitting {label}"),
                      log=(lambda line, lab=label: log(f"{lab}: {line}")) if log else None,
                      inputs=fit_inputs(given, rows[k], stacks, spec, halves, use_ctf, seed, searched),
                      world=fit_world)
    if split is not None:  # every rank gets both fits (each from its group's first rank)
        for k, src in enumerate(split.first):
            fits[k] = world.broadcast_object(fits.get(k), src=src)
        if log:
            last = fits[1].history[-1] if fits[1].history else {}
            log(f"half 2 (fitted by the other ranks at the same time): {fits[1].steps} steps, "
                f"final loss {last.get('loss', float('nan')):.6g}, {fits[1].seconds:.1f} s")
    fits = [fits[k] for k in sorted(fits)]
    half_models = [f.model for f in fits]
    maps = [m.to_map(box, pix, device=device) for m in half_models]
    if halves:
        freq, fsc = fsc_curve(maps[0], maps[1], pix)
        full_map = 0.5 * (maps[0] + maps[1])
        model = GaussianModel.concatenate(half_models, [0.5, 0.5])
    else:
        freq = fsc = None
        full_map, model = maps[0], half_models[0]
    return SplatReconstruction(model, full_map.astype(np.float32), half_models if halves else [],
                               maps if halves else [], fits, freq, fsc, pix, box, init_seconds,
                               time.time() - t0, notes, star)
