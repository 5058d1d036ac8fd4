"""run.py's three modes and decode.py on tiny synthetic models, on the CPU reference."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptoss.config import TINY, TINY_CHAT

ROOT = Path(__file__).resolve().parent.parent


def run(*args, stdin=None, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """tiny-chat (real vocabulary) exported to .bin."""
    from gptoss.weights import write_hf_checkpoint

    d = tmp_path_factory.mktemp("tiny_chat")
    write_hf_checkpoint(TINY_CHAT, d / "hf", experts="mxfp4", seed=3)
    run("export/export_model_bin.py", "--model", str(d / "hf"), "--output", str(d / "model.bin"))
    return d / "model.bin"


@pytest.fixture(scope="module")
def ids_model(tmp_path_factory):
    """tiny (512-token vocabulary) as a Hugging Face directory with bf16 experts."""
    from gptoss.weights import write_hf_checkpoint

    d = tmp_path_factory.mktemp("tiny_ids")
    write_hf_checkpoint(TINY, d, experts="bf16", seed=4)
    return d


def test_generate_streams_text(chat_model):
    proc = run("run.py", str(chat_model), "-m", "generate", "-p", "Hello there", "-n", "6", "--device", "cpu",
               "-t", "0.8", "-s", "5")
    assert proc.stdout.startswith("Hello there")
    assert len(proc.stdout) > len("Hello there")
    assert "generated" in proc.stderr


def test_synthetic_model_runs_with_the_shipped_vocabulary(tmp_path):
    """synthetic:PRESET (random weights made in memory; what the benchmarks run) has no folder to find a
    tokenizer next to: text modes take the shipped vocabulary, getp's ids need none."""
    proc = run("run.py", "synthetic:tiny-chat", "-m", "generate", "-p", "Hi", "-n", "3", "--device", "cpu",
               "-t", "0")
    assert proc.stdout.startswith("Hi") and len(proc.stdout) > len("Hi")
    prompts = tmp_path / "p.txt"
    prompts.write_text("1 2 3\n4 5\n")
    run("run.py", "synthetic:tiny", "-m", "getp", "-i", str(prompts), "-o", str(tmp_path / "o.txt"), "-n", "2",
        "--input-format", "ids", "--ignore-eos", "--device", "cpu")
    assert [len(line.split()) for line in (tmp_path / "o.txt").read_text().splitlines()] == [2, 2]


def test_chat_one_turn_from_stdin(chat_model):
    proc = run("run.py", str(chat_model), "-m", "chat", "-n", "5", "--device", "cpu", stdin="Hi!\n")
    assert "generated" in proc.stderr


