#!/usr/bin/env python3
"""Make reference outputs for a prompt file with the float32 NumPy reference (greedy, on the CPU).

It runs `run.py MODEL -m getp --device cpu -t 0`, so the reference file has getp's format (one line
of generated token ids per prompt, in input order) and eval.py can score the GPU's bf16 output
against it:

  python evaluation/make_reference.py models/tiny -i prompts.txt -o ref.txt -n 32 --input-format ids
  python run.py models/tiny -m getp -i prompts.txt -o gpu.txt -n 32 --input-format ids --device gpu
  python evaluation/eval.py -m synthetic -s gpu.txt -r ref.txt

The reference runs one prompt at a time in float32: use it on small (synthetic) models, or on a few
short prompts of a real one. Give the GPU run the same -n, input format and stop settings.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

RUN_PY = Path(__file__).resolve().parent.parent / "run.py"


def reference_command(args) -> list[str]:
    """The run.py command line that writes the reference outputs."""
    cmd = [sys.executable, str(RUN_PY), args.model, "-m", "getp", "-i", args.input, "-o", args.output,
           "--device", "cpu", "-t", "0", "-n", str(args.steps), "--input-format", args.input_format]
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    if args.system is not None:
        cmd += ["-y", args.system]
    if args.reasoning is not None:
        cmd += ["-r", args.reasoning]
    if args.tokenizer is not None:
        cmd += ["--tokenizer", args.tokenizer]
    if getattr(args, "force", False):
        cmd.append("--force")
    if args.quiet:
        cmd.append("-q")
    return cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="make_reference.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model .bin file or Hugging Face checkpoint directory")
    p.add_argument("-i", "--input", required=True, help="prompt file, one prompt per line")
    p.add_argument("-o", "--output", required=True,
                   help="where to write the reference token ids (an existing file needs --force)")
    p.add_argument("--force", action="store_true", help="replace an existing -o file (run.py --force)")
    p.add_argument("-n", "--steps", type=int, default=256,
                   help="most tokens to generate per prompt (default 256, as run.py)")
    p.add_argument("--input-format", choices=("chat", "text", "ids"), default="chat",
                   help="how run.py reads each prompt line (default chat, as run.py; synthetic models "
                        "with a small vocabulary need ids)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="never stop at a stop token: always generate -n tokens")
    p.add_argument("-y", "--system", default=None, help="chat input: developer instructions (run.py -y)")
    p.add_argument("-r", "--reasoning", choices=("low", "medium", "high"), default=None,
                   help="chat input: reasoning effort (run.py -r; default run.py's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file, passed to run.py")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.steps < 1:
        print(f"make_reference.py: error: -n must be at least 1 (got {args.steps})", file=sys.stderr)
        return 2
    if not Path(args.input).is_file():
        print(f"make_reference.py: error: {args.input}: no such file", file=sys.stderr)
        return 2
    # run.py checks -o before it loads the model and reports its own errors in one line; pass its
    # status on (Ctrl-C reaches both processes: run.py keeps its partial file and exits 130).
    return subprocess.run(reference_command(args)).returncode


if __name__ == "__main__":
    sys.path.insert(0, str(RUN_PY.parent))
    from gptoss.cli import run_main

    sys.exit(run_main("make_reference.py", main))
