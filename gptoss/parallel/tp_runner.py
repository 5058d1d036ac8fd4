"""Tensor/expert parallel as the engine's model runner: one model split over R ranks, one process each.

    run.py MODEL -m getp ... --gpus 0-1 --tensor-parallel 2        # one engine, two GPUs
    run.py MODEL -m getp ... --gpus 0-7 --tensor-parallel 2        # 4 replicas (data parallel) x 2 GPUs
    run.py MODEL -m getp ... --device cpu --tensor-parallel 2      # the sharded NumPy reference, 2 processes

Rank 0 lives in the process that runs the Engine (the scheduler) and is the runner the engine sees.
It starts ranks 1..R-1 as child processes (multiprocessing, spawn) joined to it by a pipe each. Every
rank holds its share of the weights (ShardWeights: its query and kv heads, its experts; the router,
norms, embedding and unembedding whole) and, on a GPU, a GPUModel whose layers all-gather the ranks'
partial sums through NCCL and add them in rank order (gptoss/model.py, gptoss/parallel/collective.py).

Per engine step, rank 0 sends the StepBatch down every pipe, runs the step itself, and returns its
sampled tokens; the others run the same step (their collectives meet rank 0's) and answer nothing unless
they fail. Every rank ends the step with the same logits bit for bit (the same gathered partials added in
the same order), so rank 0's tokens are everyone's. Sizing the KV cache: rank 0 asks every rank for its
free memory and plans once with the least (every rank must build the same slots and pages).

The NCCL unique id is made by rank 0 and passed to each rank in its start-up arguments (a pipe). The
other ranks can instead be MPI ranks already running (peers=, gptoss/parallel/mpi_group.py): then MPI's
bcast gave every rank the id, and the messages go over MPI with a pipe's send/recv/poll. On the
CPU (`--device cpu`) the ranks run gptoss.parallel.tensor.ShardedReference.rank_hidden and the
all-gather goes through the same pipes (rank 0 collects every partial and sends all of them back): slow,
but it runs the orchestration of a GPU run in CI.

Failures: a rank that raises sends one line and rank 0 raises TensorParallelError naming it. A rank that
fails while the others wait inside an NCCL collective leaves them waiting (NCCL has no timeout); rank 0
then does not return from its step, and the run has to be stopped (Ctrl-C).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass

import numpy as np

from ..batch import StepBatch
from ..errors import GptossError, one_line
from .shard_weights import ShardWeights
from .tensor import ShardedReference, ShardPlan


# Test hook: "R" makes rank R (not 0) raise when its first step comes.
RAISE_ENV = "GPTOSS_TEST_TP_RANK_RAISE"


class TensorParallelError(GptossError, RuntimeError):
    """A tensor-parallel rank failed; the message is one line naming it."""


@dataclass(frozen=True)
class RankSpec:
    """What a rank's process needs to build its share (pickled to it)."""
    model: object  # a model path, synthetic:PRESET, or a Weights object
    device: str  # "gpu" or "cpu"
    ranks: int
    rank: int
    gpu: int | None
    config: object  # EngineConfig
    nccl_id: object = None  # gpu: rank 0's NCCL unique id


def check_tensor_parallel(cfg, ranks: int) -> None:
    """ValueError (one line) unless `ranks` divides the model's query heads, kv heads and experts."""
    ShardPlan(cfg, ranks)


def _open(model):
    from ..weights import open_weights

    return model if hasattr(model, "config") and hasattr(model, "names") else open_weights(model)


def rank_runner(spec: RankSpec, collective, progress: bool = False):
    """Rank spec.rank's model runner over its share, its collective inside (the GPU's or the host's)."""
    weights = _open(spec.model)
    if spec.device == "gpu":
        from ..engine.gpu_runner import GPUModelRunner

        return GPUModelRunner(ShardWeights(weights, spec.ranks, spec.rank), spec.config, progress=progress,
                              collective=collective)
    from ..engine.cpu_runner import CPUModelRunner

    return CPUModelRunner(weights, spec.config, model=RankReference(weights, spec.ranks, spec.rank, collective))


