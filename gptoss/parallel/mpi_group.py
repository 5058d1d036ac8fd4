"""A tensor-parallel group whose ranks are MPI ranks (the group shape of gptoss/parallel/mpi_layout.py).

    mpirun -n 8 python run.py MODEL -m getp ... --tensor-parallel 2      # 4 groups of 2 ranks, 1 GPU each
    mpiexec -n 2 python run.py tiny.bin -m getp ... --device cpu --tensor-parallel 2

The group's ranks are an MPI sub-communicator (COMM_WORLD split by group). Its rank 0 makes the NCCL
unique id and MPI's bcast gives every member the same bytes (share_nccl_id), before any of them builds
its NcclCollective. Rank 0 of the group runs the engine with a TensorParallelRunner whose other ranks are
the group's MPI ranks instead of child processes (MpiPeers); the others serve its messages with the same
loop a child process runs (tp_runner.follow), through MpiConn, a pipe end made of MPI point-to-point
messages on the group's communicator. On the CPU the host all-gather of the sharded reference goes
through the same MpiConns.
"""
from __future__ import annotations

import dataclasses
import time

from .tp_runner import RankLink, follow

TP_TAG = 7  # the runner's messages on the group's communicator (its own: no other traffic shares it)


def share_nccl_id(group, make_id):
    """The NCCL unique id every member of `group` (an MPI communicator) joins with: made by its rank 0
    (make_id(), e.g. collective.nccl_unique_id) and broadcast by MPI, so each member holds the same
    bytes. Every member calls it; make_id runs on rank 0 only."""
    return group.bcast(make_id() if group.Get_rank() == 0 else None, root=0)


class MpiConn:
    """One end of a pipe to `peer` over an MPI communicator: send, recv and poll, as multiprocessing's
    Connection has them (what tp_runner's links, follow and host collectives use)."""

    def __init__(self, comm, peer: int, tag: int = TP_TAG):
        self.comm, self.peer, self.tag = comm, peer, tag

    def send(self, obj) -> None:
        self.comm.send(obj, dest=self.peer, tag=self.tag)

    def recv(self):
        return self.comm.recv(source=self.peer, tag=self.tag)

    def poll(self, timeout: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.comm.Iprobe(source=self.peer, tag=self.tag):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0002)
        return True

    def close(self) -> None:
        pass


class RemoteRank:
    """What a RankLink holds for a rank that is an MPI process, not a child: it cannot be joined or
    terminated from here (if it dies, the MPI launcher ends the job)."""
    exitcode = None

    def join(self, timeout=None) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def terminate(self) -> None:
        pass


@dataclasses.dataclass
class MpiPeers:
    """Ranks 1..N-1 of a group, for its rank 0's TensorParallelRunner(peers=...). members[r]: group rank
    r's (MPI rank, node, GPU or None), for names in errors."""
    group: object  # the group's MPI communicator
    nccl_id: object
    members: list

    @property
    def gpus(self) -> tuple | None:
        gpus = tuple(gpu for _, _, gpu in self.members)
        return None if None in gpus else gpus

    def name(self, r: int) -> str:
        world, host, gpu = self.members[r]
        return f"MPI rank {world} on {host}" + (f", GPU {gpu}" if gpu is not None else "")

    def start(self, spec) -> list:
        """Send each rank its RankSpec (it builds its share and answers "ready"); their links."""
        links = []
        for r in range(1, self.group.Get_size()):
            conn = MpiConn(self.group, r)
            conn.send(("spec", spec))
            links.append(RankLink(r, f"rank {r} ({self.name(r)})", conn, RemoteRank()))
        return links


def join_group(comm, group_index: int, device: str, gpu: int | None, host: str):
    """Every rank of COMM_WORLD calls this (collective): its group's communicator, the NCCL id shared
    through it (None on the CPU), and the group's members (MPI rank, node, GPU)."""
    group = comm.Split(color=group_index, key=comm.Get_rank())
    if device == "gpu":
        from .collective import nccl_unique_id

        nccl_id = share_nccl_id(group, nccl_unique_id)
    else:
        nccl_id = None
    return group, nccl_id, group.allgather((comm.Get_rank(), host, gpu))


def follow_over_mpi(group, nccl_id, gpu: int | None) -> None:
    """A group rank other than 0: take its RankSpec from the group's rank 0, then serve its steps until
    "stop" (tp_runner.follow; a failure goes back to rank 0 as one line)."""
    conn = MpiConn(group, 0)
    kind, spec = conn.recv()
    spec = dataclasses.replace(spec, rank=group.Get_rank(), gpu=gpu, nccl_id=nccl_id)
    follow(spec, conn)
