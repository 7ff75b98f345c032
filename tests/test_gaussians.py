"""Gaussian models (core/splat/model.py) from structures and their voxel maps."""
import numpy as np
import pytest

from scipion_gsplat.core import fsc, io, structure
from scipion_gsplat.core.splat import model as gaussians
from scipion_gsplat.programs import simulate


@pytest.fixture(scope="module")
def lyso(lysozyme_pdb):
    return structure.read_structure(lysozyme_pdb)


def test_single_gaussian_voxel_sum_and_centre():
    m = gaussians.GaussianModel(np.array([[3.0, -1.5, 0.0]]), np.array([2.0]), np.array([2.0]))
    vol = m.to_map(32, 1.0)
    assert vol.sum() == pytest.approx(2.0, rel=1e-4)
    c = np.arange(32) - 16
    com = [(vol.sum(axis=tuple(j for j in range(3) if j != ax)) * c).sum() / vol.sum() for ax in (2, 1, 0)]
    assert np.allclose(com, [3.0, -1.5, 0.0], atol=1e-3)


def test_atom_gaussians_match_gemmi_density(lyso):
    m = gaussians.from_structure(lyso, "atom", extra_sigma_A=0.75)
    assert len(m) == lyso[0].count_atom_sites()
    assert np.all(m.sigmas_A > 0.75) and np.all(m.amplitudes > 0)
    v_g = m.to_map(48, 1.5)
    v_e = structure.structure_to_map(lyso, 48, 1.5)
    assert np.corrcoef(v_g.ravel(), v_e.ravel())[0, 1] > 0.999


def test_residue_gaussians(lyso):
    r = gaussians.from_structure(lyso, "residue")
    a = gaussians.from_structure(lyso, "atom")
    assert len(r) == 129
    assert r.amplitudes.sum() == pytest.approx(a.amplitudes.sum())
    f, c = fsc.fsc_curve(r.to_map(48, 1.5), a.to_map(48, 1.5), 1.5)
    assert c[3] > 0.95 and fsc.resolution_at(f, c, 0.5) < 10.0  # same low-resolution shape


def test_save_load(tmp_path, lyso):
    m = gaussians.from_structure(lyso, "residue")
    m.save(tmp_path / "m.npz")
    back = gaussians.GaussianModel.load(tmp_path / "m.npz")
    assert np.array_equal(back.centres_A, m.centres_A) and np.array_equal(back.sigmas_A, m.sigmas_A)
    with pytest.raises(io.InputError):
        gaussians.GaussianModel.load(tmp_path / "none.npz")


def test_simulate_with_gaussian_density(tmp_path, lysozyme_pdb):
    out = tmp_path / "g"
    assert simulate.run(["-i", str(lysozyme_pdb), "-o", str(out), "-n", "20", "--box", "40",
                         "--angpix", "2", "--density", "residue-gaussians", "--device", "cpu"]) == 0
    model = gaussians.GaussianModel.load(out / "truth_state1_gaussians.npz")
    vol, _ = io.read_map(out / "truth_state1.mrc")
    assert len(model) == 129 and np.allclose(model.to_map(40, 2.0), vol, atol=1e-5)
