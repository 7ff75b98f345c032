"""Structures → maps → simulated particles with ground truth."""
import numpy as np
import pytest

from scipion_gsplat.core import io, simulate as sim, structure as st


@pytest.fixture(scope="module")
def lyso(lysozyme_pdb):
    return st.read_structure(lysozyme_pdb)


def test_map_is_centred_and_positive(lyso):
    vol = st.structure_to_map(lyso, 48, 2.0)
    assert vol.shape == (48, 48, 48) and vol.min() >= -1e-6
    c = np.arange(48) - 24
    com = [(vol.sum(axis=tuple(j for j in range(3) if j != ax)) * c).sum() / vol.sum() for ax in range(3)]
    assert np.allclose(com, 0.0, atol=0.3)  # centre of mass at voxel n//2
    with pytest.raises(io.InputError, match="does not fit"):
        st.structure_to_map(lyso, 16, 1.0)


def test_remove_residues(lyso):
    small = st.remove_residues(lyso, "A/100-129")
    n0, n1 = lyso[0].count_atom_sites(), small[0].count_atom_sites()
    assert 0.7 * n0 < n1 < 0.85 * n0
    with pytest.raises(io.InputError):
        st.remove_residues(lyso, "B/1-5")


def test_rotate_segment_moves_only_the_segment(lyso):
    moved = st.rotate_segment(lyso, "A/40-88", 30.0)
    a0, a1 = st.atom_arrays(lyso)["xyz_A"], st.atom_arrays(moved)["xyz_A"]
    d = np.linalg.norm(a1 - a0, axis=1)
    resnum = np.array([cra.residue.seqid.num for cra in lyso[0].all()])
    seg = (resnum >= 40) & (resnum <= 88)
    assert np.all(d[~seg] < 1e-6)
    assert d[seg].max() > 5.0
    # rigid: distances inside the segment are kept
    i, j = np.flatnonzero(seg)[[0, -1]]
    assert np.linalg.norm(a1[i] - a1[j]) == pytest.approx(np.linalg.norm(a0[i] - a0[j]), abs=1e-4)


def test_states_and_populations(lyso):
    states = sim.make_states(lyso, hinge="A/40-88", hinge_angle_deg=20, n_states=5)
    assert [s.parameter for s in states] == pytest.approx([0, 5, 10, 15, 20])
    labels = sim.assign_states(1000, [0.85, 0.15], np.random.default_rng(0))
    assert np.bincount(labels)[1:].tolist() == [850, 150]
    with pytest.raises(io.InputError):
        sim.make_states(lyso, remove="A/1-5", hinge="A/40-88")


def test_two_independent_hinges_make_a_grid_of_states(lyso):
    states = sim.make_states(lyso, hinge="A/40-88", hinge_angle_deg=20, n_states=3,
                             hinge2="A/1-20", hinge2_angle_deg=30)
    assert len(states) == 9
    assert [(s.parameter, s.parameter2) for s in states[:4]] == [(0, 0), (0, 15), (0, 30), (10, 0)]

    def xyz(st, sel):
        return np.array([a.pos.tolist() for ch in st[0] for r in ch for a in r
                         if (sel[0] <= r.seqid.num <= sel[1])])
    # the second segment moves with the second angle only, the first with the first only
    assert np.abs(xyz(states[1].structure, (1, 20)) - xyz(states[0].structure, (1, 20))).max() > 1.0
    assert np.abs(xyz(states[1].structure, (40, 88)) - xyz(states[0].structure, (40, 88))).max() < 1e-4
    assert np.abs(xyz(states[3].structure, (1, 20)) - xyz(states[0].structure, (1, 20))).max() < 1e-4
    with pytest.raises(io.InputError):
        sim.make_states(lyso, hinge2="A/1-20")


def test_simulated_set_has_requested_snr(sim_small):
    star = io.read_particles(sim_small / "particles.star")
    truth = np.load(sim_small / "ground_truth.npz")
    assert len(star) == 400 and star.box_size == 40 and star.pixel_size == 2.0
    assert float(truth["snr"]) == 1.0
    imgs = io.ImageReader(star).read(np.arange(100))
    noise_var = float(truth["noise_sigma"]) ** 2
    # total variance = signal + noise = noise·(1 + SNR)
    assert imgs.var(axis=(1, 2)).mean() == pytest.approx(noise_var * 2.0, rel=0.1)
    assert set(np.unique(star.half_set())) == {1, 2}
