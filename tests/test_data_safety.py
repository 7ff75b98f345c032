"""Data safety of the programs: no output replaces an input, unwritable outputs are
refused before any work (one line, exit 2), failed runs leave no empty folders,
splat checkpoints of other data are not resumed, and small input checks."""
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from scipion_gsplat.core import io, safety
from scipion_gsplat.programs import (_cli, aligned_2d_classification, gmm_heterogeneity, graph_max_cut, project,
                                     reconstruct_fourier, reconstruct_splat, refine_classes, simulate)

PROGRAMS = {"simulate": simulate, "reconstruct_fourier": reconstruct_fourier,
            "aligned_2d_classification": aligned_2d_classification, "graph_max_cut": graph_max_cut,
            "refine_classes": refine_classes, "project": project, "reconstruct_splat": reconstruct_splat,
            "gmm_heterogeneity": gmm_heterogeneity}
CPU = ["--device", "cpu"]
PDB = Path(__file__).parent / "data" / "1aki.pdb"


def _simulate(out, seed):
    assert simulate.run(["-i", str(PDB), "-o", str(out), "-n", "64", "--box", "24", "--angpix", "3.0",
                         "--snr", "1.0", "--seed", str(seed)] + CPU) == 0
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two different simulated sets of the same size (64 particles, 24 px, 3 Å)."""
    base = tmp_path_factory.mktemp("safety_sets")
    return _simulate(base / "a", 1), _simulate(base / "b", 2)


@pytest.fixture
def folder(sets, tmp_path):
    """A private copy of set a (with ``map.mrc``, a copy of the true map)."""
    d = tmp_path / "data"
    shutil.copytree(sets[0], d)
    shutil.copy(d / "truth_state1.mrc", d / "map.mrc")
    return d


def fingerprint(d):
    """Name → content hash of every file under ``d``."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() or p.is_symlink()}


def one_line_error(capsys, *words):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return out


def _stack_named_mrc(d):
    """The STAR names its stack ``images.mrc`` (a map name a user may give as -o)."""
    os.rename(d / "particles.mrcs", d / "images.mrc")
    blocks = starfile.read(d / "particles.star", always_dict=True)
    blocks["particles"]["rlnImageName"] = blocks["particles"]["rlnImageName"].str.replace(
        "particles.mrcs", "images.mrc")
    starfile.write(blocks, d / "particles.star", overwrite=True)


OVERWRITES = {
    # program: (prepare(d), argv(d)) — each argv names an input as (part of) the output
    "simulate": (None, lambda d: ["-i", d / "state1.pdb", "-o", d, "-n", "8"]),
    "reconstruct_fourier": (_stack_named_mrc, lambda d: ["-i", d / "particles.star", "-o", d / "images.mrc"]),
    "aligned_2d_classification": (lambda d: shutil.copy(d / "particles.star", d / "pairs.star"),
                                  lambda d: ["-i", d / "pairs.star", "-o", d]),
    "graph_max_cut": (None, lambda d: ["-i", d, "--particles", d / "particles.star", "-o", d]),
    "refine_classes": (None, lambda d: ["-i", d / "particles.star", "-o", d / "sub" / ".."]),
    "project": (None, lambda d: ["-i", d / "map.mrc", "--star", d / "particles.star", "-o", d / "particles.mrcs"]),
    "project_star": (None, lambda d: ["-i", d / "map.mrc", "--star", d / "particles.star", "-o", d / "new.mrcs",
                                      "--out-star", d / "particles.star"]),
    "reconstruct_fourier_link": (lambda d: os.symlink(d / "particles.mrcs", d / "link.mrc"),
                                 lambda d: ["-i", d / "particles.star", "-o", d / "link.mrc"]),
    "reconstruct_splat": (None, lambda d: ["-i", d / "particles.star", "-o", d, "--init-file", d / "map.mrc"]),
    "gmm_heterogeneity": (None, lambda d: ["-i", d / "particles.star", "-o", d]),
}


