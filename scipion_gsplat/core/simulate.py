"""Simulated particle sets with ground truth.

structure (PDB/mmCIF) → one or more states (two-state edits or a hinge
trajectory) → density maps → projections at random poses with shifts and CTF
(the same projector as everything else, :func:`fourier.project`) → Gaussian
noise at a given SNR, white or coloured (:func:`noise_filter`) → RELION 3.1
``particles.star`` + MRC stack, truth maps and per-particle truth
(``ground_truth.npz``).

SNR is the ratio of the mean per-image variance of the noise-free, CTF-modulated
projections (over the whole box) to the noise variance (its total variance, for
coloured noise too).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from . import structure as struct
from .fourier import project
from .geometry import euler_to_matrix, matrix_to_euler, random_rotations
from .io import InputError, StackWriter, write_map, write_star
from .splat.model import from_structure


@dataclass
class Acquisition:
    """Microscope and image parameters of a simulated data set (Å, kV, mm)."""
    box: int = 64
    pixel_size_A: float = 1.5
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    defocus_min_A: float = 10000.0
    defocus_max_A: float = 25000.0
    astigmatism_max_A: float = 300.0
    shift_sigma_A: float = 2.0


@dataclass
class State:
    """One ground-truth state: its label (1-based), a motion parameter (e.g.
    hinge angle in degrees, 0 for the reference) and its structure."""
    label: int
    parameter: float
    structure: object
    parameter2: float = 0.0


def make_states(st, remove: Optional[str] = None, hinge: Optional[str] = None,
                hinge_angle_deg: float = 30.0, n_states: int = 2, hinge2: Optional[str] = None,
                hinge2_angle_deg: float = 30.0) -> list:
    """Ground-truth states from one structure.

    Args:
        st: reference structure (state 1).
        remove: gemmi selection removed in state 2 (compositional pair).
        hinge: gemmi selection rotated about its hinge (conformational change):
            states are evenly spaced angles from 0 to ``hinge_angle_deg``.
        n_states: number of hinge states (2 = pair, more = trajectory).
        hinge2: a second segment rotated about its own hinge, independently:
            the states are then the ``n_states × n_states`` grid of both
            angles (``parameter`` the first, ``parameter2`` the second).

    Returns:
        list of :class:`State`.
    """
    if remove and hinge:
        raise InputError("choose either a removed segment or a hinge motion, not both")
    if remove:
        return [State(1, 0.0, st), State(2, 1.0, struct.remove_residues(st, remove))]
    if hinge:
        if n_states < 2:
            raise InputError("a hinge motion needs at least 2 states")
        angles = np.linspace(0.0, hinge_angle_deg, n_states)
        first = [st if a == 0 else struct.rotate_segment(st, hinge, a) for a in angles]
        if not hinge2:
            return [State(i + 1, float(a), s) for i, (a, s) in enumerate(zip(angles, first))]
        angles2 = np.linspace(0.0, hinge2_angle_deg, n_states)
        grid = [(a, b, s if b == 0 else struct.rotate_segment(s, hinge2, b))
                for a, s in zip(angles, first) for b in angles2]
        return [State(i + 1, float(a), s, float(b)) for i, (a, b, s) in enumerate(grid)]
    if hinge2:
        raise InputError("a second hinge needs a first one (--hinge)")
    return [State(1, 0.0, st)]


DENSITY_MODELS = ("gemmi", "atom-gaussians", "residue-gaussians")


def state_map(st, box: int, pixel_size_A: float, center_A: np.ndarray, density: str = "gemmi",
              blur_sigma_px: float = 0.5):
    """Ground-truth map of one state, and its Gaussian model when it has one.

    Args:
        density: ``gemmi`` (electron form factors on the grid) or
            ``atom-gaussians`` / ``residue-gaussians`` (one isotropic Gaussian
            per atom / residue, :mod:`.splat.model`).

    Returns:
        ``(map [z, y, x], GaussianModel or None)``.
    """
    if density == "gemmi":
        return struct.structure_to_map(st, box, pixel_size_A, center_A, blur_sigma_px), None
    if density not in DENSITY_MODELS:
        raise InputError(f"unknown density model '{density}' ({', '.join(DENSITY_MODELS)})")
    model = from_structure(st, density.split("-")[0], center_A,
                           extra_sigma_A=blur_sigma_px * pixel_size_A)
    reach = np.abs(model.centres_A).max() + 3 * model.sigmas_A.max()
    if reach > (box // 2 - 2) * pixel_size_A:
        raise InputError(f"structure does not fit in a box of {box} px × {pixel_size_A} Å")
    return model.to_map(box, pixel_size_A), model


def random_particle_table(n: int, acq: Acquisition, rng: np.random.Generator,
                          stack_name: str = "particles.mrcs") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random uniform poses, Gaussian origins and random defocus for ``n`` particles.

    Returns:
        ``(optics, particles)`` RELION 3.1 tables.
    """
    rot = random_rotations(n, rng)
    euler = matrix_to_euler(rot)
    defocus = rng.uniform(acq.defocus_min_A, acq.defocus_max_A, n)
    astig = rng.uniform(0, acq.astigmatism_max_A, n)
    half = np.ones(n, dtype=int)
    half[rng.permutation(n)[: n // 2]] = 2
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
        "rlnOpticsGroup": 1,
        "rlnAngleRot": euler[:, 0], "rlnAngleTilt": euler[:, 1], "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": rng.normal(0, acq.shift_sigma_A, n),
        "rlnOriginYAngst": rng.normal(0, acq.shift_sigma_A, n),
        "rlnDefocusU": defocus + astig / 2, "rlnDefocusV": defocus - astig / 2,
        "rlnDefocusAngle": rng.uniform(0, 180, n),
        "rlnPhaseShift": 0.0, "rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0,
        "rlnRandomSubset": half,
    })
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [acq.pixel_size_A],
        "rlnVoltage": [acq.voltage_kV], "rlnSphericalAberration": [acq.cs_mm],
        "rlnAmplitudeContrast": [acq.amplitude_contrast],
        "rlnImagePixelSize": [acq.pixel_size_A], "rlnImageSize": [acq.box],
        "rlnImageDimensionality": [2],
    })
    return optics, parts


