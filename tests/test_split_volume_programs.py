"""Split-volume programs in-process on a tiny conformational pair (accuracy vs truth)."""
import os

import numpy as np
import pytest

from scipion_gsplat.core import io
from scipion_gsplat.core.split_volume import files, plots
from scipion_gsplat.programs import aligned_2d_classification as a2d
from scipion_gsplat.programs import graph_max_cut, refine_classes

from conftest import accuracy


@pytest.fixture(scope="module")
def classified(tmp_path_factory, sim_pair):
    out = tmp_path_factory.mktemp("split")
    assert a2d.run(["-i", str(sim_pair / "particles.star"), "-o", str(out / "cls"),
                    "--angular-sampling", "10", "--device", "cpu"]) == 0
    assert graph_max_cut.run(["-i", str(out / "cls"), "--particles", str(sim_pair / "particles.star"),
                              "-o", str(out / "graph")]) == 0
    return out


def _truth(sim):
    return np.load(sim / "ground_truth.npz")["labels"]


def _classes(path):
    return io.read_particles(path).column("rlnClassNumber").astype(int)


def test_classification_outputs(classified, sim_pair):
    dirs, pairs = files.read_classification(classified / "cls")
    assert len(dirs) > 100 and len(pairs) > 2 * 1200
    assert set(pairs.columns) >= {"rlnGsplatCoordinate", "rlnGsplatLogLikelihoodRatio"}
    assert np.isfinite(pairs["rlnGsplatLogLikelihoodRatio"]).all()
    assert (dirs["rlnGsplatBimodality"] > 2).mean() > 0.5  # a 40° hinge shows in most views
    for name in ("eigen_images.mrcs", "mean_images.mrcs", "side_averages.mrcs"):
        assert (classified / "cls" / name).exists()


def test_graph_partition_is_accurate(classified, sim_pair):
    out = io.read_particles(classified / "graph" / "particles.star")
    src = io.read_particles(sim_pair / "particles.star")
    ro, rs = io.ImageReader(out), io.ImageReader(src)  # same rows, same order, same images
    assert np.array_equal(ro.index, rs.index)
    assert {os.path.realpath(p) for p in ro.stacks} == {os.path.realpath(p) for p in rs.stacks}
    assert accuracy(_classes(classified / "graph" / "particles.star"), _truth(sim_pair)) > 0.95
    p = out.column("rlnGsplatClassProbability")
    assert np.all((p >= 0.5) & (p <= 1.0))


def test_thesis_weights(classified, sim_pair, tmp_path):
    assert graph_max_cut.run(["-i", str(classified / "cls"), "--particles", str(sim_pair / "particles.star"),
                              "-o", str(tmp_path / "llr"), "--weights", "llr", "--method", "spectral"]) == 0
    assert accuracy(_classes(tmp_path / "llr" / "particles.star"), _truth(sim_pair)) > 0.9


def test_refinement_from_the_graph(classified, sim_pair):
    """(The simulated poses are exact: kept with --sigma-ang 0 here and below; the
    pose search is tested in test_split_volume_poses.py.)"""
    out = classified / "refine"
    assert refine_classes.run(["-i", str(classified / "graph" / "particles.star"), "-o", str(out),
                               "--iterations", "4", "--device", "cpu", "--sigma-ang", "0"]) == 0
    assert accuracy(_classes(out / "particles.star"), _truth(sim_pair)) > 0.98
    assert (out / "class1.mrc").exists() and (out / "class2.mrc").exists()
    summary = io.read_star_table(out / "summary.star", "summary")
    assert summary["rlnGsplatStartedFrom"].iloc[0] == "column"


def test_column_split_without_refinement_is_kept(classified, tmp_path):
    graph = classified / "graph" / "particles.star"
    assert refine_classes.run(["-i", str(graph), "-o", str(tmp_path), "--iterations", "0"]) == 0
    kept = _classes(tmp_path / "particles.star")
    assert accuracy(kept, _classes(graph)) == 1.0
    assert (tmp_path / "class1.mrc").exists() and (tmp_path / "class2.mrc").exists()


def test_pooled_detector(sim_pair, tmp_path):
    assert refine_classes.run(["-i", str(sim_pair / "particles.star"), "-o", str(tmp_path),
                               "--init", "pooled", "--iterations", "0", "--eigen-iterations", "6",
                               "--device", "cpu", "--sigma-ang", "0"]) == 0
    assert accuracy(_classes(tmp_path / "particles.star"), _truth(sim_pair)) > 0.95
    agreement = io.read_star_table(tmp_path / "summary.star", "summary")["rlnGsplatPooledHalfAgreement"]
    assert float(agreement.iloc[0]) > 0.8


