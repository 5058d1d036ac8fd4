"""Data parallel getp on the CPU reference (run.py -m getp --data-parallel N --device cpu): N worker
processes fed from one queue give output byte-identical to one worker, greedy and sampled; a worker that
dies stops the run with one line naming it, keeps what finished, and --resume completes the run."""
import json

import numpy as np
import pytest

import run as run_py
from gptoss.getp import partial_path, read_partial
from gptoss.parallel.data import CRASH_ENV, DataParallelOptions, parse_gpus

# Different lengths, so that longest-first reorders them and the replicas share them unevenly.
LENGTHS = (3, 11, 1, 6, 9, 2, 7, 4)


@pytest.fixture
def model(tiny_bin):
    return tiny_bin


@pytest.fixture
def prompts(id_prompts):
    return id_prompts(LENGTHS)


def getp(model, inp, out, *extra):
    return run_py.main([str(model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "4", "--device", "cpu",
                        "--input-format", "ids", "--ignore-eos", "-q", *map(str, extra)])


@pytest.mark.parametrize("replicas, sampling", [(2, ()), (3, ("-t", "1.0", "-s", "7"))],
                         ids=["2-greedy", "3-sampled"])
def test_replicas_give_the_output_of_one_worker(model, prompts, tmp_path, replicas, sampling):
    one, many, record = tmp_path / "one.txt", tmp_path / "many.txt", tmp_path / "many.json"
    assert getp(model, prompts, one, *sampling) == 0
    assert getp(model, prompts, many, "--data-parallel", replicas, "--json", record, *sampling) == 0
    assert many.read_bytes() == one.read_bytes()
    assert len(one.read_text().splitlines()) == len(LENGTHS)
    assert not partial_path(many).exists()
    rec = json.loads(record.read_text())
    assert rec["data_parallel"] == replicas and len(rec["replicas"]) == replicas
    assert [r["replica"] for r in rec["replicas"]] == list(range(replicas))
    assert sum(r["prompts"] for r in rec["replicas"]) == rec["prompts_run"] == len(LENGTHS)
    assert sum(r["generated_tokens"] for r in rec["replicas"]) == rec["generated_tokens"] == 4 * len(LENGTHS)
    assert rec["tokens_per_second"] > 0


def test_a_dead_worker_stops_the_run_and_resume_completes_it(model, prompts, tmp_path, capsys, monkeypatch):
    whole, out, record = tmp_path / "whole.txt", tmp_path / "out.txt", tmp_path / "resumed.json"
    assert getp(model, prompts, whole) == 0
    last = int(np.argmin(LENGTHS))  # the shortest line goes on the queue last
    monkeypatch.setenv(CRASH_ENV, str(last))  # the replica that finishes it exits abruptly
    capsys.readouterr()
    assert getp(model, prompts, out, "--data-parallel", 2) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("run.py: error: replica ") and "stopped (exit status 3)" in err[-1]
    assert not out.exists()
    kept = read_partial(partial_path(out)).done
    assert last in kept  # sent before the worker died
    expected = whole.read_text().splitlines()
    assert all(" ".join(map(str, ids)) == expected[i] for i, ids in kept.items())
    monkeypatch.delenv(CRASH_ENV)
    assert getp(model, prompts, out, "--data-parallel", 2, "--resume", "--json", record) == 0
    assert out.read_bytes() == whole.read_bytes()
    assert json.loads(record.read_text())["prompts_run"] == len(LENGTHS) - len(kept)
    assert not partial_path(out).exists()


def test_one_workers_partial_file_resumes_in_parallel(model, prompts, tmp_path):
    """The partial file is the single-process one: a run started by one worker finishes on two."""
    whole, out = tmp_path / "whole.txt", tmp_path / "out.txt"
    assert getp(model, prompts, whole) == 0
    from gptoss.getp import run_fingerprint
    from gptoss.sampling import SamplingParams

    ids = [[int(t) for t in line.split()] for line in prompts.read_text().splitlines()]
    fp = run_fingerprint(SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), model, ids)
    first = [int(t) for t in whole.read_text().splitlines()[0].split()]
    partial_path(out).write_text(json.dumps({"fingerprint": fp}) + "\n" + json.dumps({"i": 0, "ids": first}) + "\n")
    assert getp(model, prompts, out, "--data-parallel", 2, "--resume") == 0
    assert out.read_bytes() == whole.read_bytes()


