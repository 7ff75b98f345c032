"""gsplat_gmm_heterogeneity in-process on a simulated continuous motion."""
import json

import gemmi
import numpy as np
import pytest
from scipy.stats import spearmanr

from scipion_gsplat.core import io
from scipion_gsplat.programs import gmm_heterogeneity

FAST = ["--n-gaussians", "400", "--consensus-epochs", "3", "--motions", "2", "--rounds", "2",
        "--frames", "4", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def het_run(tmp_path_factory, sim_motion):
    out = tmp_path_factory.mktemp("het") / "run"
    args = ["-i", str(sim_motion / "particles.star"), "-o", str(out), "--classes", "3"] + FAST
    assert gmm_heterogeneity.run(args) == 0
    return out, args


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        gmm_heterogeneity.run(["--help"])
    assert exc.value.code == 0
    assert "--amplitudes" in capsys.readouterr().out


def test_first_coordinate_follows_the_motion(het_run, sim_motion):
    out, _ = het_run
    truth = np.load(sim_motion / "ground_truth.npz")["parameters"]
    star = io.read_particles(out / "particles.star")
    source = io.read_particles(sim_motion / "particles.star")
    assert list(star.particles["rlnImageName"].str.split("@").str[0]) == \
        list(source.particles["rlnImageName"].str.split("@").str[0])
    rho = [abs(spearmanr(star.column(f"rlnGsplatCoordinate{k}"), truth).correlation) for k in (1, 2)]
    assert rho[0] > 0.85, rho
    # the motion is carried by the first coordinate; the second may follow it too (posterior means
    # under the deconvolved prior lie on the population's curved path), but less
    assert rho[1] < rho[0] - 0.2, rho
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explained_variance"][0] > summary["explained_variance"][1]


def test_outputs_maps_trajectory_and_classes(het_run):
    out, _ = het_run
    for name in ("heterogeneity.npz", "consensus.npz", "consensus.pdb", "consensus.mrc", "report.png",
                 "motion01_frame01.mrc", "motion02_frame04.mrc", "class01.mrc", "class03.mrc"):
        assert (out / name).exists(), name
    st = gemmi.read_structure(str(out / "motion01.pdb"))
    assert len(st) == 4
    first = np.array([[r[0].pos.x, r[0].pos.y, r[0].pos.z] for r in st[0][0]])
    last = np.array([[r[0].pos.x, r[0].pos.y, r[0].pos.z] for r in st[3][0]])
    assert np.linalg.norm(last - first, axis=1).max() > 2.0  # the motion moves something by Å
    a, _ = io.read_map(out / "motion01_frame01.mrc")
    b, _ = io.read_map(out / "motion01_frame04.mrc")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.999
    labels = io.read_particles(out / "particles.star").column("rlnClassNumber").astype(int)
    assert set(labels) == {1, 2, 3}


def test_rerun_resumes_from_the_saved_state(het_run, capsys):
    out, args = het_run
    before = np.load(out / "heterogeneity.npz")["coordinates"]
    assert gmm_heterogeneity.run(args) == 0
    assert "resumed" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out / "heterogeneity.npz")["coordinates"], before, atol=1e-5)
    # the state keeps each particle's posterior covariance for the next refit's draws
    cov = np.load(out / "state.npz")["posterior_cov"]
    assert cov.shape == (len(before), 2, 2) and (np.linalg.eigvalsh(cov) > 0).all()


