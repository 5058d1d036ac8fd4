#!/usr/bin/env python3
"""Serving throughput and latency, in the shape of `vllm bench serve`: N concurrent streamed clients
over a fixed set of prompts through POST /v1/completions, at one or several concurrencies.

  python benchmarks/bench_serve.py --model synthetic:gpt-oss-20b --concurrency 1,64,256,1024 \\
      --num-prompts 8,256,512,1024 --input-len 1000 --output-len 256 --getp --json serve.json
  python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --concurrency 64     # a running server

With --model, the server is `run.py MODEL -m serve` in a subprocess on a free port of 127.0.0.1 (its
own process: the clients never share the GIL with the engine), with -b = the largest concurrency,
stopped with SIGTERM at the end; --getp then runs `run.py MODEL -m getp` on the prompts of the largest
concurrency's run (the same ids and new tokens) and reports served / getp throughput. Each prompt is
--input-len random token ids (seeded; ids of ordinary text tokens), sent as token ids with ignore_eos
and max_tokens = --output-len, so every request generates exactly --output-len tokens; run k uses the
first --num-prompts of one prompt set. The clients of a run are --concurrency asyncio tasks, each
taking the next prompt as soon as its last one ends (vLLM's --max-concurrency with an infinite request
rate), spread over --client-procs processes so that the client is not what limits the run; they read
the server-sent events with httpx2 (the openai package's HTTP client) and parse only the events that
matter (the first text, an error, the usage).

Reported per request: time to first token (TTFT: request sent to first streamed text), time per output
token after the first (TPOT: (latency - TTFT) / (tokens - 1)), latency (request sent to the stream's
end); the median, p99 and mean of each, and output tokens/s, requests/s and the wall time over all.
Tokens are the server's `usage.completion_tokens` (stream_options.include_usage). Each run's record
also has the server's own counters over the run (/metrics: engine steps, seconds inside steps and
between them): the share of the wall spent in model steps says whether the host side binds.
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
    """One streamed request. Only the events that matter are parsed (the first with text, for TTFT;
    an error; the usage at the end): the client must not be what limits the run."""
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
                if ttft is None or b'"usage"' in data or b'"error"' in data:
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
                      api_key: str | None = None, warmup: int = 1, barrier=None) -> tuple[list, float, float]:
    """Every prompt through `concurrency` clients: (results in prompt order, start, end), the times on
    time.monotonic's clock (one clock for every process). `warmup` requests of the first prompt go
    first, one at a time, and are not counted; `barrier` (a multiprocessing.Barrier) is waited on
    before the clock starts."""
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

        if barrier is not None:
            barrier.wait()
        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        return results, start, time.monotonic()


def _client_process(index, url, model, prompts, output_len, concurrency, api_key, barrier, out) -> None:
    try:
        out.put((index, asyncio.run(run_clients(url, model, prompts, output_len, concurrency, api_key, 0, barrier)),
                 None))
    except BaseException as e:  # noqa: BLE001: the parent says it in one line
        barrier.abort()
        out.put((index, None, f"{type(e).__name__}: {e}"))


def drive(url: str, model: str, prompts: list, output_len: int, concurrency: int, api_key: str | None,
          processes: int) -> tuple[list[RequestResult], float]:
    """Every prompt through `concurrency` clients spread over `processes` client processes (prompt i
    goes to process i % processes; 1: in this process): (results in prompt order, wall seconds from
    the first client's start to the last one's end)."""
    processes = max(1, min(processes, concurrency, len(prompts)))
    if processes == 1:
        results, start, end = asyncio.run(run_clients(url, model, prompts, output_len, concurrency, api_key, 0))
        return results, end - start
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    shares = [concurrency // processes + (p < concurrency % processes) for p in range(processes)]
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(p, url, model, prompts[p::processes], output_len, shares[p], api_key, barrier, out))
             for p in range(processes)]
    for proc in procs:
        proc.start()
    answers = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    errors = sorted(error for _, _, error in answers if error)
    if errors:
        raise RuntimeError(f"a client process failed: {errors[0]}")
    results: list = [None] * len(prompts)
    for p, (mine, _, _), _ in answers:
        results[p::processes] = mine
    return results, max(a[1][2] for a in answers) - min(a[1][1] for a in answers)


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


def start_server(args, port: int, batch: int) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run.py"), args.model, "-m", "serve", "--port", str(port),
           "-b", str(batch), "--device", args.device, "-q"]
    if args.gpu_memory is not None:
        cmd += ["--gpu-memory", str(args.gpu_memory)]
    if args.max_model_len is not None:
        cmd += ["--max-model-len", str(args.max_model_len)]
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


SERVER_FIGURES = ("gptoss_steps_total", "gptoss_step_seconds_total", "gptoss_engine_host_seconds_total",
                  "gptoss_generation_tokens_total", "gptoss_prompt_tokens_total")


def server_figures(url: str, headers: dict) -> dict:
    """The server's counters (/metrics) that say where its time went; {} when it has none."""
    import httpx2

    try:
        text = httpx2.get(url + "/metrics", headers=headers, timeout=30).text
    except httpx2.HTTPError:
        return {}
    values = dict(line.split()[:2] for line in text.splitlines() if line and not line.startswith("#"))
    return {k: float(values[k]) for k in SERVER_FIGURES if k in values}


