"""Real data layouts: thousands of per-micrograph stacks, RELION 3.0/5 files, optics
groups of different pixel and box sizes, project-relative image paths, and every
input column carried through every program's output STAR file."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from scipion_gsplat.core import image_reader, io
from scipion_gsplat.core.fourier import image_irfft, image_rfft, pad_to
from scipion_gsplat.programs import (aligned_2d_classification, gmm_heterogeneity, graph_max_cut, project,
                                     reconstruct_fourier, reconstruct_splat, refine_classes)

REPO = Path(__file__).resolve().parents[1]


def _particles(n, names, box, **extra):
    rng = np.random.default_rng(1)
    return pd.DataFrame({"rlnImageName": names, "rlnAngleRot": rng.uniform(-180, 180, n),
                         "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                         "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0,
                         "rlnDefocusU": rng.uniform(1e4, 2e4, n), "rlnOpticsGroup": 1, **extra})


def _optics(box, pix=2.0, **extra):
    return pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [300.0],
                         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                         "rlnImagePixelSize": [pix], "rlnImageSize": [box], "rlnImageDimensionality": [2], **extra})


# --------------------------------------------------------------------------- many stacks
def test_thousands_of_stacks_under_ulimit_256(tmp_path):
    """2000 one-micrograph stacks read by gsplat_reconstruct_fourier with at most
    256 open files (before: every stack stayed memory-mapped, 'Too many open files')."""
    n_stacks, per, box = 2000, 2, 16
    (tmp_path / "Extract").mkdir()
    img = np.random.default_rng(0).normal(size=(per, box, box)).astype(np.float32)
    for s in range(n_stacks):
        with mrcfile.new(tmp_path / "Extract" / f"mic{s:04d}.mrcs") as m:
            m.set_data(img + s % 7)
            m.set_image_stack()
    names = [f"{i + 1}@Extract/mic{s:04d}.mrcs" for s in range(n_stacks) for i in range(per)]
    io.write_star(tmp_path / "particles.star", {"optics": _optics(box),
                                                "particles": _particles(len(names), names, box)})
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from scipion_gsplat.programs import reconstruct_fourier
        sys.exit(reconstruct_fourier.run(["-i", "particles.star", "-o", "map.mrc", "--device", "cpu",
                                          "--threads", "1"]))
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Too many open files" not in res.stderr
    assert io.read_map(tmp_path / "map.mrc")[0].shape == (box,) * 3


def test_check_reads_each_header_once_and_never_maps_data(tmp_path, monkeypatch):
    """The stack check is O(rows): one header read per stack, no memory map, few open files."""
    n_stacks, per, box = 300, 20, 8
    for s in range(n_stacks):
        io.write_stack(tmp_path / f"m{s}.mrcs", np.full((per, box, box), s, np.float32), 1.0)
    names = [f"{i + 1}@m{s}.mrcs" for i in range(per) for s in range(n_stacks)]  # interleaved
    io.write_star(tmp_path / "p.star", {"optics": _optics(box), "particles": _particles(len(names), names, box)})
    star = io.read_particles(tmp_path / "p.star")
    opened = []
    real_open = mrcfile.open
    monkeypatch.setattr(image_reader.mrcfile, "open", lambda *a, **k: opened.append(k) or real_open(*a, **k))
    monkeypatch.setattr(image_reader.mrcfile, "mmap", None)  # never called
    reader = io.ImageReader(star, max_open=8)
    reader.check()
    assert len(opened) == n_stacks and all(k.get("header_only") for k in opened)
    rows = np.random.default_rng(0).permutation(len(star))[:500]
    got = reader.read(rows)
    assert np.array_equal(got[:, 0, 0], rows % n_stacks)  # row r is stack r % n_stacks
    assert len(reader._open) <= 8
    assert reader.stack_files()[0] == os.path.realpath(tmp_path / "m0.mrcs")


# --------------------------------------------------------------------------- optics groups
def _upsampled(images, box, new_box):
    """Fourier-pad images ``(B, box, box)`` to ``new_box`` (finer pixel, same field
    of view); returns ``(upsampled, images without their Nyquist terms)``."""
    spec = image_rfft(torch.from_numpy(images))
    spec[:, box // 2] = 0
    spec[:, :, box // 2] = 0  # the Nyquist terms have no partner on the finer grid
    full = torch.fft.fftshift(spec, dim=-2)  # rows centred for padding
    h = (new_box - box) // 2
    padded = torch.nn.functional.pad(full, (0, new_box // 2 + 1 - spec.shape[-1], h, h))
    return ((image_irfft(torch.fft.ifftshift(padded, dim=-2), new_box) * (new_box / box) ** 2).numpy(),
            image_irfft(spec, box).numpy())


@pytest.fixture(scope="module")
def mixed_optics(sim_small, tmp_path_factory):
    """sim_small (40 px at 2 Å) with its odd rows in a second optics group imaged
    at 1.6 Å in a 50 px box, and a third group of its rows 0 mod 4 in 48 px boxes at 2 Å."""
    out = tmp_path_factory.mktemp("mixed")
    star = io.read_particles(sim_small / "particles.star")
    imgs = io.ImageReader(star).read(np.arange(len(star)))
    n = len(star)
    group = np.where(np.arange(n) % 2 == 1, 2, np.where(np.arange(n) % 4 == 0, 3, 1))
    fine, imgs[group == 2] = _upsampled(imgs[group == 2], 40, 50)
    big = pad_to(torch.from_numpy(imgs[group == 3]), 48, 2).numpy()
    io.write_stack(out / "fine.mrcs", fine, 1.6)
    io.write_stack(out / "big.mrcs", big, 2.0)
    names = star.particles["rlnImageName"].astype(str).to_numpy().copy()
    for g, stack in ((2, "fine.mrcs"), (3, "big.mrcs")):
        names[group == g] = [f"{i + 1}@{stack}" for i in range(int((group == g).sum()))]
    names[group == 1] = [f"{i}@{sim_small}/{s}" for i, s in
                         (name.split("@") for name in names[group == 1])]
    parts = star.particles.drop(columns=[c for c in io.OPTICS_COLUMNS if c in star.particles]
                                + [io.SOURCE_ROW])
    parts["rlnImageName"], parts["rlnOpticsGroup"] = names, group
    optics = pd.concat([star.optics.assign(rlnImageSize=40)] * 3, ignore_index=True)
    optics["rlnOpticsGroup"] = [1, 2, 3]
    optics["rlnOpticsGroupName"] = ["opticsGroup1", "opticsGroup2", "opticsGroup3"]
    optics["rlnImagePixelSize"] = [2.0, 1.6, 2.0]
    optics["rlnImageSize"] = [40, 50, 48]
    io.write_star(out / "mixed.star", {"optics": optics, "particles": parts})
    return out / "mixed.star", imgs


def test_optics_groups_of_different_pixel_and_box_sizes_share_one_grid(mixed_optics):
    path, imgs = mixed_optics
    star = io.read_particles(path)
    reader = io.ImageReader(star)
    reader.check()
    assert star.pixel_size == 2.0 and star.box_size == 40
    assert "Fourier-cropped" in star.grid_note() and "group 2: 1.6 Å × 50 px" in star.grid_note()
    got = reader.read(np.arange(len(star)))
    assert got.shape == imgs.shape
    err = np.abs(got - imgs).max() / np.abs(imgs).max()
    assert err < 1e-4  # 50 px at 1.6 Å → 40 px at 2 Å gives back the original images
    padded, cropped = image_reader.resample_plan(200, 1.06, 1.244)  # a real pair of detectors
    assert padded >= 200 and cropped % 2 == 0 and abs(1.06 * padded / cropped - 1.244) < 1e-4 * 1.244


def test_mixed_optics_reconstruct_like_one_group(mixed_optics, sim_small, tmp_path, capsys):
    """Before: 'optics groups with different pixel sizes' refused the file."""
    path, _ = mixed_optics
    args = ["--device", "cpu", "--threads", "1"]
    assert reconstruct_fourier.run(["-i", str(path), "-o", str(tmp_path / "mixed.mrc")] + args) == 0
    assert "optics groups differ" in capsys.readouterr().out
    assert reconstruct_fourier.run(["-i", str(sim_small / "particles.star"), "-o", str(tmp_path / "one.mrc")]
                                   + args) == 0
    a, pix = io.read_map(tmp_path / "mixed.mrc")
    b, _ = io.read_map(tmp_path / "one.mrc")
    assert pix == 2.0 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_per_group_ctf_values_reach_every_particle(tmp_path):
    _, stack = tmp_path / "s.mrcs", io.write_stack(tmp_path / "s.mrcs", np.zeros((4, 8, 8), np.float32), 1.0)
    optics = pd.concat([_optics(8, 1.0)] * 2, ignore_index=True).assign(
        rlnOpticsGroup=[1, 2], rlnVoltage=[300.0, 200.0], rlnSphericalAberration=[2.7, 0.01],
        rlnAmplitudeContrast=[0.1, 0.07])
    parts = _particles(4, [f"{i + 1}@s.mrcs" for i in range(4)], 8, rlnOpticsGroup=[1, 2, 2, 1])
    io.write_star(tmp_path / "p.star", {"optics": optics, "particles": parts})
    ctf = io.read_particles(tmp_path / "p.star").ctf_params()
    assert ctf["voltage_kV"].tolist() == [300, 200, 200, 300]
    assert ctf["cs_mm"].tolist() == [2.7, 0.01, 0.01, 2.7]
    assert ctf["amplitude_contrast"].tolist() == [0.1, 0.07, 0.07, 0.1]


# --------------------------------------------------------------------------- RELION 3.0 and 5
def test_relion30_without_amplitude_contrast_is_refused_or_completed(sim_small, tmp_path, capsys):
    """Before: has_ctf was false and programs that do not insist on a CTF dropped it silently."""
    star = io.read_particles(sim_small / "particles.star")
    parts = star.particles.drop(columns=["rlnAmplitudeContrast", "rlnOpticsGroupName", io.SOURCE_ROW])
    parts["rlnImageName"] = [f"{i}@{sim_small}/{s}" for i, s in
                             (name.split("@") for name in parts["rlnImageName"].astype(str))]
    io.write_star(tmp_path / "v30.star", {"": parts}, version=None)
    out = str(tmp_path / "r")
    assert refine_classes.run(["-i", str(tmp_path / "v30.star"), "-o", out, "--init", "pooled",
                               "--iterations", "0", "--eigen-iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert "--amplitude-contrast" in err and "rlnAmplitudeContrast" in err and len(err.splitlines()) == 1
    opts = ["--device", "cpu", "--threads", "1"]
    assert reconstruct_fourier.run(["-i", str(tmp_path / "v30.star"), "-o", str(tmp_path / "a.mrc"),
                                    "--amplitude-contrast", "0.1"] + opts) == 0
    assert reconstruct_fourier.run(["-i", str(sim_small / "particles.star"), "-o", str(tmp_path / "b.mrc")]
                                   + opts) == 0
    assert np.array_equal(io.read_map(tmp_path / "a.mrc")[0], io.read_map(tmp_path / "b.mrc")[0])
    # the file's own values win; the filled one is written out, so the next program needs no option
    star30 = io.read_particles(tmp_path / "v30.star", fill={"rlnAmplitudeContrast": 0.2, "rlnVoltage": 100})
    assert np.all(star30.ctf_params()["amplitude_contrast"] == 0.2)
    assert np.all(star30.ctf_params()["voltage_kV"] == 300.0)
    io.write_particles(tmp_path / "out.star", star30)
    again = starfile.read(tmp_path / "out.star", always_dict=True)
    assert list(again) == [""] and np.all(again[""]["rlnAmplitudeContrast"] == 0.2)
    assert "version" not in (tmp_path / "out.star").read_text()  # still a RELION 3.0 table


RELION5_STAR = """
# version 50001

