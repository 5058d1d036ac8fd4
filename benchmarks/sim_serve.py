#!/usr/bin/env python3
"""The real server (gptoss.serve's app on uvicorn, the real engine and scheduler) over a stand-in model
whose steps take a MODELED GPU time: what the host side of serving costs, without a GPU.

  python benchmarks/sim_serve.py --port 8123 [-b 1024] [--step-ms modeled|0|MS] [--free 126]
  python benchmarks/bench_serve.py --url http://127.0.0.1:8123 --concurrency 64,256,1024 ...
  python benchmarks/sim_serve.py --direct --prompts 1024 --input-len 1000 --output-len 256

The stand-in's step sleeps for the H200 model of benchmarks/sim_scheduler.py (FIXED + PER_SEQ * B +
PER_KEY * keys + PER_PROMPT_TOKEN * prompt tokens, in ms; `--step-ms 0`: no sleep, so the host side
alone binds; a number: that many ms per step) and returns random ids of ordinary text tokens (never a
stop id). The sleep releases the GIL, as a GPU step's wait does; like the GPU runner it calls the
engine's while_running (the server's hand-over of the last step's tokens) first, and sleeps what is
left of the modeled time. Its KV cache is sized by the GPU runner's memory plan for gpt-oss-20b with
--free GiB beside the weights (126: an H200).

--direct runs the same engine over the same prompts without HTTP (what getp does): the served figure
at a concurrency of all the prompts should come close to it. The figures are a model of the GPU and a
measurement of the host: use them to find where the host binds, then measure on the device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from gptoss.config import PRESETS  # noqa: E402

from benchmarks.sim_scheduler import FIXED, PER_KEY, PER_PROMPT_TOKEN, PER_SEQ, ModeledRunner  # noqa: E402

TEXT_IDS = 199998  # ids below this are o200k's ordinary text tokens


class SleepingRunner(ModeledRunner):
    """ModeledRunner whose step sleeps for its modeled time (or step_ms) and gives random text ids."""

    name = "modeled H200 (sleeping)"
    overlaps = True  # like the GPU runner: while_running runs while the "device" computes


    def __init__(self, cfg, free_gib, config, step_ms: float | None, seed: int = 0):
        super().__init__(cfg, free_gib, config, stop_rate=0.0, paged=True, seed=seed)
        self.step_ms = step_ms
        self.steps = 0
        self.slept = 0.0

    def step(self, batch, while_running=None):
        q = np.asarray(batch.q_lens)
        decode = q == 1
        keys = int(np.sum(np.asarray(batch.seq_starts)[decode] + 1))
        ms = self.step_ms if self.step_ms is not None else (
            FIXED + PER_SEQ * int(decode.sum()) + PER_KEY * keys + PER_PROMPT_TOKEN * int(q[~decode].sum()))
        self.steps += 1
        self.ms += ms
        t0 = time.perf_counter()
        if while_running is not None:
            while_running()
        if ms > 0:  # what is left of the modeled time after while_running (a GPU computes meanwhile)
            left = ms / 1000 - (time.perf_counter() - t0)
            t1 = time.perf_counter()
            if left > 0:
                time.sleep(left)
            self.slept += time.perf_counter() - t1
        return self.rng.integers(0, min(TEXT_IDS, self.model_config.vocab_size), len(batch.logit_rows)).astype(np.int32)


def make_engine(args):
    from gptoss.engine import Engine, EngineConfig
    from gptoss.tokenizer import STOP_IDS

    step_ms = None if args.step_ms == "modeled" else float(args.step_ms)
    config = EngineConfig(max_seqs=args.batch, promise=args.promise)
    runner = SleepingRunner(PRESETS[args.preset], args.free, config, step_ms)
    return Engine(runner, config, eos_token_ids=STOP_IDS), runner


def run_direct(args) -> int:
    """The prompts through the engine with no server (getp's way): generated tokens/s."""
    from gptoss.sampling import SamplingParams

    engine, runner = make_engine(args)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.prompts):
        engine.add_request(rng.integers(0, TEXT_IDS, args.input_len).tolist(), params)
    t0, made = time.perf_counter(), 0
    while engine.has_unfinished():
        made += int(np.count_nonzero(engine.step().token >= 0))
    wall = time.perf_counter() - t0
    s = engine.stats
    print(f"direct: {args.prompts} prompts, {made} tokens in {wall:.2f} s = {made / wall:,.0f} tok/s "
          f"(modeled GPU {runner.ms / 1000:.2f} s, slept {runner.slept:.2f} s, {runner.steps} steps, "
          f"slots {s['slots']}, most running {s['most_running']}, host {s['host_seconds']:.2f} s)")
    return 0


def run_server(args) -> int:
    import uvicorn

    from gptoss.serve import ServeOptions, build_app
    from gptoss.tokenizer import get_tokenizer

    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval / 1000)
    engine, runner = make_engine(args)
    extra = {} if args.max_model_len is None else {"max_model_len": args.max_model_len}
    options = ServeOptions(model_name="sim", reserve_slots=args.batch, **extra)
    app = build_app(engine, get_tokenizer(), options)
    print(f"sim_serve: http://127.0.0.1:{args.port}/v1 ({runner.name}, -b {args.batch})", file=sys.stderr)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", timeout_graceful_shutdown=5,
                loop=args.loop, http=args.http)
    s = engine.stats
    print(f"sim_serve: {runner.steps} steps, modeled GPU {runner.ms / 1000:.2f} s, slept {runner.slept:.2f} s, "
          f"engine host {s['host_seconds']:.2f} s, most running {s['most_running']}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8123, help="the port to serve on, at 127.0.0.1 (default 8123)")
    p.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS),
                   help="the model shape the step time and the memory plan are for (default gpt-oss-20b)")
    p.add_argument("-b", "--batch", type=int, default=1024, help="sequences at once (default 1024)")
    p.add_argument("--promise", type=float, default=0.0, help="EngineConfig.promise (default 0, serve's)")
    p.add_argument("--max-model-len", type=int, default=None, help="the server's context (default: the model's)")
    p.add_argument("--free", type=float, default=126.0, help="GiB beside the weights (default 126: an H200)")
    p.add_argument("--step-ms", default="modeled", help="'modeled' (default), or fixed ms per step (0: none)")
    p.add_argument("--switch-interval", type=float, default=None, metavar="MS",
                   help="the interpreter's GIL switch interval (default: Python's, 5 ms)")
    p.add_argument("--loop", default="auto", help="uvicorn's --loop: auto (uvloop when installed), asyncio, uvloop")
    p.add_argument("--http", default="auto", help="uvicorn's --http: auto (httptools when installed), h11, httptools")
    p.add_argument("--direct", action="store_true", help="run the prompts through the engine without HTTP")
    p.add_argument("--prompts", type=int, default=1024, help="--direct: prompts (default 1024)")
    p.add_argument("--input-len", type=int, default=1000, help="--direct: prompt tokens (default 1000)")
    p.add_argument("--output-len", type=int, default=256, help="--direct: new tokens (default 256)")
    args = p.parse_args(argv)
    if args.step_ms != "modeled":
        try:
            if float(args.step_ms) < 0:
                raise ValueError
        except ValueError:
            p.error(f"--step-ms: 'modeled' or milliseconds >= 0 (got {args.step_ms!r})")
    for flag, value in (("-b", args.batch), ("--prompts", args.prompts), ("--input-len", args.input_len),
                        ("--output-len", args.output_len)):
        if value < 1:
            p.error(f"{flag} must be at least 1 (got {value})")
    return run_direct(args) if args.direct else run_server(args)


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("sim_serve.py", main))
