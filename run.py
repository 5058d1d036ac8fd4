#!/usr/bin/env python3
"""gpt-oss inference: generate, chat, or batch generation over a prompt file (getp).

  python run.py model.bin -m generate -p "Once upon a time"
  python run.py model.bin -m chat
  python run.py model.bin -m getp -i prompts.txt -o out.txt
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("generate", "chat", "getp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run gpt-oss-20b / gpt-oss-120b (or a synthetic model of any size) on the GPU, "
                    "or on the CPU with the NumPy reference.",
        epilog="MODEL is a .bin file (export/export_model_bin.py) or a Hugging Face checkpoint directory.\n"
               "Left out, it is $GPTOSS_MODEL, else ./model.bin, else a Hugging Face cache copy of "
               "openai/gpt-oss-20b.\n\nexamples:\n"
               "  python run.py model.bin -m generate -p \"Why is the sky blue?\" -n 128\n"
               "  python run.py model.bin -m chat -y \"Answer in one sentence.\"\n"
               "  python run.py model.bin -m getp -i prompts.txt -o out.txt -n 512\n"
               "  python decode.py -i out.txt -o out.txt.decoded")
    p.add_argument("model", nargs="?", help="model .bin file or Hugging Face checkpoint directory")
    p.add_argument("-m", "--mode", choices=MODES, default="generate",
                   help="generate: continue a prompt; chat: interactive harmony chat; "
                        "getp: one generation per line of an input file (default: generate)")
    p.add_argument("-p", "--prompt", default=None,
                   help="generate: the prompt, used as written (no chat template); "
                        "chat: a first user message (then the chat goes on interactively)")
    p.add_argument("-n", "--steps", type=int, default=256,
                   help="most tokens to generate per prompt (default 256); generation also ends at "
                        "a stop token (<|return|>, <|call|>, <|endoftext|>) or the context's end")
    p.add_argument("-t", "--temperature", type=float, default=None,
                   help="sampling temperature; 0 = greedy (default: 1.0 for generate/chat, "
                        "0 for getp)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample among the most likely tokens holding this much "
                        "probability (default 1.0 = all)")
    p.add_argument("-s", "--seed", type=int, default=0,
                   help="random seed; a prompt's draws depend only on (seed, its line, the step), "
                        "so results do not depend on the batch (default 0)")
    p.add_argument("-y", "--system", default=None,
                   help="chat/getp (chat input): instructions, sent as harmony's developer message")
    p.add_argument("-r", "--reasoning", choices=("low", "medium", "high"), default="medium",
                   help="chat/getp (chat input): reasoning effort written into the system message "
                        "(default medium)")
    p.add_argument("-b", "--batch", type=int, default=None,
                   help="getp: most sequences in flight at once (default: as many as GPU memory "
                        "holds; 1 on the CPU)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="GPU memory this run may use in all, weights included, in GiB (default: all "
                        "that is free); lower it to share the GPU or to size a run for a smaller one")
    p.add_argument("-i", "--input", help="getp: input file, one prompt per line (UTF-8)")
    p.add_argument("-o", "--output", help="getp: output file, one line of generated token ids per "
                   "prompt, in input order (written atomically at the end)")
    p.add_argument("--input-format", choices=("chat", "text", "ids"), default="chat",
                   help="getp: chat = each line is a user message in the harmony chat format "
                        "(default); text = each line is tokenized as written; ids = each line holds "
                        "space-separated token ids (any vocabulary)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="never stop at a stop token: generate exactly -n tokens (for benchmarks)")
    p.add_argument("--skip-long", action="store_true",
                   help="getp: a prompt that does not fit in the context gets an empty output line "
                        "and a warning, instead of refusing the whole run")
    p.add_argument("--resume", action="store_true",
                   help="getp: continue an interrupted run from OUTPUT.partial, without "
                        "recomputing finished prompts")
    p.add_argument("--json", dest="json_path", default=None,
                   help="getp: also write the run's figures (prompts, tokens, time, tokens/s, peak "
                        "GPU memory) as JSON to this path")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto = the GPU when CuPy finds one, else the CPU reference (default auto)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.bin or o200k_base.tiktoken (default: found next to the model, in "
                        "tiktoken's cache, or downloaded once)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def fail(message: str, code: int = 2):
    print(f"run.py: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from gptoss.engine import resolve_model_path, open_backend
    from gptoss.sampling import SamplingParams

    if args.temperature is None:
        args.temperature = 0.0 if args.mode == "getp" else 1.0
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        fail(str(e))
    if args.steps < 1:
        fail(f"-n must be at least 1 (got {args.steps})")
    if args.batch is not None and args.batch < 1:
        fail(f"-b must be at least 1 (got {args.batch})")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        fail(f"--gpu-memory must be positive (got {args.gpu_memory})")
    if args.mode == "getp":
        from gptoss.getp import check_getp_args
        try:
            check_getp_args(args)
        except ValueError as e:
            fail(str(e))

    try:
        model_path = resolve_model_path(args.model)
        memory = None if args.gpu_memory is None else int(args.gpu_memory * 2**30)
        backend = open_backend(model_path, args.device, memory_limit=memory)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    except Exception as e:  # CheckpointError and GPU memory errors carry their own one-line message
        if type(e).__name__ in ("CheckpointError", "OutOfMemoryError", "ModelTooLargeError"):
            fail(str(e))
        raise

    from gptoss.getp import run_getp
    from gptoss.interactive import run_chat, run_generate
    from gptoss.tokenizer import TokenizerError

    mode = {"getp": run_getp, "generate": run_generate, "chat": run_chat}[args.mode]
    try:
        return mode(backend, args, sampling, model_path)
    except TokenizerError as e:
        fail(str(e))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
