"""gsplat_reconstruct_splat and gsplat_project, run in-process."""
import json

import gemmi
import mrcfile
import numpy as np
import pytest

from scipion_gsplat.core import fourier, io
from scipion_gsplat.core.splat.model import GaussianModel
from scipion_gsplat.core.splat.render import project_model
from scipion_gsplat.programs import project, reconstruct_splat

FAST = ["--n-gaussians", "300", "--iterations", "2", "--batch", "32", "--device", "cpu", "--threads", "1"]


def test_help_exits_zero(capsys):
    for prog in (project, reconstruct_splat):
        with pytest.raises(SystemExit) as exc:
            prog.run(["--help"])
        assert exc.value.code == 0
        assert "--seed" in capsys.readouterr().out


@pytest.fixture(scope="module")
def splat_run(tmp_path_factory, sim_small):
    out = tmp_path_factory.mktemp("splat") / "run"
    args = ["-i", str(sim_small / "particles.star"), "-o", str(out), "--halves"] + FAST
    assert reconstruct_splat.run(args) == 0
    return out, args


def test_reconstruct_splat_writes_everything(splat_run, sim_small):
    out, _ = splat_run
    for name in ("model.npz", "model.pdb", "map.mrc", "map_half1.mrc", "map_half2.mrc", "model_half1.npz",
                 "model_half2.npz", "fsc.star", "loss.star", "report.png", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_gaussians"] == 600 and summary["resolution_0143_A"] < 8.0
    fsc = io.read_star_table(out / "fsc.star", "fsc")
    assert len(fsc) == 21 and fsc["rlnFourierShellCorrelation"].iloc[2] > 0.9
    loss = io.read_star_table(out / "loss.star", "loss")
    assert sorted(set(loss["gsplatHalf"])) == [1, 2] and len(loss) == 4
    vol, pix = io.read_map(out / "map.mrc")
    model = GaussianModel.load(out / "model.npz")
    assert vol.shape == (40, 40, 40) and pix == 2.0
    assert np.allclose(model.to_map(40, 2.0), vol, atol=1e-5 * vol.max())
    # the exported structure overlays the map (origin at the map's corner)
    st = gemmi.read_structure(str(out / "model.pdb"))
    xyz = np.array([cra.atom.pos.tolist() for cra in st[0].all()])
    assert np.allclose(xyz, model.centres_A + 20 * 2.0, atol=2e-3)


def test_rerun_resumes_from_checkpoints(splat_run, capsys):
    out, args = splat_run
    mtime = (out / "model_half1.npz").stat().st_mtime
    before = GaussianModel.load(out / "model_half1.npz")
    assert reconstruct_splat.run(args) == 0
    text = capsys.readouterr().out
    assert text.count("resumed from") == 2 and "fitting half" not in text
    after = GaussianModel.load(out / "model_half1.npz")
    assert np.array_equal(before.centres_A, after.centres_A) and (out / "model_half1.npz").stat().st_mtime >= mtime


def test_init_from_structure_and_random_in_mask(tmp_path, sim_small, lysozyme_pdb):
    star = str(sim_small / "particles.star")
    assert reconstruct_splat.run(["-i", star, "-o", str(tmp_path / "pdb"), "--init", "pdb", "--init-file",
                                  str(lysozyme_pdb), "--level", "residue", "--pdb-center", "com",
                                  "--iterations", "1", "--device", "cpu"]) == 0
    assert len(GaussianModel.load(tmp_path / "pdb" / "model.npz")) == 129
    mask = np.zeros((40,) * 3, np.float32)
    mask[10:30, 10:30, 10:30] = 1
    io.write_map(tmp_path / "mask.mrc", mask, 2.0)
    assert reconstruct_splat.run(["-i", star, "-o", str(tmp_path / "rnd"), "--init", "random", "--mask",
                                  str(tmp_path / "mask.mrc"), "--gaussian-type", "aniso",
                                  "--densify-every", "1", "--densify-fraction", "0.1",
                                  "--model-format", "cif", "--n-gaussians", "100", "--iterations", "2",
                                  "--batch", "64", "--device", "cpu", "--threads", "1"]) == 0
    model = GaussianModel.load(tmp_path / "rnd" / "model.npz")
    assert model.is_anisotropic and (tmp_path / "rnd" / "model.cif").exists()
    assert len(model) == 110  # 100 + 10 % split or cloned after epoch 1
    loss = io.read_star_table(tmp_path / "rnd" / "loss.star", "loss")
    assert loss["gsplatNumberOfGaussians"].tolist() == [110, 110]
    assert not (tmp_path / "rnd" / "fsc.star").exists()  # no --halves


def _star_with(tmp_path, sim_small, mutate, stack=None):
    star = io.read_particles(sim_small / "particles.star")
    parts = star.particles.copy()
    stack = stack or str(sim_small / "particles.mrcs")
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{stack}" for n in parts["rlnImageName"]]
    parts = mutate(parts)
    io.write_star(tmp_path / "bad.star", {"optics": star.optics, "particles": parts})
    return str(tmp_path / "bad.star")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile and numpy warn about the inf pixel
@pytest.mark.parametrize("case,message", [
    ("no_poses", "no poses"), ("no_ctf", "no CTF"), ("empty_mask", "mask is empty"),
    ("nan_images", "NaN"), ("nan_loss", "loss became"),
])
def test_bad_input_gives_one_line_error(tmp_path, sim_small, capsys, case, message):
    mutate, extra = (lambda p: p), []
    if case == "no_poses":
        mutate = lambda p: p.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])  # noqa: E731
    elif case == "no_ctf":
        mutate = lambda p: p.drop(columns=["rlnDefocusU", "rlnDefocusV"])  # noqa: E731
    elif case == "empty_mask":
        io.write_map(tmp_path / "empty.mrc", np.zeros((40,) * 3, np.float32), 2.0)
        extra = ["--init", "random", "--mask", str(tmp_path / "empty.mrc")]
    elif case == "nan_loss":
        extra = ["--lr-amplitudes", "1e4"]
    star = _star_with(tmp_path, sim_small, mutate)
    if case == "nan_images":
        imgs = mrcfile.read(sim_small / "particles.mrcs").copy()
        imgs[7, 3, 3] = np.inf
        io.write_stack(tmp_path / "nan.mrcs", imgs, 2.0)
        star = _star_with(tmp_path, sim_small, mutate, str(tmp_path / "nan.mrcs"))
    out = tmp_path / "out"
    code = reconstruct_splat.run(["-i", star, "-o", str(out), "--halves"] + FAST + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not (out / "map.mrc").exists()


def test_project_model_and_map(tmp_path, splat_run, sim_small, capsys):
    out, _ = splat_run
    star = io.read_particles(sim_small / "particles.star")
    sub = star.subset(np.arange(24))
    io.write_particles(tmp_path / "sub.star", sub)
    assert project.run(["-i", str(out / "model.npz"), "--star", str(tmp_path / "sub.star"),
                        "-o", str(tmp_path / "proj" / "model.mrcs"), "--device", "cpu"]) == 0
    assert "images/s" in capsys.readouterr().out
    model = GaussianModel.load(out / "model.npz")
    sub = io.read_particles(tmp_path / "sub.star")
    expected = project_model(model, sub.poses(), 2.0, 40, sub.shifts_A(), sub.ctf_params())
    written = io.read_particles(tmp_path / "proj" / "model.star")
    imgs = io.ImageReader(written).read(np.arange(24))
    assert np.allclose(imgs, expected, atol=1e-5 * np.abs(expected).max())
    assert np.allclose(written.poses(), sub.poses())
    # a map through the Fourier projector, with noise at SNR 0.5
    assert project.run(["-i", str(out / "map.mrc"), "--star", str(tmp_path / "sub.star"), "-o",
                        str(tmp_path / "map.mrcs"), "--snr", "0.5", "--seed", "2", "--device", "cpu"]) == 0
    noisy = mrcfile.read(tmp_path / "map.mrcs")
    vol, _ = io.read_map(out / "map.mrc")
    clean = fourier.project(vol, sub.poses(), 2.0, sub.shifts_A(), sub.ctf_params())
    snr = clean.var(axis=(1, 2)).mean() / (noisy - clean).var()
    assert 0.4 < snr < 0.6
    assert np.corrcoef(clean.ravel(), expected.ravel())[0, 1] > 0.99


def test_project_bad_input(tmp_path, sim_small, capsys):
    star = str(sim_small / "particles.star")
    assert project.run(["-i", str(tmp_path / "none.npz"), "--star", star, "-o", str(tmp_path / "p.mrcs")]) == 2
    assert "not found" in capsys.readouterr().err
    io.write_map(tmp_path / "m.mrc", np.zeros((32,) * 3, np.float32), 2.0)
    assert project.run(["-i", str(tmp_path / "m.mrc"), "--star", star, "-o", str(tmp_path / "p.mrcs")]) == 2
    assert "32 voxels" in capsys.readouterr().err
    assert not (tmp_path / "p.mrcs").exists()
