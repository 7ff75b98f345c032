"""Point groups and asymmetric units."""
import numpy as np
import pytest

from scipion_gsplat.core import geometry as g
from scipion_gsplat.core import symmetry as s
from scipion_gsplat.core.io import InputError


@pytest.mark.parametrize("name,order", [("c1", 1), ("C4", 4), ("c7", 7), ("d2", 4), ("D6", 12),
                                        ("t", 12), ("o", 24), ("i", 60), ("I1", 60),
                                        ("I2", 60), ("I3", 60), ("I4", 60)])
def test_group_orders_and_closure(name, order):
    mats = s.symmetry_matrices(name)
    assert mats.shape == (order, 3, 3)
    assert np.allclose(mats[0], np.eye(3))
    assert np.allclose(mats @ np.swapaxes(mats, 1, 2), np.eye(3), atol=1e-9)
    prod = np.einsum("aij,bjk->abik", mats, mats).reshape(-1, 3, 3)
    for m in prod[:: max(1, len(prod) // 200)]:
        assert np.min(np.abs(mats - m).reshape(order, -1).max(1)) < 1e-6


def test_conventions_of_axes():
    c4 = s.symmetry_matrices("c4")
    assert any(np.allclose(m, g.axis_angle_matrix([0, 0, 1], 90)) for m in c4)
    d2 = s.symmetry_matrices("d2")
    assert any(np.allclose(m, g.axis_angle_matrix([1, 0, 0], 180)) for m in d2)
    i2 = s.symmetry_matrices("i")
    for axis in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert any(np.allclose(m, g.axis_angle_matrix(axis, 180), atol=1e-9) for m in i2)
    i3 = s.symmetry_matrices("i3")
    assert any(np.allclose(m, g.axis_angle_matrix([0, 0, 1], 72), atol=1e-9) for m in i3)


@pytest.mark.parametrize("name", ["c1", "c3", "d4", "t", "o", "i"])
def test_asymmetric_unit_is_a_fundamental_domain(name):
    rng = np.random.default_rng(0)
    d = g.random_rotations(6000, rng)[:, 2, :]
    order = len(s.symmetry_matrices(name))
    inside = s.in_asymmetric_unit(d, name)
    assert abs(inside.mean() - 1.0 / order) < 4 * np.sqrt(1.0 / order / len(d)) + 1e-3
    folded, op = s.to_asymmetric_unit(d, name)
    assert np.all(s.in_asymmetric_unit(folded, name))
    mats = s.symmetry_matrices(name)
    assert np.allclose(np.einsum("nji,nj->ni", mats[op], d), folded)


def test_expand_poses():
    a = g.euler_to_matrix([10, 20], [30, 40], [50, 60])
    e = s.expand_poses(a, "c2")
    assert e.shape == (2, 2, 3, 3)
    assert np.allclose(e[:, 0], a)


def test_bad_symmetry_name():
    with pytest.raises(InputError):
        s.symmetry_matrices("x5")
