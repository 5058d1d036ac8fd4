#!/usr/bin/env python3
"""Prefill and decode speed of the GPU model on a random checkpoint of a real shape (default 20b).

  python benchmarks/bench_decode.py [--preset gpt-oss-20b] [--batches 1,8,64] [--context 1024]

Random weights in the exact layout (speed does not depend on the values), generated in memory: no
file. Prefill: one prompt of --prompt-len tokens. Decode: B sequences whose caches already hold
--context tokens each, one token per sequence per step, greedy, sampled ids fed back through the host
as run.py does. Prints tokens/s and the time per step against the weight-streaming bound.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b", help="model shape (gptoss.config.PRESETS)")
    p.add_argument("--experts", default="mxfp4", choices=("mxfp4", "bf16"))
    p.add_argument("--batches", default="1,8,64", help="decode batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=int, default=1024, help="prefill benchmark prompt length")
    p.add_argument("--context", type=int, default=1024, help="tokens already cached per sequence at decode")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay decode steps from a captured CUDA graph (default on)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import cupy
    from gptoss.config import PRESETS
    from gptoss.model import DeviceWeights, GPUModel
    from gptoss.synthetic import random_weights

    cfg = PRESETS[args.preset]
    batches = [int(b) for b in args.batches.split(",")]
    t0 = time.perf_counter()
    weights = DeviceWeights(random_weights(cfg, args.experts, seed=0))
    cupy.cuda.Device().synchronize()
    print(f"uploaded {args.preset} ({args.experts} experts) in {time.perf_counter() - t0:.1f} s", flush=True)

    capacity = max(args.prompt_len, args.context) + args.steps + 16
    max_b = max(batches)
    model = GPUModel(weights, slots=max_b, capacity=capacity,
                     max_step_tokens=max(args.prompt_len, max_b), max_chunk=args.prompt_len)
    rng = np.random.default_rng(0)
    results = {"preset": args.preset, "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}

    # prefill: one sequence, one chunk
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).astype(np.int32)
    step = model.prefill_step([prompt], [0])
    model.forward(step)  # warm-up: compiles every kernel
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model.forward(step)
        cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - t)
    prefill_s = min(times)
    results["prefill_tokens_per_s"] = args.prompt_len / prefill_s
    print(f"prefill {args.prompt_len} tokens: {prefill_s * 1e3:.1f} ms, "
          f"{args.prompt_len / prefill_s:,.0f} tokens/s", flush=True)

    # decode: fill each slot's cache with --context tokens (chunked prefill), then time steps
    results["decode"] = {}
    for b in batches:
        contexts = [rng.integers(0, cfg.vocab_size, args.context).astype(np.int32) for _ in range(b)]
        for s in range(b):
            model.forward(model.prefill_step([contexts[s]], [s]))
        tokens = rng.integers(0, cfg.vocab_size, b).astype(np.int32)
        positions = np.full(b, args.context, np.int32)
        runner = model.decoder(b, use_graph=args.graphs)
        runner(tokens, positions, np.arange(b, dtype=np.int32))  # warm-up / capture
        cupy.cuda.Device().synchronize()
        t = time.perf_counter()
        for i in range(args.steps):
            positions = positions + 1
            tokens = runner(tokens, positions, np.arange(b, dtype=np.int32))  # host ids, greedy
        elapsed = time.perf_counter() - t
        step_ms = elapsed / args.steps * 1e3
        tps = b * args.steps / elapsed
        results["decode"][b] = {"step_ms": step_ms, "tokens_per_s": tps}
        print(f"decode batch {b:5d} (context {args.context}): {step_ms:7.2f} ms/step, {tps:10,.1f} tokens/s",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