class RankReference:
    """The NumPy reference as one rank of R runs it (new_cache, hidden, unembed: what CPUModelRunner
    needs): its kv heads in its cache, its partial sums all-gathered through `collective.gather_host`."""

    def __init__(self, weights, ranks: int, rank: int, collective):
        from ..reference import ReferenceModel

        self.model = ReferenceModel(weights)
        self.sharded = ShardedReference(self.model, ranks)
        self.rank, self.collective = rank, collective
        self.unembed = self.model.unembed

    def new_cache(self):
        return self.sharded.new_cache()[self.rank]

    def hidden(self, tokens, cache):
        return self.sharded.rank_hidden(tokens, cache, self.rank, self.collective.gather_host)


# ---- the host collective of the CPU ranks: a star through rank 0's pipes --------------------------------

class HostLeaderCollective:
    graph_safe = False

    def __init__(self, ranks: int, links: list):
        self.rank, self.size, self.links = 0, ranks, links

    def gather_host(self, part: np.ndarray) -> list:
        parts = [part] + [link.expect("part") for link in self.links]
        for link in self.links:
            link.conn.send(("all", parts))
        return parts


class HostFollowerCollective:
    graph_safe = False

    def __init__(self, ranks: int, rank: int, conn):
        self.rank, self.size, self.conn = rank, ranks, conn

    def gather_host(self, part: np.ndarray) -> list:
        self.conn.send(("part", part))
        kind, parts = self.conn.recv()
        if kind != "all":
            raise RuntimeError(f"rank {self.rank} expected the gathered partials, got {kind!r}")
        return parts


# ---- ranks 1..R-1 --------------------------------------------------------------------------------------

def follow(spec: RankSpec, conn) -> None:
    """A rank's process: build its share, then serve rank 0's messages until "stop" or the pipe closes."""
    try:
        if spec.gpu is not None:
            import cupy

            cupy.cuda.Device(spec.gpu).use()
        if spec.device == "gpu":
            from .collective import NcclCollective

            collective = NcclCollective(spec.rank, spec.ranks, spec.nccl_id)
        else:
            collective = HostFollowerCollective(spec.ranks, spec.rank, conn)
        runner = rank_runner(spec, collective)
        conn.send(("ready", None))
        fail_at = os.environ.get(RAISE_ENV, "")
        while True:
            kind, *args = conn.recv()
            if kind == "step":
                if fail_at == str(spec.rank):
                    raise RuntimeError(f"{RAISE_ENV}: rank {spec.rank}")
                runner.step(args[0])
            elif kind == "free":
                conn.send(("free", runner.free_bytes()))
            elif kind == "allocate":
                runner.allocate(*args)
                conn.send(("allocated", None))
            elif kind == "stop":
                return
    except EOFError:  # rank 0 is gone
        return
    except BaseException as e:  # noqa: BLE001 (Ctrl-C too: rank 0 says what stopped)
        try:
            conn.send(("failed", one_line(e)))
        except (OSError, ValueError):
            pass


@dataclass
class RankLink:
    """Rank 0's end of one rank's pipe (or an MPI stand-in with send, recv, poll), and the rank's process
    (or a stand-in with exitcode, join, is_alive, terminate)."""
    rank: int
    name: str
    conn: object
    process: object

    def expect(self, kind: str):
        """The next message, which must be `kind`; TensorParallelError if the rank failed or died."""
        while not self.conn.poll(0.2):
            if self.process.exitcode is not None and not self.conn.poll(0.5):
                raise TensorParallelError(f"tensor-parallel {self.name} stopped (exit status "
                                          f"{self.process.exitcode})")
        got, value = self.conn.recv()
        if got == "failed":
            raise TensorParallelError(f"tensor-parallel {self.name} failed: {value}")
        if got != kind:
            raise TensorParallelError(f"tensor-parallel {self.name} answered {got!r}, expected {kind!r}")
        return value

    def check(self) -> None:
        """Raise if the rank sent a failure (without waiting)."""
        if self.conn.poll():
            self.expect("nothing")  # a failure, or a protocol error: both raise


