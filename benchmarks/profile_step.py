#!/usr/bin/env python3
"""Per-kernel GPU time of one engine step of a random real-shape model: each kernel family's share of its
roofline (`roofline`), or each kernel alone under Nsight Compute (`run`, `summarize`).

  python benchmarks/profile_step.py roofline --batches 1,256 --context 1024 --prefill 1024

`roofline` times every kernel family of one eager step (GPUModel.profile: CUDA events between launches,
the median of --repeats profiles) for decode steps of each --batches size (every sequence --context
cached positions) and one prefill of --prefill tokens, and prints per family the milliseconds, the bytes
it must move and the flops it must do (benchmarks/roofline.py), the TB/s and TFLOP/s reached and the
share of its roofline, max(bytes / --copy-tbps, flops / --peak-tflops) over its time; a sum row holds
the whole step against the whole step's roofline. The experts each layer's weights are read for: the
expected count under uniform routing (k at one token), or with --experts-touched last-layer the count
the step's last layer routed to (both are printed).

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


def random_model(preset: str, slots: int, capacity: int, max_step_tokens: int, dense_experts: bool = False):
    """A GPUModel of random weights of the preset's shape (MXFP4 experts, with their dense copies when
    dense_experts) whose KV caches hold random rows (every slot the same rows: cheap, and real reads)."""
    from benchmarks.kernel_attention import _rand_bf16
    from gptoss.config import PRESETS
    from gptoss.gpu_weights import DeviceWeights
    from gptoss.model import GPUModel
    from gptoss.weights import random_weights

    weights = DeviceWeights(random_weights(PRESETS[preset], "mxfp4", seed=0), progress=False,
                            dense_experts=dense_experts)
    model = GPUModel(weights, slots=slots, capacity=capacity, max_step_tokens=max_step_tokens)
    for cache in model.cache.k + model.cache.v:
        cache[...] = _rand_bf16((1,) + cache.shape[1:])
    return model


def run(args) -> None:
    import cupy
    import numpy as np

    from gptoss.batch import StepBatch

    B, extra = args.batch, args.chunks * args.chunk if args.kind == "mixed" else 0
    model = random_model(args.preset, B + args.chunks, args.context + 256 + args.chunk, B + extra, args.dense_experts)
    cfg = model.cfg
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


def median_profile(profiles: list[dict]) -> dict:
    """Per family (in the first profile's order), the median of its milliseconds over the profiles."""
    import statistics

    return {name: statistics.median(p.get(name, 0.0) for p in profiles) for name in profiles[0]}


def roofline_report(cfg, title: str, shape, profile_ms: dict, last_layer_experts: int | None,
                    experts_touched: str, ceilings) -> tuple[str, dict]:
    """The printed section of one step (title, the experts-touched line, the table) and its JSON record."""
    from benchmarks.roofline import expected_experts_touched, family_work, format_table

    uniform = expected_experts_touched(cfg.num_experts, cfg.experts_per_token, shape.tokens)
    used = uniform if experts_touched == "uniform" or last_layer_experts is None else float(last_layer_experts)
    work = family_work(cfg, shape, "mxfp4", used)
    measured = "" if last_layer_experts is None else f"; the last layer's routing touched {last_layer_experts}"
    text = "\n".join([
        f"### {title}",
        f"experts read per layer: {used:.2f} of {cfg.num_experts} ({experts_touched} used; uniform routing "
        f"expects {uniform:.2f}{measured})",
        "", format_table(profile_ms, work, ceilings), ""])
    record = {"profile_ms": profile_ms, "experts_touched": used, "last_layer_experts": last_layer_experts,
              "work": {name: {"bytes": w.bytes, "flops": w.flops} for name, w in work.items()}}
    return text, record


def report_steps(args, cfg, steps, measure, device: str) -> dict:
    """Print each step's section, measure(step, shape) giving its (profile, last layer's experts); then
    write the records to --json when asked. Returns the record."""
    from benchmarks.common import write_json
    from benchmarks.roofline import Ceilings

    ceilings = Ceilings(args.copy_tbps, args.peak_tflops)
    results = {"preset": args.preset, "context": args.context, "copy_tbps": args.copy_tbps,
               "peak_tflops": args.peak_tflops, "device": device, "steps": {}}
    for title, shape, step in steps:
        profile_ms, last = measure(step, shape)
        text, record = roofline_report(cfg, f"{args.preset}, {title} (median of {args.repeats})", shape,
                                       profile_ms, last, args.experts_touched, ceilings)
        print(text, flush=True)
        results["steps"][title] = record
    if args.json:
        write_json(args.json, results, indent=2)
    return results


def roofline_steps(cfg, batches: list[int], context: int, prefill: int) -> list:
    """(title, StepShape, StepBatch) of a decode step per batch size and the prefill step (if any)."""
    import numpy as np

    from benchmarks.roofline import StepShape
    from gptoss.batch import StepBatch

    rng = np.random.default_rng(0)
    steps = [(f"decode, batch {b}, context {context}", StepShape.decode(b, context),
              StepBatch.decode(rng.integers(0, cfg.vocab_size, b), np.full(b, context), np.arange(b)))
             for b in batches]
    if prefill:
        steps.append((f"prefill of {prefill} tokens", StepShape.prefill(prefill),
                      StepBatch.prefill([rng.integers(0, cfg.vocab_size, prefill)], [0])))
    return steps


def roofline(args) -> int:
    import time

    import cupy

    t0 = time.perf_counter()
    max_b = max(args.batches)
    model = random_model(args.preset, max_b, max(args.context + 1, args.prefill) + 16, max(max_b, args.prefill),
                         args.dense_experts)
    cupy.cuda.Device().synchronize()
    print(f"{args.preset}: random weights uploaded and caches filled in {time.perf_counter() - t0:.1f} s", flush=True)

    def measure(step, shape):
        # warm-up: compiles every kernel the step launches, the sampling's too (forward() does not sample;
        # a compile inside a profile stalls the host past the GPU's hold and shows up as kernel time)
        model.profile(step)
        profiles = [model.profile(step) for _ in range(args.repeats)]
        # the MoE workspace holds the last layer's routing of the step: the distinct experts it chose
        last = int(cupy.unique(model.buf.moe.experts[:shape.tokens * model.cfg.experts_per_token]).size)
        return median_profile(profiles), last

    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    report_steps(args, model.cfg, roofline_steps(model.cfg, args.batches, args.context, args.prefill), measure, device)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


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
    from benchmarks.common import add_json_option, json_path_error, positive_ints
    from benchmarks.roofline import H200_BF16_TFLOPS, H200_COPY_TBPS
    from gptoss.cli import error

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("roofline", help="each kernel family's time, bytes, flops and share of its roofline")
    f.add_argument("--preset", default="gpt-oss-20b", help="model shape (gptoss.config.PRESETS)")
    f.add_argument("--batches", type=positive_ints, default=[1, 256],
                   help="decode batch sizes, comma-separated (default: 1,256)")
    f.add_argument("--context", type=int, default=1024, help="tokens cached per decode sequence")
    f.add_argument("--prefill", type=int, default=1024, help="tokens of the prefill step profiled (0: none)")
    f.add_argument("--repeats", type=int, default=3, help="profiles per step; each family's median is shown")
    f.add_argument("--experts-touched", choices=("uniform", "last-layer"), default="uniform",
                   help="experts whose weights each layer reads: the uniform-routing expectation, or as many "
                        "as the step's last layer routed to")
    f.add_argument("--copy-tbps", type=float, default=H200_COPY_TBPS, help="copy bandwidth ceiling, TB/s (default: %(default)s, measured on the H200)")
    f.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="bf16 tensor-core ceiling, TFLOP/s (default: %(default)s, measured on the H200)")
    dense_help = ("with the dense copies of the expert weights (run.py --dense-experts; the roofline still "
                  "counts the MXFP4 bytes)")
    f.add_argument("--dense-experts", action="store_true", help=dense_help)
    add_json_option(f, "each step's profile and modelled work")
    r = sub.add_parser("run", help="one step between cudaProfilerStart/Stop (run it under ncu)")
    r.add_argument("kind", choices=("decode", "mixed"),
                   help="decode: --batch decode tokens; mixed: the same plus --chunks prompt chunks")
    r.add_argument("--preset", default="gpt-oss-20b", help="model shape (gptoss.config.PRESETS)")
    r.add_argument("--batch", type=int, default=2048, help="decode sequences in the step")
    r.add_argument("--context", type=int, default=1024, help="tokens cached per decode sequence")
    r.add_argument("--chunks", type=int, default=16, help="mixed: prompt chunks in the step")
    r.add_argument("--chunk", type=int, default=256, help="mixed: tokens per prompt chunk")
    r.add_argument("--dense-experts", action="store_true", help=dense_help)
    s = sub.add_parser("summarize", help="per-kernel totals of ncu's --csv --page raw output")
    s.add_argument("csv", help="the file ncu --csv --page raw wrote")
    args = p.parse_args(argv)
    if args.cmd == "roofline":
        from gptoss.config import PRESETS

        if args.preset not in PRESETS:
            return error("profile_step.py", f"unknown preset {args.preset!r} (one of {', '.join(PRESETS)})")
        if args.context < 0 or args.prefill < 0 or args.repeats < 1 or args.copy_tbps <= 0 or args.peak_tflops <= 0:
            return error("profile_step.py", "--context and --prefill must not be negative, --repeats must be at "
                                            "least 1, the ceilings positive")
        if (code := json_path_error("profile_step.py", args)) is not None:
            return code
        return roofline(args)
    if args.cmd == "run":
        run(args)
    else:
        summarize(args.csv)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("profile_step.py", main))