def test_bad_parallel_flags_are_one_line_errors(model, prompts, tmp_path, capsys):
    for extra, message in ((("--data-parallel", 0), "--data-parallel must be at least 1 (got 0)"),
                           (("--gpus", "0,1"), "--gpus needs the GPU (this run is on the CPU reference)")):
        assert getp(model, prompts, tmp_path / "o.txt", *extra) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"run.py: error: {message}"
    assert not (tmp_path / "o.txt").exists()


def test_gpu_lists_and_replica_names():
    assert parse_gpus("0,2,3") == (0, 2, 3)
    assert parse_gpus("0-3") == (0, 1, 2, 3)
    assert parse_gpus("4, 0-1") == (4, 0, 1)
    for bad in ("", "a", "1,1", "0-1,1", "-1"):
        with pytest.raises(ValueError):
            parse_gpus(bad)
    dp = DataParallelOptions(replicas=4, device="gpu", gpus=(0, 2, 3))
    assert [dp.gpu_of(r) for r in range(4)] == [0, 2, 3, 0]
    assert dp.name(1) == "replica 1 (GPU 2)"
    assert DataParallelOptions(replicas=2).name(1) == "replica 1 (CPU worker)"
    with pytest.raises(ValueError):
        DataParallelOptions(replicas=2, device="gpu")


def test_a_worker_that_raises_is_named_and_loses_nothing(model, prompts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.txt"
    last = int(np.argmin(LENGTHS))
    monkeypatch.setenv(CRASH_ENV, f"{last}:raise")
    assert getp(model, prompts, out, "--data-parallel", 2) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].endswith(f"(CPU worker) failed: RuntimeError: {CRASH_ENV}: line {last}")
    assert last in read_partial(partial_path(out)).done and not out.exists()


def test_no_more_replicas_than_prompts_left(model, prompts, tmp_path):
    """Resuming a run with one prompt left starts one worker; with none left, none."""
    whole, out, record = tmp_path / "whole.txt", tmp_path / "out.txt", tmp_path / "r.json"
    assert getp(model, prompts, whole, "--data-parallel", 3) == 0
    from gptoss.getp import run_fingerprint
    from gptoss.sampling import SamplingParams

    ids = [[int(t) for t in line.split()] for line in prompts.read_text().splitlines()]
    fp = run_fingerprint(SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), model, ids)
    done = [[int(t) for t in line.split()] for line in whole.read_text().splitlines()]
    for left in (1, 0):
        partial_path(out).write_text("\n".join([json.dumps({"fingerprint": fp})] + [
            json.dumps({"i": i, "ids": done[i]}) for i in range(left, len(done))]) + "\n")
        assert getp(model, prompts, out, "--data-parallel", 3, "--resume", "--json", record, "--force") == 0
        assert out.read_bytes() == whole.read_bytes()
        rec = json.loads(record.read_text())
        assert rec["prompts_run"] == left and rec["data_parallel"] == left and len(rec["replicas"]) == left
        assert rec["generated_tokens"] == 4 * left


def test_the_host_cost_benchmark_runs_every_engine_to_its_end():
    """benchmarks/sim_data_parallel.py: N engines stepped in turn from one process each finish all
    their prompts (every prompt its -n tokens), every step counted once."""
    from benchmarks.sim_data_parallel import one_process
    from gptoss.config import PRESETS

    lengths = np.array([5, 40, 12, 3, 9, 30])
    for replicas in (1, 3):
        host, modeled, steps, generated = one_process(PRESETS["gpt-oss-20b"], lengths, 3, 126.0, replicas)
        assert generated == 3 * len(lengths)
        assert steps >= 3 * replicas and modeled >= host > 0