def test_getp_matches_the_reference_greedy(ids_model, tmp_path):
    from gptoss.weights import open_weights
    from gptoss.reference import ReferenceModel, greedy_generate

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (3, 17, 1, 9)]
    inp = tmp_path / "prompts.txt"
    inp.write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    out = tmp_path / "out.txt"
    stats = tmp_path / "stats.json"
    run("run.py", str(ids_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "5", "--device", "cpu",
        "--input-format", "ids", "--ignore-eos", "--json", str(stats), "-q")
    lines = out.read_text().splitlines()
    assert len(lines) == len(prompts)
    model = ReferenceModel(open_weights(ids_model))
    for prompt, line in zip(prompts, lines):  # (the CPU engine feeds the reference one token at a time)
        assert [int(t) for t in line.split()] == greedy_generate(model, prompt, 5, one_at_a_time=True)
    record = json.loads(stats.read_text())
    assert record["prompts"] == 4 and record["generated_tokens"] == 20
    assert not (tmp_path / "out.txt.partial").exists()


def test_getp_fp8_kv_cache_is_the_fp8_reference(ids_model, tmp_path):
    """--kv-cache-dtype fp8 on the CPU: the reference with K and V rounded to e4m3, through data-parallel
    replicas too (ReplicaSettings carries the flag)."""
    from gptoss.weights import open_weights
    from gptoss.reference import ReferenceModel, greedy_generate

    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, TINY.vocab_size, n).tolist() for n in (30, 5, 12)]
    inp = tmp_path / "prompts.txt"
    inp.write_text("".join(" ".join(map(str, p)) + "\n" for p in prompts))
    model = ReferenceModel(open_weights(ids_model), kv_fp8=True)
    want = [greedy_generate(model, p, 6, one_at_a_time=True) for p in prompts]
    for extra in ([], ["--data-parallel", "2"]):
        out = tmp_path / f"out{len(extra)}.txt"
        run("run.py", str(ids_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "6", "--device", "cpu",
            "--input-format", "ids", "--ignore-eos", "-q", "--kv-cache-dtype", "fp8", *extra)
        assert [[int(t) for t in line.split()] for line in out.read_text().splitlines()] == want, extra


def test_getp_prefill_tokens_sets_the_step_budget(ids_model, tmp_path):
    """--prefill-tokens N: at most N prompt tokens per step (a 30-token prompt in 8 steps of 4), the same
    tokens as the default budget, through data-parallel replicas too; 0 is a one-line error."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, TINY.vocab_size, 30).tolist()]
    inp = tmp_path / "prompts.txt"
    inp.write_text(" ".join(map(str, prompts[0])) + "\n")
    outs = {}
    for extra in ([], ["--prefill-tokens", "4"], ["--prefill-tokens", "4", "--data-parallel", "2"]):
        out, stats = tmp_path / f"out{len(extra)}.txt", tmp_path / f"stats{len(extra)}.json"
        run("run.py", str(ids_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "3", "--device", "cpu",
            "--input-format", "ids", "--ignore-eos", "-q", "--json", str(stats), *extra)
        outs[len(extra)] = out.read_text()
        record = json.loads(stats.read_text())
        engines = [r["engine"] for r in record["replicas"]] if "replicas" in record else [record["engine"]]
        assert sum(e["mixed_steps"] for e in engines) == (1 if not extra else 8), (extra, engines)
    assert outs[0] == outs[2] == outs[4]
    proc = run("run.py", str(ids_model), "-m", "getp", "-i", str(inp), "-o", str(tmp_path / "x.txt"), "--device",
               "cpu", "--input-format", "ids", "--prefill-tokens", "0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "run.py: error: --prefill-tokens must be at least 1 (got 0)"
    assert not (tmp_path / "x.txt").exists()


def test_resume_refuses_a_partial_file_of_another_kv_cache_format(ids_model, tmp_path):
    """A bf16 run's OUTPUT.partial is not continued by an fp8 run (its tokens differ), and the other way
    round; a bf16 run's fingerprint is what it was before the option existed."""
    from gptoss.getp import run_fingerprint
    from gptoss.sampling import SamplingParams

    inp = tmp_path / "prompts.txt"
    inp.write_text("1 2 3\n4 5\n")
    sampling, ids = SamplingParams(max_tokens=3, ignore_eos=True), [[1, 2, 3], [4, 5]]
    assert run_fingerprint(sampling, ids_model, ids) == run_fingerprint(sampling, ids_model, ids, "bf16")
    assert run_fingerprint(sampling, ids_model, ids, "fp8") != run_fingerprint(sampling, ids_model, ids)
    for written, asked in (("bf16", "fp8"), ("fp8", "bf16")):
        out = tmp_path / f"out_{written}.txt"
        partial = Path(str(out) + ".partial")
        partial.write_text(json.dumps({"fingerprint": run_fingerprint(sampling, ids_model, ids, written)}) + "\n" +
                           json.dumps({"i": 0, "ids": [7, 7, 7]}) + "\n")
        proc = run("run.py", str(ids_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "3", "--device",
                   "cpu", "--input-format", "ids", "--ignore-eos", "-q", "--resume", "--kv-cache-dtype", asked,
                   check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines()[-1] == (f"run.py: error: {partial} belongs to a different run (other "
                                                "prompts, model or settings): delete it, or run without --resume "
                                                "and with --force to start over")
        assert not out.exists() and partial.exists()


def test_getp_resume_does_not_recompute(ids_model, tmp_path, monkeypatch):
    from gptoss.getp import run_fingerprint
    from gptoss.sampling import SamplingParams

    inp = tmp_path / "prompts.txt"
    inp.write_text("1 2 3\n4 5\n")
    out = tmp_path / "out.txt"
    fp = run_fingerprint(SamplingParams(max_tokens=3, ignore_eos=True), ids_model, [[1, 2, 3], [4, 5]])
    Path(str(out) + ".partial").write_text(json.dumps({"fingerprint": fp}) + "\n" +
                                           json.dumps({"i": 0, "ids": [7, 7, 7]}) + "\n")
    run("run.py", str(ids_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "3", "--device", "cpu",
        "--input-format", "ids", "--ignore-eos", "-q", "--resume")
    lines = out.read_text().splitlines()
    assert lines[0] == "7 7 7"  # kept from the partial file, not recomputed
    assert len(lines[1].split()) == 3
    assert not Path(str(out) + ".partial").exists()


def test_getp_refuses_a_stale_partial_without_resume(ids_model, tmp_path):
    inp = tmp_path / "prompts.txt"
    inp.write_text("1 2 3\n")
    out = tmp_path / "out.txt"
    partial = Path(str(out) + ".partial")
    stale = json.dumps({"fingerprint": "other"}) + "\n" + json.dumps({"i": 0, "ids": [5]}) + "\n"
    partial.write_text(stale)
    base = ("run.py", str(ids_model), "-m", "getp", "-i", str(inp), "-o", str(out), "-n", "2", "--device", "cpu",
            "--input-format", "ids", "-q")
    proc = run(*base, check=False)
    assert proc.returncode == 2 and "holds 1 finished prompt of" in proc.stderr and "--resume" in proc.stderr
    proc = run(*base, "--resume", check=False)
    assert proc.returncode == 2 and "different run" in proc.stderr
    assert partial.read_text() == stale and not out.exists()  # both refusals kept it as it was


def test_getp_bad_inputs(ids_model, tmp_path):
    out = tmp_path / "out.txt"
    base = ("run.py", str(ids_model), "-m", "getp", "-o", str(out), "--device", "cpu", "--input-format", "ids",
            "-n", "2")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run(*base, "-i", str(empty), check=False)
    assert proc.returncode == 2 and "empty" in proc.stderr
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"1 2\n\xff\xfe 3\n")
    proc = run(*base, "-i", str(binary), check=False)
    assert proc.returncode == 2 and "line 2" in proc.stderr and "UTF-8" in proc.stderr
    long = tmp_path / "long.txt"
    long.write_text("1 2 3\n" + " ".join(["5"] * (TINY.max_context + 3)) + "\n")
    proc = run(*base, "-i", str(long), check=False)
    assert proc.returncode == 2 and "line 2" in proc.stderr and "context" in proc.stderr
    assert not out.exists()
    proc = run(*base, "-i", str(long), "--skip-long", "-q")
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and len(lines[0].split()) == 2 and lines[1] == ""
    outside = tmp_path / "outside.txt"
    outside.write_text(f"1 {TINY.vocab_size}\n")
    proc = run(*base, "-i", str(outside), "--force", check=False)
    assert proc.returncode == 2 and "vocabulary" in proc.stderr
    proc = run(*base, "-i", str(long), "--gpu-memory", "0", check=False)
    assert proc.returncode == 2 and "--gpu-memory must be positive" in proc.stderr


def test_corrupt_model_is_one_line_error(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a model at all" * 10)
    proc = run("run.py", str(bad), "-m", "generate", "-p", "x", "--device", "cpu", check=False)
    assert proc.returncode == 2
    assert "model.bin" in proc.stderr and "Traceback" not in proc.stderr


def test_portable_kernels_on_the_cpu_reference_is_one_line_error():
    proc = run("run.py", "synthetic:tiny-chat", "-m", "generate", "-p", "x", "--device", "cpu", "--kernels",
               "portable", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == ("run.py: error: --kernels portable picks the GPU kernels; this run is on "
                                            "the CPU reference, which has none")


def test_fp8_kv_cache_with_cpu_tensor_parallel_is_one_line_error():
    proc = run("run.py", "synthetic:tiny-chat", "-m", "generate", "-p", "x", "--device", "cpu",
               "--tensor-parallel", "2", "--kv-cache-dtype", "fp8", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("run.py: error: --kv-cache-dtype fp8 with --tensor-parallel")


def test_dense_experts_on_the_cpu_is_one_line_error():
    proc = run("run.py", "synthetic:tiny-chat", "-m", "generate", "-p", "x", "--device", "cpu", "--dense-experts",
               check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == ("run.py: error: --dense-experts runs on GPUs (H100/H200); this run is "
                                            "on the CPU reference: drop it")


@pytest.mark.parametrize("mode", ["generate", "serve"])
def test_dense_experts_reaches_the_engine_config(mode, monkeypatch):
    """--dense-experts on a GPU: the LLM of every mode (and each data-parallel or MPI replica's, through
    ReplicaSettings) gets dense_experts=True, an EngineConfig field; off without the flag. (No GPU here:
    the device is faked and the LLM stops the run when built.)"""
    import gptoss.device
    import gptoss.llm
    import run as run_py
    from gptoss.engine import EngineConfig
    from gptoss.parallel.data import replica_llm

    class Built(Exception):
        pass

    def fake_llm(model, device, tokenizer=None, progress=True, tensor_parallel=1, gpus=None, tp_peers=None,
                 **engine_options):
        raise Built(EngineConfig(**engine_options))

    monkeypatch.setattr(gptoss.device, "choose_device", lambda device: ("gpu", "GPU 0: fake"))
    monkeypatch.setattr(gptoss.llm, "LLM", fake_llm)
    argv = ["synthetic:tiny-chat", "-m", mode] + (["-p", "x"] if mode == "generate" else [])
    for flag, want in (([], False), (["--dense-experts"], True)):
        with pytest.raises(Built) as built:
            run_py.main(argv + flag)
        assert built.value.args[0].dense_experts is want
        settings = run_py.replica_settings(run_py.build_parser().parse_args(argv + flag), None)
        with pytest.raises(Built) as built:
            replica_llm("synthetic:tiny-chat", "gpu", None, settings)
        assert built.value.args[0].dense_experts is want


def test_decode_roundtrip(chat_model, tmp_path):
    from gptoss.tokenizer import get_tokenizer

    tok = get_tokenizer()
    texts = ["Hello world", "multi\nline ünïcode ✓"]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(" ".join(map(str, tok.encode(t))) + "\n" for t in texts))
    run("decode.py", "-i", str(ids_file), "-o", str(tmp_path / "text.txt"))
    assert (tmp_path / "text.txt").read_text().splitlines() == ["Hello world", "multi\\nline ünïcode ✓"]


def test_progress_bars_stay_off_stdout(capsys):
    """stdout carries generated text (users pipe it): upload/export and getp bars go to stderr."""
    from gptoss.progress import ByteProgress, GetpProgress

    with ByteProgress("upload", 100) as bar:
        bar.advance(100)
    with GetpProgress(total=2) as bar:
        bar.tokens(3)
        bar.prompt_done()
    assert capsys.readouterr().out == ""
