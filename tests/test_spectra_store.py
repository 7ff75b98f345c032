"""Particle spectra under a memory budget: the disk store, its tensor semantics,
and the same classification from RAM and from a scratch file."""
import dataclasses
import gc
import os

import numpy as np
import pytest
import torch

from scipion_gsplat.core import io, masks
from scipion_gsplat.core.io import InputError
from scipion_gsplat.core.particle_spectra import load_spectra
from scipion_gsplat.core.spectra_store import DiskArray, SpectraWorkspace, parse_memory
from scipion_gsplat.core.split_volume import pooled, refine
from scipion_gsplat.programs import refine_classes

CPU = ["--device", "cpu", "--threads", "1"]


def _random(n=37, shape=(6, 4)):
    g = torch.Generator().manual_seed(1)
    return torch.complex(torch.randn((n,) + shape, generator=g), torch.randn((n,) + shape, generator=g))


def test_disk_array_reads_and_writes_rows_like_a_tensor(tmp_path):
    ref = _random()
    arr = DiskArray(str(tmp_path), ref.shape, torch.complex64)
    arr[torch.arange(len(ref))] = ref
    assert arr.shape == ref.shape and arr.dtype == torch.complex64 and arr.device.type == "cpu"
    assert len(arr) == 37 and os.path.getsize(arr.path) == ref.numel() * 8
    indices = [torch.arange(5, 17), np.array([30, 2, 2, 9, 0]), np.arange(1, 37, 2), [36, 35, 1],
               slice(3, 30, 4), torch.tensor([-1, 0]), np.arange(37) % 3 == 0, np.array([], int)]
    for idx in indices:
        t_idx = torch.as_tensor(np.asarray(idx)) if not isinstance(idx, slice) else idx
        assert torch.equal(arr[idx], ref[t_idx]), idx
    assert torch.equal(arr[7], ref[7])
    # write-back of scattered rows (as a pose update does), then re-read
    rows = np.array([33, 4, 5, 6, 20])
    new = ref[rows] * 1j
    arr[torch.as_tensor(rows)] = new
    ref[torch.as_tensor(rows)] = new
    assert torch.equal(arr[torch.arange(37)], ref)
    with pytest.raises(IndexError):
        arr[np.array([37])]


def test_disk_array_clone_view_and_cleanup(tmp_path):
    ref = _random()
    arr = DiskArray(str(tmp_path), ref.shape, torch.complex64)
    arr[slice(None)] = ref
    copy = arr.clone()
    assert copy.path != arr.path and torch.equal(copy[slice(None)], ref)
    copy[np.array([0])] = torch.zeros((1, 6, 4), dtype=torch.complex64)
    assert torch.equal(arr[0], ref[0])  # the clone is independent
    view = arr.take(np.array([3, 1, 8]))
    assert len(view) == 3 and torch.equal(view[np.array([2, 0])], ref[[8, 3]])
    view[np.array([1])] = ref[[0]]  # a view writes through to its array
    assert torch.equal(arr[1], ref[0])
    vclone = view.clone()
    assert vclone.shape == (3, 6, 4) and torch.equal(vclone[slice(None)], arr[np.array([3, 1, 8])])
    ones = DiskArray(str(tmp_path), (5, 2), torch.float32, fill=1.0)
    assert torch.equal(ones[slice(None)], torch.ones(5, 2))
    paths = [arr.path, copy.path, vclone.path, ones.path]
    del arr, copy, view, vclone, ones
    gc.collect()
    assert not any(os.path.exists(p) for p in paths) and os.listdir(tmp_path) == []


def test_workspace_places_by_budget_and_removes_its_folder(tmp_path):
    with SpectraWorkspace(1000, str(tmp_path)) as ws:
        assert isinstance(ws.empty((10, 5), torch.float32, in_memory=ws.fits(200)), torch.Tensor)
        assert not ws.fits(2000)
        big = ws.empty((10, 50), torch.float32, in_memory=ws.fits(2000), fill=1.0)
        assert isinstance(big, DiskArray) and os.path.dirname(big.path) == ws.folder
        assert os.path.basename(ws.folder).startswith(".gsplat_cache_")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text,expected", [("4G", 4 << 30), ("500M", 500 << 20), ("1.5T", int(1.5 * (1 << 40))),
                                           ("800MB", 800 << 20), ("2GiB", 2 << 30), ("64k", 64 << 10)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["4", "lots", "-1G", "0G", "4 X"])
