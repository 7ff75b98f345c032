"""Coloured noise in the simulator (gsplat_simulate --noise-bfactor): white by
default with the same random draws as before, a falling power spectrum when
coloured, the SNR kept as a total-variance ratio."""
from __future__ import annotations

import numpy as np
import pytest

from scipion_gsplat.programs import simulate as simulate_program
from scipion_gsplat.core import io
from scipion_gsplat.core import simulate as sim

BOX, PIX, N, SEED, SNR = 32, 3.0, 96, 5, 0.5
B = 200.0  # Å²: at 3 Å pixels the noise power at Nyquist is 6 % of that at the origin


def _blob() -> np.ndarray:
    """An off-centre pair of Gaussian blobs [z, y, x] (not rotationally symmetric)."""
    z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX // 2
    return (np.exp(-((x - 3) ** 2 + y ** 2 + z ** 2) / 8.0)
            + 0.6 * np.exp(-(x ** 2 + (y + 4) ** 2 + (z - 2) ** 2) / 5.0)).astype(np.float32)


def _simulate(path, snr: float, **kw) -> tuple[np.ndarray, dict]:
    labels = np.ones(N, int)
    star = sim.simulate_particles([_blob()], labels, sim.Acquisition(box=BOX, pixel_size_A=PIX), snr, path,
                                  np.random.default_rng(SEED), **kw)
    images = np.stack([img for _, img in _stack(star)])
    return images, dict(np.load(path / "ground_truth.npz"))


def _stack(star_path):
    reader = io.ImageReader(io.read_particles(star_path))
    for rows, imgs in reader.chunks(1000):
        yield from zip(rows, imgs)


def _replayed_white_noise(sigma: float) -> np.ndarray:
    """The noise draws of simulate_particles as the simulator has always made them:
    particle table, SNR probe, then one normal draw per chunk."""
    rng = np.random.default_rng(SEED)
    sim.random_particle_table(N, sim.Acquisition(box=BOX, pixel_size_A=PIX), rng)
    rng.choice(N, size=min(N, 256), replace=False)
    return rng.normal(0.0, sigma, (N, BOX, BOX)).astype(np.float32)


def _radial_power(noise: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum (per shell, shells 0 … BOX//2)."""
    return _shells((np.abs(np.fft.fft2(noise)) ** 2).mean(0) / BOX ** 2)


def _radial_power_of_filter(amplitude: np.ndarray) -> np.ndarray:
    """Radial average of the power of a ``(BOX, BOX//2+1)`` amplitude filter, on the full grid."""
    full = np.concatenate([amplitude, amplitude[:, 1:-1][(-np.arange(BOX)) % BOX, ::-1]], axis=1)
    return _shells(full ** 2)


def _shells(power: np.ndarray) -> np.ndarray:
    f = np.fft.fftfreq(BOX) * BOX
    shell = np.rint(np.hypot(f[:, None], f[None, :])).astype(int)
    return np.array([power[shell == k].mean() for k in range(BOX // 2 + 1)])


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    clean, _ = _simulate(root / "clean", np.inf)
    white, g_white = _simulate(root / "white", SNR)
    explicit, _ = _simulate(root / "white0", SNR, noise_bfactor_A2=0.0)
    coloured, g_col = _simulate(root / "coloured", SNR, noise_bfactor_A2=B)
    return {"clean": clean, "white": white, "explicit": explicit, "coloured": coloured,
            "g_white": g_white, "g_col": g_col}


def test_white_noise_is_the_default_with_unchanged_draws(sets):
    sigma = float(sets["g_white"]["noise_sigma"])
    assert float(sets["g_white"]["noise_bfactor_A2"]) == 0.0
    np.testing.assert_array_equal(sets["white"], sets["explicit"])
    noise = sets["white"] - sets["clean"]
    np.testing.assert_allclose(noise, _replayed_white_noise(sigma), atol=1e-5 * sigma)
    ratio = _radial_power(noise)[1:] / (sigma ** 2)
    assert 0.7 < ratio.min() and ratio.max() < 1.4       # flat spectrum


def test_coloured_noise_falls_and_keeps_the_snr(sets):
    g = sets["g_col"]
    sigma = float(g["noise_sigma"])
    assert float(g["noise_bfactor_A2"]) == B
    assert float(g["noise_sigma"]) == pytest.approx(float(sets["g_white"]["noise_sigma"]))
    noise = sets["coloured"] - sets["clean"]
    # the same draws, filtered: a data set differs from its white twin only by the colour
    white = _replayed_white_noise(sigma)
    np.testing.assert_allclose(noise, sim.colour_noise(white, sim.noise_filter(BOX, PIX, B)),
                               atol=1e-5 * sigma)
    assert noise.var() == pytest.approx(sigma ** 2, rel=0.05)   # SNR = total-variance ratio
    p = _radial_power(noise)
    expected = _radial_power_of_filter(sim.noise_filter(BOX, PIX, B)) * sigma ** 2
    np.testing.assert_allclose(p[1:], expected[1:], rtol=0.2)   # the spectrum asked for
    bands = [p[1:5].mean(), p[6:11].mean(), p[12:].mean()]
    assert bands[0] > 1.5 * bands[1] > 2.25 * bands[2]          # falls with frequency
    assert p[-1] / p[1] < 0.2

def test_noise_filter_normalised():
    a = sim.noise_filter(48, 1.5, 50.0)
    assert a.shape == (48, 25)
    full = np.abs(np.fft.fft2(np.fft.irfft2(a, s=(48, 48)))) ** 2   # back to the full 2D grid
    assert full.mean() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(sim.noise_filter(48, 1.5, 0.0), 1.0)


def test_program_option(tmp_path, lysozyme_pdb):
    base = ["-i", str(lysozyme_pdb), "-n", "40", "--box", "32", "--angpix", "3", "--seed", "3",
            "--device", "cpu"]
    assert simulate_program.run(base + ["-o", str(tmp_path / "bad"), "--noise-bfactor", "-5"]) == 2
    assert simulate_program.run(base + ["-o", str(tmp_path / "col"), "--noise-bfactor", "40"]) == 0
    g = np.load(tmp_path / "col" / "ground_truth.npz")
    assert float(g["noise_bfactor_A2"]) == 40.0
