#!/usr/bin/env python3
"""One long prompt through the engine: time to its first token (the whole prefill) per step budget.

  python benchmarks/bench_long_prompt.py [--preset gpt-oss-20b] [--tokens 120000] [--prefill-tokens 256,4096,16384]
                                         [--dense-experts]

Random weights of the real shape (speed does not depend on the values), uploaded once. For each
--prefill-tokens budget (EngineConfig.prefill_tokens: a lone prompt takes the whole budget each step)
one prompt of --tokens random ids runs through a fresh engine until its first token, timed on the host around the steps (the kernels are compiled before).
Then one eager step of the prompt's last chunk is profiled per kernel family, with the full-attention
layers' rate: 4 * head_dim * heads flops per (query, visible key) pair.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import add_json_option, json_path_error, positive_ints, write_json
from benchmarks.roofline import StepShape, attention_work
from gptoss.cli import error
from gptoss.kernels import KERNEL_MODES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b", help="model shape (gptoss.config.PRESETS)")
    p.add_argument("--tokens", type=int, default=120_000, help="prompt length")
    p.add_argument("--prefill-tokens", type=positive_ints, default=[256, 4096, 16384],
                   help="step budgets to compare, comma-separated (EngineConfig.prefill_tokens)")
    p.add_argument("--kernels", choices=KERNEL_MODES, default=None,
                   help="GPU kernel mode (run.py --kernels; default: $GPTOSS_KERNELS, else auto)")
    p.add_argument("--dense-experts", action="store_true",
                   help="keep a bf16 copy of the MXFP4 expert weights for large steps (run.py --dense-experts; "
                        "4x the expert memory)")
    add_json_option(p, "the results")
    args = p.parse_args(argv)
    if (code := json_path_error("bench_long_prompt.py", args)) is not None:
        return code
    from gptoss.config import PRESETS

    if args.preset not in PRESETS:
        return error("bench_long_prompt.py", f"unknown preset {args.preset!r} (one of {', '.join(PRESETS)})")
    cfg = PRESETS[args.preset]
    if args.tokens < 1:
        return error("bench_long_prompt.py", f"--tokens must be at least 1 (got {args.tokens})")
    if args.tokens + 1 > cfg.max_context:
        return error("bench_long_prompt.py", f"--tokens {args.tokens} leaves no room for a token in the "
                     f"{cfg.max_context}-position context")

    import cupy
    from gptoss.batch import StepBatch
    from gptoss.engine import Engine, EngineConfig
    from gptoss.engine.gpu_runner import GPUModelRunner
    from gptoss.errors import GptossError
    from gptoss.kernels import KernelOptions
    from gptoss.sampling import SamplingParams
    from gptoss.weights import random_weights

    budgets = args.prefill_tokens
    kernels = KernelOptions.from_env(mode=args.kernels)
    t0 = time.perf_counter()
    config = EngineConfig(max_seqs=1, kernels=kernels, dense_experts=args.dense_experts)
    try:
        runner = GPUModelRunner(random_weights(cfg, "mxfp4", seed=0), config, progress=False)
    except (ValueError, GptossError) as e:  # e.g. --dense-experts that does not fit or has no kernel to read it
        return error("bench_long_prompt.py", str(e))
    print(f"uploaded {args.preset} and compiled in {time.perf_counter() - t0:.1f} s; kernels {runner.kernels.mode}",
          flush=True)
    prompt = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 199_998), args.tokens).tolist()
    results = {"preset": args.preset, "tokens": args.tokens, "device": runner.device_name,
               "dense_experts": args.dense_experts, "runs": {}}
    for budget in budgets:
        runner.config = dataclasses.replace(runner.config, prefill_tokens=budget)  # the runner plans from it
        engine = Engine(runner, runner.config)
        engine.add_request(prompt, SamplingParams(max_tokens=1))
        steps, cupy_pool = 0, cupy.get_default_memory_pool()
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        seconds = time.perf_counter() - t
        run = {"seconds": seconds, "steps": steps, "tokens_per_s": args.tokens / seconds,
               "pool_gib": cupy_pool.total_bytes() / 2**30}  # CuPy's pool after the run (it never shrinks)
        # the last chunk again, eager and profiled (it rewrites the same keys and values)
        chunk = min(budget, args.tokens)
        start = args.tokens - chunk
        step = StepBatch.prefill([np.asarray(prompt[start:], np.int32)], [0], [start])
        prof = runner.model.profile(step)
        full_layers = sum(1 for i in range(cfg.num_layers) if not cfg.is_sliding(i))
        flops = attention_work(cfg, StepShape.prefill(chunk, start), 0).flops * full_layers
        run["last_chunk_profile_ms"] = prof
        run["last_chunk_full_attention_tflops"] = flops / (prof.get("attention full", float("nan")) * 1e9)
        results["runs"][budget] = run
        print(f"budget {budget:6d}: {seconds:6.2f} s to the first token, {steps} steps, "
              f"{args.tokens / seconds:9,.0f} prompt tok/s, GPU memory held {run['pool_gib']:.1f} GiB", flush=True)
        total = sum(prof.values())
        print(f"  last chunk ({chunk} tokens at {start}..): {total:.1f} ms of GPU time; full attention "
              f"{prof.get('attention full', 0):.1f} ms = {run['last_chunk_full_attention_tflops']:.0f} TFLOP/s")
        for name, ms in sorted(prof.items(), key=lambda kv: -kv[1])[:8]:
            print(f"    {name:28s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
        runner.model = None
        del engine
    if args.json:
        write_json(args.json, results, indent=2)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("bench_long_prompt.py", main))
