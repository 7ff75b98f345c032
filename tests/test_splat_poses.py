"""Gradient pose refinement in the Gaussian-splat fit (core/poses/gradient.py,
core/splat/fit.py, programs/reconstruct_splat.py --sigma-ang/--sigma-shift)."""
import json

import numpy as np
import pytest
import torch

from scipion_gsplat.core import fsc, geometry, io
from scipion_gsplat.core.poses.gradient import PoseCorrections
from scipion_gsplat.core.poses.rotations import compose, pose_errors
from scipion_gsplat.core.splat import init as initial
from scipion_gsplat.core.splat.data import ParticleData
from scipion_gsplat.core.splat.fit import FitConfig, fit
from scipion_gsplat.core.splat.model import GaussianModel
from scipion_gsplat.programs import reconstruct_splat, simulate


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sim_pose_errors(tmp_path_factory, lysozyme_pdb):
    """600 lysozyme particles, 40 px at 2 Å, SNR 0.5, whose STAR poses carry
    2° errors per Euler angle and 0.5 px per origin axis (true poses in
    ground_truth.npz)."""
    out = tmp_path_factory.mktemp("splat_pose_errors")
    assert simulate.run(["-i", str(lysozyme_pdb), "-o", str(out), "-n", "600", "--box", "40", "--angpix", "2",
                         "--snr", "0.5", "--seed", "3", "--pose-error", "2", "--shift-error", "0.5",
                         "--device", "cpu"]) == 0
    return out


def _truth(sim):
    g = np.load(sim / "ground_truth.npz")
    return geometry.euler_to_matrix(*g["true_angles_deg"].T), g["true_origins_A"]


def _auc(folder, sim):
    truth, pix = io.read_map(sim / "truth_state1.mrc")
    return fsc.fsc_auc(fsc.fsc_curve(io.read_map(folder / "map.mrc")[0], truth, pix)[1])


def test_pose_refinement_beats_fixed_poses_and_moves_poses_towards_the_truth(sim_pose_errors, tmp_path):
    sim = sim_pose_errors
    common = ["-i", str(sim / "particles.star"), "--halves", "--iterations", "10", "--n-gaussians", "600",
              "--device", "cpu", "--threads", "1"]
    assert reconstruct_splat.run(common + ["-o", str(tmp_path / "fixed"), "--sigma-ang", "0",
                                           "--sigma-shift", "0"]) == 0
    # joint gradient refinement only, then the default (local searches before the fit)
    assert reconstruct_splat.run(common + ["-o", str(tmp_path / "joint"), "--sigma-ang", "2",
                                           "--sigma-shift", "0.5", "--align-rounds", "0", "--joint-poses"]) == 0
    assert reconstruct_splat.run(common + ["-o", str(tmp_path / "refined"), "--sigma-shift", "0.5"]) == 0
    assert not (tmp_path / "fixed" / "particles.star").exists()
    auc_fixed, auc_joint, auc_refined = (_auc(tmp_path / d, sim) for d in ("fixed", "joint", "refined"))
    inp = io.read_particles(sim / "particles.star")
    true_poses, true_origins = _truth(sim)
    before = pose_errors(inp.poses(), true_poses, inp.shifts_A(), true_origins, 2.0)
    errors = {}
    for d in ("joint", "refined"):
        o = io.read_particles(tmp_path / d / "particles.star")
        errors[d] = pose_errors(o.poses(), true_poses, o.shifts_A(), true_origins, 2.0)
    print(f"AUC fixed {auc_fixed:.3f}, joint {auc_joint:.3f}, local searches {auc_refined:.3f}; "
          f"pose error {before} → {errors}")
    assert auc_joint > auc_fixed + 0.015
    assert auc_refined > auc_fixed + 0.015
    for after in errors.values():
        assert after["rms_angle_deg"] < 0.8 * before["rms_angle_deg"]
        assert after["rms_shift_px"] < 0.6 * before["rms_shift_px"]
    out = io.read_particles(tmp_path / "refined" / "particles.star")
    # the input rows and columns are kept; only the poses changed
    assert [n.split("@")[0] for n in out.particles["rlnImageName"]] == \
        [n.split("@")[0] for n in inp.particles["rlnImageName"]]
    assert np.array_equal(out.particles["rlnDefocusU"].to_numpy(), inp.particles["rlnDefocusU"].to_numpy())
    change = out.particles["rlnGsplatAngleChange"].to_numpy()
    assert np.allclose(change, geometry.angular_distance_deg(out.poses(), inp.poses()), atol=1e-3)
    summary = json.loads((tmp_path / "refined" / "summary.json").read_text())
    assert summary["pose_change"]["median_angle_deg"] > 0.5


