#!/usr/bin/env python3
"""The host cost of driving N engines from one process, on the CPU: the real engine (scheduler, pages,
admission) over sim_scheduler's modeled H200 runner, whose step costs no host time but adds a modeled
GPU time.

  python benchmarks/sim_data_parallel.py [--prompts 512] [-n 256] [--replicas 1,2,4,8]

One process steps N engines in turn (what a single-process data parallel getp would do); the host time
of a round is measured, its GPU time is the modeled step of each engine, which would overlap on N GPUs.
A round lasts at least the measured host time of all N steps (one Python thread: the GIL) and at least
one modeled GPU step, so one process feeds N GPUs fully only while N x (host ms per step) stays under
the modeled GPU step. Not counted: the GPU runner's own host work per step (graph replays, the batch
upload, reading the tokens back), which adds to the host side. One process per replica (run.py
--data-parallel) pays only its own engine's host time, as one GPU does today.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from sim_scheduler import STOP, ModeledRunner  # noqa: E402


def one_process(cfg, lengths, new, free_gib, replicas):
    """Step `replicas` engines in turn to the end: (measured host s, modeled s if GPUs overlap, steps)."""
    from gptoss.engine import Engine, EngineConfig
    from gptoss.sampling import SamplingParams

    engines = []
    for r in range(replicas):
        runner = ModeledRunner(cfg, free_gib, EngineConfig(), 0.0, seed=r)
        engine = Engine(runner, eos_token_ids=(STOP,))
        for n in lengths[r::replicas]:
            engine.add_request([2] * int(n), SamplingParams(max_tokens=new))
        engines.append(engine)
    host = modeled = 0.0
    steps = generated = 0
    while any(e.has_unfinished() for e in engines):
        t0 = time.perf_counter()
        gpu_ms = []
        for e in engines:
            if e.has_unfinished():
                before = e.runner.ms
                generated += int(np.count_nonzero(e.step().token >= 0))
                gpu_ms.append(e.runner.ms - before)
                steps += 1
        round_host = time.perf_counter() - t0
        host += round_host
        modeled += max(round_host, max(gpu_ms) / 1000)  # the N GPUs run their steps at once
    return host, modeled, steps, generated


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b")
    p.add_argument("--prompts", type=int, default=512, help="prompts per replica")
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("-n", "--steps", type=int, default=256, help="new tokens per prompt")
    p.add_argument("--free", type=float, default=126.0, help="GiB beside the weights (126: an H200 with 20b)")
    p.add_argument("--replicas", default="1,2,4,8")
    args = p.parse_args(argv)

    from gptoss.config import PRESETS

    cfg = PRESETS[args.preset]
    for n in (int(x) for x in args.replicas.split(",")):
        lengths = np.random.default_rng(0).integers(args.min_len, args.max_len + 1, args.prompts * n)
        host, modeled, steps, generated = one_process(cfg, lengths, args.steps, args.free, n)
        print(f"{n} engine(s) in one process: {steps} steps, host {host / steps * 1000:6.2f} ms per engine step, "
              f"modeled {generated / modeled:10,.0f} generated tok/s "
              f"({generated / modeled / n:8,.0f} per GPU)", flush=True)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("sim_data_parallel.py", main))