def test_both_starts_keep_the_supported_pooled_split(classified, sim_pair):
    out = classified / "both"
    assert refine_classes.run(["-i", str(classified / "graph" / "particles.star"), "-o", str(out),
                               "--init", "both", "--iterations", "2", "--eigen-iterations", "6",
                               "--choose", "support", "--sigma-ang", "0"]) == 0
    summary = io.read_star_table(out / "summary.star", "summary")
    assert summary["rlnGsplatStartedFrom"].iloc[0] == "pooled"
    assert float(summary["rlnGsplatAgreementBetweenStarts"].iloc[0]) > 0.95
    assert accuracy(_classes(out / "particles.star"), _truth(sim_pair)) > 0.95
    assert (out / "class1.mrc").exists() and (out / "eigenvolume.mrc").exists()
    # with --refine-pooled both starts are refined and the likelier one is kept
    assert refine_classes.run(["-i", str(classified / "graph" / "particles.star"), "-o", str(out / "r"),
                               "--init", "both", "--iterations", "2", "--eigen-iterations", "6",
                               "--refine-pooled", "--sigma-ang", "0"]) == 0
    summary = io.read_star_table(out / "r" / "summary.star", "summary")
    assert np.isfinite(float(summary["rlnGsplatTotalLoglik"].iloc[0]))
    assert accuracy(_classes(out / "r" / "particles.star"), _truth(sim_pair)) > 0.95


def test_pooled_detector_finds_no_support_in_a_homogeneous_set(sim_small, tmp_path):
    assert refine_classes.run(["-i", str(sim_small / "particles.star"), "-o", str(tmp_path),
                               "--init", "pooled", "--iterations", "0", "--eigen-iterations", "6"]) == 0
    agreement = io.read_star_table(tmp_path / "summary.star", "summary")["rlnGsplatPooledHalfAgreement"]
    assert float(agreement.iloc[0]) < 0.5


def test_viewer_figures(classified, tmp_path):
    paths = plots.save_pngs(classified / "cls", classified / "graph", tmp_path, n_directions=2)
    assert len(paths) == 3
    for p in paths:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    fig = plots.interactive_direction_viewer(classified / "cls")
    fig.savefig(tmp_path / "interactive.png")
    assert (tmp_path / "interactive.png").stat().st_size > 10000


def test_few_particles_and_disconnected_graph(sim_pair, tmp_path, capsys):
    """Particles from two distant view cones only: directions with < min particles
    get no weight, the graph falls apart, and the program says so without failing."""
    star = io.read_particles(sim_pair / "particles.star")
    d = star.poses()[:, 2, :]
    keep = np.flatnonzero((np.abs(d[:, 2]) > 0.97) | (np.abs(d[:, 0]) > 0.97))
    io.write_particles(tmp_path / "sub.star", star.subset(keep))
    assert a2d.run(["-i", str(tmp_path / "sub.star"), "-o", str(tmp_path / "cls"),
                    "--angular-sampling", "10", "--min-particles", "5"]) == 0
    assert graph_max_cut.run(["-i", str(tmp_path / "cls"), "--particles", str(tmp_path / "sub.star"),
                              "-o", str(tmp_path / "graph")]) == 0
    out = capsys.readouterr().out
    assert "connected components" in out
    comp = io.read_particles(tmp_path / "graph" / "particles.star").column("rlnGsplatComponent")
    assert len(np.unique(comp[comp >= 0])) >= 2
    pairs = files.read_classification(tmp_path / "cls")[1]
    assert np.isfinite(pairs["rlnGsplatCoordinate"]).all()


def test_bad_inputs(sim_pair, tmp_path, capsys):
    star = io.read_particles(sim_pair / "particles.star")
    parts = star.particles.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{sim_pair / 'particles.mrcs'}" for n in parts["rlnImageName"]]
    io.write_star(tmp_path / "noposes.star", {"optics": star.optics, "particles": parts})
    assert a2d.run(["-i", str(tmp_path / "noposes.star"), "-o", str(tmp_path / "x")]) == 2
    assert "no poses" in capsys.readouterr().err
    io.write_map(tmp_path / "mask.mrc", np.ones((20, 20, 20), np.float32), 2.0)
    assert a2d.run(["-i", str(sim_pair / "particles.star"), "-o", str(tmp_path / "y"),
                    "--mask", str(tmp_path / "mask.mrc")]) == 2
    assert "shape" in capsys.readouterr().err
    assert not (tmp_path / "y" / "pairs.star").exists()
    assert graph_max_cut.run(["-i", str(tmp_path), "--particles", str(sim_pair / "particles.star"),
                              "-o", str(tmp_path / "z")]) == 2
    assert refine_classes.run(["-i", str(sim_pair / "particles.star"), "-o", str(tmp_path / "r"),
                               "--init", "column"]) == 2
    assert "rlnClassNumber" in capsys.readouterr().err
