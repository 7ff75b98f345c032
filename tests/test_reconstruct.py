"""Fourier reconstruction, FSC and symmetry, on noise-free and noisy projections."""
import copy
import threading

import numpy as np
import pytest
import torch

from scipion_gsplat.core import fourier, fourier_solve, fsc as fscm, geometry as g, io, masks, reconstruct
from scipion_gsplat.core.symmetry import symmetry_matrices

from test_fourier import gaussian_map


def blob_map(box, pix, rng, n=12, sigma=2.0, centres=None):
    centres = rng.uniform(-0.25, 0.25, (n, 3)) * box * pix if centres is None else centres
    return sum(gaussian_map(box, c, sigma, pix) for c in centres), centres


def _accumulate(vol, poses, pix, ctf=None, shifts=None, symmetry="C1", noise=0.0, seed=0):
    imgs = fourier.project(vol, poses, pix, shifts_A=shifts, ctf_params=ctf)
    if noise:
        imgs = imgs + np.random.default_rng(seed).normal(0, noise, imgs.shape).astype(np.float32)
    acc = reconstruct.FourierAccumulator(vol.shape[0], pix)
    acc.insert(torch.from_numpy(imgs), poses, shifts, ctf, symmetry)
    return acc


def test_noise_free_reconstruction_with_ctf_and_shifts():
    rng = np.random.default_rng(0)
    box, pix, n = 32, 2.0, 600
    vol, _ = blob_map(box, pix, rng)
    poses = g.random_rotations(n, rng)
    shifts = rng.normal(0, 2.0, (n, 2))
    ctf = {"defocus_u_A": rng.uniform(8000, 20000, n), "defocus_v_A": rng.uniform(8000, 20000, n),
           "defocus_angle_deg": rng.uniform(0, 180, n), "voltage_kV": np.full(n, 300.0),
           "cs_mm": np.full(n, 2.7), "amplitude_contrast": np.full(n, 0.1)}
    rec = _accumulate(vol, poses, pix, ctf, shifts).solve()
    f, c = fscm.fsc_curve(rec, vol, pix)
    assert fscm.fsc_auc(c) > 0.97
    # amplitude preserved (no hidden scale factor) inside the sphere
    assert (rec * vol).sum() / (vol * vol).sum() == pytest.approx(1.0, abs=0.05)


def test_symmetry_improves_a_symmetric_map():
    rng = np.random.default_rng(1)
    box, pix = 32, 2.0
    base = rng.uniform(-0.2, 0.2, (4, 3)) * box * pix
    mats = symmetry_matrices("c4")
    centres = np.concatenate([base @ m.T for m in mats])
    vol, _ = blob_map(box, pix, rng, centres=centres)
    poses = g.random_rotations(60, rng)
    rec_c1 = _accumulate(vol, poses, pix, noise=0.5, seed=2).solve()
    rec_c4 = _accumulate(vol, poses, pix, symmetry="c4", noise=0.5, seed=2).solve()
    auc = [fscm.fsc_auc(fscm.fsc_curve(r, vol, pix)[1]) for r in (rec_c1, rec_c4)]
    assert auc[1] > auc[0] + 0.05


def test_fsc_and_resolution():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(32, 32, 32)).astype(np.float32)
    f, c = fscm.fsc_curve(a, a, 1.5)
    assert np.allclose(c[1:], 1.0) and f[-1] == pytest.approx(1 / 3.0)
    f, c = fscm.fsc_curve(a, rng.normal(size=a.shape).astype(np.float32), 1.5)
    assert abs(c[3:].mean()) < 0.05
    freq = np.array([0.0, 0.1, 0.2, 0.3])
    assert fscm.resolution_at(freq, np.array([1.0, 0.9, 0.5, 0.1]), 0.143) == pytest.approx(
        1 / (0.2 + (0.5 - 0.143) / 0.4 * 0.1))
    assert fscm.resolution_at(freq, np.ones(4), 0.143) == pytest.approx(1 / 0.3)
    assert fscm.fsc_auc(np.ones(17)) == pytest.approx(1.0)


