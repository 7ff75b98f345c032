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
