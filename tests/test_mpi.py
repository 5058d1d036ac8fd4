"""getp across MPI ranks on the CPU reference (gptoss/parallel/mpi.py), in both launch shapes
(gptoss/parallel/mpi_layout.py): ranks each running an engine (`mpiexec -n 2` and `-n 3`), ranks each
driving 2 data-parallel workers, a tensor-parallel group spanning 2 MPI ranks (and 2 groups of 2), ranks
each running a group of their own processes. Each output is byte-identical to one engine, rank 0 writes
it with a record per rank; --resume continues a partial file across launch shapes; a failing rank,
replica or group rank is one line naming it; the NCCL id reaches every member of a group through MPI's
bcast; without a launcher mpi4py is never imported."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import run as run_py
from gptoss.config import TINY
from gptoss.getp import partial_path, run_fingerprint
from gptoss.getp import read_partial
from gptoss.parallel.data import CRASH_ENV
from gptoss.parallel.mpi import RAISE_ENV, mpi_world_size
from gptoss.parallel.mpi_layout import GROUP, NODE, RankLayout, rank_layout
from gptoss.parallel.tp_runner import RAISE_ENV as TP_RAISE_ENV
from gptoss.sampling import SamplingParams

ROOT = Path(run_py.__file__).resolve().parent
LENGTHS = (3, 11, 1, 6, 9, 2, 7, 4)
MPIEXEC = shutil.which("mpiexec", path=os.path.join(sys.prefix, "bin")) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpi4py mpich)")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gptoss.weights import random_weights, write_bin

    d = tmp_path_factory.mktemp("mpi")
    write_bin(d / "tiny.bin", random_weights(TINY, "mxfp4", seed=5))
    rng = np.random.default_rng(1)
    (d / "prompts.txt").write_text("".join(" ".join(map(str, rng.integers(0, TINY.vocab_size, n))) + "\n"
                                           for n in LENGTHS))
    whole = d / "whole.txt"
    assert run_py.main(getp_args(d, whole)) == 0  # one engine, in this process
    return d, whole


def getp_args(d, out, *extra):
    return [str(d / "tiny.bin"), "-m", "getp", "-i", str(d / "prompts.txt"), "-o", str(out), "-n", "4",
            "--device", "cpu", "--input-format", "ids", "--ignore-eos", "-q", *map(str, extra)]


def mpiexec(ranks, args, script=None, **extra_env):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra_env)
    command = ["-c", script] if script else [str(ROOT / "run.py"), *args]
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *command], env=env,
                          capture_output=True, text=True, timeout=120)


def error_lines(result):
    """The `run.py: error:` lines of a launch. mpiexec forwards each rank's stderr in chunks, so under load
    another rank's unfinished line can precede the error on the same line: each is taken from its start."""
    mark = "run.py: error:"
    return [line[line.index(mark):] for line in result.stderr.splitlines() if mark in line]


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_give_the_output_of_one_engine(files, tmp_path, ranks):
    d, whole = files
    out, record = tmp_path / "out.txt", tmp_path / "out.json"
    done = mpiexec(ranks, getp_args(d, out, "--json", record))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert not partial_path(out).exists()
    rec = json.loads(record.read_text())
    assert rec["mpi_ranks"] == ranks and [r["rank"] for r in rec["ranks"]] == list(range(ranks))
    assert sum(r["prompts"] for r in rec["ranks"]) == rec["prompts_run"] == len(LENGTHS)
    assert sum(r["generated_tokens"] for r in rec["ranks"]) == rec["generated_tokens"] == 4 * len(LENGTHS)


