"""benchmarks/bench_serve.py on the CPU: the one command that starts `run.py -m serve` on the tiny
synthetic model, drives it with concurrent streamed clients and stops it; its report adds up."""
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
    path = tmp_path / "serve.json"
    n, input_len, output_len = 5, 9, 4
    code = main(["--model", "synthetic:tiny-chat", "--device", "cpu", "--concurrency", "3", "--prompts", str(n),
                 "--input-len", str(input_len), "--output-len", str(output_len), "--json", str(path)])
    assert code == 0, capsys.readouterr().err
    assert "Output token throughput (tok/s):" in capsys.readouterr().out
    rec = json.loads(path.read_text())
    reqs = rec["per_request"]
    assert (rec["requests"], rec["completed"], rec["failed"], rec["concurrency"]) == (n, n, 0, 3)
    assert all(r["ok"] and r["prompt_tokens"] == input_len and r["output_tokens"] == output_len for r in reqs)
    assert (rec["input_tokens"], rec["output_tokens"]) == (n * input_len, n * output_len)
    assert all(0 < r["ttft"] <= r["latency"] <= rec["wall_seconds"] for r in reqs)
    assert rec["output_tokens_per_second"] == pytest.approx(n * output_len / rec["wall_seconds"])
    assert rec["request_throughput"] == pytest.approx(n / rec["wall_seconds"])
    for key in ("ttft_ms", "tpot_ms", "latency_ms"):
        assert 0 < rec[key]["median"] <= rec[key]["p99"]
    assert rec["ttft_ms"]["p99"] <= rec["latency_ms"]["p99"]
    tpots = sorted((r["latency"] - r["ttft"]) / (output_len - 1) * 1000 for r in reqs)
    assert rec["tpot_ms"]["median"] == pytest.approx(tpots[n // 2])


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
