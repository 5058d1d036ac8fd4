"""getp across MPI ranks on the CPU reference (gptoss/parallel/mpi.py): `mpiexec -n 2` and `-n 3` give
output byte-identical to one engine, rank 0 writes it with a record per rank, --resume continues a
partial file under MPI, and without a launcher mpi4py is never imported."""
import json
import os
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
from gptoss.parallel.mpi import RAISE_ENV, mpi_world_size
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


def mpiexec(ranks, args, **extra_env):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra_env)
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(ROOT / "run.py"), *args], env=env,
                          capture_output=True, text=True, timeout=120)


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
def test_each_rank_runs_a_tensor_parallel_engine(files, tmp_path):
    """mpiexec -n 2 with --tensor-parallel 2: each MPI rank splits its engine over 2 processes of the
    sharded reference; the greedy tokens are one engine's (see tests/test_tp_cpu.py)."""
    d, whole = files
    out = tmp_path / "out.txt"
    done = mpiexec(2, getp_args(d, out, "--tensor-parallel", 2))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == whole.read_bytes()


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
    errors = [line for line in failed.stderr.splitlines() if line.startswith("run.py: error:")]
    assert errors == [f"run.py: error: MPI rank 1 failed: RuntimeError: {RAISE_ENV}: after line "
                      f"{errors[0].rsplit(' ', 1)[-1]}"]
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
    errors = [line for line in result.stderr.splitlines() if line.startswith("run.py: error:")]
    assert len(errors) == 1 and "line 2" in errors[0]
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
