"""The collective a tensor-parallel GPUModel calls twice per layer: all_gather(send, recv), then every rank
sums the gathered partials in rank order itself (ops.tensor_parallel.reduce_ranks).

    NcclCollective(rank, size, unique_id)  one process per GPU, through cupy.cuda.nccl (NCCL allGather)
    SimulatedGroup(size).member(rank)      `size` ranks in one process, on one GPU, one thread each:
                                           for tests of the sharded model without several GPUs

Why all-gather and not all-reduce: NCCL's all-reduce adds in an order set by its algorithm (ring or tree)
and the topology, not 0, 1, ..., R-1. All-gather moves the partials unchanged, and each rank then adds
them in rank order with the same kernel, so every rank holds the same bits, equal to the sharded NumPy
reference's order (gptoss/parallel/tensor.py), run to run and whatever the machine. The cost is bytes:
each rank receives R-1 partials ([T, H] float32) where a ring all-reduce moves 2 (R-1)/R of one; at the
batch-1 latency this is for, the transfers are a few KB and latency-bound either way.

A collective works on the current CuPy stream (NCCL calls are enqueued there, so a CUDA graph captured
on that stream holds them: `graph_safe`). The simulated one synchronizes threads on the host and is not.
"""
from __future__ import annotations

import threading


class NcclCollective:
    """One rank of an NCCL communicator of `size` ranks (one GPU each, the current device when built).
    unique_id: nccl_unique_id() from rank 0, passed to every rank (a pipe, or MPI's bcast)."""
    graph_safe = True

    def __init__(self, rank: int, size: int, unique_id):
        nccl = nccl_module()
        self.rank, self.size = rank, size
        self._nccl = nccl
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)  # blocks until every rank has joined

    def all_gather(self, send, recv) -> None:
        """recv [size, *send.shape] float32 = every rank's send, rank-major, on the current stream."""
        import cupy

        _check_gather(send, recv, self.size)
        self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._nccl.NCCL_FLOAT32,
                            cupy.cuda.get_current_stream().ptr)

    def close(self) -> None:
        if getattr(self, "comm", None) is not None:
            self.comm.destroy()
            self.comm = None


def nccl_module():
    """cupy.cuda.nccl, or a GptossError saying how to get NCCL."""
    from ..errors import GptossError

    try:
        from cupy.cuda import nccl
    except ImportError as e:  # pragma: no cover (CuPy builds without NCCL support)
        raise GptossError(f"tensor parallel needs NCCL through cupy.cuda.nccl ({e})") from None
    if not getattr(nccl, "available", True):
        raise GptossError("tensor parallel needs NCCL: CuPy found no libnccl (pip install nvidia-nccl-cu13)")
    return nccl


def nccl_unique_id():
    """A new NCCL unique id (a tuple of ints: picklable, for a pipe or MPI's bcast)."""
    return nccl_module().get_unique_id()


def _check_gather(send, recv, size: int) -> None:
    import cupy

    if send.dtype != cupy.float32 or recv.dtype != cupy.float32:
        raise TypeError("all_gather moves float32 partials")
    if not (send.flags.c_contiguous and recv.flags.c_contiguous):
        raise ValueError("all_gather needs contiguous buffers")
    if recv.size != size * send.size:
        raise ValueError(f"all_gather: recv holds {recv.size} floats, {size} ranks x {send.size} expected")


class SimulatedGroup:
    """`size` simulated ranks in one process on one GPU, each driven by its own thread: member(r) is rank
    r's collective. all_gather waits on a barrier for every rank's partial (a CUDA event orders the copies
    after the kernels that wrote it, whichever streams the threads use), copies all of them, and waits
    again so that no rank overwrites its partial before every rank has copied it."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a group needs at least one rank (got {size})")
        self.size = size
        self._barrier = threading.Barrier(size)
        self._sent: list = [None] * size
        self._copied: list = [None] * size

    def member(self, rank: int) -> "SimulatedCollective":
        return SimulatedCollective(self, rank)

    def abort(self) -> None:
        """Release the ranks waiting in a collective (they raise threading.BrokenBarrierError)."""
        self._barrier.abort()


class SimulatedCollective:
    graph_safe = False  # host barriers: a captured graph would replay the copies without them

    def __init__(self, group: SimulatedGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def all_gather(self, send, recv) -> None:
        import cupy

        g = self.group
        _check_gather(send, recv, self.size)
        stream = cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event()
        ready.record(stream)
        g._sent[self.rank] = (send, ready)
        g._barrier.wait()
        parts = recv.reshape(self.size, -1)
        for r, (buf, event) in enumerate(g._sent):
            stream.wait_event(event)
            parts[r][...] = buf.reshape(-1)
        done = cupy.cuda.Event()
        done.record(stream)
        g._copied[self.rank] = done
        g._barrier.wait()
        for event in g._copied:  # the others' copies of this rank's partial come before its next write
            stream.wait_event(event)
        g._barrier.wait()  # every rank has read the lists before any rank's next call refills them

    def close(self) -> None:
        pass
