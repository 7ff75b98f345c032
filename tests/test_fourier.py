"""Projection (Fourier slice) conventions, checked against analytic Gaussians."""
import numpy as np
import pytest

from scipion_gsplat.core import fourier, geometry as g


def gaussian_map(box, centre_A, sigma_A, pix):
    """3D Gaussian of unit integral (×pix³ per voxel), centre in Å from voxel box//2."""
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r2 = (x * pix - centre_A[0]) ** 2 + (y * pix - centre_A[1]) ** 2 + (z * pix - centre_A[2]) ** 2
    return np.exp(-r2 / (2 * sigma_A ** 2)).astype(np.float32)


def gaussian_image(box, centre_xy_A, sigma_A, pix):
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    r2 = (x * pix - centre_xy_A[0]) ** 2 + (y * pix - centre_xy_A[1]) ** 2
    return np.exp(-r2 / (2 * sigma_A ** 2))


def test_off_centre_gaussian_lands_at_A_r_minus_origin():
    box, pix, sigma = 48, 1.0, 2.5
    r = np.array([6.0, -4.0, 3.0])
    vol = gaussian_map(box, r, sigma, pix)
    rng = np.random.default_rng(0)
    poses = g.random_rotations(6, rng)
    origins = rng.normal(0, 2.0, (6, 2))
    imgs = fourier.project(vol, poses, pix, shifts_A=origins)
    for img, a, o in zip(imgs, poses, origins):
        expected_xy = (a @ r)[:2] - o
        ref = gaussian_image(box, expected_xy, sigma, pix) * np.sqrt(2 * np.pi) * sigma / pix
        assert np.corrcoef(img.ravel(), ref.ravel())[0, 1] > 0.999
        # line integral preserved (amplitude of the projected Gaussian)
        assert img.sum() == pytest.approx(ref.sum(), rel=1e-2)


def test_shift_phase_moves_content():
    import torch
    box = 32
    img = np.zeros((1, box, box), np.float32)
    img[0, 16, 16] = 1.0
    out = fourier.apply_ctf_and_shift(torch.from_numpy(img), 1.0, shifts_A=torch.tensor([[-3.0, 2.0]]))
    y, x = np.unravel_index(np.argmax(out.numpy()[0]), (box, box))
    assert (x, y) == (19, 14)  # moved by −origin


def test_pad_crop_inverse():
    import torch
    x = torch.arange(36.0).reshape(6, 6)
    assert torch.equal(fourier.crop_to(fourier.pad_to(x, 12, 2), 6, 2), x)
