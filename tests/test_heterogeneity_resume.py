"""gsplat_gmm_heterogeneity interrupted after each stage and run again gives the
uninterrupted run's outputs bit for bit; a folder holding a run on other data is
not resumed.

The interruption is an exception raised from the program's progress display at
the first step of a stage (everything before it has been checkpointed), as a
killed process would leave the folder.
"""
import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from scipion_gsplat.core import io
from scipion_gsplat.programs import gmm_heterogeneity

# 300 particles, 2 consensus epochs of 10 steps, 2 rounds, then the full-size stage (40 → 34 px crop)
FAST = ["--n-gaussians", "300", "--consensus-epochs", "2", "--motions", "2", "--rounds", "2",
        "--refit-epochs", "1", "--final-epochs", "1", "--frames", "3", "--classes", "2", "--batch", "32",
        "--device", "cpu", "--threads", "1"]
N = 300
STEPS_PER_EPOCH = (N + 31) // 32


class Interrupted(Exception):
    """Stands for a killed run."""


def subset_star(source: Path, path: Path, rows: slice) -> Path:
    """A STAR of some rows of ``source`` (image paths made absolute)."""
    star = io.read_particles(source)
    parts = star.particles.iloc[rows].reset_index(drop=True)
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{source.parent / n.split('@')[1]}" for n in parts["rlnImageName"]]
    io.write_particles(path, star.subset(np.arange(len(parts))), parts)
    return path


def run(star: Path, out: Path, stop_at=None, monkeypatch=None) -> None:
    """Run the program; with ``stop_at = (label, step)`` raise :class:`Interrupted`
    when the progress display labelled ``label`` reaches ``step``."""
    if stop_at is not None:
        label, step = stop_at
        real = gmm_heterogeneity.Progress

        def progress(name):
            shown = real(name)

            def call(done, total):
                if name == label and done >= step:
                    raise Interrupted(f"{name} at {done}/{total}")
                shown(done, total)
            return call
        monkeypatch.setattr(gmm_heterogeneity, "Progress", progress)
        with pytest.raises(Interrupted):
            gmm_heterogeneity.run(["-i", str(star), "-o", str(out)] + FAST)
        monkeypatch.undo()
        return
    assert gmm_heterogeneity.run(["-i", str(star), "-o", str(out)] + FAST) == 0


def outputs(folder: Path) -> dict:
    """Every output's content: arrays of the ``.npz`` and ``.mrc`` files, the STAR
    tables, the PDB texts and the summary (less its timing, with the folder's
    name replaced)."""
    found = {}
    for f in sorted(folder.iterdir()):
        if f.name == "state.npz" or f.name.startswith("consensus_fit"):
            continue
        if f.suffix == ".npz" and f.name:
            with np.load(f) as d:
                found.update({f"{f.name}:{k}": d[k] for k in d.files})
        elif f.suffix == ".mrc":
            with mrcfile.open(f) as m:
                found[f.name] = m.data.copy()
        elif f.suffix == ".star":
            for block, table in starfile.read(f, always_dict=True).items():
                for col in table.columns:
                    found[f"{f.name}:{block}:{col}"] = table[col].to_numpy()
        elif f.suffix == ".pdb":
            found[f.name] = f.read_text()
        elif f.suffix == ".json":
            summary = json.loads(f.read_text().replace(str(folder), "<output folder>"))
            summary.pop("seconds")
            found[f.name] = json.dumps(summary, sort_keys=True)
    return found


