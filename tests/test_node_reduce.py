"""Sums between the ranks of one machine through Unix sockets (core.node_reduce):
the same bytes on every rank as gloo's sum, maxima, clear errors when a rank
leaves, no hub left behind, and the fall-back to torch.distributed."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from scipion_gsplat.core import node_reduce

BIN = Path(sys.executable).parent


def _connected(size: int) -> list:
    """``size`` reducers of this process (one per thread), joined at one hub."""
    server, path = node_reduce.NodeReducer.listen(10.0, size)
    members = [node_reduce.NodeReducer.join(r, path, 10.0) for r in range(size - 1, 0, -1)]  # any order
    hub = node_reduce.NodeReducer.accept(server, size, 10.0)
    node_reduce._close_hub(server, path)
    return [node_reduce.NodeReducer(0, size, hub)] + [node_reduce.NodeReducer(r, size, [s])
                                                     for r, s in zip(range(size - 1, 0, -1), members)][::-1]


def _on_all(reducers, tensors, op="sum"):
    errors = []

    def one(r):
        try:
            reducers[r].all_reduce_(tensors[r], op)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append((r, err))

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(reducers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_rank_receives_the_sum_in_rank_order(dtype):
    reducers = _connected(3)
    rng = np.random.default_rng(1)
    parts = [torch.as_tensor(rng.normal(size=(7, 5)), dtype=dtype) for _ in range(3)]
    expected = (parts[0] + parts[1]) + parts[2]
    work = [p.clone() for p in parts]
    assert _on_all(reducers, work) == []
    for w in work:
        assert torch.equal(w, expected)
    assert not torch.equal(work[0], parts[0])


def test_maximum_and_non_contiguous_tensors():
    reducers = _connected(2)
    a = torch.arange(12, dtype=torch.float64).reshape(3, 4).t()      # not contiguous
    b = torch.full((4, 3), 5.0, dtype=torch.float64)
    expected = torch.maximum(a, b)
    assert _on_all(reducers, [a, b], "max") == []
    assert torch.equal(a, expected) and torch.equal(b, expected)


def test_a_rank_that_left_is_a_clear_error():
    reducers = _connected(2)
    reducers[1].close()
    with pytest.raises(ConnectionError, match="rank 1 of this machine left the run"):
        reducers[0].all_reduce_(torch.ones(3))


def _hubs_made(monkeypatch) -> list:
    made = []
    real = node_reduce.NodeReducer.listen

    def listen(timeout_s, size=64):
        made.append(real(timeout_s, size))
        return made[-1]

    monkeypatch.setattr(node_reduce.NodeReducer, "listen", listen)
    return made


def test_ranks_on_different_machines_keep_torch_distributed(monkeypatch):
    """``gather`` reports two machines: no reducer, and rank 0's listening
    socket and folder are gone."""
    made = _hubs_made(monkeypatch)
    got = node_reduce.build(0, 2, lambda obj: [obj, ("elsewhere/boot", None)], lambda ok: ok)
    assert got is None
    assert not os.path.exists(os.path.dirname(made[0][1]))


def test_a_rank_that_cannot_reach_the_hub_costs_no_wait(monkeypatch, tmp_path):
    """Rank 1 sees no hub at the path (as with a private /tmp per task): both
    ranks agree at once to keep torch.distributed; the hub does not wait for
    a connection that will never come."""
    import time
    made = _hubs_made(monkeypatch)
    flags = {}
    barrier = threading.Barrier(2, timeout=30)

    def agree(rank):
        def f(ok):
            flags[rank] = ok
            barrier.wait()
            return all(flags.values())
        return f

    out = {}
    ident = node_reduce.machine_identity()
    hub = threading.Thread(target=lambda: out.__setitem__(0, node_reduce.build(
        0, 2, lambda obj: [obj, (ident, None)], agree(0), setup_timeout_s=20)))
    t0 = time.time()
    hub.start()
    while not made:
        time.sleep(0.01)
    out[1] = node_reduce.build(1, 2, lambda obj: [(ident, str(tmp_path / "no-hub")), obj], agree(1),
                               setup_timeout_s=20)
    hub.join(30)
    assert out == {0: None, 1: None}
    assert time.time() - t0 < 5
    assert not os.path.exists(os.path.dirname(made[0][1]))


_SCRIPT = r"""
import os, sys, torch
from scipion_gsplat.core import distributed, node_reduce
world = distributed.init("cpu")
report = open(os.path.join(sys.argv[1], f"rank{world.rank}.txt"), "w")
print(f"rank {world.rank} node {world.local is not None}", file=report, flush=True)
g = torch.Generator().manual_seed(100 + world.rank)
small = torch.randn(3000, generator=g)
gloo = small.clone()
torch.distributed.all_reduce(gloo)
mine = small.clone()
world.all_reduce_(mine)
big = torch.randn(node_reduce.MAX_BYTES // 4 + 1, generator=g)   # over the limit: torch.distributed
assert not world._on_node(big) and world._on_node(small) == (world.local is not None)
big_sum = big.clone()
world.all_reduce_(big_sum)
parts = [None] * world.size
torch.distributed.all_gather_object(parts, big)
cz = torch.complex(torch.ones(4), torch.full((4,), float(world.rank)))
world.all_reduce_(cz)
everyone = [None] * world.size
torch.distributed.all_gather_object(everyone, mine)
same = all(torch.equal(m, mine) for m in everyone)           # the same bytes on every rank
ok = (same and (torch.equal(mine, gloo) if world.size == 2 else torch.allclose(mine, gloo, atol=1e-6))
      and torch.allclose(big_sum, sum(parts), atol=1e-5)
      and torch.equal(cz, torch.complex(torch.full((4,), float(world.size)),
                                        torch.full((4,), float(sum(range(world.size)))))))
ok = ok and world.max_float(float(world.rank)) == world.size - 1
sub = world.split([[0, 1], list(range(2, world.size))] if world.size > 2 else [[0], [1]])
subsum = sub.sum_float(1.0)
print(f"rank {world.rank} equal {ok} sub {sub.size} {sub.local is not None} {subsum}", file=report, flush=True)
distributed.shutdown()
"""


@pytest.mark.parametrize("ranks, disable", [(2, False), (3, False), (2, True)])
def test_ranks_of_one_machine_sum_through_sockets(tmp_path, ranks, disable):
    """torchrun ranks on this machine: small sums through the sockets give gloo's
    bytes, large ones stay on gloo; sub-worlds of several ranks get their own
    hub; GSPLAT_NODE_REDUCE=0 keeps everything on torch.distributed."""
    script = tmp_path / "sums.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if disable:
        env["GSPLAT_NODE_REDUCE"] = "0"
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # where the hub's folder is made
    done = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--master-port",
                           str(29640 + ranks + 3 * disable), str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((tmp_path / "tmp").glob("gsplat-ranks-*")), "the hub's folder is removed"
    for r in range(ranks):
        lines = (tmp_path / f"rank{r}.txt").read_text().splitlines()
        assert f"rank {r} node {not disable}" in lines
        sub_size = 2 if ranks > 2 and r < 2 else (ranks - 2 if ranks > 2 else 1)
        sub_node = sub_size > 1 and not disable
        assert f"rank {r} equal True sub {sub_size} {sub_node} {float(sub_size)}" in lines, lines