def server_block(before: dict, after: dict, wall: float) -> dict:
    """What the server did during one run: engine steps, the seconds inside them (the model) and
    between them (the engine's host work), against the wall time."""
    d = {k.removeprefix("gptoss_").removesuffix("_total"): after[k] - before.get(k, 0.0) for k in after}
    if d.get("steps"):
        d["ms_per_step"] = 1000 * d.get("step_seconds", 0.0) / d["steps"]
        d["step_share_of_wall"] = d.get("step_seconds", 0.0) / wall if wall else 0.0
    return d


def write_ids(path: Path, prompts: list) -> None:
    with open(path, "w") as f:
        f.writelines(" ".join(map(str, p)) + "\n" for p in prompts)


def getp_command(model: str, ids: Path, output_len: int, out_dir: Path, device: str,
                 gpu_memory: float | None) -> list[str]:
    """run.py's getp over the same prompts (token ids, exactly output_len new tokens each, greedy)."""
    cmd = [sys.executable, str(ROOT / "run.py"), model, "-m", "getp", "-i", str(ids), "--input-format", "ids",
           "-n", str(output_len), "--ignore-eos", "-o", str(out_dir / "getp_out.txt"),
           "--json", str(out_dir / "getp.json"), "--device", device, "--force", "-q"]
    return cmd + (["--gpu-memory", str(gpu_memory)] if gpu_memory is not None else [])


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start `run.py MODEL -m serve` for the run (e.g. synthetic:gpt-oss-20b)")
    where.add_argument("--url", help="a running server instead, e.g. http://127.0.0.1:8000")
    p.add_argument("--served-name", default=None, help="the model name sent in requests (default: the "
                   "first of the server's /v1/models)")
    p.add_argument("--concurrency", type=int_list, default=[64],
                   help="clients at once; a comma-separated list runs each in turn, e.g. 1,64,256,1024 (default 64)")
    p.add_argument("--num-prompts", "--prompts", dest="prompts", type=int_list, default=None,
                   help="requests per run: one number for every run or one per --concurrency (default: "
                        "4 x the concurrency, at least 8)")
    p.add_argument("--input-len", type=int, default=1000, help="prompt tokens per request (default 1000)")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens per request (default 256)")
    p.add_argument("--vocab", type=int, default=None, help="prompt ids are drawn below this (default: the "
                   "synthetic preset's vocabulary, else 199998, capped at o200k's ordinary tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt ids (default 0)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests sent first, one at a time (default 1)")
    p.add_argument("--client-procs", type=int, default=None, metavar="N",
                   help="client processes (default: one per 256 clients, at most 4 and the CPUs less one)")
    p.add_argument("-b", "--batch", type=int, default=None,
                   help="--model: the server's -b (default: the largest --concurrency)")
    p.add_argument("--max-model-len", type=int, default=None, help="--model: the server's --max-model-len")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="--model: the server's --device")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="--model: the server's --gpu-memory")
    p.add_argument("--start-timeout", type=float, default=1800, help="--model: seconds to wait for the server "
                   "to answer /health (default 1800)")
    p.add_argument("--api-key", default=None, help="--url: the bearer token (default $GPTOSS_API_KEY)")
    p.add_argument("--getp", action="store_true", help="--model: after the server stops, run run.py's getp on the "
                   "prompts of the largest concurrency's run (same ids, same new tokens) and report the ratio")
    p.add_argument("--ids-out", default=None, metavar="DIR", help="write those prompts' ids (prompts.ids) and "
                   "getp's files there (default: a temporary folder)")
    add_json_option(p, "the record")
    return p.parse_args(argv)