@needs_mpi
def test_each_rank_drives_two_data_parallel_workers(files, tmp_path):
    """The node shape with replicas: each of 2 ranks feeds 2 worker processes (data.py's ReplicaPool)."""
    d, whole = files
    out, record = tmp_path / "out.txt", tmp_path / "out.json"
    done = mpiexec(2, getp_args(d, out, "--data-parallel", 2, "--json", record))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert "each rank drives 2 replicas" in done.stderr
    rec = json.loads(record.read_text())
    assert rec["mpi_shape"] == NODE and [r["rank"] for r in rec["ranks"]] == [0, 1]
    assert [[x["replica"] for x in r["replicas"]] for r in rec["ranks"]] == [[0, 1], [0, 1]]
    assert sum(x["prompts"] for r in rec["ranks"] for x in r["replicas"]) == len(LENGTHS)
    assert sum(r["generated_tokens"] for r in rec["ranks"]) == rec["generated_tokens"] == 4 * len(LENGTHS)


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_a_tensor_parallel_group_spans_mpi_ranks(files, tmp_path, ranks):
    """mpiexec -n R --tensor-parallel 2: R/2 groups of 2 MPI ranks, each group's rank 0 runs the engine and
    the schedule; the greedy tokens are one engine's (the sharded sums decide no argmax on this model,
    see tests/test_tp_cpu.py)."""
    d, whole = files
    out, record = tmp_path / "out.txt", tmp_path / "out.json"
    done = mpiexec(ranks, getp_args(d, out, "--tensor-parallel", 2, "--json", record))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == whole.read_bytes()
    rec = json.loads(record.read_text())
    assert rec["mpi_shape"] == GROUP and rec["mpi_ranks"] == ranks
    assert [r["group_ranks"] for r in rec["ranks"]] == [[g, g + 1] for g in range(0, ranks, 2)]
    assert sum(r["prompts"] for r in rec["ranks"]) == len(LENGTHS)


@needs_mpi
def test_each_rank_runs_a_group_of_its_own(files, tmp_path):
    """--data-parallel 1 keeps the group inside each rank: 2 ranks x (1 replica of 2 processes)."""
    d, whole = files
    out, record = tmp_path / "out.txt", tmp_path / "out.json"
    done = mpiexec(2, getp_args(d, out, "--tensor-parallel", 2, "--data-parallel", 1, "--json", record))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert json.loads(record.read_text())["mpi_shape"] == NODE


@needs_mpi
def test_a_failing_group_rank_is_one_line(files, tmp_path):
    d, _ = files
    failed = mpiexec(2, getp_args(d, tmp_path / "out.txt", "--tensor-parallel", 2), **{TP_RAISE_ENV: "1"})
    assert failed.returncode != 0
    assert len(error_lines(failed)) == 1
    assert re.fullmatch(r"run\.py: error: MPI rank 0 on \S+ failed: TensorParallelError: tensor-parallel rank 1 "
                        rf"\(MPI rank 1 on \S+\) failed: RuntimeError: {TP_RAISE_ENV}: rank 1", error_lines(failed)[0])


@needs_mpi
def test_resume_under_mpi_runs_only_what_is_left(files, tmp_path):
    d, whole = files
    out, record = tmp_path / "out.txt", tmp_path / "out.json"
    ids = [[int(t) for t in line.split()] for line in (d / "prompts.txt").read_text().splitlines()]
    fp = run_fingerprint(SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), d / "tiny.bin", ids)
    done = [[int(t) for t in line.split()] for line in whole.read_text().splitlines()]
    kept = (0, 4, 5)
    partial_path(out).write_text("\n".join([json.dumps({"fingerprint": fp})] + [
        json.dumps({"i": i, "ids": done[i]}) for i in kept]) + "\n")
    result = mpiexec(2, getp_args(d, out, "--resume", "--json", record))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert json.loads(record.read_text())["prompts_run"] == len(LENGTHS) - len(kept)