data_general

_rlnTomoSubTomosAre2DStacks                       0

# version 50001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
_rlnCtfDataAreCtfPremultiplied #10
_rlnBeamTiltX #11
_rlnBeamTiltY #12
opticsGroup1            1     0.830000   300.000000     2.700000     0.100000     2.000000           16            2            0     0.120000    -0.050000
opticsGroup2            2     0.830000   300.000000     2.700000     0.070000     2.000000           16            2            0     0.000000     0.000000

# version 50001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnAutopickFigureOfMerit #3
_rlnClassNumber #4
_rlnAnglePsi #5
_rlnImageName #6
_rlnMicrographName #7
_rlnOpticsGroup #8
_rlnCtfMaxResolution #9
_rlnCtfFigureOfMerit #10
_rlnDefocusU #11
_rlnDefocusV #12
_rlnDefocusAngle #13
_rlnCtfBfactor #14
_rlnCtfScalefactor #15
_rlnPhaseShift #16
_rlnGroupNumber #17
_rlnAngleRot #18
_rlnAngleTilt #19
_rlnOriginXAngst #20
_rlnOriginYAngst #21
_rlnNormCorrection #22
_rlnLogLikeliContribution #23
_rlnMaxValueProbDistribution #24
_rlnNrOfSignificantSamples #25
_rlnRandomSubset #26
_rlnHelicalTubeID #27
"""


def _relion5_project(root: Path) -> Path:
    """A RELION 5 project: stacks under Extract/job012/Movies, the particles in
    Refine3D/job020/run_data.star with project-relative image names."""
    movies = root / "Extract" / "job012" / "Movies"
    movies.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows = []
    for m in range(3):
        io.write_stack(movies / f"mic{m + 1:03d}.mrcs", rng.normal(size=(4, 16, 16)).astype(np.float32), 2.0)
        for i in range(4):
            rows.append(f"{1234.5 + 10 * i:.6f} {876.0 + m:.6f} {rng.uniform():.6f} 1 {rng.uniform(-180, 180):.6f} "
                        f"{i + 1:06d}@Extract/job012/Movies/mic{m + 1:03d}.mrcs "
                        f"MotionCorr/job002/Movies/mic{m + 1:03d}.mrc {1 + (i % 2)} 3.456789 0.123456 "
                        f"{15000 + 100 * i:.6f} {14800 + 100 * i:.6f} 33.000000 0.000000 1.000000 0.000000 "
                        f"{m + 1} {rng.uniform(-180, 180):.6f} {rng.uniform(0, 180):.6f} 1.250000 -0.750000 "
                        f"0.987654 1.234567e+05 0.543210 12 {1 + i % 2} 0")
    folder = root / "Refine3D" / "job020"
    folder.mkdir(parents=True)
    (folder / "run_data.star").write_text(RELION5_STAR.lstrip("\n") + "\n".join(rows) + "\n\n")
    return folder / "run_data.star"


def test_relion5_file_with_project_relative_paths(tmp_path, capsys):
    path = _relion5_project(tmp_path / "project")
    with pytest.raises(io.InputError, match="--data-dir"):
        io.ImageReader(io.read_particles(path))
    star = io.read_particles(path, data_dir=tmp_path / "project")
    assert len(star) == 12 and star.pixel_size == 2.0
    reader = io.ImageReader(star)
    reader.check()
    assert reader.read(np.arange(12)).shape == (12, 16, 16)
    assert star.ctf_params()["amplitude_contrast"].tolist() == [0.1, 0.07] * 6
    out = tmp_path / "elsewhere"
    code = reconstruct_fourier.run(["-i", str(path), "-o", str(out / "map.mrc"), "--data-dir",
                                    str(tmp_path / "project"), "--device", "cpu", "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    io.write_particles(out / "copy.star", star)
    text = (out / "copy.star").read_text()
    assert text.count("# version 50001") == 3 and "data_general" in text
    assert "1@Extract/job012/Movies/mic001.mrcs" in text  # unchanged: relative to the project
    _assert_carried(path, out / "copy.star")


def test_premultiplied_images_are_refused(tmp_path, capsys):
    path = _relion5_project(tmp_path / "project")
    path.write_text(path.read_text().replace("            2            0 ", "            2            1 "))
    code = reconstruct_fourier.run(["-i", str(path), "-o", str(tmp_path / "m.mrc"), "--data-dir",
                                    str(tmp_path / "project"), "--device", "cpu"])
    assert code == 2 and "premultiplied" in capsys.readouterr().err


# --------------------------------------------------------------------------- carried columns
def _raw(path):
    blocks = starfile.read(path, always_dict=True)
    return blocks, (blocks.get("particles") if "particles" in blocks else blocks[""])


def _assert_carried(src, dst, rows=None):
    """Every block, column and value of ``src`` is in ``dst`` (rows ``rows`` of it, in order)."""
    a_blocks, a = _raw(src)
    b_blocks, b = _raw(dst)
    a = a if rows is None else a.iloc[rows].reset_index(drop=True)
    assert len(a) == len(b)
    for col in a.columns:
        assert col in b.columns, f"{dst}: column {col} lost"
        if col == "rlnClassNumber" and "rlnGsplatScore" in b:
            continue  # replaced by the classification, as it should be
        if pd.api.types.is_numeric_dtype(a[col]):
            assert np.array_equal(a[col].to_numpy(float), b[col].to_numpy(float)), f"{dst}: {col} changed"
        else:
            assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), f"{dst}: {col} changed"
    for name, table in a_blocks.items():
        if name in ("particles", ""):
            continue
        assert name in b_blocks, f"{dst}: block data_{name} lost"
        if isinstance(table, pd.DataFrame):
            pd.testing.assert_frame_equal(table.reset_index(drop=True), b_blocks[name].reset_index(drop=True),
                                          check_dtype=False)
        else:
            assert table == b_blocks[name]


@pytest.fixture(scope="module")
def rich_star(sim_small, tmp_path_factory):
    """sim_small's particles as a RELION user has them: a project folder, image
    names relative to it, micrograph names, coordinates, group numbers, a custom
    column, origins in pixels, two optics groups, a data_general block."""
    root = tmp_path_factory.mktemp("project")
    (root / "Extract").mkdir()
    os.symlink(sim_small / "particles.mrcs", root / "Extract" / "particles.mrcs")
    blocks = starfile.read(sim_small / "particles.star", always_dict=True)
    parts, optics = blocks["particles"].copy(), blocks["optics"]
    n = len(parts)
    parts["rlnImageName"] = [f"{i}@Extract/{Path(s).name}" for i, s in
                             (name.split("@") for name in parts["rlnImageName"].astype(str))]
    parts["rlnOriginX"] = parts.pop("rlnOriginXAngst") / 2.0
    parts["rlnOriginY"] = parts.pop("rlnOriginYAngst") / 2.0
    parts["rlnMicrographName"] = [f"MotionCorr/job002/Movies/mic{i // 20:03d}.mrc" for i in range(n)]
    parts["rlnCoordinateX"] = 100.0 + np.arange(n) * 3.25
    parts["rlnCoordinateY"] = 2000.0 - np.arange(n) * 1.5
    parts["rlnGroupNumber"] = np.arange(n) // 20 + 1
    parts["rlnMyScore"] = [f"{v:.6e}" for v in 1.234567e-07 * (np.arange(n) + 1)]  # RELION's %e: below %.6f
    parts["rlnOpticsGroup"] = np.arange(n) % 2 + 1
    optics = pd.concat([optics] * 2, ignore_index=True)
    optics["rlnOpticsGroup"] = [1, 2]
    optics["rlnOpticsGroupName"] = ["opticsGroup1", "opticsGroup2"]
    optics["rlnMicrographOriginalPixelSize"] = [1.0, 1.0]
    folder = root / "Select" / "job030"
    folder.mkdir(parents=True)
    io.write_star(folder / "particles.star", {"general": {"rlnMyFlag": 1}, "optics": optics, "particles": parts},
                  version="40000", float_format=None)
    return root, folder / "particles.star"


def test_every_program_carries_every_input_column(rich_star, sim_small, tmp_path, capsys):
    """Before: micrograph names, coordinates, pixel origins, custom columns and
    the optics table's extra columns were dropped or changed."""
    root, star = rich_star
    data = ["--data-dir", str(root), "--device", "cpu", "--threads", "1"]
    out = tmp_path
    assert aligned_2d_classification.run(["-i", str(star), "-o", str(out / "cls"), "--angular-sampling", "30",
                                          "--min-particles", "3"] + data) == 0
    assert graph_max_cut.run(["-i", str(out / "cls"), "--particles", str(star), "-o", str(out / "graph")]
                             + data) == 0
    _assert_carried(star, out / "graph" / "particles.star")
    # poses kept (--sigma-ang 0): refined poses would be new values in the pose columns
    assert refine_classes.run(["-i", str(out / "graph" / "particles.star"), "-o", str(out / "refine"),
                               "--iterations", "1", "--sigma-ang", "0"] + data) == 0
    _assert_carried(star, out / "refine" / "particles.star")
    assert gmm_heterogeneity.run(["-i", str(star), "-o", str(out / "het"), "--motions", "1", "--rounds", "0",
                                  "--consensus-epochs", "0", "--final-epochs", "0", "--frames", "2",
                                  "--n-gaussians", "100", "--pca-particles", "100"] + data) == 0, \
        capsys.readouterr().err
    _assert_carried(star, out / "het" / "particles.star")
    assert project.run(["-i", str(sim_small / "truth_state1.mrc"), "--star", str(star), "-o",
                        str(out / "proj" / "p.mrcs")] + data) == 0
    raw_in, raw_out = _raw(star)[1], _raw(out / "proj" / "p.star")[1]
    assert raw_out["rlnImageName"].iloc[0] == "000001@p.mrcs"
    for col in raw_in.columns.drop("rlnImageName"):
        assert col in raw_out and raw_in[col].astype(str).tolist() == raw_out[col].astype(str).tolist(), col
    text = (out / "graph" / "particles.star").read_text()
    assert "# version 40000" in text and "1.234567e-07" in text
    assert "1@Extract/particles.mrcs" in text  # project-relative name unchanged
    # and the programs without a particle output accept the same file
    assert reconstruct_splat.run(["-i", str(star), "-o", str(out / "splat"), "--iterations", "1",
                                  "--n-gaussians", "50", "--init-lowpass", "10"] + data) == 0


