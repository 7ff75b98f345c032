"""Pose-correction conventions (core.poses.rotations) and the simulator's pose errors."""
import numpy as np
import pytest
import torch

from scipion_gsplat.core import io
from scipion_gsplat.core.geometry import axis_angle_matrix, euler_to_matrix, projection_direction
from scipion_gsplat.core.poses import rotations as rt


def test_rotvec_matches_axis_angle_and_is_differentiable():
    rng = np.random.default_rng(0)
    for w in rng.normal(0, 0.3, (20, 3)):
        ref = axis_angle_matrix(w, np.rad2deg(np.linalg.norm(w)))
        assert np.abs(rt.rotvec_to_matrix_np(w) - ref).max() < 1e-12
    assert np.array_equal(rt.rotvec_to_matrix_np(np.zeros(3)), np.eye(3))
    w = torch.tensor([1e-6, 2e-6, 0.0], dtype=torch.float64, requires_grad=True)
    (rt.rotvec_to_matrix(w)[0, 1]).backward()  # d R01 / dω_z = −1 at 0
    assert w.grad[2].item() == pytest.approx(-1.0, abs=1e-6)


def test_in_plane_correction_keeps_the_viewing_direction():
    a = euler_to_matrix(30.0, 60.0, 10.0)
    in_plane = rt.compose(a, np.array([0.0, 0.0, np.deg2rad(5.0)]))
    tilt = rt.compose(a, np.array([np.deg2rad(5.0), 0.0, 0.0]))
    d = projection_direction(30.0, 60.0)
    assert np.allclose(in_plane[2], d)  # third row = beam direction, unchanged by ω_z
    assert np.rad2deg(np.arccos(np.clip(tilt[2] @ d, -1, 1))) == pytest.approx(5.0, abs=1e-6)
    # torch and numpy agree
    t = rt.compose(torch.as_tensor(a), torch.tensor([0.0, 0.0, np.deg2rad(5.0)], dtype=torch.float64))
    assert np.allclose(t.numpy(), in_plane)


def test_local_grids():
    g = rt.local_rotation_grid(6.0, 1.5)
    assert np.array_equal(g[0], np.zeros(3))
    assert np.rad2deg(np.linalg.norm(g, axis=1)).max() <= 6.0 + 1e-9
    assert 200 < len(g) < 300  # ≈ 4.19·4³ points in the ball
    s = rt.shift_grid(2.0, 1.0)
    assert len(s) == 13 and np.array_equal(s[0], [0.0, 0.0])
    with pytest.raises(ValueError):
        rt.local_rotation_grid(3.0, 0.0)


def test_simulated_pose_errors(tmp_path, lysozyme_pdb):
    from scipion_gsplat.programs import simulate
    common = ["-i", str(lysozyme_pdb), "-n", "400", "--box", "32", "--angpix", "3", "--seed", "5"]
    assert simulate.run(common + ["-o", str(tmp_path / "exact")]) == 0
    assert simulate.run(common + ["-o", str(tmp_path / "err"), "--pose-error", "2", "--shift-error", "0.5"]) == 0
    exact, err = (io.read_particles(tmp_path / d / "particles.star") for d in ("exact", "err"))
    # the same images: only the STAR poses carry the errors
    assert np.array_equal(io.ImageReader(exact).read(np.arange(400)), io.ImageReader(err).read(np.arange(400)))
    truth = np.load(tmp_path / "err" / "ground_truth.npz")
    true_poses = euler_to_matrix(*truth["true_angles_deg"].T)
    assert np.allclose(true_poses, exact.poses(), atol=1e-6)
    assert np.allclose(truth["true_origins_A"], exact.shifts_A(), atol=1e-5)
    e = rt.pose_errors(err.poses(), true_poses, err.shifts_A(), truth["true_origins_A"], 3.0)
    # 2° on each Euler angle: a few degrees of rotation; 0.5 px per axis: ~0.71 px in 2D
    assert 2.5 < e["rms_angle_deg"] < 5.0
    assert 0.6 < e["rms_shift_px"] < 0.82
    assert rt.pose_errors(exact.poses(), true_poses)["rms_angle_deg"] < 1e-3
    assert simulate.run(common + ["-o", str(tmp_path / "bad"), "--pose-error", "-1"]) == 2
