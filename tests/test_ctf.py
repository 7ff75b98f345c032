"""RELION-convention CTF."""
import math

import pytest

from scipion_gsplat.core import ctf


def _relion_scalar(kx, ky, du, dv, ang, kv=300.0, cs=2.7, q0=0.1, ps=0.0):
    """RELION ctf.h written out for one frequency (independent of the vectorised code)."""
    v = kv * 1e3
    lam = 12.2643247 / math.sqrt(v * (1 + v * 0.978466e-6))
    k1 = math.pi / 2 * 2 * lam
    k2 = math.pi / 2 * cs * 1e7 * lam ** 3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    u2 = kx * kx + ky * ky
    avg, dev = -(du + dv) / 2, -(du - dv) / 2
    deltaf = avg + dev * math.cos(2 * (math.atan2(ky, kx) - math.radians(ang)))
    return -math.sin(k1 * deltaf * u2 + k2 * u2 * u2 - math.radians(ps) - k3)


def test_matches_relion_formula_and_astigmatism():
    box, pix = 32, 1.5
    p = {"defocus_u_A": [20000.0], "defocus_v_A": [15000.0], "defocus_angle_deg": [30.0],
         "voltage_kV": [300.0], "cs_mm": [2.7], "amplitude_contrast": [0.1]}
    c = ctf.ctf_2d_numpy(p, box, pix)[0]
    for iy, ix in [(0, 1), (3, 5), (31, 7), (20, 16), (5, 0)]:
        ky = (iy if iy < box // 2 else iy - box) / (box * pix)
        kx = ix / (box * pix)
        assert c[iy, ix] == pytest.approx(_relion_scalar(kx, ky, 20000, 15000, 30), abs=1e-5)


def test_positive_at_low_frequency():
    p = {"defocus_u_A": [15000.0], "defocus_v_A": [15000.0], "voltage_kV": [300.0],
         "cs_mm": [2.7], "amplitude_contrast": [0.1]}
    c = ctf.ctf_2d_numpy(p, 64, 1.0)[0]
    assert c[0, 0] == pytest.approx(math.sin(math.atan(0.1 / math.sqrt(0.99))), rel=1e-5)
    assert c[0, 1] > 0


def test_phase_shift_and_bfactor():
    base = {"defocus_u_A": [15000.0], "defocus_v_A": [15000.0], "voltage_kV": [300.0],
            "cs_mm": [2.7], "amplitude_contrast": [0.0]}
    c90 = ctf.ctf_2d_numpy({**base, "phase_shift_deg": [90.0]}, 32, 1.0)[0]
    assert c90[0, 0] == pytest.approx(1.0)
    cb = ctf.ctf_2d_numpy({**base, "bfactor_A2": [100.0]}, 32, 1.0)[0]
    c0 = ctf.ctf_2d_numpy(base, 32, 1.0)[0]
    k2 = (10 / 32.0) ** 2
    assert cb[0, 10] == pytest.approx(c0[0, 10] * math.exp(-25 * k2), rel=1e-4)


def test_wavelength():
    assert ctf.electron_wavelength_A(300.0) == pytest.approx(0.019687, rel=1e-4)
    assert ctf.electron_wavelength_A(200.0) == pytest.approx(0.025079, rel=1e-4)
