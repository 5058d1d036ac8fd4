#!/usr/bin/env python3
"""getp throughput: N prompts of realistic lengths through run.py's getp, exactly -n tokens each.

  python benchmarks/bench_getp.py --preset gpt-oss-20b --prompts 4096 -n 512 [--kernels portable]
                                  [--kv-cache-dtype fp8] [--dense-experts]

The model is random weights of the real shape made in memory (run.py's `synthetic:PRESET`; speed does
not depend on the values), or --model PATH. Prompts are random token ids (--input-format ids) with
lengths drawn uniformly from --min-len..--max-len. Prints generated tokens/s from getp's own record.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from benchmarks.common import add_json_option, json_path_error, write_json  # noqa: E402
from gptoss.kernels import KERNEL_MODES  # noqa: E402
from gptoss.ops.attention import KV_DTYPES  # noqa: E402


def write_prompts(path: Path, n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    with open(path, "w") as f:
        for length in lengths:
            f.write(" ".join(map(str, rng.integers(0, min(vocab, 199998), length))) + "\n")
    return int(lengths.sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b", help="shape of the random model (gptoss.config.PRESETS)")
    p.add_argument("--model", default=None, help="a real model file/directory instead of random weights")
    p.add_argument("--prompts", type=int, default=2048, help="number of prompts")
    p.add_argument("--min-len", type=int, default=64, help="shortest prompt, in tokens (default 64)")
    p.add_argument("--max-len", type=int, default=1024, help="longest prompt, in tokens (default 1024)")
    p.add_argument("-n", "--steps", type=int, default=256, help="generated tokens per prompt (--ignore-eos)")
    p.add_argument("-b", "--batch", type=int, default=None, help="cap on sequences in flight")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="most prompt tokens prefilled per step (default EngineConfig.prefill_tokens)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="GPU memory the run may use, weights included (run.py --gpu-memory): e.g. 78 to "
                        "size the batch as on an 80 GB card")
    p.add_argument("--promise", type=float, default=None,
                   help="share of each budget that admission promises in KV pages (default "
                        "EngineConfig.promise; below 1, sequences may be preempted)")
    p.add_argument("--swap-space", type=float, default=None, metavar="GIB",
                   help="host memory for preempted sequences' KV (run.py --swap-space; default "
                        "EngineConfig.swap_space; 0: prefill them again)")
    p.add_argument("--kernels", choices=KERNEL_MODES, default=None,
                   help="GPU kernel mode (run.py --kernels): portable = the portable paths, the code an AMD "
                        "GPU runs (default: $GPTOSS_KERNELS, else auto)")
    p.add_argument("--kv-cache-dtype", choices=KV_DTYPES, default="bf16",
                   help="the KV cache's element format (run.py --kv-cache-dtype; default bf16)")
    p.add_argument("--dense-experts", action="store_true",
                   help="keep a bf16 copy of the MXFP4 expert weights for large steps (run.py --dense-experts; "
                        "4x the expert memory)")
    add_json_option(p, "a copy of getp's record")
    args = p.parse_args(argv)
    if (code := json_path_error("bench_getp.py", args)) is not None:
        return code

    from gptoss.cli import error
    from gptoss.config import PRESETS
    from gptoss.errors import GptossError
    from gptoss.getp import GetpOptions, run_getp
    from gptoss.llm import LLM
    from gptoss.sampling import SamplingParams

    vocab = PRESETS[args.preset].vocab_size
    from gptoss.kernels import KernelOptions

    options = {"max_seqs": args.batch, "promise": args.promise, "prefill_tokens": args.prefill_tokens,
               "swap_space": args.swap_space,
               "memory_limit": None if args.gpu_memory is None else int(args.gpu_memory * 2**30),
               "kernels": KernelOptions.from_env(mode=args.kernels), "kv_cache_dtype": args.kv_cache_dtype,
               "dense_experts": args.dense_experts}
    model = args.model or f"synthetic:{args.preset}"
    try:
        llm = LLM(model, **{k: v for k, v in options.items() if v is not None})
    except (ValueError, GptossError) as e:  # e.g. --dense-experts that does not fit or has no kernel to read it
        return error("bench_getp.py", str(e))
    print(llm.device, file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompt_tokens = write_prompts(prompts, args.prompts, args.min_len, args.max_len, vocab)
        record = Path(tmp) / "record.json"
        options = GetpOptions(input=str(prompts), output=str(Path(tmp) / "out.txt"), input_format="ids",
                              json_path=str(record))
        code = run_getp(llm, options, SamplingParams(max_tokens=args.steps, ignore_eos=True))
        if code:
            return code
        rec = json.loads(record.read_text())
        if args.json:
            write_json(args.json, rec, indent=2)
    print(f"bench_getp: {model}: {args.prompts} prompts ({prompt_tokens} prompt tokens, lengths "
          f"{args.min_len}..{args.max_len}), {rec['generated_tokens']} generated in {rec['wall_seconds']} s: "
          f"{rec['tokens_per_second']:,.0f} generated tokens/s, peak GPU memory "
          f"{(rec['peak_gpu_memory_bytes'] or 0) / 2**30:.1f} GiB")
    eng = rec.get("engine")
    if eng:
        print(f"  {eng['slots']} slots of {eng['capacity']} positions, {eng.get('pages', 0)} KV pages of 64; at most "
              f"{eng.get('most_running', 0)} sequences at once; {eng.get('preemptions', 0)} preemptions "
              f"({eng.get('swaps', 0)} swapped out and back, {eng.get('recomputed_tokens', 0)} tokens prefilled again)")
        print(f"  {eng['mixed_steps']} steps with prompt "
              f"chunks ({eng['prompt_tokens']} prompt tokens + decode tokens) in {eng['mixed_seconds']:.1f} s; "
              f"{eng['decode_steps']} decode-only steps in {eng['decode_seconds']:.1f} s; "
              f"{eng['decode_tokens']} decode tokens in all; host scheduling {eng['host_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    from gptoss.cli import run_main

    sys.exit(run_main("bench_getp.py", main))
