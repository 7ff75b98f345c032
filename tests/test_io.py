"""STAR/MRC I/O: RELION 3.0/3.1 tables, defaults, image reading, atomic writes."""
import numpy as np
import pandas as pd
import pytest
import starfile

from scipion_gsplat.core import io


def _write_stack(path, n=5, box=16):
    imgs = np.arange(n * box * box, dtype=np.float32).reshape(n, box, box)
    io.write_stack(path, imgs, 2.0)
    return imgs


def _v31(tmp_path, n=5, box=16, **extra):
    imgs = _write_stack(tmp_path / "stack.mrcs", n, box)
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(n)],
                          "rlnOpticsGroup": 1, "rlnAngleRot": np.linspace(0, 90, n),
                          "rlnAngleTilt": 45.0, "rlnAnglePsi": 10.0,
                          "rlnOriginXAngst": 1.0, "rlnOriginYAngst": -2.0,
                          "rlnDefocusU": 15000.0, "rlnDefocusV": 14000.0, "rlnDefocusAngle": 30.0, **extra})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [2.0], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    io.write_star(tmp_path / "p.star", {"optics": optics, "particles": parts})
    return tmp_path / "p.star", imgs


def test_read_v31_defaults_and_images(tmp_path):
    path, imgs = _v31(tmp_path)
    star = io.read_particles(path)
    assert len(star) == 5 and star.pixel_size == 2.0 and star.box_size == 16
    ctf = star.ctf_params()
    assert np.all(ctf["phase_shift_deg"] == 0.0) and np.all(ctf["bfactor_A2"] == 0.0)
    assert np.all(ctf["voltage_kV"] == 300.0)
    assert star.poses().shape == (5, 3, 3)
    assert np.allclose(star.shifts_A(), [[1.0, -2.0]] * 5)
    reader = io.ImageReader(star)
    reader.check()
    got = np.concatenate([im for _, im in reader.chunks(2)])
    assert np.array_equal(got, imgs)
    assert np.array_equal(reader.read([4, 0]), imgs[[4, 0]])


def test_v31_roundtrip(tmp_path):
    path, _ = _v31(tmp_path)
    star = io.read_particles(path)
    io.write_particles(tmp_path / "out.star", star)
    again = io.read_particles(tmp_path / "out.star")
    for col in ("rlnAngleRot", "rlnOriginXAngst", "rlnDefocusU", "rlnImagePixelSize", "rlnVoltage"):
        assert np.allclose(again.column(col), star.column(col))
    text = (tmp_path / "out.star").read_text()
    assert "data_optics" in text and "data_particles" in text
    # optics columns go back to the optics table only
    particles_block = text.split("data_particles")[1]
    assert "rlnVoltage" not in particles_block


def test_read_v30_pixel_shifts(tmp_path):
    _write_stack(tmp_path / "stack.mrcs", 3, 16)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(3)],
                       "rlnOriginX": [1.0, 2.0, -1.0], "rlnOriginY": 0.5,
                       "rlnDetectorPixelSize": 5.0, "rlnMagnification": 25000.0,
                       "rlnVoltage": 200.0, "rlnSphericalAberration": 2.0,
                       "rlnAmplitudeContrast": 0.07, "rlnDefocusU": 10000.0})
    io.write_star(tmp_path / "v30.star", {"": df})
    star = io.read_particles(tmp_path / "v30.star")
    assert star.pixel_size == pytest.approx(2.0)
    assert np.allclose(star.shifts_A()[:, 0], [2.0, 4.0, -2.0])
    assert np.allclose(star.column("rlnDefocusV"), 10000.0)  # missing V = U
    assert star.ctf_params()["voltage_kV"][0] == 200.0
    io.ImageReader(star).check()  # fills the box size from the stack
    assert star.box_size == 16


def test_v30_without_pixel_size_needs_one(tmp_path):
    df = pd.DataFrame({"rlnImageName": ["1@s.mrcs"]})
    io.write_star(tmp_path / "v30.star", {"": df})
    with pytest.raises(io.InputError, match="pixel size"):
        io.read_particles(tmp_path / "v30.star")
    assert io.read_particles(tmp_path / "v30.star", pixel_size_A=1.3).pixel_size == 1.3


def test_nan_values_are_rejected(tmp_path):
    path, _ = _v31(tmp_path, rlnCtfBfactor=[0.0, np.nan, 0.0, 0.0, 0.0])
    with pytest.raises(io.InputError, match="NaN"):
        io.read_particles(path)


def test_missing_stack_and_wrong_box(tmp_path):
    path, _ = _v31(tmp_path)
    star = io.read_particles(path)
    star.particles["rlnImageSize"] = 32
    with pytest.raises(io.InputError, match="rlnImageSize 32"):
        io.ImageReader(star).check()
    (tmp_path / "stack.mrcs").unlink()
    with pytest.raises(io.InputError, match="not found"):
        io.ImageReader(io.read_particles(path))


