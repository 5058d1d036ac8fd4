"""benchmarks/bench_serve.py on the CPU: the one command that starts `run.py -m serve` on the tiny
synthetic model, drives it with concurrent streamed clients and stops it; its report adds up. And benchmarks/sim_serve.py's
direct mode (its stand-in runner under the real engine)."""
import json
import socket

import pytest

pytest.importorskip("httpx2")
pytest.importorskip("uvicorn")

from benchmarks.bench_serve import main  # noqa: E402


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bench_serve.py: error: ") and err.count("\n") == 1, err
    return err[len("bench_serve.py: error: "):-1]


def test_the_report_counts_what_was_asked_and_its_times_are_consistent(tmp_path, capsys):
    """Two concurrencies in one invocation, the second with its clients in two processes; then getp on
    the prompts of the larger run: its ids file is those prompts, and the record has the ratio."""
    path = tmp_path / "serve.json"
    counts, input_len, output_len = (3, 5), 9, 4
    code = main(["--model", "synthetic:tiny-chat", "--device", "cpu", "--concurrency", "1,3", "--num-prompts",
                 ",".join(map(str, counts)), "--client-procs", "2", "--input-len", str(input_len), "--output-len",
                 str(output_len), "--getp", "--ids-out", str(tmp_path / "getp"), "--json", str(path)])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("Output token throughput (tok/s):") == 2 and "getp on the 5 prompts of concurrency 3" in out
    rec = json.loads(path.read_text())
    assert [(r["concurrency"], r["prompts"]) for r in rec["runs"]] == [(1, 3), (3, 5)]
    assert [r["client_processes"] for r in rec["runs"]] == [1, 2]
    for run, n in zip(rec["runs"], counts):
        reqs = run["per_request"]
        assert (run["requests"], run["completed"], run["failed"]) == (n, n, 0)
        assert all(r["ok"] and r["prompt_tokens"] == input_len and r["output_tokens"] == output_len for r in reqs)
        assert (run["input_tokens"], run["output_tokens"]) == (n * input_len, n * output_len)
        assert all(0 < r["ttft"] <= r["latency"] <= run["wall_seconds"] for r in reqs)
        assert run["output_tokens_per_second"] == pytest.approx(n * output_len / run["wall_seconds"])
        assert run["request_throughput"] == pytest.approx(n / run["wall_seconds"])
        for key in ("ttft_ms", "tpot_ms", "latency_ms"):
            assert 0 < run[key]["median"] <= run[key]["p99"]
        assert run["ttft_ms"]["p99"] <= run["latency_ms"]["p99"]
        tpots = sorted((r["latency"] - r["ttft"]) / (output_len - 1) * 1000 for r in reqs)
        assert run["tpot_ms"]["median"] == pytest.approx(tpots[n // 2])
        # the server's counters over the run: every token it generated was one the clients got
        assert run["server"]["generation_tokens"] == n * output_len and run["server"]["steps"] >= output_len
    ids = [list(map(int, line.split())) for line in (tmp_path / "getp" / "prompts.ids").read_text().splitlines()]
    assert len(ids) == 5 and all(len(p) == input_len for p in ids)
    getp = rec["getp"]
    assert getp["record"]["generated_tokens"] == 5 * output_len
    assert getp["served_over_getp"] == pytest.approx(rec["runs"][1]["output_tokens_per_second"]
                                                     / getp["tokens_per_second"])


def test_json_is_checked_before_the_run_and_a_dead_url_is_one_line(tmp_path, capsys):
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["--url", url, "--json", str(existing)]) == 2
    assert one_error(capsys) == f"{existing} exists; pass --force to overwrite it"
    assert existing.read_text() == "{}"
    assert main(["--url", url, "--served-name", "x", "--prompts", "2", "--input-len", "3", "--output-len", "2"]) == 2
    assert one_error(capsys).startswith("the warm-up request failed: ConnectError")
    assert main(["--url", url, "--concurrency", "0"]) == 2
    assert one_error(capsys) == "--concurrency must be at least 1 (got 0)"
    assert main(["--url", url, "--concurrency", "1,2", "--num-prompts", "1,2,3"]) == 2
    assert one_error(capsys) == "--num-prompts has 3 values for 2 concurrencies"
    assert main(["--url", url, "--getp"]) == 2
    assert one_error(capsys) == "--getp needs --model (it runs run.py's getp on that model)"


def test_event_lines_split_at_newlines_only():
    """Generated text may hold U+2028 or U+0085 raw inside an event's JSON (a line end for str.splitlines,
    not for the event stream): the benchmark's reader keeps such an event whole, across any chunking."""
    import asyncio
    import json

    from benchmarks.bench_serve import sse_lines

    events = [json.dumps({"choices": [{"text": t}]}, ensure_ascii=False) for t in ("a\u2028b", "c\x85d", "e")]
    stream = "".join(f"data: {e}\r\n\r\n" for e in events).encode() + b"data: [DONE]\n\n"

    class Chunked:  # the bytes in pieces of 7, cutting characters and lines anywhere
        async def aiter_bytes(self):
            for i in range(0, len(stream), 7):
                yield stream[i:i + 7]

    async def collect():
        return [line async for line in sse_lines(Chunked())]

    data = [line[6:] for line in asyncio.run(collect()) if line.startswith(b"data: ")]
    assert data[-1] == b"[DONE]"
    assert [json.loads(d)["choices"][0]["text"] for d in data[:-1]] == ["a\u2028b", "c\x85d", "e"]


def test_sim_serve_direct_runs_every_prompt_through_the_engine(capsys):
    """benchmarks/sim_serve.py --direct: the stand-in runner under the real engine makes exactly prompts x
    output-len tokens, and sleeps the fixed step time it is given (calling while_running each step)."""
    from benchmarks.sim_serve import main as sim_main

    assert sim_main(["--direct", "--prompts", "3", "--input-len", "10", "--output-len", "4", "--step-ms", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("direct: 3 prompts, 12 tokens in "), line
    steps = int(line.split(" steps,")[0].rsplit(" ", 1)[1])
    assert steps >= 4 and f"modeled GPU {steps * 0.002:.2f} s" in line
    with pytest.raises(SystemExit):
        sim_main(["--direct", "--step-ms", "-1"])
    assert "--step-ms: 'modeled' or milliseconds >= 0 (got '-1')" in capsys.readouterr().err
