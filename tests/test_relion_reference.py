"""Our conventions against the real RELION 3.1 programs (skipped without RELION)."""
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest

from scipion_gsplat.core import fourier, fsc, io

pytestmark = pytest.mark.skipif(shutil.which("relion_project") is None,
                                reason="RELION (relion_project) is not installed")


def _subset_star(sim_small, tmp_path, n=60):
    star = io.read_particles(sim_small / "particles.star")
    sub = star.subset(np.arange(n))
    io.write_particles(tmp_path / "sub.star", sub)
    return io.read_particles(tmp_path / "sub.star")


def test_projection_matches_relion_project(sim_small, tmp_path):
    """Poses, origins and CTF (defocus, astigmatism) give the same images as
    relion_project: this pins every geometric and CTF convention."""
    star = _subset_star(sim_small, tmp_path)
    vol, pix = io.read_map(sim_small / "truth_state1.mrc")
    subprocess.run(["relion_project", "--i", str(sim_small / "truth_state1.mrc"), "--o", "proj",
                    "--ang", "sub.star", "--ctf"], cwd=tmp_path, check=True, capture_output=True)
    ref = mrcfile.read(tmp_path / "proj.mrcs")
    ours = fourier.project(vol, star.poses(), pix, star.shifts_A(), star.ctf_params())
    cc = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, ref)])
    assert cc.min() >= 0.99, f"min correlation {cc.min():.4f}"
    scale = (ours * ref).sum() / (ref * ref).sum()
    assert scale == pytest.approx(1.0, abs=0.02)


def test_relion_reconstruct_reads_our_star(sim_small, tmp_path):
    star = io.read_particles(sim_small / "particles.star")
    io.write_particles(tmp_path / "all.star", star)
    subprocess.run(["relion_reconstruct", "--i", "all.star", "--o", "relion.mrc", "--ctf"],
                   cwd=tmp_path, check=True, capture_output=True)
    rel, _ = io.read_map(tmp_path / "relion.mrc")
    truth, pix = io.read_map(sim_small / "truth_state1.mrc")
    _, c = fsc.fsc_curve(rel, truth, pix)
    assert fsc.fsc_auc(c) > 0.8
