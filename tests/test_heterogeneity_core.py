"""GMM heterogeneity core: deformed rendering, per-particle gradients, Gauss-Newton
coordinates, motion-model normalisation and files."""
import numpy as np
import pytest
import torch

from scipion_gsplat.core.geometry import random_rotations
from scipion_gsplat.core.heterogeneity import analysis
from scipion_gsplat.core.heterogeneity.coordinates import estimate_coordinates
from scipion_gsplat.core.heterogeneity.gradients import particle_gradients, principal_motions
from scipion_gsplat.core.heterogeneity.motion_model import MotionModel, base_parameters
from scipion_gsplat.core.splat.data import ParticleData
from scipion_gsplat.core.splat.model import GaussianModel
from scipion_gsplat.core.splat.render import model_tensors, render

BOX, PIX = 32, 2.0


def _model(rng, n=60):
    centres = rng.normal(0.0, 6.0, (n, 3))
    return GaussianModel(centres, rng.uniform(0.5, 1.5, n), np.full(n, 2.5))


def _motion(model):
    """A rigid translation of the Gaussians with x > 0 along y (1 Å per unit before normalising)."""
    m = np.zeros((1, len(model), 3))
    m[0, model.centres_A[:, 0] > 0, 1] = 1.0
    return torch.tensor(m, dtype=torch.float32)


class _Data(ParticleData):
    """Particles held in memory (no STAR file)."""


def _data(images, rot, ctf=None):
    b = len(images)
    return _Data(None, np.arange(b), torch.tensor(rot, dtype=torch.float32), torch.zeros(b, 2), ctf,
                 torch.tensor(images, dtype=torch.float32), BOX, PIX)


def test_per_pose_centres_render_like_separate_models():
    rng = np.random.default_rng(0)
    model = _model(rng)
    rot = torch.tensor(random_rotations(3, rng), dtype=torch.float32)
    p = model_tensors(model)
    shifts = [rng.normal(0, 1.0, (len(model), 3)) for _ in range(3)]
    batch = dict(p, centres_A=torch.stack([p["centres_A"] + torch.tensor(s, dtype=torch.float32) for s in shifts]))
    together = render(batch, rot, BOX, PIX)
    for b in range(3):
        alone = render(dict(p, centres_A=batch["centres_A"][b]), rot[b:b + 1], BOX, PIX)
        np.testing.assert_allclose(together[b].numpy(), alone[0].numpy(), atol=1e-5)


def _moving_particles(n=40):
    """A one-motion model and ``n`` noise-free images at random coordinates and views."""
    rng = np.random.default_rng(1)
    model = _model(rng)
    mm = MotionModel(base_parameters(model, PIX), _motion(model), None, 2.5)
    z_true = rng.uniform(-3.0, 3.0, (n, 1)).astype(np.float32)
    rot = random_rotations(n, rng)
    with torch.no_grad():
        imgs = render(mm.deformed(torch.tensor(z_true)), torch.tensor(rot, dtype=torch.float32), BOX, PIX)
    return mm, z_true, rot, imgs


def test_gauss_newton_recovers_known_coordinates_without_noise():
    mm, z_true, rot, imgs = _moving_particles()
    z, _ = estimate_coordinates(mm, _data(imgs.numpy(), rot), None, steps=4)
    # views along the motion cannot see it: judge the particles that do see it
    visible = np.abs(rot[:, 1, 1]) > 0.5
    np.testing.assert_allclose(z.numpy()[visible, 0], z_true[visible, 0], atol=0.05)


def test_gradients_match_autograd_per_particle_and_pca_finds_the_motion():
    rng = np.random.default_rng(2)
    model = _model(rng)
    mm = MotionModel(base_parameters(model, PIX), _motion(model), None, 2.5)
    z_true = torch.tensor(rng.uniform(-2.0, 2.0, (60, 1)), dtype=torch.float32)
    rot = random_rotations(60, rng)
    with torch.no_grad():
        imgs = render(mm.deformed(z_true), torch.tensor(rot, dtype=torch.float32), BOX, PIX)
    data = _data(imgs.numpy(), rot)
    phys = {k: v.detach() for k, v in mm.base.tensors().items()}
    g = particle_gradients(phys, data, np.arange(60), amplitudes=True, amp_length_A=2.5)
    assert g.shape == (60, 4 * len(model))
    c = phys["centres_A"].clone().requires_grad_(True)
    one = render(dict(phys, centres_A=c), torch.tensor(rot[5:6], dtype=torch.float32), BOX, PIX)
    ((one - imgs[5:6]).square().sum() / BOX ** 2).backward()  # data_loss's normalisation
    np.testing.assert_allclose(g[5, :3 * len(model)].numpy(), c.grad.reshape(-1).numpy(), rtol=1e-4, atol=1e-6)
    vectors, explained = principal_motions(g[:, :3 * len(model)], 3)
    truth = mm.motions[0].reshape(-1).numpy()
    cos = abs(vectors[0] @ truth) / np.linalg.norm(truth)
    assert cos > 0.5 and explained[0] > 2 * explained[1]  # a random direction: cos ≈ 0.07


