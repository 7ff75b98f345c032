"""Gaussian models and their analytic projections (core/splat/model.py, render.py)."""
import shutil
import subprocess

import gemmi
import mrcfile
import numpy as np
import pytest
import torch

from scipion_gsplat.core import fourier, geometry, io
from scipion_gsplat.core.splat import render as R
from scipion_gsplat.core.splat.model import B_TO_SIGMA2, GaussianModel
from scipion_gsplat.core.splat.parameters import SplatParameters

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny problems: one thread is as fast and immune to busy cores (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CTF = {"defocus_u_A": 15000.0, "defocus_v_A": 14200.0, "defocus_angle_deg": 30.0, "voltage_kV": 300.0,
       "cs_mm": 2.7, "amplitude_contrast": 0.1}


def _ctf(n):
    return {k: np.full(n, v) for k, v in CTF.items()}


def _random_model(rng, n=60, spread=6.0, aniso=False):
    centres = rng.normal(0, spread, (n, 3))
    amps = rng.uniform(0.5, 2.0, n)
    if not aniso:
        return GaussianModel(centres, amps, rng.uniform(1.5, 3.0, n))
    low = np.tril(rng.normal(0, 0.6, (n, 3, 3)), -1) + np.eye(3) * rng.uniform(1.2, 2.5, (n, 1, 1))
    return GaussianModel(centres, amps, cholesky_A=low)


def test_one_gaussian_matches_its_line_integral():
    """Pixel values equal the analytic integral of the 3D Gaussian along the beam
    (numerical quadrature through each pixel centre, in the map frame), and the
    image integral, centre (A·μ)_xy − origin and width are preserved."""
    box, pix = 32, 1.25
    mu, amp, sig = np.array([4.0, -2.5, 3.0]), 3.0, 2.1
    model = GaussianModel(mu[None], [amp], [sig])
    rot = geometry.euler_to_matrix(37.0, 71.0, -122.0)[None]
    origin = np.array([[1.5, -2.0]])
    img = R.project_model(model, rot, pix, box, shifts_A=origin)[0]
    # quadrature: image point (x, y) ↦ map point Aᵀ·(x, y, t), t along the beam
    g = (np.arange(box) - box // 2) * pix
    t = np.linspace(-25, 25, 2001)
    yy, xx = np.meshgrid(g + origin[0, 1], g + origin[0, 0], indexing="ij")
    pts = np.stack([np.broadcast_to(xx[..., None], xx.shape + t.shape),
                    np.broadcast_to(yy[..., None], yy.shape + t.shape),
                    np.broadcast_to(t, xx.shape + t.shape)], -1) @ rot[0]  # rows: Aᵀ·p
    dens = amp * (2 * np.pi * sig ** 2) ** -1.5 * np.exp(-0.5 * ((pts - mu) ** 2).sum(-1) / sig ** 2)
    expected = np.trapz(dens, t, axis=-1) * pix ** 2
    assert np.abs(img - expected).max() < 2e-4 * expected.max()
    assert img.sum() == pytest.approx(amp, rel=1e-4)
    yx = np.stack(np.meshgrid(g, g, indexing="ij"))
    centroid = (yx * img).sum((1, 2)) / img.sum()
    assert centroid[::-1] == pytest.approx((rot[0] @ mu)[:2] - origin[0], abs=1e-3)
    var = (((yx - centroid[:, None, None]) ** 2) * img).sum((1, 2)) / img.sum()
    assert np.sqrt(var) == pytest.approx([sig, sig], rel=1e-3)


@pytest.mark.parametrize("aniso", [False, True])
def test_projection_matches_fourier_projection_of_the_map(aniso):
    rng = np.random.default_rng(2)
    box, pix = 40, 1.5
    model = _random_model(rng, aniso=aniso)
    poses = geometry.random_rotations(12, rng)
    shifts = rng.normal(0, 2.0, (12, 2))
    ours = R.project_model(model, poses, pix, box, shifts, _ctf(12))
    ref = fourier.project(model.to_map(box, pix), poses, pix, shifts, _ctf(12))
    cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, ref)]
    assert min(cc) >= 0.995  # differences: sampling of widths below ~1 voxel in 3D vs 2D
    assert (ours * ref).sum() / (ref * ref).sum() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("aniso", [False, True])
def test_rendering_in_a_crop_of_the_support_is_exact(aniso):
    """A compact model in a large box is rendered in a small centred crop and
    zero-padded: the images equal the Fourier projection of its map over the box."""
    rng = np.random.default_rng(9)
    box, pix = 64, 1.5
    model = _random_model(rng, n=40, spread=3.0, aniso=aniso)
    sig = float(np.sqrt(np.linalg.eigvalsh(model.covariances_A2())[:, -1].max()))
    assert R.support_box(torch.tensor(model.centres_A), sig, pix, box) < box // 2 + 8
    poses = geometry.random_rotations(6, rng)
    shifts = rng.normal(0, 3.0, (6, 2))
    ours = R.project_model(model, poses, pix, box, shifts, _ctf(6))
    ref = fourier.project(model.to_map(box, pix), poses, pix, shifts, _ctf(6))
    cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, ref)]
    assert min(cc) >= 0.995
    assert ours.sum() == pytest.approx(ref.sum(), rel=0.01)


