"""getp over MPI ranks, for more than one node: one engine per rank, prompts from rank 0's queue.

    mpirun -n 16 python run.py MODEL -m getp -i prompts.txt -o out.txt          # e.g. 2 nodes x 8 GPUs
    mpiexec -n 2 python run.py MODEL -m getp -i prompts.txt -o out.txt --device cpu

Launch one rank per GPU. A rank on a GPU uses the GPU of its rank within its node (MPI's shared-memory
split), among --gpus or the visible GPUs. Rank 0 reads and tokenizes the prompts, opens OUTPUT.partial
(the single-process format and fingerprint: a run started any way resumes any other way) and keeps the
queue of prompts to run, longest first. Every rank, rank 0 included, runs an engine; a rank asks rank 0
for as many prompts as it has free slots (and keeps stepping what it holds while the answer comes),
and sends each finished prompt back. Rank 0 appends finished prompts to OUTPUT.partial, drives the one
progress bar, and writes OUTPUT atomically in input order. A prompt's draws use its input line as the
sampler's sequence id and its tokens do not depend on its batch, so the output is byte-identical to one
engine's. A rank that fails sends a one-line reason; rank 0 keeps what finished, says which rank failed
(rank 0 itself included), and aborts the job (MPI_Abort), after which `--resume` continues.

mpi4py is imported only when an MPI launcher started this process (see mpi_world_size).
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .data import GPU_INFLIGHT, LineRuns, ReplicaError, replica_llm

# What launchers set in each rank's environment: Open MPI; MPICH's Hydra, Intel MPI and Slurm's PMI.
WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
TO_ROOT, TASKS = 1, 2
# Test hook: "R" makes rank R (not 0) raise right after sending its first finished prompt.
RAISE_ENV = "GPTOSS_TEST_MPI_RANK_RAISE"  # message tags: a rank's messages to rank 0; rank 0's answers with prompts


def mpi_world_size(environ=os.environ) -> int:
    """How many ranks an MPI launcher started (1 when none did), from the environment alone."""
    for var in WORLD_SIZE_VARS:
        value = environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


@dataclass(frozen=True)
class MpiOptions:
    """device: "cpu" or "gpu"; gpus: the node's GPUs a rank picks from by its rank within the node. The
    rest is each rank's LLM (tokenizer file, max_seqs = run.py -b, memory_limit = --gpu-memory).
    tensor_parallel N > 1: each MPI rank runs one engine split over N ranks of its own (processes it
    starts, gptoss/parallel/tp_runner.py), on GPUs gpus[i N .. i N + N - 1] for its rank i in the node."""
    device: str = "cpu"
    gpus: tuple[int, ...] = ()
    tokenizer: str | None = None
    max_seqs: int | None = None
    memory_limit: int | None = None
    tensor_parallel: int = 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _build_llm(model_path, mo: MpiOptions, local_rank: int):
    n = mo.tensor_parallel
    if mo.device != "gpu":
        gpu, gpus = None, None
    elif n == 1:
        gpu = mo.gpus[local_rank % len(mo.gpus)]
        gpus = (gpu,)
    else:
        gpus = mo.gpus[local_rank * n:(local_rank + 1) * n]
        if len(gpus) < n:
            raise ValueError(f"node rank {local_rank} needs GPUs {local_rank * n}..{local_rank * n + n - 1} for "
                             f"--tensor-parallel {n}; the node has {len(mo.gpus)}")
        gpu = gpus[0]
    return replica_llm(model_path, mo.device, gpu, mo.tokenizer, mo.max_seqs, mo.memory_limit, n, gpus), gpu


def _drive(llm, sampling, want: int, take, give, between_steps) -> dict:
    """Step llm's engine until `take` has no more prompts and nothing is in flight.

    take(n, block) -> up to n (line, ids) tasks, [] once there are no more, or None when none is ready
    yet (only when not block). give(line, ids) gets each finished prompt. between_steps() runs after
    every step. Returns the rank's figures."""
    runs = LineRuns(llm, sampling)
    no_more = False
    while True:
        if not no_more and len(runs) < want:
            tasks = take(want - len(runs), not len(runs))  # blocks only when this rank has nothing to do
            if tasks == []:
                no_more = True
            for line, ids in tasks or ():
                runs.add(line, ids)
        if not len(runs):
            if no_more:
                break
            continue
        for line, ids in runs.step():
            give(line, ids)
        between_steps()
    return runs.figures()


def _worker(comm, model_path, mo: MpiOptions, sampling, local_rank: int) -> None:
    """A rank other than 0: ask rank 0 for prompts, run them, send them back, then its figures."""
    try:
        llm, gpu = _build_llm(model_path, mo, local_rank)
        asked = False

        def take(n, block):
            nonlocal asked
            if not asked:
                comm.send(("want", n), dest=0, tag=TO_ROOT)
                asked = True
            if not block and not comm.Iprobe(source=0, tag=TASKS):
                return None
            asked = False
            return comm.recv(source=0, tag=TASKS)

        def give(line, ids):
            comm.send(("done", line, ids), dest=0, tag=TO_ROOT)
            if os.environ.get(RAISE_ENV) == str(comm.Get_rank()):
                raise RuntimeError(f"{RAISE_ENV}: after line {line}")

        want = mo.max_seqs or (1 if mo.device == "cpu" else GPU_INFLIGHT)
        figures = _drive(llm, sampling, want, take, give, lambda: None)
        comm.send(("finished", dict(figures, gpu=gpu)), dest=0, tag=TO_ROOT)
    except BaseException as e:  # noqa: BLE001 (rank 0 says what stopped, then aborts the job)
        comm.send(("failed", _one_line(e)), dest=0, tag=TO_ROOT)


