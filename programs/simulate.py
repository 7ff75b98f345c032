"""gsplat_simulate: simulated particles with ground truth from an atomic structure.

Example::

    gsplat_simulate -i 1aki.pdb -o sim --box 64 --angpix 1.5 -n 4000 --snr 0.05
    gsplat_simulate -i 1aki.pdb -o pair --hinge 'A/40-88' --hinge-angle 30 -n 4000
    gsplat_simulate -i 1aki.pdb -o comp --remove 'A/100-129' --populations 0.85,0.15

    gsplat_simulate -i 1aki.pdb -o errs --pose-error 2 --shift-error 0.5   # realistic pose errors
    gsplat_simulate -i 1aki.pdb -o col --noise-bfactor 50   # coloured (falling) noise spectrum

Writes ``particles.star`` (RELION 3.1), ``particles.mrcs``, ``truth_state<k>.mrc``,
``state<k>.pdb`` and ``ground_truth.npz`` (per-particle state labels, motion
parameters, true poses and origins) into the output folder.
"""
from __future__ import annotations

import os

import numpy as np

from scipion_gsplat.core import simulate as sim
from scipion_gsplat.core import structure as struct
from scipion_gsplat.core.io import InputError, atomic_path
from scipion_gsplat.core.safety import ProgramFiles

from ._cli import Progress, console_entry, setup_runtime

DESCRIPTION = "Simulate cryo-EM particles (poses, CTF, noise) from a PDB/mmCIF structure."