@needs_mpi
def test_a_failed_rank_is_named_and_resume_loses_nothing(files, tmp_path):
    d, whole = files
    out = tmp_path / "out.txt"
    failed = mpiexec(2, getp_args(d, out), **{RAISE_ENV: "1"})  # rank 1 raises after its first prompt
    assert failed.returncode != 0
    errors = error_lines(failed)
    assert len(errors) == 1
    assert re.fullmatch(rf"run\.py: error: MPI rank 1 on \S+ failed: RuntimeError: {RAISE_ENV}: after line \d+",
                        errors[0])
    assert not out.exists()
    kept = read_partial(partial_path(out)).done
    assert int(errors[0].rsplit(" ", 1)[-1]) in kept  # sent before it raised
    expected = whole.read_text().splitlines()
    assert all(" ".join(map(str, ids)) == expected[i] for i, ids in kept.items())
    resumed = mpiexec(2, getp_args(d, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == whole.read_bytes()


@needs_mpi
def test_bad_input_under_mpi_is_one_line_from_rank_0(files, tmp_path):
    d, _ = files
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\nnot ids\n")
    args = getp_args(d, tmp_path / "o.txt")
    args[args.index("-i") + 1] = str(bad)
    result = mpiexec(2, args)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1 and "line 2" in errors[0]
    assert not (tmp_path / "o.txt").exists()


@needs_mpi
def test_a_failing_replica_names_rank_and_replica_and_resume_across_shapes(files, tmp_path):
    """A worker of a rank's pool raises after sending line 3: one line naming the rank, the replica and
    where it runs; line 3 is kept; --resume in the group shape, then nothing is run twice."""
    d, whole = files
    out, record = tmp_path / "out.txt", tmp_path / "out.json"
    failed = mpiexec(2, getp_args(d, out, "--data-parallel", 2), **{CRASH_ENV: "3:raise"})
    assert failed.returncode != 0
    errors = error_lines(failed)
    assert len(errors) == 1
    assert re.fullmatch(rf"run\.py: error: MPI rank [01] on \S+, replica [01] \(CPU worker\) failed: "
                        rf"RuntimeError: {CRASH_ENV}: line 3", errors[0])
    kept = read_partial(partial_path(out)).done
    assert 3 in kept
    expected = whole.read_text().splitlines()
    assert all(" ".join(map(str, ids)) == expected[i] for i, ids in kept.items())
    resumed = mpiexec(2, getp_args(d, out, "--resume", "--tensor-parallel", 2, "--json", record))
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert json.loads(record.read_text())["prompts_run"] == len(LENGTHS) - len(kept)


NCCL_ID_CHECK = """
import os
from mpi4py import MPI
from gptoss.parallel.mpi_group import share_nccl_id
world = MPI.COMM_WORLD
group = world.Split(color=world.Get_rank() // 2, key=world.Get_rank())
made = []
def fake_id():  # a new id each call, as ncclGetUniqueId's are (128 bytes)
    made.append(os.urandom(128))
    return made[-1]
got = share_nccl_id(group, fake_id)
assert len(made) == (1 if group.Get_rank() == 0 else 0), made
assert len(got) == 128
assert len(set(group.allgather(got))) == 1, "the members of a group hold different ids"
ids = world.gather(got, root=0)
if world.Get_rank() == 0:
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2], "groups share ids"
    print("ids ok")
"""


@needs_mpi
def test_the_nccl_id_reaches_every_member_of_its_group_through_mpi():
    """Two groups of 2 ranks: rank 0 of each makes an id (a fake when no libnccl is here), MPI's bcast
    gives its members the same bytes, and the two groups have their own."""
    result = mpiexec(4, None, script=NCCL_ID_CHECK)
    assert result.returncode == 0, result.stderr
    assert "ids ok" in result.stdout


@pytest.mark.parametrize("gpus, local, flags, expected", [
    # one rank per node drives all 8 GPUs: 8 replicas, or 4 replicas of 2 with --tensor-parallel 2
    ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1), (1, None), RankLayout(NODE, (0, 1, 2, 3, 4, 5, 6, 7), 8, 1, 5, 0)),
    ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1), (2, None), RankLayout(NODE, (0, 1, 2, 3, 4, 5, 6, 7), 4, 2, 5, 0)),
    ((0, 1, 2, 3, 4, 5, 6, 7), (0, 1), (2, 1), RankLayout(NODE, (0, 1, 2, 3, 4, 5, 6, 7), 1, 2, 5, 0)),
    # one rank per GPU: one engine each (the rank's GPU), or groups of 2 ranks spanning MPI ranks
    ((0, 1, 2, 3, 4, 5, 6, 7), (3, 8), (1, None), RankLayout(NODE, (3,), 1, 1, 5, 0)),
    ((0, 1, 2, 3, 4, 5, 6, 7), (3, 8), (2, None), RankLayout(GROUP, (3,), 1, 2, 2, 1)),
    # two ranks per node: half the GPUs each
    ((0, 1, 2, 3), (1, 2), (1, None), RankLayout(NODE, (2, 3), 2, 1, 5, 0)),
    # more ranks than GPUs share them round robin (e.g. 2 engines on the one H200)
    ((0,), (1, 2), (1, None), RankLayout(NODE, (0,), 1, 1, 5, 0)),
])
def test_rank_layouts_on_gpus(gpus, local, flags, expected):
    assert rank_layout(5, 6, local[0], local[1], "gpu", gpus, *flags) == expected