@pytest.fixture(scope="module")
def small_fit(sim_pose_errors):
    star = io.read_particles(sim_pose_errors / "particles.star")
    data = ParticleData.from_star(star, np.arange(96))
    truth = GaussianModel.load(sim_pose_errors / "truth_state1_gaussians.npz") \
        if (sim_pose_errors / "truth_state1_gaussians.npz").exists() else None
    if truth is None:
        vol, pix = io.read_map(sim_pose_errors / "truth_state1.mrc")
        truth = initial.from_map(vol, pix, 300, np.random.default_rng(0), 1.4)
    return data, initial.perturb(truth, 0.5, np.random.default_rng(3))


def test_zero_sigma_is_the_fixed_pose_fit_bit_for_bit(small_fit, tmp_path):
    data, start = small_fit
    fixed = fit(start, data, FitConfig(epochs=2, batch=16), seed=4, checkpoint=tmp_path / "a.pt")
    zero = fit(start, data, FitConfig(epochs=2, batch=16, sigma_ang_deg=0.0, sigma_shift_A=0.0,
                                      lr_pose_deg=3.0), seed=4)
    assert fixed.pose_omega is None and zero.pose_omega is None
    assert np.array_equal(fixed.model.centres_A, zero.model.centres_A)
    assert np.array_equal(fixed.model.amplitudes, zero.model.amplitudes)
    assert "poses" not in torch.load(tmp_path / "a.pt", weights_only=False)
    # refinement on changes the result and returns one correction per particle
    moved = fit(start, data, FitConfig(epochs=2, batch=16, sigma_ang_deg=2.0, sigma_shift_A=1.0), seed=4)
    assert moved.pose_omega.shape == (96, 3) and moved.pose_shift_A.shape == (96, 2)
    assert np.abs(moved.pose_omega).max() > 0
    assert not np.array_equal(fixed.model.centres_A, moved.model.centres_A)
    with pytest.raises(io.InputError, match="σ"):
        fit(start, data, FitConfig(epochs=1, sigma_ang_deg=-1.0), seed=4)


def test_interrupted_fit_with_pose_refinement_resumes_bit_identically(small_fit, tmp_path):
    data, start = small_fit
    cfg = FitConfig(epochs=3, batch=16, sigma_ang_deg=2.0, sigma_shift_A=1.0)
    full = fit(start, data, cfg, seed=4)

    class Stop(Exception):
        pass

    def stop_in_epoch_3(done, total):
        if done == 14:
            raise Stop()
    with pytest.raises(Stop):
        fit(start, data, cfg, seed=4, checkpoint=tmp_path / "ck.pt", progress=stop_in_epoch_3)
    assert "poses" in torch.load(tmp_path / "ck.pt", weights_only=False)
    lines = []
    resumed = fit(start, data, cfg, seed=4, checkpoint=tmp_path / "ck.pt", log=lines.append)
    assert any("resumed" in line for line in lines)
    assert resumed.steps == full.steps == 18
    assert np.array_equal(resumed.model.centres_A, full.model.centres_A)
    assert np.array_equal(resumed.pose_omega, full.pose_omega)
    assert np.array_equal(resumed.pose_shift_A, full.pose_shift_A)


