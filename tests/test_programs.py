"""The gsplat programs, run in-process: outputs, --help and bad input."""
import mrcfile
import numpy as np
import pytest

from scipion_gsplat.core import io
from scipion_gsplat.programs import reconstruct_fourier, simulate


def test_help_exits_zero(capsys):
    for prog in (simulate, reconstruct_fourier):
        with pytest.raises(SystemExit) as exc:
            prog.run(["--help"])
        assert exc.value.code == 0
        assert "--seed" in capsys.readouterr().out


def test_help_states_each_default_once(capsys):
    """Every program's --help: no "(default: 0) (default: 0)", no "(default: False)" on a flag."""
    import importlib
    import pkgutil
    import re
    from scipion_gsplat import programs
    names = [m.name for m in pkgutil.iter_modules(programs.__path__) if not m.name.startswith("_")]
    assert len(names) >= 10
    for name in names:
        prog = importlib.import_module(f"scipion_gsplat.programs.{name}")
        with pytest.raises(SystemExit):
            prog.run(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert not re.search(r"\(default[^()]*\) \(default", text), name
        assert "(default: False)" not in text, name
        assert "random seed (default: 0)" in text, name


def test_simulate_two_states(tmp_path, lysozyme_pdb):
    out = tmp_path / "pair"
    code = simulate.run(["-i", str(lysozyme_pdb), "-o", str(out), "-n", "60", "--box", "40",
                         "--angpix", "2", "--remove", "A/100-129", "--populations", "0.75,0.25",
                         "--snr", "0.5", "--device", "cpu"])
    assert code == 0
    gt = np.load(out / "ground_truth.npz")
    assert np.bincount(gt["labels"])[1:].tolist() == [45, 15]
    m1, m2 = (mrcfile.read(out / f"truth_state{k}.mrc") for k in (1, 2))
    assert 0.1 < 1 - m2.sum() / m1.sum() < 0.35  # a domain of ~20% of the mass is gone
    assert (out / "state2.pdb").exists()


def test_simulate_bad_input(tmp_path, lysozyme_pdb, capsys):
    assert simulate.run(["-i", str(tmp_path / "none.pdb"), "-o", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert simulate.run(["-i", str(lysozyme_pdb), "-o", str(tmp_path / "x"), "--populations", "1,2,3",
                         "--remove", "A/1-10"]) == 2
    assert simulate.run(["-i", str(lysozyme_pdb), "-o", str(tmp_path / "x"), "--box", "12"]) == 2


def test_reconstruct_writes_maps_and_fsc(tmp_path, sim_small, capsys):
    out = tmp_path / "rec" / "map.mrc"
    code = reconstruct_fourier.run(["-i", str(sim_small / "particles.star"), "-o", str(out),
                                    "--halves", "--device", "cpu", "--threads", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "resolution" in text and "back-projecting" in text
    for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc", "map_fsc.star"):
        assert (tmp_path / "rec" / name).exists()
    fsc = io.read_star_table(tmp_path / "rec" / "map_fsc.star", "fsc")
    assert len(fsc) == 21 and fsc["rlnFourierShellCorrelation"].iloc[1] > 0.9
    vol, pix = io.read_map(out)
    assert vol.shape == (40, 40, 40) and pix == 2.0


def test_reconstruct_one_class_and_symmetry(tmp_path, sim_small):
    star = io.read_particles(sim_small / "particles.star")
    star.particles["rlnClassNumber"] = np.where(np.arange(len(star)) < 100, 1, 2)
    io.write_particles(tmp_path / "cls.star", star)
    code = reconstruct_fourier.run(["-i", str(tmp_path / "cls.star"), "-o", str(tmp_path / "c1.mrc"),
                                    "--class", "1", "--sym", "c2", "--maxres", "6", "--device", "cpu"])
    assert code == 0 and (tmp_path / "c1.mrc").exists()
    assert reconstruct_fourier.run(["-i", str(tmp_path / "cls.star"), "-o", str(tmp_path / "c9.mrc"),
                                    "--class", "9"]) == 2


def _broken(tmp_path, sim_small, mutate):
    star = io.read_particles(sim_small / "particles.star")
    star.particles["rlnImageName"] = [str(sim_small / n.split("@")[1]).join([n.split("@")[0] + "@", ""])
                                      for n in star.particles["rlnImageName"]]
    parts = mutate(star.particles.copy())
    io.write_star(tmp_path / "bad.star", {"optics": star.optics, "particles": parts})
    return tmp_path / "bad.star"


@pytest.mark.parametrize("mutate,message", [
    (lambda p: p.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]), "no poses"),
    (lambda p: p.assign(rlnDefocusU=np.nan), "NaN"),
    (lambda p: p.assign(rlnImageName="1@missing.mrcs"), "not found"),
    (lambda p: p.drop(columns=["rlnDefocusU", "rlnDefocusV"]), "no CTF"),
])
def test_reconstruct_bad_input(tmp_path, sim_small, capsys, mutate, message):
    bad = _broken(tmp_path, sim_small, mutate)
    out = tmp_path / "out" / "map.mrc"
    code = reconstruct_fourier.run(["-i", str(bad), "-o", str(out), "--halves"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0]
    assert not out.exists() and not (tmp_path / "out" / "map_half1.mrc").exists()


def test_reconstruct_wrong_box(tmp_path, sim_small, capsys):
    star = io.read_particles(sim_small / "particles.star")
    optics = star.optics.assign(rlnImageSize=64)
    parts = star.particles[[c for c in star.particles.columns if c not in optics.columns or c == "rlnOpticsGroup"]]
    parts = parts.assign(rlnImageName=[f"{n.split('@')[0]}@{sim_small / 'particles.mrcs'}"
                                       for n in parts["rlnImageName"]])
    io.write_star(tmp_path / "box.star", {"optics": optics, "particles": parts})
    assert reconstruct_fourier.run(["-i", str(tmp_path / "box.star"), "-o", str(tmp_path / "m.mrc")]) == 2
    assert "rlnImageSize 64" in capsys.readouterr().err


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from scipion_gsplat.programs._cli import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
def batch():
    # the pattern of one back-projection batch: several temporaries of 8-32 MB
    # alive at once, then all freed (torch's CPU tensors come from the same malloc)
    temporaries = [np.ones(3 << 20, dtype=np.float32) for _ in range(3)]
    return sum(float(t[::1024].sum()) for t in temporaries)
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_programs_reuse_freed_memory_instead_of_faulting_it_in_again(tmp_path):
    """Every batch of a back-projection frees and re-allocates temporaries of 8-32 MB:
    with glibc's defaults the freed top of the heap goes back to the kernel and the
    next batch faults it in again (5 batches of 3 x 12 MB: ~5,500 page faults); with the
    programs' allocator settings the memory is reused (no faults)."""
    import os
    import subprocess
    import sys
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {mode: int(subprocess.run([sys.executable, str(script), mode], env=env, check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
              for mode in ("default", "tuned")}
    assert faults["default"] > 1000, faults  # glibc gives memory back; it is faulted in again
    assert faults["tuned"] < 0.05 * faults["default"], faults