def test_amplitudes_separate_a_compositional_pair(tmp_path, lysozyme_pdb):
    from scipion_gsplat.programs import simulate
    sim = tmp_path / "sim"
    assert simulate.run(["-i", str(lysozyme_pdb), "-o", str(sim), "-n", "600", "--box", "40", "--angpix", "2.0",
                         "--snr", "0.5", "--remove", "A/100-129", "--seed", "8", "--device", "cpu",
                         "--threads", "1"]) == 0
    out = tmp_path / "out"
    args = ["-i", str(sim / "particles.star"), "-o", str(out), "--amplitudes", "--motions", "1",
            "--classes", "2"] + FAST[:4] + ["--rounds", "1", "--frames", "2", "--device", "cpu", "--threads", "1"]
    assert gmm_heterogeneity.run(args) == 0
    truth = np.load(sim / "ground_truth.npz")["labels"]
    labels = io.read_particles(out / "particles.star").column("rlnClassNumber").astype(int)
    acc = max((labels == truth).mean(), (labels != truth).mean())
    assert acc > 0.85, acc
    assert "amp_motions" in np.load(out / "heterogeneity.npz")


@pytest.mark.parametrize("extra,message", [
    (["--motions", "0"], "--motions"),
    (["--consensus", "/nonexistent/model.npz"], "not found"),
    (["--consensus", "README.rst"], ".npz"),
    (["--rounds", "-1"], "--rounds"),
])
def test_bad_options_give_one_line_errors(tmp_path, sim_motion, capsys, extra, message):
    code = gmm_heterogeneity.run(["-i", str(sim_motion / "particles.star"), "-o", str(tmp_path / "o")]
                                 + extra + ["--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "particles.star").exists()


def test_particles_without_poses_or_ctf_are_refused(tmp_path, sim_motion, capsys):
    star = io.read_particles(sim_motion / "particles.star")
    for drop, message in (("rlnDefocusU", "CTF"), ("rlnAngleRot", "poses")):
        parts = star.particles.drop(columns=[drop])
        path = tmp_path / f"no_{drop}.star"
        io.write_particles(path, star, parts)
        code = gmm_heterogeneity.run(["-i", str(path), "-o", str(tmp_path / "o"), "--device", "cpu"])
        assert code == 2 and message in capsys.readouterr().err


def test_rigid_parts_follow_the_hinge(tmp_path, sim_motion):
    out = tmp_path / "parts"
    assert gmm_heterogeneity.run(["-i", str(sim_motion / "particles.star"), "-o", str(out), "--parts", "2"]
                                 + FAST) == 0
    truth = np.load(sim_motion / "ground_truth.npz")["parameters"]
    parts = io.read_particles(out / "particles.star").particles
    assert abs(spearmanr(parts["rlnGsplatCoordinate1"], truth).correlation) > 0.8
    # one moving part (the largest is the reference body): 3 rotations + 3 shifts per particle
    rigid = [c for c in parts.columns if c.startswith("rlnGsplatPart1")]
    assert len(rigid) == 6 and not any(c.startswith("rlnGsplatPart2") for c in parts.columns)
    assert max(abs(spearmanr(parts[c], truth).correlation) for c in rigid) > 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["parts"]) == 1 and summary["coordinate_names"][0] == "part1_rot_x_deg"


def test_parts_from_a_segmentation_map(tmp_path, sim_motion):
    """A segmentation with the β-domain side of the box labelled 1 gives one moving part."""
    import gemmi
    st = gemmi.read_structure(str(sim_motion / "state1.pdb"))
    box, pix = 40, 2.0
    seg = np.zeros((box, box, box), np.float32)
    com = np.mean([a.pos.tolist() for r in st[0][0] for a in r], axis=0)
    dom = np.mean([a.pos.tolist() for r in st[0][0] for a in r if 40 <= r.seqid.num <= 88], axis=0)
    grid = (np.indices((box,) * 3)[::-1].transpose(1, 2, 3, 0) - box // 2) * pix  # x, y, z in Å
    seg[((grid - (dom - com)) ** 2).sum(-1) < 12.0 ** 2] = 1
    io.write_map(tmp_path / "seg.mrc", seg, pix)
    out = tmp_path / "seg"
    assert gmm_heterogeneity.run(["-i", str(sim_motion / "particles.star"), "-o", str(out), "--segmentation",
                                  str(tmp_path / "seg.mrc")] + FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["parts"]) == 1 and 20 < summary["parts"][0] < 300