def test_parse_memory_refuses(text):
    with pytest.raises(InputError):
        parse_memory(text)


@pytest.fixture(scope="module")
def pair_data(sim_pair):
    star = io.read_particles(sim_pair / "particles.star")
    data = load_spectra(star, io.ImageReader(star), 24)
    n = len(data)
    consensus, _ = refine._reconstruct(data, np.arange(n), np.ones(n))
    return star, data, consensus, masks.mask_from_map(consensus, data.pixel_size_A)


def test_eigenvolume_same_with_residuals_kept_recomputed_or_on_disk(pair_data, tmp_path):
    """The eigenvolume's whitened residuals kept in RAM (old behaviour),
    recomputed every pass (no spare memory) and read from a scratch file give
    the same eigenvolume and coordinates (float tolerance 1e-6; measured: equal)."""
    star, data, consensus, mask = pair_data
    sigma2 = refine.noise_spectrum(data, consensus)
    kept = pooled.eigenvolume(data, consensus, mask, sigma2, 8.0, n_iter=4)
    lean = pooled.eigenvolume(dataclasses.replace(data, spare_bytes=0), consensus, mask, sigma2, 8.0, n_iter=4)
    with SpectraWorkspace(1, str(tmp_path)) as ws:
        disk = load_spectra(star, io.ImageReader(star), 24, workspace=ws)
        assert disk.on_disk and disk.spare_bytes == 0
        stored = pooled.eigenvolume(disk, consensus, mask, sigma2, 8.0, n_iter=4)
        rows = np.flatnonzero(data.half == 2)
        sub = disk.subset(rows, half=np.ones(len(rows), int))  # a view, as the per-half refinement takes
        assert sub.on_disk and len(sub) == len(rows) and np.array_equal(sub.poses, data.poses[rows])
        assert torch.equal(sub.spectra[torch.arange(len(rows))], data.spectra[torch.as_tensor(rows)])
        assert torch.equal(sub.ctf[np.arange(len(rows))], data.ctf[torch.as_tensor(rows)])
        del disk, sub
    for other in (lean, stored):
        np.testing.assert_allclose(other[0], kept[0], atol=1e-6)
        np.testing.assert_allclose(other[1][0], kept[1][0], rtol=1e-6, atol=1e-6)
    assert os.listdir(tmp_path) == []


def _classes(folder):
    p = io.read_particles(folder / "particles.star").particles
    return p["rlnClassNumber"].to_numpy(), p["rlnGsplatClassProbability"].to_numpy(), p


def test_program_from_a_scratch_file_matches_memory(sim_pair, tmp_path, capsys):
    """gsplat_refine_classes with a budget far below the data (so every pass
    reads a scratch file, the consensus pose refinement clones it and writes
    re-centred spectra back) gives the labels and probabilities of the in-RAM
    run (tolerance 1e-6; measured: equal), and leaves no scratch file."""
    common = ["-i", str(sim_pair / "particles.star"), "--init", "pooled", "--refine-pooled", "--iterations", "2",
              "--eigen-iterations", "4", "--resize", "24", "--sigma-ang", "2"] + CPU
    assert refine_classes.run(common + ["-o", str(tmp_path / "ram")]) == 0
    assert "in memory" in capsys.readouterr().out
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert refine_classes.run(common + ["-o", str(tmp_path / "disk"), "--max-memory", "1M",
                                        "--scratch", str(scratch)]) == 0
    out = capsys.readouterr().out
    assert f"in the scratch folder {os.path.realpath(scratch)}" in out
    assert "local pose search" in out and "eigenvolume iteration 1" in out
    c_ram, p_ram, t_ram = _classes(tmp_path / "ram")
    c_disk, p_disk, t_disk = _classes(tmp_path / "disk")
    assert np.array_equal(c_ram, c_disk)
    np.testing.assert_allclose(p_disk, p_ram, atol=1e-6)
    np.testing.assert_allclose(t_disk["rlnAngleRot"], t_ram["rlnAngleRot"], atol=1e-4)
    assert os.listdir(scratch) == []
    assert not [f for f in os.listdir(tmp_path / "disk") if f.startswith(".gsplat_cache")]


