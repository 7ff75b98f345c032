"""Several processes (ranks) on one or many nodes, on torch.distributed.

One helper for every program: the rank and the number of ranks come from the
launcher's environment, so the same command runs alone, under ``torchrun``,
under Slurm's ``srun`` or under ``mpirun`` (Scipion's MPI path):

=============  ==========================  ===========================
launcher       rank / size                 local rank (GPU choice)
=============  ==========================  ===========================
torchrun       RANK / WORLD_SIZE           LOCAL_RANK
srun           SLURM_PROCID / SLURM_NTASKS SLURM_LOCALID
Open MPI       OMPI_COMM_WORLD_RANK/SIZE   OMPI_COMM_WORLD_LOCAL_RANK
MPICH, Intel   PMI_RANK / PMI_SIZE         MPI_LOCALRANKID
=============  ==========================  ===========================

The processes meet at ``MASTER_ADDR:MASTER_PORT`` (torchrun sets them; under
srun the first node of the step and a port derived from the job id). Backend:
gloo on CPU, NCCL on CUDA. Work is split by particle rows (:meth:`World.shard`);
sums (back-projection accumulators, gradients) are added over ranks with
:meth:`World.all_reduce_`; only rank 0 writes files (:attr:`World.is_main`).
Work done by groups of ranks (e.g. one group per half set) runs in sub-worlds
(:meth:`World.split`) and pairs of ranks trade data with :meth:`World.exchange`.
When every rank of a world runs on one machine, its small sums (the fits'
gradients at every step) go through Unix sockets (:mod:`.node_reduce`), which
cost far less per call than gloo; ``GSPLAT_NODE_REDUCE=0`` turns that off.
"""
from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np
import torch

from . import node_reduce