def run_getp_mpi(model_path, options, mo: MpiOptions, sampling) -> int:
    """getp (gptoss.getp.run_getp's files, output and record) over the ranks of MPI.COMM_WORLD. Every
    rank calls it; rank 0 writes the output. GetpError for bad input (rank 0 raises it, the other ranks
    return 2), ReplicaError when a rank fails (after which rank 0 aborts the job)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()  # this rank's place on its node
    plan, problem = None, None
    if rank == 0:
        from ..getp import plan_getp
        from ..tokenizer import tokenizer_from_option
        from ..weights import open_weights

        try:
            cfg = open_weights(model_path).config
            local = model_path if isinstance(model_path, Path) else None
            plan = plan_getp(cfg, model_path, lambda: tokenizer_from_option(options.tokenizer, local), options,
                             sampling)
        except BaseException as e:  # noqa: BLE001 (told to every rank, raised on rank 0)
            problem = e
    if comm.bcast(problem is not None, root=0):
        if rank == 0:
            raise problem
        return 2
    if rank != 0:
        _worker(comm, model_path, mo, sampling, local_rank)
        return 0
    return _root(comm, size, plan, model_path, options, mo, sampling)


def _root(comm, size: int, plan, model_path, options, mo: MpiOptions, sampling) -> int:
    """Rank 0: serve the queue to the other ranks between its own engine's steps; write the output."""
    from mpi4py import MPI

    from ..getp import finish_getp
    from ..progress import GetpProgress

    pending = deque(sorted(plan.todo, key=lambda n: -len(plan.prompts[n])))  # longest first (stable)
    figures: dict[int, dict] = {}
    n = len(plan.prompts)
    start = time.perf_counter()
    try:
        with GetpProgress(total=n, done=n - len(plan.todo), quiet=options.quiet) as bar:
            def finished(line, ids):
                plan.outputs[line] = ids
                plan.partial.add(line, ids)
                bar.tokens(len(ids))
                bar.prompt_done()

            def take(k, block=True):  # the next k prompts of the queue ([] once it is empty)
                lines = [pending.popleft() for _ in range(min(k, len(pending)))]
                return [(line, plan.prompts[line]) for line in lines]

            def serve(block: bool) -> None:
                status = MPI.Status()
                while block or comm.Iprobe(source=MPI.ANY_SOURCE, tag=TO_ROOT, status=status):
                    message = comm.recv(source=MPI.ANY_SOURCE, tag=TO_ROOT, status=status)
                    block = False
                    kind, *rest = message
                    src = status.Get_source()
                    if kind == "want":
                        comm.send(take(rest[0]), dest=src, tag=TASKS)
                    elif kind == "done":
                        finished(*rest)
                    elif kind == "finished":
                        figures[src] = rest[0]
                    else:
                        raise ReplicaError(f"MPI rank {src} failed: {rest[0]}")

            llm, gpu = _build_llm(model_path, mo, 0)

            want = mo.max_seqs or (1 if mo.device == "cpu" else GPU_INFLIGHT)
            figures[0] = dict(_drive(llm, sampling, want, take, finished, lambda: serve(False)), gpu=gpu)
            while len(figures) < size:
                serve(True)
    except BaseException as e:  # said in one line; the caller stops the other ranks (MPI_Abort)
        plan.partial.close()  # what finished is kept for --resume
        if isinstance(e, ReplicaError):
            raise
        raise ReplicaError(f"MPI rank 0 failed: {_one_line(e)}") from e
    wall = time.perf_counter() - start
    plan.partial.close()
    ranks = [{"rank": r, "gpu": f["gpu"], "backend": f["backend"], "prompts": f["prompts"],
              "generated_tokens": f["generated_tokens"], "busy_seconds": round(f["seconds"], 3),
              "tokens_per_second": round(f["generated_tokens"] / wall, 2) if wall > 0 else 0.0,
              "peak_gpu_memory_bytes": f["peak_gpu_memory_bytes"], "engine": f["engine"]}
             for r, f in sorted(figures.items())]
    peaks = [f["peak_gpu_memory_bytes"] for f in figures.values() if f["peak_gpu_memory_bytes"]]
    record = {"generated_tokens": sum(r["generated_tokens"] for r in ranks), "wall_seconds": wall,
              "backend": f"{figures[0]['backend']} x{size} MPI ranks", "model": str(model_path),
              "steps": sampling.max_tokens, "batch": mo.max_seqs, "mpi_ranks": size, "ranks": ranks}
    finish_getp(plan, options, record, max(peaks) if peaks else None)
    return 0