@pytest.mark.parametrize("case", sorted(OVERWRITES))
def test_no_output_replaces_an_input(case, folder, capsys):
    prepare, argv = OVERWRITES[case]
    if prepare:
        prepare(folder)
    before = fingerprint(folder)
    program = PROGRAMS[case.replace("_star", "").replace("_link", "")]
    assert program.run([str(a) for a in argv(folder)] + CPU) == 2
    out = one_line_error(capsys, "would overwrite", str(folder))
    assert out == ""  # refused before any work
    assert fingerprint(folder) == before


def test_overwrite_check_follows_links_and_patterns(tmp_path):
    (tmp_path / "a.mrcs").write_bytes(b"x")
    os.link(tmp_path / "a.mrcs", tmp_path / "hard.mrcs")
    inputs = [(str(tmp_path / "a.mrcs"), "the stack"), (str(tmp_path / "motion01_frame02.mrc"), "the map")]
    for out in ("hard.mrcs", "motion*_frame*.mrc", "sub/../a.mrcs"):
        with pytest.raises(io.InputError, match="would overwrite the"):
            safety.check_no_overwrite(inputs, [str(tmp_path / out)])
    safety.check_no_overwrite(inputs, [str(tmp_path / "b.mrcs"), str(tmp_path / "motion*.pdb")])


