"""getp over MPI ranks, for more than one node: prompts from rank 0's queue, output written by rank 0.

    mpirun -n 2 --map-by ppr:1:node python run.py MODEL -m getp -i p.txt -o out.txt   # a rank per node
    mpirun -n 16 python run.py MODEL -m getp -i p.txt -o out.txt                      # a rank per GPU
    mpirun -n 16 python run.py MODEL -m getp -i p.txt -o out.txt --tensor-parallel 2  # 8 groups of 2 ranks
    mpiexec -n 2 python run.py MODEL -m getp -i p.txt -o out.txt --device cpu --data-parallel 2

What each rank runs (gptoss/parallel/mpi_layout.py): in the node shape, its share of its node's GPUs
(all of them with one rank per node, one with one rank per GPU) as on one node: one engine in its own
process, or --data-parallel replicas in worker processes (gptoss/parallel/data.py's ReplicaPool). In the
group shape, N ranks are one tensor-parallel engine (gptoss/parallel/mpi_group.py): the group's first
rank runs it, the others run its forward.

Rank 0 reads and tokenizes the prompts, opens OUTPUT.partial (the single-process format and
fingerprint: a run started any way resumes any other way) and keeps the queue of prompts to run, longest
first. Every engine-running rank, rank 0 included, asks rank 0 for as many prompts as its engines have
free slots (and keeps stepping what it holds while the answer comes), and sends each finished prompt
back. Rank 0 appends finished prompts to OUTPUT.partial, drives the one progress bar, and writes OUTPUT
atomically in input order. A prompt's draws use its input line as the sampler's sequence id and its
tokens do not depend on its batch, so the output is byte-identical to one engine's. A rank that fails
sends one line naming itself (rank, node, replica, GPU); rank 0 keeps what finished, says it, and aborts
the job (MPI_Abort), after which `--resume` continues.

mpi4py is imported only when an MPI launcher started this process (see mpi_world_size).
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..errors import GptossError, one_line
from .data import DataParallelOptions, LocalEngine, ReplicaError, ReplicaPool, ReplicaSettings, replica_llm, \
    replica_record
from .mpi_layout import GROUP, RankLayout, describe, rank_layout

# What launchers set in each rank's environment: Open MPI; MPICH's Hydra, Intel MPI and Slurm's PMI.
WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
TO_ROOT, TASKS = 1, 2  # message tags: a rank's messages to rank 0; rank 0's answers with prompts
# Test hook: "R" makes rank R (not 0) raise right after sending its first finished prompt.
RAISE_ENV = "GPTOSS_TEST_MPI_RANK_RAISE"


class MpiLaunchError(GptossError, ValueError):
    """The launch cannot work (ranks against GPUs, --tensor-parallel against ranks); one line."""


class RankFailed(ReplicaError):
    """Another rank failed; its one line (naming it) is the message."""


def mpi_world_size(environ=os.environ) -> int:
    """How many ranks an MPI launcher started (1 when none did), from the environment alone."""
    for var in WORLD_SIZE_VARS:
        value = environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


@dataclass(frozen=True)
class MpiOptions:
    """device: "cpu" or "gpu"; gpus: the node's GPUs (--gpus, else every visible one), shared out over the
    node's ranks; tensor_parallel, data_parallel: run.py's flags (see mpi_layout); settings: what each
    engine's LLM is built with."""
    device: str = "cpu"
    gpus: tuple[int, ...] = ()
    tensor_parallel: int = 1
    data_parallel: int | None = None
    settings: ReplicaSettings = ReplicaSettings()


def _where(rank: int, host: str, layout: RankLayout) -> str:
    """How a rank is named in errors: its MPI rank, node and, when it runs one engine, its GPUs."""
    gpus = layout.gpus[:layout.tensor_parallel] if layout.replicas == 1 else ()
    return f"MPI rank {rank} on {host}" + (f" (GPU{'s' if len(gpus) > 1 else ''} {','.join(map(str, gpus))})"
                                           if gpus else "")


def _failure(e: BaseException, where: str) -> str:
    """One line: the rank, then (when a worker process failed) the replica and its GPUs, then what."""
    if isinstance(e, ReplicaError) and e.who:
        return f"{where}, {e.who} {e.what}"
    return f"{where} failed: {one_line(e)}"


