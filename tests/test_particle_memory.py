"""Particle images under a memory budget (--max-memory): gsplat_gmm_heterogeneity and
gsplat_reconstruct_splat give the same results with the images in RAM, in a scratch
file (Fourier-cropped) or read from the stacks per batch, and leave no scratch behind."""
import json
from pathlib import Path

import numpy as np
import torch

from scipion_gsplat.core import io
from scipion_gsplat.core.spectra_store import DiskArray, SpectraWorkspace
from scipion_gsplat.core.splat.data import ParticleData
from scipion_gsplat.programs import gmm_heterogeneity, reconstruct_splat

HET = ["--n-gaussians", "200", "--consensus-epochs", "1", "--motions", "1", "--rounds", "1",
       "--refit-epochs", "1", "--final-epochs", "1", "--frames", "2", "--device", "cpu", "--threads", "1"]
SPLAT = ["--n-gaussians", "200", "--iterations", "1", "--batch", "32", "--halves", "--align-rounds", "1",
         "--device", "cpu", "--threads", "1"]


def subset_star(source: Path, path: Path, n: int) -> Path:
    """A STAR of the first ``n`` rows of ``source`` (image paths made absolute)."""
    star = io.read_particles(source)
    parts = star.particles.iloc[:n].reset_index(drop=True)
    parts["rlnImageName"] = [f"{v.split('@')[0]}@{source.parent / v.split('@')[1]}" for v in parts["rlnImageName"]]
    io.write_particles(path, star.subset(np.arange(len(parts))), parts)
    return path


def caches(*folders) -> list:
    return [p for f in folders for p in Path(f).rglob(".gsplat_cache_*")]


def test_images_in_ram_on_disk_or_from_the_stacks_are_the_same(sim_small, tmp_path):
    star = io.read_particles(sim_small / "particles.star")
    ram = ParticleData.from_star(star)
    assert torch.is_tensor(ram.images)
    with SpectraWorkspace(1 << 20, str(tmp_path)) as ws:  # 400 × 40² × 4 bytes = 2.5 MB > 1 MB
        lazy = ParticleData.from_star(star, workspace=ws)
        assert lazy.images is None and "stacks" in lazy.where
        idx = np.array([5, 399, 0, 17, 17, 200])
        assert torch.equal(lazy.batch(idx)[0], ram.batch(idx)[0])
        small_ram = ram.downsampled(24, chunk=128)
        small_disk = lazy.downsampled(24, chunk=100)  # 400 × 24² × 4 = 0.9 MB: fits
        assert torch.is_tensor(small_disk.images)
        ws.max_bytes = 1 << 19  # now it does not: a scratch file
        small_disk = lazy.downsampled(24, chunk=100)
        assert isinstance(small_disk.images, DiskArray) and "scratch" in small_disk.where
        assert small_disk.box == 24 and small_disk.pixel_size_A == small_ram.pixel_size_A
        assert torch.equal(small_disk.batch(idx)[0], small_ram.batch(idx)[0])
        assert torch.equal(small_disk.batch(torch.as_tensor(idx))[0], small_ram.batch(idx)[0])
        assert small_disk.mean_variance() == small_ram.mean_variance()
        folder = Path(ws.folder)
        assert any(folder.iterdir())
    assert not folder.exists()


def test_downsampling_without_the_images_in_memory_is_no_longer_refused(sim_small):
    star = io.read_particles(sim_small / "particles.star")
    lazy = ParticleData.from_star(star, np.arange(100), preload_limit_bytes=0)  # no workspace: RAM
    assert lazy.images is None
    small = lazy.downsampled(20)
    ref = ParticleData.from_star(star, np.arange(100)).downsampled(20)
    assert torch.equal(small.images, ref.images)


