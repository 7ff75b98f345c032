"""CryoSPARC .cs exchange: conventions pinned by projections, exact round trips,
paths, contrast sign, programs and the Scipion import of a .cs file."""
import os
import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from scipion_gsplat.core import cryosparc, io
from scipion_gsplat.core.fourier import project as project_map
from scipion_gsplat.core.geometry import angular_distance_deg, euler_to_matrix

pytest.importorskip("cryosparc.dataset")
from cryosparc.dataset import Dataset  # noqa: E402


def relion_matrix_cryodrgn(rot, tilt, psi):
    """cryoDRGN's ``R_from_relion`` (written out here, independent of core.geometry):
    ``Ry(psi)·Rb(tilt)·Ra(rot)`` with the off-diagonal sign flips of its image frame."""
    a, b, y = np.deg2rad([rot, tilt, psi])
    ra = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rb = np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])
    ry = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    r = ry @ rb @ ra
    for i, j in ((0, 1), (1, 0), (1, 2), (2, 1)):
        r[i, j] *= -1
    return r


def cs_pose_cryodrgn(euler, transpose=True):
    """The .cs pose as cryoDRGN's ``parse_pose_csparc`` reads it: the matrix of the rotation
    vector, transposed, is cryoDRGN's RELION matrix; so pose = log(Rᵀ)."""
    mats = np.stack([relion_matrix_cryodrgn(*e) for e in euler])
    return Rotation.from_matrix(np.swapaxes(mats, 1, 2) if transpose else mats).as_rotvec()


def write_cs(path, n, **fields):
    """A .cs file with the given fields ``name=(dtype, values)`` (uid generated)."""
    descr = [(k.replace("__", "/"), dt) if np.asarray(v).ndim < 2 else
             (k.replace("__", "/"), dt, np.asarray(v).shape[1:]) for k, (dt, v) in fields.items()]
    ds = Dataset.allocate(n, descr)
    ds["uid"] = np.arange(1, n + 1, dtype=np.uint64) * 7919
    for k, (dt, v) in fields.items():
        ds[k.replace("__", "/")] = v
    ds.save(str(path))
    return path


def correlation(a, b):
    a, b = a - a.mean(axis=(1, 2), keepdims=True), b - b.mean(axis=(1, 2), keepdims=True)
    return (a * b).sum(axis=(1, 2)) / np.sqrt((a * a).sum(axis=(1, 2)) * (b * b).sum(axis=(1, 2)))


@pytest.fixture(scope="module")
def volume(sim_small):
    return io.read_map(sim_small / "truth_state1.mrc")


# --------------------------------------------------------------------------- conventions
def test_pose_matrix_is_transpose_of_relion_matrix():
    rng = np.random.default_rng(0)
    euler = np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(1, 179, 50), rng.uniform(-180, 180, 50)])
    A = euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2])
    indep = np.stack([relion_matrix_cryodrgn(*e) for e in euler])
    assert np.abs(indep - A).max() < 1e-12  # cryoDRGN's RELION matrix is RELION's
    pose = cs_pose_cryodrgn(euler)
    assert np.abs(cryosparc.pose_to_matrix(pose) - A).max() < 1e-12
    assert np.abs(cryosparc.pose_to_matrix(cryosparc.euler_to_pose(euler)) - A).max() < 1e-12
    back = cryosparc.pose_to_euler(pose)
    assert np.abs(euler_to_matrix(back[:, 0], back[:, 1], back[:, 2]) - A).max() < 1e-12