def run_getp(args, prompts: list, out_dir: Path) -> dict:
    ids = out_dir / "prompts.ids"
    write_ids(ids, prompts)
    cmd = getp_command(args.model, ids, args.output_len, out_dir, args.device, args.gpu_memory)
    print("getp on the same prompts: " + " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    if done.returncode:
        raise RuntimeError(f"getp exited with status {done.returncode}")
    return json.loads((out_dir / "getp.json").read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = args.prompts or [max(8, 4 * c) for c in args.concurrency]
    if len(counts) == 1:
        counts = counts * len(args.concurrency)
    if len(counts) != len(args.concurrency):
        return error(PROG, f"--num-prompts has {len(counts)} values for {len(args.concurrency)} concurrencies")
    for name, values in (("concurrency", args.concurrency), ("num-prompts", counts),
                         ("input-len", [args.input_len]), ("output-len", [args.output_len])):
        if min(values) < 1:
            return error(PROG, f"--{name} must be at least 1 (got {min(values)})")
    if args.getp and not args.model:
        return error(PROG, "--getp needs --model (it runs run.py's getp on that model)")
    if (code := json_path_error(PROG, args)) is not None:
        return code

    vocab = args.vocab
    if vocab is None and args.model and args.model.startswith("synthetic:"):
        from gptoss.config import PRESETS

        preset = PRESETS.get(args.model.split(":", 1)[1])
        vocab = preset.vocab_size if preset else None
    prompts = make_prompts(max(counts), args.input_len, vocab or TEXT_IDS, args.seed)

    raise_open_files(max(args.concurrency) + 256)  # (before the server starts: it inherits the limit)
    server = None
    if args.model:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, port, args.batch or max(args.concurrency))
        api_key = None
    else:
        url, api_key = args.url.rstrip("/"), args.api_key or os.environ.get("GPTOSS_API_KEY") or None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    runs = []
    try:
        if server is not None:
            wait_until_up(url, server, args.start_timeout)
        import httpx2

        name = args.served_name or httpx2.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        if args.warmup:
            warm = asyncio.run(run_clients(url, name, prompts[:1] * args.warmup, args.output_len, 1, api_key, 0))[0]
            if not all(r.ok for r in warm):
                raise RuntimeError(f"the warm-up request failed: {next(r.error for r in warm if not r.ok)}")
        for concurrency, n in zip(args.concurrency, counts):
            procs = args.client_procs or max(1, min(4, (os.cpu_count() or 2) - 1, concurrency // 256))
            procs = max(1, min(procs, concurrency, n))
            before = server_figures(url, headers)
            results, wall = drive(url, name, prompts[:n], args.output_len, concurrency, api_key, procs)
            run = {"concurrency": concurrency, "prompts": n, "client_processes": procs,
                   **summarize(results, wall), "server": server_block(before, server_figures(url, headers), wall),
                   "per_request": [asdict(r) for r in results]}
            print(report(run), flush=True)
            runs.append(run)
    except RuntimeError as e:
        return error(PROG, str(e))
    finally:
        if server is not None:
            stop_server(server)

    record = {"model": args.model or name, "url": None if args.model else url, "input_len": args.input_len,
              "output_len": args.output_len, "runs": runs}
    if args.getp:
        import tempfile

        largest = max(range(len(runs)), key=lambda i: runs[i]["concurrency"])
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out_dir = Path(args.ids_out or tmp)
                out_dir.mkdir(parents=True, exist_ok=True)
                getp = run_getp(args, prompts[:runs[largest]["prompts"]], out_dir)
        except (RuntimeError, OSError) as e:
            return error(PROG, str(e))
        served = runs[largest]["output_tokens_per_second"]
        record["getp"] = {"prompts": runs[largest]["prompts"], "tokens_per_second": getp["tokens_per_second"],
                          "served_over_getp": served / getp["tokens_per_second"] if getp["tokens_per_second"] else 0.0,
                          "record": getp}
        print(f"getp on the {runs[largest]['prompts']} prompts of concurrency {runs[largest]['concurrency']}: "
              f"{getp['tokens_per_second']:,.0f} generated tok/s; served {served:,.0f} = "
              f"{100 * record['getp']['served_over_getp']:.0f}% of it")
    elif args.ids_out:  # the prompts of the largest concurrency's run, for getp by hand
        out_dir = Path(args.ids_out)
        out_dir.mkdir(parents=True, exist_ok=True)
        largest = max(runs, key=lambda run: run["concurrency"]) if runs else {"prompts": max(counts)}
        write_ids(out_dir / "prompts.ids", prompts[:largest["prompts"]])
        if args.model:
            cmd = getp_command(args.model, out_dir / "prompts.ids", args.output_len, out_dir, args.device,
                               args.gpu_memory)
            print("getp on the same prompts: " + " ".join(cmd))
    if len(runs) > 1:
        print(summary_table(runs))
    if args.json:
        write_json(args.json, record)
    return 1 if any(run["failed"] for run in runs) else 0


def summary_table(runs: list) -> str:
    lines = [f"{'concurrency':>11} {'prompts':>7} {'output tok/s':>12} {'TTFT med':>9} {'TTFT p99':>9} "
             f"{'TPOT med':>9} {'TPOT p99':>9}  (ms)"]
    lines += [f"{r['concurrency']:>11} {r['prompts']:>7} {r['output_tokens_per_second']:>12,.0f} "
              f"{r['ttft_ms']['median']:>9.0f} {r['ttft_ms']['p99']:>9.0f} {r['tpot_ms']['median']:>9.1f} "
              f"{r['tpot_ms']['p99']:>9.1f}" for r in runs]
    return "\n".join(lines)


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main(PROG, main))
