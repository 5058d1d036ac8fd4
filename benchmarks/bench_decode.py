#!/usr/bin/env python3
"""Prefill and decode speed of the GPU model on a random checkpoint of a real shape (default 20b).

  python benchmarks/bench_decode.py [--preset gpt-oss-20b] [--batches 1,8,64] [--context 1024]
                                   [--kernels auto|portable] [--dense-experts]

Random weights in the exact layout (speed does not depend on the values), generated in memory: no
file. Prefill: one prompt of --prompt-len tokens. Decode: B sequences whose caches already hold
--context tokens each, one token per sequence per step, greedy, sampled ids fed back through the host
as run.py does. Prints tokens/s and the time per step against the weight-streaming bound.
GPTOSS_PDL=1 in the environment launches with programmatic dependent launch (gptoss/kernels/launch.py),
GPTOSS_WGMMA=0 without the wgmma kernels.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from benchmarks.common import H100_BF16_TFLOPS, add_json_option, json_path_error, write_json
from gptoss.cli import error
from gptoss.kernels import KERNEL_MODES


def print_profile(prof: dict, what: str) -> None:
    total = sum(prof.values())
    print(f"  {what}, per kernel family ({total:.2f} ms of GPU time, launches queued ahead):")
    for name, ms in sorted(prof.items(), key=lambda kv: -kv[1]):
        print(f"    {name:32s} {ms:8.3f} ms  {100 * ms / total:5.1f}%")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b", help="model shape (gptoss.config.PRESETS)")
    p.add_argument("--experts", default="mxfp4", choices=("mxfp4", "bf16"),
                   help="the expert weights' format (default mxfp4, as the checkpoints)")
    p.add_argument("--batches", default="1,8,64", help="decode batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=int, default=1024, help="prefill benchmark prompt length")
    p.add_argument("--context", type=int, default=1024, help="tokens already cached per sequence at decode")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay decode steps from a captured CUDA graph (default on)")
    p.add_argument("--kernels", choices=KERNEL_MODES, default=None,
                   help="GPU kernel mode (run.py --kernels): portable = the portable paths, the code an AMD "
                        "GPU runs (default: $GPTOSS_KERNELS, else auto)")
    p.add_argument("--dense-experts", action="store_true",
                   help="keep a bf16 copy of the MXFP4 expert weights for large steps (run.py --dense-experts; "
                        "4x the expert memory)")
    add_json_option(p, "the results")
    args = p.parse_args(argv)
    if (code := json_path_error("bench_decode.py", args)) is not None:
        return code
    from gptoss.kernels import KernelOptions

    kernels = KernelOptions.from_env(mode=args.kernels)
    if args.dense_experts:
        from gptoss.gpu_weights import check_dense_experts

        try:  # before the upload: bf16 experts, or no wgmma kernel to read the copy
            check_dense_experts(args.experts, kernels)
        except ValueError as e:
            return error("bench_decode.py", str(e))

    import cupy
    from gptoss.config import PRESETS
    from gptoss.batch import StepBatch
    from gptoss.gpu_weights import DeviceWeights
    from gptoss.model import GPUModel
    from gptoss.weights import random_weights

    cfg = PRESETS[args.preset]
    batches = [int(b) for b in args.batches.split(",")]
    kernels = kernels.resolve()
    t0 = time.perf_counter()
    weights = DeviceWeights(random_weights(cfg, args.experts, seed=0), dense_experts=args.dense_experts,
                            kernels=kernels)
    cupy.cuda.Device().synchronize()
    dense = ", dense copy" if args.dense_experts else ""
    print(f"uploaded {args.preset} ({args.experts} experts{dense}) in {time.perf_counter() - t0:.1f} s", flush=True)

    capacity = max(args.prompt_len, args.context) + args.steps + 16
    max_b = max(batches)
    model = GPUModel(weights, slots=max_b, capacity=capacity,
                     max_step_tokens=max(args.prompt_len, max_b), kernels=kernels)
    rng = np.random.default_rng(0)
    results = {"preset": args.preset, "experts": args.experts, "dense_experts": args.dense_experts,
               "kernels": model.kernels.mode,
               "pdl": model.kernels.pdl, "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    print(f"kernels: {model.kernels.mode}, programmatic dependent launch {'on' if model.kernels.pdl else 'off'}",
          flush=True)

    # prefill: one sequence, one chunk
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).astype(np.int32)
    step = StepBatch.prefill([prompt], [0])
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
    flops = 2 * args.prompt_len * cfg.active_matmul_params_per_token()
    print(f"prefill {args.prompt_len} tokens: {prefill_s * 1e3:.1f} ms, {args.prompt_len / prefill_s:,.0f} tokens/s, "
          f"{flops / prefill_s / 1e12:.0f} TFLOP/s in matmuls (of ~{H100_BF16_TFLOPS:.0f})", flush=True)

    prof = model.profile(step)
    results["prefill_profile"] = prof
    print_profile(prof, f"one prefill step of {args.prompt_len} tokens")

    # decode: fill the caches with --context tokens (chunked prefill over all slots), then time steps
    contexts = rng.integers(0, cfg.vocab_size, (max_b, args.context)).astype(np.int32)
    per_step = max(1, args.prompt_len // args.context) if args.context <= args.prompt_len else 1
    chunk = min(args.context, args.prompt_len)
    for s0 in range(0, max_b, per_step):
        seqs = list(range(s0, min(max_b, s0 + per_step)))
        for c0 in range(0, args.context, chunk):
            model.forward(StepBatch.prefill([contexts[s, c0:c0 + chunk] for s in seqs], seqs, [c0] * len(seqs)))
    cupy.cuda.Device().synchronize()
    results["decode"] = {}
    results["profile"] = {}
    for b in batches:
        slots = np.arange(b, dtype=np.int32)
        tokens = rng.integers(0, cfg.vocab_size, b).astype(np.int32)
        positions = np.full(b, args.context, np.int32)
        tokens = model.step(StepBatch.decode(tokens, positions, slots), use_graph=args.graphs)  # warm-up (greedy)
        cupy.cuda.Device().synchronize()
        t = time.perf_counter()
        for i in range(args.steps):
            positions = positions + 1
            tokens = model.step(StepBatch.decode(tokens, positions, slots), use_graph=args.graphs)
        elapsed = time.perf_counter() - t
        step_ms = elapsed / args.steps * 1e3
        tps = b * args.steps / elapsed
        results["decode"][b] = {"step_ms": step_ms, "tokens_per_s": tps}
        print(f"decode batch {b:5d} (context {args.context}): {step_ms:7.2f} ms/step, {tps:10,.1f} tokens/s "
              f"(graphs {'on' if args.graphs else 'off'})", flush=True)
        prof = model.profile(StepBatch.decode(tokens, positions + 1, slots))
        results["profile"][b] = prof
        print_profile(prof, f"one decode step at batch {b}")
    if args.json:
        write_json(args.json, results, indent=2)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("bench_decode.py", main))