def test_program_budget_and_scratch_errors_are_one_line(sim_pair, tmp_path, capsys):
    base = ["-i", str(sim_pair / "particles.star"), "-o", str(tmp_path / "o")] + CPU
    assert refine_classes.run(base + ["--max-memory", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-memory 4: give a unit" in err[0]
    assert refine_classes.run(base + ["--max-memory", "4G", "--scratch", str(sim_pair)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds input files" in err[0]
    assert not [f for f in os.listdir(sim_pair) if f.startswith(".gsplat_cache")]


_MAKE_SCRATCH = """
import sys, time
from scipion_gsplat.core.spectra_store import SpectraWorkspace
ws = SpectraWorkspace(0, sys.argv[1])
print(ws.folder, flush=True)
time.sleep(600)
"""


def test_scratch_of_a_killed_run_is_removed_by_the_next_run(tmp_path):
    """A run killed with SIGKILL cannot clean up; the next workspace made in
    the same folder removes its scratch folder, and keeps a live run's."""
    import signal
    import subprocess
    import sys
    procs = [subprocess.Popen([sys.executable, "-c", _MAKE_SCRATCH, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    dead, alive = (p.stdout.readline().strip() for p in procs)
    assert os.path.isdir(dead) and os.path.isdir(alive)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    foreign = tmp_path / ".gsplat_cache_other_host"
    foreign.mkdir()
    (foreign / "owner").write_text("some-other-node 1 1\n")
    told = []
    try:
        with SpectraWorkspace(0, str(tmp_path), log=told.append) as ws:
            mine = ws.folder
            assert not os.path.exists(dead)
            assert os.path.isdir(alive) and os.path.isdir(foreign) and os.path.isdir(mine)
            assert len(told) == 1 and dead in told[0] and "killed" in told[0]
    finally:
        procs[1].kill()
        procs[1].wait(timeout=30)
    assert not os.path.exists(mine)


def test_sigterm_ends_a_program_with_its_scratch_removed(sim_pair, tmp_path):
    """scancel and queue time limits send SIGTERM: the program stops with exit
    143 and its clean-up runs (no scratch folder, no particles.star)."""
    import signal
    import subprocess
    import sys
    import time
    exe = os.path.join(os.path.dirname(sys.executable), "gsplat_refine_classes")
    out = tmp_path / "out"
    proc = subprocess.Popen([exe, "-i", str(sim_pair / "particles.star"), "-o", str(out), "--init", "pooled",
                             "--max-memory", "1M", "--resize", "24", "--eigen-iterations", "200"] + CPU,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and [f for f in os.listdir(out) if f.startswith(".gsplat_cache")]:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143, proc.stdout.read()
    assert not out.exists()  # scratch removed, then the folder the run made and left empty


def test_the_memory_budget_is_shared_by_the_ranks_of_a_node(monkeypatch, tmp_path, capsys):
    from scipion_gsplat.core import distributed
    from scipion_gsplat.programs._cli import memory_workspace

    class Args:
        max_memory, scratch, output = "4G", None, str(tmp_path)
    assert memory_workspace(Args()).max_bytes == 4 << 30
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 ranks on this node
    assert memory_workspace(Args()).max_bytes == 1 << 30
    assert "shared by the 4 ranks of this node" in capsys.readouterr().out
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var)
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "5", "SLURM_STEP_ID": "0",
             "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}  # srun: 2 + 2 + 1 tasks
    assert distributed.local_size(dict(slurm, SLURM_NODEID="1")) == 2
    assert distributed.local_size(dict(slurm, SLURM_NODEID="2")) == 1
    assert distributed.local_size({}) == 1
