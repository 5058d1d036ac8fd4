"""What one MPI rank runs in a getp launch: its share of its node's GPUs, and which of two shapes.

    node shape   the rank drives its share of the node (replicas over its GPUs, as run.py does on one node)
    group shape  the rank is one rank of a tensor-parallel group spanning N MPI ranks (one GPU each)

A rank's share: the node's GPUs (--gpus, else every visible one) split evenly over the ranks on the node
(MPI's shared-memory split): one rank per node gets all of them, one rank per GPU gets one. More ranks
than GPUs share them round robin. On the CPU a rank stands for one device, unless --data-parallel D gives
it D replicas.

The shape follows from N = --tensor-parallel against the share:
- N fits the share (GPU: N <= its GPUs; CPU: N = 1, or --data-parallel given): node shape. The rank runs
  --data-parallel D replicas (default its GPUs / N), each of N GPUs (N processes of its own when N > 1);
  one replica runs in the rank's process, more run in worker processes (gptoss/parallel/data.py).
- N does not fit (GPU: one GPU per rank and N > 1; CPU: N > 1 without --data-parallel): group shape.
  World ranks [g N, (g+1) N) form group g; its first rank runs the engine, the others its forward.
"""
from __future__ import annotations

from dataclasses import dataclass

NODE, GROUP = "node", "group"


@dataclass(frozen=True)
class RankLayout:
    """shape: NODE or GROUP. gpus: the GPUs the rank drives (GROUP: its one GPU; () on the CPU).
    replicas: NODE: the engine replicas it runs; GROUP: 1. tensor_parallel: N. group, group_rank: GROUP:
    its group (world rank // N) and its rank in it (0 = the leader, which runs the engine); NODE: its world
    rank, 0."""
    shape: str
    gpus: tuple[int, ...]
    replicas: int
    tensor_parallel: int
    group: int
    group_rank: int

    @property
    def leader(self) -> bool:
        """Whether this rank runs an engine (and so takes prompts from rank 0's schedule)."""
        return self.group_rank == 0


def node_share(gpus: tuple[int, ...], local_rank: int, local_size: int) -> tuple[int, ...]:
    """The GPUs of the node this rank drives: an even split over the node's ranks (ValueError when the
    ranks do not divide the GPUs); with as many ranks as GPUs or more, one each, round robin."""
    g = len(gpus)
    if local_size >= g:
        return (gpus[local_rank % g],)
    if g % local_size:
        raise ValueError(f"{local_size} MPI ranks on a node must divide its {g} GPUs evenly "
                         f"({','.join(map(str, gpus))}); pick them with --gpus, or launch 1 rank per node or per GPU")
    share = g // local_size
    return gpus[local_rank * share:(local_rank + 1) * share]


def replicas_over(gpus: tuple[int, ...], tensor_parallel: int, data_parallel: int | None, holder: str) -> int:
    """The data-parallel replicas of N = tensor_parallel GPUs each over `gpus`: --data-parallel D, else as
    many as fit. ValueError, one line, when N does not divide the GPUs or D x N exceed them (at N = 1
    replicas may share a GPU); `holder` names whose GPUs they are ("the chosen", "a rank's")."""
    n, d = tensor_parallel, data_parallel
    if len(gpus) % n:
        raise ValueError(f"--tensor-parallel {n} must divide {holder} {len(gpus)} GPUs ({','.join(map(str, gpus))})")
    if n > 1 and d is not None and d * n > len(gpus):
        raise ValueError(f"--data-parallel {d} x --tensor-parallel {n} needs {d * n} GPUs; {holder} are {len(gpus)}")
    return d or len(gpus) // n


def rank_layout(world_rank: int, world_size: int, local_rank: int, local_size: int, device: str,
                gpus: tuple[int, ...], tensor_parallel: int = 1, data_parallel: int | None = None) -> RankLayout:
    """This rank's layout (see the module's doc); ValueError, one line, for a launch that cannot work."""
    n, d = tensor_parallel, data_parallel
    if device == "gpu":
        share = node_share(gpus, local_rank, local_size)
        spans = n > len(share)
        if spans and len(share) > 1:
            raise ValueError(f"--tensor-parallel {n} does not fit a rank's {len(share)} GPUs, and a group "
                             "spanning MPI ranks needs one rank per GPU")
    else:
        share = ()
        spans = n > 1 and d is None
    if not spans:
        replicas = replicas_over(share, n, d, "a rank's") if share else (d or 1)
        return RankLayout(NODE, share, replicas, n, world_rank, 0)
    if d is not None:
        raise ValueError(f"--data-parallel is per rank; with --tensor-parallel {n} spanning MPI ranks each rank "
                         "is one rank of a group")
    if world_size % n:
        raise ValueError(f"--tensor-parallel {n} across MPI ranks needs a multiple of {n} ranks (got {world_size})")
    return RankLayout(GROUP, share, 1, n, world_rank // n, world_rank % n)


def describe(layouts: list[RankLayout], nodes: int) -> str:
    """One line for the user: how many ranks, on how many nodes, in which shape."""
    first = layouts[0]
    head = f"getp: MPI, {len(layouts)} ranks on {nodes} node{'s' if nodes > 1 else ''}"
    n = first.tensor_parallel
    if first.shape == GROUP:
        where = "one GPU each" if first.gpus else "the CPU reference"
        groups = len(layouts) // n
        return (f"{head}: {groups} tensor-parallel group{'s' if groups > 1 else ''} of {n} ranks ({where}); "
                "each group's first rank runs its engine")
    unit = f"{n} GPUs" if first.gpus and n > 1 else ("1 GPU" if first.gpus else
                                                    (f"{n} CPU ranks" if n > 1 else "the CPU reference"))
    counts = sorted({lay.replicas for lay in layouts})
    many = "/".join(map(str, counts))
    return f"{head}: each rank drives {many} replica{'s' if counts[-1] > 1 else ''} of {unit}"
