#!/usr/bin/env python3
"""Accuracy of the FP8 (e4m3) KV cache against the bf16 one: teacher-forced argmax agreement with the
float32 reference on a random tiny-real-heads model (the real head geometry: 64 q / 8 kv heads of 64).

  python benchmarks/kv_accuracy.py [--sequences 8] [--length 384] [--prompt 64] [--seed 0] [--cpu] [--json OUT]

N fixed random token sequences (seed) are fed with teacher forcing: the first --prompt tokens as one
prefill step (logits of every row), then one decode step per position whose input is the sequence's
true next token, never the model's pick. At every position the argmax of the GPU model's logits with a
bf16 cache and with an fp8 cache is compared with the argmax of the float32 reference's logits (the
whole sequence through gptoss.reference); printed: both agreement percentages, fp8 - bf16 in points
(the gate of issue 18: fp8 within 1 point of bf16), the mean KL(reference || GPU) of the next-token
distributions and the largest absolute logit difference.

--cpu: the same measurement on the CPU reference alone, no GPU: the float32 reference with its K and V
rounded to e4m3 (ReferenceModel(kv_fp8=True)) against the plain float32 reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import add_json_option, json_path_error, write_json  # noqa: E402
from gptoss.cli import error  # noqa: E402


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """ref, got [N, T, V] logits -> argmax agreement (%), mean KL(ref || got), max |logit difference|."""
    lr, lg = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lr) * (lr - lg)).sum(-1)
    return {"agreement_pct": 100.0 * float(np.mean(ref.argmax(-1) == got.argmax(-1))),
            "mean_kl": float(kl.mean()), "max_abs_logit_diff": float(np.abs(ref - got).max())}


def reference_logits(weights, seqs: np.ndarray, kv_fp8: bool = False) -> np.ndarray:
    from gptoss.reference import ReferenceModel

    model = ReferenceModel(weights, kv_fp8=kv_fp8)
    return np.stack([model.forward(s, model.new_cache()) for s in seqs])


def gpu_logits(device_weights, seqs: np.ndarray, prompt: int, kv_cache_dtype: str) -> np.ndarray:
    """Teacher-forced logits [N, T, V]: the prompts in one prefill step, then one decode step per position
    with the true tokens as inputs (eager launches: the captured graphs run the same kernels)."""
    import cupy

    from gptoss.batch import StepBatch
    from gptoss.model import GPUModel

    N, T = seqs.shape
    model = GPUModel(device_weights, slots=N, capacity=T, max_step_tokens=N * prompt,
                     max_rows=N * prompt, kv_cache_dtype=kv_cache_dtype)
    out = np.empty((N, T, device_weights.config.vocab_size), np.float32)
    step = StepBatch.prefill([s[:prompt] for s in seqs], list(range(N)))
    step.logit_rows = np.arange(N * prompt, dtype=np.int32)  # every row's logits
    out[:, :prompt] = cupy.asnumpy(model.forward(step)).reshape(N, prompt, -1)
    for t in range(prompt, T):
        step = StepBatch.decode(seqs[:, t], np.full(N, t), np.arange(N))
        out[:, t] = cupy.asnumpy(model.forward(step))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=8, help="sequences (default 8)")
    p.add_argument("--length", type=int, default=384, help="tokens per sequence (default 384; at most 512)")
    p.add_argument("--prompt", type=int, default=64, help="tokens prefilled in one step; the rest are decode "
                   "steps (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokens and of the random weights")
    p.add_argument("--cpu", action="store_true", help="the CPU reference alone (fp8-rounded K/V vs float32)")
    add_json_option(p, "the figures")
    args = p.parse_args(argv)
    if (code := json_path_error("kv_accuracy.py", args)) is not None:
        return code
    from gptoss.config import TINY_REAL_HEADS as cfg
    from gptoss.weights import random_weights

    if not 1 <= args.prompt <= args.length <= cfg.max_context or args.sequences < 1:
        return error("kv_accuracy.py", f"need 1 <= --prompt <= --length <= {cfg.max_context} and --sequences >= 1 "
                     f"(got --prompt {args.prompt}, --length {args.length}, --sequences {args.sequences})")
    weights = random_weights(cfg, "mxfp4", seed=args.seed)
    seqs = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.sequences, args.length))
    ref = reference_logits(weights, seqs)
    record = {"model": "tiny-real-heads (random, mxfp4)", "sequences": args.sequences, "length": args.length,
              "prompt": args.prompt, "seed": args.seed}
    if args.cpu:
        record["cpu fp8 K/V"] = compare(ref, reference_logits(weights, seqs, kv_fp8=True))
        rows = [("cpu reference, fp8 K/V", record["cpu fp8 K/V"])]
    else:
        from gptoss.gpu_weights import DeviceWeights

        dev = DeviceWeights(weights, progress=False)
        for dtype in ("bf16", "fp8"):
            record[f"gpu {dtype}"] = compare(ref, gpu_logits(dev, seqs, args.prompt, dtype))
        record["fp8_minus_bf16_points"] = record["gpu fp8"]["agreement_pct"] - record["gpu bf16"]["agreement_pct"]
        rows = [(f"gpu, {d} cache", record[f"gpu {d}"]) for d in ("bf16", "fp8")]
    print(f"teacher-forced argmax agreement with the float32 reference: {args.sequences} sequences x "
          f"{args.length} tokens (prompt {args.prompt}), {cfg.num_heads}/{cfg.num_kv_heads} heads, seed {args.seed}")
    for name, r in rows:
        print(f"  {name:<24} agreement {r['agreement_pct']:6.2f}%   mean KL {r['mean_kl']:.2e}   "
              f"max |logit diff| {r['max_abs_logit_diff']:.3f}")
    if not args.cpu:
        diff = record["fp8_minus_bf16_points"]
        print(f"  fp8 - bf16: {diff:+.2f} points ({'within' if abs(diff) <= 1 else 'outside'} the 1-point gate)")
    if args.json:
        write_json(args.json, record, indent=2)
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("kv_accuracy.py", main))
