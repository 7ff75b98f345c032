"""Geometry conventions (RELION ZYZ Euler angles, directions, swing-twist)."""
import numpy as np
import pytest

from scipion_gsplat.core import geometry as g


def test_euler_matrix_known_values():
    # rot only: RELION's A for (rot, 0, 0) rotates the frame about z by -rot
    a = g.euler_to_matrix(90.0, 0.0, 0.0)
    assert np.allclose(a, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    # tilt 90 about y: the beam (third row) points along +x for rot = 0
    a = g.euler_to_matrix(0.0, 90.0, 0.0)
    assert np.allclose(a[2], [1, 0, 0], atol=1e-12)
    assert np.allclose(a, [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12)


def test_euler_roundtrip_and_orthonormal():
    rng = np.random.default_rng(0)
    mats = g.random_rotations(500, rng)
    assert np.allclose(mats @ np.swapaxes(mats, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(mats), 1.0)
    ang = g.matrix_to_euler(mats)
    assert np.all((ang[:, 1] >= 0) & (ang[:, 1] <= 180))
    back = g.euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    assert np.allclose(back, mats, atol=1e-9)


def test_gimbal_lock_roundtrip():
    for tilt in (0.0, 180.0):
        a = g.euler_to_matrix(30.0, tilt, 50.0)
        ang = g.matrix_to_euler(a)
        assert ang[1] == pytest.approx(tilt)
        assert np.allclose(g.euler_to_matrix(*ang), a, atol=1e-9)


def test_projection_direction_is_third_row():
    rng = np.random.default_rng(1)
    ang = rng.uniform([-180, 0, -180], [180, 180, 180], size=(50, 3))
    a = g.euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    d = g.projection_direction(ang[:, 0], ang[:, 1])
    assert np.allclose(a[:, 2, :], d)
    rt = g.direction_to_euler(d)
    assert np.allclose(g.projection_direction(rt[:, 0], rt[:, 1]), d)


def test_angular_distances():
    a = g.euler_to_matrix(10, 20, 30)
    b = g.euler_to_matrix(10, 20, 75)
    assert g.angular_distance_deg(a, b) == pytest.approx(45.0)
    assert g.direction_distance_deg([0, 0, 1], [1, 0, 0]) == pytest.approx(90.0)


def test_random_rotations_are_uniform():
    rng = np.random.default_rng(2)
    d = g.random_rotations(20000, rng)[:, 2, :]
    # uniform directions: z uniform in [-1, 1], mean of each component ~ 0
    assert abs(d[:, 2].mean()) < 0.02
    hist, _ = np.histogram(d[:, 2], bins=10, range=(-1, 1))
    assert hist.min() > 0.9 * 2000


def test_swing_twist_equals_psi_difference():
    a = g.euler_to_matrix(40, 70, 10 + 33)
    b = g.euler_to_matrix(40, 70, 10)
    assert g.swing_twist_psi_deg(a, b) == pytest.approx(33.0)
    # a small change of direction barely changes the twist
    c = g.euler_to_matrix(42, 71, 10 + 33)
    assert abs(g.swing_twist_psi_deg(c, b) - 33.0) < 3.0


def test_axis_angle():
    r = g.axis_angle_matrix([0, 0, 1], 90)
    assert np.allclose(r @ [1, 0, 0], [0, 1, 0])
