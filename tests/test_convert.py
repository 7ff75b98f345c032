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


def _real_layout_star(sim_small, tmp_path):
    """sim_small rewritten as a real data set: 3 optics groups with different
    voltage/Cs/Q0, fractional picking coordinates, micrograph names, two extra
    columns (one text, one number)."""
    star = io.read_particles(sim_small / "particles.star")
    p = star.particles.copy()
    n = len(p)
    stack = str(sim_small / "particles.mrcs")
    p["rlnImageName"] = [f"{i + 1:06d}@{stack}" for i in range(n)]
    p["rlnOpticsGroup"] = 1 + np.arange(n) % 3
    p["rlnMicrographName"] = [f"MotionCorr/job003/Movies/mic_{i // 40:04d}.mrc" for i in range(n)]
    p["rlnCoordinateX"] = 17.5 + 5 * np.arange(n)
    p["rlnCoordinateY"] = 3000.25 - 2 * np.arange(n)
    p["rlnGroupName"] = [f"group_{i % 7}" for i in range(n)]
    p["rlnCtfMaxResolution"] = 3.0 + (np.arange(n) % 5) / 10
    p["rlnClassNumber"] = 1 + np.arange(n) % 2
    optics = star.optics.loc[[0, 0, 0]].reset_index(drop=True)
    optics["rlnOpticsGroup"] = [1, 2, 3]
    optics["rlnOpticsGroupName"] = ["og1", "og2", "og3"]
    optics["rlnVoltage"] = [300.0, 200.0, 300.0]
    optics["rlnSphericalAberration"] = [2.7, 2.0, 0.01]
    optics["rlnAmplitudeContrast"] = [0.1, 0.07, 0.1]
    path = tmp_path / "real.star"
    io.write_particles(path, io.ParticleStar(p, optics, star.path), p)
    return io.read_particles(path)


def _to_set(star, tmp_path, name="parts"):
    from pwem.objects import SetOfParticles
    from scipion_gsplat.convert import star_to_set
    parts = SetOfParticles(filename=str(tmp_path / f"{name}.sqlite"))
    stack = star.particles["rlnImageName"].iloc[0].split("@", 1)[1]
    star_to_set(star, parts, {stack: stack})
    parts.write()
    return parts


def test_real_layout_roundtrip(sim_small, tmp_path):
    """Optics groups with different voltage/Cs/Q0, coordinates, micrographs and
    extra columns survive STAR → SetOfParticles → STAR (the first particle's
    optics went to every particle before)."""
    from scipion_gsplat.convert import set_to_star
    star = _real_layout_star(sim_small, tmp_path)
    parts = _to_set(star, tmp_path)
    acqs = {p.getObjId(): (p.getAcquisition().getVoltage(), p.getAcquisition().getSphericalAberration(),
                           p.getAcquisition().getAmplitudeContrast(), p.getCoordinate().getMicName(),
                           p.getCoordinate().getMicId())
            for p in parts.iterItems()}
    assert acqs[2][:3] == (200.0, 2.0, 0.07) and acqs[3][:3] == (300.0, 0.01, 0.1)
    assert acqs[41][3:] == ("MotionCorr/job003/Movies/mic_0001.mrc", 2)
    set_to_star(parts, str(tmp_path / "back.star"))
    back = io.read_particles(tmp_path / "back.star")
    for col in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnCoordinateX",
                "rlnCoordinateY", "rlnCtfMaxResolution", "rlnClassNumber", "rlnOpticsGroup", "rlnRandomSubset"):
        assert np.allclose(back.column(col), star.column(col), atol=1e-5), col
    for col in ("rlnMicrographName", "rlnGroupName"):
        assert back.particles[col].tolist() == star.particles[col].tolist(), col
    assert back.column("rlnMicrographId").tolist() == [1 + i // 40 for i in range(len(star))]
    assert back.optics["rlnOpticsGroupName"].tolist() == ["og1", "og2", "og3"]
    # set → STAR → set keeps the micrograph ids too
    again = _to_set(back, tmp_path, "again")
    assert [p.getMicId() for p in again.iterItems()] == [acqs[i][4] for i in sorted(acqs)]


def test_relion_plugin_writer_sees_our_optics_groups(sim_small, tmp_path):
    """scipion-em-relion's own STAR writer, given our imported set, writes the three
    optics groups with their own Cs/voltage/Q0 (it reads Acquisition.opticsGroupInfo
    and _rlnOpticsGroup)."""
    relion_convert = pytest.importorskip("relion.convert", reason="scipion-em-relion not installed")
    star = _real_layout_star(sim_small, tmp_path)
    parts = _to_set(star, tmp_path)
    out = tmp_path / "relion_writer.star"
    relion_convert.writeSetOfParticles(parts, str(out))
    written = io.read_particles(out)
    assert written.optics["rlnSphericalAberration"].tolist() == [2.7, 2.0, 0.01]
    assert np.allclose(written.column("rlnVoltage"), star.column("rlnVoltage"))


def test_class_id_wins_over_stale_class_number(sim_small, tmp_path):
    """A particle classified again elsewhere keeps our old _rlnClassNumber while its
    Scipion class id is the new one: the class id is written. Without a class id
    _rlnClassNumber is used; a SetOfClasses3D gives each particle its class."""
    from pwem.objects import SetOfClasses3D, SetOfParticles
    from pyworkflow.object import Integer
    from scipion_gsplat.convert import set_to_star
    star = _real_layout_star(sim_small, tmp_path)
    parts = _to_set(star, tmp_path)
    relabelled = SetOfParticles(filename=str(tmp_path / "relabelled.sqlite"))
    relabelled.copyInfo(parts)
    for p in parts.iterItems(orderBy="id"):
        p._rlnClassNumber = Integer(1 + p.getObjId() % 2)        # our old label
        p.setClassId(3 if p.getObjId() % 3 == 0 else 4)          # the new classification
        relabelled.append(p)
    relabelled.write()
    set_to_star(relabelled, str(tmp_path / "relabelled.star"))
    labels = io.read_particles(tmp_path / "relabelled.star").column("rlnClassNumber")
    assert labels.tolist() == [3 if i % 3 == 0 else 4 for i in range(1, len(star) + 1)]

    classes = SetOfClasses3D(filename=str(tmp_path / "classes.sqlite"))
    classes.setImages(relabelled)
    classes.classifyItems()
    set_to_star(classes, str(tmp_path / "classes.star"))
    back = io.read_particles(tmp_path / "classes.star")
    assert back.column("rlnImageId").tolist() == list(range(1, len(star) + 1))
    assert back.column("rlnClassNumber").tolist() == labels.tolist()