def test_normalise_keeps_the_deformed_models_and_sets_units():
    rng = np.random.default_rng(3)
    model = _model(rng)
    mm = MotionModel(base_parameters(model, PIX), 3.0 * _motion(model), torch.tensor(
        rng.normal(0, 0.1, (1, len(model))), dtype=torch.float32), 2.5)
    z = torch.tensor(rng.normal(1.0, 2.0, (20, 1)), dtype=torch.float32)
    before = mm.deformed(z)
    z2 = mm.normalise(z)
    after = mm.deformed(z2)
    np.testing.assert_allclose(after["centres_A"].detach().numpy(), before["centres_A"].detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(after["amplitudes"].detach().numpy(), before["amplitudes"].detach().numpy(), rtol=1e-4)
    assert abs(float(z2.mean())) < 1e-5
    assert float(mm.rms_displacement()[0]) == pytest.approx(1.0, rel=1e-5)


def test_motion_model_files_and_trajectory(tmp_path):
    import gemmi
    rng = np.random.default_rng(4)
    model = _model(rng)
    mm = MotionModel(base_parameters(model, PIX), _motion(model), None, 2.5)
    z = rng.normal(0, 1, (50, 1))
    mm.save(tmp_path / "m.npz", z)
    back, z_back = MotionModel.load(tmp_path / "m.npz")
    np.testing.assert_allclose(back.motions.numpy(), mm.motions.numpy())
    np.testing.assert_allclose(z_back, z)
    out = analysis.write_motion_frames(mm, z, tmp_path, BOX, PIX, n_frames=4)
    st = gemmi.read_structure(out[0]["trajectory"])
    assert len(st) == 4 and len(out[0]["maps"]) == 4
    first, last = (np.array([[r[0].pos.x, r[0].pos.y, r[0].pos.z] for r in st[i][0]]) for i in (0, 3))
    moved = np.linalg.norm(last - first, axis=1)
    assert moved[model.centres_A[:, 0] > 0].min() > 1.0 and moved[model.centres_A[:, 0] <= 0].max() < 1e-2


def test_subsets_by_kmeans_and_bins():
    rng = np.random.default_rng(5)
    z = np.concatenate([rng.normal(-3, 0.3, (50, 2)), rng.normal(3, 0.3, (70, 2))])
    labels, centres = analysis.subsets(z, 2, "kmeans")
    assert sorted(np.bincount(labels)[1:]) == [50, 70] and centres[0, 0] < centres[1, 0]
    labels, _ = analysis.subsets(z, 4, "bins", motion=0)
    assert labels.min() == 1 and labels.max() == 4
    with pytest.raises(Exception):
        analysis.subsets(z, 0)


def test_rodrigues_rotations_and_rigid_parts():
    from scipion_gsplat.core.heterogeneity.parts import apply_rigid, parts_from_motions, rotation_matrices
    r = rotation_matrices(torch.tensor([[0.0, 0.0, 90.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(r[0].numpy(), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(r[1].numpy(), np.eye(3), atol=1e-7)
    w = torch.tensor([[10.0, -20.0, 30.0]])
    rr = rotation_matrices(w)[0].numpy()
    np.testing.assert_allclose(rr @ rr.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(rr) == pytest.approx(1.0, abs=1e-6)
    # part 0 turns 90° about z around (1, 0, 0) and shifts by +2 in z; label -1 stays
    centres = torch.tensor([[[2.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    z = torch.tensor([[0.0, 0.0, 90.0, 0.0, 0.0, 2.0]])
    moved = apply_rigid(centres, z, torch.tensor([0, -1]), torch.tensor([[1.0, 0.0, 0.0]]))
    np.testing.assert_allclose(moved[0].numpy(), [[1.0, 1.0, 2.0], [5.0, 5.0, 5.0]], atol=1e-5)
    # k-means on position + motion separates a moving half from a still one
    rng = np.random.default_rng(0)
    c = rng.normal(0, 5, (200, 3))
    m = np.zeros((1, 200, 3))
    m[0, c[:, 0] > 0, 1] = 1.0
    labels = parts_from_motions(c, m, 2)
    assert max((labels == (c[:, 0] > 0)).mean(), (labels != (c[:, 0] > 0)).mean()) > 0.95


def test_coordinate_likelihood_in_information_form():
    """``η``, ``H`` of the last Gauss-Newton step: ``H⁻¹η`` is the particle's own
    (prior-free) estimate while the MAP coordinate is shrunk by the prior."""
    mm, z_true, rot, imgs = _moving_particles()
    prior = torch.tensor([1.0])  # a strong prior: the MAP is shrunk, the likelihood is not
    z, noise, (eta, prec) = estimate_coordinates(mm, _data(imgs.numpy(), rot), None, steps=3,
                                                 noise_var=1e-4, prior_var=prior, likelihood=True)
    assert eta.shape == (40, 1) and prec.shape == (40, 1, 1)
    visible = np.abs(rot[:, 1, 1]) > 0.5
    np.testing.assert_allclose(eta[visible, 0] / prec[visible, 0, 0], z_true[visible, 0], atol=0.1)
    assert np.abs(z.numpy()[visible, 0]).mean() < np.abs(z_true[visible, 0]).mean()  # the MAP is shrunk
    assert (prec >= 0).all()


def test_deconvolved_prior_gives_better_coordinates_than_one_gaussian():
    """Coordinates on a curved path, each seen with its own singular-ish noise:
    posterior means under the deconvolved mixture beat the MAP under one Gaussian."""
    from scipion_gsplat.core.heterogeneity.deconvolution import deconvolved_coordinates
    rng = np.random.default_rng(0)
    m = 1500
    t = rng.uniform(-1, 1, m)
    truth = np.stack([t, 0.8 * t ** 2], 1)
    a = rng.normal(size=(m, 2, 2)) * rng.uniform(0.5, 10, (m, 1, 1))
    prec = a.transpose(0, 2, 1) @ a
    chol = np.linalg.cholesky(np.linalg.inv(prec + 1e-9 * np.eye(2)))
    obs = truth + np.einsum("mij,mj->mi", chol, rng.normal(size=(m, 2)))
    eta = np.einsum("mij,mj->mi", prec, obs)
    s_inv = np.linalg.inv(np.cov(truth.T))
    z_map = np.linalg.solve(prec + s_inv[None], eta[..., None])[..., 0]
    post, _, prior = deconvolved_coordinates(eta, prec, z_map, 6, seed=0)
    assert post.shape == (m, 2) and np.isfinite(post).all()
    assert np.isclose(prior.weights.sum(), 1.0)
    rmse = lambda z: float(np.sqrt(((z - truth) ** 2).mean()))  # noqa: E731
    assert rmse(post) < 0.9 * rmse(z_map)
    # the prior lies on the path: its density-weighted second coordinate follows t²
    assert abs(float(prior.weights @ prior.means[:, 1]) - 0.8 / 3) < 0.05


def test_small_cholesky_inverse_matches_lapack_and_refuses_indefinite_matrices():
    """The element-wise Cholesky of the deconvolution (a stack of small SPD
    matrices) gives LAPACK's inverses and log-determinants, exactly symmetric."""
    from scipion_gsplat.core.heterogeneity.deconvolution import _small_cholesky_inverse
    a = np.random.default_rng(3).normal(size=(50, 3, 5, 5))
    a = a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(5)
    inv, logdet = _small_cholesky_inverse(a)
    np.testing.assert_allclose(inv, np.linalg.inv(a), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(a)[1], rtol=1e-10, atol=1e-10)
    assert (inv == np.swapaxes(inv, -1, -2)).all()
    a[7, 1] = -np.eye(5)
    with pytest.raises(np.linalg.LinAlgError):
        _small_cholesky_inverse(a)


def test_posterior_covariances_are_calibrated_for_a_gaussian_population():
    """Where the population is what the prior can be (one Gaussian), each
    posterior's covariance matches its error: ``E[eᵀC⁻¹e] = D`` (here 2)."""
    from scipion_gsplat.core.heterogeneity.deconvolution import deconvolved_coordinates
    rng = np.random.default_rng(1)
    m = 2000
    truth = rng.multivariate_normal([1.0, -0.5], [[2.0, 0.6], [0.6, 0.5]], m)
    a = rng.normal(size=(m, 2, 2)) * rng.uniform(0.3, 3, (m, 1, 1))
    prec = a.transpose(0, 2, 1) @ a
    obs = truth + np.einsum("mij,mj->mi", np.linalg.cholesky(np.linalg.inv(prec)), rng.normal(size=(m, 2)))
    post, cov, _ = deconvolved_coordinates(np.einsum("mij,mj->mi", prec, obs), prec, obs, 1, seed=0)
    err = post - truth
    chi2 = np.einsum("mi,mij,mj->m", err, np.linalg.inv(cov), err)
    assert 1.85 < chi2.mean() < 2.15  # standard error ≈ 0.045
    assert (np.linalg.eigvalsh(cov) > 0).all()


def test_refit_epochs_default_depends_on_the_kind_of_motion():
    from scipion_gsplat.core.heterogeneity.pipeline import (REFIT_EPOCHS, REFIT_EPOCHS_AMPLITUDES,
                                                            HeterogeneityConfig, epochs_per_refit)
    assert epochs_per_refit(HeterogeneityConfig()) == REFIT_EPOCHS == 2
    assert epochs_per_refit(HeterogeneityConfig(amplitudes=True)) == REFIT_EPOCHS_AMPLITUDES == 1
    assert epochs_per_refit(HeterogeneityConfig(amplitudes=True, refit_epochs=3)) == 3
    assert epochs_per_refit(HeterogeneityConfig(refit_epochs=0)) == 0


def test_normalised_keeps_the_posterior_spread_in_angstrom():
    """The posterior covariances follow the coordinates into the new units: the
    displacement covariance they imply (``Σ_kl C_kl V_k·V_l``, Å²) is unchanged."""
    from scipion_gsplat.core.heterogeneity.pipeline import normalised
    rng = np.random.default_rng(4)
    model = _model(rng)
    motions = torch.stack([3.0 * _motion(model)[0],
                           torch.tensor(rng.normal(0, 0.5, (len(model), 3)), dtype=torch.float32)])
    mm = MotionModel(base_parameters(model, PIX), motions, None, 2.5)
    z = torch.tensor(rng.normal(1.0, 2.0, (20, 2)), dtype=torch.float32)
    a = torch.tensor(rng.normal(size=(20, 2, 2)), dtype=torch.float32)
    cov = a @ a.transpose(1, 2)
    spread = lambda c, v: torch.einsum("mkl,kni,lni->m", c, v, v)  # noqa: E731
    before = spread(cov, mm.motions.clone())
    z2, cov2 = normalised(mm, z, cov)
    assert float(mm.rms_displacement()[1]) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(spread(cov2, mm.motions).numpy(), before.numpy(), rtol=1e-4)
    assert normalised(mm, z2, None)[1] is None


def test_refit_on_posterior_draws_accounts_for_their_spread():
    """Monte Carlo EM: with exact coordinates a zero-width posterior is the plain
    refit, and a wide one makes the refit shrink the motion (the expected loss
    charges a motion for the images it blurs), reproducibly for a seed."""
    import copy
    from scipion_gsplat.core.heterogeneity.refine import refit
    mm, z_true, rot, imgs = _moving_particles()
    data = _data(imgs.numpy(), rot)
    z = torch.tensor(z_true)
    runs = {}
    for name, chol in [("means", None), ("zero", torch.zeros(40, 1, 1)), ("wide", torch.full((40, 1, 1), 1.0)),
                       ("wide again", torch.full((40, 1, 1), 1.0))]:
        runs[name] = copy.deepcopy(mm)
        refit(runs[name], data, z, epochs=8, batch=8, seed=3, z_chol=chol)
    rms = {name: float(m.rms_displacement()[0]) for name, m in runs.items()}
    np.testing.assert_allclose(runs["zero"].motions.numpy(), runs["means"].motions.numpy(), atol=1e-6)
    np.testing.assert_allclose(runs["wide"].motions.numpy(), runs["wide again"].motions.numpy())
    assert rms["wide"] < 0.95 * rms["means"]  # measured 0.917 (the least-squares limit is 3/4)