ARGS = {  # every program with a working set of arguments, output last (a folder or a file)
    "simulate": lambda d, o: ["-i", PDB, "-n", "8", "-o", o],
    "reconstruct_fourier": lambda d, o: ["-i", d / "particles.star", "-o", o + ".mrc"],
    "aligned_2d_classification": lambda d, o: ["-i", d / "particles.star", "-o", o],
    "graph_max_cut": lambda d, o: ["-i", d, "--particles", d / "particles.star", "-o", o],
    "refine_classes": lambda d, o: ["-i", d / "particles.star", "-o", o],
    "project": lambda d, o: ["-i", d / "map.mrc", "--star", d / "particles.star", "-o", o + ".mrcs"],
    "reconstruct_splat": lambda d, o: ["-i", d / "particles.star", "-o", o],
    "gmm_heterogeneity": lambda d, o: ["-i", d / "particles.star", "-o", o],
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_unwritable_output_is_refused_before_any_work(name, folder, tmp_path, capsys):
    program = PROGRAMS[name]
    (tmp_path / "a_file").write_text("not a folder")
    argv = [str(a) for a in ARGS[name](folder, str(tmp_path / "a_file" / "out"))] + CPU
    assert program.run(argv) == 2
    assert one_line_error(capsys, "cannot", "a_file") == ""
    if shutil.which("chattr") is None:
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        return  # the file system has no immutable flag
    try:
        for out in (locked / "out", locked / "new" / "out"):  # root ignores the mode bits, not +i
            argv = [str(a) for a in ARGS[name](folder, str(out))] + CPU
            assert program.run(argv) == 2
            assert one_line_error(capsys, "cannot", str(locked)) == ""
        assert list(locked.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


def test_the_guard_reads_the_star_file_once(folder, tmp_path, monkeypatch):
    """The guard's copy of the particles is handed to the program (no second read)."""
    calls = []
    original = io.read_particles

    def counting(path, *args, **kwargs):
        calls.append(path)
        return original(path, *args, **kwargs)
    monkeypatch.setattr(io, "read_particles", counting)
    assert reconstruct_fourier.run(["-i", str(folder / "particles.star"), "-o", str(tmp_path / "m.mrc")] + CPU) == 0
    assert len(calls) == 1 and (tmp_path / "m.mrc").exists()


def test_os_errors_about_outputs_are_one_line(capsys):
    def main(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/map.mrc")
    assert _cli.run_program("gsplat_x", "", lambda p: None, main, []) == 2
    one_line_error(capsys, "Permission denied", "/somewhere/map.mrc")


def test_failed_run_removes_the_folders_it_created(folder, tmp_path, capsys):
    new = tmp_path / "new"
    argv = ["-i", str(folder / "particles.star"), "--init-file", str(tmp_path / "missing.mrc"),
            "--iterations", "1", "--n-gaussians", "50"] + CPU
    assert reconstruct_splat.run(argv + ["-o", str(new / "deep" / "out")]) == 2
    one_line_error(capsys, "missing.mrc")
    assert not new.exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    assert reconstruct_splat.run(argv + ["-o", str(kept)]) == 2
    assert kept.is_dir()  # a folder the user made stays


def _splat(star, out, capsys):
    assert reconstruct_splat.run(["-i", str(star), "-o", str(out), "--halves", "--iterations", "2",
                                  "--n-gaussians", "100", "--batch", "16"] + CPU) == 0
    return io.read_map(out / "map.mrc")[0], capsys.readouterr().out


def test_splat_checkpoints_of_other_particles_are_not_resumed(sets, tmp_path, capsys):
    a, b = (s / "particles.star" for s in sets)
    out = tmp_path / "shared"
    map_a, _ = _splat(a, out, capsys)
    map_b, log = _splat(b, out, capsys)  # a finished run of set a is in the folder
    assert "resumed" not in log and log.count("computed from other inputs; starting afresh") == 2
    fresh_b, _ = _splat(b, tmp_path / "fresh", capsys)
    assert np.array_equal(map_b, fresh_b) and not np.allclose(map_b, map_a)
    again, log = _splat(b, out, capsys)  # same inputs: resumed, the same map
    assert log.count("resumed from") == 2 and np.array_equal(again, fresh_b)


def test_segmentation_of_another_box_is_refused(folder, tmp_path, capsys):
    seg = np.zeros((16, 16, 16), np.float32)
    seg[:8], seg[8:] = 1, 2
    io.write_map(tmp_path / "seg.mrc", seg, 3.0)
    argv = ["-i", str(folder / "particles.star"), "-o", str(tmp_path / "het"), "--segmentation",
            str(tmp_path / "seg.mrc"), "--consensus-epochs", "0", "--rounds", "0", "--final-epochs", "0",
            "--n-gaussians", "50", "--motions", "1", "--frames", "2"] + CPU
    assert gmm_heterogeneity.run(argv) == 2
    one_line_error(capsys, "segmentation", "16x16x16", "24 px")
    assert not (tmp_path / "het").exists()


def test_refine_classes_needs_two_particles(folder, tmp_path, capsys):
    blocks = starfile.read(folder / "particles.star", always_dict=True)
    parts = blocks["particles"]
    for n, code in ((1, 2), (2, 0)):
        starfile.write({**blocks, "particles": parts.iloc[:n]}, folder / f"p{n}.star", overwrite=True)
        assert refine_classes.run(["-i", str(folder / f"p{n}.star"), "-o", str(tmp_path / f"r{n}"),
                                   "--init", "pooled"] + CPU) == code
    capsys.readouterr()
    assert refine_classes.run(["-i", str(folder / "p1.star"), "-o", str(tmp_path / "r1")] + CPU) == 2
    one_line_error(capsys, "at least 2")


def test_graph_max_cut_takes_the_pixel_size(folder, tmp_path, capsys):
    """A RELION 3.0 file without a pixel size: --angpix, as the other programs."""
    blocks = starfile.read(folder / "particles.star", always_dict=True)
    parts = blocks["particles"].merge(blocks["optics"], on="rlnOpticsGroup")
    parts = parts.drop(columns=[c for c in ("rlnImagePixelSize", "rlnOpticsGroupName", "rlnOpticsGroup",
                                            "rlnImageDimensionality") if c in parts])
    starfile.write(pd.DataFrame(parts), folder / "v30.star", overwrite=True)
    star = str(folder / "v30.star")
    assert aligned_2d_classification.run(["-i", star, "-o", str(tmp_path / "cls"), "--angpix", "3.0",
                                          "--angular-sampling", "30"] + CPU) == 0
    capsys.readouterr()
    graph = ["-i", str(tmp_path / "cls"), "--particles", star, "-o", str(tmp_path / "graph")] + CPU
    assert graph_max_cut.run(graph) == 2
    one_line_error(capsys, "--angpix")
    assert graph_max_cut.run(graph + ["--angpix", "3.0"]) == 0
    assert len(io.read_particles(tmp_path / "graph" / "particles.star", pixel_size_A=3.0)) == 64