def test_rank_layouts_on_the_cpu_and_bad_launches():
    assert rank_layout(1, 2, 1, 2, "cpu", (), 1, None) == RankLayout(NODE, (), 1, 1, 1, 0)
    assert rank_layout(1, 2, 1, 2, "cpu", (), 1, 2) == RankLayout(NODE, (), 2, 1, 1, 0)
    assert rank_layout(3, 4, 3, 4, "cpu", (), 2, None) == RankLayout(GROUP, (), 1, 2, 1, 1)
    assert rank_layout(1, 2, 1, 2, "cpu", (), 2, 1) == RankLayout(NODE, (), 1, 2, 1, 0)
    with pytest.raises(ValueError, match="3 MPI ranks on a node must divide its 8 GPUs"):
        rank_layout(0, 3, 0, 3, "gpu", tuple(range(8)), 1, None)
    with pytest.raises(ValueError, match="multiple of 2 ranks"):
        rank_layout(0, 3, 0, 3, "cpu", (), 2, None)
    with pytest.raises(ValueError, match="needs one rank per GPU"):
        rank_layout(0, 4, 0, 4, "gpu", tuple(range(8)), 4, None)
    with pytest.raises(ValueError, match="--data-parallel is per rank"):
        rank_layout(0, 8, 0, 8, "gpu", tuple(range(8)), 2, 1)
    with pytest.raises(ValueError, match="needs 6 GPUs; a rank's are 4"):
        rank_layout(0, 2, 0, 2, "gpu", tuple(range(8)), 2, 3)


@needs_mpi
def test_a_launch_that_cannot_work_is_one_line(files, tmp_path):
    d, _ = files
    result = mpiexec(3, getp_args(d, tmp_path / "o.txt", "--tensor-parallel", 2))
    assert result.returncode != 0
    assert error_lines(result) == ["run.py: error: MPI rank 0 on " + error_lines(result)[0].split(" on ", 1)[1]]
    assert "needs a multiple of 2 ranks (got 3)" in error_lines(result)[0]
    assert not (tmp_path / "o.txt").exists()


def test_the_launcher_is_found_in_the_environment():
    assert mpi_world_size({}) == 1
    assert mpi_world_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert mpi_world_size({"PMI_SIZE": "2"}) == 2
    assert mpi_world_size({"PMI_SIZE": ""}) == 1


def test_without_a_launcher_mpi4py_is_not_imported(files, tmp_path):
    d, _ = files
    code = ("import sys, run; status = run.main(sys.argv[1:]); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; sys.exit(status)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    result = subprocess.run([sys.executable, "-c", code, *getp_args(d, tmp_path / "o.txt")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@needs_mpi
def test_a_launcher_mpi4py_does_not_belong_to_is_one_line(files, tmp_path):
    """The launcher's environment says 2 ranks but mpi4py's MPI sees a world of 1 (another MPI's mpiexec):
    one error line, instead of every rank running the whole job."""
    d, _ = files
    out = tmp_path / "out.txt"
    env = dict(os.environ, PMI_SIZE="2",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *getp_args(d, out)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert error_lines(result) and "the launcher started 2 ranks but MPI.COMM_WORLD has 1" in error_lines(result)[0]
    assert not out.exists()
