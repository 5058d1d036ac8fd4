"""MPI on one GPU (issue 14 item 3): what of the MPI paths one H200 can run.

- The NCCL id through MPI at world size 1: a group communicator of one rank (comm.Split), the id made by
  libnccl on its rank 0 and broadcast by MPI (gptoss.parallel.mpi_group.share_nccl_id), an
  NcclCollective built from it, and an all-gather that returns the rank's partial. (A group of two ranks
  needs two GPUs: NCCL refuses two ranks on one.)
- getp under `mpiexec -n 2` on GPU 0 (more ranks than GPUs share them): each rank one engine, and each
  rank driving 2 replicas in worker processes (4 engines on one GPU); the output equals one engine's.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_run_cli import ids_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = shutil.which("mpiexec", path=os.path.join(sys.prefix, "bin")) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpi4py mpich)")

NCCL_ONE_RANK = """
import cupy
from mpi4py import MPI
from gptoss.parallel.collective import NcclCollective, nccl_unique_id
from gptoss.parallel.mpi_group import share_nccl_id
cupy.cuda.Device(0).use()
group = MPI.COMM_WORLD.Split(color=0, key=MPI.COMM_WORLD.Get_rank())
nccl_id = share_nccl_id(group, nccl_unique_id)
collective = NcclCollective(group.Get_rank(), group.Get_size(), nccl_id)
send = cupy.arange(96, dtype=cupy.float32) * 0.5 + 1
recv = cupy.full(96, cupy.nan, dtype=cupy.float32)
collective.all_gather(send, recv)
cupy.cuda.get_current_stream().synchronize()
assert bool((recv == send).all()), "the gathered partial differs"
collective.close()
print("nccl via mpi ok", len(nccl_id))
"""


def mpiexec(ranks, *command):
    # Open MPI's mpiexec refuses root (CI and containers run as root) unless both variables say yes; MPICH
    # ignores them.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *command], env=env, capture_output=True,
                          text=True, timeout=300)


@needs_mpi
def test_nccl_id_through_mpi_at_world_size_one():
    result = mpiexec(1, "-c", NCCL_ONE_RANK)
    assert result.returncode == 0, result.stderr
    assert "nccl via mpi ok" in result.stdout


@needs_mpi
@pytest.mark.parametrize("flags", [(), ("--data-parallel", "2")])
def test_mpi_getp_on_one_gpu_equals_one_engine(ids_model, tmp_path, flags):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(" ".join(str((7 * i + j) % 500) for j in range(1 + i % 9)) + "\n" for i in range(24)))

    def args(out):
        return [str(ids_model), "-m", "getp", "-i", str(prompts), "-o", str(out), "-n", "8", "--device", "gpu",
                "--input-format", "ids", "--ignore-eos", "-q", "--gpus", "0", "--gpu-memory", "4"]

    one = subprocess.run([sys.executable, str(ROOT / "run.py"), *args(tmp_path / "one.txt")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    ranks = mpiexec(2, str(ROOT / "run.py"), *args(tmp_path / "mpi.txt"), *flags)
    assert ranks.returncode == 0, ranks.stderr
    assert "getp: MPI, 2 ranks on 1 node" in ranks.stderr, ranks.stderr
    assert (tmp_path / "mpi.txt").read_bytes() == (tmp_path / "one.txt").read_bytes()