def test_index_out_of_range(tmp_path):
    path, _ = _v31(tmp_path)
    star = io.read_particles(path)
    star.particles.loc[0, "rlnImageName"] = "9@stack.mrcs"
    reader = io.ImageReader(star)
    with pytest.raises(io.InputError, match="out of range"):
        reader.check()


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "map.mrc"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_map_roundtrip(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    io.write_map(tmp_path / "m.mrc", vol, 1.7)
    back, pix = io.read_map(tmp_path / "m.mrc")
    assert np.array_equal(back, vol) and pix == pytest.approx(1.7)
    with pytest.raises(io.InputError):
        io.read_map(tmp_path / "none.mrc")


def test_stack_writer(tmp_path):
    with io.StackWriter(tmp_path / "s.mrcs", 4, 8, 1.0) as w:
        w.write(0, np.ones((2, 8, 8)))
        w.write(2, 2 * np.ones((2, 8, 8)))
    import mrcfile
    data = mrcfile.read(tmp_path / "s.mrcs")
    assert data.shape == (4, 8, 8) and data[3, 0, 0] == 2


def test_half_set_fallback(tmp_path):
    path, _ = _v31(tmp_path)
    star = io.read_particles(path)
    assert list(star.half_set()) == [1, 2, 1, 2, 1]


def test_v30_keeps_per_particle_optics_values_and_pixel_origins(tmp_path):
    """Before: the first particle's voltage/Cs/Q0 went to every particle of a 3.0
    file, and writing it back replaced pixel origins with Å ones."""
    _write_stack(tmp_path / "stack.mrcs", 3, 16)
    df = pd.DataFrame({"rlnImageName": [f"{i + 1}@stack.mrcs" for i in range(3)],
                       "rlnOriginX": [1.0, 2.0, -1.0], "rlnOriginY": 0.5, "rlnImagePixelSize": 2.0,
                       "rlnVoltage": [300.0, 200.0, 300.0], "rlnSphericalAberration": [2.7, 2.0, 2.7],
                       "rlnAmplitudeContrast": [0.1, 0.07, 0.1], "rlnDefocusU": 10000.0})
    io.write_star(tmp_path / "v30.star", {"": df}, version=None)
    star = io.read_particles(tmp_path / "v30.star")
    ctf = star.ctf_params()
    assert ctf["voltage_kV"].tolist() == [300, 200, 300] and ctf["cs_mm"].tolist() == [2.7, 2.0, 2.7]
    assert ctf["amplitude_contrast"].tolist() == [0.1, 0.07, 0.1]
    (tmp_path / "o").mkdir()
    io.write_particles(tmp_path / "o" / "out.star", star)
    back = starfile.read(tmp_path / "o" / "out.star", always_dict=True)
    assert list(back) == [""]  # still one RELION 3.0 table
    assert back[""]["rlnOriginX"].tolist() == [1.0, 2.0, -1.0] and "rlnOriginXAngst" not in back[""]
    assert back[""]["rlnVoltage"].tolist() == [300, 200, 300]
    assert back[""]["rlnImageName"].iloc[0] == "1@../stack.mrcs"  # rebased: relative to the STAR folder
    assert np.array_equal(io.ImageReader(io.read_particles(tmp_path / "o" / "out.star")).read([0, 1, 2]),
                          io.ImageReader(star).read([0, 1, 2]))


def test_stack_writer_writes_rows_in_any_order_with_header_statistics(tmp_path):
    """Rows written chunk by chunk (out of order) give the stack, a valid MRC
    header and the min / max / mean / RMS of the whole stack."""
    import mrcfile
    from scipion_gsplat.core.io import StackWriter
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(10, 8, 8)).astype(np.float32)
    path = tmp_path / "s.mrcs"
    with StackWriter(path, 10, 8, 1.5) as w:
        w.write(4, x[4:])
        w.write(0, x[:4])
    assert mrcfile.validate(str(path))
    with mrcfile.open(str(path)) as m:
        assert np.array_equal(m.data, x)
        assert m.header.dmin == x.min() and m.header.dmax == x.max()
        assert abs(float(m.header.dmean) - x.mean()) < 1e-5
        assert abs(float(m.header.rms) - x.std()) < 1e-5
        assert float(m.voxel_size.x) == 1.5 and m.is_image_stack()


def test_reads_runs_gaps_and_other_stack_types_in_row_order(tmp_path):
    """Rows in any order over two stacks (float32 and big-endian int16), with gaps
    and repeated rows, come back as the stacks hold them; a stack cut short after
    its header was read is a clear error, not a partial image."""
    import mrcfile
    rng = np.random.default_rng(3)
    a = rng.normal(size=(9, 12, 12)).astype(np.float32)
    b = rng.integers(-300, 300, size=(7, 12, 12)).astype(">i2")
    io.write_stack(tmp_path / "a.mrcs", a, 2.0)
    with mrcfile.new(tmp_path / "b.mrcs") as m:
        m.set_data(b)
    names = [f"{i + 1}@a.mrcs" for i in range(9)] + [f"{i + 1}@b.mrcs" for i in range(7)]
    parts = pd.DataFrame({"rlnImageName": names, "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0,
                          "rlnImagePixelSize": 2.0})
    io.write_star(tmp_path / "p.star", {"particles": parts})
    every = np.concatenate([a, b.astype(np.float32)])
    reader = io.ImageReader(io.read_particles(tmp_path / "p.star"))
    for rows in (np.arange(16), [15, 0, 1, 2, 9, 10, 3, 8, 8, 12, 4], [2, 3, 4, 6, 7, 11, 12, 14]):
        got = reader.read(rows)
        assert got.dtype == np.float32 and np.array_equal(got, every[rows])
    with open(tmp_path / "a.mrcs", "r+b") as fh:  # cut after the header was read
        fh.truncate(1024 + 4 * 12 * 12 * 5 + 100)
    with pytest.raises(io.InputError, match="ended while reading image 6"):
        reader.read([4, 5, 6])
    with open(tmp_path / "b.mrcs", "r+b") as fh:  # the same for a stack converted while read (int16)
        fh.truncate(1024 + 2 * 12 * 12 * 3 + 10)
    with pytest.raises(io.InputError, match=r"b\.mrcs: the file ended while reading image 4"):
        reader.read([11, 12, 13])