def test_anisotropic_renderer_and_map_agree_with_isotropic_ones():
    rng = np.random.default_rng(3)
    iso = _random_model(rng, n=40)
    aniso = iso.to_anisotropic()
    poses = geometry.random_rotations(6, rng)
    a = R.project_model(iso, poses, 1.5, 36)
    b = R.project_model(aniso, poses, 1.5, 36)
    assert np.abs(a - b).max() < 1e-5 * np.abs(a).max()
    assert np.abs(iso.to_map(36, 1.5) - aniso.to_map(36, 1.5)).max() < 1e-5 * iso.to_map(36, 1.5).max()


def test_elongated_gaussian_has_the_projected_covariance():
    """Second moments of the image of one anisotropic Gaussian equal P·A·Σ·Aᵀ·Pᵀ."""
    low = np.array([[3.0, 0, 0], [1.2, 1.4, 0], [-0.5, 0.3, 1.1]])
    model = GaussianModel(np.zeros((1, 3)), [1.0], cholesky_A=low[None])
    rot = geometry.euler_to_matrix(20.0, 50.0, 80.0)
    img = R.project_model(model, rot[None], 1.0, 48)[0]
    g = np.arange(48) - 24.0
    yy, xx = np.meshgrid(g, g, indexing="ij")
    cov = np.array([[(xx * xx * img).sum(), (xx * yy * img).sum()],
                    [(xx * yy * img).sum(), (yy * yy * img).sum()]]) / img.sum()
    expected = (rot @ low @ low.T @ rot.T)[:2, :2]
    assert cov == pytest.approx(expected, abs=1e-3)
    assert img.sum() == pytest.approx(1.0, rel=1e-5)


def test_dense_and_windowed_profiles_agree_and_batching_is_invisible():
    rng = np.random.default_rng(4)
    model = _random_model(rng, n=80, spread=5.0)
    p = R.model_tensors(model)
    rot = torch.tensor(geometry.random_rotations(5, rng), dtype=torch.float32)
    d = R.render_isotropic(p["centres_A"], p["amplitudes"], p["sigmas_A"], rot, 48, 1.0, "dense")
    w = R.render_isotropic(p["centres_A"], p["amplitudes"], p["sigmas_A"], rot, 48, 1.0, "window")
    assert (d - w).abs().max() < 1e-5 * d.abs().max()
    poses = geometry.random_rotations(9, rng)
    one = R.project_model(model, poses, 1.0, 48, max_elements=1)          # one image per batch
    many = R.project_model(model, poses, 1.0, 48, max_elements=2 ** 24)
    assert R.micro_batch_size(80, 48, 3.0, 1.0, max_elements=2 ** 15) == 4
    assert np.abs(one - many).max() < 1e-6


