#!/usr/bin/env python3
"""Serving throughput and latency, in the shape of `vllm bench serve`: N concurrent streamed clients
over a fixed set of prompts through POST /v1/completions.

  python benchmarks/bench_serve.py --model synthetic:gpt-oss-20b --concurrency 64 --prompts 256 \\
      --input-len 1000 --output-len 256
  python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --concurrency 64     # a running server

With --model, the server is `run.py MODEL -m serve` in a subprocess on a free port of 127.0.0.1 (its
own process: the clients never share the GIL with the engine), with -b = the concurrency, stopped with
SIGTERM at the end. Each prompt is --input-len random token ids (seeded; ids of ordinary text tokens),
sent as token ids with ignore_eos and max_tokens = --output-len, so every request generates exactly
--output-len tokens. The clients are --concurrency asyncio tasks in one process, each taking the next
prompt as soon as its last one ends (vLLM's --max-concurrency with an infinite request rate), reading
the server-sent events with httpx2 (the openai package's HTTP client) without building objects per event.

Reported per request: time to first token (TTFT: request sent to first streamed text), time per output
token after the first (TPOT: (latency - TTFT) / (tokens - 1)), latency (request sent to the stream's
end); the median, p99 and mean of each, and output tokens/s, requests/s and the wall time over all.
Tokens are the server's `usage.completion_tokens` (stream_options.include_usage).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import add_json_option, json_path_error, write_json  # noqa: E402
from gptoss.cli import error  # noqa: E402

PROG = "bench_serve.py"
TEXT_IDS = 199998  # o200k's ordinary tokens: ids below this are text, never a special token


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0      # seconds from sending to the first streamed text
    latency: float = 0.0   # seconds from sending to the end of the stream
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, min(vocab, TEXT_IDS), (n, length)).tolist()


async def sse_lines(response):
    """The stream's lines, split at \\n only (the event-stream's own line ends; the server never sends a
    bare \\r). str.splitlines, which httpx's aiter_lines uses, would also split at U+2028 or U+0085 inside
    a JSON string of generated text and cut the event in two."""
    buf = b""
    async for piece in response.aiter_bytes():
        buf += piece
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if buf:
        yield buf.rstrip(b"\r")


async def one_request(client, url: str, model: str, prompt: list[int], output_len: int,
                      headers: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    usage = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {r.status_code}: {text[:200]}")
            async for line in sse_lines(r):
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(False, error=str(chunk["error"].get("message")))
                if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except Exception as e:  # noqa: BLE001: a failed request is counted, the run goes on
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - start
    if usage is None:
        return RequestResult(False, error="the stream ended without usage")
    return RequestResult(True, usage["prompt_tokens"], usage["completion_tokens"],
                         latency if ttft is None else ttft, latency)


async def run_clients(url: str, model: str, prompts: list, output_len: int, concurrency: int,
                      api_key: str | None = None, warmup: int = 1) -> tuple[list[RequestResult], float]:
    """Every prompt through `concurrency` clients; (results in prompt order, wall seconds). `warmup`
    requests of the first prompt go first, one at a time, and are not counted."""
    import httpx2

    raise_open_files(concurrency + 256)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(limits=limits, timeout=httpx2.Timeout(None)) as client:
        for _ in range(warmup):
            r = await one_request(client, url, model, prompts[0], output_len, headers)
            if not r.ok:
                raise RuntimeError(f"the warm-up request failed: {r.error}")
        results: list = [None] * len(prompts)
        queue = iter(range(len(prompts)))

        async def worker():
            for i in queue:  # (one shared iterator: each client takes the next prompt)
                results[i] = await one_request(client, url, model, prompts[i], output_len, headers)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        return results, time.perf_counter() - start


def raise_open_files(wanted: int) -> None:
    """One socket per client: lift the soft limit on open files (often 1024) toward `wanted`."""
    try:
        import resource
    except ImportError:  # (not on Windows)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


def summarize(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    out = sum(r.output_tokens for r in ok)
    inp = sum(r.prompt_tokens for r in ok)
    record = {"requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
              "wall_seconds": wall, "input_tokens": inp, "output_tokens": out,
              "request_throughput": len(ok) / wall if wall else 0.0,
              "output_tokens_per_second": out / wall if wall else 0.0,
              "total_tokens_per_second": (inp + out) / wall if wall else 0.0}
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", [r.tpot for r in ok if r.output_tokens > 1]),
                         ("latency", [r.latency for r in ok])):
        v = np.asarray(values or [0.0]) * 1000
        record[f"{name}_ms"] = {"mean": float(v.mean()), "median": float(np.median(v)),
                                "p99": float(np.percentile(v, 99))}
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        record["errors"] = errors[:5]
    return record


def report(record: dict) -> str:
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    rows = [("Successful requests", record["completed"]), ("Failed requests", record["failed"]),
            ("Maximum request concurrency", record["concurrency"]),
            ("Benchmark duration (s)", f"{record['wall_seconds']:.2f}"),
            ("Total input tokens", record["input_tokens"]), ("Total generated tokens", record["output_tokens"]),
            ("Request throughput (req/s)", f"{record['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{record['output_tokens_per_second']:.2f}"),
            ("Total token throughput (tok/s)", f"{record['total_tokens_per_second']:.2f}")]
    lines += [f"{k + ':':<40}{v:<10}" for k, v in rows]
    for key, title, short in (("ttft_ms", "Time to First Token", "TTFT"),
                              ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("latency_ms", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        lines += [f"{f'{stat.capitalize()} {short} (ms):':<40}{record[key][stat]:<10.2f}"
                  for stat in ("mean", "median", "p99")]
    lines.append("=" * 50)
    for e in record.get("errors", ()):
        lines.append(f"error: {e}")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run.py"), args.model, "-m", "serve", "--port", str(port),
           "-b", str(args.batch or args.concurrency), "--device", args.device, "-q"]
    if args.gpu_memory is not None:
        cmd += ["--gpu-memory", str(args.gpu_memory)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "GPTOSS_API_KEY": ""})


def wait_until_up(url: str, server: subprocess.Popen, seconds: float) -> None:
    import httpx2

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} before it answered")
        try:
            if httpx2.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {seconds:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start `run.py MODEL -m serve` for the run (e.g. synthetic:gpt-oss-20b)")
    where.add_argument("--url", help="a running server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--served-name", default=None, help="the model name sent in requests (default: the "
                   "first of the server's /v1/models)")
    p.add_argument("--concurrency", type=int, default=64, help="clients at once (default 64)")
    p.add_argument("--prompts", type=int, default=256, help="requests in all (default 256)")
    p.add_argument("--input-len", type=int, default=1000, help="prompt tokens per request (default 1000)")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens per request (default 256)")
    p.add_argument("--vocab", type=int, default=None, help="prompt ids are drawn below this (default: the "
                   "synthetic preset's vocabulary, else 199998, capped at o200k's ordinary tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt ids (default 0)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests sent first, one at a time (default 1)")
    p.add_argument("-b", "--batch", type=int, default=None, help="--model: the server's -b (default: --concurrency)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="--model: the server's --device")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="--model: the server's --gpu-memory")
    p.add_argument("--start-timeout", type=float, default=1800, help="--model: seconds to wait for the server "
                   "to answer /health (default 1800)")
    p.add_argument("--api-key", default=None, help="--url: the bearer token (default $GPTOSS_API_KEY)")
    add_json_option(p, "the record")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("concurrency", "prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            return error(PROG, f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if (code := json_path_error(PROG, args)) is not None:
        return code

    vocab = args.vocab
    if vocab is None and args.model and args.model.startswith("synthetic:"):
        from gptoss.config import PRESETS

        preset = PRESETS.get(args.model.split(":", 1)[1])
        vocab = preset.vocab_size if preset else None
    prompts = make_prompts(args.prompts, args.input_len, vocab or TEXT_IDS, args.seed)

    raise_open_files(args.concurrency + 256)  # (before the server starts: it inherits the limit)
    server = None
    if args.model:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, port)
        api_key = None
    else:
        url, api_key = args.url.rstrip("/"), args.api_key or os.environ.get("GPTOSS_API_KEY") or None
    try:
        if server is not None:
            wait_until_up(url, server, args.start_timeout)
        import httpx2

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        name = args.served_name or httpx2.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        results, wall = asyncio.run(run_clients(url, name, prompts, args.output_len, args.concurrency, api_key,
                                                args.warmup))
    except RuntimeError as e:
        return error(PROG, str(e))
    finally:
        if server is not None:
            stop_server(server)

    record = {"model": args.model or name, "url": None if args.model else url, "concurrency": args.concurrency,
              "prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len,
              **summarize(results, wall), "per_request": [asdict(r) for r in results]}
    print(report(record))
    if args.json:
        write_json(args.json, record)
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main(PROG, main))