_LAUNCHERS = (  # (rank, size, local rank) variables, in order of precedence
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def detect(env: Mapping[str, str] = os.environ) -> tuple:
    """``(rank, size, local_rank, launcher)`` from the environment; ``(0, 1, 0, None)``
    for a plain process. Slurm's variables count only inside an ``srun`` step
    (``SLURM_STEP_ID`` set): a batch script itself is one process."""
    for rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var not in env or size_var not in env:
            continue
        if rank_var == "SLURM_PROCID" and "SLURM_STEP_ID" not in env:
            continue
        size = int(env[size_var])
        if size <= 1:
            continue
        rank = int(env[rank_var])
        local = int(env.get(local_var, rank))
        return rank, size, local, rank_var
    return 0, 1, 0, None


def _slurm_tasks_on_node(spec: str, node: int) -> Optional[int]:
    """Tasks of node ``node`` in a Slurm ``SLURM_STEP_TASKS_PER_NODE`` value
    such as ``2(x3),1`` (two tasks on each of three nodes, then one)."""
    pos = 0
    for part in spec.split(","):
        count, _, rep = part.partition("(x")
        try:
            count_i, reps = int(count), int(rep.rstrip(")")) if rep else 1
        except ValueError:
            return None
        if node < pos + reps:
            return count_i
        pos += reps
    return None


def local_size(env: Mapping[str, str] = os.environ) -> int:
    """How many ranks run on this node (1 for a plain process): torchrun's
    ``LOCAL_WORLD_SIZE``, Open MPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``, MPICH's
    ``MPI_LOCALNRANKS``, or this node's share of an srun step. Used to split a
    node's memory budget between its ranks."""
    launcher = detect(env)[3]
    if launcher is None:
        return 1
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if env.get(var, "").isdigit():
            return max(1, int(env[var]))
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if launcher == "SLURM_PROCID" and spec and env.get("SLURM_NODEID", "").isdigit():
        n = _slurm_tasks_on_node(spec, int(env["SLURM_NODEID"]))
        if n:
            return n
    return detect(env)[1]  # unknown layout: assume all on one node (the safe side)


def _slurm_master(env: Mapping[str, str]) -> Optional[str]:
    """Address of the first node of the Slurm step (its NodeAddr, which also works
    for virtual nodes that share one host)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True, timeout=30).stdout.split()[0]
        info = subprocess.run(["scontrol", "-o", "show", "node", first], capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, IndexError, subprocess.SubprocessError):
        return None
    for field in info.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return first


def _master(env: Mapping[str, str], launcher: str) -> tuple:
    addr = env.get("MASTER_ADDR")
    if addr is None and launcher == "SLURM_PROCID":
        addr = _slurm_master(env)
    port = env.get("MASTER_PORT")
    if port is None:
        job = env.get("SLURM_JOB_ID", "0")
        step = env.get("SLURM_STEP_ID", "0")
        port = str(20000 + (int(job) * 7 + int(step)) % 20000 if job.isdigit() and step.isdigit() else 29517)
    return addr or "127.0.0.1", int(port)


def _real_view(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as real pairs (same storage; what the collectives carry); a real one unchanged."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


@dataclass
class World:
    """This process's place among the ranks.

    Attributes:
        rank: 0 … size−1.
        size: number of processes (1 = no torch.distributed).
        local_rank: rank among the processes of this node (picks the GPU).
        backend: "gloo", "nccl" or None (one process).
        group: the torch.distributed process group of a sub-world made by
            :meth:`split` (rank and size are then within the group); None:
            every rank.
        local: the :class:`.node_reduce.NodeReducer` that sums small CPU
            tensors when all ranks of this world run on one machine, or None.
    """
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    group: object = None
    local: object = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that prints summaries and writes files."""
        return self.rank == 0

    def shard(self, rows) -> np.ndarray:
        """This rank's contiguous share of ``rows`` (an int ``n`` means ``arange(n)``)."""
        rows = np.arange(rows) if np.isscalar(rows) else np.asarray(rows)
        return np.array_split(rows, self.size)[self.rank]

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (complex tensors too); returns it."""
        if self.size > 1:
            real = _real_view(tensor)
            if self._on_node(real):
                self.local.all_reduce_(real)
            else:
                torch.distributed.all_reduce(real, group=self.group)
        return tensor

    def _on_node(self, tensor: torch.Tensor) -> bool:
        """Whether this sum goes through the machine's sockets (the same answer
        on every rank: it depends only on the world and the tensor's size)."""
        return (self.local is not None and tensor.device.type == "cpu"
                and tensor.numel() * tensor.element_size() <= node_reduce.MAX_BYTES)

    def join_node(self, timeout_s: float = 600.0) -> None:
        """Collectively: when every rank of this world runs on this machine,
        connect them for small sums (:mod:`.node_reduce`); otherwise, or when
        they cannot reach one another, or with ``GSPLAT_NODE_REDUCE=0``, all
        sums stay on torch.distributed."""
        if self.size < 2 or self.backend != "gloo" or os.environ.get("GSPLAT_NODE_REDUCE", "1") == "0":
            return

        def gather(obj):
            parts = [None] * self.size
            torch.distributed.all_gather_object(parts, obj, group=self.group)
            return parts

        self.local = node_reduce.build(self.rank, self.size, gather,
                                       lambda ok: self.sum_int(int(ok)) == self.size, timeout_s)

    def sum_int(self, value: int) -> int:
        """Sum of an integer over ranks."""
        if self.size == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.float64)
        if self.backend == "nccl":
            t = t.cuda()
        self.all_reduce_(t)
        return int(round(float(t.item())))

    def sum_float(self, value: float) -> float:
        """Sum of a number over ranks (float64)."""
        if self.size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        if self.backend == "nccl":
            t = t.cuda()
        self.all_reduce_(t)
        return float(t.item())

    def max_float(self, value: float) -> float:
        """Largest value over ranks (e.g. the elapsed time that drives a schedule)."""
        if self.size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        if self._on_node(t):
            return float(self.local.all_reduce_(t, "max").item())
        if self.backend == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (e.g. a time limit)."""
        return self.sum_int(int(bool(flag))) > 0 if self.size > 1 else bool(flag)

    def sum_gradients(self, tensors, scalars=()) -> list:
        """Sum the ``.grad`` of ``tensors`` over ranks, in one flat all-reduce
        (a missing gradient counts as zeros: every rank then holds the same).

        ``scalars`` (numbers, e.g. the step's loss) travel in the same
        all-reduce, so an optimiser step costs one round trip; returns their
        sums (as floats; the plain values with one rank). The sum runs in
        float64: with two ranks the float32 gradients come out exactly as a
        float32 addition would give them."""
        scalars = [float(s) for s in scalars]
        if self.size == 1:
            return scalars
        tensors = [t for t in tensors if t.requires_grad]
        for t in tensors:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        device = tensors[0].device if tensors else ("cuda" if self.backend == "nccl" else "cpu")
        flat = torch.cat([t.grad.reshape(-1).double() for t in tensors]
                         + [torch.tensor(scalars, dtype=torch.float64, device=device)])
        self.all_reduce_(flat)
        pos = 0
        for t in tensors:
            n = t.grad.numel()
            t.grad.copy_(flat[pos:pos + n].view_as(t.grad))
            pos += n
        return flat[pos:].tolist()

    def sum_arrays(self, *arrays) -> list:
        """Sums over ranks of numpy arrays (any shapes; float64), in one all-reduce:
        the sufficient statistics of an EM step split by particle, for example.
        One rank: the arrays as float64, unchanged."""
        arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
        if self.size == 1:
            return arrays
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
        if self.backend == "nccl":
            flat = flat.cuda()
        flat = self.all_reduce_(flat).cpu().numpy()
        out, pos = [], 0
        for a in arrays:
            out.append(flat[pos:pos + a.size].reshape(a.shape))
            pos += a.size
        return out

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s (complex too); returns it.
        For work done once (a map solved on rank 0) that every rank needs."""
        self._whole_world()
        if self.size > 1:
            torch.distributed.broadcast(_real_view(tensor), src)
        return tensor

    def broadcast_array(self, array: Optional[np.ndarray], src: int = 0) -> np.ndarray:
        """Rank ``src``'s numpy array on every rank (the others may pass None)."""
        return self.broadcast_object(array, src)

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s picklable object (e.g. a fit's result) on every rank
        (the others may pass None)."""
        self._whole_world()
        if self.size == 1:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src)
        return box[0]

    def gather_rows(self, array: np.ndarray) -> np.ndarray:
        """Every rank's ``array`` (rows = its shard, same trailing shape and dtype)
        concatenated in rank order, on every rank: per-particle results back in
        the order of :meth:`shard`."""
        self._whole_world()
        array = np.asarray(array)
        if self.size == 1:
            return array
        parts = [None] * self.size
        torch.distributed.all_gather_object(parts, array)
        return np.concatenate(parts, axis=0)

    def _whole_world(self) -> None:
        if self.group is not None:
            raise ValueError("this collective runs in the whole world, not in a sub-world")

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier(group=self.group)

    def split(self, groups: list) -> "World":
        """This rank's sub-world among disjoint ``groups`` of ranks (lists of
        ranks of this world, together covering it), e.g. ``[[0, 1], [2, 3]]``.

        Every rank must call it with the same groups (torch.distributed makes
        each group collectively). In the sub-world, :meth:`all_reduce_`,
        :meth:`sum_int`, :meth:`sum_float`, :meth:`max_float`, :meth:`any`,
        :meth:`shard` and :meth:`barrier` involve the group's ranks only;
        a group of one rank is a plain one-process world."""
        if self.group is not None:
            raise ValueError("split a sub-world: split the world it came from instead")
        mine = None
        for ranks in groups:
            ranks = [int(r) for r in ranks]
            handle = torch.distributed.new_group(ranks) if self.size > 1 and len(ranks) > 1 else None
            if self.rank in ranks:
                mine = World(ranks.index(self.rank), len(ranks), self.local_rank,
                             self.backend if len(ranks) > 1 else None, handle)
        if mine is None:
            raise ValueError(f"rank {self.rank} is in none of the groups {groups}")
        if self.local is not None:  # the whole world is on this machine: so is each group
            mine.join_node()
        return mine

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> torch.Tensor:
        """Send ``send`` to rank ``peer`` and receive ``peer``'s tensor into ``recv``
        (same dtype, contiguous; complex too), at once: the two ranks of a pair
        each call it with the other as ``peer``. Returns ``recv``."""
        if self.group is not None:
            raise ValueError("exchange runs in the whole world (global ranks)")
        sending = torch.distributed.isend(_real_view(send), peer)
        torch.distributed.recv(_real_view(recv), peer)
        sending.wait()
        return recv

    def wait_for_all(self, timeout_s: float = 7 * 24 * 3600.0) -> None:
        """Wait until every rank reaches this point, however long the others take
        (rank 0 writing a large output while the others are done). Unlike
        :meth:`barrier` it is not bounded by the group's timeout: the ranks meet
        in the rendezvous key-value store, not in a collective."""
        if self.size == 1:
            return
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set(f"gsplat_done_{self.rank}", "1")
        store.wait([f"gsplat_done_{r}" for r in range(self.size)], datetime.timedelta(seconds=timeout_s))

    def close(self, together: bool = True) -> None:
        """Leave torch.distributed. ``together``: every rank leaves at once (the
        end of a successful run; the group is destroyed collectively, as
        torch.distributed requires: a rank that destroyed it while rank 0 was
        still writing outputs was seen to abort both with SIGABRT). Otherwise
        (a rank failed) this rank just stops using it; the launcher ends the rest."""
        if self.local is not None:
            self.local.close()
            self.local = None
        if self.size > 1 and torch.distributed.is_initialized():
            if together:
                self.wait_for_all()
                torch.distributed.destroy_process_group()


def rank_device(device: str, world: "World") -> str:
    """The device of this rank: ``cuda`` → ``cuda:<local rank mod visible GPUs>``.

    Under Slurm a job sees only its own GPUs, renumbered from 0 in
    ``CUDA_VISIBLE_DEVICES``; a raw GPU id from outside the job would be wrong,
    so ranks pick among the visible devices by local rank."""
    if device.startswith("cuda") and world.size > 1:
        n = max(torch.cuda.device_count(), 1)
        return f"cuda:{world.local_rank % n}"
    return device


_WORLD: Optional[World] = None


def init(device: str = "cpu", env: Mapping[str, str] = os.environ, timeout_s: float = 600.0) -> World:
    """Join the other ranks (once per process) and return the :class:`World`.

    A single process returns ``World()`` without touching torch.distributed."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    rank, size, local, launcher = detect(env)
    if size == 1:
        _WORLD = World()
        return _WORLD
    backend = "nccl" if device.startswith("cuda") else "gloo"
    addr, port = _master(env, launcher)
    torch.distributed.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                         world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
    _WORLD = World(rank, size, local, backend)
    if backend == "nccl":
        torch.cuda.set_device(rank_device(device, _WORLD))
    _WORLD.join_node(timeout_s)
    return _WORLD


def current() -> World:
    """The world set up by :func:`init` (one process when it has not run)."""
    return _WORLD if _WORLD is not None else World()


def shutdown(together: bool = True) -> None:
    """Leave torch.distributed (end of a program; see :meth:`World.close`);
    safe to call twice."""
    global _WORLD
    if _WORLD is not None:
        _WORLD.close(together)
    _WORLD = None