def add_args(parser) -> None:
    parser.add_argument("-i", "--input", required=True, help="structure file (PDB or mmCIF)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("-n", "--n-particles", type=int, default=1000, help="number of particles")
    parser.add_argument("--box", type=int, default=64, help="box size in pixels")
    parser.add_argument("--angpix", type=float, default=1.5, help="pixel size in Å")
    parser.add_argument("--snr", type=float, default=0.1,
                        help="signal-to-noise ratio (variance of CTF-modulated projections / noise "
                             "variance); 'inf' for noise-free")
    g = parser.add_argument_group("states (choose at most one)")
    g.add_argument("--remove", help="gemmi selection removed in state 2, e.g. 'A/100-129'")
    g.add_argument("--hinge", help="gemmi selection rotated about its hinge, e.g. 'A/40-88'")
    g.add_argument("--hinge-angle", type=float, default=30.0, help="largest hinge rotation (degrees)")
    g.add_argument("--n-states", type=int, default=2, help="hinge states from 0 to --hinge-angle")
    g.add_argument("--hinge2", help="a second segment rotated about its own hinge, independently of "
                                    "--hinge (states: the grid of both angles)")
    g.add_argument("--hinge2-angle", type=float, default=30.0, help="largest rotation of --hinge2 (degrees)")
    g.add_argument("--populations", help="comma-separated state fractions (default: equal)")
    m = parser.add_argument_group("microscope")
    m.add_argument("--voltage", type=float, default=300.0, help="kV")
    m.add_argument("--cs", type=float, default=2.7, help="spherical aberration (mm)")
    m.add_argument("--q0", type=float, default=0.1, help="amplitude contrast")
    m.add_argument("--defocus-min", type=float, default=10000.0, help="Å")
    m.add_argument("--defocus-max", type=float, default=25000.0, help="Å")
    m.add_argument("--shift-sigma", type=float, default=2.0, help="σ of particle origins (Å)")
    e = parser.add_argument_group("pose errors (the STAR file's poses; images use the true ones)")
    e.add_argument("--pose-error", type=float, default=0.0,
                   help="σ of a Gaussian error added to each Euler angle (degrees), as a consensus "
                        "refinement leaves them: typical 1-3; the true poses are kept in ground_truth.npz")
    e.add_argument("--shift-error", type=float, default=0.0,
                   help="σ of a Gaussian error added to each origin (pixels); typical 0.3-1")
    m.add_argument("--noise-bfactor", type=float, default=0.0, metavar="B",
                   help="coloured noise: the noise power falls with spatial frequency s (1/Å) as "
                        "exp(-B s²/2), like a B-factor (Å²); the SNR (total variance ratio) is kept. "
                        "0 = white noise (default); typical 20-100 (at 1.5 Å pixels, B = 50 leaves 6%% "
                        "of the low-frequency noise power at Nyquist)")
    m.add_argument("--blur", type=float, default=0.5, help="extra Gaussian blur of the maps (pixels)")
    m.add_argument("--density", choices=sim.DENSITY_MODELS, default="gemmi",
                   help="how maps are made from the structure: gemmi's electron form factors on the "
                        "grid, or one Gaussian per atom/residue (their models are saved too)")


def program_files(args) -> ProgramFiles:
    """The structure read; every file written into the output folder."""
    names = ("particles.star", "particles.mrcs", "ground_truth.npz", "truth_state*.mrc",
             "truth_state*_gaussians.npz", "state*.pdb")
    return ProgramFiles(inputs=[args.input], outputs=[os.path.join(args.output, n) for n in names])


def main(args) -> None:
    device = setup_runtime(args)
    if args.n_particles < 2:
        raise InputError("--n-particles must be at least 2")
    if args.box < 16 or args.box % 2:
        raise InputError("--box must be an even number >= 16")
    if not args.snr > 0:
        raise InputError("--snr must be positive")
    if args.pose_error < 0 or args.shift_error < 0:
        raise InputError("--pose-error and --shift-error must be >= 0")
    if not args.noise_bfactor >= 0:
        raise InputError("--noise-bfactor must be >= 0 (0 = white noise)")
    rng = np.random.default_rng(args.seed)
    reference = struct.read_structure(args.input)
    states = sim.make_states(reference, remove=args.remove, hinge=args.hinge,
                             hinge_angle_deg=args.hinge_angle, n_states=args.n_states,
                             hinge2=args.hinge2, hinge2_angle_deg=args.hinge2_angle)
    if args.populations:
        try:
            pops = [float(x) for x in args.populations.split(",")]
        except ValueError:
            raise InputError(f"--populations '{args.populations}': give comma-separated numbers") from None
        if len(pops) != len(states):
            raise InputError(f"--populations has {len(pops)} values for {len(states)} states")
    else:
        pops = [1.0] * len(states)
    acq = sim.Acquisition(box=args.box, pixel_size_A=args.angpix, voltage_kV=args.voltage,
                          cs_mm=args.cs, amplitude_contrast=args.q0,
                          defocus_min_A=args.defocus_min, defocus_max_A=args.defocus_max,
                          shift_sigma_A=args.shift_sigma)
    center = struct.center_of_mass_A(reference)
    os.makedirs(args.output, exist_ok=True)
    maps = []
    for s in states:
        vol, model = sim.state_map(s.structure, args.box, args.angpix, center, args.density, args.blur)
        maps.append(vol)
        if model is not None:
            model.save(os.path.join(args.output, f"truth_state{s.label}_gaussians.npz"))
        with atomic_path(os.path.join(args.output, f"state{s.label}.pdb")) as tmp:
            s.structure.write_pdb(tmp)
    labels = sim.assign_states(args.n_particles, pops, rng)
    params = np.array([states[k - 1].parameter for k in labels])
    params2 = np.array([states[k - 1].parameter2 for k in labels]) if args.hinge2 else None
    print(f"gsplat_simulate: {len(states)} state(s), {args.n_particles} particles, "
          f"box {args.box} px at {args.angpix} Å, SNR {args.snr}", flush=True)
    star = sim.simulate_particles(maps, labels, acq, args.snr, args.output, rng, device=device,
                                  progress=Progress("projecting"), parameters=params, parameters2=params2,
                                  pose_error_deg=args.pose_error, shift_error_px=args.shift_error,
                                  noise_bfactor_A2=args.noise_bfactor)
    print(f"gsplat_simulate: wrote {star}", flush=True)


run = console_entry("gsplat_simulate", DESCRIPTION, add_args, main, files=program_files)

if __name__ == "__main__":
    run()