def _unit(model_path, mo: MpiOptions, layout: RankLayout, sampling, peers):
    """What a rank drives: one engine in its process (LocalEngine) or its replicas' workers (ReplicaPool)."""
    n = layout.tensor_parallel
    if layout.replicas > 1:
        dp = DataParallelOptions(replicas=layout.replicas, device=mo.device, gpus=layout.gpus, tensor_parallel=n,
                                 settings=mo.settings)
        return ReplicaPool(model_path, dp, sampling, wait=0.02)
    gpus = (peers.gpus if peers is not None else layout.gpus[:n]) or None
    llm = replica_llm(model_path, mo.device, gpus[0] if gpus else None, mo.settings, n, gpus, tp_peers=peers)
    return LocalEngine(llm, sampling, mo.settings.inflight(mo.device), gpus)


def _drive(unit, take, give, between) -> None:
    """Feed `unit` (LocalEngine or ReplicaPool) until `take` has no more prompts and it has finished.

    take(n, block) -> up to n (line, ids) tasks, [] once there are no more, or None when none is ready
    yet (only when not block). give(line, ids) gets each finished prompt. between() runs after every
    advance (an engine step, or a wait on the workers)."""
    no_more = False
    while not (no_more and unit.done):
        free = unit.free()
        if not no_more and free > 0:
            tasks = take(free, not unit.in_flight())  # blocks only when this rank has nothing to do
            if tasks == []:
                no_more = True
                unit.end()
            elif tasks:
                unit.add(tasks)
        unit.advance(give)
        between()