class TensorParallelRunner:
    """The engine's runner for a model split over `ranks` ranks: rank 0 here, the rest in child
    processes. gpus: one per rank on a GPU (rank r on gpus[r], made current here for rank 0); None on
    the CPU. model: what each rank opens (a path, synthetic:PRESET, or a Weights object)."""

    def __init__(self, model, device: str, ranks: int, config, gpus: tuple | None = None,
                 progress: bool = True, peers=None):
        weights = _open(model)
        check_tensor_parallel(weights.config, ranks)
        if device == "gpu" and (gpus is None or len(gpus) != ranks):
            raise ValueError(f"a GPU run of {ranks} tensor-parallel ranks needs {ranks} GPUs (got {gpus})")
        self.config, self.model_config, self.ranks = config, weights.config, ranks
        self.device = device
        self.links: list[RankLink] = []
        try:
            if peers is None:
                nccl_id = self._start_children(model, device, ranks, config, gpus)
            else:  # ranks 1..N-1 already run (MPI ranks): they get their RankSpec, the NCCL id they have
                nccl_id = peers.nccl_id
                self.links = peers.start(RankSpec(model, device, ranks, 0, None, config, nccl_id))
            spec = RankSpec(model, device, ranks, 0, gpus[0] if gpus else None, config, nccl_id)
            if device == "gpu":
                from .collective import NcclCollective

                collective = NcclCollective(0, ranks, nccl_id)
            else:
                collective = HostLeaderCollective(ranks, self.links)
            self.rank0 = rank_runner(spec, collective, progress)
            for link in self.links:
                link.expect("ready")
        except BaseException:
            self.close()
            raise
        name = getattr(self.rank0, "name", device)
        self.name = f"{name} x{ranks} tensor parallel"

    def _start_children(self, model, device, ranks, config, gpus):
        """Ranks 1..N-1 as child processes, a pipe each; the NCCL id (GPU) made here, in their RankSpec."""
        nccl_id = None
        if device == "gpu":
            import cupy

            from .collective import nccl_unique_id

            cupy.cuda.Device(gpus[0]).use()
            nccl_id = nccl_unique_id()
        ctx = mp.get_context("spawn")
        for r in range(1, ranks):
            ours, theirs = ctx.Pipe()
            spec = RankSpec(model, device, ranks, r, gpus[r] if gpus else None, config, nccl_id)
            p = ctx.Process(target=follow, args=(spec, theirs), daemon=True, name=f"gptoss-tp-rank-{r}")
            p.start()
            theirs.close()
            self.links.append(RankLink(r, f"rank {r}" + (f" (GPU {gpus[r]})" if gpus else ""), ours, p))
        return nccl_id

    def peak_memory_bytes(self):
        return getattr(self.rank0, "peak_memory_bytes", lambda: None)()

    def allocate(self, capacity: int, slots: int, mean_positions: int | None = None):
        """Every rank sizes its cache from the same plan: the least free memory of any rank."""
        for link in self.links:
            link.conn.send(("free",))
        frees = [self.rank0.free_bytes()] + [link.expect("free") for link in self.links]
        free = None if any(f is None for f in frees) else min(frees)
        for link in self.links:
            link.conn.send(("allocate", capacity, slots, mean_positions, free))
        layout = self.rank0.allocate(capacity, slots, mean_positions, free)
        for link in self.links:
            link.expect("allocated")
        return layout

    def step(self, batch: StepBatch) -> np.ndarray:
        for link in self.links:
            link.conn.send(("step", batch))
        ids = self.rank0.step(batch)
        for link in self.links:
            link.check()
        return ids

    def close(self) -> None:
        """Stop the other ranks (they also stop when this process's end of their pipe closes)."""
        for link in self.links:
            try:
                link.conn.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for link in self.links:
            link.process.join(max(0.0, deadline - time.monotonic()))
            if link.process.is_alive():
                link.process.terminate()
                link.process.join()
        self.links = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
