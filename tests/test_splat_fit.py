"""Fitting Gaussian models to particles (core/splat/fit.py, densify.py, reconstruct.py)."""
import numpy as np
import pytest
import torch

from scipion_gsplat.core import fsc, geometry, io
from scipion_gsplat.core.reconstruct import reconstruct_particles
from scipion_gsplat.core.splat import init as initial
from scipion_gsplat.core.splat.data import ParticleData
from scipion_gsplat.core.splat.densify import DensityStats, densify_and_prune, make_optimizer
from scipion_gsplat.core.splat.fit import FitConfig, FitDivergedError, fit
from scipion_gsplat.core.splat.metrics import centre_rmsd
from scipion_gsplat.core.splat.model import GaussianModel
from scipion_gsplat.core.splat.parameters import SplatParameters
from scipion_gsplat.core.splat.reconstruct import InitSpec, reconstruct_splat
from scipion_gsplat.programs import simulate


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny problems: one thread is as fast and immune to busy cores (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def noiseless(tmp_path_factory, lysozyme_pdb):
    """300 noise-free particles (40 px, 2 Å, CTF, origins) of lysozyme made of one
    Gaussian per residue, and that ground-truth model."""
    out = tmp_path_factory.mktemp("splat_noiseless")
    assert simulate.run(["-i", str(lysozyme_pdb), "-o", str(out), "-n", "300", "--box", "40",
                         "--angpix", "2", "--snr", "inf", "--density", "residue-gaussians",
                         "--seed", "5", "--device", "cpu"]) == 0
    star = io.read_particles(out / "particles.star")
    return star, GaussianModel.load(out / "truth_state1_gaussians.npz")


def test_fit_recovers_a_known_model_from_noiseless_projections(noiseless):
    star, truth = noiseless
    data = ParticleData.from_star(star)
    start = initial.perturb(truth, 1.0, np.random.default_rng(0))
    before = centre_rmsd(start.centres_A, truth.centres_A, "index")
    cfg = FitConfig(epochs=8, batch=32, lr_centres_A=0.1, fit_amplitudes=False, fit_widths=False)
    result = fit(start, data, cfg, seed=1, calibrate=False)
    after = centre_rmsd(result.model.centres_A, truth.centres_A, "hungarian", superpose=True)
    print(f"centre RMSD {before:.2f} Å → {after:.3f} Å (matched, superposed)")
    assert before > 1.5 and after < 0.5
    assert result.history[-1]["loss"] < 0.1 * result.history[0]["loss"]


def test_noisy_data_give_a_better_map_than_fourier_reconstruction(sim_small):
    """SNR 1, 400 particles: FSC against the truth of the splat map (half models
    from independent starts) and of our Fourier reconstruction."""
    star = io.read_particles(sim_small / "particles.star")
    truth, pix = io.read_map(sim_small / "truth_state1.mrc")
    rec = reconstruct_splat(star, InitSpec(n_gaussians=600), FitConfig(epochs=12, batch=32), halves=True)
    auc_splat = fsc.fsc_auc(fsc.fsc_curve(rec.full_map, truth, pix)[1])
    auc_fourier = fsc.fsc_auc(fsc.fsc_curve(reconstruct_particles(star).full, truth, pix)[1])
    print(f"FSC-to-truth AUC: splat {auc_splat:.3f}, Fourier {auc_fourier:.3f}, "
          f"GSFSC 0.143 {rec.resolution_A(0.143):.2f} Å")
    assert auc_splat > auc_fourier + 0.05
    assert rec.resolution_A(0.143) < 6.0
    assert len(rec.model) == 1200 and len(rec.half_models) == 2
    assert np.allclose(rec.model.to_map(40, pix), rec.full_map, atol=1e-5 * rec.full_map.max())
    # the two halves started from different points
    assert centre_rmsd(rec.fits[0].model.centres_A, rec.fits[1].model.centres_A, "index") > 1.0


def test_bond_regulariser_holds_neighbour_distances(noiseless):
    star, truth = noiseless
    data = ParticleData.from_star(star, np.arange(128))
    start = initial.perturb(truth, 1.5, np.random.default_rng(2))
    pairs = initial.bond_pairs(start.centres_A, sequential=True)
    assert len(pairs) > 100
    r0 = float(np.median(np.linalg.norm(truth.centres_A[pairs[:, 0]] - truth.centres_A[pairs[:, 1]], axis=1)))
    spread = {}
    for k in (0.0, 10.0):
        cfg = FitConfig(epochs=4, batch=16, lr_centres_A=0.1, fit_amplitudes=False, fit_widths=False,
                        bond_weight=k, bond_length_A=r0)
        c = fit(start, data, cfg, pairs=pairs, calibrate=False).model.centres_A
        spread[k] = np.abs(np.linalg.norm(c[pairs[:, 0]] - c[pairs[:, 1]], axis=1) - r0).mean()
    print(f"mean |bond length − r0|: {spread[0.0]:.2f} Å without, {spread[10.0]:.2f} Å with the regulariser")
    assert spread[10.0] < 0.5 * spread[0.0]


@pytest.mark.filterwarnings("ignore:Data array contains NaN:RuntimeWarning")
def test_nan_loss_and_bad_images_give_clear_errors(noiseless, tmp_path):
    star, truth = noiseless
    data = ParticleData.from_star(star, np.arange(64))
    with pytest.raises(FitDivergedError, match="learning rate"):
        fit(truth, data, FitConfig(epochs=2, batch=32, lr_amplitudes=1e4))
    stack = io.ImageReader(star).read(np.arange(4))
    stack[2, 5, 5] = np.nan
    io.write_stack(tmp_path / "nan.mrcs", stack, star.pixel_size)
    parts = star.particles.iloc[:4].copy()
    parts["rlnImageName"] = [f"{i + 1}@nan.mrcs" for i in range(4)]
    io.write_particles(tmp_path / "nan.star", io.ParticleStar(parts, star.optics, tmp_path / "nan.star"))
    with pytest.raises(io.InputError, match="NaN"):
        ParticleData.from_star(io.read_particles(tmp_path / "nan.star"))


def test_interrupted_fit_resumes_from_its_checkpoint(noiseless, tmp_path):
    star, truth = noiseless
    data = ParticleData.from_star(star, np.arange(64))
    start = initial.perturb(truth, 0.5, np.random.default_rng(3))
    cfg = FitConfig(epochs=3, batch=16)
    full = fit(start, data, cfg, seed=4)

    class Stop(Exception):
        pass

    def stop_in_epoch_3(done, total):
        if done == 9:
            raise Stop()
    with pytest.raises(Stop):
        fit(start, data, cfg, seed=4, checkpoint=tmp_path / "ck.pt", progress=stop_in_epoch_3)
    lines = []
    resumed = fit(start, data, cfg, seed=4, checkpoint=tmp_path / "ck.pt", log=lines.append)
    assert any("resumed" in line and "after epoch 2" in line for line in lines)
    assert resumed.steps == full.steps == 12
    assert np.array_equal(resumed.model.centres_A, full.model.centres_A)
    # a different configuration does not pick up the checkpoint
    other = fit(start, data, FitConfig(epochs=1, batch=16), seed=4, checkpoint=tmp_path / "ck.pt")
    assert other.steps == 4


def test_densify_and_prune_keep_the_map_and_the_optimiser_state():
    rng = np.random.default_rng(5)
    model = GaussianModel(rng.normal(0, 5, (50, 3)), np.r_[np.full(45, 1.0), np.full(5, 1e-4)],
                          rng.uniform(1.0, 2.5, 50))
    params = SplatParameters.from_model(model, 0.7)
    opt = make_optimizer(params, {"centres": 0.1, "log_amplitudes": 0.01, "width": 0.01,
                                  "cholesky_offdiag": 0.01})
    loss = params.tensors()["centres_A"].square().sum() + params.tensors()["sigmas_A"].sum()
    loss.backward()
    opt.step()
    stats = DensityStats.zeros(50)
    stats.add(params.raw["centres"].grad)
    before = params.to_model().to_map(32, 1.0)
    new, new_opt, info = densify_and_prune(params, opt, stats, rng, densify_fraction=0.2,
                                           prune_threshold=0.01)
    assert info == {"split": info["split"], "cloned": 10 - info["split"], "pruned": 5, "n": 55}
    assert info["split"] > 0 and info["cloned"] > 0
    after = new.to_model().to_map(32, 1.0)
    assert after.sum() == pytest.approx(before.sum(), rel=1e-3)   # the density is conserved
    assert np.corrcoef(after.ravel(), before.ravel())[0, 1] > 0.97
    state = new_opt.state[new.raw["centres"]]
    assert state["exp_avg"].shape == (55, 3) and float(state["step"]) == 1.0
    new.tensors()["centres_A"].sum().backward()
    new_opt.step()  # the transplanted optimiser works


def test_centre_rmsd_after_matching_and_superposition():
    rng = np.random.default_rng(6)
    a = rng.normal(0, 8, (40, 3))
    rot = geometry.axis_angle_matrix([1, 2, 3], 25.0)
    b = (a @ rot.T + [1.0, -2.0, 0.5])[rng.permutation(40)]
    assert centre_rmsd(b, a, "hungarian") > 1.0
    assert centre_rmsd(b, a, "hungarian", superpose=True) < 1e-6
    assert centre_rmsd(a + 0.3, a, "index") == pytest.approx(np.sqrt(3 * 0.09))


def test_initial_models_from_map_mask_and_structure(sim_small, lysozyme_pdb):
    truth, pix = io.read_map(sim_small / "truth_state1.mrc")
    rng = np.random.default_rng(7)
    m = initial.from_map(truth, pix, 500, rng, 1.4)
    assert len(m) == 500 and np.linalg.norm(m.centres_A, axis=1).max() < 30.0
    assert m.amplitudes.sum() == pytest.approx(truth[truth >= 0.25 * np.percentile(truth, 99.9)].sum(), rel=0.2)
    with pytest.raises(io.InputError, match="empty"):
        initial.from_mask(np.zeros((40,) * 3), pix, 10, rng, 1.4)
    sphere = initial.from_mask(initial.sphere_mask(40, 10), pix, 300, rng, 1.4)
    assert np.linalg.norm(sphere.centres_A, axis=1).max() <= 10.5 * pix
    res = initial.from_structure_file(lysozyme_pdb, "residue", 1.4, "com", 40, pix)
    assert len(res) == 129 and np.abs(res.centres_A.mean(0)).max() < 3.0
    with pytest.raises(io.InputError, match="outside the particle box"):
        initial.from_structure_file(lysozyme_pdb, "residue", 1.4, "500,500,500", 40, pix)
    data = ParticleData.from_star(io.read_particles(sim_small / "particles.star"), np.arange(50))
    assert torch.is_tensor(data.images) and data.images.shape == (50, 40, 40)


def test_initial_model_from_a_small_particle_in_a_large_box(sim_small):
    """The particle fills under 0.1 % of the box (as lysozyme at 256 px): the
    99.9th percentile is solvent, the Gaussians must still land on the density."""
    truth, pix = io.read_map(sim_small / "truth_state1.mrc")
    big = 176  # 5.4 M voxels; lysozyme fills ~0.08 %
    vol = np.random.default_rng(3).normal(0, 0.01 * truth.max(), (big,) * 3).astype(np.float32)
    lo = big // 2 - truth.shape[0] // 2
    vol[lo:lo + truth.shape[0], lo:lo + truth.shape[0], lo:lo + truth.shape[0]] += truth
    assert np.percentile(vol, 99.9) < 0.1 * truth.max()  # the old reference density: solvent
    m = initial.from_map(vol, pix, 300, np.random.default_rng(7), 1.4)
    assert np.mean(np.linalg.norm(m.centres_A, axis=1) < 30.0) > 0.98  # on the particle (radius ~22 Å)


def test_time_limit_stops_the_fit_with_a_decayed_learning_rate(noiseless):
    star, truth = noiseless
    data = ParticleData.from_star(star, np.arange(64))
    result = fit(truth, data, FitConfig(epochs=10000, batch=16, time_limit_s=1.0), calibrate=False)
    assert result.stopped_early and result.steps < 10000 * 4
    assert result.history[-1]["lr_factor"] < 0.2