def run_getp_mpi(model_path, options, mo: MpiOptions, sampling) -> int:
    """getp (gptoss.getp.run_getp's files, output and record) over the ranks of MPI.COMM_WORLD. Every
    rank calls it; rank 0 writes the output. On rank 0: GetpError for bad input, MpiLaunchError for a
    launch that cannot work (the other ranks return 2), ReplicaError when a rank fails (after which the
    caller aborts the job)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    launched = mpi_world_size()
    if size != launched:  # every rank is a world of its own: each would run the whole job
        raise MpiLaunchError(f"the launcher started {launched} ranks but MPI.COMM_WORLD has {size}: mpi4py is "
                             f"built for another MPI than this mpiexec ({' '.join(MPI.Get_library_version().split()[:3])}); "
                             "launch with the mpiexec of that MPI, or pip install mpi4py mpich and use its mpiexec")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this rank's node
    host = MPI.Get_processor_name()
    try:
        layout, problem = rank_layout(rank, size, node.Get_rank(), node.Get_size(), mo.device, mo.gpus,
                                      mo.tensor_parallel, mo.data_parallel), None
    except ValueError as e:
        layout, problem = None, f"MPI rank {rank} on {host}: {e}"
    everyone = comm.gather((layout, problem, host), root=0)
    plan, error = None, None
    if rank == 0:
        layouts = [lay for lay, _, _ in everyone]
        problems = [p for _, p, _ in everyone if p]
        if problems:
            error = MpiLaunchError(problems[0])
        elif len({lay.shape for lay in layouts}) > 1:
            error = MpiLaunchError(f"the nodes differ: --tensor-parallel {mo.tensor_parallel} spans ranks on some "
                                   "and not on others; give every node the same GPUs")
        else:
            error, plan = _plan(model_path, options, sampling, mo.settings.kv_cache_dtype)
    if comm.bcast(error is not None, root=0):
        if rank == 0:
            raise error
        return 2
    peers = None
    if layout.shape == GROUP:
        from .mpi_group import MpiPeers, follow_over_mpi, join_group

        gpu = layout.gpus[0] if layout.gpus else None
        group, nccl_id, members = join_group(comm, layout.group, mo.device, gpu, host)
        if not layout.leader:
            follow_over_mpi(group, nccl_id, gpu)
            return 0
        peers = MpiPeers(group, nccl_id, members)
    where = _where(rank, host, layout)
    make_unit = lambda: _unit(model_path, mo, layout, sampling, peers)  # noqa: E731
    if rank != 0:
        _serve_root(comm, make_unit, where)
        return 0
    hosts = [h for _, _, h in everyone]
    print(describe(layouts, len(set(hosts))), file=sys.stderr)  # which launch shape this command got
    return _root(comm, plan, layouts, hosts, make_unit, where, model_path, options, mo, sampling)


def _plan(model_path, options, sampling, kv_cache_dtype: str):
    """(error, plan): rank 0 reads and tokenizes the prompts, opens OUTPUT.partial."""
    from ..getp import plan_getp
    from ..tokenizer import tokenizer_from_option
    from ..weights import open_weights

    try:
        cfg = open_weights(model_path).config
        local = model_path if isinstance(model_path, Path) else None
        return None, plan_getp(cfg, model_path, lambda: tokenizer_from_option(options.tokenizer, local), options,
                               sampling, kv_cache_dtype)
    except BaseException as e:  # noqa: BLE001 (told to every rank, raised on rank 0)
        return e, None


def _serve_root(comm, make_unit, where: str) -> None:
    """An engine-running rank other than 0: ask rank 0 for prompts, run them, send them back, then its
    figures; or one line saying what failed."""
    unit = None
    try:
        unit = make_unit()
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

        _drive(unit, take, give, lambda: None)
        comm.send(("finished", unit.figures()), dest=0, tag=TO_ROOT)
    except BaseException as e:  # noqa: BLE001 (rank 0 says what stopped, then aborts the job)
        comm.send(("failed", _failure(e, where)), dest=0, tag=TO_ROOT)
    finally:
        if unit is not None:
            unit.close()


def _root(comm, plan, layouts, hosts, make_unit, where, model_path, options, mo: MpiOptions, sampling) -> int:
    """Rank 0: serve the queue to the other engine-running ranks between its own unit's advances; write
    the output."""
    from mpi4py import MPI

    from ..getp import finish_getp
    from ..progress import GetpProgress

    pending = deque(sorted(plan.todo, key=lambda n: -len(plan.prompts[n])))  # longest first (stable)
    engines = [r for r, lay in enumerate(layouts) if lay.leader]
    figures: dict[int, list] = {}
    answers = []  # rank 0 answers without blocking: a rank may be sending it a finished prompt meanwhile
    n = len(plan.prompts)
    start = time.perf_counter()
    unit = None
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
                        answers.append(comm.isend(take(rest[0]), dest=src, tag=TASKS))
                    elif kind == "done":
                        finished(*rest)
                    elif kind == "finished":
                        figures[src] = rest[0]
                    else:
                        raise RankFailed(rest[0])

            unit = make_unit()
            _drive(unit, take, finished, lambda: serve(False))
            figures[0] = unit.figures()
            while len(figures) < len(engines):
                serve(True)
            MPI.Request.Waitall(answers)
    except BaseException as e:  # said in one line; the caller stops the other ranks (MPI_Abort)
        plan.partial.close()  # what finished is kept for --resume
        if isinstance(e, RankFailed):
            raise
        raise ReplicaError(_failure(e, where)) from e
    finally:
        if unit is not None:
            unit.close()
    wall = time.perf_counter() - start
    plan.partial.close()
    ranks = []
    for r in sorted(figures):
        replicas = [replica_record(f, wall) for f in figures[r]]
        generated = sum(x["generated_tokens"] for x in replicas)
        ranks.append({"rank": r, "node": hosts[r], "gpus": list(layouts[r].gpus) or None,
                      "group_ranks": list(range(r, r + layouts[r].tensor_parallel)) if layouts[r].shape == GROUP
                      else None,
                      "backend": replicas[0]["backend"], "prompts": sum(x["prompts"] for x in replicas),
                      "generated_tokens": generated, "busy_seconds": max(x["busy_seconds"] for x in replicas),
                      "tokens_per_second": round(generated / wall, 2) if wall > 0 else 0.0, "replicas": replicas})
    peaks = [x["peak_gpu_memory_bytes"] for r in ranks for x in r["replicas"] if x["peak_gpu_memory_bytes"]]
    record = {"generated_tokens": sum(r["generated_tokens"] for r in ranks), "wall_seconds": wall,
              "backend": f"{ranks[0]['backend']} x{len(engines)} MPI engine ranks", "model": str(model_path),
              "steps": sampling.max_tokens, "batch": mo.settings.max_seqs, "mpi_ranks": len(layouts),
              "mpi_shape": layouts[0].shape, "tensor_parallel": mo.tensor_parallel,
              "nodes": len(set(hosts)), "ranks": ranks}
    finish_getp(plan, options, record, max(peaks) if peaks else None)
    return 0