@pytest.mark.parametrize("mistake", [None, "no_transpose", "shift_sign"])
def test_projection_pins_pose_and_shift(tmp_path, volume, mistake):
    """Images projected at RELION poses (our projector, matched to relion_project) are
    reproduced from a .cs made as cryoDRGN/pyem read it; the wrong conventions are not."""
    vol, pix = volume
    rng = np.random.default_rng(5)
    n = 8
    euler = np.column_stack([rng.uniform(-180, 180, n), rng.uniform(20, 160, n), rng.uniform(-180, 180, n)])
    shift_px = rng.uniform(2.5, 4.0, (n, 2)) * rng.choice([-1, 1], (n, 2))
    ref = project_map(vol, euler_to_matrix(euler[:, 0], euler[:, 1], euler[:, 2]), pix, shifts_A=shift_px * pix)
    io.write_stack(tmp_path / "ref.mrcs", ref, pix)
    pose = cs_pose_cryodrgn(euler, transpose=mistake != "no_transpose")
    shift = -shift_px if mistake == "shift_sign" else shift_px
    write_cs(tmp_path / "p.cs", n, blob__path=("O", ["ref.mrcs"] * n), blob__idx=("<u4", np.arange(n)),
             blob__shape=("<u4", np.full((n, 2), vol.shape[0])), blob__psize_A=("<f4", np.full(n, pix)),
             blob__sign=("<f4", np.ones(n)), alignments3D__pose=("<f4", pose),
             alignments3D__shift=("<f4", shift))
    cryosparc.convert_cs_to_star(tmp_path / "p.cs", tmp_path / "p.star")
    star = io.read_particles(tmp_path / "p.star")
    got = project_map(vol, star.poses(), star.pixel_size, shifts_A=star.shifts_A())
    cc = correlation(got, ref)
    if mistake is None:
        assert cc.min() > 0.999
    else:
        # lysozyme is globular: a wrong rotation still correlates ~0.9, far from the 0.999 of the right one
        assert np.median(cc) < 0.95 and cc.max() < 0.99, cc


def test_star_to_cs_pose_follows_cryodrgn(sim_small, tmp_path):
    out = tmp_path / "p.cs"
    cryosparc.convert_star_to_cs(sim_small / "particles.star", out)
    ds = Dataset.load(str(out))
    star = io.read_particles(sim_small / "particles.star")
    e = star.euler_deg()
    expected = cs_pose_cryodrgn(e[:20])
    got = np.asarray(ds["alignments3D/pose"][:20], float)
    assert angular_distance_deg(Rotation.from_rotvec(got).as_matrix(),
                                Rotation.from_rotvec(expected).as_matrix()).max() < 1e-4
    np.testing.assert_allclose(ds["alignments3D/shift"], star.shifts_A() / star.pixel_size, atol=1e-5)