def test_heterogeneity_with_a_tiny_budget_matches_ram(sim_motion, tmp_path, capsys):
    star = subset_star(sim_motion / "particles.star", tmp_path / "p.star", 300)
    outs = {}
    for name, extra in (("ram", []), ("disk", ["--max-memory", "1M", "--scratch", str(tmp_path / "scratch")])):
        (tmp_path / "scratch").mkdir(exist_ok=True)
        outs[name] = tmp_path / name
        assert gmm_heterogeneity.run(["-i", str(star), "-o", str(outs[name])] + HET + extra) == 0
        log = capsys.readouterr().out
        # 300 × 34² × 4 bytes = 1.3 MB of working images: in RAM under 4G, a scratch file under 1M
        assert ("in the scratch folder" in log) == (name == "disk"), log
    a, b = (np.load(outs[k] / "heterogeneity.npz") for k in ("ram", "disk"))
    # identical arithmetic on identical images: bit for bit
    np.testing.assert_array_equal(a["coordinates"], b["coordinates"])
    m1, _ = io.read_map(outs["ram"] / "consensus.mrc")
    m2, _ = io.read_map(outs["disk"] / "consensus.mrc")
    np.testing.assert_array_equal(m1, m2)
    assert not caches(tmp_path)


def test_splat_with_a_tiny_budget_matches_ram(sim_small, tmp_path, capsys):
    outs = {}
    for name, extra in (("ram", []), ("disk", ["--max-memory", "1M"])):
        outs[name] = tmp_path / name
        assert reconstruct_splat.run(["-i", str(sim_small / "particles.star"), "-o", str(outs[name])]
                                     + SPLAT + extra) == 0
        log = capsys.readouterr().out
        assert ("read from the stacks per batch" in log) == (name == "disk"), log
        assert ("particle spectra and CTFs" in log and "scratch folder" in log) == (name == "disk"), log
    for f in ("map.mrc", "map_half1.mrc"):
        m1, _ = io.read_map(outs["ram"] / f)
        m2, _ = io.read_map(outs["disk"] / f)
        np.testing.assert_array_equal(m1, m2)  # bit for bit
    s1, s2 = (json.loads((outs[k] / "summary.json").read_text()) for k in ("ram", "disk"))
    assert s1["final_loss"] == s2["final_loss"]
    p1, p2 = (io.read_particles(outs[k] / "particles.star").particles for k in ("ram", "disk"))
    np.testing.assert_array_equal(p1["rlnAngleRot"], p2["rlnAngleRot"])
    assert not caches(tmp_path)


def test_max_memory_is_checked(sim_small, tmp_path, capsys):
    code = reconstruct_splat.run(["-i", str(sim_small / "particles.star"), "-o", str(tmp_path / "o"),
                                  "--max-memory", "12"] + SPLAT)
    assert code == 2 and "give a unit" in capsys.readouterr().err


def test_initial_reconstruction_before_the_images_are_loaded(sim_motion, sim_small, tmp_path, monkeypatch):
    """The Fourier reconstruction that seeds the fit (padded grids of about 3 GB at 256 px) runs
    before the particle images are loaded under --max-memory, so the two never add up (measured at
    20,000 × 256 px: the heterogeneity program peaked at 5.2 GB with the images loaded first)."""
    from scipion_gsplat.core.splat import reconstruct as splat_reconstruct
    events = []
    rec, load = splat_reconstruct.reconstruct_particles, ParticleData.from_star.__func__

    def recording_rec(*a, **k):
        events.append("reconstruction")
        return rec(*a, **k)

    def recording_load(cls, *a, **k):
        events.append("images")
        return load(cls, *a, **k)

    monkeypatch.setattr(splat_reconstruct, "reconstruct_particles", recording_rec)
    monkeypatch.setattr(ParticleData, "from_star", classmethod(recording_load))
    star = subset_star(sim_motion / "particles.star", tmp_path / "p.star", 200)
    assert gmm_heterogeneity.run(["-i", str(star), "-o", str(tmp_path / "het")] + HET) == 0
    assert events and events[0] == "reconstruction" and "images" in events, events
    events.clear()
    star = subset_star(sim_small / "particles.star", tmp_path / "s.star", 200)
    splat = list(SPLAT)
    splat[splat.index("--align-rounds") + 1] = "0"
    assert reconstruct_splat.run(["-i", str(star), "-o", str(tmp_path / "splat")] + splat) == 0
    assert events and events[0] == "reconstruction" and "images" in events, events