# --------------------------------------------------------------------------- damaged files
def test_truncated_row_names_its_line(tmp_path):
    _, _ = tmp_path, io.write_stack(tmp_path / "s.mrcs", np.zeros((3, 8, 8), np.float32), 1.0)
    io.write_star(tmp_path / "p.star", {"optics": _optics(8, 1.0),
                                        "particles": _particles(3, [f"{i + 1}@s.mrcs" for i in range(3)], 8)})
    lines = (tmp_path / "p.star").read_text().rstrip("\n").split("\n")
    lines[-2] = " ".join(lines[-2].split()[:5])  # the middle particle row cut short
    (tmp_path / "p.star").write_text("\n".join(lines) + "\n")
    with pytest.raises(io.InputError, match=rf"line {len(lines) - 1} \(row 2\) has 5 of 8 values"):
        io.read_particles(tmp_path / "p.star")


def test_negative_defocus_is_refused(tmp_path, capsys):
    io.write_stack(tmp_path / "s.mrcs", np.zeros((3, 8, 8), np.float32), 1.0)
    parts = _particles(3, [f"{i + 1}@s.mrcs" for i in range(3)], 8)
    parts.loc[1, "rlnDefocusU"] = -12000.0
    io.write_star(tmp_path / "p.star", {"optics": _optics(8, 1.0), "particles": parts})
    code = reconstruct_fourier.run(["-i", str(tmp_path / "p.star"), "-o", str(tmp_path / "m.mrc"),
                                    "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "negative rlnDefocusU" in err and "row 2" in err and "-12000" in err