def test_ctf_angles_are_radians(tmp_path, volume):
    vol, pix = volume
    io.write_stack(tmp_path / "s.mrcs", np.zeros((2, 40, 40), np.float32), pix)
    write_cs(tmp_path / "c.cs", 2, blob__path=("O", ["s.mrcs"] * 2), blob__idx=("<u4", [0, 1]),
             blob__psize_A=("<f4", [pix, pix]), ctf__df1_A=("<f4", [15000, 20000]),
             ctf__df2_A=("<f4", [14000, 19000]), ctf__df_angle_rad=("<f4", [0.5, -1.0]),
             ctf__phase_shift_rad=("<f4", [np.pi / 2, 0.0]), ctf__accel_kv=("<f4", [300, 300]),
             ctf__cs_mm=("<f4", [2.7, 2.7]), ctf__amp_contrast=("<f4", [0.07, 0.07]))
    cryosparc.convert_cs_to_star(tmp_path / "c.cs", tmp_path / "c.star")
    p = io.read_particles(tmp_path / "c.star").particles
    np.testing.assert_allclose(p["rlnDefocusAngle"], np.rad2deg(np.float32([0.5, -1.0]).astype(float)), rtol=1e-12)
    np.testing.assert_allclose(p["rlnPhaseShift"], [90.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(p["rlnDefocusU"], [15000, 20000])
    assert p["rlnAmplitudeContrast"].iloc[0] == 0.07 and p["rlnSphericalAberration"].iloc[0] == 2.7


# --------------------------------------------------------------------------- round trips
def rich_star(sim_small, tmp_path):
    """sim_small's particles plus class, both probabilities, micrograph name and coordinates."""
    star = io.read_particles(sim_small / "particles.star")
    n = len(star)
    rng = np.random.default_rng(2)
    p = star.particles.drop(columns=[io.SOURCE_ROW])
    p["rlnClassNumber"] = rng.integers(1, 4, n)
    p["rlnGsplatClassProbability"] = rng.uniform(0.3, 1, n).round(6)
    p["rlnMaxValueProbDistribution"] = rng.uniform(0.3, 1, n).round(6)
    p["rlnMicrographName"] = [f"MotionCorr/job002/mic{i // 40:03d}.mrc" for i in range(n)]
    p["rlnCoordinateX"] = rng.uniform(0, 4000, n).round(2)
    p["rlnCoordinateY"] = rng.uniform(0, 4000, n).round(2)
    shutil.copy(sim_small / "particles.mrcs", tmp_path / "particles.mrcs")
    optics = star.optics
    parts = p.drop(columns=[c for c in optics.columns if c in p and c != "rlnOpticsGroup"])
    io.write_star(tmp_path / "rich.star", {"optics": optics, "particles": parts})
    return tmp_path / "rich.star"


def test_star_cs_star_roundtrip(sim_small, tmp_path):
    from scipion_gsplat.programs import cs2star, star2cs
    src = rich_star(sim_small, tmp_path)
    assert star2cs.run(["-i", str(src), "-o", str(tmp_path / "rich.cs")]) == 0
    ds = Dataset.load(str(tmp_path / "rich.cs"))
    a = io.read_particles(src).particles
    np.testing.assert_array_equal(ds["alignments3D/class"], a["rlnClassNumber"] - 1)
    np.testing.assert_array_equal(ds["alignments3D/class_posterior"], a["rlnGsplatClassProbability"].astype(np.float32))
    np.testing.assert_array_equal(ds["alignments3D/split"], a["rlnRandomSubset"] - 1)
    np.testing.assert_array_equal(ds["blob/psize_A"], np.float32(2.0))
    assert list(ds["relion/rlnMicrographName"][:2]) == list(a["rlnMicrographName"][:2])
    assert (ds["blob/sign"] == 1).all()

    assert cs2star.run(["-i", str(tmp_path / "rich.cs"), "-o", str(tmp_path / "back" / "back.star")]) == 0
    b = io.read_particles(tmp_path / "back" / "back.star").particles
    added = set(b.columns) - set(a.columns)
    assert set(a.columns) <= set(b.columns)
    assert all(c.startswith("cs/") for c in added - {cryosparc.IMAGE_COLUMN})
    ea, eb = a[list(io.POSE_COLUMNS)].to_numpy(), b[list(io.POSE_COLUMNS)].to_numpy()
    # poses live in .cs as float32 rotation vectors: equal to their float32 resolution
    assert angular_distance_deg(euler_to_matrix(*ea.T), euler_to_matrix(*eb.T)).max() < 1e-4
    for col in a.columns:
        if col in io.POSE_COLUMNS or col in (io.SOURCE_ROW, "rlnImageName"):  # images compared below
            continue
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if col in ("rlnDefocusAngle", "rlnPhaseShift"):  # float32 radians in .cs
            np.testing.assert_allclose(y, x, atol=2e-5, err_msg=col)
        elif col in ("rlnOriginXAngst", "rlnOriginYAngst"):  # float32 pixels in .cs
            np.testing.assert_array_equal(np.float32(y / 2.0), np.float32(x / 2.0), err_msg=col)
        elif x.dtype.kind == "f":
            np.testing.assert_array_equal(y.astype(np.float32), x.astype(np.float32), err_msg=col)
        else:
            assert (x.astype(str) == y.astype(str)).all(), col
    # the images are the same files
    ra, rb = io.ImageReader(io.read_particles(src)), io.ImageReader(io.read_particles(tmp_path / "back" / "back.star"))
    assert [os.path.realpath(s) for s in ra.stacks] == [os.path.realpath(s) for s in rb.stacks]
    np.testing.assert_array_equal(ra.index, rb.index)


def cs_fixture(tmp_path, n=30):
    """A .cs file with every field kind (vector, string, uint64, float32 noise) over two
    exposure groups with different pixel sizes (two stacks)."""
    rng = np.random.default_rng(1)
    io.write_stack(tmp_path / "a.mrcs", rng.normal(size=(n // 2, 40, 40)).astype(np.float32), 2.0)
    io.write_stack(tmp_path / "b.mrcs", rng.normal(size=(n - n // 2, 40, 40)).astype(np.float32), 1.5)
    grp = np.repeat([1, 2], [n // 2, n - n // 2])
    v = rng.normal(size=(n, 3))
    v *= rng.uniform(0, 3.1, (n, 1)) / np.linalg.norm(v, axis=1, keepdims=True)
    v[0] = 0
    return write_cs(
        tmp_path / "orig.cs", n,
        blob__path=("O", np.where(grp == 1, "a.mrcs", "b.mrcs")),
        blob__idx=("<u4", np.concatenate([np.arange(n // 2), np.arange(n - n // 2)])),
        blob__shape=("<u4", np.full((n, 2), 40)), blob__psize_A=("<f4", np.where(grp == 1, 2.0, 1.5)),
        blob__sign=("<f4", np.ones(n)), blob__import_sig=("<u8", rng.integers(0, 2 ** 63, n)),
        ctf__type=("O", ["imported"] * n), ctf__exp_group_id=("<u4", grp),
        ctf__accel_kv=("<f4", np.full(n, 300)), ctf__cs_mm=("<f4", np.full(n, 2.7)),
        ctf__amp_contrast=("<f4", np.full(n, 0.07)), ctf__df1_A=("<f4", rng.uniform(1e4, 3e4, n)),
        ctf__df2_A=("<f4", rng.uniform(1e4, 3e4, n)), ctf__df_angle_rad=("<f4", rng.uniform(-3, 3, n)),
        ctf__phase_shift_rad=("<f4", rng.uniform(0, 1, n)), ctf__scale=("<f4", rng.uniform(0.8, 1.2, n)),
        ctf__anisomag=("<f4", rng.normal(size=(n, 4))),
        alignments3D__pose=("<f4", v), alignments3D__shift=("<f4", rng.normal(0, 3, (n, 2))),
        alignments3D__class=("<u4", rng.integers(0, 4, n)),
        alignments3D__class_posterior=("<f4", rng.uniform(0, 1, n)),
        alignments3D__split=("<u4", rng.integers(0, 2, n)),
        alignments3D__error=("<f4", rng.normal(size=n) * 1e-7),
        location__micrograph_path=("O", [f">J1/imported/mic_{i}.mrc" for i in range(n)]))


def test_cs_star_cs_roundtrip_is_exact(tmp_path):
    src = cs_fixture(tmp_path)
    cryosparc.convert_cs_to_star(src, tmp_path / "o.star")
    star = io.read_particles(tmp_path / "o.star")
    assert sorted(star.optics["rlnImagePixelSize"]) == [1.5, 2.0]
    assert set(star.particles["rlnClassNumber"]) <= {1, 2, 3, 4}
    cryosparc.convert_star_to_cs(tmp_path / "o.star", tmp_path / "o.cs")
    a, b = Dataset.load(str(src)), Dataset.load(str(tmp_path / "o.cs"))
    assert a.descr() == b.descr() or sorted(a.descr()) == sorted(b.descr())
    for f in a.fields():
        np.testing.assert_array_equal(b[f], a[f], err_msg=f)


# --------------------------------------------------------------------------- paths and contrast
def cryosparc_project(tmp_path, volume):
    """proj/J2/extract/x_particles.mrc (dark images: −projections) and proj/J5/J5_particles.cs."""
    vol, pix = volume
    imgs = project_map(vol, euler_to_matrix([0, 30, 60, 90], [10, 50, 90, 130], [0, 20, 40, 60]), pix)
    proj = tmp_path / "proj"
    (proj / "J2" / "extract").mkdir(parents=True)
    (proj / "J5").mkdir()
    io.write_stack(proj / "J2" / "extract" / "x_particles.mrcs", -imgs, pix)
    os.rename(proj / "J2" / "extract" / "x_particles.mrcs", proj / "J2" / "extract" / "x_particles.mrc")
    write_cs(proj / "J5" / "J5_particles.cs", 4,
             blob__path=("O", [">J2/extract/x_particles.mrc", "J2/extract/x_particles.mrc"] * 2),
             blob__idx=("<u4", [0, 1, 2, 3]), blob__shape=("<u4", np.full((4, 2), 40)),
             blob__psize_A=("<f4", np.full(4, pix)), blob__sign=("<f4", [-1, -1, -1, 1]))
    return proj, imgs


def test_project_relative_paths_and_sign(tmp_path, volume):
    proj, imgs = cryosparc_project(tmp_path, volume)
    out = tmp_path / "out" / "p.star"
    s = cryosparc.convert_cs_to_star(proj / "J5" / "J5_particles.cs", out)  # project folder found
    assert s["flipped"] == 3 and s["flipped_stacks"] == 1 and s["links"] == 1
    star = io.read_particles(out)
    got = io.ImageReader(star).read(np.arange(4))
    np.testing.assert_array_equal(got[:3], imgs[:3])    # sign −1: map contrast restored
    np.testing.assert_array_equal(got[3], -imgs[3])     # sign +1: as stored
    assert star.particles["rlnImageName"].iloc[3].endswith("p_stacks/x_particles.mrcs")
    assert os.path.islink(tmp_path / "out" / "p_stacks" / "x_particles.mrcs")
    # back to .cs: CryoSPARC's own uid, paths, indices and signs
    cryosparc.convert_star_to_cs(out, tmp_path / "back.cs")
    a, b = Dataset.load(str(proj / "J5" / "J5_particles.cs")), Dataset.load(str(tmp_path / "back.cs"))
    for f in ("uid", "blob/path", "blob/idx", "blob/sign"):
        np.testing.assert_array_equal(b[f], a[f], err_msg=f)
    # a row whose image was replaced keeps its new image, with sign +1
    p = star.particles.drop(columns=[io.SOURCE_ROW])
    io.write_stack(tmp_path / "out" / "new.mrcs", imgs[:1], volume[1])
    p.loc[0, "rlnImageName"] = "000001@new.mrcs"
    io.write_star(out.with_name("q.star"), {"optics": star.optics, "particles": p.drop(
        columns=[c for c in star.optics.columns if c in p and c != "rlnOpticsGroup"])})
    cryosparc.convert_star_to_cs(out.with_name("q.star"), tmp_path / "q.cs")
    q = Dataset.load(str(tmp_path / "q.cs"))
    assert q["blob/path"][0] == os.path.realpath(tmp_path / "out" / "new.mrcs") and q["blob/sign"][0] == 1
    np.testing.assert_array_equal(q["blob/sign"][1:], a["blob/sign"][1:])


def test_contrast_keep_and_project_dir_option(tmp_path, volume, capsys):
    from scipion_gsplat.programs import cs2star
    proj, imgs = cryosparc_project(tmp_path, volume)
    elsewhere = tmp_path / "copy.cs"
    shutil.copy(proj / "J5" / "J5_particles.cs", elsewhere)
    assert cs2star.run(["-i", str(elsewhere), "-o", str(tmp_path / "k.star")]) == 2
    assert "--project-dir" in capsys.readouterr().err
    assert cs2star.run(["-i", str(elsewhere), "-o", str(tmp_path / "k.star"), "--project-dir", str(proj),
                        "--contrast", "keep", "--no-links"]) == 0
    assert "blob/sign -1" in capsys.readouterr().out
    star = io.read_particles(tmp_path / "k.star")
    np.testing.assert_array_equal(io.ImageReader(star).read(np.arange(4)), -imgs)
    assert not (tmp_path / "k_stacks").exists()


# --------------------------------------------------------------------------- programs
def test_programs_refuse_bad_input(sim_small, tmp_path, capsys):
    from scipion_gsplat.programs import cs2star, star2cs
    shutil.copy(sim_small / "particles.mrcs", tmp_path / "particles.mrcs")
    shutil.copy(sim_small / "particles.star", tmp_path / "particles.star")
    star = str(tmp_path / "particles.star")
    assert star2cs.run(["-i", star, "-o", str(tmp_path / "p.cs")]) == 0
    cs = str(tmp_path / "p.cs")
    before = open(cs, "rb").read()
    cases = [
        (cs2star, ["-i", cs, "-o", cs]),                                       # output = input
        (cs2star, ["-i", str(tmp_path / "none.cs"), "-o", str(tmp_path / "x.star")]),
        (cs2star, ["-i", star, "-o", str(tmp_path / "x.star")]),                # not a .cs file
        (cs2star, ["-i", cs, "-o", str(tmp_path / "x.txt")]),
        (star2cs, ["-i", star, "-o", star]),
        (star2cs, ["-i", star, "-o", str(tmp_path / "particles.mrcs")]),         # a stack it reads
        (star2cs, ["-i", cs, "-o", str(tmp_path / "y.cs")]),                     # not a STAR file
        (star2cs, ["-i", star, "-o", str(tmp_path / "y.star")]),
        (cs2star, ["-i", cs, "-o", str(tmp_path / "a_file" / "x.star")]),          # unwritable folder
        (star2cs, ["-i", star, "-o", str(tmp_path / "a_file" / "y.cs")]),
    ]
    (tmp_path / "a_file").write_text("a file, not a folder")
    for prog, argv in cases:
        capsys.readouterr()
        assert prog.run(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0], (argv, err)
    assert open(cs, "rb").read() == before
    write_cs(tmp_path / "noblob.cs", 2, ctf__df1_A=("<f4", [1.0, 2.0]))
    assert cs2star.run(["-i", str(tmp_path / "noblob.cs"), "-o", str(tmp_path / "z.star")]) == 2
    assert "blob/path" in capsys.readouterr().err
    assert not (tmp_path / "x.star").exists() and not (tmp_path / "y.cs").exists()


# --------------------------------------------------------------------------- Scipion import
def test_import_protocol_reads_cs(project, sim_small, tmp_path_factory):
    from scipion_gsplat.headless import launch_and_wait
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar
    d = tmp_path_factory.mktemp("cs_import")
    shutil.copy(sim_small / "particles.mrcs", d / "particles.mrcs")
    cryosparc.convert_star_to_cs(sim_small / "particles.star", d / "particles.cs")
    ds = Dataset.load(str(d / "particles.cs"))
    ds["blob/path"] = ["particles.mrcs"] * len(ds)  # relative, as CryoSPARC writes them
    ds.save(str(d / "particles.cs"))
    prot = project.newProtocol(ProtGsplatImportParticlesStar, starFile=str(d / "particles.cs"),
                               csProjectDir=str(d))
    launch_and_wait(project, prot, timeout=300)
    parts = prot.outputParticles
    assert parts.getSize() == 400 and parts.hasAlignmentProj() and parts.hasCTF()
    assert parts.getSamplingRate() == pytest.approx(2.0) and parts.getXDim() == 40
    truth = io.read_particles(sim_small / "particles.star").particles
    first = parts.getFirstItem()
    assert first.getCTF().getDefocusU() == pytest.approx(truth["rlnDefocusU"].iloc[0], rel=1e-6)
    assert "CryoSPARC" in prot.methods()[0]


def test_passthrough_fields_are_merged_by_uid(tmp_path):
    src = cs_fixture(tmp_path)
    main = Dataset.load(str(src)).filter_prefixes(["blob", "alignments3D"])  # (filters in place)
    perm = np.random.default_rng(0).permutation(len(main))
    extra = Dataset.load(str(src)).filter_prefixes(["ctf", "location"]).take(perm)
    main.save(str(tmp_path / "main.cs"))
    extra.save(str(tmp_path / "pt.cs"))
    cryosparc.convert_cs_to_star(src, tmp_path / "full.star")
    cryosparc.convert_cs_to_star(tmp_path / "main.cs", tmp_path / "merged.star", passthrough=[tmp_path / "pt.cs"])
    a = io.read_particles(tmp_path / "full.star").particles
    b = io.read_particles(tmp_path / "merged.star").particles
    assert sorted(a.columns) == sorted(b.columns)
    for col in ("rlnDefocusU", "rlnCtfScalefactor", "cs/location/micrograph_path", "rlnOpticsGroup"):
        assert (a[col].to_numpy() == b[col].to_numpy()).all(), col
    extra.take(perm[: len(perm) - 3]).save(str(tmp_path / "short.cs"))
    with pytest.raises(io.InputError, match="3 of 30 particles"):
        cryosparc.convert_cs_to_star(tmp_path / "main.cs", tmp_path / "x.star", passthrough=[tmp_path / "short.cs"])


@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="RELION (relion_reconstruct) is not installed")
def test_relion_reconstructs_a_cryosparc_job(sim_small, tmp_path):
    """A CryoSPARC-like job (dark images in a .mrc stack, '>' paths, blob/sign -1) through
    gsplat_cs2star is read by RELION itself and gives the simulated map, not its mirror."""
    import subprocess
    from scipion_gsplat.programs import cs2star
    star = io.read_particles(sim_small / "particles.star")
    proj = tmp_path / "P1"
    (proj / "J2" / "extract").mkdir(parents=True)
    (proj / "J9").mkdir()
    io.write_stack(proj / "J2" / "extract" / "dark.mrcs", -io.ImageReader(star).read(np.arange(len(star))), 2.0)
    os.rename(proj / "J2" / "extract" / "dark.mrcs", proj / "J2" / "extract" / "dark.mrc")
    cryosparc.convert_star_to_cs(sim_small / "particles.star", tmp_path / "tmp.cs")
    ds = Dataset.load(str(tmp_path / "tmp.cs"))
    ds = ds.filter_fields([f for f in ds.fields() if not f.startswith("relion/")])
    ds["blob/path"] = ">J2/extract/dark.mrc"
    ds["blob/sign"] = -1.0
    ds.save(str(proj / "J9" / "J9_particles.cs"))
    out = tmp_path / "out"
    assert cs2star.run(["-i", str(proj / "J9" / "J9_particles.cs"), "-o", str(out / "particles.star")]) == 0
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", "rec.mrc", "--ctf"], cwd=out,
                   check=True, capture_output=True, timeout=600)
    rec, _ = io.read_map(out / "rec.mrc")
    truth, _ = io.read_map(sim_small / "truth_state1.mrc")
    cc = np.corrcoef(rec.ravel(), truth.ravel())[0, 1]
    mirrored = np.corrcoef(rec[::-1].ravel(), truth.ravel())[0, 1]
    print(f"RELION map vs truth: correlation {cc:.3f} (mirrored {mirrored:.3f})")
    assert cc > 0.85 and cc > mirrored + 0.2, (cc, mirrored)
