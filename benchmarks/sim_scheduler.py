#!/usr/bin/env python3
"""The continuous-batching scheduler on a modeled GPU: how batch policies play out, without a GPU.

  python benchmarks/sim_scheduler.py [--prompts 2048] [-n 1024] [--free 65.5] [--stop-rate 0,0.003]
                                     [--prefill-tokens 8192]

Runs the real engine (gptoss.engine: the GPU runner's memory plan, admission, pages, preemption) over
a stand-in runner whose step takes a MODELED time, fitted to the H200 measurements of gpt-oss-20b (BENCHMARKS.md,
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

# ms; fitted to H200 gpt-oss-20b decode steps (58.5 ms at 2,048 x ~1,024 keys, 36.7 at 1,100 x ~1,070,
# 16.8 ms of attention decode at 2,048 x 1,024) and prompt-chunk steps (27.6 s for 1.14 M prompt tokens)
FIXED, PER_SEQ, PER_KEY, PER_PROMPT_TOKEN = 8.1, 0.0168, 8.65e-6, 0.02
# gpt-oss-120b (--preset gpt-oss-120b): 20b's scaled by its 36 layers and the whole expert set read at
# any sizable batch; about 9% faster than the two 120b getp runs measured with it (docs/notes/attention.md,
# "One wave for 120b": 7,470 and 8,360 modeled, 6,872 and 7,679 measured), alike for both
STEP_MODELS = {"gpt-oss-20b": (FIXED, PER_SEQ, PER_KEY, PER_PROMPT_TOKEN),
               "gpt-oss-120b": (30.0, 0.025, 1.3e-5, 0.03)}
STOP = 1  # the stand-in's stop token


class ModeledRunner:
    """A ModelRunner whose cache is sized by the GPU runner's memory plan for `free_gib` GiB, and whose
    step gives a token per logit row (STOP with the stop rate, else 2) and adds the step's modeled time."""

    name = "modeled H200"

    def __init__(self, cfg, free_gib, config, stop_rate, paged=True, seed=0):
        self.model_config, self.config, self.free, self.paged = cfg, config, int(free_gib * 2**30), paged
        self.stop_rate, self.rng, self.ms = stop_rate, np.random.default_rng(seed), 0.0
        from gptoss.config import PRESETS

        preset = next((name for name, c in PRESETS.items() if c == cfg and name in STEP_MODELS), "gpt-oss-20b")
        self.step_model = STEP_MODELS[preset]

    def slots_for(self, capacity, slots, mean_positions):
        from gptoss.engine.gpu_runner import plan_memory

        return plan_memory(self.model_config, self.free, capacity, slots, mean_positions, self.config).slots

    def allocate(self, capacity, slots, mean_positions):
        from gptoss.engine.gpu_runner import plan_memory
        from gptoss.engine.runner import Layout
        from gptoss.model import GPUModel

        # not paged: every slot sized for a whole capacity (the plan's default), as before paging
        plan = plan_memory(self.model_config, self.free, capacity, slots, mean_positions if self.paged else None,
                           self.config)
        tokens, _ = GPUModel.step_sizes(plan.slots, plan.max_step_tokens)
        return Layout(plan.slots, capacity, plan.pages, tokens, self.config.step_tokens(plan.slots, capacity)[1])

    def step(self, batch):
        decode = np.asarray(batch.q_lens) == 1
        keys = int(np.sum(np.asarray(batch.seq_starts)[decode] + 1))
        fixed, per_seq, per_key, per_prompt_token = self.step_model
        self.ms += (fixed + per_seq * int(decode.sum()) + per_key * keys
                    + per_prompt_token * (len(batch.tokens) - int(decode.sum())))
        R = len(batch.logit_rows)
        return np.where(self.rng.random(R) < self.stop_rate, STOP, 2).astype(np.int32)


def simulate(cfg, lengths, new, free_gib, stop_rate, promise, paged=True, prefill_tokens=None):
    """One row: the engine over a ModeledRunner (`paged` False: the contiguous cache before paging,
    every slot sized for a whole capacity, promise 1); prefill_tokens: EngineConfig's (a step prefills
    at most prefill_tokens prompt tokens; None: the default)."""
    from gptoss.engine import Engine, EngineConfig
    from gptoss.sampling import SamplingParams

    sizes = {} if prefill_tokens is None else {"prefill_tokens": prefill_tokens}
    config = EngineConfig(promise=promise if paged else 1.0, **sizes)
    runner = ModeledRunner(cfg, free_gib, config, stop_rate, paged)
    engine = Engine(runner, eos_token_ids=(STOP,))
    params = SamplingParams(max_tokens=new)
    for n in lengths:
        engine.add_request([2] * int(n), params)
    generated = 0
    while engine.has_unfinished():
        generated += int(np.count_nonzero(engine.step().token >= 0))
    s = engine.stats
    chosen = "" if promise is not None else f" ({engine.scheduler.promise:g})"
    layout = f"paged, promise {'auto' if promise is None else f'{promise:g}'}{chosen}" if paged else "contiguous"
    return (f"{layout:22s} stop {stop_rate:<6g} slots {s['slots']:5d} pages {s['pages']:6d} "
            f"most running {s['most_running']:5d} preemptions {s['preemptions']:5d}  "
            f"modeled {generated / runner.ms * 1000:9,.0f} generated tok/s")


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
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="EngineConfig.prefill_tokens: most prompt tokens one step prefills (default: its default)")
    p.add_argument("--promise", default="0,0.5,1,auto",
                   help="comma-separated promise shares for the paged rows (auto: EngineConfig.promise None)")
    args = p.parse_args(argv)

    from gptoss.config import PRESETS

    lengths = np.random.default_rng(0).integers(args.min_len, args.max_len + 1, args.prompts)
    for rate in (float(x) for x in args.stop_rate.split(",")):
        print(simulate(PRESETS[args.preset], lengths, args.steps, args.free, rate, 1.0, paged=False,
                       prefill_tokens=args.prefill_tokens), flush=True)
        for promise in (None if x == "auto" else float(x) for x in args.promise.split(",")):
            print(simulate(PRESETS[args.preset], lengths, args.steps, args.free, rate, promise,
                           prefill_tokens=args.prefill_tokens), flush=True)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("sim_scheduler.py", main))
