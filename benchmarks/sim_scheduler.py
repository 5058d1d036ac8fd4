#!/usr/bin/env python3
"""The continuous-batching scheduler on a modeled GPU: how batch policies play out, without a GPU.

  python benchmarks/sim_scheduler.py [--prompts 2048] [-n 1024] [--free 65.5] [--stop-rate 0,0.003]

Runs the real scheduler (gptoss.batching: plan_memory, admission, pages, preemption) over a stand-in
model whose step takes a MODELED time, fitted to the H200 measurements of gpt-oss-20b (BENCHMARKS.md,
2026-11-30; docs/notes/attention.md): a decode step of B sequences with C cached keys in all takes
FIXED + PER_SEQ * B + PER_KEY * C milliseconds, and a prompt token PER_PROMPT_TOKEN more. The figures are
a model, not a measurement: use them to compare policies, then measure the one you keep on the device.

Each row: the KV layout (contiguous = every slot holds its whole capacity, as before paging; paged
with a promise share), the slots and pages planned for --free GiB beside the weights, the most
sequences that ran at once, preemptions, and modeled generated tokens/s. --stop-rate p ends each
generated token's sequence with probability p (a stop token; 0 = --ignore-eos).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

# ms; fitted to H200 gpt-oss-20b decode steps (58.5 ms at 2,048 x ~1,024 keys, 36.7 at 1,100 x ~1,070,
# 16.8 ms of attention decode at 2,048 x 1,024) and prompt-chunk steps (27.6 s for 1.14 M prompt tokens)
FIXED, PER_SEQ, PER_KEY, PER_PROMPT_TOKEN = 8.1, 0.0168, 8.65e-6, 0.02
STOP = 1  # the stand-in's stop token


class ModeledModel:
    """GPUModel's step() interface: a token per logit row (STOP with the stop rate, else 2), and the
    modeled time of the step."""

    def __init__(self, slots, capacity, chunk, max_step_tokens, pages, stop_rate, seed=0):
        from gptoss.model import PAGE, PageTable

        self.slots, self.capacity, self.max_step_tokens = slots, capacity, max_step_tokens
        self.cache = SimpleNamespace(max_chunk=chunk, page_table=PageTable(slots + 1, -(-capacity // PAGE), pages))
        self.stop_rate, self.rng, self.ms = stop_rate, np.random.default_rng(seed), 0.0

    def step(self, step, args, use_graph=True):
        decode = np.asarray(step.q_lens) == 1
        keys = int(np.sum(np.asarray(step.seq_starts)[decode] + 1))
        self.ms += (FIXED + PER_SEQ * int(decode.sum()) + PER_KEY * keys
                    + PER_PROMPT_TOKEN * (len(step.tokens) - int(decode.sum())))
        R = len(step.logit_rows)
        return np.where(self.rng.random(R) < self.stop_rate, STOP, 2).astype(np.int32)


def simulate(cfg, lengths, new, free_gib, stop_rate, promise, paged=True):
    from gptoss.batching import PREFILL_CHUNK, GPUBackend, plan_memory
    from gptoss.engine import Request
    from gptoss.sampling import SamplingParams

    capacity = int(lengths.max()) + new
    mean = int(np.mean(lengths + max(promise, 0.5) * new)) + 1 if paged else None
    plan = plan_memory(cfg, int(free_gib * 2**30), capacity, len(lengths), mean)
    model = ModeledModel(plan.slots, capacity, min(PREFILL_CHUNK, capacity), plan.max_step_tokens, plan.pages,
                         stop_rate)
    backend = object.__new__(GPUBackend)  # the scheduler alone, over the modeled model
    backend.config = SimpleNamespace(max_context=cfg.max_context)
    backend.use_graphs, backend.step_prefill_tokens, backend.stats = True, 4096, {}
    backend.promise = promise if paged else 1.0
    backend.model = model
    backend._model_for = lambda *args: model
    requests = [Request(i, [2] * int(n), new) for i, n in enumerate(lengths)]
    generated = 0
    for step in backend.generate_steps(requests, SamplingParams(), stop_ids=(STOP,)):
        generated += int(np.count_nonzero(step.token >= 0))
    s = backend.stats
    layout = f"paged, promise {promise:g}" if paged else "contiguous"
    return (f"{layout:22s} stop {stop_rate:<6g} slots {plan.slots:5d} pages {plan.pages:6d} "
            f"most running {s['most_running']:5d} preemptions {s['preemptions']:5d}  "
            f"modeled {generated / model.ms * 1000:9,.0f} generated tok/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b")
    p.add_argument("--prompts", type=int, default=2048)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("-n", "--steps", type=int, default=1024, help="most new tokens per prompt")
    p.add_argument("--free", type=float, default=65.5,
                   help="GiB beside the weights (65.5: an H100 80GB with 20b; 126: an H200)")
    p.add_argument("--stop-rate", default="0", help="comma-separated stop probabilities per token")
    p.add_argument("--promise", default="0,0.5,1", help="comma-separated promise shares for the paged rows")
    args = p.parse_args(argv)

    from gptoss.config import PRESETS

    lengths = np.random.default_rng(0).integers(args.min_len, args.max_len + 1, args.prompts)
    for rate in (float(x) for x in args.stop_rate.split(",")):
        print(simulate(PRESETS[args.preset], lengths, args.steps, args.free, rate, 1.0, paged=False), flush=True)
        for promise in (float(x) for x in args.promise.split(",")):
            print(simulate(PRESETS[args.preset], lengths, args.steps, args.free, rate, promise), flush=True)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("sim_scheduler.py", main))