def differences(a: dict, b: dict) -> list:
    """Names of the outputs that differ (or exist in only one)."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        same = x == y if isinstance(x, str) else (x.shape == y.shape and np.array_equal(x, y))
        if not same:
            bad.append(k)
    return bad


@pytest.fixture(scope="module")
def stars(tmp_path_factory, sim_motion):
    folder = tmp_path_factory.mktemp("resume_data")
    return (subset_star(sim_motion / "particles.star", folder / "a.star", slice(0, N)),
            subset_star(sim_motion / "particles.star", folder / "b.star", slice(N, 2 * N)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stars):
    out = tmp_path_factory.mktemp("resume_ref") / "run"
    run(stars[0], out)
    return outputs(out)


@pytest.mark.parametrize("label, step", [
    ("fitting consensus", STEPS_PER_EPOCH + 3),   # during the consensus fit (its epoch 1 checkpointed)
    ("gradients", 1),                             # after the consensus
    ("round 1: refitting model and motions", 1),  # after the eigen-motions and first coordinates
    ("round 2: refitting model and motions", 1),  # after round 1
    ("full-resolution refit", 1),                 # after the last round
])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, stars, reference, monkeypatch, capsys,
                                                             label, step):
    out = tmp_path / "run"
    run(stars[0], out, (label, step), monkeypatch)
    capsys.readouterr()
    run(stars[0], out)
    assert "resumed" in capsys.readouterr().out
    resumed = outputs(out)
    assert differences(resumed, reference) == []


def test_other_data_in_the_same_folder_is_not_resumed(tmp_path, stars, reference, monkeypatch, capsys):
    """A finished run on other particles, then on particles under the same STAR
    path, then an interrupted run on the first ones: each starts afresh."""
    star = tmp_path / "particles.star"
    out = tmp_path / "run"
    star.write_bytes(stars[1].read_bytes())
    run(star, out)
    other = outputs(out)
    star.write_bytes(stars[0].read_bytes())  # same path, other rows
    capsys.readouterr()
    run(star, out, ("round 2: refitting model and motions", 1), monkeypatch)
    log = capsys.readouterr().out
    assert "starting afresh" in log and "resumed" not in log
    run(star, out)
    assert differences(outputs(out), reference) == []
    assert differences(other, reference)  # the two data sets do give different results


def test_motion_model_state_is_exact_where_the_saved_file_is_not():
    """The state keeps the raw parameters: rebuilt from it, the model (parts and
    amplitude motions included) renders exactly what it did; rebuilt from the
    derived centres, amplitudes and widths of ``save`` it does not: a Gaussian
    that a refit has faded far below the others (log-amplitude -40) comes back
    at the derived model's amplitude floor (1e-12 of the largest)."""
    import torch

    from scipion_gsplat.core.heterogeneity.motion_model import MotionModel, base_parameters
    from scipion_gsplat.core.splat.model import GaussianModel
    rng = np.random.default_rng(2)
    model = GaussianModel(rng.normal(0, 8, (50, 3)), rng.uniform(0.3, 2, 50), rng.uniform(1.5, 3, 50))
    mm = MotionModel(base_parameters(model, 2.0), torch.tensor(rng.normal(0, 1, (2, 50, 3)), dtype=torch.float32),
                     torch.tensor(rng.normal(0, 0.1, (2, 50)), dtype=torch.float32), 2.3,
                     torch.tensor(rng.integers(-1, 2, 50)), torch.tensor(rng.normal(0, 5, (2, 3)), dtype=torch.float32))
    with torch.no_grad():
        mm.base.raw["width"] += 0.3  # as a refit leaves them
        mm.base.raw["log_amplitudes"][0] = -40.0  # faded by a refit, not yet pruned
    z = torch.tensor(rng.normal(0, 1, (4, mm.n_coordinates)), dtype=torch.float32)
    before = {k: v.detach().numpy() for k, v in mm.deformed(z).items()}
    back = MotionModel.from_state(dict(mm.state()))
    after = {k: v.detach().numpy() for k, v in back.deformed(z).items()}
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert back.amp_length_A == mm.amp_length_A and back.base.sigma_min_A == mm.base.sigma_min_A
    derived = MotionModel(base_parameters(mm.to_model(), 2.0), mm.motions, mm.amp_motions, mm.amp_length_A,
                          mm.parts, mm.part_centres)  # what the state used to rebuild
    old = {k: v.detach().numpy() for k, v in derived.deformed(z).items()}
    assert not np.allclose(before["amplitudes"], old["amplitudes"], rtol=1e-3, atol=0)


def test_signature_follows_rows_stacks_settings_and_files(tmp_path, stars):
    """The state's signature changes with a STAR value, a stack's modification,
    the seed, a setting or the content of the segmentation; not with the STAR path."""
    import os
    import shutil

    from scipion_gsplat.core.heterogeneity.pipeline import HeterogeneityConfig, _signature
    seg = tmp_path / "seg.mrc"
    io.write_map(seg, np.ones((4, 4, 4), np.float32), 2.0)
    star = io.read_particles(stars[0])
    cfg = HeterogeneityConfig(segmentation=str(seg))
    sig = _signature(star, cfg, 0)
    shutil.copy(stars[0], tmp_path / "copy.star")
    assert _signature(io.read_particles(tmp_path / "copy.star"), cfg, 0) == sig
    assert _signature(star, cfg, 1) != sig
    assert _signature(star, HeterogeneityConfig(segmentation=str(seg), rounds=5), 0) != sig
    changed = io.read_particles(stars[0])
    changed.particles.loc[5, "rlnDefocusU"] += 1.0
    assert _signature(changed, cfg, 0) != sig
    original = seg.read_bytes()
    io.write_map(seg, np.full((4, 4, 4), 2, np.float32), 2.0)
    assert _signature(star, cfg, 0) != sig
    # the file's bytes back (a rewrite through mrcfile would carry a new time stamp in its
    # header label: a different file, and a test that failed whenever a second ticked between)
    seg.write_bytes(original)
    assert _signature(star, cfg, 0) == sig
    stack = io.ImageReader(star).stack_files()[0]
    st = os.stat(stack)
    try:
        os.utime(stack, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
        assert _signature(star, cfg, 0) != sig
    finally:
        os.utime(stack, ns=(st.st_atime_ns, st.st_mtime_ns))
