"""Scipion ↔ RELION conversions through real Scipion objects."""
import numpy as np
import pytest

from scipion_gsplat.core import geometry as g, io


def test_alignment_roundtrip_through_a_particle():
    from pwem.objects import Particle, Transform
    from scipion_gsplat.convert import matrix_to_relion, relion_to_matrix
    rng = np.random.default_rng(0)
    for rot, tilt, psi in g.matrix_to_euler(g.random_rotations(50, rng)):
        ox, oy = rng.normal(0, 3, 2)
        part = Particle()
        part.setTransform(Transform(relion_to_matrix(rot, tilt, psi, ox, oy)))
        back = matrix_to_relion(part.getTransform().getMatrix())
        assert np.allclose(back, (rot, tilt, psi, ox, oy), atol=1e-6)


def test_star_scipion_star_roundtrip(sim_small, tmp_path):
    from pwem.objects import SetOfParticles
    from scipion_gsplat.convert import set_to_star, star_to_set
    star = io.read_particles(sim_small / "particles.star")
    reader = io.ImageReader(star)
    parts = SetOfParticles(filename=str(tmp_path / "particles.sqlite"))
    star_to_set(star, parts, {"particles.mrcs": reader.stacks[0]})
    parts.write()
    assert parts.getSize() == len(star) and parts.hasAlignmentProj() and parts.hasCTF()
    assert parts.getSamplingRate() == 2.0
    set_to_star(parts, str(tmp_path / "back.star"))
    back = io.read_particles(tmp_path / "back.star")
    assert np.array_equal(back.column("rlnImageId"), np.arange(1, len(star) + 1))
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnRandomSubset"):
        a, b = star.column(col), back.column(col)
        if col in ("rlnAngleRot", "rlnAnglePsi", "rlnDefocusAngle"):
            period = 180.0 if col == "rlnDefocusAngle" else 360.0
            d = np.abs((a - b + period / 2) % period - period / 2)
        else:
            d = np.abs(a - b)
        assert d.max() < 1e-3, col
    assert np.array_equal(io.ImageReader(back).read([5]), reader.read([5]))


def test_set_without_poses_is_rejected(tmp_path):
    from pwem.objects import SetOfParticles
    from scipion_gsplat.convert import set_to_star
    parts = SetOfParticles(filename=str(tmp_path / "p.sqlite"))
    with pytest.raises(io.InputError, match="poses"):
        set_to_star(parts, str(tmp_path / "x.star"))