@pytest.mark.parametrize("aniso,window", [(False, "dense"), (False, "window"), (True, "auto")])
def test_autograd_matches_finite_differences(aniso, window):
    """Gradients of rendered, shifted, CTF-modulated images with respect to the
    raw parameters (centres, log-amplitudes, widths, Cholesky factors)."""
    rng = np.random.default_rng(5)
    model = _random_model(rng, n=3, spread=3.0, aniso=aniso)
    params = SplatParameters.from_model(model, 0.8, anisotropic=aniso)
    raw = {k: v.detach().double().requires_grad_(True) for k, v in params.raw.items()}
    rot = torch.tensor(geometry.random_rotations(2, rng), dtype=torch.float64)
    shifts = torch.tensor(rng.normal(0, 1.5, (2, 2)), dtype=torch.float64)
    names = list(raw)

    def images(*tensors):
        p = SplatParameters(dict(zip(names, tensors)), 0.8)
        return R.render(p.tensors(), rot, 20, 1.2, shifts, _ctf(2), window)

    # fast mode compares vᵀ·J·u for random u, v: analytic against central differences
    assert torch.autograd.gradcheck(images, tuple(raw[k] for k in names), eps=1e-6, atol=1e-6,
                                    rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("window,tol", [("dense", 1e-10), ("window", 2e-5)])
def test_written_out_gradients_match_autograd_of_the_profiles(window, tol):
    """The isotropic renderer's hand-written backward pass against autograd
    through the plain formula (dense profiles on the whole box), with every
    pose its own deformed model (centres ``(B, N, 3)``, amplitudes ``(B, N)``)
    and Gaussians whose windows run off the edge of the image."""
    from scipion_gsplat.core.splat.model import gaussian_profiles, pixel_grid_A
    rng = np.random.default_rng(8)
    b, n, box, pix = 3, 9, 24, 1.1
    centres = torch.tensor(rng.normal(0, 4.0, (b, n, 3)), dtype=torch.float64)
    centres[:, :2] = torch.tensor([[11.5, -2.0, 1.0], [-1.0, 12.5, -3.0]], dtype=torch.float64)  # at the edge
    centres.requires_grad_(True)
    amps = torch.tensor(rng.uniform(0.5, 2.0, (b, n)), dtype=torch.float64, requires_grad=True)
    sigmas = torch.tensor(rng.uniform(1.0, 2.2, n), dtype=torch.float64, requires_grad=True)
    rot = torch.tensor(geometry.random_rotations(b, rng), dtype=torch.float64)
    weights = torch.tensor(rng.normal(0, 1, (b, box, box)), dtype=torch.float64)

    img = R.render_isotropic(centres, amps, sigmas, rot, box, pix, window)
    grads = torch.autograd.grad((img * weights).sum(), (centres, amps, sigmas))

    xy = R.projected_centres_A(centres, rot)
    grid = pixel_grid_A(box, pix, dtype=torch.float64)
    gx = gaussian_profiles(grid, xy[..., 0], sigmas, pix)
    gy = gaussian_profiles(grid, xy[..., 1], sigmas, pix) * amps.unsqueeze(-1)
    ref = torch.bmm(gy.transpose(1, 2), gx)
    expected = torch.autograd.grad((ref * weights).sum(), (centres, amps, sigmas))

    assert (img - ref).abs().max() <= tol * ref.abs().max()
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tol * want.abs().max()


def test_parameters_round_trip():
    rng = np.random.default_rng(6)
    for aniso in (False, True):
        model = _random_model(rng, n=10, aniso=aniso)
        back = SplatParameters.from_model(model, 0.5, anisotropic=aniso).to_model()
        assert np.allclose(back.centres_A, model.centres_A, atol=1e-5)
        assert np.allclose(back.amplitudes, model.amplitudes, rtol=1e-5)
        assert np.allclose(back.covariances_A2(), model.covariances_A2(), atol=1e-4)


def test_model_files_and_structure_export(tmp_path):
    rng = np.random.default_rng(7)
    model = _random_model(rng, n=25, aniso=True)
    model.save(tmp_path / "m.npz")
    back = GaussianModel.load(tmp_path / "m.npz")
    assert back.is_anisotropic and np.array_equal(back.cholesky_A, model.cholesky_A)
    iso = _random_model(rng, n=25)
    origin = np.full(3, 32 * 1.5)
    for name, m in (("iso.pdb", iso), ("iso.cif", iso), ("aniso.pdb", model)):
        m.write_structure(tmp_path / name, origin_A=origin, cell_A=96.0)
        st = gemmi.read_structure(str(tmp_path / name))
        atoms = [cra.atom for cra in st[0].all()]
        xyz = np.array([a.pos.tolist() for a in atoms])
        assert len(atoms) == 25 and np.allclose(xyz, m.centres_A + origin, atol=2e-3)
        b = np.array([a.b_iso for a in atoms])
        assert np.allclose(b, np.minimum(m.sigmas_A ** 2 / B_TO_SIGMA2, 999.99), rtol=1e-3, atol=0.02)
    assert st[0][0][0][0].aniso.nonzero()
    with pytest.raises(io.InputError):
        iso.write_structure(tmp_path / "m.xyz")
    with pytest.raises(io.InputError):
        GaussianModel.load(tmp_path / "missing.npz")


@pytest.mark.skipif(shutil.which("relion_project") is None, reason="RELION is not installed")
def test_renderer_matches_relion_project(sim_small, tmp_path):
    """The rendered particles (poses, origins, CTF) against relion_project of the
    model's voxel map: the renderer follows RELION's conventions."""
    rng = np.random.default_rng(8)
    model = _random_model(rng, n=150, spread=7.0)
    io.write_map(tmp_path / "model.mrc", model.to_map(40, 2.0), 2.0)
    star = io.read_particles(sim_small / "particles.star")
    io.write_particles(tmp_path / "sub.star", star.subset(np.arange(30)))
    sub = io.read_particles(tmp_path / "sub.star")
    subprocess.run(["relion_project", "--i", "model.mrc", "--o", "proj", "--ang", "sub.star", "--ctf"],
                   cwd=tmp_path, check=True, capture_output=True)
    ref = mrcfile.read(tmp_path / "proj.mrcs")
    ours = R.project_model(model, sub.poses(), 2.0, 40, sub.shifts_A(), sub.ctf_params())
    cc = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, ref)])
    assert cc.min() >= 0.99