def perturb_poses(parts: pd.DataFrame, pose_error_deg: float, shift_error_px: float,
                  pixel_size_A: float, rng: np.random.Generator) -> pd.DataFrame:
    """The particle table with Gaussian pose errors, as a consensus refinement leaves them.

    Each Euler angle (rot, tilt, psi) gets an independent error of σ
    ``pose_error_deg`` degrees and each origin (x, y) one of σ ``shift_error_px``
    pixels; angles are written back normalised (tilt in [0°, 180°]).
    """
    out = parts.copy()
    n = len(out)
    e = out[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
    if pose_error_deg > 0:
        e = matrix_to_euler(euler_to_matrix(*(e + rng.normal(0.0, pose_error_deg, (n, 3))).T))
        out["rlnAngleRot"], out["rlnAngleTilt"], out["rlnAnglePsi"] = e[:, 0], e[:, 1], e[:, 2]
    if shift_error_px > 0:
        d = rng.normal(0.0, shift_error_px * pixel_size_A, (n, 2))
        out["rlnOriginXAngst"] = out["rlnOriginXAngst"].to_numpy(float) + d[:, 0]
        out["rlnOriginYAngst"] = out["rlnOriginYAngst"].to_numpy(float) + d[:, 1]
    return out


def noise_filter(box: int, pixel_size_A: float, bfactor_A2: float) -> np.ndarray:
    """Amplitude filter ``(box, box // 2 + 1)`` (``rfft2`` layout) that colours white noise.

    The noise power falls with spatial frequency ``s`` (1/Å) as a B-factor does
    to a signal's: power ∝ ``exp(-B s² / 2)`` (amplitude ``exp(-B s² / 4)``), as
    the noise of real micrographs falls towards Nyquist (detector MTF, the
    ice). The power is normalised to a mean of 1 over the full 2D spectrum, so
    the filtered noise keeps the white noise's total variance (and the SNR).
    At 1.5 Å pixels the power at Nyquist is 33 %, 6 % and 0.4 % of that at
    the origin for B = 20, 50 and 100 Å².
    """
    f = np.fft.fftfreq(box, d=pixel_size_A)
    s2 = f[:, None] ** 2 + f[None, :] ** 2
    power = np.exp(-bfactor_A2 * s2 / 2.0)
    power /= power.mean()
    return np.sqrt(power[:, : box // 2 + 1])


def colour_noise(noise: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """White noise images ``(M, box, box)`` filtered by :func:`noise_filter`'s amplitude."""
    box = noise.shape[-1]
    out = np.fft.irfft2(np.fft.rfft2(noise) * amplitude, s=(box, box))
    return out.astype(noise.dtype)


def _ctf_of(parts: pd.DataFrame, acq: Acquisition, rows) -> dict:
    p = parts.iloc[rows]
    return {"defocus_u_A": p["rlnDefocusU"].to_numpy(), "defocus_v_A": p["rlnDefocusV"].to_numpy(),
            "defocus_angle_deg": p["rlnDefocusAngle"].to_numpy(),
            "voltage_kV": np.full(len(p), acq.voltage_kV), "cs_mm": np.full(len(p), acq.cs_mm),
            "amplitude_contrast": np.full(len(p), acq.amplitude_contrast)}


def _clean_images(maps, labels, parts, acq, rows, device) -> np.ndarray:
    e = parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    sh = parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    out = np.empty((len(rows), acq.box, acq.box), np.float32)
    for lab in np.unique(labels[rows]):
        m = labels[rows] == lab
        r = rows[m]
        out[m] = project(maps[lab - 1], euler_to_matrix(e[r, 0], e[r, 1], e[r, 2]), acq.pixel_size_A,
                         sh[r], _ctf_of(parts, acq, r), device=device)
    return out


def simulate_particles(maps: Sequence[np.ndarray], labels: np.ndarray, acq: Acquisition,
                       snr: float, out_dir, rng: np.random.Generator, device: str = "cpu",
                       chunk: int = 512, progress: Optional[Callable[[int, int], None]] = None,
                       parameters: Optional[np.ndarray] = None,
                       parameters2: Optional[np.ndarray] = None, pose_error_deg: float = 0.0,
                       shift_error_px: float = 0.0, noise_bfactor_A2: float = 0.0) -> Path:
    """Write ``particles.star``, ``particles.mrcs``, ``truth_state<k>.mrc`` and
    ``ground_truth.npz`` (labels, state parameters, noise σ, the true poses
    ``true_angles_deg (N, 3)`` and origins ``true_origins_A (N, 2)``) into ``out_dir``.

    Args:
        maps: one ``[z, y, x]`` map per state.
        labels: ``(N,)`` 1-based state of each particle.
        snr: signal-to-noise ratio (inf = noise-free).
        parameters: ``(N,)`` motion parameter per particle (default: label).
        parameters2: ``(N,)`` second motion parameter (two-hinge sets), saved
            as ``parameters2`` when given.
        pose_error_deg, shift_error_px: σ of the errors written into the STAR
            file's poses (:func:`perturb_poses`); the images are made with the
            true poses and are the same as without errors for the same seed.
        noise_bfactor_A2: 0 for white noise, else the fall of the noise power
            with frequency (:func:`noise_filter`, Å²); the noise values are drawn
            as for white noise (same seed, same draws), then filtered.

    Returns:
        path of ``particles.star``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    optics, parts = random_particle_table(n, acq, rng)
    probe = np.sort(rng.choice(n, size=min(n, 256), replace=False))
    clean = _clean_images(maps, labels, parts, acq, probe, device)
    signal_var = float(np.mean(np.var(clean, axis=(1, 2))))
    sigma = 0.0 if not np.isfinite(snr) else float(np.sqrt(signal_var / snr))
    amplitude = noise_filter(acq.box, acq.pixel_size_A, noise_bfactor_A2) if noise_bfactor_A2 > 0 else None
    with StackWriter(out / "particles.mrcs", n, acq.box, acq.pixel_size_A) as w:
        for s in range(0, n, chunk):
            rows = np.arange(s, min(n, s + chunk))
            imgs = _clean_images(maps, labels, parts, acq, rows, device)
            if sigma > 0:
                noise = rng.normal(0.0, sigma, imgs.shape).astype(np.float32)
                imgs += noise if amplitude is None else colour_noise(noise, amplitude)
            w.write(s, imgs)
            if progress:
                progress(rows[-1] + 1, n)
    for k, vol in enumerate(maps):
        write_map(out / f"truth_state{k + 1}.mrc", vol, acq.pixel_size_A)
    extra = {} if parameters2 is None else {"parameters2": np.asarray(parameters2, float)}
    extra["true_angles_deg"] = parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
    extra["true_origins_A"] = parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    if pose_error_deg > 0 or shift_error_px > 0:
        parts = perturb_poses(parts, pose_error_deg, shift_error_px, acq.pixel_size_A, rng)
    np.savez(out / "ground_truth.npz", labels=labels, pose_error_deg=pose_error_deg,
             shift_error_px=shift_error_px,
             parameters=labels.astype(float) if parameters is None else parameters,
             noise_sigma=sigma, signal_variance=signal_var, snr=snr, noise_bfactor_A2=noise_bfactor_A2,
             acquisition=json.dumps(asdict(acq)), **extra)
    write_star(out / "particles.star", {"optics": optics, "particles": parts})
    return out / "particles.star"


def assign_states(n: int, populations: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Random 1-based state labels with the given population fractions."""
    p = np.asarray(populations, float)
    if (p < 0).any() or p.sum() <= 0:
        raise InputError(f"bad populations {list(populations)}")
    p = p / p.sum()
    counts = np.floor(p * n).astype(int)
    counts[np.argsort(-(p * n - counts))[: n - counts.sum()]] += 1
    labels = np.repeat(np.arange(1, len(p) + 1), counts)
    return rng.permutation(labels)
