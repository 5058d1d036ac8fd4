#!/usr/bin/env python3
"""Per-kernel GPU time of one engine step of a random real-shape model, measured by Nsight Compute.

  ncu --profile-from-start off --cache-control none --clock-control none \\
      --metrics gpu__time_duration.sum --csv --page raw \\
      python benchmarks/profile_step.py run decode --batch 2048 --context 1024 > step.csv
  python benchmarks/profile_step.py summarize step.csv

`run` builds the model (random weights, speed does not depend on them), fills every KV cache with random
rows, runs the step twice to warm up, then once more between cudaProfilerStart/Stop: ncu times exactly
that step's kernels, each alone (no cache flush, clocks as they are). `decode`: --batch sequences with
--context cached tokens, one token each (getp's decode phase). `mixed`: the same decode tokens plus
--chunks prompt chunks of --chunk tokens at position 256 (a getp step that carries prompts).
`summarize` adds the durations up per kernel name.
"""
from __future__ import annotations

import argparse
import collections
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(args) -> None:
    import cupy
    import numpy as np

    from benchmarks.kernel_attention import _rand_bf16
    from gptoss.config import PRESETS
    from gptoss.batch import StepBatch
    from gptoss.gpu_weights import DeviceWeights
    from gptoss.model import GPUModel
    from gptoss.weights import random_weights

    cfg = PRESETS[args.preset]
    weights = DeviceWeights(random_weights(cfg, "mxfp4", seed=0), progress=False)
    B, extra = args.batch, args.chunks * args.chunk if args.kind == "mixed" else 0
    model = GPUModel(weights, slots=B + args.chunks, capacity=args.context + 256 + args.chunk,
                     max_step_tokens=B + extra, max_chunk=args.chunk)
    for cache in model.cache.k + model.cache.v:  # every slot the same random rows: cheap, and real reads
        cache[...] = _rand_bf16((1,) + cache.shape[1:])
    rng = np.random.default_rng(0)
    step = StepBatch.decode(rng.integers(0, cfg.vocab_size, B), np.full(B, args.context),
                            np.arange(B))
    if args.kind == "mixed":
        pre = StepBatch.prefill([rng.integers(0, cfg.vocab_size, args.chunk) for _ in range(args.chunks)],
                                list(range(B, B + args.chunks)), [256] * args.chunks)
        cat = np.concatenate
        step = StepBatch(cat([step.tokens, pre.tokens]), cat([step.positions, pre.positions]),
                         cat([step.slots, pre.slots]), step.q_lens + pre.q_lens, step.seq_slots + pre.seq_slots,
                         step.seq_starts + pre.seq_starts, cat([step.logit_rows, pre.logit_rows + B]))
    for _ in range(2):
        model.forward(step)
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.start()
    model.forward(step)
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.stop()


def summarize(path: str) -> None:
    rows = list(csv.reader(open(path)))
    header = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if header is None:
        print(f"profile_step.py: error: {path}: no kernel rows (run the step under ncu with --csv --page raw "
              "and the gpu__time_duration.sum metric, as in this script's help)", file=sys.stderr)
        sys.exit(2)
    names = rows[header]
    k, t = names.index("Kernel Name"), names.index("gpu__time_duration.sum")
    unit = rows[header + 1][t]
    total, count = collections.Counter(), collections.Counter()
    for r in rows[header + 2:]:
        try:
            total[r[k]] += float(r[t].replace(",", ""))
            count[r[k]] += 1
        except (IndexError, ValueError):
            continue
    scale = {"ns": 1e-6, "us": 1e-3, "usecond": 1e-3, "nsecond": 1e-6, "ms": 1.0, "msecond": 1.0}.get(unit, None)
    s = sum(total.values())
    print(f"{s * scale:.2f} ms in all" if scale else f"{s:.1f} {unit} in all")
    for name, v in total.most_common():
        shown = f"{v * scale:9.3f} ms" if scale else f"{v:12.1f} {unit}"
        print(f"{shown} {100 * v / s:5.1f}%  x{count[name]:<4d} {name[:80]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one step between cudaProfilerStart/Stop (run it under ncu)")
    r.add_argument("kind", choices=("decode", "mixed"))
    r.add_argument("--preset", default="gpt-oss-20b", help="model shape (gptoss.config.PRESETS)")
    r.add_argument("--batch", type=int, default=2048, help="decode sequences in the step")
    r.add_argument("--context", type=int, default=1024, help="tokens cached per decode sequence")
    r.add_argument("--chunks", type=int, default=16, help="mixed: prompt chunks in the step")
    r.add_argument("--chunk", type=int, default=256, help="mixed: tokens per prompt chunk")
    s = sub.add_parser("summarize", help="per-kernel totals of ncu's --csv --page raw output")
    s.add_argument("csv")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args)
    else:
        summarize(args.csv)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("profile_step.py", main))