def test_row_wise_adam_moves_only_the_batch_and_corrections_compose(small_fit):
    data, _ = small_fit
    pc = PoseCorrections(len(data), 2.0, 1.0, lr_ang_deg=1.0, lr_shift_A=0.3)
    batch = pc.gather([3, 7])
    target = torch.tensor([0.02, -0.01, 0.03])
    loss = (batch.omega - target).square().sum() + batch.shift_A.sum()
    loss.backward()
    pc.step(batch)
    om, sh = pc.numpy()
    assert np.count_nonzero(np.abs(om).sum(1)) == 2 and np.count_nonzero(np.abs(sh).sum(1)) == 2
    assert np.allclose(np.abs(om[[3, 7]]), np.radians(1.0), rtol=1e-4)  # Adam's first step: lr per component
    assert np.allclose(sh[[3, 7]], -0.3, rtol=1e-4)
    moved = data.with_pose_corrections(om, sh)
    assert torch.equal(moved.poses[0], data.poses[0])
    assert np.allclose(moved.poses[3].numpy(), compose(data.poses[3].double().numpy(), om[3]), atol=1e-6)
    assert np.allclose((moved.shifts_A - data.shifts_A)[7].numpy(), sh[7], atol=1e-6)
    # the prior's weight follows the noise fraction (data loss per particle)
    pc.observe_loss(0.8)
    assert pc.noise_fraction == 0.8
    with pytest.raises(ValueError):
        PoseCorrections(4, -1.0, 0.0)


def test_negative_sigma_is_refused_with_exit_code_2(sim_pose_errors, tmp_path, capsys):
    for opt in ("--sigma-ang", "--sigma-shift"):
        code = reconstruct_splat.run(["-i", str(sim_pose_errors / "particles.star"), "-o", str(tmp_path / "x"),
                                      opt, "-1"])
        assert code == 2
        assert opt in capsys.readouterr().err


def test_fit_signature_covers_the_pose_searches_not_their_rounding(sim_small):
    """The fits' checkpoints are signed with the particles as given plus the
    pose-search settings: other settings refuse a resume; the refined poses'
    own bits (recomputed on a rerun) do not enter."""
    from scipion_gsplat.core import io
    from scipion_gsplat.core.splat.reconstruct import InitSpec, fit_inputs
    star = io.read_particles(str(sim_small / "particles.star"))
    rows = np.arange(len(star))
    stacks = io.ImageReader(star).stack_files()
    spec = InitSpec()
    a = fit_inputs(star, rows, stacks, spec, True, True, 0, {"sigma_ang_deg": 2.0, "rounds": 2})
    assert a == fit_inputs(star, rows, stacks, spec, True, True, 0, {"sigma_ang_deg": 2.0, "rounds": 2})
    assert a != fit_inputs(star, rows, stacks, spec, True, True, 0, {"sigma_ang_deg": 3.0, "rounds": 2})
    assert a != fit_inputs(star, rows, stacks, spec, True, True, 0, None)


def test_fit_signature_follows_the_initial_maps_content(sim_small, tmp_path):
    """A map replaced by another of the same size with the old time stamp kept
    (``cp -p``, ``rsync -t``) is other inputs: no resume from its checkpoint.
    The same bytes written again later resume."""
    import os

    from scipion_gsplat.core.splat.reconstruct import InitSpec, fit_inputs
    star = io.read_particles(str(sim_small / "particles.star"))
    rows = np.arange(len(star))
    stacks = io.ImageReader(star).stack_files()
    ref = tmp_path / "ref.mrc"
    io.write_map(ref, np.ones((8, 8, 8), np.float32), 2.0)
    original, st = ref.read_bytes(), os.stat(ref)
    spec = InitSpec(file=str(ref))
    a = fit_inputs(star, rows, stacks, spec, True, True, 0)
    other = bytearray(original)
    other[-4:] = np.float32(2.0).tobytes()  # one voxel changed, same size
    ref.write_bytes(bytes(other))
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(ref).st_size == st.st_size and os.stat(ref).st_mtime_ns == st.st_mtime_ns
    assert fit_inputs(star, rows, stacks, spec, True, True, 0) != a
    ref.write_bytes(original)
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10 ** 9))
    assert fit_inputs(star, rows, stacks, spec, True, True, 0) == a