@pytest.mark.parametrize("box", [17, 24])
def test_fsc_shells_match_a_full_fft_by_rounded_radius(box):
    """The half-transform FSC and shell power equal sums over the full complex FFT
    of every voxel at rounded radius s (the Hermitian half counted once per pair)."""
    rng = np.random.default_rng(box)
    a = rng.normal(size=(box,) * 3)
    b = a + 2 * rng.normal(size=a.shape)
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(box) * box
    radius = np.round(np.sqrt(sum(g ** 2 for g in np.meshgrid(k, k, k, indexing="ij")))).astype(int)
    ns = box // 2 + 1
    # the rfft half holds the x indices 0 … box//2: each shell's sums over them
    half = (np.arange(box) <= box // 2)[None, None, :] & (radius <= ns - 1)
    num = np.bincount(radius[half], (fa * fb.conj()).real[half], ns)
    den = np.sqrt(np.bincount(radius[half], np.abs(fa[half]) ** 2, ns) * np.bincount(radius[half], np.abs(fb[half]) ** 2, ns))
    _, c = fscm.fsc_curve(a.astype(np.float32), b.astype(np.float32), 1.0)
    assert np.allclose(c, num / den, atol=1e-6)
    power = np.bincount(radius[half], np.abs(np.fft.fftn(np.fft.ifftshift(a))[half]) ** 2, ns) / np.bincount(radius[half], None, ns)
    assert np.allclose(fscm.shell_power(a), power, rtol=1e-10)


def test_reconstruct_particles_half_maps(sim_small):
    star = io.read_particles(sim_small / "particles.star")
    rec = reconstruct.reconstruct_particles(star)
    truth, _ = io.read_map(sim_small / "truth_state1.mrc")
    assert rec.n_half == (200, 200)
    _, c = fscm.fsc_curve(rec.full, truth, star.pixel_size)
    assert fscm.fsc_auc(c) > 0.8
    assert 4.0 <= rec.resolution_A(0.143) < 8.0
    # the half maps are independent: their FSC is lower than the full map's FSC to the truth
    assert fscm.fsc_auc(rec.fsc) < fscm.fsc_auc(c)
    # Wiener filtering keeps the FSC to the truth
    wien = reconstruct.reconstruct_particles(star, wiener=True)
    assert fscm.fsc_auc(fscm.fsc_curve(wien.full, truth, star.pixel_size)[1]) > 0.8


def _two_noisy_accumulators(seed: int, box: int, n: int, n_first: int):
    """A blob map and random poses, two accumulators of noisy projections of it
    (the first ``n_first`` poses and the rest; 2 Å pixels) and an SSNR curve for a
    Wiener solve: ``(vol, poses, a, b, ssnr)``."""
    rng = np.random.default_rng(seed)
    pix = 2.0
    vol, _ = blob_map(box, pix, rng)
    poses = g.random_rotations(n, rng)
    a = _accumulate(vol, poses[:n_first], pix, noise=0.3, seed=1)
    b = _accumulate(vol, poses[n_first:], pix, noise=0.3, seed=2)
    return vol, poses, a, b, np.linspace(20, 0.1, box // 2 + 1)


@pytest.mark.parametrize("double", [False, True])
def test_a_solve_that_consumes_its_sums_gives_the_same_bits_and_frees_them(double):
    """consume=True solves in the accumulator's own storage (no copy of D and W):
    the same map bit for bit, with and without a Wiener term, and the sums are
    gone afterwards: using them again is an error, not a wrong map."""
    vol, poses, a, b, ssnr = _two_noisy_accumulators(11, box=30, n=160, n_first=80)
    if double:
        a, b = (_as_double(x) for x in (a, b))
    for acc in (a, b):
        for wiener in (None, ssnr):
            kept = reconstruct.solve_sums([acc], wiener, 1.5)
            spare = _copy(acc)
            assert np.array_equal(reconstruct.solve_sums([spare], wiener, 1.5, consume=True), kept)
            with pytest.raises(RuntimeError, match="solved in place"):
                reconstruct.solve_sums([spare])
    rec = reconstruct.solve_halves(_copy(a), _copy(b))
    eaten = reconstruct.solve_halves(_copy(a), _copy(b), consume=True)  # full map first, half maps in place
    for name in ("full", "half1", "half2", "fsc"):
        assert np.array_equal(getattr(eaten, name), getattr(rec, name)), name


def _copy(acc):
    other = copy.copy(acc)
    other._d, other._w = acc._d.clone(), acc._w.clone()
    return other


def _as_double(acc):
    other = copy.copy(acc)
    other._d, other._w = acc._d.to(torch.complex128), acc._w.to(torch.float64)
    return other


def test_solve_by_slabs_and_of_summed_accumulators(monkeypatch):
    """The solve works slab by slab (bounded memory): the map does not depend on
    the slab size, and solving two accumulators together equals solving their sum."""
    pix = 2.0
    vol, poses, a, b, ssnr = _two_noisy_accumulators(5, box=33, n=200, n_first=120)
    whole = reconstruct.solve_sums([a, b], ssnr, 1.5)
    monkeypatch.setattr(fourier_solve, "SLAB_VOXELS", 3000)  # ~1 z plane per slab
    monkeypatch.setattr(reconstruct, "SCATTER_SAMPLES", 500)
    assert np.allclose(reconstruct.solve_sums([a, b], ssnr, 1.5), whole, atol=1e-6 * np.abs(whole).max())
    merged = _accumulate(vol, poses[:120], pix, noise=0.3, seed=1)
    merged += b
    assert np.allclose(merged.solve(ssnr, 1.5), whole, atol=1e-6 * np.abs(whole).max())
    f, c = fscm.fsc_curve(whole, vol, pix)
    assert fscm.fsc_auc(c) > 0.8  # measured 0.85


def test_float64_sums_do_not_depend_on_how_the_particles_were_split():
    """``double=True``: the map from two accumulators (two ranks' shares) summed
    is the map of one accumulator holding every particle, bit for bit, so the
    discrete choices made from it later do not depend on the number of ranks."""
    rng = np.random.default_rng(8)
    box, pix = 32, 2.0
    vol, _ = blob_map(box, pix, rng)
    poses = g.random_rotations(300, rng)
    imgs = torch.from_numpy(fourier.project(vol, poses, pix) + rng.normal(0, 0.5, (300, box, box)).astype(np.float32))

    def accumulated(parts):
        accs = []
        for rows in parts:
            acc = reconstruct.FourierAccumulator(box, pix, double=True)
            for s in range(0, len(rows), 64):  # chunks as the programs insert them
                r = rows[s:s + 64]
                acc.insert(imgs[r], poses[r], None, None)
            accs.append(acc)
        for acc in accs[1:]:
            accs[0] += acc  # what all_reduce does
        return accs[0].solve()

    one = accumulated([np.arange(300)])
    two = accumulated([np.arange(150), np.arange(150, 300)])
    three = accumulated([np.arange(100), np.arange(100, 200), np.arange(200, 300)])
    assert one.dtype == np.float32
    assert np.array_equal(one, two) and np.array_equal(one, three)
    single = reconstruct.FourierAccumulator(box, pix)  # the float32 sums: the same map within rounding
    single.insert(imgs, poses, None, None)
    assert np.allclose(single.solve(), one, atol=1e-5 * np.abs(one).max())


class _ThreadRanks:
    """Ranks of one solve as threads of this process; ``all_reduce_`` gives every
    rank the sum of all ranks' tensors (added in rank order), as gloo does."""

    def __init__(self, size):
        self.size, self._local = size, threading.local()
        self._barrier, self._slots = threading.Barrier(size, timeout=60), [None] * size

    @property
    def rank(self):
        return self._local.rank

    def run(self, fn):
        """``fn()`` on every rank at once; the results by rank."""
        results = [None] * self.size

        def one(rank):
            self._local.rank = rank
            results[rank] = fn()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def all_reduce_(self, tensor):
        self._slots[self.rank] = tensor.clone()
        self._barrier.wait()
        total = self._slots[0].clone()
        for other in self._slots[1:]:
            total += other
        self._barrier.wait()
        tensor.copy_(total)
        return tensor


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_share_the_solve_by_x_columns_and_get_one_process_map(monkeypatch, size):
    """With several ranks each divides and transforms its share of the x columns
    only (one solve is not repeated on every rank), and the map every rank ends
    with is one process's map bit for bit."""
    _, _, a, b, ssnr = _two_noisy_accumulators(9, box=40, n=300, n_first=150)
    monkeypatch.setattr(fourier_solve, "SLAB_VOXELS", 80 * 80 * 4)  # 4 x columns a slab: 11 slabs
    one = reconstruct.solve_sums([a, b], ssnr, 1.5)
    world = _ThreadRanks(size)
    shares = world.run(lambda: fourier_solve.x_share(41, 4, world))
    assert shares[0][0] == 0 and shares[-1][1] == 41
    assert all(s[1] == t[0] and s[1] > s[0] for s, t in zip(shares, shares[1:]))  # contiguous, none empty
    outs = world.run(lambda: reconstruct.solve_sums([a, b], ssnr, 1.5, world))
    assert all(np.array_equal(out, one) for out in outs)


@pytest.mark.parametrize("box, ndim", [(64, 3), (65, 2)])
def test_soft_sphere_is_one_inside_zero_outside_and_a_cosine_between(box, ndim):
    """The solve's final mask (RELION's softMaskOutsideMap): 1 up to the radius,
    0.5 + 0.5·cos(π·t) over the edge (t = (r − radius)/edge), 0 beyond."""
    radius, edge = box / 2 - 8.5, 5.0
    mask = masks.soft_sphere(box, radius, edge, ndim)
    assert mask.shape == (box,) * ndim and mask.dtype == np.float32
    c = box // 2
    line = mask[(c,) * (ndim - 1)]  # the x axis through the centre: r = |x − c|
    r = np.abs(np.arange(box) - c)
    expected = np.where(r <= radius, 1.0, np.where(r >= radius + edge, 0.0,
                        0.5 + 0.5 * np.cos(np.pi * (r - radius) / edge)))
    np.testing.assert_allclose(line, expected, atol=1e-6)
    assert set(np.unique(line[r <= radius])) == {1.0} and set(np.unique(line[r >= radius + edge])) == {0.0}
    corner = mask[(0,) * ndim]
    assert corner == 0.0 and mask.sum() < box ** ndim  # corners cut
    centred = mask[(slice(1, None),) * ndim] if box % 2 == 0 else mask  # symmetric about the centre
    np.testing.assert_array_equal(centred, np.flip(centred))
