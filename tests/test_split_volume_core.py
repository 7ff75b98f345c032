"""Split-volume numerics: directions, alignment, max-cut, partition, refinement."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scipion_gsplat.core import fourier, geometry as g, io, structure
from scipion_gsplat.core.split_volume import align, directions as dr, maxcut, partition

from conftest import accuracy


@pytest.fixture(scope="module")
def lyso_map(lysozyme_pdb):
    return structure.structure_to_map(structure.read_structure(lysozyme_pdb), 40, 2.0)


def test_direction_grid_and_cones():
    grid = dr.direction_grid(7.5, "c1", hemisphere=True)
    full = dr.direction_grid(7.5, "c1", hemisphere=False)
    assert 0.45 < len(grid) / len(full) < 0.55
    assert len(dr.direction_grid(7.5, "d2", hemisphere=True)) < len(grid) / 3
    poses = g.random_rotations(500, np.random.default_rng(0))
    groups = dr.group_particles(poses, 10.0, symmetry="c1")
    assert groups.pair_angle_deg.max() <= 12.5 + 1e-6  # cone = 1.25 × sampling
    # every particle lands in at least one cone, and cones overlap
    assert len(np.unique(groups.pair_particle)) == 500
    assert np.bincount(groups.pair_particle).mean() > 2
    # the pose used in a direction points along that direction
    d = groups.directions[groups.pair_direction]
    assert np.all(np.einsum("pi,pi->p", groups.pair_pose[:, 2, :], d) > np.cos(np.deg2rad(12.5)) - 1e-9)


def test_mirror_pose_flips_the_image(lyso_map):
    a = g.euler_to_matrix(30, 60, 25)
    img = fourier.project(lyso_map, a[None], 2.0)[0]
    mirrored = fourier.project(lyso_map, (dr.MIRROR @ a)[None], 2.0)[0]
    flipped = np.roll(img[::-1], 1, axis=0)  # y → −y about row n//2
    assert np.corrcoef(flipped.ravel(), mirrored.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("mirror", [False, True])
def test_in_plane_alignment_to_reference(lyso_map, mirror):
    b = g.euler_to_matrix(30, 60, 0)
    if mirror:
        b = dr.direction_reference_poses((dr.MIRROR @ b)[2][None])[0]
    for dpsi, drot, dtilt in [(40, 0, 0), (-100, 3, -2), (170, -4, 3)]:
        a = g.euler_to_matrix(30 + drot, 60 + dtilt, dpsi)
        img = fourier.project(lyso_map, a[None], 2.0)
        pose = dr.MIRROR @ a if mirror else a
        ref = fourier.project(lyso_map, b[None], 2.0)[0]
        angle = align.in_plane_angles_deg(pose[None], b[None])
        out = align.align_images(torch.from_numpy(img), angle, np.array([mirror]))[0].numpy()
        assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.99
        assert np.corrcoef(img[0].ravel(), ref.ravel())[0, 1] < 0.9


def _planted(d, noise, seed, k=6):
    rng = np.random.default_rng(seed)
    s = np.where(rng.random(d) < 0.5, -1.0, 1.0)
    rows, cols = [], []
    for i in range(d):  # ring plus random chords: connected
        for j in [(i + 1) % d] + list(rng.choice(d, k // 2, replace=False)):
            if i != j:
                rows.append(i)
                cols.append(j)
    rows, cols = np.array(rows), np.array(cols)
    w = s[rows] * s[cols] + rng.normal(0, noise, len(rows))
    m = sp.coo_matrix((w, (rows, cols)), shape=(d, d)).tocsr()
    return (m + m.T).tocsr(), s


@pytest.mark.parametrize("method", ["sdp", "spectral"])
def test_maxcut_methods_reach_the_exact_optimum_on_small_graphs(method):
    for seed in range(3):
        w, _ = _planted(12, 1.0, seed)
        exact = maxcut.solve_exact(w)
        res = maxcut.synchronise(w, method, seed=seed)
        assert res.objective >= 0.97 * maxcut.objective(w, exact)
        assert res.methods == [method]


def test_maxcut_recovers_planted_signs_and_is_deterministic():
    w, s = _planted(200, 0.8, 1)
    a = maxcut.synchronise(w, "auto", seed=5)
    b = maxcut.synchronise(w, "auto", seed=5)
    assert np.array_equal(a.signs, b.signs)
    assert accuracy(a.signs, s) > 0.95


def test_disconnected_graph_is_solved_per_component():
    w1, _ = _planted(10, 0.2, 0)
    w2, _ = _planted(6, 0.2, 1)
    w = sp.block_diag([w1, w2]).tocsr()
    res = maxcut.synchronise(w, "auto")
    assert res.n_components == 2
    assert list(np.bincount(res.component)) == [10, 6]
    with pytest.raises(io.InputError):
        maxcut.synchronise(w, "magic")


def test_partition_rules():
    # two directions sharing particles 1 and 2; direction 1 is flipped
    pp = np.array([0, 1, 2, 1, 2, 3])
    pd = np.array([0, 0, 0, 1, 1, 1])
    llr = np.array([2.0, 3.0, -1.0, -3.0, 1.0, -2.0])
    w = maxcut.direction_graph(pp, pd, llr, 2, 5)
    assert w[0, 1] == pytest.approx(3.0 * -3.0 + -1.0 * 1.0)  # shared particles 1 and 2
    res = maxcut.synchronise(w, "exact")
    assert res.signs[0] * res.signs[1] < 0
    part = partition.partition_llr(pp, pd, llr, res.signs, res.component, 5)
    assert part.classes[4] == 1 and part.probability[4] == 0.5 and part.n_directions[4] == 0
    assert part.classes[0] == part.classes[1] == part.classes[3]
    assert part.classes[2] != part.classes[0]


def test_two_class_mixture_uses_each_particles_noise():
    """Coordinates whose noise varies per particle (views where the difference
    projects weakly): the mixture that knows each variance recovers means and
    fractions and classifies better than an equal-variance GMM."""
    from sklearn.mixture import GaussianMixture
    from scipion_gsplat.core.split_volume.pooled import two_class_mixture
    rng = np.random.default_rng(3)
    n = 4000
    truth = (rng.random(n) < 0.3).astype(int)
    sens = 10.0 ** rng.uniform(-1.5, 1.5, n)  # s_p: noise variance is 1/s_p
    coord = np.where(truth == 1, 1.0, -0.5) + rng.normal(size=n) / np.sqrt(sens)
    prob, means, fractions, bimodality = two_class_mixture(coord, sens, seed=0)
    assert prob.shape == (n, 2) and np.allclose(prob.sum(1), 1)
    assert np.allclose(means, [-0.5, 1.0], atol=0.05)
    assert abs(fractions[1] - truth.mean()) < 0.02
    ours = accuracy(np.argmax(prob, 1), truth)
    plain = accuracy(GaussianMixture(2, random_state=0).fit(coord[:, None]).predict(coord[:, None]), truth)
    assert ours > plain + 0.1 and ours > 0.8
    assert bimodality > 1
