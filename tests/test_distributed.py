"""Several ranks (torch.distributed) give the one-process result: the rank
variables of each launcher, srun over two Slurm nodes, torchrun, and the refusal
of programs that run as one process."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scipion_gsplat.core import distributed, io

BIN = Path(sys.executable).parent


def test_rank_variables_of_each_launcher():
    assert distributed.detect({}) == (0, 1, 0, None)
    assert distributed.detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})[:3] == (1, 4, 1)
    assert distributed.detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3",
                               "OMPI_COMM_WORLD_LOCAL_RANK": "0"})[:3] == (2, 3, 0)
    assert distributed.detect({"PMI_RANK": "1", "PMI_SIZE": "2"})[:3] == (1, 2, 1)
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    # a batch script is one process; an srun step is a rank
    assert distributed.detect(slurm)[1] == 1
    assert distributed.detect(dict(slurm, SLURM_STEP_ID="0"))[:3] == (1, 2, 0)


def test_shards_cover_every_row_once():
    rows = np.arange(10, 33)
    parts = [distributed.World(r, 3).shard(rows) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), rows)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_programs_without_ranks_refuse_to_run_as_several(monkeypatch, tmp_path, capsys):
    from scipion_gsplat.programs import simulate
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = simulate.run(["-i", "x.pdb", "-o", str(tmp_path / "out")])
    assert code == 2
    assert "runs as one process" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _map(path):
    return io.read_map(str(path))[0]


def _reconstruct_cmd(star, out):
    return [str(BIN / "gsplat_reconstruct_fourier"), "-i", str(star), "-o", str(out), "--halves",
            "--threads", "1", "--device", "cpu"]


def test_fourier_reconstruction_over_two_slurm_nodes(slurm_queue, sim_small, tmp_path):
    from scipion_gsplat.programs import reconstruct_fourier
    star = sim_small / "particles.star"
    assert reconstruct_fourier.run(["-i", str(star), "-o", str(tmp_path / "one" / "map.mrc"), "--halves",
                                    "--threads", "1", "--device", "cpu"]) == 0
    two = subprocess.run(["srun", "-N2", "-n2", *_reconstruct_cmd(star, tmp_path / "two" / "map.mrc")],
                         env=slurm_queue, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "2 ranks" in two.stdout
    one_map, two_map = _map(tmp_path / "one" / "map.mrc"), _map(tmp_path / "two" / "map.mrc")
    assert np.abs(one_map - two_map).max() <= 1e-5 * np.abs(one_map).max()
    for half in ("half1", "half2"):
        a, b = _map(tmp_path / "one" / f"map_{half}.mrc"), _map(tmp_path / "two" / f"map_{half}.mrc")
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_fourier_reconstruction_under_torchrun(sim_small, tmp_path):
    torchrun = BIN / "torchrun"
    assert torchrun.exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29611",
           str(BIN / "gsplat_reconstruct_fourier"), *_reconstruct_cmd(sim_small / "particles.star",
                                                                     tmp_path / "map.mrc")[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 ranks" in done.stdout
    assert _map(tmp_path / "map.mrc").std() > 0


def _protocol_map(project, prot):
    return _map(os.path.join(project.path, prot.outputVolume.getFileName()))


def test_the_protocols_mpi_field_starts_ranks(project, sim_small):
    """Scipion's MPI path on a workstation: numberOfMpi=2 runs the program as two
    ranks (the host's PARALLEL_COMMAND, torchrun here) with the one-rank map."""
    from scipion_gsplat.headless import launch_and_wait
    from scipion_gsplat.protocols import ProtGsplatImportParticlesStar, ProtGsplatReconstructFourier
    imp = launch_and_wait(project, project.newProtocol(ProtGsplatImportParticlesStar,
                                                       starFile=str(sim_small / "particles.star")))
    maps = {}
    for n in (1, 2):
        prot = project.newProtocol(ProtGsplatReconstructFourier, numberOfMpi=n, numberOfThreads=1)
        prot.inputParticles.set(imp)
        prot.inputParticles.setExtended("outputParticles")
        launch_and_wait(project, prot, timeout=300)
        log = open(os.path.join(project.path, prot.getStdoutLog())).read()
        assert ("2 ranks" in log) == (n == 2)
        maps[n] = _protocol_map(project, prot)
    assert np.abs(maps[1] - maps[2]).max() <= 1e-5 * np.abs(maps[1]).max()


_LEAVE_SCRIPT = """
import os
import time
import torch
from scipion_gsplat.core import distributed
def say(text):  # one write per line: print() may interleave two ranks' lines on the shared pipe
    os.write(1, (text + "\\n").encode())
world = distributed.init("cpu", timeout_s=1.0)
world.all_reduce_(torch.ones(1))
if world.is_main:
    time.sleep(3.0)  # rank 0 writes the outputs, longer than the group's timeout
    say(f"rank 0 done at {time.time():.3f}")
distributed.shutdown()
say(f"rank {world.rank} left at {time.time():.3f}")
"""


def test_ranks_leave_together_after_rank_0_writes_the_outputs(tmp_path):
    """A rank that is done waits for rank 0 (which writes the outputs) before the
    group is destroyed, however long that takes: a rank destroying it early was
    seen to abort both with SIGABRT."""
    script = tmp_path / "leave.py"
    script.write_text(_LEAVE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", "29613",
                           str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    times = {" ".join(line.split()[:3]): float(line.split()[-1]) for line in done.stdout.splitlines()
             if line.startswith("rank ")}
    assert times["rank 1 left"] >= times["rank 0 done"]


def test_the_heterogeneity_protocol_runs_as_two_ranks(project, sim_small):
    """The heterogeneity form's MPI field: two ranks through the host's
    PARALLEL_COMMAND (torchrun here); Scipion registers the outputs."""
    from scipion_gsplat.headless import launch_and_wait
    from scipion_gsplat.protocols import ProtGsplatGmmHeterogeneity, ProtGsplatImportParticlesStar
    imp = launch_and_wait(project, project.newProtocol(ProtGsplatImportParticlesStar,
                                                       starFile=str(sim_small / "particles.star")))
    prot = project.newProtocol(ProtGsplatGmmHeterogeneity, nGaussians=200, consensusEpochs=1, nMotions=1,
                               rounds=1, nFrames=2, nClasses=2, numberOfMpi=2, numberOfThreads=1)
    prot.inputParticles.set(imp)
    prot.inputParticles.setExtended("outputParticles")
    launch_and_wait(project, prot, timeout=600)
    log = open(os.path.join(project.path, prot.getStdoutLog())).read()
    assert "2 ranks" in log
    assert prot.outputParticles.getSize() == 400


def test_splat_fit_over_two_slurm_nodes(slurm_queue, sim_small, tmp_path):
    """A gold-standard local search split by particle, then minibatch Adam with
    gradients summed over ranks (half sets, joint pose corrections): the maps
    and the refined poses of the one-process fit."""
    from scipion_gsplat.programs import reconstruct_splat
    common = ["-i", str(sim_small / "particles.star"), "--n-gaussians", "200", "--iterations", "2",
              "--batch", "32", "--threads", "1", "--device", "cpu", "--align-rounds", "1", "--halves",
              "--joint-poses"]
    assert reconstruct_splat.run(common + ["-o", str(tmp_path / "one")]) == 0
    two = subprocess.run(["srun", "-N2", "-n2", str(BIN / "gsplat_reconstruct_splat"), *common,
                          "-o", str(tmp_path / "two")], env=slurm_queue, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 ranks" in two.stdout
    assert "particle spectra and CTFs: 200 ×" in two.stdout  # rank 0 searched its half of the 400
    assert "1 rank(s) fit each half set, both at once" in two.stdout
    for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc"):
        a, b = _map(tmp_path / "one" / name), _map(tmp_path / "two" / name)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), name
    p1 = io.read_star_table(str(tmp_path / "one" / "particles.star"), "particles")
    p2 = io.read_star_table(str(tmp_path / "two" / "particles.star"), "particles")
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        assert np.abs(p1[col].to_numpy() - p2[col].to_numpy()).max() < 1e-3


def test_four_ranks_fit_the_two_half_sets_at_once(sim_small, tmp_path):
    """4 ranks under torchrun: two ranks fit each half set (minibatches shared
    within the pair) while the other pair fits the other half set; rank 0 gets
    both fits: the one-process maps, losses and refined poses."""
    from scipion_gsplat.programs import reconstruct_splat
    common = ["-i", str(sim_small / "particles.star"), "--n-gaussians", "200", "--iterations", "2",
              "--batch", "32", "--threads", "1", "--device", "cpu", "--align-rounds", "1", "--halves",
              "--joint-poses"]
    assert reconstruct_splat.run(common + ["-o", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    four = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "4", "--master-port", "29631",
                           str(BIN / "gsplat_reconstruct_splat"), *common, "-o", str(tmp_path / "four")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert four.returncode == 0, four.stderr[-2000:]
    assert "2 rank(s) fit each half set, both at once" in four.stdout
    for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc"):
        a, b = _map(tmp_path / "one" / name), _map(tmp_path / "four" / name)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), name
    l1, l4 = (io.read_star_table(str(tmp_path / d / "loss.star"), "loss") for d in ("one", "four"))
    assert len(l1) == len(l4) and set(l4["gsplatHalf"]) == {1, 2}
    np.testing.assert_allclose(l4["gsplatLoss"].to_numpy(), l1["gsplatLoss"].to_numpy(), rtol=1e-4)
    p1 = io.read_star_table(str(tmp_path / "one" / "particles.star"), "particles")
    p4 = io.read_star_table(str(tmp_path / "four" / "particles.star"), "particles")
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        assert np.abs(p1[col].to_numpy() - p4[col].to_numpy()).max() < 1e-3


def test_heterogeneity_over_two_slurm_nodes(slurm_queue, sim_motion, tmp_path):
    """Consensus fit and refits share minibatches; the local pose search,
    gradients and coordinates are split by particle: the poses and coordinates
    of the one-process run."""
    from scipion_gsplat.programs import gmm_heterogeneity
    common = ["-i", str(sim_motion / "particles.star"), "--n-gaussians", "300", "--consensus-epochs", "2",
              "--motions", "2", "--rounds", "2", "--frames", "3", "--classes", "2", "--threads", "1",
              "--device", "cpu", "--sigma-ang", "2", "--sigma-shift", "0.5"]
    assert gmm_heterogeneity.run(common + ["-o", str(tmp_path / "one")]) == 0
    two = subprocess.run(["srun", "-N2", "-n2", str(BIN / "gsplat_gmm_heterogeneity"), *common,
                          "-o", str(tmp_path / "two")], env=slurm_queue, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 ranks" in two.stdout
    assert "particle spectra and CTFs: 500 ×" in two.stdout  # rank 0 searched its half of the 1000
    p1 = io.read_star_table(str(tmp_path / "one" / "particles.star"), "particles")
    p2 = io.read_star_table(str(tmp_path / "two" / "particles.star"), "particles")
    moved = np.abs(p1["rlnAngleRot"].to_numpy(float) - io.read_star_table(
        str(sim_motion / "particles.star"), "particles")["rlnAngleRot"].to_numpy(float))
    assert np.median(moved) > 0.01  # the poses were refined
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        d = p1[col].to_numpy(float) - p2[col].to_numpy(float)
        assert np.abs((d + 180.0) % 360.0 - 180.0).max() < 1e-3, col  # angles: ±180° is one angle
    for k in (1, 2):
        a, b = (p[f"rlnGsplatCoordinate{k}"].to_numpy(float) for p in (p1, p2))
        # + the STAR file's last decimal (a second coordinate can be ~1e-4 Å wide)
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max() + 2e-6, k
    a, b = _map(tmp_path / "one" / "consensus.mrc"), _map(tmp_path / "two" / "consensus.mrc")
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_a_runs_programs_keep_to_its_threads(project):
    """numpy/BLAS/OpenMP get the run's thread count, not every core of the node."""
    from scipion_gsplat.protocols import ProtGsplatReconstructFourier
    prot = project.newProtocol(ProtGsplatReconstructFourier, numberOfThreads=3, numberOfMpi=2)
    calls = []
    prot.runJob = lambda program, arguments, **kw: calls.append((program, arguments, kw))
    prot.runProgram("reconstruct_fourier", ["-i", "particles.star"], ranks=True)
    (program, arguments, kw), = calls
    assert program.endswith("gsplat_reconstruct_fourier") and "--threads 3" in arguments
    assert kw["numberOfMpi"] == 2
    assert all(kw["env"][v] == "3" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"))
    prot.runProgram("reconstruct_fourier", ["-i", "particles.star"])
    assert calls[-1][2]["numberOfMpi"] == 1


def _column_start(sim_pair, path):
    """sim_pair with an rlnClassNumber start: the true classes, 30 % redrawn at random."""
    from scipion_gsplat.core.split_volume import files
    star = io.read_particles(sim_pair / "particles.star")
    truth = np.load(sim_pair / "ground_truth.npz")["labels"]
    rng = np.random.default_rng(0)
    start = np.where(rng.random(len(truth)) < 0.3, rng.integers(1, 3, len(truth)), truth)
    files.write_classified_particles(path, star, start, np.zeros(len(star)), np.ones(len(star)))
    return path


def _compare_class_refinements(one, two, maps):
    """Classes identical; probabilities within 1e-4 (written to 6 decimals); the
    refined poses within 1e-3° for 99 % of the particles and 0.1° for all (a
    finer search cell chosen differently moves a pose by a fraction of a step);
    the maps within 1e-5 of their largest voxel. Measured on sim_pair: 7e-6,
    1.2e-4° at most and 9e-7; the sums over particles are added in another order."""
    s1, s2 = (io.read_particles(str(d / "particles.star")) for d in (one, two))
    p1, p2 = s1.particles, s2.particles
    assert np.array_equal(p1["rlnClassNumber"].to_numpy(), p2["rlnClassNumber"].to_numpy())
    assert np.abs(p1["rlnGsplatClassProbability"].to_numpy() - p2["rlnGsplatClassProbability"].to_numpy()).max() <= 1e-4
    rel = np.einsum("nji,njk->nik", s1.poses(), s2.poses())  # rotation between the two runs' poses
    angle = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert np.percentile(angle, 99) < 1e-3 and angle.max() < 0.1
    assert np.abs(s1.shifts_A() - s2.shifts_A()).max() < 1e-2
    for name in maps:
        a, b = _map(one / name), _map(two / name)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), name


def test_class_refinement_over_two_slurm_nodes(slurm_queue, sim_pair, tmp_path):
    """gsplat_refine_classes --init both with the default local pose search:
    each rank reads half the particles, the maps, eigenvolumes, noise spectra and
    class fractions are summed over ranks, rank 0 writes the one-process result."""
    from scipion_gsplat.programs import refine_classes
    common = ["-i", str(_column_start(sim_pair, tmp_path / "start.star")), "--init", "both", "--iterations", "3",
              "--eigen-iterations", "5", "--resize", "24", "--threads", "1", "--device", "cpu"]
    assert refine_classes.run(common + ["-o", str(tmp_path / "one")]) == 0
    two = subprocess.run(["srun", "-N2", "-n2", str(BIN / "gsplat_refine_classes"), *common,
                          "-o", str(tmp_path / "two")], env=slurm_queue, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 ranks" in two.stdout and "600 × 24² px" in two.stdout  # each rank holds its half
    assert two.stdout.count("keeping the") == 1  # rank 0 prints
    _compare_class_refinements(tmp_path / "one", tmp_path / "two", ("class1.mrc", "class2.mrc", "eigenvolume.mrc"))
    s1, s2 = (io.read_star_table(str(d / "summary.star"), "summary") for d in (tmp_path / "one", tmp_path / "two"))
    assert s1["rlnGsplatStartedFrom"].iloc[0] == s2["rlnGsplatStartedFrom"].iloc[0]
    for col in ("rlnGsplatPooledHalfAgreement", "rlnGsplatDifferenceAgreementColumn",
                "rlnGsplatDifferenceAgreementPooled", "rlnGsplatAgreementBetweenStarts"):
        assert abs(float(s1[col].iloc[0]) - float(s2[col].iloc[0])) < 1e-4, col


def test_class_refinement_from_scratch_files_under_torchrun(sim_pair, tmp_path):
    """Two ranks with a memory budget far below the data: each keeps its share in
    its own scratch file (removed at the end); the in-memory one-process result."""
    from scipion_gsplat.programs import refine_classes
    common = ["-i", str(sim_pair / "particles.star"), "--init", "pooled", "--refine-pooled", "--iterations", "2",
              "--eigen-iterations", "4", "--resize", "24", "--threads", "1", "--device", "cpu"]
    assert refine_classes.run(common + ["-o", str(tmp_path / "one")]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", "29613",
           str(BIN / "gsplat_refine_classes"), *common, "-o", str(tmp_path / "two"), "--max-memory", "1M"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 ranks" in done.stdout and "600 × 24² px" in done.stdout
    assert f"in the scratch folder {os.path.realpath(tmp_path / 'two')}" in done.stdout
    _compare_class_refinements(tmp_path / "one", tmp_path / "two", ("class1.mrc", "class2.mrc", "eigenvolume.mrc"))
    assert not [f for f in os.listdir(tmp_path / "two") if f.startswith(".gsplat_cache")]


def test_split_volume_runs_its_3d_refinement_as_ranks(project):
    """The split-volume protocol's MPI field goes to gsplat_refine_classes only
    (the 2D classification and the graph cut run as one process)."""
    from scipion_gsplat.protocols import ProtGsplatSplitVolume
    from scipion_gsplat.protocols.protocol_split_volume import MODE_BOTH
    prot = project.newProtocol(ProtGsplatSplitVolume, numberOfMpi=2, numberOfThreads=1, mode=MODE_BOTH)
    calls = []
    prot.runJob = lambda program, arguments, **kw: calls.append((os.path.basename(program), kw["numberOfMpi"]))
    prot._runMode("particles.star", "work")
    assert calls == [("gsplat_aligned_2d_classification", 1), ("gsplat_graph_max_cut", 1),
                     ("gsplat_refine_classes", 2)]


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_wiener_reconstruction_shares_its_solves_between_ranks(sim_small, tmp_path, ranks):
    """With --wiener the ranks share every solve of every pass (each its x
    columns) and exchange the columns: the one-process maps and FSC. An even
    number of ranks splits by half set (2 ranks: one on each half set; 4 ranks:
    a group of two on each, which shares its half set's rows, sums and solves)
    and says so; 3 ranks take a share of both half sets each."""
    from scipion_gsplat.programs import reconstruct_fourier
    star = sim_small / "particles.star"
    assert reconstruct_fourier.run(_reconstruct_cmd(star, tmp_path / "one" / "map.mrc")[1:] + ["--wiener"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--master-port", str(29613 + ranks),
           *_reconstruct_cmd(star, tmp_path / "two" / "map.mrc"), "--wiener"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    by_half = {2: "(1 rank on each half set)", 4: "(2 ranks on each half set)"}.get(ranks)
    if by_half:
        assert by_half in done.stdout
    else:
        assert "on each half set" not in done.stdout and "half sets 200 + 200 particles" in done.stdout
    for name in ("map", "map_half1", "map_half2"):
        a, b = _map(tmp_path / "one" / f"{name}.mrc"), _map(tmp_path / "two" / f"{name}.mrc")
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), name
    f1, f2 = (io.read_star_table(str(tmp_path / d / "map_fsc.star"), "fsc") for d in ("one", "two"))
    assert np.abs(f1["rlnFourierShellCorrelation"].to_numpy() - f2["rlnFourierShellCorrelation"].to_numpy()).max() < 1e-5


class _SplitRecorder(distributed.World):
    """A world of ``size`` ranks that records the groups it is split into."""

    def split(self, groups):
        self.groups = groups
        return distributed.World(rank=0, size=len(groups[0]))


@pytest.mark.parametrize("size, n1, n2, groups", [
    (2, 200, 200, [[0], [1]]),
    (4, 5500, 4500, [[0, 1], [2, 3]]),   # 55 % in the larger half set: still split
    (4, 5600, 4400, None),               # 56 %: the larger half's ranks would wait too long
    (3, 200, 200, None),                 # odd: no pairs
    (1, 200, 200, None),
])
def test_ranks_split_by_half_set_only_when_even_and_balanced(size, n1, n2, groups):
    from scipion_gsplat.core.reconstruct import half_set_group
    for rank in range(size):
        world = _SplitRecorder(rank=rank, size=size)
        split = half_set_group(world, n1, n2)
        assert (split is None) == (groups is None)
        if groups is not None:
            assert world.groups == groups and split.group.size == size // 2
            assert split.half == (1 if rank in groups[0] else 2) and split.first == (0, size // 2)
